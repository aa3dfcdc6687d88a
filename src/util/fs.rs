//! Durable file writes and advisory locks.
//!
//! Durability, one level everywhere: an atomic write puts the data in a temporary file in the
//! destination's directory (a rename is atomic only within one file system), fsyncs that file,
//! renames it over the destination and fsyncs the directory (without it the rename itself may
//! not survive a power loss). A reader sees the old content or the new, never a part; after a
//! crash the destination holds one of the two. The binhost keeps its own `TempFile`
//! (`binhost::TempFile`) because it renames many files and fsyncs their directory once; it has the
//! same steps, in batch.
//!
//! Locks are `flock(2)` locks through std's `File::lock` family: held while the `File` lives,
//! inherited by a child that gets the descriptor, released when the last holder closes it.

use std::fs::File;
use std::io::{self, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

/// Writes `data` to `path` atomically and durably (see the module docs); the file gets mode 0666
/// less the umask's bits, like `File::create`.
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    write_atomic_inner(path, data, None)
}

/// [`write_atomic`] with an explicit mode (e.g. 0600 for a secret key), set before any data is
/// written so the content is never readable under a wider one.
pub fn write_atomic_mode(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    write_atomic_inner(path, data, Some(mode))
}

fn write_atomic_inner(path: &Path, data: &[u8], mode: Option<u32>) -> io::Result<()> {
    let dir = parent_dir(path);
    let name = path.file_name().map_or_else(|| "tmp".into(), |n| n.to_string_lossy().into_owned());
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        // Created with the final mode (the umask applies when none is given), not tempfile's 0600.
        .permissions(std::fs::Permissions::from_mode(mode.unwrap_or(0o666)))
        .tempfile_in(dir)
        .map_err(|e| named(e, "cannot create a temporary file in", dir))?;
    if let Some(mode) = mode {
        // Exactly `mode`, whatever the umask (a public key must end up world-readable).
        tmp.as_file().set_permissions(std::fs::Permissions::from_mode(mode)).map_err(|e| named(e, "cannot set the mode of", tmp.path()))?;
    }
    tmp.write_all(data).map_err(|e| named(e, "cannot write", tmp.path()))?;
    tmp.as_file().sync_all().map_err(|e| named(e, "cannot fsync", tmp.path()))?;
    // On failure the temporary file is removed (NamedTempFile's drop) and `path` is untouched.
    tmp.persist(path).map_err(|e| named(e.error, "cannot rename a temporary file to", path))?;
    sync_dir(dir)
}

/// Moves a finished file (written by someone else, e.g. a child process) into place durably:
/// fsync `tmp`, rename it to `dest`, fsync `dest`'s directory.
pub fn persist_file(tmp: &Path, dest: &Path) -> io::Result<()> {
    fs_err::File::open(tmp)?.sync_all().map_err(|e| named(e, "cannot fsync", tmp))?;
    fs_err::rename(tmp, dest)?;
    sync_dir(parent_dir(dest))
}

/// fsyncs a directory so that renames into it survive a crash.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| named(e, "cannot fsync directory", dir))
}

/// The directory a relative or bare `path` lives in ("" means the current one).
fn parent_dir(path: &Path) -> &Path {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// An io error that says what was done to which path, like fs-err's.
fn named(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

/// Reading or writing one named file failed: the variant pair several modules' errors shared
/// word for word. A module error wraps it (`#[error("{0}")] File(#[from] FileError)`) where
/// the file's role needs no more words than its path.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read {path}")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Something done to a path failed: `cannot <doing> <path>` with the io error as its cause. The
/// `Io { doing, path, source }` variant repo, build, rootfs and vm each had, in one place.
#[derive(Debug, thiserror::Error)]
#[error("cannot {doing} {path}")]
pub struct PathError {
    pub doing: &'static str,
    pub path: std::path::PathBuf,
    #[source]
    pub source: io::Error,
}

/// `map_err(at("read", &p))`: an io error as a [`PathError`] about `path`, converted into the
/// caller's error.
pub fn at<'a, E: From<PathError>>(doing: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> E + 'a {
    move |source| E::from(PathError { doing, path: path.to_owned(), source })
}

/// Which kind of lock [`try_lock`] takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lock {
    /// Many holders at once (readers).
    Shared,
    /// One holder.
    Exclusive,
}

/// Opens `path` for locking, creating it (empty) when missing, never truncating it.
pub fn open_lock_file(path: &Path) -> io::Result<File> {
    Ok(fs_err::OpenOptions::new().create(true).truncate(false).write(true).open(path)?.into_parts().0)
}

/// Takes the lock without waiting: `Ok(false)` when another holder has a conflicting one.
pub fn try_lock(file: &File, kind: Lock) -> io::Result<bool> {
    let attempt = match kind {
        Lock::Shared => file.try_lock_shared(),
        Lock::Exclusive => file.try_lock(),
    };
    match attempt {
        Ok(()) => Ok(true),
        Err(std::fs::TryLockError::WouldBlock) => Ok(false),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_the_content_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["f"]);
    }

    #[test]
    fn a_failed_atomic_write_leaves_the_old_content() {
        let dir = tempfile::tempdir().unwrap();
        // The destination is a non-empty directory: the rename fails after the data was written.
        let p = dir.path().join("d");
        std::fs::create_dir(&p).unwrap();
        std::fs::write(p.join("old"), "old").unwrap();
        let err = write_atomic(&p, b"new").unwrap_err();
        assert!(err.to_string().contains(&*p.to_string_lossy()), "{err}");
        assert_eq!(std::fs::read(p.join("old")).unwrap(), b"old");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["d"], "the temporary file is removed");
        // A directory that does not exist: nothing is created.
        assert!(write_atomic(&dir.path().join("missing/f"), b"x").is_err());
    }

    #[test]
    fn atomic_write_sets_the_mode_and_writes_relative_paths() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("secret");
        write_atomic_mode(&p, b"k", 0o600).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        write_atomic_mode(&p, b"k", 0o644).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o644);
        write_atomic(&p, b"k").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"k");
        assert_eq!(parent_dir(Path::new("bare")), Path::new("."));
    }

    #[test]
    fn persist_file_moves_into_place() {
        let dir = tempfile::tempdir().unwrap();
        let (tmp, dest) = (dir.path().join("t"), dir.path().join("d"));
        std::fs::write(&tmp, "x").unwrap();
        persist_file(&tmp, &dest).unwrap();
        assert!(!tmp.exists());
        assert_eq!(std::fs::read(&dest).unwrap(), b"x");
        let err = persist_file(&tmp, &dest).unwrap_err();
        assert!(err.to_string().contains(&*tmp.to_string_lossy()), "fs-err names the path: {err}");
    }

    #[test]
    fn locks_conflict_by_kind() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lock");
        let a = open_lock_file(&p).unwrap();
        let b = open_lock_file(&p).unwrap();
        assert!(try_lock(&a, Lock::Shared).unwrap());
        assert!(try_lock(&b, Lock::Shared).unwrap(), "shared locks coexist");
        drop(b);
        let c = open_lock_file(&p).unwrap();
        assert!(!try_lock(&c, Lock::Exclusive).unwrap(), "an exclusive one waits for the shared");
        drop(a);
        assert!(try_lock(&c, Lock::Exclusive).unwrap());
        let d = open_lock_file(&p).unwrap();
        assert!(!try_lock(&d, Lock::Shared).unwrap());
    }
}
