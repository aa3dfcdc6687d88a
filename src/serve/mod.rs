//! The HTTP server for `$DBH_HOME/binhost/<target>/` (`dbh serve`): owns the wire protocol, path
//! safety, validators, zero-copy bodies, the generated pages and `binrepos.conf`, connection
//! limits and graceful shutdown.
//!
//! A small HTTP/1.1 server on tokio rather than hyper: hyper owns the socket and can only copy
//! bodies through user space, while a binhost is mostly large static files that sendfile(2) moves
//! from the page cache to the socket without a copy (see `bench/serve`). The protocol subset is
//! small — GET/HEAD, no request bodies, no chunked encoding — and lives in [`http`].
//!
//! Routes, per target directory `<DIR>/<target>/`:
//! - `/` and `/<target>/`: HTML overview pages ([`pages`]);
//! - `/<target>/Packages`, `/<target>/Packages.gz`: Last-Modified = the index TIMESTAMP;
//! - `/<target>/<PATH>`: the binpkgs; `Range`, `If-Range`, `If-Modified-Since`, `If-None-Match`;
//! - `/<target>/binrepos.conf` (generated) and `/<target>/key.asc` (`<DBH_HOME>/keys/public.asc`);
//! - `/<target>/trust.sh`: the client's trust script for that key ([`crate::binhost::trust`]);
//! - `/<target>/portage/` and `/<target>/portage/<file>`: the build configuration
//!   ([`crate::binhost::clientconf`]).
//!
//! Consistency: every body is served from one descriptor — opened for that request, or held by
//! the open-file cache ([`cache`]) after a `fstatat` of the path found it still names that very
//! file — and validators come from that descriptor ([`fs`]). The binhost writer replaces `Packages` and `Packages.gz` by
//! rename, each written complete before its rename. So the server guarantees that every response
//! is one complete generation of the file it names, with an ETag and Last-Modified describing
//! exactly those bytes. It does not (cannot, over separate requests) promise that a `Packages`
//! and a `Packages.gz` fetched in two requests are the same generation; Portage fetches only one
//! of them (`Packages.gz`, falling back to `Packages` on 404), and both files of a generation
//! carry the same TIMESTAMP, so If-Modified-Since behaves the same whichever one a client holds.

pub mod cache;
pub mod fs;
pub mod http;
pub mod pages;

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};

use crate::hint::Hint;
use http::{ByteRange, HeadError, Method, PathError, Ranges, Request};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot serve directory {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("`{addr}` is not a listen address (expected HOST:PORT, IPv6 as [::1]:8080)")]
    Address { addr: String },
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("no listen address is configured")]
    NoListen,
    #[error("cannot start the server's runtime")]
    Runtime(#[source] io::Error),
    #[error("cannot install the SIGINT/SIGTERM handlers")]
    Signals(#[source] io::Error),
}

impl Hint for ServeError {
    fn hint(&self) -> Option<String> {
        match self {
            ServeError::Dir { .. } => Some(
                "create it, pass --dir DIR, or publish packages with `dbh binhost add --target T FILE…`".into(),
            ),
            ServeError::Bind { source, .. } if source.kind() == io::ErrorKind::AddrInUse => {
                Some("another program listens there: pick another port with --listen".into())
            }
            ServeError::Bind { source, .. } if source.kind() == io::ErrorKind::PermissionDenied => {
                Some("ports below 1024 need root or CAP_NET_BIND_SERVICE; use e.g. --listen 127.0.0.1:8080".into())
            }
            ServeError::NoListen => Some("pass --listen ADDR or set serve.listen".into()),
            _ => None,
        }
    }
}

/// Protection against slow or abusive clients.
#[derive(Debug, Clone)]
pub struct Limits {
    /// A request head must arrive completely within this time (also the keep-alive idle time).
    pub header_timeout: Duration,
    /// Largest request head accepted (431 beyond).
    pub max_head: usize,
    /// Connections served at once; further ones wait in the kernel's listen backlog.
    pub max_connections: usize,
    /// Connections one client address may hold at once; more are answered 503 and closed, so
    /// one client cannot take the slots everyone shares.
    pub max_per_ip: usize,
    /// When more than 3/4 of `max_connections` are in use, connections idle between requests
    /// are closed after this long instead of `header_timeout` (idle slots go first).
    pub busy_idle: Duration,
    /// A client that takes no byte of a response for this long is dropped.
    pub send_stall: Duration,
    /// On SIGINT/SIGTERM, in-flight responses get this long to finish.
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            header_timeout: Duration::from_secs(10),
            max_head: 16 * 1024,
            max_connections: 4096,
            max_per_ip: 1024,
            busy_idle: Duration::from_secs(1),
            send_stall: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// What to serve and where.
#[derive(Debug, Clone)]
pub struct Config {
    /// The directory holding one binhost per target.
    pub dir: PathBuf,
    /// Listen addresses as given (`127.0.0.1:8080`, `[::1]:8080`, `localhost:8080`).
    pub listen: Vec<String>,
    /// Base URL written into binrepos.conf and the pages (`serve.public_url`); else derived from
    /// the first listen address. Never the request's Host header: a shared cache in front would
    /// hand one client's Host to everyone.
    pub public_url: Option<String>,
    /// `priority` of the generated binrepos.conf.
    pub priority: i64,
    /// The armored public key served as `/<target>/key.asc`.
    pub key_file: PathBuf,
    /// `$DBH_HOME/targets`: each target's build configuration for `/<target>/portage/`.
    pub target_config: Option<PathBuf>,
    /// A distfiles directory served as `/distfiles/<name>`, the layout of a Gentoo mirror (a
    /// build's guest has it first in GENTOO_MIRRORS); `dbh serve` itself serves none.
    pub distfiles: Option<PathBuf>,
    pub limits: Limits,
}

struct Shared {
    root: OwnedFd,
    root_path: PathBuf,
    public_url: String,
    priority: i64,
    key_file: PathBuf,
    target_config: Option<PathBuf>,
    /// The known targets (CHOST and keyword for `/<target>/portage/`), loaded once at bind.
    targets: Option<crate::target::Targets>,
    distfiles: Option<PathBuf>,
    limits: Limits,
    /// Parsed indexes for the pages, keyed by target and the index file's identity.
    summaries: Mutex<HashMap<String, (FileKey, Arc<pages::IndexSummary>)>>,
    fingerprint: Mutex<Option<(FileKey, Option<String>)>>,
    /// Open connections per client address (for `max_per_ip`).
    per_ip: Mutex<HashMap<std::net::IpAddr, usize>>,
    /// Connections open now, and a signal to idle ones when slots run low.
    open: std::sync::atomic::AtomicUsize,
    pressure: tokio::sync::Notify,
    /// Where access lines also go, one per request (`dbh vm build` keeps one per build).
    access_log: Mutex<Option<File>>,
    /// Open descriptors and rendered heads of recently served files beneath the root.
    files: cache::FileCache,
}

/// Identifies one version of a file: device, inode, mtime seconds and nanoseconds.
type FileKey = (u64, u64, i64, i64);

/// A bound server; [`Server::run`] serves until the shutdown future completes.
pub struct Server {
    listeners: Vec<TcpListener>,
    shared: Arc<Shared>,
}

impl Server {
    /// Opens the directory and binds every listen address (all before serving anything, so a
    /// typo in the second address does not leave a half-started server).
    pub async fn bind(config: Config) -> Result<Server, ServeError> {
        let root_path = config
            .dir
            .canonicalize()
            .map_err(|source| ServeError::Dir { path: config.dir.clone(), source })?;
        let root = fs::open_root(&root_path).map_err(|source| ServeError::Dir { path: config.dir.clone(), source })?;
        fs::probe_openat2(&root);
        raise_fd_limit();
        if config.listen.is_empty() {
            return Err(ServeError::NoListen);
        }
        let mut listeners = Vec::new();
        for spec in &config.listen {
            let addrs: Vec<SocketAddr> = match spec.parse::<SocketAddr>() {
                Ok(a) => vec![a],
                Err(_) => spec
                    .to_socket_addrs()
                    .map_err(|_| ServeError::Address { addr: spec.clone() })?
                    .collect(),
            };
            if addrs.is_empty() {
                return Err(ServeError::Address { addr: spec.clone() });
            }
            for addr in addrs {
                listeners.push(listen(addr).map_err(|source| ServeError::Bind { addr, source })?);
            }
        }
        let public_url = config
            .public_url
            .map(|u| u.trim_end_matches('/').to_string())
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| default_public_url(listeners.first().and_then(|l| l.local_addr().ok())));
        Ok(Server {
            listeners,
            shared: Arc::new(Shared {
                root,
                root_path,
                public_url,
                priority: config.priority,
                key_file: config.key_file,
                target_config: config.target_config,
                targets: crate::target::Targets::load().ok(),
                distfiles: config.distfiles,
                limits: config.limits,
                summaries: Mutex::default(),
                fingerprint: Mutex::default(),
                per_ip: Mutex::default(),
                open: std::sync::atomic::AtomicUsize::new(0),
                pressure: tokio::sync::Notify::new(),
                access_log: Mutex::default(),
                files: cache::FileCache::new(cache::DEFAULT_CAPACITY),
            }),
        })
    }

    /// The addresses actually bound (port 0 resolved).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().filter_map(|l| l.local_addr().ok()).collect()
    }

    pub fn root(&self) -> &Path {
        &self.shared.root_path
    }

    /// Also writes every request's access line (`PEER METHOD TARGET STATUS BYTES`) to `file`:
    /// a build keeps what its guest fetched beside its emerge.log.
    pub fn log_access_to(&self, file: File) {
        *self.shared.access_log.lock().unwrap_or_else(|e| e.into_inner()) = Some(file);
    }

    /// Serves until `shutdown` completes, then stops accepting, lets in-flight responses finish
    /// within `shutdown_grace`, and returns.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> Result<(), ServeError> {
        let (stop_tx, stop_rx) = watch::channel(false);
        // Every connection holds a clone; when all are gone, recv() returns None.
        let (alive_tx, mut alive_rx) = mpsc::channel::<()>(1);
        let permits = Arc::new(Semaphore::new(self.shared.limits.max_connections));
        let mut accept_tasks = Vec::new();
        for listener in self.listeners {
            let shared = self.shared.clone();
            let mut stop = stop_rx.clone();
            let alive = alive_tx.clone();
            let permits = permits.clone();
            accept_tasks.push(tokio::spawn(async move {
                loop {
                    let permit = tokio::select! {
                        p = permits.clone().acquire_owned() => p.expect("semaphore never closed"),
                        _ = stop.changed() => return,
                    };
                    let accepted = tokio::select! {
                        a = listener.accept() => a,
                        _ = stop.changed() => return,
                    };
                    match accepted {
                        Ok((stream, peer)) => {
                            let Some(slot) = Slot::take(&shared, peer) else {
                                // Over the per-address cap: a short 503 off the accept loop.
                                let shared = shared.clone();
                                tokio::spawn(async move {
                                    let o = simple(&stream, 503, false, "too many connections from your address\n", &shared.limits).await;
                                    log_access(peer, "-", "-", &o, Instant::now());
                                    drop(permit);
                                });
                                continue;
                            };
                            let shared = shared.clone();
                            let stop = stop.clone();
                            let alive = alive.clone();
                            tokio::spawn(async move {
                                use futures_util::FutureExt as _;
                                // A bug in one connection must not end the server: the panic hook
                                // has reported it; log it here, drop that connection, go on.
                                let run = std::panic::AssertUnwindSafe(connection(stream, peer, &shared, stop));
                                if let Err(panic) = run.catch_unwind().await {
                                    let what = panic
                                        .downcast_ref::<&str>()
                                        .map(|s| s.to_string())
                                        .or_else(|| panic.downcast_ref::<String>().cloned())
                                        .unwrap_or_default();
                                    tracing::error!("connection from {peer} panicked and was closed: {what}");
                                }
                                drop(slot);
                                drop(permit);
                                drop(alive);
                            });
                        }
                        Err(e) => {
                            // EMFILE and friends: back off instead of spinning.
                            tracing::warn!("accept failed: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            }));
        }
        shutdown.await;
        tracing::info!("shutting down: no new connections, finishing in-flight requests");
        let _ = stop_tx.send(true);
        for t in accept_tasks {
            let _ = t.await;
        }
        drop(alive_tx);
        let grace = self.shared.limits.shutdown_grace;
        if tokio::time::timeout(grace, alive_rx.recv()).await.is_err() {
            tracing::warn!("shutdown deadline of {grace:?} for in-flight requests passed; dropping the rest");
        }
        Ok(())
    }
}

/// One connection's claim on the per-address and the global counts, released on drop (also
/// when the connection's task unwinds).
struct Slot {
    shared: Arc<Shared>,
    ip: std::net::IpAddr,
}

impl Slot {
    fn take(shared: &Arc<Shared>, peer: SocketAddr) -> Option<Slot> {
        use std::sync::atomic::Ordering;
        let ip = peer.ip();
        {
            let mut map = shared.per_ip.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let n = map.entry(ip).or_insert(0);
            if *n >= shared.limits.max_per_ip {
                return None;
            }
            *n += 1;
        }
        shared.open.fetch_add(1, Ordering::Relaxed);
        if busy(shared) {
            // Slots run low: wake every connection idling between requests, which then leaves.
            shared.pressure.notify_waiters();
        }
        Some(Slot { shared: shared.clone(), ip })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering;
        self.shared.open.fetch_sub(1, Ordering::Relaxed);
        let mut map = self.shared.per_ip.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// More than 3/4 of the connection slots are taken.
fn busy(shared: &Shared) -> bool {
    shared.open.load(std::sync::atomic::Ordering::Relaxed) * 4 > shared.limits.max_connections * 3
}

/// The base URL when `serve.public_url` is not set: the first listen address, with the host's
/// name for a wildcard address (`0.0.0.0`, `[::]`), which no client can connect to.
fn default_public_url(addr: Option<SocketAddr>) -> String {
    let Some(addr) = addr else { return "http://localhost".into() };
    if addr.ip().is_unspecified() {
        let host = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .filter(|h| http::valid_host(h) && !h.contains(':'))
            .unwrap_or_else(|| "localhost".into());
        return format!("http://{host}:{}", addr.port());
    }
    format!("http://{addr}")
}

/// Resolves on SIGINT or SIGTERM.
pub fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>, ServeError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt()).map_err(ServeError::Signals)?;
    let mut term = signal(SignalKind::terminate()).map_err(ServeError::Signals)?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}

fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv6() { TcpSocket::new_v6()? } else { TcpSocket::new_v4()? };
    socket.set_reuseaddr(true)?;
    if addr.is_ipv6() {
        // So that `0.0.0.0:P` and `[::]:P` can both be listed.
        let one: libc::c_int = 1;
        // SAFETY: valid socket and option buffer.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_IPV6,
                libc::IPV6_V6ONLY,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
    socket.bind(addr)?;
    socket.listen(4096)
}

/// Each connection holds a socket and, while serving, a file: lift the soft descriptor limit to
/// the hard one so `max_connections` is reachable.
fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: valid pointer to an rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// What one response did, for the access log.
struct Outcome {
    status: u16,
    bytes: u64,
    keep_alive: bool,
}

async fn connection(mut stream: TcpStream, peer: SocketAddr, shared: &Shared, mut stop: watch::Receiver<bool>) {
    let _ = stream.set_nodelay(true);
    let local = stream.local_addr().ok();
    let limits = &shared.limits;
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut served = 0u64;
    loop {
        served += 1;
        // Read one request head (it may already be in `buf`, pipelined behind the last one).
        let deadline = tokio::time::Instant::now() + limits.header_timeout;
        let head_len = loop {
            if let Some(n) = http::head_end(&buf[..buf.len().min(limits.max_head + 4)]) {
                break n;
            }
            if buf.len() >= limits.max_head {
                let started = Instant::now();
                let o = simple(&stream, 431, false, "request head too large\n", limits).await;
                log_access(peer, "-", "-", &o, started);
                linger_close(stream).await;
                return;
            }
            if *stop.borrow() && buf.is_empty() {
                return;
            }
            buf.reserve(4096);
            let idle = buf.is_empty();
            // A keep-alive connection idle between requests, while slots run low, gives its slot
            // up after `busy_idle` (or at once when the pressure signal comes): the client may
            // always retry a request on a new connection (RFC 9112 §9.3.1), a waiting one may not.
            let keepalive_idle = idle && served > 1;
            let deadline = if keepalive_idle && busy(shared) {
                deadline.min(tokio::time::Instant::now() + limits.busy_idle)
            } else {
                deadline
            };
            let read = tokio::select! {
                r = tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)) => r,
                _ = stop.changed(), if idle => return,
                _ = shared.pressure.notified(), if keepalive_idle => return,
            };
            match read {
                Ok(Ok(0)) | Ok(Err(_)) => return,
                Ok(Ok(_)) => {}
                Err(_) => {
                    if !buf.is_empty() {
                        // A client that started a request and stalled: tell it, then drop it.
                        let started = Instant::now();
                        let o = simple(&stream, 408, false, "request head not received in time\n", limits).await;
                        log_access(peer, "-", "-", &o, started);
                        tracing::debug!("dropped {peer}: request head incomplete after {:?}", limits.header_timeout);
                    }
                    return;
                }
            }
        };
        let started = Instant::now();
        let parsed = http::parse_head(&buf[..head_len]);
        buf.drain(..head_len);
        let req = match parsed {
            Ok(r) => r,
            Err(e) => {
                let (status, msg) = match e {
                    HeadError::Bad(m) => (400, m),
                    HeadError::TooLarge => (431, "request head too large"),
                    HeadError::Version => (505, "only HTTP/1.0 and HTTP/1.1 are served"),
                };
                let o = simple(&stream, status, false, &format!("{msg}\n"), limits).await;
                log_access(peer, "-", "-", &o, started);
                linger_close(stream).await;
                return;
            }
        };
        let stopping = *stop.borrow();
        // Debug builds only: lets the tests prove that a panicking connection is logged and
        // closed while the server keeps serving (no release binary has this).
        #[cfg(debug_assertions)]
        if req.target == "/.dbh-debug-panic" && std::env::var_os("DBH_SERVE_DEBUG_PANIC").is_some() {
            panic!("panic requested by the test hook");
        }
        let mut outcome = match respond(&stream, &req, shared, local, stopping).await {
            Ok(o) => o,
            Err(e) => {
                tracing::debug!("connection to {peer} ended mid-response: {e}");
                Outcome { status: 0, bytes: 0, keep_alive: false }
            }
        };
        if outcome.status == 0 {
            outcome.status = 499;
        }
        log_access(peer, &req.method_text, &req.target, &outcome, started);
        if let Some(f) = shared.access_log.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            use std::io::Write as _;
            let _ = writeln!(f, "{peer} {} {} {} {}", req.method_text, req.target.escape_debug(), outcome.status, outcome.bytes);
        }
        if req.has_body && outcome.status != 499 {
            linger_close(stream).await;
            return;
        }
        if !outcome.keep_alive || *stop.borrow() {
            return;
        }
    }
}

/// Closes a connection whose client may still be sending (an oversized head, a body we do not
/// read): closing with unread input makes the kernel send RST, which can destroy the error
/// response before the client reads it. So: FIN first, then discard input briefly.
async fn linger_close(mut stream: TcpStream) {
    use tokio::io::AsyncWriteExt;
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 8192];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let mut left = 1usize << 20;
    while left > 0 {
        match tokio::time::timeout_at(deadline, stream.read(&mut sink)).await {
            Ok(Ok(n)) if n > 0 => left = left.saturating_sub(n),
            _ => break,
        }
    }
}

fn log_access(peer: SocketAddr, method: &str, target: &str, o: &Outcome, started: Instant) {
    if !tracing::enabled!(target: "dbh::access", tracing::Level::INFO) {
        return;
    }
    // The line is rendered here in one piece and handed to tracing as one string: formatting it
    // argument by argument through tracing's escaping writer cost more than the rest of a small
    // file's response.
    use std::fmt::Write as _;
    thread_local! {
        static LINE: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
    }
    LINE.with(|line| {
        let mut line = line.borrow_mut();
        line.clear();
        // The peer is formatted by hand: SocketAddr's Display goes through the padding-aware
        // formatter byte by byte.
        match peer {
            SocketAddr::V4(a) => {
                let [o1, o2, o3, o4] = a.ip().octets();
                let _ = write!(line, "{o1}.{o2}.{o3}.{o4}:{} {method} ", a.port());
            }
            SocketAddr::V6(_) => {
                let _ = write!(line, "{peer} {method} ");
            }
        }
        push_escaped(&mut line, target);
        let _ = write!(line, " {} {} {:.1}ms", o.status, o.bytes, started.elapsed().as_secs_f64() * 1000.0);
        tracing::info!(target: "dbh::access", "{}", line.as_str());
    });
}

/// `s.escape_debug()`, with a fast path for the plain ASCII a request target almost always is.
fn push_escaped(out: &mut String, s: &str) {
    use std::fmt::Write as _;
    if s.bytes().all(|b| b.is_ascii_graphic() && !matches!(b, b'\\' | b'\'' | b'"')) {
        out.push_str(s);
    } else {
        let _ = write!(out, "{}", s.escape_debug());
    }
}

async fn simple(stream: &TcpStream, status: u16, keep_alive: bool, body: &str, limits: &Limits) -> Outcome {
    send_bytes(stream, status, keep_alive, &[("Content-Type", "text/plain; charset=utf-8")], body.as_bytes(), true, limits)
        .await
        .unwrap_or(Outcome { status: 0, bytes: 0, keep_alive: false })
}

async fn send_bytes(
    stream: &TcpStream,
    status: u16,
    keep_alive: bool,
    headers: &[(&str, &str)],
    body: &[u8],
    with_body: bool,
    limits: &Limits,
) -> io::Result<Outcome> {
    let mut out = http::response_head(status, keep_alive, Some(body.len() as u64), headers);
    if with_body {
        out.extend_from_slice(body);
    }
    fs::send_all(stream, &out, limits.send_stall).await?;
    Ok(Outcome { status, bytes: if with_body { body.len() as u64 } else { 0 }, keep_alive })
}

fn content_type(name: &str) -> &'static str {
    if name == "Packages" {
        "text/plain; charset=utf-8"
    } else if name.ends_with(".gz") {
        "application/gzip"
    } else if name.ends_with(".tar") {
        "application/x-tar"
    } else if name.ends_with(".asc") {
        "application/pgp-keys"
    } else if name.ends_with(".html") {
        "text/html; charset=utf-8"
    } else {
        "application/octet-stream"
    }
}

async fn respond(
    stream: &TcpStream,
    req: &Request,
    shared: &Shared,
    local: Option<SocketAddr>,
    stopping: bool,
) -> io::Result<Outcome> {
    let limits = &shared.limits;
    // A request with a body is answered, then the connection closed: GET/HEAD need no body and
    // skipping an unread one safely is not worth the code.
    let keep = req.keep_alive && !req.has_body && !stopping;
    let get = req.method == Method::Get;
    let text = |status: u16, body: &str| {
        let body = body.to_string();
        async move {
            send_bytes(stream, status, keep, &[("Content-Type", "text/plain; charset=utf-8")], body.as_bytes(), get || req.method == Method::Other, limits).await
        }
    };
    if req.method == Method::Other {
        let body = format!("method {} not allowed: this server only reads (GET, HEAD)\n", req.method_text);
        return send_bytes(
            stream,
            405,
            keep,
            &[("Allow", "GET, HEAD"), ("Content-Type", "text/plain; charset=utf-8")],
            body.as_bytes(),
            true,
            limits,
        )
        .await;
    }
    let segments = match http::decode_target(&req.target) {
        Ok(s) => s,
        Err(PathError::BadRequest) => return text(400, "bad request path\n").await,
        Err(PathError::NotFound) => return text(404, "not found\n").await,
    };
    let _ = local;
    let base = &shared.public_url;
    match segments.as_slice() {
        [] => {
            let html = pages::root_page(&target_rows(shared));
            send_html(stream, req, keep, get, &html, limits).await
        }
        [t] => {
            if !is_target(shared, t) {
                return text(404, "no such target\n").await;
            }
            let loc = format!("/{t}/");
            send_bytes(stream, 301, keep, &[("Location", &loc), ("Content-Type", "text/plain; charset=utf-8")], b"moved\n", get, limits).await
        }
        [t, last] if last.is_empty() => {
            if !is_target(shared, t) {
                return text(404, "no such target\n").await;
            }
            let summary = summary(shared, t);
            let fpr = fingerprint(shared);
            let conf = pages::binrepos_conf(t, base, shared.priority, fpr.as_deref());
            let html = pages::target_page(t, summary.as_deref(), &conf, base, fpr.as_deref());
            let html = pages::insert_section(html, &generations_html(shared, t));
            send_html(stream, req, keep, get, &html, limits).await
        }
        [t, name] if name == "binrepos.conf" => {
            if !is_target(shared, t) {
                return text(404, "no such target\n").await;
            }
            let conf = pages::binrepos_conf(t, base, shared.priority, fingerprint(shared).as_deref());
            send_generated(stream, req, keep, get, "text/plain; charset=utf-8", &conf, limits).await
        }
        [t, name] if name == "key.asc" => {
            if !is_target(shared, t) {
                return text(404, "no such target\n").await;
            }
            match fs::open_path(&shared.key_file) {
                // The key can be rotated: an hour, then revalidate.
                Ok((file, meta)) => {
                    let describe = cache::Describe { ctype: "application/pgp-keys", kind: None, cache_control: "max-age=3600" };
                    serve_file(stream, req, keep, &cache::Entry::new(file, &meta, describe), limits).await
                }
                Err(_) => {
                    text(404, &format!(
                        "this binhost has no published signing key ({} does not exist): run `dbh key generate` on the server\n",
                        shared.key_file.display()
                    ))
                    .await
                }
            }
        }
        [t, name] if name == "trust.sh" => {
            if !is_target(shared, t) {
                return text(404, "no such target\n").await;
            }
            match trust_script(shared, t, base) {
                Ok(script) => {
                    let headers = [("Content-Type", "text/x-shellscript; charset=utf-8")];
                    send_bytes(stream, 200, keep, &headers, script.as_bytes(), get, limits).await
                }
                Err(reason) => text(404, &format!("{reason}\n")).await,
            }
        }
        [t, dir, name] if dir == "portage" => {
            if !is_target(shared, t) {
                return text(404, "no such target\n").await;
            }
            let body = if name.is_empty() {
                crate::binhost::clientconf::listing(t)
            } else if let Some(text) = portage_files(shared, t).remove(name.as_str()) {
                text
            } else {
                return text(404, "no such configuration file\n").await;
            };
            send_bytes(stream, 200, keep, &[("Content-Type", "text/plain; charset=utf-8")], body.as_bytes(), get, limits).await
        }
        [dir, name] if dir == "distfiles" && shared.distfiles.is_some() => {
            // Flat layout (no layout.conf): Portage asks for `<mirror>/distfiles/<name>`.
            // One plain file name: a decoded `%2F` must not lead out of the directory.
            let plain = !name.is_empty() && !name.starts_with('.') && !name.contains(['/', '\0']);
            let found = shared.distfiles.as_ref().filter(|_| plain).map(|d| fs::open_path(&d.join(name)));
            match found {
                Some(Ok((file, meta))) => {
                    let describe = cache::Describe { ctype: "application/octet-stream", kind: None, cache_control: "max-age=3600" };
                    serve_file(stream, req, keep, &cache::Entry::new(file, &meta, describe), limits).await
                }
                _ => text(404, "no such distfile\n").await,
            }
        }
        [.., last] if last.is_empty() => text(404, "not found\n").await,
        [_, rest @ ..] => {
            let rel = segments.join("/");
            let describe = || {
                let name = segments.last().map(String::as_str).unwrap_or("");
                let kind = match rest {
                    [n] if n == "Packages" => Some(fs::IndexKind::Plain),
                    [n] if n == "Packages.gz" => Some(fs::IndexKind::Gzip),
                    _ => None,
                };
                let cache_control = match kind {
                    // The index changes on every add: short freshness, then revalidate (304s are cheap).
                    Some(_) => "max-age=60, must-revalidate",
                    // A multi-instance binpkg (`PF-BUILD_ID.*`) never changes once published: a new
                    // build gets a new BUILD_ID, hence a new name.
                    None if crate::binhost::deps::parse_build_id(name) > 0 => "max-age=31536000, immutable",
                    None => "max-age=3600",
                };
                cache::Describe { ctype: content_type(name), kind, cache_control }
            };
            match shared.files.open(&shared.root, &shared.root_path, &rel, describe) {
                Ok(entry) => serve_file(stream, req, keep, &entry, limits).await,
                Err(_) => text(404, "not found\n").await,
            }
        }
    }
}

async fn send_html(stream: &TcpStream, req: &Request, keep: bool, get: bool, html: &str, limits: &Limits) -> io::Result<Outcome> {
    send_generated(stream, req, keep, get, "text/html; charset=utf-8", html, limits).await
}

/// A generated body (pages, binrepos.conf) with a validator: a strong ETag from its bytes, so a
/// revalidation (`no-cache`) costs a 304 when nothing changed.
async fn send_generated(
    stream: &TcpStream,
    req: &Request,
    keep: bool,
    get: bool,
    ctype: &str,
    body: &str,
    limits: &Limits,
) -> io::Result<Outcome> {
    let etag = format!("\"g-{:016x}-{:x}\"", fxhash(body), body.len());
    if req.if_none_match.as_deref().is_some_and(|inm| http::none_match(inm, &etag)) {
        let head = http::response_head(304, keep, None, &[("ETag", &etag), ("Cache-Control", "no-cache")]);
        fs::send_all(stream, &head, limits.send_stall).await?;
        return Ok(Outcome { status: 304, bytes: 0, keep_alive: keep });
    }
    send_bytes(
        stream,
        200,
        keep,
        &[("Content-Type", ctype), ("Cache-Control", "no-cache"), ("ETag", &etag)],
        body.as_bytes(),
        get,
        limits,
    )
    .await
}

/// A file's response from its (cached or fresh) entry: body and validators come from the one
/// descriptor the entry holds.
async fn serve_file(stream: &TcpStream, req: &Request, keep: bool, entry: &cache::Entry, limits: &Limits) -> io::Result<Outcome> {
    let get = req.method == Method::Get;
    let info = &entry.info;
    let (ctype, cache) = (entry.describe.ctype, entry.describe.cache_control);
    let lm = entry.last_modified.as_str();
    let not_modified = match (&req.if_none_match, &req.if_modified_since) {
        (Some(inm), _) => http::none_match(inm, &info.etag),
        (None, Some(ims)) => http::not_modified_since(ims, info.last_modified),
        (None, None) => false,
    };
    if not_modified {
        let head = http::response_head(304, keep, None, &[("ETag", &info.etag), ("Last-Modified", lm), ("Cache-Control", cache)]);
        fs::send_all(stream, &head, limits.send_stall).await?;
        return Ok(Outcome { status: 304, bytes: 0, keep_alive: keep });
    }
    let ranges = match (&req.range, &req.if_range) {
        (Some(_), Some(ir)) if !http::if_range_matches(ir, &info.etag, info.last_modified) => Ranges::Full,
        (Some(r), _) => http::parse_ranges(r, info.size),
        (None, _) => Ranges::Full,
    };
    let file = &entry.file;
    let common = [("ETag", info.etag.as_str()), ("Last-Modified", lm), ("Accept-Ranges", "bytes"), ("Cache-Control", cache)];
    match ranges {
        Ranges::Full => {
            // The common case: the head rendered once per file, only Date and Connection added.
            let mut head = Vec::with_capacity(entry.head_200.len() + 96);
            http::head_with_lines(200, keep, &entry.head_200, &mut head);
            send_file_body(stream, &head, file, &[(Vec::new(), ByteRange { start: 0, end: info.size })], b"", get, limits, 200, keep).await
        }
        Ranges::Unsatisfiable => {
            let cr = format!("bytes */{}", info.size);
            let mut h = vec![("Content-Range", cr.as_str())];
            h.extend_from_slice(&common);
            let head = http::response_head(416, keep, Some(0), &h);
            fs::send_all(stream, &head, limits.send_stall).await?;
            Ok(Outcome { status: 416, bytes: 0, keep_alive: keep })
        }
        Ranges::Partial(parts) if parts.len() == 1 => {
            let r = parts[0];
            let cr = format!("bytes {}-{}/{}", r.start, r.end - 1, info.size);
            let mut h = vec![("Content-Type", ctype), ("Content-Range", cr.as_str())];
            h.extend_from_slice(&common);
            let head = http::response_head(206, keep, Some(r.len()), &h);
            send_file_body(stream, &head, file, &[(Vec::new(), r)], b"", get, limits, 206, keep).await
        }
        Ranges::Partial(parts) => {
            // The boundary only has to be absent from the part bodies' framing lines; a value
            // derived from the ETag never appears in a part header and is stable per file.
            let boundary = format!("dbh-{:016x}", fxhash(&info.etag));
            let mut total = 0u64;
            let framed: Vec<(Vec<u8>, ByteRange)> = parts
                .iter()
                .map(|r| {
                    let part_head = format!(
                        "\r\n--{boundary}\r\nContent-Type: {ctype}\r\nContent-Range: bytes {}-{}/{}\r\n\r\n",
                        r.start,
                        r.end - 1,
                        info.size
                    )
                    .into_bytes();
                    total += part_head.len() as u64 + r.len();
                    (part_head, *r)
                })
                .collect();
            let trailer = format!("\r\n--{boundary}--\r\n").into_bytes();
            total += trailer.len() as u64;
            let ct = format!("multipart/byteranges; boundary={boundary}");
            let mut h = vec![("Content-Type", ct.as_str())];
            h.extend_from_slice(&common);
            let head = http::response_head(206, keep, Some(total), &h);
            send_file_body(stream, &head, file, &framed, &trailer, get, limits, 206, keep).await
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn send_file_body(
    stream: &TcpStream,
    head: &[u8],
    file: &File,
    parts: &[(Vec<u8>, ByteRange)],
    trailer: &[u8],
    get: bool,
    limits: &Limits,
    status: u16,
    keep: bool,
) -> io::Result<Outcome> {
    if !get {
        fs::send_all(stream, head, limits.send_stall).await?;
        return Ok(Outcome { status, bytes: 0, keep_alive: keep });
    }
    // Large bodies: cork the socket (as nginx's tcp_nopush does) so the kernel sends full-sized
    // segments while sendfile refills the buffer, then uncork to push the tail.
    let total: u64 = parts.iter().map(|(_, r)| r.len()).sum();
    let cork = total >= CORK_THRESHOLD;
    if cork {
        fs::set_cork(stream, true);
    }
    let result = send_parts(stream, head, file, parts, trailer, limits).await;
    if cork {
        fs::set_cork(stream, false);
    }
    Ok(Outcome { status, bytes: result?, keep_alive: keep })
}

const CORK_THRESHOLD: u64 = 256 * 1024;

async fn send_parts(
    stream: &TcpStream,
    head: &[u8],
    file: &File,
    parts: &[(Vec<u8>, ByteRange)],
    trailer: &[u8],
    limits: &Limits,
) -> io::Result<u64> {
    if let [(part_head, r)] = parts
        && part_head.is_empty()
        && trailer.is_empty()
    {
        // One plain range (every 200): the head, then the file, without copying the head.
        if r.is_empty() {
            fs::send_all(stream, head, limits.send_stall).await?;
            return Ok(0);
        }
        fs::send_more(stream, head, limits.send_stall).await?;
        return fs::send_file(stream, file, r.start, r.len(), limits.send_stall).await;
    }
    let mut bytes = 0;
    let mut pending = head.to_vec();
    for (part_head, r) in parts {
        pending.extend_from_slice(part_head);
        bytes += part_head.len() as u64;
        if !r.is_empty() {
            fs::send_more(stream, &pending, limits.send_stall).await?;
            pending.clear();
            bytes += fs::send_file(stream, file, r.start, r.len(), limits.send_stall).await?;
        }
    }
    pending.extend_from_slice(trailer);
    bytes += trailer.len() as u64;
    fs::send_all(stream, &pending, limits.send_stall).await?;
    Ok(bytes)
}

fn fxhash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

fn is_target(shared: &Shared, name: &str) -> bool {
    fs::open_beneath(&shared.root, &shared.root_path, name)
        .and_then(|f| f.metadata())
        .is_ok_and(|m| m.is_dir())
}

fn target_rows(shared: &Shared) -> Vec<pages::TargetRow> {
    let mut names: Vec<String> = std::fs::read_dir(&shared.root_path)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| !n.starts_with('.') && is_target(shared, n))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let summary = summary(shared, &name).map(|s| (*s).clone());
            pages::TargetRow { name, summary }
        })
        .collect()
}

/// Largest `Packages` the pages summarize (a 10 000-package index is about 7 MiB).
const MAX_PAGE_INDEX: u64 = 256 << 20;

/// The parsed `Packages` of a target, re-read only when the index file was replaced.
fn summary(shared: &Shared, target: &str) -> Option<Arc<pages::IndexSummary>> {
    let (file, m) = fs::open_file(&shared.root, &shared.root_path, &format!("{target}/Packages")).ok()?;
    // The pages parse the index in memory: an absurd one is not worth the RSS.
    if m.len() > MAX_PAGE_INDEX {
        return None;
    }
    let key = (m.dev(), m.ino(), m.mtime(), m.mtime_nsec());
    if let Some((k, s)) = shared.summaries.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(target)
        && *k == key
    {
        return Some(s.clone());
    }
    let s = Arc::new(pages::load_index(file)?);
    shared.summaries.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(target.to_string(), (key, s.clone()));
    Some(s)
}

/// `/<target>/portage/*`: built per request from the target's config, definition and index.
fn portage_files(shared: &Shared, target: &str) -> std::collections::BTreeMap<&'static str, String> {
    let index = fs::open_beneath(&shared.root, &shared.root_path, &format!("{target}/Packages"))
        .ok()
        .and_then(|f| {
            let mut bytes = Vec::new();
            io::Read::read_to_end(&mut io::BufReader::new(f), &mut bytes).ok()?;
            crate::binhost::Index::parse(&bytes).ok()
        });
    let def = shared.targets.as_ref().and_then(|ts| ts.get(target).ok());
    let config_dir = shared.target_config.as_ref().map(|d| d.join(target).join("portage"));
    crate::binhost::clientconf::files(&crate::binhost::clientconf::Sources {
        target,
        config_dir: config_dir.as_deref().filter(|d| d.is_dir()),
        chost: def.map(|d| d.chost.as_str()),
        keyword: def.map(|d| d.keyword.as_str()),
        profile: def.map(|d| d.profile.as_str()),
        index: index.as_ref(),
    })
}

/// `/<target>/trust.sh` from the published key (read per request: it is small and rarely asked for).
fn trust_script(shared: &Shared, target: &str, base: &str) -> Result<String, String> {
    let key = std::fs::read_to_string(&shared.key_file).map_err(|_| {
        format!(
            "this binhost has no published signing key ({} does not exist): run `dbh key generate` on the server",
            shared.key_file.display()
        )
    })?;
    let uri = crate::binhost::conf::sync_uri(base, target).map_err(|e| e.to_string())?;
    crate::binhost::trust::script(&crate::binhost::trust::TrustInput { target, sync_uri: Some(&uri), public_key: &key })
        .map_err(|e| e.to_string())
}

/// The target page's generations section (binhost lifecycle), from the generation records.
fn generations_html(shared: &Shared, target: &str) -> String {
    use crate::binhost::generations;
    let dir = shared.root_path.join(target);
    let gens = generations::list(&dir).unwrap_or_default();
    let current = match generations::state(&dir) {
        Ok(generations::State::Published(n) | generations::State::GzAhead(n)) => Some(n),
        _ => None,
    };
    pages::generations_section(&gens, current)
}

/// The signing key's fingerprint for the import steps, re-read when the key file changes.
fn fingerprint(shared: &Shared) -> Option<String> {
    use sequoia_openpgp::parse::Parse;
    let m = std::fs::metadata(&shared.key_file).ok()?;
    let key = (m.dev(), m.ino(), m.mtime(), m.mtime_nsec());
    if let Some((k, f)) = shared.fingerprint.lock().unwrap_or_else(std::sync::PoisonError::into_inner).as_ref()
        && *k == key
    {
        return f.clone();
    }
    let f = fs::open_path(&shared.key_file)
        .ok()
        .filter(|(_, m)| m.len() <= 1 << 20)
        .and_then(|(f, _)| {
            let mut b = Vec::new();
            std::io::Read::read_to_end(&mut &f, &mut b).ok().map(|_| b)
        })
        .and_then(|b| sequoia_openpgp::Cert::from_bytes(&b).ok())
        .map(|c| c.fingerprint().to_hex());
    *shared.fingerprint.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some((key, f.clone()));
    f
}
