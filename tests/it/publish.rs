//! The publishing path end to end through the CLI: `dbh key generate`, `dbh binhost add` (verify,
//! sign, BUILD_ID, place, index), `dbh binhost conf`; then a real Portage client with
//! `verify-signature = true` installs from the binhost over HTTP, and refuses tampered packages.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::cli::dbh;
use crate::portage::{built_pkgdir, combined, Prefix, PrefixOptions};

/// A throw-away static HTTP server (`python3 -m http.server`) over a directory; killed on drop.
pub struct StaticServer {
    child: Child,
    pub port: u16,
}

impl StaticServer {
    pub fn start(dir: &Path) -> StaticServer {
        let port = free_port();
        let child = Command::new("python3")
            .args(["-m", "http.server", "--bind", "127.0.0.1"])
            .arg(port.to_string())
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "python3 -m http.server did not listen within 10 s");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        StaticServer { child, port }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for StaticServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Runs dbh with a home dir; panics with its output on failure.
pub fn dbh_ok(home: &Path, args: &[&str]) -> String {
    let out = dbh().arg("--home").arg(home).args(args).output().unwrap();
    assert!(out.status.success(), "dbh {} failed:\n{}", args.join(" "), combined(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A home with a signing key and the fixture packages published (signed) for `amd64`.
pub fn published_home() -> (tempfile::TempDir, String) {
    let home = tempfile::Builder::new().prefix("dbh-home-").tempdir().unwrap();
    dbh_ok(home.path(), &["key", "generate", "--uid", "dbh test binhost <test@dbh.invalid>"]);
    let src = built_pkgdir();
    let files: Vec<PathBuf> = ["dbh-test/hello/hello-1.0-1.gpkg.tar", "dbh-test/greeter/greeter-1.0-1.gpkg.tar"]
        .iter()
        .map(|f| src.join(f))
        .collect();
    let mut args = vec!["binhost", "add", "--target", "amd64"];
    args.extend(files.iter().map(|f| f.to_str().unwrap()));
    dbh_ok(home.path(), &args);
    let fpr = fingerprint(home.path());
    (home, fpr)
}

/// The key's fingerprint, read from the exported key the way a user would (gpg --show-keys).
pub fn fingerprint(home: &Path) -> String {
    let armored = dbh_ok(home, &["key", "export"]);
    let mut child = Command::new("gpg")
        .args(["--batch", "--with-colons", "--show-keys"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(armored.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("fpr:").map(|r| r.trim_matches(':').to_string()))
        .expect("exported key has a fingerprint")
}

/// A client prefix configured as `dbh binhost conf` says, trusting the exported key.
fn client(dir: &Path, home: &Path, base_url: &str, fpr: &str) -> Prefix {
    let cl = Prefix::new(dir, PrefixOptions::default());
    let conf = dbh_ok(home, &["binhost", "conf", "--target", "amd64", "--url", base_url]);
    assert!(conf.contains("verify-signature = true"), "{conf}");
    assert!(conf.contains(fpr), "conf must name the key's fingerprint:\n{conf}");
    cl.add_binrepo("dbh", &conf);
    let key = dbh_ok(home, &["key", "export"]);
    cl.trust_key(key.as_bytes(), fpr);
    cl
}

#[test]
fn signed_binhost_installs_with_verify_signature_on() {
    let (home, fpr) = published_home();
    let binhost = home.path().join("binhost");
    assert!(binhost.join("amd64/Packages").is_file());
    let server = StaticServer::start(&binhost);
    let tmp = tempfile::tempdir().unwrap();
    let cl = client(&tmp.path().join("cl"), home.path(), &server.url(), &fpr);
    let out = cl.ok("emerge", &["--getbinpkgonly", "dbh-test/greeter"], &[]);
    assert!(!out.contains("verification failed"), "{out}");
    let hello = cl.root.join("usr/bin/hello");
    let run = Command::new(&hello).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&run.stdout), "hello from dbh-test\n");
    // The vdb records the binpkg the client verified.
    assert!(cl.root.join("var/db/pkg/dbh-test/greeter-1.0").is_dir());
}

/// Flips one byte of a member's data in a GPKG (same size), then fixes the index's digests so
/// that only the signature check can catch it.
fn tamper(binhost: &Path, rel: &str, member_suffix: &str, pick: impl Fn(&[u8]) -> usize) {
    let path = binhost.join(rel);
    let mut bytes = std::fs::read(&path).unwrap();
    let (offset, len) = {
        let mut ar = tar::Archive::new(std::io::Cursor::new(bytes.clone()));
        let e = ar
            .entries()
            .unwrap()
            .map(|e| e.unwrap())
            .find(|e| e.path().unwrap().to_string_lossy().ends_with(member_suffix))
            .unwrap_or_else(|| panic!("{rel} has no member ending {member_suffix}"));
        (e.raw_file_position() as usize, e.size() as usize)
    };
    let at = offset + pick(&bytes[offset..offset + len]);
    bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
    std::fs::write(&path, &bytes).unwrap();
    // Keep SIZE/MD5/SHA1 in the index right, so the client gets as far as verifying signatures.
    use md5::Digest as _;
    let md5 = hex::encode(md5::Md5::digest(&bytes));
    let sha1 = hex::encode(sha1::Sha1::digest(&bytes));
    let index_path = binhost.join("Packages");
    let index = std::fs::read_to_string(&index_path).unwrap();
    let mut out = Vec::new();
    for stanza in index.split("\n\n") {
        if stanza.lines().any(|l| l == format!("PATH: {rel}")) {
            out.push(
                stanza
                    .lines()
                    .map(|l| {
                        if l.starts_with("MD5: ") {
                            format!("MD5: {md5}")
                        } else if l.starts_with("SHA1: ") {
                            format!("SHA1: {sha1}")
                        } else if l.starts_with("MTIME: ") {
                            format!("MTIME: {}", std::fs::metadata(&path).unwrap().modified().unwrap().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs())
                        } else {
                            l.to_string()
                        }
                    })
                    .collect::<Vec<_>>()
                    .join("\n"),
            );
        } else {
            out.push(stanza.to_string());
        }
    }
    let text = out.join("\n\n");
    std::fs::write(&index_path, &text).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(text.as_bytes()).unwrap();
    std::fs::write(binhost.join("Packages.gz"), gz.finish().unwrap()).unwrap();
}

fn assert_refused(case: &str, member_suffix: &str, pick: impl Fn(&[u8]) -> usize) {
    let (home, fpr) = published_home();
    let binhost = home.path().join("binhost");
    let rel = "dbh-test/hello/hello-1.0-1.gpkg.tar";
    assert!(binhost.join("amd64").join(rel).is_file(), "add must place amd64/{rel}");
    tamper(&binhost.join("amd64"), rel, member_suffix, pick);
    let server = StaticServer::start(&binhost);
    let tmp = tempfile::tempdir().unwrap();
    let cl = client(&tmp.path().join("cl"), home.path(), &server.url(), &fpr);
    let out = cl.run("emerge", &["--getbinpkgonly", "dbh-test/hello"], &[]);
    let text = combined(&out);
    assert!(!out.status.success(), "{case}: a tampered package was installed:\n{text}");
    // The download and its SIZE/MD5/SHA1 check pass (the index was fixed up); what refuses the
    // package is the GnuPG verification while extracting. With a broken armor gpg may quit before
    // Portage has written all data to it, which Portage reports as its verifier dying (SIGPIPE)
    // instead of "verification failed": both are a refusal at the verification step.
    assert!(text.contains("MD5 SHA1 size ;-)"), "{case}: the digests in the index should have matched:\n{text}");
    assert!(
        text.contains("verification failed") || text.contains("Error extracting"),
        "{case}: not refused while verifying:\n{text}"
    );
    assert!(!cl.root.join("usr/bin/hello").exists(), "{case}: hello was installed");
}

#[test]
fn client_refuses_a_tampered_signature() {
    // A character in the middle of the armored detached signature of the image.
    assert_refused("signature", "image.tar.zst.sig", |data| {
        let text = String::from_utf8_lossy(data);
        let start = text.find("\n\n").expect("armor header ends with a blank line") + 2;
        start + 10
    });
}

#[test]
fn client_refuses_a_tampered_manifest() {
    // A hex digit of a DATA line inside the clear-signed Manifest.
    assert_refused("manifest", "/Manifest", |data| {
        let text = String::from_utf8_lossy(data);
        text.find("DATA ").expect("Manifest has DATA lines") + text[text.find("DATA ").unwrap()..].find(" SHA512 ").unwrap() + 10
    });
}
