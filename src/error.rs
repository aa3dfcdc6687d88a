//! The top-level error and how dbh ends: every module's error enum converts into [`Error`];
//! [`report`] prints it as `error: …`, its causes, and a `hint: …` line where the fix is known;
//! [`Error::exit_code`] and the constants below are the one place that decides dbh's exit status.
//!
//! This is the only module that knows every module's error type: [`hint_of`] walks an error's
//! `source()` chain, downcasting each cause to the types listed in [`hint_for`], and takes the
//! first hint one gives (the outermost cause that knows the fix). Module errors therefore wrap
//! other errors with `#[error("{0}")]` + `#[from]`/`#[source]` rather than `transparent` (a
//! transparent variant hides the wrapped error from the chain), and never forward hints by hand.

use std::error::Error as StdError;

use crate::hint::Hint;

/// Exit status: success.
pub const EXIT_OK: u8 = 0;
/// Exit status: a user or configuration error, a failed build or check.
pub const EXIT_FAILURE: u8 = 1;
/// Exit status: the command line could not be parsed (as clap and most Unix tools do).
pub const EXIT_USAGE: u8 = 2;
/// Exit status: dbh hit a bug (a panic), as Rust's own default for a panicking `main`.
pub const EXIT_BUG: u8 = 101;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Settings(#[from] crate::settings::SettingsError),
    #[error("{0}")]
    Target(#[from] crate::target::TargetError),
    #[error("{0}")]
    Process(#[from] crate::process::ProcessError),
    #[error("{0}")]
    Binpkg(#[from] crate::binpkg::BinpkgError),
    #[error("{0}")]
    Binhost(#[from] crate::binhost::BinhostError),
    #[error("{0}")]
    Sign(#[from] crate::sign::SignError),
    #[error("{0}")]
    Serve(#[from] crate::serve::ServeError),
    #[error("{0}")]
    Uki(#[from] crate::uki::UkiError),
    #[error("{0}")]
    Image(#[from] crate::image::ImageError),
    #[error("{0}")]
    Vm(#[from] crate::vm::VmError),
    #[error("{0}")]
    Guest(#[from] crate::guest::GuestError),
    #[error("{0}")]
    Build(#[from] crate::build::BuildError),
    #[error("{0}")]
    Rootfs(#[from] crate::rootfs::RootfsError),
    #[error("{0}")]
    Repo(#[from] crate::repo::RepoError),
    #[error("{0}")]
    Client(#[from] crate::client::ClientError),
    /// A check found problems and already printed them (e.g. `dbh binhost check`).
    #[error("{0}")]
    Failed(String),
    #[error("cannot write to standard output")]
    Stdout(#[source] std::io::Error),
    /// A command that passes another program's exit status through (`dbh vm exec`, `vm ssh`)
    /// ends with it; nothing is printed.
    #[error("exit status {0}")]
    Exit(u8),
}

impl Error {
    /// The hint of the first cause in the chain that has one.
    pub fn hint(&self) -> Option<String> {
        hint_of(self)
    }

    /// The exit status for this error (see the `EXIT_*` constants).
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Exit(code) => *code,
            _ => EXIT_FAILURE,
        }
    }
}

/// The hint of `err` or of the first error in its `source()` chain that has one.
pub fn hint_of(err: &(dyn StdError + 'static)) -> Option<String> {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(hint) = hint_for(e) {
            return Some(hint);
        }
        next = e.source();
    }
    None
}

/// Asks `e` for its hint if it is one of the module error types (or a box of one).
fn hint_for(e: &(dyn StdError + 'static)) -> Option<String> {
    macro_rules! ask {
        ($($ty:ty),* $(,)?) => {
            $(
                if let Some(e) = e.downcast_ref::<$ty>() {
                    return e.hint();
                }
                if let Some(e) = e.downcast_ref::<Box<$ty>>() {
                    return e.hint();
                }
            )*
        };
    }
    ask!(
        crate::settings::SettingsError,
        crate::target::TargetError,
        crate::process::ProcessError,
        crate::binpkg::BinpkgError,
        crate::binhost::BinhostError,
        crate::binhost::trust::TrustError,
        crate::sign::SignError,
        crate::serve::ServeError,
        crate::uki::UkiError,
        crate::uki::pe::PeError,
        crate::uki::initramfs::InitramfsError,
        crate::image::ImageError,
        crate::image::stage::StageError,
        crate::vm::VmError,
        crate::guest::GuestError,
        crate::build::BuildError,
        crate::build::toolchain::ToolchainError,
        crate::build::chroot::ChrootError,
        crate::rootfs::RootfsError,
        crate::client::ClientError,
        crate::repo::RepoError,
    );
    None
}

/// Prints an error the way every dbh command does: the message, each cause on its own line, the hint.
pub fn report(err: &Error) {
    if let Error::Exit(_) = err {
        return;
    }
    eprintln!("error: {err}");
    let mut source = err.source();
    // `transparent` variants repeat the inner message as their first source; skip exact repeats.
    let mut last = err.to_string();
    while let Some(cause) = source {
        let text = cause.to_string();
        if text != last {
            eprintln!("  caused by: {text}");
        }
        last = text;
        source = cause.source();
    }
    if let Some(hint) = err.hint() {
        eprintln!("hint: {hint}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every error type that implements `Hint` is one `hint_for` asks: a new module error that is
    /// not listed would have its hints silently dropped.
    #[test]
    fn every_hint_impl_is_asked() {
        let own = include_str!("error.rs");
        let list = &own[own.find("ask!(\n").unwrap()..];
        let list = &list[..list.find(");").unwrap()];
        let mut stack = vec![std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/src"))];
        let mut found = 0;
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).unwrap().flatten() {
                let path = e.path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.extension().is_some_and(|x| x == "rs") {
                    let text = std::fs::read_to_string(&path).unwrap();
                    for (i, _) in text.match_indices("impl Hint for ") {
                        let name: String =
                            text[i + 14..].chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                        if name.is_empty() {
                            continue; // this test's own search string
                        }
                        found += 1;
                        assert!(list.contains(&format!("::{name},")), "{name} ({}) is not in hint_for", path.display());
                    }
                }
            }
        }
        assert!(found >= 18, "only {found} Hint impls found");
    }

    /// A wrapped error's hint reaches the report without a forwarding arm: `BinhostError::Sign`
    /// used to lose `SignError`'s.
    #[test]
    fn hints_are_found_down_the_source_chain() {
        let sign = crate::sign::SignError::NoKey { dir: "/k".into() };
        let want = sign.hint();
        assert!(want.is_some());
        let err = Error::from(crate::binhost::BinhostError::from(sign));
        assert_eq!(err.hint(), want);
        let boxed = crate::binhost::BinhostError::Package {
            path: "/p".into(),
            source: Box::new(crate::binpkg::BinpkgError::Unsigned { path: "/p".into(), reason: "r".into() }),
        };
        assert!(Error::from(boxed).hint().unwrap().contains("dbh binhost add"));
    }

    #[test]
    fn exit_codes() {
        assert_eq!(Error::Failed("x".into()).exit_code(), EXIT_FAILURE);
        assert_eq!(Error::Exit(7).exit_code(), 7);
        assert_ne!(EXIT_USAGE, EXIT_BUG);
    }
}
