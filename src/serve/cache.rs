//! The open-file cache of `dbh serve` (what nginx calls `open_file_cache`): for recently served
//! paths beneath the root it keeps the open descriptor, its identity, the validators and the
//! pre-rendered part of the 200 response head, so a repeated request costs one `fstatat` instead
//! of `openat2` + `fstat` + `close` and no header formatting.
//!
//! Consistency rule (docs/binhost.md, "The open-file cache"): every hit is revalidated by a
//! `fstatat` of the path, compared with the cached descriptor by device, inode, size, mtime and
//! ctime (nanoseconds). Any difference — a rename-replaced index, a deleted file, a FIFO or a
//! directory in its place, an in-place write — drops the entry and the request goes the uncached
//! way (`fs::open_file`, with all its checks). So a request never sees an older file than the
//! path named when the request arrived: there is no validity window, unlike nginx's
//! `open_file_cache_valid`. The body and the head still come from the one descriptor whose
//! identity matched, so they always describe the same bytes.
//!
//! Safety: only descriptors opened by `fs::open_file` (beneath the root, regular file,
//! non-blocking open) are ever cached; the `fstatat` only decides whether that descriptor is still
//! what the path names, and a match means it is the very inode that was opened safely, so
//! whatever the path resolves through now cannot make us serve anything else.
//!
//! Bounds: at most `capacity` entries, so at most that many descriptors held by the cache;
//! least-recently-used entries are evicted. A response in flight holds its entry (`Arc`), so an
//! evicted or replaced descriptor is closed when the last response using it ends.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::fs::{self, FileInfo, IndexKind};

/// Entries (and descriptors) the server's cache holds at most.
pub const DEFAULT_CAPACITY: usize = 256;

/// Which version of a file a descriptor is: a rename, an in-place write, a chmod all change it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Identity {
    fn of(m: &std::fs::Metadata) -> Identity {
        Identity {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }

    fn of_stat(s: &rustix::fs::Stat) -> Identity {
        Identity {
            dev: s.st_dev,
            ino: s.st_ino,
            size: s.st_size as u64,
            mtime: (s.st_mtime, s.st_mtime_nsec as i64),
            ctime: (s.st_ctime, s.st_ctime_nsec as i64),
        }
    }
}

/// How the route serves a path: fixed per path, so it is part of the cached head.
#[derive(Debug, Clone, Copy)]
pub struct Describe {
    pub ctype: &'static str,
    pub kind: Option<IndexKind>,
    pub cache_control: &'static str,
}

/// One open file and everything its responses need.
#[derive(Debug)]
pub struct Entry {
    pub file: File,
    pub info: FileInfo,
    /// `Last-Modified` as an HTTP date.
    pub last_modified: String,
    pub describe: Describe,
    /// The 200 head's lines after `Date:` up to and including `Content-Length:` (each ending in
    /// CRLF); [`super::http::full_head`] adds the status line, Date and Connection.
    pub head_200: Vec<u8>,
    identity: Identity,
}

impl Entry {
    /// Builds an entry from a descriptor opened by `fs::open_file`.
    pub fn new(file: File, meta: &std::fs::Metadata, describe: Describe) -> Entry {
        let info = fs::file_info_of(&file, meta, describe.kind);
        let last_modified = super::http::http_date(info.last_modified);
        let head_200 = super::http::header_lines(
            &[
                ("Content-Type", describe.ctype),
                ("ETag", &info.etag),
                ("Last-Modified", &last_modified),
                ("Accept-Ranges", "bytes"),
                ("Cache-Control", describe.cache_control),
            ],
            Some(info.size),
        );
        Entry { file, info, last_modified, describe, head_200, identity: Identity::of(meta) }
    }
}

struct Slot {
    entry: Arc<Entry>,
    used: u64,
}

#[derive(Default)]
struct Inner {
    map: HashMap<Box<str>, Slot>,
    clock: u64,
}

/// The cache; shared by all connections.
pub struct FileCache {
    capacity: usize,
    inner: Mutex<Inner>,
}

impl FileCache {
    /// `capacity` 0 disables caching (every request opens its file).
    pub fn new(capacity: usize) -> FileCache {
        FileCache { capacity, inner: Mutex::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Entries held now.
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The file `rel` names beneath `root` now: the cached entry when the path still names its
    /// descriptor's inode unchanged, else a fresh `fs::open_file` (which is then cached).
    /// `describe` is asked only on a miss. Errors are those of `fs::open_file` (`NotFound` for
    /// anything but a regular file).
    pub fn open(&self, root: &OwnedFd, root_path: &Path, rel: &str, describe: impl FnOnce() -> Describe) -> io::Result<Arc<Entry>> {
        if self.capacity == 0 {
            let (file, meta) = fs::open_file(root, root_path, rel)?;
            return Ok(Arc::new(Entry::new(file, &meta, describe())));
        }
        let cached = {
            let mut inner = self.lock();
            inner.clock += 1;
            let now = inner.clock;
            inner.map.get_mut(rel).map(|slot| {
                slot.used = now;
                slot.entry.clone()
            })
        };
        if let Some(entry) = cached {
            // Follows symlinks: the answer is only compared with the safely opened inode.
            match rustix::fs::statat(root, rel, rustix::fs::AtFlags::empty()) {
                Ok(st) if Identity::of_stat(&st) == entry.identity => return Ok(entry),
                _ => self.forget(rel, &entry),
            }
        }
        let (file, meta) = fs::open_file(root, root_path, rel)?;
        let entry = Arc::new(Entry::new(file, &meta, describe()));
        self.insert(rel, entry.clone());
        Ok(entry)
    }

    /// Drops `rel` if it still holds `stale` (another request may have replaced it already).
    fn forget(&self, rel: &str, stale: &Arc<Entry>) {
        let mut inner = self.lock();
        if inner.map.get(rel).is_some_and(|s| Arc::ptr_eq(&s.entry, stale)) {
            inner.map.remove(rel);
        }
    }

    fn insert(&self, rel: &str, entry: Arc<Entry>) {
        let mut inner = self.lock();
        inner.clock += 1;
        let used = inner.clock;
        if !inner.map.contains_key(rel) && inner.map.len() >= self.capacity {
            // A linear scan: it runs only on a miss, which costs an openat2 anyway, and a few
            // hundred entries are scanned in about a microsecond.
            if let Some(oldest) = inner.map.iter().min_by_key(|(_, s)| s.used).map(|(k, _)| k.clone()) {
                inner.map.remove(&oldest);
            }
        }
        inner.map.insert(rel.into(), Slot { entry, used });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const PLAIN: Describe = Describe { ctype: "application/octet-stream", kind: None, cache_control: "max-age=3600" };

    fn open_fds() -> usize {
        std::fs::read_dir("/proc/self/fd").unwrap().count()
    }

    fn replace(path: &Path, data: &[u8]) {
        let tmp = path.with_extension("tmp-replace");
        let mut f = File::create(&tmp).unwrap();
        f.write_all(data).unwrap();
        drop(f);
        std::fs::rename(&tmp, path).unwrap();
    }

    fn body(e: &Entry) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let mut b = vec![0; e.info.size as usize];
        e.file.read_exact_at(&mut b, 0).unwrap();
        b
    }

    #[test]
    fn hits_are_revalidated_against_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let root = fs::open_root(dir.path()).unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"one").unwrap();
        let cache = FileCache::new(8);
        let a = cache.open(&root, dir.path(), "f", || PLAIN).unwrap();
        let b = cache.open(&root, dir.path(), "f", || unreachable!("a hit needs no description")).unwrap();
        assert!(Arc::ptr_eq(&a, &b), "second open is a hit");
        // Replaced by rename: the new file at once, with a head describing it.
        replace(&p, b"second");
        let c = cache.open(&root, dir.path(), "f", || PLAIN).unwrap();
        assert_eq!(body(&c), b"second");
        assert_eq!(c.info.size, 6);
        assert_ne!(c.info.etag, a.info.etag);
        assert!(String::from_utf8_lossy(&c.head_200).contains("Content-Length: 6\r\n"));
        // The old descriptor still serves the old bytes to a response already holding it.
        assert_eq!(body(&a), b"one");
        // Deleted: not found, and forgotten.
        std::fs::remove_file(&p).unwrap();
        assert_eq!(cache.open(&root, dir.path(), "f", || PLAIN).unwrap_err().kind(), io::ErrorKind::NotFound);
        assert!(cache.is_empty());
        // A FIFO or a directory in its place is refused as by fs::open_file.
        std::fs::write(&p, b"x").unwrap();
        cache.open(&root, dir.path(), "f", || PLAIN).unwrap();
        std::fs::remove_file(&p).unwrap();
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        assert!(cache.open(&root, dir.path(), "f", || PLAIN).is_err(), "FIFO");
        std::fs::remove_file(&p).unwrap();
        std::fs::create_dir(&p).unwrap();
        assert!(cache.open(&root, dir.path(), "f", || PLAIN).is_err(), "directory");
        assert!(cache.is_empty());
    }

    #[test]
    fn in_place_writes_are_seen() {
        let dir = tempfile::tempdir().unwrap();
        let root = fs::open_root(dir.path()).unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"aaaa").unwrap();
        let cache = FileCache::new(8);
        let a = cache.open(&root, dir.path(), "f", || PLAIN).unwrap();
        // Same size, same inode: ctime/mtime tell.
        std::thread::sleep(std::time::Duration::from_millis(10));
        std::fs::OpenOptions::new().write(true).open(&p).unwrap().write_all(b"bbbb").unwrap();
        let b = cache.open(&root, dir.path(), "f", || PLAIN).unwrap();
        assert!(!Arc::ptr_eq(&a, &b));
        assert_eq!(body(&b), b"bbbb");
    }

    #[test]
    fn size_and_descriptors_stay_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let root = fs::open_root(dir.path()).unwrap();
        for i in 0..100 {
            std::fs::write(dir.path().join(format!("f{i}")), format!("{i}")).unwrap();
        }
        let cache = FileCache::new(16);
        let before = open_fds();
        for round in 0..3 {
            for i in 0..100 {
                let e = cache.open(&root, dir.path(), &format!("f{i}"), || PLAIN).unwrap();
                assert_eq!(body(&e), format!("{i}").as_bytes(), "round {round}");
            }
            assert!(cache.len() <= 16);
        }
        // Other tests run in parallel threads of this process and open files too: allow slack,
        // but 100 files must not mean 100 descriptors.
        assert!(open_fds() <= before + 16 + 20, "{} descriptors open, {before} before", open_fds());
        // The most recently used stay: a hit for the last one.
        let last = cache.open(&root, dir.path(), "f99", || PLAIN).unwrap();
        let again = cache.open(&root, dir.path(), "f99", || unreachable!()).unwrap();
        assert!(Arc::ptr_eq(&last, &again));
        drop((last, again));
        drop(cache);
        assert!(open_fds() <= before + 20);
    }

    #[test]
    fn escapes_are_refused_and_never_cached() {
        let base = tempfile::tempdir().unwrap();
        let rootp = base.path().join("root");
        std::fs::create_dir(&rootp).unwrap();
        std::fs::write(base.path().join("secret"), "s").unwrap();
        std::os::unix::fs::symlink("../secret", rootp.join("leak")).unwrap();
        let root = fs::open_root(&rootp).unwrap();
        let cache = FileCache::new(8);
        for _ in 0..2 {
            assert!(cache.open(&root, &rootp, "leak", || PLAIN).is_err());
            assert!(cache.open(&root, &rootp, "../secret", || PLAIN).is_err());
        }
        assert!(cache.is_empty());
    }
}
