//! How an error explains itself: the [`Hint`] trait (what fixes it) and [`chain`] (the message
//! with its causes on one line). A leaf module (it imports nothing of dbh), so every module's
//! error can implement it without knowing the top-level error; `error::report` walks an error's
//! `source()` chain and prints the first hint a cause gives.

/// Implemented by every module error that can tell the user how to fix it. An error that only
/// wraps another (a `#[from]` variant) returns `None` for it: the report asks the wrapped error
/// itself, further down the `source()` chain.
pub trait Hint {
    fn hint(&self) -> Option<String> {
        None
    }
}

/// `err`'s message and its causes, joined by `: `. A wrapper that displays as the error it wraps
/// (`#[error("{0}")]`) is not repeated.
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut last = text.clone();
    let mut source = err.source();
    while let Some(cause) = source {
        let line = cause.to_string();
        if line != last {
            text.push_str(": ");
            text.push_str(&line);
        }
        last = line;
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    enum Inner {
        #[error("inner")]
        A(#[source] std::io::Error),
    }
    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("{0}")]
        Wrap(#[from] Inner),
    }

    #[test]
    fn chain_skips_wrappers_that_repeat_their_cause() {
        let e = Outer::from(Inner::A(std::io::Error::other("disk")));
        assert_eq!(super::chain(&e), "inner: disk");
    }
}
