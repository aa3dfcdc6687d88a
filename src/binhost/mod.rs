//! The binhost: a Portage PKGDIR with its `Packages` index (docs/binhost.md).
//!
//! Owns the index format ([`index`]), (re)indexing a directory ([`scan`]), the consistency check
//! ([`check`]), publishing new binary packages under a lock ([`add`]) and the client configuration
//! stanza ([`conf`]). This module holds what they share: the error type, the directory lock and the
//! crash-safe way every file gets into the binhost (dot-temp file, fsync, rename, fsync dir).

pub mod add;
pub mod check;
pub mod clientconf;
pub mod conf;
pub mod deps;
pub mod generations;
pub mod index;
pub mod lifecycle;
pub mod scan;
pub mod sorted;
pub mod trust;

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::hint::Hint;
use crate::events::{Event, Reporter};

pub use index::{Entry, Index};

/// A binhost's `Packages` text, mapped read-only rather than read into memory: `add` and `rm`
/// bisect it and copy its kept ranges in the kernel, so only the pages they look at are ever
/// touched by dbh itself.
pub struct IndexText {
    // `None` for an empty file (an empty mapping is an error on Linux).
    map: Option<memmap2::Mmap>,
}

impl IndexText {
    /// Maps `path`. Errors as `fs::read_to_string` would: `NotFound`, or `InvalidData` when
    /// the text is not UTF-8.
    pub fn open(path: &Path) -> std::io::Result<IndexText> {
        let file = fs_err::File::open(path)?;
        if file.metadata()?.len() == 0 {
            return Ok(IndexText { map: None });
        }
        // SAFETY: the mapping is only sound while nobody writes the file in place. Every dbh
        // writer replaces Packages by rename (a new inode; see `TempFile::persist`) under the
        // binhost lock, which our callers hold, and so does Portage (`atomic_ofstream`); a
        // mapped inode therefore never changes while we read it.
        // The whole file is read soon after (validation, search): populate it in one go.
        let map = unsafe { memmap2::MmapOptions::new().populate().map(file.file()) }
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot map {}: {e}", path.display())))?;
        if simdutf8::basic::from_utf8(&map).is_err() {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{} is not valid UTF-8", path.display())));
        }
        Ok(IndexText { map: Some(map) })
    }
}

impl std::ops::Deref for IndexText {
    type Target = str;
    fn deref(&self) -> &str {
        match &self.map {
            // SAFETY: validated as UTF-8 in `open`, and the mapping is read-only and not
            // written by anyone while mapped (see there).
            Some(m) => unsafe { std::str::from_utf8_unchecked(m) },
            None => "",
        }
    }
}

/// The lock every writer of a binhost holds (`std::fs::File::lock`, an flock).
pub const LOCK_FILE: &str = ".dbh.lock";
/// Prefix of every temporary file dbh creates inside a binhost. Names never end in a package
/// suffix, so neither Portage nor our scanner ever mistakes one for a package.
pub const TMP_PREFIX: &str = ".dbh-tmp";
/// Paths (relative to the binhost root) of packages an `add` is placing; see [`add`].
pub const JOURNAL: &str = ".dbh-pending";
/// How long a writer waits for another one to finish.
pub const LOCK_DEADLINE: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum BinhostError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("cannot read index {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: index::ParseError,
    },
    #[error("{path} is not a directory")]
    NotADir { path: PathBuf },
    #[error("timed out after {}s waiting for the lock {path} (another dbh is writing this binhost)", .waited.as_secs())]
    LockTimeout { path: PathBuf, waited: Duration },
    #[error("cannot read binary package {path}")]
    Package {
        path: PathBuf,
        #[source]
        source: Box<crate::binpkg::BinpkgError>,
    },
    #[error("cannot read binary package {path}: {reason}")]
    Unreadable { path: PathBuf, reason: String },
    #[error("binary package {path} is not valid: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("binary package {path} is built for CHOST {found}, but target `{target}` has CHOST {expected}")]
    WrongChost { path: PathBuf, found: String, target: String, expected: String },
    #[error("there is no signing key in {path}")]
    NoKey { path: PathBuf },
    #[error("{0}")]
    Sign(#[from] crate::sign::SignError),
    #[error("binhost URL {url:?} is not an http(s) URL")]
    BadUrl { url: String },
    #[error("{0}")]
    Trust(#[from] trust::TrustError),
    #[error("generation record {path} {reason}")]
    Generation { path: PathBuf, reason: String },
    #[error("{dir} has no generation {generation}{}", if .known.is_empty() { String::new() } else { format!(" (it has {})", .known) })]
    NoGeneration { dir: PathBuf, generation: u64, known: String },
    #[error("generation {generation} of {dir} lists {path}, which is no longer on disk")]
    GenerationIncomplete { dir: PathBuf, generation: u64, path: String },
    #[error("nothing in the index of {dir} matches `{pattern}`")]
    NoMatch { dir: PathBuf, pattern: String },
    #[error("cannot number a new build of {cpv}: {path} already has BUILD_ID {id}, the largest there is ({max})")]
    BuildIdExhausted { cpv: String, path: PathBuf, id: u64, max: u64 },
}

impl Hint for BinhostError {
    fn hint(&self) -> Option<String> {
        match self {
            BinhostError::Parse { .. } => Some(
                "move the broken index away and run `dbh binhost index --full DIR` to rebuild it from the packages"
                    .into(),
            ),
            BinhostError::NoKey { .. } => Some(
                "create one with `dbh key generate`, or publish unsigned with --unsigned (clients then need verify-signature = false)"
                    .into(),
            ),
            BinhostError::WrongChost { .. } => Some("pass the --target the package was built for".into()),
            BinhostError::Trust(e) => e.hint(),
            BinhostError::LockTimeout { path, .. } => {
                Some(format!("if no dbh is running, something else holds {}", path.display()))
            }
            BinhostError::BadUrl { .. } => Some("pass e.g. --url http://binhost.example.org:8080".into()),
            BinhostError::NoGeneration { .. } => {
                Some("`dbh binhost generations --target T` lists the generations that are kept".into())
            }
            BinhostError::NoMatch { .. } => Some(
                "give a CATEGORY/PN, a CPV or CPV-BUILD_ID as the index lists it (see the target's page or Packages)".into(),
            ),
            BinhostError::BuildIdExhausted { path, .. } => Some(format!(
                "{} is not a build dbh numbered: remove it (and run `dbh binhost index` if it is indexed), then add again",
                path.display()
            )),
            _ => None,
        }
    }
}

/// An exclusive lock on a binhost directory, released on drop.
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// Takes `DIR/.dbh.lock` exclusively, waiting up to [`LOCK_DEADLINE`] for another writer.
    pub fn exclusive(dir: &Path, reporter: &dyn Reporter) -> Result<DirLock, BinhostError> {
        let path = dir.join(LOCK_FILE);
        let file = fs_err::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?
            .into_parts()
            .0;
        Self::wait(file, &path, dir, reporter, false)
    }

    /// Takes `DIR/.dbh.lock` shared (readers), if it exists and can be opened; `None` otherwise
    /// (a binhost no dbh ever wrote, or one we may only read).
    pub fn shared(dir: &Path, reporter: &dyn Reporter) -> Result<Option<DirLock>, BinhostError> {
        let path = dir.join(LOCK_FILE);
        match File::open(&path) {
            Ok(file) => Self::wait(file, &path, dir, reporter, true).map(Some),
            Err(_) => Ok(None),
        }
    }

    fn wait(file: File, path: &Path, dir: &Path, reporter: &dyn Reporter, shared: bool) -> Result<DirLock, BinhostError> {
        let start = Instant::now();
        let mut told = false;
        loop {
            let attempt = if shared { file.try_lock_shared() } else { file.try_lock() };
            match attempt {
                Ok(()) => return Ok(DirLock { _file: file }),
                Err(std::fs::TryLockError::WouldBlock) => {}
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(io_at(path, "cannot lock", e));
                }
            }
            if start.elapsed() >= LOCK_DEADLINE {
                return Err(BinhostError::LockTimeout { path: path.to_owned(), waited: LOCK_DEADLINE });
            }
            if !told {
                reporter.event(Event::Note {
                    message: format!("waiting for another dbh to finish writing {}", dir.display()),
                });
                told = true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Removes temporary files a killed run left in the binhost root. Only call with the lock held:
/// then no live writer owns any of them.
pub fn clean_stale_temps(dir: &Path) -> Result<usize, BinhostError> {
    let mut removed = 0;
    for entry in fs_err::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
            if entry.file_type()?.is_dir() {
                fs_err::remove_dir_all(entry.path())?;
            } else {
                fs_err::remove_file(entry.path())?;
            }
            removed += 1;
        }
    }
    Ok(removed)
}

/// A temporary file in `dir` that is removed on drop unless it was renamed into place.
pub struct TempFile {
    path: PathBuf,
    file: Option<File>,
}

/// A unique `.dbh-tmp-…` name in `dir`.
fn temp_name(dir: &Path, what: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    dir.join(format!("{TMP_PREFIX}-{}-{}-{nanos:x}.{what}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed)))
}

impl TempFile {
    pub fn new(dir: &Path, what: &str) -> Result<TempFile, BinhostError> {
        TempFile::at(temp_name(dir, what))
    }

    /// A temp file at exactly `path` (inside a [`TempDir`], when the name itself matters).
    pub fn at(path: PathBuf) -> Result<TempFile, BinhostError> {
        let file = fs_err::OpenOptions::new().write(true).create_new(true).open(&path)?.into_parts().0;
        Ok(TempFile { path, file: Some(file) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&mut self) -> &mut File {
        self.file.as_mut().expect("temp file is open until persisted")
    }

    /// Sets the mtime (when given) and fsyncs the content.
    pub fn sync(&mut self, mtime: Option<u64>) -> Result<(), BinhostError> {
        let path = self.path.clone();
        let file = self.file();
        file.flush().map_err(|e| io_at(&path, "cannot write", e))?;
        if let Some(t) = mtime {
            let t = std::time::UNIX_EPOCH
                .checked_add(Duration::from_secs(t))
                .filter(|_| t <= crate::binpkg::MAX_TIME)
                .ok_or_else(|| io_at(&path, &format!("mtime {t} is out of range for"), std::io::Error::from(std::io::ErrorKind::InvalidInput)))?;
            file.set_times(std::fs::FileTimes::new().set_modified(t).set_accessed(t))
                .map_err(|e| io_at(&path, "cannot set the mtime of", e))?;
        }
        file.sync_all().map_err(|e| io_at(&path, "cannot fsync", e))
    }

    /// Renames the (synced) file over `dest`. The caller fsyncs `dest`'s directory.
    pub fn rename(mut self, dest: &Path) -> Result<(), BinhostError> {
        drop(self.file.take());
        fs_err::rename(&self.path, dest)?;
        self.path = PathBuf::new();
        Ok(())
    }

    /// [`TempFile::sync`] then [`TempFile::rename`].
    pub fn persist(mut self, dest: &Path, mtime: Option<u64>) -> Result<(), BinhostError> {
        self.sync(mtime)?;
        self.rename(dest)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A `.dbh-tmp-….d` directory in the binhost root, removed with its content on drop. Files that
/// must carry their final name while being written (a GPKG's top directory is named after its
/// file) are made here: the directory's dot name keeps Portage and our scanner away from them.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(dir: &Path) -> Result<TempDir, BinhostError> {
        let path = temp_name(dir, "d");
        fs_err::create_dir(&path)?;
        Ok(TempDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

pub(crate) fn io_at(path: &Path, what: &str, e: std::io::Error) -> BinhostError {
    BinhostError::Io(std::io::Error::new(e.kind(), format!("{what} {}: {e}", path.display())))
}

/// fsyncs a directory so that renames into it survive a crash.
pub fn sync_dir(dir: &Path) -> Result<(), BinhostError> {
    Ok(crate::util::fs::sync_dir(dir)?)
}

/// Reads `DIR/Packages`; `None` when there is none.
pub fn read_index(dir: &Path) -> Result<Option<Index>, BinhostError> {
    let path = dir.join("Packages");
    let bytes = match fs_err::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    Index::parse(&bytes).map(Some).map_err(|source| BinhostError::Parse { path, source })
}

/// How far a new index's TIMESTAMP is ahead of the one before, at least: Portage's
/// `TIMESTAMP_TOLERANCE` (5 s, portage/util/_urlopen.py) + 1. A client sends its cached copy's
/// TIMESTAMP *plus five seconds* as If-Modified-Since, and `dbh serve` gives an index's TIMESTAMP
/// as Last-Modified with the plain HTTP rule (304 when Last-Modified ≤ If-Modified-Since); a
/// generation published less than six seconds after the client's copy — a rollback right after a
/// bad publish — would be answered 304 and the client would keep the old generation.
pub const TIMESTAMP_STEP: u64 = 6;

/// The TIMESTAMP of a new index: now, but at least the old one + [`TIMESTAMP_STEP`] (clients
/// compare them, see there), and never past [`crate::binpkg::MAX_TIME`] whatever the old index
/// said. Checked arithmetic: the old value comes from disk.
pub fn next_timestamp(old: Option<u64>) -> u64 {
    let floor = old.map_or(0, |t| t.saturating_add(TIMESTAMP_STEP));
    now().max(floor).min(crate::binpkg::MAX_TIME)
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    crate::util::time::now_secs()
}

/// Writes `Packages` and `Packages.gz` for `index`, both with mtime = TIMESTAMP, crash-safely.
///
/// Order matters: callers rename every new package file into place (and fsync its directory)
/// *before* calling this, so an index that mentions a file is never visible before the file is.
/// Here both temp files are complete and fsynced before either rename; `Packages.gz` (what clients
/// fetch first) and `Packages` are renamed back to back and the directory is fsynced last, so a
/// crash leaves either the old or the new version of each file, never a torn one.
pub fn write_index(dir: &Path, index: &Index) -> Result<(), BinhostError> {
    write_index_text(dir, &index.render(), index.timestamp())
}

/// [`write_index`] for an already rendered index whose header says TIMESTAMP `timestamp`.
pub fn write_index_text(dir: &Path, text: &str, timestamp: Option<u64>) -> Result<(), BinhostError> {
    write_index_as(dir, text, timestamp, "index").map(|_| ())
}

/// [`write_index_text`], recording the new generation as made by `op` (see [`generations`]:
/// `Packages.gz` is written as gzip members per block of stanzas, only changed blocks are
/// compressed again).
pub fn write_index_as(
    dir: &Path,
    text: &str,
    timestamp: Option<u64>,
    op: &str,
) -> Result<generations::Generation, BinhostError> {
    generations::publish(dir, text, timestamp.unwrap_or(0), op)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every new TIMESTAMP is past the old one by more than Portage's If-Modified-Since
    /// tolerance, and bounded whatever the disk said.
    #[test]
    fn timestamps_step_past_portages_tolerance() {
        let t = now();
        assert!(next_timestamp(None) >= t);
        assert!(next_timestamp(Some(t)) >= t + TIMESTAMP_STEP);
        assert_eq!(next_timestamp(Some(t + 100)), t + 100 + TIMESTAMP_STEP);
        assert_eq!(next_timestamp(Some(u64::MAX)), crate::binpkg::MAX_TIME);
        // A client holding the previous index sends its TIMESTAMP + 5 as If-Modified-Since: that
        // is before the new index's Last-Modified, so it gets the new one.
        let old = t + 100;
        assert!(old + 5 < next_timestamp(Some(old)));
    }
}
