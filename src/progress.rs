//! The terminal side of progress: turns [`Event`]s into indicatif bars and spinners on stderr, and
//! sets up `tracing` output. The only module that draws.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::events::{Event, Reporter, Unit};

/// Whether log lines may carry colour: `always`/`never` from `--color` win; otherwise (`None`)
/// only for a terminal, and never when `NO_COLOR` is set to anything but the empty string
/// (<https://no-color.org>).
pub fn use_color(forced: Option<bool>) -> bool {
    forced.unwrap_or_else(|| {
        std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()) && std::io::IsTerminal::is_terminal(&std::io::stderr())
    })
}

/// Sets up logging to stderr: warnings by default, commands run at `-v`, everything at `-vv`;
/// `-q` keeps errors only. `RUST_LOG` overrides. `timestamps`: for long-running services
/// (`dbh serve`), whose stderr ends up in a log file (OpenRC's output_log) that adds none.
pub fn init_tracing(verbose: u8, quiet: bool, color: bool, timestamps: bool) {
    let level = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, 2) => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| {
            // `dbh serve`'s access log (one line per request) shows unless -q.
            let access = if quiet { "" } else { ",dbh::access=info" };
            tracing_subscriber::EnvFilter::new(format!("dbh={level}{access},warn"))
        });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| LineWriter)
        // Colour codes only when asked for: logs and CI output must stay plain text.
        .with_ansi(color)
        .with_target(false);
    let _ = if timestamps {
        // RFC 3339 in UTC, e.g. 2026-12-02T17:04:05.123456Z.
        let inner = tracing_subscriber::fmt::format().with_ansi(color).with_target(false);
        builder.event_format(AccessLines { inner, timestamps: true }).try_init()
    } else {
        let inner = tracing_subscriber::fmt::format().with_ansi(color).with_target(false).without_time();
        builder.event_format(AccessLines { inner, timestamps: false }).try_init()
    };
}

/// The target of `dbh serve`'s access lines (one per request).
pub const ACCESS_TARGET: &str = "dbh::access";

/// tracing's own line format, except that an access line's message, which `serve` renders and
/// escapes itself, is copied as it is: tracing's formatter re-escapes every message character by
/// character, which was about a third of the user-space instructions of serving a 50 KB file
/// (callgrind). The line looks the same: `TIME  INFO MESSAGE`. With colour (a terminal) the
/// usual formatter runs: nobody serves a loaded binhost into a terminal.
struct AccessLines<F> {
    inner: F,
    timestamps: bool,
}

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for AccessLines<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        use tracing_subscriber::fmt::time::FormatTime as _;
        if event.metadata().target() != ACCESS_TARGET || writer.has_ansi_escapes() {
            return self.inner.format_event(ctx, writer, event);
        }
        if self.timestamps {
            tracing_subscriber::fmt::time::SystemTime.format_time(&mut writer)?;
            writer.write_char(' ')?;
        }
        writer.write_str(" INFO ")?;
        let mut message = Message { writer: &mut writer, result: Ok(()) };
        event.record(&mut message);
        message.result?;
        writer.write_char('\n')
    }
}

/// Copies the `message` field of an event as it is.
struct Message<'a, 'w> {
    writer: &'a mut tracing_subscriber::fmt::format::Writer<'w>,
    result: std::fmt::Result,
}

impl tracing::field::Visit for Message<'_, '_> {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.result = self.writer.write_str(value);
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            // A message is `fmt::Arguments`, whose Debug is its Display.
            self.result = write!(self.writer, "{value:?}");
        }
    }
}

/// Where log lines go: stderr, by one write(2) per line without std's stderr lock. tracing
/// formats each event completely and hands it over in one `write_all`, so the lock only made the
/// threads of `dbh serve` (one access line per request) wait for each other; a write of a
/// line to a file or pipe is not torn by the kernel.
struct LineWriter;

impl std::io::Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // SAFETY: fd 2 and a valid buffer of `buf.len()` bytes.
        let n = unsafe { libc::write(libc::STDERR_FILENO, buf.as_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = std::io::Error::last_os_error();
        // As std's Stderr: a closed stderr swallows output rather than failing the program.
        if e.raw_os_error() == Some(libc::EBADF) { Ok(buf.len()) } else { Err(e) }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Draws bars when stderr is a terminal and not quiet; otherwise prints notes and finishes as lines.
pub struct Terminal {
    multi: MultiProgress,
    bars: Mutex<HashMap<String, ProgressBar>>,
    quiet: bool,
}

impl Terminal {
    pub fn new(quiet: bool) -> Terminal {
        let target = if quiet { ProgressDrawTarget::hidden() } else { ProgressDrawTarget::stderr() };
        Terminal { multi: MultiProgress::with_draw_target(target), bars: Mutex::default(), quiet }
    }

    fn println(&self, line: &str) {
        if self.quiet {
            return;
        }
        if self.multi.is_hidden() {
            eprintln!("{line}");
        } else {
            let _ = self.multi.println(line);
        }
    }
}

impl Reporter for Terminal {
    fn event(&self, event: Event) {
        let mut bars = self.bars.lock().expect("progress bars poisoned");
        match event {
            Event::Start { task, label, total, unit } => {
                let bar = match (unit, total) {
                    (Unit::Spinner, _) | (_, None) => {
                        let b = ProgressBar::new_spinner();
                        b.enable_steady_tick(Duration::from_millis(120));
                        b.set_style(ProgressStyle::with_template("{spinner} {prefix} {elapsed} {msg}").expect("template"));
                        b
                    }
                    (Unit::Bytes, Some(total)) => ProgressBar::new(total).with_style(
                        ProgressStyle::with_template("{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}")
                            .expect("template")
                            .progress_chars("=> "),
                    ),
                    (Unit::Items, Some(total)) => ProgressBar::new(total).with_style(
                        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg}")
                            .expect("template")
                            .progress_chars("=> "),
                    ),
                };
                bar.set_prefix(label);
                bars.insert(task, self.multi.add(bar));
            }
            Event::Progress { task, position, message } => {
                if let Some(bar) = bars.get(&task) {
                    bar.set_position(position);
                    if let Some(m) = message {
                        bar.set_message(m);
                    }
                }
            }
            Event::Finish { task, message } => {
                if let Some(bar) = bars.remove(&task) {
                    bar.finish_and_clear();
                    self.multi.remove(&bar);
                }
                drop(bars);
                self.println(&message);
            }
            Event::Note { message } => {
                drop(bars);
                self.println(&message);
            }
            Event::Count { name, value } => {
                tracing::debug!("{name} = {value}");
            }
        }
    }
}
