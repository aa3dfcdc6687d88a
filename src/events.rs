//! Progress events: how core modules report what they are doing without drawing anything.
//!
//! The core calls [`Reporter::event`]; `progress.rs` turns events into bars for a terminal, tests
//! collect them with [`Collector`] to assert on what happened (e.g. "zero binpkgs transferred").

use std::sync::Mutex;

/// One thing that happened. `task` identifies a unit of work (a download, a build, an index run).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A task started; `total` is its size when known (bytes, packages, files).
    Start { task: String, label: String, total: Option<u64>, unit: Unit },
    /// A task advanced to `position`; `message` says what it is on now.
    Progress { task: String, position: u64, message: Option<String> },
    /// A task ended.
    Finish { task: String, message: String },
    /// A line worth showing once, above the bars.
    Note { message: String },
    /// A fact tests and benchmarks count, e.g. `("binpkg.transferred", 0)`.
    Count { name: String, value: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Items,
    Bytes,
    /// No known size: a spinner.
    Spinner,
}

/// Receives events; implemented by the terminal renderer and by test collectors.
pub trait Reporter: Send + Sync {
    fn event(&self, event: Event);

    fn note(&self, message: impl Into<String>)
    where
        Self: Sized,
    {
        self.event(Event::Note { message: message.into() });
    }
}

/// Drops everything (library callers that do not care).
pub struct Silent;

impl Reporter for Silent {
    fn event(&self, _: Event) {}
}

/// Keeps every event, for tests.
#[derive(Default)]
pub struct Collector {
    pub events: Mutex<Vec<Event>>,
}

impl Reporter for Collector {
    fn event(&self, event: Event) {
        self.events.lock().expect("collector poisoned").push(event);
    }
}

impl Collector {
    pub fn counts(&self, name: &str) -> Vec<u64> {
        self.events
            .lock()
            .expect("collector poisoned")
            .iter()
            .filter_map(|e| match e {
                Event::Count { name: n, value } if n == name => Some(*value),
                _ => None,
            })
            .collect()
    }
}
