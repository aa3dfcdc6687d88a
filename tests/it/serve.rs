//! `dbh serve`: the real binary on a free loopback port, driven by reqwest, raw TCP (for requests
//! no well-behaved client sends), headless Chromium (the pages) and real Portage (the binhost).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

/// A running `dbh serve`; SIGTERM and wait on drop.
pub struct Serve {
    child: Child,
    /// `127.0.0.1:PORT`
    pub addr: String,
    log: Arc<Mutex<String>>,
}

impl Serve {
    /// `dir: None` serves the default, `$DBH_HOME/binhost`.
    pub fn start(home: &Path, dir: Option<&Path>, args: &[&str], env: &[(&str, &str)]) -> Serve {
        Serve::start_with(home, dir, args, env, |_| {})
    }
    /// [`Serve::start`], with a last say on the command (e.g. a seccomp filter in `pre_exec`).
    pub fn start_with(home: &Path, dir: Option<&Path>, args: &[&str], env: &[(&str, &str)], adjust: impl FnOnce(&mut Command)) -> Serve {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_dbh"));
        cmd.arg("--home").arg(home).arg("serve");
        if let Some(dir) = dir {
            cmd.arg("--dir").arg(dir);
        }
        if !args.contains(&"--listen") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        cmd.args(args);
        for (k, _) in std::env::vars() {
            if k.starts_with("DBH_") || k == "RUST_LOG" {
                cmd.env_remove(k);
            }
        }
        cmd.envs(env.iter().copied()).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        adjust(&mut cmd);
        let mut child = cmd.spawn().expect("spawn dbh serve");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            let mut r = std::io::BufReader::new(stderr);
            let mut line = String::new();
            while std::io::BufRead::read_line(&mut r, &mut line).unwrap_or(0) > 0 {
                sink.lock().unwrap().push_str(&line);
                line.clear();
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = log.lock().unwrap().clone();
            if let Some(i) = text.find("on http://127.0.0.1:") {
                let rest = &text[i + "on http://".len()..];
                let addr = rest[..rest.find('/').unwrap()].to_string();
                return Serve { child, addr, log };
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("dbh serve exited with {status} before listening:\n{text}");
            }
            assert!(Instant::now() < deadline, "dbh serve did not say where it listens within 20 s:\n{text}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Still running (not exited, e.g. on a panic).
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_none()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the access log has a line containing `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn terminate(&mut self) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), nix::sys::signal::Signal::SIGTERM);
    }

    /// SIGTERM, then the exit status (within 20 s).
    pub fn stop(&mut self) -> ExitStatus {
        self.terminate();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("dbh serve did not exit within 20 s of SIGTERM:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.terminate();
            std::thread::sleep(Duration::from_millis(100));
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A parsed raw HTTP response.
#[derive(Debug)]
pub struct Raw {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Raw {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Sends `request` verbatim on a fresh connection and reads until the server closes it.
pub fn raw(addr: &str, request: &[u8]) -> Raw {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    parse_responses(&out).into_iter().next().unwrap_or_else(|| panic!("no response to {:?}", String::from_utf8_lossy(request)))
}

/// Splits a byte stream into responses (by Content-Length; HEAD-less usage).
pub fn parse_responses(mut data: &[u8]) -> Vec<Raw> {
    let mut out = Vec::new();
    while let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&data[..end]).into_owned();
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':').map(|(k, v)| (k.trim().to_string(), v.trim().to_string())))
            .collect();
        let len: usize = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .map(|(_, v)| v.parse().unwrap())
            .unwrap_or(0);
        let body_start = end + 4;
        let body_end = (body_start + len).min(data.len());
        out.push(Raw { status, headers, body: data[body_start..body_end].to_vec() });
        data = &data[body_end..];
    }
    out
}

pub fn get(addr: &str, path: &str) -> Raw {
    raw(addr, format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
}

/// Deterministic pseudo-random bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn sha256(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(data).unwrap();
    gz.finish().unwrap()
}

pub fn gunzip(data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(data).read_to_end(&mut out)?;
    Ok(out)
}

pub const TS: u64 = 1_795_533_596;

/// The index text of one generation: a header whose `DBH_TEST_SHA256` covers every byte after
/// the header stanza, and `n` package stanzas whose contents depend on the generation.
pub fn index_text(generation: u64, n: usize) -> String {
    let mut body = String::new();
    for i in 0..n {
        body.push_str(&format!(
            "BUILD_ID: {generation}\nBUILD_TIME: {}\nCPV: dbh-test/pkg{i:05}-1.{generation}\nMD5: {:032x}\nPATH: dbh-test/pkg{i:05}/pkg{i:05}-1.{generation}-{generation}.gpkg.tar\nSIZE: {}\n\n",
            TS + generation,
            (generation as u128) << 64 | i as u128,
            1000 + i
        ));
    }
    format!(
        "DBH_TEST_SHA256: {}\nPACKAGES: {n}\nTIMESTAMP: {}\nVERSION: 0\n\n{body}",
        sha256(body.as_bytes()),
        TS + generation
    )
}

/// Checks one index body: header parses, checksum matches, TIMESTAMP is as claimed. Returns the
/// TIMESTAMP.
pub fn verify_index(text: &[u8]) -> Result<u64, String> {
    let text = std::str::from_utf8(text).map_err(|_| "not UTF-8".to_string())?;
    let (header, body) = text.split_once("\n\n").ok_or("no header stanza")?;
    let mut sum = None;
    let mut ts = None;
    let mut count = None;
    for line in header.lines() {
        match line.split_once(": ") {
            Some(("DBH_TEST_SHA256", v)) => sum = Some(v.to_string()),
            Some(("TIMESTAMP", v)) => ts = v.parse::<u64>().ok(),
            Some(("PACKAGES", v)) => count = v.parse::<usize>().ok(),
            _ => {}
        }
    }
    let (sum, ts, count) = (sum.ok_or("no checksum")?, ts.ok_or("no TIMESTAMP")?, count.ok_or("no PACKAGES")?);
    if sha256(body.as_bytes()) != sum {
        return Err(format!("torn index: checksum mismatch (TIMESTAMP {ts}, {} bytes)", text.len()));
    }
    let stanzas = body.split("\n\n").filter(|s| !s.is_empty()).count();
    if stanzas != count {
        return Err(format!("PACKAGES says {count}, body has {stanzas}"));
    }
    Ok(ts)
}

/// Writes a file the way the binhost writer does: a dot-named temp file in the same directory,
/// fsync, mtime, rename.
pub fn replace_file(path: &Path, data: &[u8], mtime: u64) {
    let dir = path.parent().unwrap();
    let tmp = dir.join(format!(".{}.{}.tmp", path.file_name().unwrap().to_str().unwrap(), std::process::id()));
    let mut f = std::fs::File::create(&tmp).unwrap();
    f.write_all(data).unwrap();
    f.set_modified(UNIX_EPOCH + Duration::from_secs(mtime)).unwrap();
    f.sync_all().unwrap();
    drop(f);
    std::fs::rename(&tmp, path).unwrap();
}

/// A served tree: `<base>/secret` (must never be served), `<base>/bh/amd64/` with an index and
/// two binpkgs, symlinks in and out, dotfiles and partial files.
pub struct Tree {
    pub base: tempfile::TempDir,
    pub small: Vec<u8>,
    pub big: Vec<u8>,
}

pub const SECRET: &str = "TOP-SECRET-do-not-serve";

impl Tree {
    pub fn new() -> Tree {
        let base = tempfile::Builder::new().prefix("dbh-serve-").tempdir().unwrap();
        let t = base.path().join("bh/amd64");
        std::fs::create_dir_all(t.join("dbh-test/hello")).unwrap();
        std::fs::create_dir_all(base.path().join("bh/arm64")).unwrap();
        std::fs::create_dir_all(base.path().join("home")).unwrap();
        std::fs::write(base.path().join("secret"), SECRET).unwrap();
        std::fs::write(base.path().join("bh/secret-in-root"), SECRET).unwrap();
        let text = index_text(0, 3);
        replace_file(&t.join("Packages"), text.as_bytes(), TS);
        replace_file(&t.join("Packages.gz"), &gzip(text.as_bytes()), TS);
        let small = pattern(50_000, 1);
        let big = pattern(3 << 20, 2);
        std::fs::write(t.join("dbh-test/hello/hello-1.0-1.gpkg.tar"), &small).unwrap();
        std::fs::write(t.join("dbh-test/hello/hello-1.0-2.gpkg.tar"), &big).unwrap();
        std::fs::write(t.join(".Packages.partial-index"), SECRET).unwrap();
        std::fs::write(t.join("Packages.partial"), SECRET).unwrap();
        std::fs::write(t.join("Packages.tmp"), SECRET).unwrap();
        std::fs::write(t.join(".hidden"), SECRET).unwrap();
        std::os::unix::fs::symlink("../../secret", t.join("leak-rel")).unwrap();
        std::os::unix::fs::symlink(base.path().join("secret"), t.join("leak-abs")).unwrap();
        std::os::unix::fs::symlink("/etc", t.join("etc")).unwrap();
        std::os::unix::fs::symlink("dbh-test/hello/hello-1.0-1.gpkg.tar", t.join("inside")).unwrap();
        Tree { base, small, big }
    }
    pub fn dir(&self) -> PathBuf {
        self.base.path().join("bh")
    }
    pub fn home(&self) -> PathBuf {
        self.base.path().join("home")
    }
    pub fn serve(&self, args: &[&str], env: &[(&str, &str)]) -> Serve {
        Serve::start(&self.home(), Some(&self.dir()), args, env)
    }
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder().timeout(Duration::from_secs(30)).build().unwrap()
}

fn http_date(secs: u64) -> String {
    httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(secs))
}

const BIN: &str = "/amd64/dbh-test/hello/hello-1.0-2.gpkg.tar";

#[test]
fn ranges_single_multi_suffix_open_ended_and_416() {
    let tree = Tree::new();
    let srv = tree.serve(&[], &[]);
    let c = client();
    let url = srv.url(BIN);
    let big = &tree.big;
    let size = big.len();
    let range = |spec: &str| c.get(&url).header("Range", spec).send().unwrap();

    let r = range("bytes=100-199");
    assert_eq!(r.status(), 206);
    assert_eq!(r.headers()["content-range"], format!("bytes 100-199/{size}").as_str());
    assert_eq!(r.bytes().unwrap().as_ref(), &big[100..200]);

    let r = range("bytes=-512");
    assert_eq!(r.status(), 206);
    assert_eq!(r.headers()["content-range"], format!("bytes {}-{}/{size}", size - 512, size - 1).as_str());
    assert_eq!(r.bytes().unwrap().as_ref(), &big[size - 512..]);

    let r = range(&format!("bytes={}-", size - 1000));
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().unwrap().as_ref(), &big[size - 1000..]);

    // Portage reads GPKG metadata through ranges; a range past the end is clipped.
    let r = range(&format!("bytes=0-{}", size * 2));
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().unwrap().len(), size);

    let r = range("bytes=0-9, 1000-1099, -5");
    assert_eq!(r.status(), 206);
    let ct = r.headers()["content-type"].to_str().unwrap().to_string();
    let boundary = ct.strip_prefix("multipart/byteranges; boundary=").expect(&ct).to_string();
    let body = r.bytes().unwrap().to_vec();
    let parts = multipart(&body, &boundary);
    let want = [(0, 10), (1000, 1100), (size - 5, size)];
    assert_eq!(parts.len(), 3);
    for ((cr, data), (a, b)) in parts.iter().zip(want) {
        assert_eq!(cr, &format!("bytes {a}-{}/{size}", b - 1));
        assert_eq!(data.as_slice(), &big[a..b]);
    }

    for spec in [format!("bytes={size}-"), format!("bytes={}-{}", size + 10, size + 20)] {
        let r = range(&spec);
        assert_eq!(r.status(), 416, "{spec}");
        assert_eq!(r.headers()["content-range"], format!("bytes */{size}").as_str());
    }
    // Unsatisfiable parts are dropped when another part is satisfiable.
    let r = range(&format!("bytes={}-,0-0", size + 1));
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().unwrap().as_ref(), &big[..1]);
    // Malformed Range: the whole file.
    let r = range("bytes=z-1");
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().unwrap().len(), size);
    // If-Range with a stale validator: the whole file.
    let r = c.get(&url).header("Range", "bytes=0-0").header("If-Range", "\"stale\"").send().unwrap();
    assert_eq!(r.status(), 200);
    let etag = c.head(&url).send().unwrap().headers()["etag"].to_str().unwrap().to_string();
    let r = c.get(&url).header("Range", "bytes=0-0").header("If-Range", &etag).send().unwrap();
    assert_eq!(r.status(), 206);
}

/// Splits a multipart/byteranges body into (Content-Range, data) pairs.
fn multipart(body: &[u8], boundary: &str) -> Vec<(String, Vec<u8>)> {
    let delim = format!("\r\n--{boundary}");
    let mut out = Vec::new();
    let mut rest = body;
    let find = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).position(|w| w == needle);
    let mut pos = find(rest, delim.as_bytes()).expect("first boundary");
    rest = &rest[pos + delim.len()..];
    loop {
        if rest.starts_with(b"--") {
            break;
        }
        let head_end = find(rest, b"\r\n\r\n").unwrap();
        let head = String::from_utf8_lossy(&rest[..head_end]).into_owned();
        let cr = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Range: "))
            .expect("part has Content-Range")
            .to_string();
        let (_, spec) = cr.split_once(' ').unwrap();
        let (range, _) = spec.split_once('/').unwrap();
        let (a, b) = range.split_once('-').unwrap();
        let len = b.parse::<usize>().unwrap() + 1 - a.parse::<usize>().unwrap();
        let data = rest[head_end + 4..head_end + 4 + len].to_vec();
        rest = &rest[head_end + 4 + len..];
        pos = find(rest, delim.as_bytes()).expect("next boundary");
        assert_eq!(pos, 0, "part data longer than its Content-Range");
        rest = &rest[delim.len()..];
        out.push((cr, data));
    }
    out
}

#[test]
fn conditional_requests_head_405_pages_conf_and_key() {
    let tree = Tree::new();
    let srv = tree.serve(&[], &[]);
    let c = client();

    // Index files: Last-Modified is the TIMESTAMP in the file, not the file's mtime.
    std::fs::File::options()
        .write(true)
        .open(tree.dir().join("amd64/Packages.gz"))
        .unwrap()
        .set_modified(SystemTime::now())
        .unwrap();
    for name in ["Packages", "Packages.gz"] {
        let url = srv.url(&format!("/amd64/{name}"));
        let r = c.get(&url).send().unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["last-modified"], http_date(TS).as_str(), "{name}");
        assert!(r.headers().get("content-encoding").is_none(), "Packages.gz is a file, not an encoding");
        let etag = r.headers()["etag"].to_str().unwrap().to_string();
        assert!(etag.starts_with('"'), "strong ETag: {etag}");
        let body = r.bytes().unwrap();
        let text = if name.ends_with(".gz") { gunzip(&body).unwrap() } else { body.to_vec() };
        assert_eq!(verify_index(&text), Ok(TS));

        let r = c.get(&url).header("If-Modified-Since", http_date(TS)).send().unwrap();
        assert_eq!(r.status(), 304, "{name}: IMS = TIMESTAMP");
        assert!(r.bytes().unwrap().is_empty());
        let r = c.get(&url).header("If-Modified-Since", http_date(TS + 3600)).send().unwrap();
        assert_eq!(r.status(), 304);
        let r = c.get(&url).header("If-Modified-Since", http_date(TS - 1)).send().unwrap();
        assert_eq!(r.status(), 200, "{name}: older IMS");
        let r = c.get(&url).header("If-None-Match", &etag).send().unwrap();
        assert_eq!(r.status(), 304, "{name}: If-None-Match");
        assert_eq!(r.headers()["etag"], etag.as_str());
        // If-None-Match wins over If-Modified-Since.
        let r = c.get(&url).header("If-None-Match", "\"other\"").header("If-Modified-Since", http_date(TS)).send().unwrap();
        assert_eq!(r.status(), 200);
    }

    // HEAD: the GET headers, no body.
    let r = c.head(srv.url(BIN)).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], tree.big.len().to_string().as_str());
    assert_eq!(r.headers()["accept-ranges"], "bytes");
    assert!(r.bytes().unwrap().is_empty());

    // Only GET and HEAD.
    for method in ["POST", "PUT", "DELETE", "OPTIONS", "PATCH"] {
        let r = c.request(reqwest::Method::from_bytes(method.as_bytes()).unwrap(), srv.url("/amd64/Packages")).body("x").send().unwrap();
        assert_eq!(r.status(), 405, "{method}");
        assert_eq!(r.headers()["allow"], "GET, HEAD");
    }

    // Keep-alive and pipelining: three requests in one write, three answers in order.
    let mut s = TcpStream::connect(&srv.addr).unwrap();
    let a = &srv.addr;
    s.write_all(
        format!(
            "GET /amd64/Packages HTTP/1.1\r\nHost: {a}\r\n\r\nHEAD {BIN} HTTP/1.1\r\nHost: {a}\r\n\r\nGET /amd64/dbh-test/hello/hello-1.0-1.gpkg.tar HTTP/1.1\r\nHost: {a}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    let mut out = Vec::new();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.read_to_end(&mut out).unwrap();
    // The HEAD answer has a Content-Length but no body: split by hand.
    let first_end = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let first = parse_responses(&out[..]).remove(0);
    assert_eq!(first.status, 200);
    let after_first = &out[first_end + first.body.len()..];
    let head_end = after_first.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(after_first.starts_with(b"HTTP/1.1 200"));
    let third = parse_responses(&after_first[head_end..]).remove(0);
    assert_eq!(third.status, 200);
    assert_eq!(third.body, tree.small);

    // binrepos.conf from the Host header, and from --public-url in a second server.
    let conf = c.get(srv.url("/amd64/binrepos.conf")).send().unwrap().text().unwrap();
    assert!(
        conf.ends_with(&format!("\n[dbh-amd64]\nsync-uri = http://{}/amd64/\npriority = 10\nverify-signature = true\n", srv.addr)),
        "{conf}"
    );
    // The Host header is never echoed (a shared cache would hand it to everyone): the URL is
    // the configured one, here derived from --listen.
    let r = raw(&srv.addr, b"GET /amd64/binrepos.conf HTTP/1.1\r\nHost: a b\"<x>\r\nConnection: close\r\n\r\n");
    assert_eq!(r.status, 200);
    assert!(String::from_utf8_lossy(&r.body).contains(&format!("sync-uri = http://{}/amd64/", srv.addr)));
    let other = tree.serve(&["--public-url", "https://bin.example.org/dbh/"], &[("DBH_BINHOST_PRIORITY", "3")]);
    let conf = c.get(other.url("/arm64/binrepos.conf")).send().unwrap().text().unwrap();
    assert!(conf.ends_with("\n[dbh-arm64]\nsync-uri = https://bin.example.org/dbh/arm64/\npriority = 3\nverify-signature = true\n"), "{conf}");
    assert_eq!(c.get(other.url("/nope/binrepos.conf")).send().unwrap().status(), 404);

    // key.asc: 404 with a clear body until the key exists, then the file.
    let r = c.get(srv.url("/amd64/key.asc")).send().unwrap();
    assert_eq!(r.status(), 404);
    let text = r.text().unwrap();
    assert!(text.contains("no published signing key") && text.contains("dbh key generate"), "{text}");
    let key = "-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nnot really\n-----END PGP PUBLIC KEY BLOCK-----\n";
    std::fs::create_dir_all(tree.home().join("keys")).unwrap();
    std::fs::write(tree.home().join("keys/public.asc"), key).unwrap();
    let r = c.get(srv.url("/amd64/key.asc")).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/pgp-keys");
    assert_eq!(r.text().unwrap(), key);

    // Pages.
    let root = c.get(srv.url("/")).send().unwrap();
    assert_eq!(root.headers()["content-type"], "text/html; charset=utf-8");
    let root = root.text().unwrap();
    assert!(root.contains("href=\"/amd64/\"") && root.contains("href=\"/arm64/\""), "{root}");
    assert!(!root.contains("secret-in-root"), "{root}");
    let page = c.get(srv.url("/amd64/")).send().unwrap().text().unwrap();
    for want in ["dbh-test/pkg00000", "1.0", "[dbh-amd64]", "key.asc", "trust.sh"] {
        assert!(page.contains(want), "`{want}` missing from the target page:\n{page}");
    }
    let r = c.get(srv.url("/amd64")).send().unwrap();
    assert_eq!(r.url().path(), "/amd64/", "redirected to the slash form");

    // Access log: one line per request with peer, method, path, status and bytes.
    assert!(srv.wait_log(" GET /amd64/Packages.gz 304 0 ", Duration::from_secs(5)), "{}", srv.log());
    srv.wait_log("HEAD /amd64/dbh-test/hello/hello-1.0-2.gpkg.tar 200 0 ", Duration::from_secs(5));
    let line = srv.log().lines().find(|l| l.contains("HEAD /amd64/dbh-test/hello/hello-1.0-2.gpkg.tar 200 0 ")).map(str::to_owned);
    assert!(line.as_deref().is_some_and(|l| l.contains("127.0.0.1:")), "{}", srv.log());
}

/// Access lines keep tracing's layout (`TIME  INFO PEER METHOD TARGET STATUS BYTES DURATION`)
/// though serve writes their message itself, and a hostile target reaches the log escaped: no
/// control character, no raw newline that could forge a second line.
#[test]
fn access_lines_keep_their_layout_and_escape_the_target() {
    let tree = Tree::new();
    let srv = tree.serve(&[], &[]);
    let ok = client().get(srv.url("/amd64/dbh-test/hello/hello-1.0-1.gpkg.tar")).send().unwrap();
    assert_eq!(ok.status(), 200);
    // Control bytes in the request line: refused by the head parser, logged without the target.
    let send = |request: &[u8]| {
        let mut raw = TcpStream::connect(&srv.addr).unwrap();
        raw.write_all(request).unwrap();
        let mut reply = Vec::new();
        let _ = raw.read_to_end(&mut reply);
        String::from_utf8_lossy(&reply).into_owned()
    };
    let reply = send(b"GET /amd64/\x1b[31mred\x7fforged HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert!(reply.starts_with("HTTP/1.1 400 "), "{reply}");
    // Graphic characters that a log reader could misparse: escaped as Rust's escape_debug does.
    let reply = send(b"GET /amd64/a\\b\"c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert!(reply.starts_with("HTTP/1.1 "), "{reply}");
    assert!(srv.wait_log(r#"/amd64/a\\b\"c "#, Duration::from_secs(10)), "{}", srv.log());
    assert!(srv.wait_log(" - - 400 ", Duration::from_secs(10)), "{}", srv.log());
    let log = srv.log();
    let lines: Vec<&str> = log.lines().filter(|l| !l.contains(" serving ")).collect();
    assert_eq!(lines.len(), 3, "one line per request:\n{log}");
    for line in &lines {
        let (time, rest) = line.split_once("  INFO ").unwrap_or_else(|| panic!("no level: {line:?}"));
        assert!(time.len() >= 20 && time.ends_with('Z') && time.as_bytes()[10] == b'T', "RFC 3339 UTC time: {line:?}");
        assert!(!line.chars().any(|c| c.is_control()), "a control character reached the log: {line:?}");
        let f: Vec<&str> = rest.split(' ').collect();
        assert_eq!(f.len(), 6, "{line:?}");
        assert!(f[0].starts_with("127.0.0.1:") && f[5].ends_with("ms"), "{line:?}");
    }
    assert!(lines[0].contains(" GET /amd64/dbh-test/hello/hello-1.0-1.gpkg.tar 200 50000 "), "{}", lines[0]);
}

#[test]
fn traversal_attempts_never_leave_dir() {
    let tree = Tree::new();
    let srv = tree.serve(&[], &[]);
    assert_traversals_refused(&tree, &srv);
}

/// Under a seccomp filter that answers openat2 with EPERM (what container runtimes and systemd's
/// SystemCallFilter= do for syscalls they do not know), serve falls back to canonicalize +
/// O_NOFOLLOW: it still serves files and still refuses every traversal.
#[test]
fn traversal_refused_and_files_served_when_seccomp_denies_openat2() {
    use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};
    use std::os::unix::process::CommandExt;
    let arch = TargetArch::try_from(std::env::consts::ARCH).expect("seccompiler knows this architecture");
    let filter = SeccompFilter::new(
        [(libc::SYS_openat2, vec![])].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .unwrap();
    let program: BpfProgram = filter.try_into().unwrap();
    let tree = Tree::new();
    let srv = Serve::start_with(&tree.home(), Some(&tree.dir()), &[], &[("RUST_LOG", "dbh=info")], move |cmd| {
        // SAFETY: apply_filter only calls prctl/seccomp on the already compiled program.
        unsafe {
            cmd.pre_exec(move || seccompiler::apply_filter(&program).map_err(|e| std::io::Error::other(e.to_string())));
        }
    });
    let log = srv.log.lock().unwrap().clone();
    assert!(log.contains("openat2 is not available"), "serve did not notice the filter:\n{log}");
    // Serve's log lines carry an RFC 3339 UTC timestamp (OpenRC's log file adds none).
    let line = log.lines().find(|l| l.contains("on http://")).unwrap();
    let stamp = line.split_whitespace().next().unwrap();
    assert!(stamp.len() >= 20 && stamp.ends_with('Z') && stamp[..4].bytes().all(|b| b.is_ascii_digit()) && &stamp[10..11] == "T", "{line}");
    assert_eq!(get(&srv.addr, BIN).body, tree.big);
    assert_traversals_refused(&tree, &srv);
}

fn assert_traversals_refused(tree: &Tree, srv: &Serve) {
    let attempts = [
        "/../secret",
        "/amd64/../../secret",
        "/amd64/%2e%2e/%2e%2e/secret",
        "/amd64/%2E%2E/%2E%2E/secret",
        "/amd64/.%2e/.%2e/secret",
        "/amd64%2f..%2f..%2fsecret",
        "/amd64/..%2f..%2fsecret",
        "/amd64/..%5c..%5csecret",
        "/amd64/..\\..\\secret",
        "/amd64/leak-rel",
        "/amd64/leak-abs",
        "/amd64/etc/passwd",
        "/amd64/%00/../../secret",
        "/amd64/Packages%00",
        "//secret",
        "/amd64//../../secret",
        "/secret-in-root",
        "/amd64/.hidden",
        "/amd64/%2ehidden",
        "/amd64/.Packages.partial-index",
        "/amd64/Packages.partial",
        "/amd64/Packages.tmp",
        "/amd64/./../../secret",
        "http://evil/../secret",
        "secret",
        "/amd64/dbh-test/hello/",
        "/amd64/dbh-test",
    ];
    for path in attempts {
        let r = raw(&srv.addr, format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes());
        assert!(r.status == 400 || r.status == 404, "{path} → {}", r.status);
        assert!(!String::from_utf8_lossy(&r.body).contains(SECRET), "{path} leaked the secret");
    }
    // Absolute paths as raw request lines with a NUL byte and a tab in them.
    for req in [&b"GET /amd64/\0/x HTTP/1.1\r\nHost: x\r\n\r\n"[..], b"GET /etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n", b"GET \t/x HTTP/1.1\r\nHost: x\r\n\r\n"] {
        let r = raw(&srv.addr, req);
        assert!(r.status == 400 || r.status == 404, "{:?} → {}", String::from_utf8_lossy(req), r.status);
    }
    // A symlink that stays inside DIR is fine.
    assert_eq!(get(&srv.addr, "/amd64/inside").body, tree.small);
}

#[test]
fn thousand_concurrent_connections() {
    let tree = Tree::new();
    let srv = tree.serve(&[], &[]);
    let index = std::fs::read(tree.dir().join("amd64/Packages")).unwrap();
    // All 1000 connected and all 1000 requests sent before any answer is read.
    let mut conns: Vec<TcpStream> = (0..1000).map(|_| TcpStream::connect(&srv.addr).unwrap()).collect();
    for s in &mut conns {
        s.write_all(format!("GET /amd64/Packages HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", srv.addr).as_bytes()).unwrap();
    }
    let mut ok = 0;
    for mut s in conns {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        let r = parse_responses(&out).remove(0);
        assert_eq!(r.status, 200);
        assert_eq!(r.body, index);
        ok += 1;
    }
    assert_eq!(ok, 1000);
}

#[test]
fn slow_clients_are_dropped_while_others_are_served() {
    let tree = Tree::new();
    let srv = tree.serve(&[], &[("DBH_SERVE_HEADER_TIMEOUT", "2")]);
    // Twenty clients that start a request and stall mid-header.
    let mut slow: Vec<TcpStream> = (0..20)
        .map(|_| {
            let mut s = TcpStream::connect(&srv.addr).unwrap();
            s.write_all(b"GET /amd64/Packages HTTP/1.1\r\nHo").unwrap();
            s
        })
        .collect();
    // One that connects and says nothing.
    let idle = TcpStream::connect(&srv.addr).unwrap();
    let started = Instant::now();
    // Everyone else is served meanwhile, promptly.
    for _ in 0..20 {
        let t = Instant::now();
        let r = get(&srv.addr, BIN);
        assert_eq!(r.status, 200);
        assert_eq!(r.body.len(), tree.big.len());
        assert!(t.elapsed() < Duration::from_secs(2), "a normal request took {:?} next to slow clients", t.elapsed());
    }
    // The stalled ones are answered 408 and dropped after the header timeout, not before.
    for s in slow.iter_mut().chain(std::iter::once(&mut idle.try_clone().unwrap())) {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).expect("server closes the connection within its timeout");
        if !out.is_empty() {
            assert!(out.starts_with(b"HTTP/1.1 408"), "{}", String::from_utf8_lossy(&out));
        }
    }
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(1500) && waited < Duration::from_secs(8), "dropped after {waited:?}");
    // The log arrives through a pipe: give the reader thread a moment.
    assert!(srv.wait_log(" - - 408 ", Duration::from_secs(5)), "{}", srv.log());
    // Still serving.
    assert_eq!(get(&srv.addr, "/amd64/Packages").status, 200);
}

#[test]
fn index_rewrites_never_tear_reads() {
    let tree = Tree::new();
    let srv = tree.serve(&[], &[]);
    let t = tree.dir().join("amd64");
    // ~1 MB index so that downloads overlap with renames.
    let text = index_text(1, 4000);
    replace_file(&t.join("Packages"), text.as_bytes(), TS + 1);
    replace_file(&t.join("Packages.gz"), &gzip(text.as_bytes()), TS + 1);
    let done = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let small_sum = sha256(&tree.small);
    let big_sum = sha256(&tree.big);
    let readers: Vec<_> = (0..64)
        .map(|i| {
            let (done, reads, failures) = (done.clone(), reads.clone(), failures.clone());
            let base = srv.url("/amd64/");
            let (small_sum, big_sum) = (small_sum.clone(), big_sum.clone());
            std::thread::spawn(move || {
                let c = client();
                let mut n = i;
                while !done.load(Ordering::Relaxed) {
                    n += 1;
                    let what = ["Packages", "Packages.gz", "dbh-test/hello/hello-1.0-1.gpkg.tar", "dbh-test/hello/hello-1.0-2.gpkg.tar"][n % 4];
                    let result = (|| -> Result<(), String> {
                        let r = c.get(format!("{base}{what}")).send().map_err(|e| format!("{what}: {e}"))?;
                        if r.status() != 200 {
                            return Err(format!("{what}: status {}", r.status()));
                        }
                        let lm = r.headers().get("last-modified").map(|v| v.to_str().unwrap().to_string());
                        let body = r.bytes().map_err(|e| format!("{what}: {e}"))?;
                        match what {
                            "Packages" | "Packages.gz" => {
                                let plain = if what == "Packages.gz" {
                                    gunzip(&body).map_err(|e| format!("{what}: torn gzip: {e}"))?
                                } else {
                                    body.to_vec()
                                };
                                let ts = verify_index(&plain).map_err(|e| format!("{what}: {e}"))?;
                                if lm.as_deref() != Some(http_date(ts).as_str()) {
                                    return Err(format!("{what}: Last-Modified {lm:?} does not match TIMESTAMP {ts} of the body"));
                                }
                            }
                            p if p.ends_with("-1.gpkg.tar") && sha256(&body) != small_sum => return Err(format!("{what}: corrupt")),
                            p if p.ends_with("-2.gpkg.tar") && sha256(&body) != big_sum => return Err(format!("{what}: corrupt")),
                            _ => {}
                        }
                        Ok(())
                    })();
                    reads.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = result {
                        failures.lock().unwrap().push(e);
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    for generation in 2..102u64 {
        let text = index_text(generation, 3000 + (generation as usize % 7) * 300);
        replace_file(&t.join("Packages"), text.as_bytes(), TS + generation);
        replace_file(&t.join("Packages.gz"), &gzip(text.as_bytes()), TS + generation);
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    done.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().unwrap();
    }
    let failures = failures.lock().unwrap();
    let reads = reads.load(Ordering::Relaxed);
    assert!(failures.is_empty(), "{} of {reads} reads failed, e.g. {:?}", failures.len(), &failures[..failures.len().min(5)]);
    assert!(reads >= 256, "only {reads} reads happened during 100 rewrites");
    // The last generation is what is served now.
    assert_eq!(verify_index(&get(&srv.addr, "/amd64/Packages").body), Ok(TS + 101));
}

#[test]
fn listens_on_several_addresses_including_ipv6_and_shuts_down_gracefully() {
    let tree = Tree::new();
    let mut srv = tree.serve(&["--listen", "127.0.0.1:0", "--listen", "[::1]:0"], &[]);
    let v6 = srv
        .log()
        .lines()
        .find_map(|l| l.split("on http://[::1]:").nth(1).map(|p| p.trim_end_matches('/').to_string()))
        .expect("an IPv6 listener");
    let r = get(&format!("[::1]:{v6}"), "/amd64/Packages");
    assert_eq!(r.status, 200);

    // A download in flight when SIGTERM arrives still completes; new connections are refused.
    let mut s = TcpStream::connect(&srv.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(format!("GET {BIN} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).unwrap();
    let mut first = vec![0u8; 4096];
    let n = s.read(&mut first).unwrap();
    first.truncate(n);
    srv.terminate();
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(&srv.addr).is_ok() {
        assert!(Instant::now() < deadline, "still accepting connections after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    first.extend_from_slice(&rest);
    let r = parse_responses(&first).remove(0);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), Some("keep-alive"));
    assert_eq!(r.body.len(), tree.big.len(), "in-flight download cut short by shutdown");
    assert_eq!(r.body, tree.big);
    assert!(srv.stop().success());
}

/// Headless Chromium renders both pages; the screenshots land in target/test-output/serve/.
#[test]
fn pages_render_in_headless_chromium() {
    let tree = Tree::new();
    let t = tree.dir().join("amd64");
    let mut text = String::from("PACKAGES: 2\nTIMESTAMP: 1795533596\nVERSION: 0\n\n");
    text.push_str("BUILD_ID: 1\nBUILD_TIME: 1795533590\nCPV: dbh-test/hello-1.0\nPATH: dbh-test/hello/hello-1.0-1.gpkg.tar\nSIZE: 50000\n\n");
    text.push_str("BUILD_ID: 2\nBUILD_TIME: 1795533595\nCPV: dbh-test/hello-1.0\nPATH: dbh-test/hello/hello-1.0-2.gpkg.tar\nSIZE: 3145728\n\n");
    replace_file(&t.join("Packages"), text.as_bytes(), TS);
    crate::publish::dbh_ok(&tree.home(), &["key", "generate", "--uid", "dbh test binhost <test@dbh.invalid>"]);
    let fpr = crate::publish::fingerprint(&tree.home());
    let srv = tree.serve(&[], &[]);
    assert!(get(&srv.addr, "/amd64/").body.windows(fpr.len()).any(|w| w == fpr.as_bytes()), "the page names the key");
    let out = crate::portage::output_dir("serve");
    let chromium = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|c| Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success()))
        .expect("headless Chromium is needed for this test: apt-get install chromium");
    for (name, path) in [("root.png", "/"), ("target.png", "/amd64/")] {
        let shot = out.join(name);
        let profile = tempfile::tempdir().unwrap();
        let o = Command::new(chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
                "--hide-scrollbars",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(format!("--screenshot={}", shot.display()))
            .arg("--window-size=1200,900")
            .arg(srv.url(path))
            .output()
            .unwrap();
        let png = std::fs::read(&shot).unwrap_or_else(|_| panic!("no screenshot {}: {}", shot.display(), String::from_utf8_lossy(&o.stderr)));
        assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "{} looks empty ({} bytes)", shot.display(), png.len());
        assert!(srv.wait_log(&format!("GET {path} 200 "), Duration::from_secs(5)), "Chromium never fetched {path}:\n{}", srv.log());
    }
}


/// Real Portage installs from `dbh serve` with signature verification on: the key and packages
/// come from `dbh key generate` + `dbh binhost add` into `$DBH_HOME/binhost` (served by default,
/// no --dir), the client takes binrepos.conf and key.asc from the server itself, and its second
/// run revalidates the index with If-Modified-Since and gets 304.
#[test]
fn real_portage_installs_signed_packages_from_dbh_serve() {
    use crate::portage::{Prefix, PrefixOptions};
    let (home, fpr) = crate::publish::published_home();
    let out = crate::portage::output_dir("serve-portage");
    let srv = Serve::start(home.path(), None, &[], &[]);
    let c = client();
    let conf = c.get(srv.url("/amd64/binrepos.conf")).send().unwrap().text().unwrap();
    assert!(conf.contains(&format!("[dbh-amd64]\nsync-uri = http://{}/amd64/\n", srv.addr)), "{conf}");
    assert!(conf.contains("verify-signature = true\n") && conf.contains(&fpr), "{conf}");
    let key = c.get(srv.url("/amd64/key.asc")).send().unwrap();
    assert_eq!(key.status(), 200);
    let key = key.bytes().unwrap();
    assert_eq!(key.as_ref(), std::fs::read(home.path().join("keys/public.asc")).unwrap().as_slice());
    let page = c.get(srv.url("/amd64/")).send().unwrap().text().unwrap();
    assert!(page.contains(&fpr) && page.contains("dbh-test/greeter"), "{page}");

    let tmp = tempfile::tempdir().unwrap();
    let cl = Prefix::new(&tmp.path().join("cl"), PrefixOptions::default());
    cl.add_binrepo("dbh-amd64", &conf);
    cl.trust_key(&key, &fpr);
    let log = cl.ok("emerge", &["--getbinpkgonly", "dbh-test/greeter"], &[]);
    std::fs::write(out.join("client-1.log"), &log).unwrap();
    assert!(!log.contains("verification failed"), "{log}");
    let hello = Command::new(cl.root.join("usr/bin/hello")).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&hello.stdout), "hello from dbh-test\n");
    srv.wait_log(" GET /amd64/dbh-test/greeter/greeter-1.0-1.gpkg.tar 200 ", Duration::from_secs(5));
    let access = srv.log();
    assert!(access.contains(" GET /amd64/Packages.gz 200 "), "{access}");
    assert!(access.contains(" GET /amd64/dbh-test/hello/hello-1.0-1.gpkg.tar 200 "), "{access}");

    let before = srv.log().len();
    let log = cl.ok("emerge", &["--getbinpkgonly", "--noreplace", "dbh-test/greeter"], &[]);
    std::fs::write(out.join("client-2.log"), &log).unwrap();
    srv.wait_log(" GET /amd64/Packages.gz 304 0 ", Duration::from_secs(5));
    std::fs::write(out.join("access.log"), srv.log()).unwrap();
    let second = srv.log()[before..].to_string();
    assert!(second.contains(" GET /amd64/Packages.gz 304 0 "), "second run did not revalidate with 304:\n{second}");
    assert!(log.contains("Local copy of remote index is up-to-date"), "{log}");
}

#[test]
fn header_size_and_connection_caps() {
    let tree = Tree::new();
    let srv = tree.serve(&[], &[("DBH_SERVE_MAX_CONNECTIONS", "2")]);
    // A head over 16 KiB: 431, connection closed.
    let big = format!("GET /amd64/Packages HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n", "a".repeat(20_000));
    let mut s = TcpStream::connect(&srv.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(big.as_bytes());
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    assert!(out.starts_with(b"HTTP/1.1 431 "), "{}", String::from_utf8_lossy(&out[..out.len().min(200)]));

    // Two connections hold both slots; a third waits in the backlog until one is released.
    let a = TcpStream::connect(&srv.addr).unwrap();
    let b = TcpStream::connect(&srv.addr).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut c = TcpStream::connect(&srv.addr).unwrap();
    c.write_all(format!("GET /amd64/Packages HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", srv.addr).as_bytes()).unwrap();
    c.set_read_timeout(Some(Duration::from_millis(700))).unwrap();
    let mut buf = [0u8; 64];
    assert!(c.read(&mut buf).is_err(), "a third connection was served while two held the cap of 2");
    drop(a);
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut out = Vec::new();
    c.read_to_end(&mut out).unwrap();
    assert_eq!(parse_responses(&out).remove(0).status, 200);
    drop(b);
}

/// The open-file cache (src/serve/cache.rs): a cached file replaced by rename is served fresh
/// with a head describing the new bytes, a deleted one is 404, a FIFO or directory in its place
/// is refused as before, and serving more distinct files than the cache holds keeps the server's
/// descriptors bounded.
#[test]
fn open_file_cache_follows_renames_deletions_and_stays_bounded() {
    let tree = Tree::new();
    let srv = tree.serve(&[], &[]);
    let t = tree.dir().join("amd64");
    let path = "/amd64/dbh-test/hello/hello-1.0-1.gpkg.tar";
    let file = t.join("dbh-test/hello/hello-1.0-1.gpkg.tar");
    let first = get(&srv.addr, path);
    assert_eq!(first.body, tree.small);
    assert_eq!(get(&srv.addr, path).header("etag"), first.header("etag"), "a repeat is the same file");
    for generation in 0..20u64 {
        let data = pattern(1000 + generation as usize * 37, 100 + generation);
        replace_file(&file, &data, TS + generation);
        let r = get(&srv.addr, path);
        assert_eq!(r.status, 200);
        assert_eq!(r.body, data, "generation {generation}: the renamed-in file at once");
        assert_eq!(r.header("content-length"), Some(data.len().to_string().as_str()));
        assert_eq!(r.header("last-modified"), Some(http_date(TS + generation).as_str()));
        assert_ne!(r.header("etag"), first.header("etag"));
        // The validators of that response name it: a conditional request with them is a 304.
        let etag = r.header("etag").unwrap().to_string();
        let again = raw(&srv.addr, format!("GET {path} HTTP/1.1\r\nHost: x\r\nIf-None-Match: {etag}\r\nConnection: close\r\n\r\n").as_bytes());
        assert_eq!(again.status, 304, "generation {generation}");
    }
    // The index too: the new TIMESTAMP as Last-Modified right after the rename.
    for generation in 1..5u64 {
        let text = index_text(generation, 10);
        replace_file(&t.join("Packages"), text.as_bytes(), TS + generation);
        replace_file(&t.join("Packages.gz"), &gzip(text.as_bytes()), TS + generation);
        for name in ["/amd64/Packages", "/amd64/Packages.gz"] {
            let r = get(&srv.addr, name);
            assert_eq!(r.header("last-modified"), Some(http_date(TS + generation).as_str()), "{name}");
        }
        assert_eq!(verify_index(&get(&srv.addr, "/amd64/Packages").body), Ok(TS + generation));
    }
    std::fs::remove_file(&file).unwrap();
    assert_eq!(get(&srv.addr, path).status, 404, "deleted");
    std::fs::write(&file, b"back").unwrap();
    assert_eq!(get(&srv.addr, path).body, b"back");
    std::fs::remove_file(&file).unwrap();
    nix::unistd::mkfifo(&file, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    assert_eq!(get(&srv.addr, path).status, 404, "FIFO");
    std::fs::remove_file(&file).unwrap();
    std::fs::create_dir(&file).unwrap();
    assert_eq!(get(&srv.addr, path).status, 404, "directory");

    let fds = || std::fs::read_dir(format!("/proc/{}/fd", srv.pid())).unwrap().count();
    let before = fds();
    std::fs::create_dir_all(t.join("many")).unwrap();
    let n = 600;
    for i in 0..n {
        std::fs::write(t.join(format!("many/f{i}.gpkg.tar")), format!("file {i}")).unwrap();
    }
    for round in 0..2 {
        for i in 0..n {
            let r = get(&srv.addr, &format!("/amd64/many/f{i}.gpkg.tar"));
            assert_eq!(r.body, format!("file {i}").as_bytes(), "round {round}");
        }
    }
    // The cache holds at most 256 descriptors (cache::DEFAULT_CAPACITY); a little slack for
    // connections still closing.
    let after = fds();
    assert!(after <= before + 256 + 8, "{after} descriptors after serving {n} files, {before} before");
    assert!(srv.log().contains("GET /amd64/many/f599.gpkg.tar 200"));
}
