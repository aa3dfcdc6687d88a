//! The top-level error: every module's error enum converts into [`Error`]; [`report`] prints it as
//! `error: …`, its causes, and a `hint: …` line where the fix is known.

use std::error::Error as StdError;

/// Implemented by every module error that can tell the user how to fix it.
pub trait Hint {
    fn hint(&self) -> Option<String> {
        None
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Settings(#[from] crate::settings::SettingsError),
    #[error(transparent)]
    Target(#[from] crate::target::TargetError),
    #[error(transparent)]
    Process(#[from] crate::process::ProcessError),
    #[error(transparent)]
    Binpkg(#[from] crate::binpkg::BinpkgError),
    #[error(transparent)]
    Binhost(#[from] crate::binhost::BinhostError),
    #[error(transparent)]
    Sign(#[from] crate::sign::SignError),
    #[error(transparent)]
    Serve(#[from] crate::serve::ServeError),
    #[error(transparent)]
    Uki(#[from] crate::uki::UkiError),
    #[error(transparent)]
    Image(#[from] crate::image::ImageError),
    #[error(transparent)]
    Vm(#[from] crate::vm::VmError),
    #[error(transparent)]
    Guest(#[from] crate::guest::GuestError),
    #[error(transparent)]
    Build(#[from] crate::build::BuildError),
    #[error(transparent)]
    Rootfs(#[from] crate::rootfs::RootfsError),
    #[error(transparent)]
    Repo(#[from] crate::repo::RepoError),
    /// A check found problems and already printed them (e.g. `dbh binhost check`).
    #[error("{0}")]
    Failed(String),
    #[error("cannot write to standard output")]
    Stdout(#[source] std::io::Error),
}

impl Error {
    pub fn hint(&self) -> Option<String> {
        match self {
            Error::Settings(e) => e.hint(),
            Error::Target(e) => e.hint(),
            Error::Process(e) => e.hint(),
            Error::Binpkg(e) => e.hint(),
            Error::Binhost(e) => e.hint(),
            Error::Sign(e) => e.hint(),
            Error::Serve(e) => e.hint(),
            Error::Uki(e) => e.hint(),
            Error::Image(e) => e.hint(),
            Error::Vm(e) => e.hint(),
            Error::Guest(e) => e.hint(),
            Error::Build(e) => e.hint(),
            Error::Rootfs(e) => e.hint(),
            Error::Repo(e) => e.hint(),
            Error::Failed(_) | Error::Stdout(_) => None,
        }
    }

    pub fn exit_code(&self) -> u8 {
        1
    }
}

/// Prints an error the way every dbh command does: the message, each cause on its own line, the hint.
pub fn report(err: &Error) {
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
