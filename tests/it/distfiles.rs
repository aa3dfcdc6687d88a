//! One `$DBH_HOME/distfiles` for every backend (issue 12, deliverable 3), with real programs: a
//! package whose `SRC_URI` points at a local HTTP mirror (a thread of this test, reached by the
//! arm64 TCG guest as QEMU user-net's gateway 10.0.2.2) is built from source twice in throw-away
//! guests and once more by the cross backend on the host, and the mirror is hit exactly once: the
//! first guest downloads it and dbh keeps it, the second gets it from the build's own server (the
//! guest's Portage `local` mirror), the cross build finds it in its DISTDIR. A RESTRICT="fetch"
//! file placed in `$DBH_HOME/distfiles` by hand reaches the guest as it would through DISTDIR, and
//! every download passed Portage's Manifest check (BLAKE2B and SHA512).

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::TcpListener;
use std::path::Path;
use std::sync::{Arc, Mutex};

use blake2::Digest as _;

use super::portage::combined;
use super::vm::{assert_no_qemu, product_home};
use super::vm_build::{run, stdout};

/// A plain HTTP/1.0 server of `files` on 127.0.0.1 that records every request line.
struct Mirror {
    port: u16,
    requests: Arc<Mutex<Vec<String>>>,
}

impl Mirror {
    fn start(files: Vec<(String, Vec<u8>)>) -> Mirror {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let log = requests.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                // The rest of the head.
                let mut h = String::new();
                while reader.read_line(&mut h).is_ok_and(|n| n > 2) {
                    h.clear();
                }
                log.lock().unwrap().push(line.trim().to_owned());
                let path = line.split_whitespace().nth(1).unwrap_or("");
                match files.iter().find(|(name, _)| path == format!("/{name}")) {
                    Some((_, body)) => {
                        let _ = write!(conn, "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
                        let _ = conn.write_all(body);
                    }
                    None => {
                        let _ = conn.write_all(b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                    }
                }
            }
        });
        Mirror { port, requests }
    }

    fn hits(&self, name: &str) -> usize {
        self.requests.lock().unwrap().iter().filter(|r| r.contains(&format!("/{name} "))).count()
    }
}

/// An uncompressed tarball holding `<dir>/<file>` (a shell script).
fn tarball(dir: &str, file: &str) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let body = format!("#!/bin/sh\necho {file}\n");
    let mut h = tar::Header::new_gnu();
    h.set_size(body.len() as u64);
    h.set_mode(0o755);
    h.set_mtime(0);
    h.set_cksum();
    b.append_data(&mut h, format!("{dir}/{file}"), body.as_bytes()).unwrap();
    b.into_inner().unwrap()
}

/// A Manifest `DIST` line as `repoman`/`pkgdev manifest` write it.
fn dist_line(name: &str, data: &[u8]) -> String {
    let b2 = hex::encode(blake2::Blake2b512::digest(data));
    let sha = hex::encode(sha2::Sha512::digest(data));
    format!("DIST {name} {} BLAKE2B {b2} SHA512 {sha}\n", data.len())
}

/// A git checkout of the fixture repository with two packages that need distfiles: `fetched`
/// (from `SRC_URI`) and `restricted` (RESTRICT="fetch": only from the user's DISTDIR).
fn repo_with_sources(dir: &Path, port: u16, fetched: &[u8], restricted: &[u8]) -> std::path::PathBuf {
    let (repo, _) = super::vm_build::git_repo(dir);
    for (pn, uri, restrict, data) in [
        ("fetched", format!("http://10.0.2.2:{port}/fetched-1.0.tar"), "", fetched),
        ("restricted", "restricted-1.0.tar".to_owned(), "RESTRICT=\"fetch\"\n", restricted),
    ] {
        let d = repo.join("dbh-test").join(pn);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join(format!("{pn}-1.0.ebuild")),
            format!(
                "EAPI=8\nDESCRIPTION=\"needs the distfile {pn}-1.0.tar\"\nHOMEPAGE=\"https://example.invalid\"\nSRC_URI=\"{uri}\"\n{restrict}\
                 LICENSE=\"MIT\"\nSLOT=\"0\"\nKEYWORDS=\"amd64 arm64\"\nsrc_install() {{ dobin {pn}; }}\n"
            ),
        )
        .unwrap();
        std::fs::write(d.join("Manifest"), dist_line(&format!("{pn}-1.0.tar"), data)).unwrap();
    }
    // Committed, so the snapshot's revision is a clean commit.
    for args in [&["add", "-A"][..], &["commit", "-q", "-m", "packages with distfiles"]] {
        let out = std::process::Command::new("git")
            .arg("-C")
            .arg(&repo)
            .args(["-c", "user.name=dbh test", "-c", "user.email=test@dbh.invalid"])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "git {args:?}: {}", combined(&out));
    }
    repo
}

fn build(home: &Path, command: &[&str], repo: &Path, rest: &[&str]) -> std::process::Output {
    let mut args = command.to_vec();
    args.extend(["--target", "arm64", "--repo", repo.to_str().unwrap(), "--profile", "dbh-test:dbh/arm64"]);
    args.extend_from_slice(rest);
    let out = run(home, &args);
    eprintln!("dbh {args:?}: {}\n{}", out.status, combined(&out));
    out
}

#[test]
fn a_distfile_is_downloaded_once_and_shared_by_every_backend() {
    if super::image::image_home("arm64").is_none() {
        return;
    }
    let fetched = tarball("fetched-1.0", "fetched");
    let restricted = tarball("restricted-1.0", "restricted");
    let mirror = Mirror::start(vec![("fetched-1.0.tar".into(), fetched.clone())]);
    let work = tempfile::tempdir().unwrap();
    let repo = repo_with_sources(work.path(), mirror.port, &fetched, &restricted);
    let home = product_home(None);
    let home = home.path();
    assert!(run(home, &["key", "generate"]).status.success());
    // The user puts a fetch-restricted file where Portage's DISTDIR would be.
    let distfiles = home.join("distfiles");
    std::fs::create_dir_all(&distfiles).unwrap();
    std::fs::write(distfiles.join("restricted-1.0.tar"), &restricted).unwrap();

    // 1. From source in a guest: the mirror is hit, dbh keeps the download.
    let out = build(home, &["vm", "build"], &repo, &["dbh-test/fetched", "dbh-test/restricted"]);
    let text = combined(&out);
    assert!(out.status.success(), "{text}");
    assert!(stdout(&out).contains("published dbh-test/fetched-1.0"), "{text}");
    assert!(stdout(&out).contains("published dbh-test/restricted-1.0"), "the fetch-restricted file came from $DBH_HOME/distfiles: {text}");
    assert_eq!(mirror.hits("fetched-1.0.tar"), 1, "{:?}", mirror.requests.lock().unwrap());
    assert!(text.contains("kept 1 new distfile(s)") && text.contains("fetched-1.0.tar"), "{text}");
    assert_eq!(std::fs::read(distfiles.join("fetched-1.0.tar")).unwrap(), fetched);
    assert!(std::fs::read_dir(&distfiles).unwrap().flatten().all(|e| !e.file_name().to_string_lossy().starts_with('.')), "no partial file left");
    assert_no_qemu(home);

    // 2. From source again in a fresh guest: it comes from the build's own server, not the mirror.
    let out = build(home, &["vm", "build"], &repo, &["dbh-test/fetched", "--", "--usepkg-exclude", "dbh-test/fetched"]);
    let text = combined(&out);
    assert!(out.status.success(), "{text}");
    assert!(stdout(&out).contains("published dbh-test/fetched-1.0 (BUILD_ID 2)"), "built from source again: {text}");
    assert_eq!(mirror.hits("fetched-1.0.tar"), 1, "{:?}", mirror.requests.lock().unwrap());
    let mut logs: Vec<_> = std::fs::read_dir(home.join("logs/arm64")).unwrap().flatten().map(|e| e.path()).collect();
    logs.sort();
    let access = std::fs::read_to_string(logs.last().unwrap().join("binhost-access.log")).unwrap();
    assert!(access.lines().any(|l| l.contains("GET /distfiles/fetched-1.0.tar ") && l.contains(" 200 ")), "{access}");
    assert!(!text.contains("new distfile"), "nothing new to keep: {text}");
    assert_no_qemu(home);

    // 3. The cross backend on the host uses the same file: no download at all.
    let out = build(home, &["cross", "build"], &repo, &["dbh-test/fetched", "--", "--usepkg-exclude", "dbh-test/fetched"]);
    let text = combined(&out);
    assert!(out.status.success(), "{text}");
    assert!(stdout(&out).contains("published dbh-test/fetched-1.0 (BUILD_ID 3)"), "{text}");
    assert_eq!(mirror.hits("fetched-1.0.tar"), 1, "{:?}", mirror.requests.lock().unwrap());
}
