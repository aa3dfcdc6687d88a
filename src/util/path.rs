//! Finding programs on `PATH`, with one set of rules.
//!
//! - A name with a `/` in it (`./x`, `bin/x`, `/usr/bin/x`) is a path: it is used as it is, never
//!   searched for, as a shell does.
//! - A bare name is looked for in each `PATH` entry in order. Empty entries are skipped: POSIX
//!   reads them as the current directory, but dbh runs as root in whatever directory it was
//!   started from, and a stray `::` must not make it run `./emerge`.
//! - What is found must be a regular file (or a link to one) with an execute bit; a data file of
//!   the same name earlier on `PATH` is passed over, as `execvp` would.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

/// `program` found by the module's rules on this process's `PATH`.
pub fn which(program: impl AsRef<Path>) -> Option<PathBuf> {
    which_in(program.as_ref(), std::env::var_os("PATH").as_deref())
}

/// [`which`] over an explicit search path (`None`: no `PATH` at all).
pub fn which_in(program: &Path, path: Option<&OsStr>) -> Option<PathBuf> {
    if program.as_os_str().as_bytes().contains(&b'/') {
        return is_executable(program).then(|| program.to_owned());
    }
    if program.as_os_str().is_empty() {
        return None;
    }
    std::env::split_paths(path?).filter(|d| !d.as_os_str().is_empty()).map(|d| d.join(program)).find(|p| is_executable(p))
}

/// A regular file (following links) with at least one execute bit.
pub fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A `PATH` value: `first` in order, then this process's `PATH`.
pub fn prepend_to_path(first: impl IntoIterator<Item = PathBuf>) -> Result<OsString, std::env::JoinPathsError> {
    let current = std::env::var_os("PATH").unwrap_or_default();
    std::env::join_paths(first.into_iter().chain(std::env::split_paths(&current).filter(|d| !d.as_os_str().is_empty())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tool(dir: &Path, name: &str, mode: u32) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn bare_names_are_searched_in_order_skipping_non_executables() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        tool(a.path(), "t", 0o644);
        let want = tool(b.path(), "t", 0o755);
        std::fs::create_dir(a.path().join("d")).unwrap();
        let path = std::env::join_paths([a.path(), b.path()]).unwrap();
        assert_eq!(which_in(Path::new("t"), Some(&path)), Some(want.clone()), "a data file earlier on PATH is passed over");
        assert_eq!(which_in(Path::new("d"), Some(&path)), None, "a directory is not a program");
        assert_eq!(which_in(Path::new("missing"), Some(&path)), None);
        assert_eq!(which_in(Path::new("t"), None), None);
        assert_eq!(which_in(Path::new(""), Some(&path)), None);
        let first = tool(a.path(), "u", 0o700);
        tool(b.path(), "u", 0o755);
        assert_eq!(which_in(Path::new("u"), Some(&path)), Some(first));
    }

    #[test]
    fn names_with_a_slash_are_paths_not_searched() {
        let a = tempfile::tempdir().unwrap();
        let exe = tool(a.path(), "t", 0o755);
        let data = tool(a.path(), "data", 0o644);
        let path = std::env::join_paths([a.path()]).unwrap();
        assert_eq!(which_in(&exe, None), Some(exe.clone()), "absolute");
        assert_eq!(which_in(&data, Some(&path)), None, "not executable");
        assert_eq!(which_in(Path::new("./no-such-tool-here"), Some(&path)), None);
        // A relative path is taken relative to the working directory, not to PATH's entries.
        let rel = Path::new("src/util/path.rs");
        assert_eq!(which_in(rel, Some(&path)), None, "a data file in the checkout");
        assert_eq!(which_in(Path::new("sub/t"), Some(&path)), None);
    }

    #[test]
    fn empty_path_entries_are_not_the_current_directory() {
        // An executable file in the working directory: an empty entry read as "." would find it.
        let cwd = std::env::current_dir().unwrap();
        let exe = tempfile::Builder::new()
            .prefix(".which-test-")
            .permissions(std::fs::Permissions::from_mode(0o755))
            .tempfile_in(&cwd)
            .unwrap();
        let name = Path::new(exe.path().file_name().unwrap()).to_owned();
        assert_eq!(which_in(&name, Some(OsStr::new("::"))), None);
        assert_eq!(which_in(&name, Some(OsStr::new(""))), None);
        assert_eq!(which_in(&name, Some(cwd.as_os_str())), Some(cwd.join(&name)), "found where PATH names the directory");
    }

    #[test]
    fn prepended_entries_come_first() {
        let p = prepend_to_path([PathBuf::from("/first"), PathBuf::from("/second")]).unwrap();
        assert!(p.to_string_lossy().starts_with("/first:/second"), "{p:?}");
        assert!(prepend_to_path([PathBuf::from("/a:b")]).is_err(), "a ':' cannot be in an entry");
    }
}
