//! Opening files beneath the served root without ever leaving it, the validators (ETag,
//! Last-Modified) taken from the opened descriptor, and zero-copy bodies with sendfile(2).
//!
//! Every response body is served from ONE descriptor, opened here for that request or kept by the
//! open-file cache (`super::cache`, revalidated per request against the path). The binhost writer
//! replaces `Packages`/`Packages.gz` by rename, so a descriptor keeps the old, complete file even
//! if a new index lands mid-download: a client can get an old index, never a torn one. The
//! validators come from `fstat`/`pread` of the same descriptor, so they always describe the bytes
//! that are sent.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};
#[cfg(test)]
use std::time::UNIX_EPOCH;

use tokio::io::Interest;
use tokio::net::TcpStream;

/// How [`open_beneath`] resolves paths: decided once, when the server starts ([`probe_openat2`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Beneath {
    /// Linux ≥ 5.6: `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`.
    Openat2,
    /// No usable openat2: ENOSYS (old kernel) or EPERM (a seccomp filter, as container runtimes
    /// and systemd's `SystemCallFilter=` install for syscalls they do not know).
    Canonicalize,
}

static BENEATH: std::sync::OnceLock<Beneath> = std::sync::OnceLock::new();

/// Tries openat2 once on the root itself and remembers the answer for the process: a filter
/// that refuses openat2 refuses it for every path, so probing per request would only turn every
/// genuine EPERM (a file without read permission) into a second, slower attempt.
pub fn probe_openat2(root: &OwnedFd) -> Beneath {
    *BENEATH.get_or_init(|| match openat2(root, ".") {
        Ok(_) => Beneath::Openat2,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS) | Some(libc::EPERM)) => {
            tracing::info!("openat2 is not available ({e}); resolving paths by canonicalize + O_NOFOLLOW");
            Beneath::Canonicalize
        }
        // Anything else (EACCES on the root, ...) says nothing about openat2 itself.
        Err(_) => Beneath::Openat2,
    })
}

fn openat2(root: &OwnedFd, rel: &str) -> io::Result<File> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    let fd = rustix::fs::openat2(
        root,
        rel,
        // NONBLOCK: opening a FIFO (or a device) planted in the tree must not block the async
        // worker; regular files ignore the flag, and `open_file` refuses everything else.
        OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
    )?;
    Ok(File::from(fd))
}

/// Opens `rel` (relative, already checked by `http::decode_target`) beneath `root`.
///
/// With openat2 the kernel refuses any resolution that leaves `root` — `..`, absolute symlinks,
/// symlinks pointing out — atomically, with no window between a check and the open. Without it
/// (see [`Beneath`]): canonicalize, check the prefix, then open the canonical path with
/// `O_NOFOLLOW` on the last component and compare the inode, which closes the swap-a-symlink-in
/// race for the last component.
pub fn open_beneath(root: &OwnedFd, root_path: &Path, rel: &str) -> io::Result<File> {
    if rel.as_bytes().contains(&0) {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    match probe_openat2(root) {
        Beneath::Openat2 => openat2(root, rel),
        Beneath::Canonicalize => open_canonical(root_path, rel),
    }
}

fn open_canonical(root_path: &Path, rel: &str) -> io::Result<File> {
    let canonical = root_path.join(rel).canonicalize()?;
    if !canonical.starts_with(root_path) {
        return Err(io::Error::from(io::ErrorKind::PermissionDenied));
    }
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(&canonical)?;
    let meta = file.metadata()?;
    let again = std::fs::symlink_metadata(&canonical)?;
    if meta.ino() != again.ino() || meta.dev() != again.dev() {
        return Err(io::Error::from(io::ErrorKind::PermissionDenied));
    }
    Ok(file)
}

/// [`open_beneath`] for a body to serve: only a regular file (checked with fstat on the opened
/// descriptor, so no swap after the check) is returned; FIFOs, sockets, device nodes and
/// directories are `NotFound`. The open itself never blocks (O_NONBLOCK).
pub fn open_file(root: &OwnedFd, root_path: &Path, rel: &str) -> io::Result<(File, std::fs::Metadata)> {
    let file = open_beneath(root, root_path, rel)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::from(io::ErrorKind::NotFound));
    }
    Ok((file, meta))
}

/// Opens a file outside the served root (the public key) with the same rules as [`open_file`].
pub fn open_path(path: &Path) -> io::Result<(File, std::fs::Metadata)> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::from(io::ErrorKind::NotFound));
    }
    Ok((file, meta))
}

/// Opens the served root as a directory descriptor for [`open_beneath`].
pub fn open_root(path: &Path) -> io::Result<OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(path)?;
    Ok(OwnedFd::from(f))
}

/// What a response says about a file, all taken from one open descriptor.
#[derive(Debug, Clone)]
pub struct FileInfo {
    pub size: u64,
    pub last_modified: SystemTime,
    /// Strong: device, inode, size and mtime in nanoseconds. A rename-replaced file always has a
    /// new inode, so a new index never shares an ETag with the old one.
    pub etag: String,
    pub is_file: bool,
}

pub fn file_info(file: &File, index_kind: Option<IndexKind>) -> io::Result<FileInfo> {
    let m = file.metadata()?;
    Ok(file_info_of(file, &m, index_kind))
}

/// [`file_info`] from metadata already taken from `file`.
pub fn file_info_of(file: &File, m: &std::fs::Metadata, index_kind: Option<IndexKind>) -> FileInfo {
    // Clamped: any mtime a file can carry (negative, far future) gives a valid HTTP date.
    let mtime = super::http::time_from_secs(m.mtime().max(0) as u64);
    let etag = format!("\"{:x}-{:x}-{:x}-{:x}.{:x}\"", m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec());
    let mut last_modified = mtime;
    if let Some(kind) = index_kind
        && m.is_file()
        && let Some(ts) = index_timestamp(file, kind, m)
    {
        last_modified = super::http::time_from_secs(ts);
    }
    FileInfo { size: m.size(), last_modified, etag, is_file: m.is_file() }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IndexKind {
    Plain,
    Gzip,
}

/// The `TIMESTAMP:` of an index, read from the header stanza of the open descriptor (through
/// gzip for `Packages.gz`). Cached per (device, inode, size, mtime): a new index is a new inode.
///
/// Last-Modified of both index files is this value: Portage sends it back as If-Modified-Since
/// (it keeps the TIMESTAMP of its cached copy), and the binhost writer gives `Packages` and
/// `Packages.gz` of one generation the same TIMESTAMP, so the two files validate alike whichever
/// of them a client fetched.
fn index_timestamp(file: &File, kind: IndexKind, m: &std::fs::Metadata) -> Option<u64> {
    type Key = (u64, u64, u64, i64, i64);
    static CACHE: Mutex<Option<HashMap<Key, Option<u64>>>> = Mutex::new(None);
    let key = (m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec());
    if let Some(hit) = CACHE.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get_or_insert_with(HashMap::new).get(&key) {
        return *hit;
    }
    let head = read_head(file, kind).ok()?;
    let ts = timestamp_in(&head);
    let mut cache = CACHE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let map = cache.get_or_insert_with(HashMap::new);
    if map.len() > 1024 {
        map.clear();
    }
    map.insert(key, ts);
    ts
}

/// The first few KiB of an index (decompressed), read with pread so the descriptor's offset —
/// which sendfile uses explicitly anyway — is left alone.
fn read_head(file: &File, kind: IndexKind) -> io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    struct At<'a>(&'a File, u64);
    impl Read for At<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.0.read_at(buf, self.1)?;
            self.1 += n as u64;
            Ok(n)
        }
    }
    let mut out = Vec::new();
    let limit = 16 * 1024;
    match kind {
        IndexKind::Plain => {
            At(file, 0).take(limit).read_to_end(&mut out)?;
        }
        IndexKind::Gzip => {
            // A truncated read is fine: we only need the header stanza.
            let _ = flate2::read::GzDecoder::new(At(file, 0)).take(limit).read_to_end(&mut out);
        }
    }
    Ok(out)
}

fn timestamp_in(head: &[u8]) -> Option<u64> {
    let text = String::from_utf8_lossy(head);
    for line in text.lines() {
        if line.is_empty() {
            break;
        }
        if let Some(v) = line.strip_prefix("TIMESTAMP:") {
            return v.trim().parse().ok();
        }
    }
    None
}

/// Writes `head` with MSG_MORE so the kernel merges it with the file data that follows.
pub async fn send_more(stream: &TcpStream, mut head: &[u8], stall: Duration) -> io::Result<()> {
    let fd = stream.as_raw_fd();
    while !head.is_empty() {
        let r = stream.try_io(Interest::WRITABLE, || {
            // SAFETY: valid fd and buffer.
            let n = unsafe { libc::send(fd, head.as_ptr().cast(), head.len(), libc::MSG_MORE | libc::MSG_NOSIGNAL) };
            if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
        });
        match r {
            Ok(n) => head = &head[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait_writable(stream, stall).await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Sends `len` bytes of `file` from `offset` straight from the page cache to the socket with
/// sendfile(2): no copy through user space. Gives up when the client has not taken a single byte
/// for `stall` (a reader that stopped reading must not pin a connection slot forever).
pub async fn send_file(stream: &TcpStream, file: &File, offset: u64, len: u64, stall: Duration) -> io::Result<u64> {
    let sock = stream.as_raw_fd();
    let src = file.as_raw_fd();
    let mut off = offset as libc::off_t;
    let end = offset + len;
    while (off as u64) < end {
        let want = ((end - off as u64) as usize).min(1 << 30);
        let r = stream.try_io(Interest::WRITABLE, || {
            // SAFETY: valid descriptors; `off` is updated by the kernel.
            let n = unsafe { libc::sendfile(sock, src, &mut off, want) };
            if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
        });
        match r {
            Ok(0) => {
                // The file shrank under us; the promised Content-Length cannot be met, so the
                // connection must be dropped rather than left to hang or desync.
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "file shrank while being sent"));
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait_writable(stream, stall).await?,
            Err(e) => return Err(e),
        }
    }
    Ok(len)
}

/// TCP_CORK on or off (best effort: a failure only costs segment sizes).
pub fn set_cork(stream: &TcpStream, on: bool) {
    let v: libc::c_int = on.into();
    // SAFETY: valid socket and option buffer.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CORK,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

async fn wait_writable(stream: &TcpStream, stall: Duration) -> io::Result<()> {
    match tokio::time::timeout(stall, stream.writable()).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "client stopped reading")),
    }
}

/// Writes an in-memory buffer with the same stall deadline as file bodies.
pub async fn send_all(stream: &TcpStream, mut buf: &[u8], stall: Duration) -> io::Result<()> {
    while !buf.is_empty() {
        match stream.try_write(buf) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait_writable(stream, stall).await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_beneath_refuses_escapes() {
        let base = tempfile::tempdir().unwrap();
        let root = base.path().join("root");
        std::fs::create_dir_all(root.join("t/cat")).unwrap();
        std::fs::write(base.path().join("secret"), "secret").unwrap();
        std::fs::write(root.join("t/cat/ok"), "ok").unwrap();
        std::os::unix::fs::symlink("../../secret", root.join("t/out-rel")).unwrap();
        std::os::unix::fs::symlink(base.path().join("secret"), root.join("t/out-abs")).unwrap();
        std::os::unix::fs::symlink("cat/ok", root.join("t/in")).unwrap();
        let fd = open_root(&root).unwrap();
        let mut s = String::new();
        open_beneath(&fd, &root, "t/cat/ok").unwrap().read_to_string(&mut s).unwrap();
        assert_eq!(s, "ok");
        assert!(open_beneath(&fd, &root, "t/in").is_ok());
        for bad in ["t/out-rel", "t/out-abs", "../secret", "/etc/passwd", "t/../../secret"] {
            assert!(open_beneath(&fd, &root, bad).is_err(), "{bad}");
            assert!(open_canonical(&root, bad).is_err(), "fallback: {bad}");
        }
        open_canonical(&root, "t/in").unwrap();
    }

    #[test]
    fn timestamp_from_plain_and_gzip() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let text = "ARCH: amd64\nTIMESTAMP: 1795533596\nVERSION: 0\n\nCPV: a/b-1\n";
        std::fs::write(dir.path().join("Packages"), text).unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(text.as_bytes()).unwrap();
        std::fs::write(dir.path().join("Packages.gz"), gz.finish().unwrap()).unwrap();
        for (name, kind) in [("Packages", IndexKind::Plain), ("Packages.gz", IndexKind::Gzip)] {
            let f = File::open(dir.path().join(name)).unwrap();
            let info = file_info(&f, Some(kind)).unwrap();
            assert_eq!(info.last_modified, UNIX_EPOCH + Duration::from_secs(1_795_533_596), "{name}");
        }
    }
}
