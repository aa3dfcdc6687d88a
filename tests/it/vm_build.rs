//! `dbh vm build`: real builds in the arm64 test guest (TCG or KVM, the image made by
//! `dbh vm image create` from the Debian-based test stage with gcc and Portage), published into
//! the host binhost, served by `dbh serve` and installed by a real Portage client that verifies
//! signatures. Three guest boots in one test, in order, sharing one $DBH_HOME:
//! 1. `broken` + `hello`: exit status non-zero, broken's log kept and shown, hello published;
//! 2. `greeter`: hello is fetched from the host's binhost over HTTP (the build's access log shows
//!    exactly that one binpkg), signature verified; greeter is built; a client installs both and
//!    `hello` is an AArch64 ELF;
//! 3. no atom: the host's `world` file (greeter) is satisfied by the binhost — the host's Portage
//!    says so and no guest boots; 3b. with a repository only the guest has (so it boots) and
//!    hello replaced by an unsigned copy, the guest's Portage refuses it;
//! 4. Ctrl-C while emerge compiles: dbh exits promptly, non-zero, no QEMU left, the binhost is
//!    byte-for-byte as before and `dbh binhost check` passes;
//! 5. `--update` after bumping hello (and greeter's dependency on it): exactly those two are
//!    rebuilt, each with its reason; the rest keeps its BUILD_ID; a re-run does not boot.
//!
//! The repository is a git checkout (a copy of the fixture repository): its commit must show up
//! in the binhost header's REPO_REVISIONS, and the client must still install from that binhost.

use std::collections::BTreeMap;
use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use super::cli::dbh;
use super::portage::{Prefix, PrefixOptions, combined, copy_tree, fixture_repo};
use super::serve::Serve;
use super::vm::{assert_no_qemu, product_home};

/// `dbh --home HOME ARGS` isolated from the caller's settings.
fn command(home: &Path, args: &[&str]) -> std::process::Command {
    let mut cmd = dbh();
    cmd.arg("--home").arg(home).args(args).env("XDG_CONFIG_HOME", home);
    for (k, _) in std::env::vars() {
        if k.starts_with("DBH_") {
            cmd.env_remove(k);
        }
    }
    // The host's Portage decides before booting whether anything is to be built.
    cmd.env("DBH_PORTAGE_EMERGE", super::portage::portage().venv.join("bin/emerge"));
    cmd
}

pub fn run(home: &Path, args: &[&str]) -> Output {
    command(home, args).output().unwrap()
}

fn build_args<'a>(repo: &'a Path, atoms: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["vm", "build", "--target", "arm64", "--repo", repo.to_str().unwrap(), "--profile", "dbh-test:dbh/arm64"];
    args.extend_from_slice(atoms);
    args
}

fn build(home: &Path, repo: &Path, atoms: &[&str]) -> Output {
    let out = run(home, &build_args(repo, atoms));
    eprintln!("dbh vm build {atoms:?}: {}\n{}", out.status, combined(&out));
    out
}

/// A git checkout of the fixture repository under `dir`, and its commit.
pub fn git_repo(dir: &Path) -> (PathBuf, String) {
    let repo = dir.join("repo");
    copy_tree(&fixture_repo(), &repo);
    let git = |args: &[&str]| {
        let out = std::process::Command::new("git")
            .arg("-C")
            .arg(&repo)
            .args(["-c", "user.name=dbh test", "-c", "user.email=test@dbh.invalid"])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "git {args:?}: {}", combined(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    git(&["init", "-q"]);
    git(&["add", "-A"]);
    git(&["commit", "-q", "-m", "fixture"]);
    let head = git(&["rev-parse", "HEAD"]);
    (repo, head)
}

/// Every file under `dir` with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    walk(dir).into_iter().map(|p| (p.clone(), std::fs::read(&p).unwrap())).collect()
}

/// The newest build log directory's emerge.log.
fn last_emerge_log(home: &Path) -> String {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(home.join("logs/arm64")).unwrap().flatten().map(|e| e.path()).collect();
    dirs.sort();
    std::fs::read_to_string(dirs.last().unwrap().join("emerge.log")).unwrap()
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn vm_build_publishes_what_built_reports_failures_and_transfers_nothing_twice() {
    if super::image::image_home("arm64").is_none() {
        return;
    }
    let home = product_home(None);
    let home = home.path();
    let work = tempfile::tempdir().unwrap();
    let (repo, commit) = git_repo(work.path());
    let repo = repo.as_path();

    // Without a key nothing boots.
    let out = build(home, repo, &["dbh-test/hello"]);
    assert!(!out.status.success());
    let text = combined(&out);
    assert!(text.contains("dbh key generate"), "{text}");
    assert!(!home.join("images/arm64/run/state.json").exists());

    let key = run(home, &["key", "generate"]);
    assert!(key.status.success(), "{}", combined(&key));

    // 1. A failing package beside a good one.
    let out = build(home, repo, &["dbh-test/broken", "dbh-test/hello"]);
    let text = combined(&out);
    assert!(!out.status.success(), "a failed package must fail the command:\n{text}");
    assert!(text.contains("dbh-test/broken-1.0"), "{text}");
    assert!(text.contains("fails on purpose"), "the log tail is shown:\n{text}");
    let logs: Vec<_> = walk(&home.join("logs/arm64")).into_iter().filter(|p| p.ends_with("dbh-test:broken-1.0.log")).collect();
    assert_eq!(logs.len(), 1, "the broken package's log is kept");
    assert!(std::fs::read_to_string(&logs[0]).unwrap().contains("fails on purpose"));
    assert!(stdout(&out).contains("published dbh-test/hello-1.0 (BUILD_ID 1)"), "{text}");
    assert!(stdout(&out).contains("1 binpkg(s) transferred"), "{text}");
    assert_no_qemu(home);

    // 2. greeter: hello comes from the binhost over HTTP (dbh serves it to the guest on the
    // loopback for this build, signature verified), greeter is built and published.
    let out = build(home, repo, &["dbh-test/greeter"]);
    let text = combined(&out);
    assert!(out.status.success(), "{text}");
    assert!(stdout(&out).contains("published dbh-test/greeter-1.0 (BUILD_ID 1)"), "{text}");
    assert!(stdout(&out).contains("arm64: 1 binpkg(s) transferred"), "hello must come from the binhost:\n{text}");
    assert!(text.contains("built dbh-test/greeter-1.0: new package"), "the run says why greeter was built:\n{text}");
    let log = last_emerge_log(home);
    assert!(log.contains("--getbinpkg"), "{log}");
    assert!(log.contains(">>> Emerging binary (1 of 2) dbh-test/hello-1.0"), "{log}");
    let fetched = binpkg_requests(&last_log_dir(home).join("binhost-access.log"));
    assert_eq!(fetched.len(), 1, "the guest fetches exactly the one binpkg its graph needs: {fetched:?}");
    assert!(fetched[0].contains("/arm64/dbh-test/hello/hello-1.0-1.gpkg.tar 200"), "{fetched:?}");
    assert_no_qemu(home);
    let index = std::fs::read_to_string(home.join("binhost/arm64/Packages")).unwrap();
    assert!(index.contains("CHOST: aarch64-unknown-linux-gnu"), "{index}");
    assert!(index.contains("CPV: dbh-test/greeter-1.0") && index.contains("CPV: dbh-test/hello-1.0"), "{index}");
    let header = index.split("\n\n").next().unwrap();
    assert!(
        header.contains(&format!("\nREPO_REVISIONS: {{\"dbh-test\": \"{commit}\"}}\n")),
        "the header names the repository and its commit {commit}:\n{header}"
    );

    // A real Portage client installs from `dbh serve`, verifying signatures.
    let (_tmp, client) = install_from_serve(home, "arm64", "dbh-test/greeter");
    assert_elf_machine(&client.root.join("usr/bin/hello"), 183);
    assert!(client.root.join("usr/bin/greeter").is_file());

    // 3. No atom: the world file is the build. Everything is in the binhost: the host's Portage
    // says so before booting, and no guest starts.
    let config = home.join("targets/arm64/portage");
    std::fs::write(config.join("world"), "# what this binhost carries\ndbh-test/greeter\n").unwrap();
    let t0 = Instant::now();
    let out = build(home, repo, &[]);
    let text = combined(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("arm64: nothing to build, no guest booted"), "{text}");
    assert!(stdout(&out).contains("arm64: 0 binpkg(s) transferred, 0 published"), "{text}");
    assert!(t0.elapsed() < Duration::from_secs(60), "no boot: {:?}", t0.elapsed());
    assert!(!last_log_dir(home).join("emerge.log").exists(), "no emerge ran in a guest");

    // 3b. A repository only the guest has (the target's repos.conf) makes the guest decide; with
    // hello in the binhost tampered (an unsigned copy, index fixed up to match), the guest's
    // Portage refuses it and nothing is published.
    std::fs::write(config.join("repos.conf"), "[dbh-extra]\nlocation = /var/db/repos/dbh-extra\n").unwrap();
    let binhost = home.join("binhost/arm64");
    let untampered = snapshot(&binhost);
    let mtimes: BTreeMap<PathBuf, std::time::SystemTime> =
        untampered.keys().map(|p| (p.clone(), std::fs::metadata(p).unwrap().modified().unwrap())).collect();
    tamper_unsigned(&binhost, "dbh-test/hello-1.0");
    let out = build(home, repo, &[]);
    let text = combined(&out);
    assert!(!out.status.success(), "an unsigned binpkg from the binhost must be refused:\n{text}");
    let log = last_emerge_log(home);
    assert!(log.contains("/var/db/repos/dbh-extra"), "the guest's Portage read the host's repos.conf:\n{log}");
    assert!(log.contains(&format!("# repository dbh-test at {commit}")), "{log}");
    // Portage's own words, from the failed package's log that dbh shows.
    assert!(text.contains("GnuPG verification failed"), "Portage says why it refused the binpkg:\n{text}\n{log}");
    assert!(!stdout(&out).contains("published dbh-test/") && stdout(&out).contains(" 0 published, 1 failed"), "{text}");
    assert_no_qemu(home);
    // Put the binhost back as it was, mtimes included (the index records them).
    for (path, bytes) in &untampered {
        std::fs::write(path, bytes).unwrap();
        std::fs::File::options().write(true).open(path).unwrap().set_modified(mtimes[path]).unwrap();
    }
    std::fs::write(config.join("repos.conf"), "").unwrap();

    // 4. Ctrl-C while emerge runs in the guest.
    let before = snapshot(&binhost);
    interrupt_during_emerge(home, repo);
    assert_no_qemu(home);
    assert_eq!(snapshot(&binhost), before, "an interrupted build must leave the binhost as it was");
    let check = run(home, &["binhost", "check", binhost.to_str().unwrap()]);
    assert!(check.status.success(), "{}", combined(&check));

    // 5. --update after a repository update: hello 1.1, and greeter now needs it (its deps
    // changed). Both are rebuilt and say why; nothing else changes; a second --update has
    // nothing to do and does not boot.
    let ebuilds = repo.join("dbh-test");
    std::fs::rename(ebuilds.join("hello/hello-1.0.ebuild"), ebuilds.join("hello/hello-1.1.ebuild")).unwrap();
    let greeter = ebuilds.join("greeter/greeter-1.0.ebuild");
    let text = std::fs::read_to_string(&greeter).unwrap().replace("RDEPEND=\"dbh-test/hello\"", "RDEPEND=\">=dbh-test/hello-1.1\"");
    std::fs::write(&greeter, text).unwrap();
    let before = std::fs::read_to_string(binhost.join("Packages")).unwrap();
    let mut args = build_args(repo, &[]);
    args.push("--update");
    let out = run(home, &args);
    let text = combined(&out);
    eprintln!("dbh vm build --update: {}\n{text}", out.status);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("built dbh-test/hello-1.1: new version (the binhost has dbh-test/hello-1.0)"), "{text}");
    assert!(text.contains("built dbh-test/greeter-1.0: dependencies changed"), "{text}");
    assert!(stdout(&out).contains("published dbh-test/hello-1.1 (BUILD_ID 1)"), "{text}");
    assert!(stdout(&out).contains("published dbh-test/greeter-1.0 (BUILD_ID 2)"), "{text}");
    assert!(last_emerge_log(home).contains("--binpkg-changed-deps=y"), "{}", last_emerge_log(home));
    let after = std::fs::read_to_string(binhost.join("Packages")).unwrap();
    let stanza = |index: &str, build_id: &str, cpv: &str| {
        index.split("\n\n").any(|s| s.contains(&format!("CPV: {cpv}\n")) && s.contains(&format!("BUILD_ID: {build_id}\n")))
    };
    assert!(stanza(&before, "1", "dbh-test/hello-1.0") && stanza(&after, "1", "dbh-test/hello-1.0"), "{after}");
    assert!(stanza(&after, "1", "dbh-test/greeter-1.0"), "the old greeter keeps its BUILD_ID:\n{after}");
    let t0 = Instant::now();
    let out = run(home, &args);
    let text = combined(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("arm64: nothing to build, no guest booted"), "{text}");
    assert!(t0.elapsed() < Duration::from_secs(60), "{:?}", t0.elapsed());
    assert_no_qemu(home);
}

/// The newest build log directory.
pub fn last_log_dir(home: &Path) -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(home.join("logs/arm64")).unwrap().flatten().map(|e| e.path()).collect();
    dirs.sort();
    dirs.pop().unwrap()
}

/// The binpkg requests in a build's binhost access log (`PEER GET TARGET STATUS BYTES`).
fn binpkg_requests(log: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
    text.lines().filter(|l| l.contains(".gpkg.tar") || l.contains(".tbz2")).map(str::to_owned).collect()
}

/// Replaces the binhost's binpkg of `cpv` by an unsigned copy and fixes SIZE/MD5/SHA1 of its
/// index entry to match, as someone able to write the binhost but not to sign could.
fn tamper_unsigned(binhost: &Path, cpv: &str) {
    use md5::Digest as _;
    let index_path = binhost.join("Packages");
    let index = std::fs::read_to_string(&index_path).unwrap();
    let mut stanzas: Vec<String> = index.split("\n\n").map(str::to_owned).collect();
    let st = stanzas.iter_mut().find(|s| s.contains(&format!("CPV: {cpv}\n"))).unwrap_or_else(|| panic!("{cpv} not in {index}"));
    let path = st.lines().find_map(|l| l.strip_prefix("PATH: ")).unwrap().to_owned();
    let file = binhost.join(&path);
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join(file.file_name().unwrap());
    dbh::binpkg::rewrite_gpkg(&file, &copy, &dbh::binpkg::Rewrite { build_id: None, signer: None }).unwrap();
    let bytes = std::fs::read(&copy).unwrap();
    std::fs::write(&file, &bytes).unwrap();
    let md5 = hex::encode(md5::Md5::digest(&bytes));
    let lines: Vec<String> = st
        .lines()
        .map(|l| match l.split_once(": ") {
            Some(("SIZE", _)) => format!("SIZE: {}", bytes.len()),
            Some(("MD5", _)) => format!("MD5: {md5}"),
            _ => l.to_owned(),
        })
        .filter(|l| !l.starts_with("SHA1: "))
        .collect();
    *st = lines.join("\n");
    std::fs::write(&index_path, stanzas.join("\n\n")).unwrap();
    let _ = std::fs::remove_file(binhost.join("Packages.gz"));
}

/// Starts a from-source build of hello (`--usepkg=n` after dbh's `--usepkg`), waits for emerge's
/// `>>> Emerging` line on dbh's stderr (`-v` passes emerge's output on), sends SIGINT and checks
/// that dbh exits within 15 s, non-zero, saying it was interrupted.
fn interrupt_during_emerge(home: &Path, repo: &Path) {
    let mut args = vec!["-v"];
    args.extend(build_args(repo, &["dbh-test/hello", "--", "--usepkg=n"]));
    let mut child = command(home, &args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = String::new();
    let until = Instant::now() + Duration::from_secs(600);
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                seen.push_str(&line);
                seen.push('\n');
                if line.contains(">>> Emerging (1 of 1) dbh-test/hello-1.0") {
                    break;
                }
            }
            Err(_) => {
                let _ = child.kill();
                panic!("emerge did not start building hello within 600 s:\n{seen}");
            }
        }
    }
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let sent = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if sent.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            panic!("dbh did not exit within 15 s of SIGINT:\n{seen}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!("dbh exited {:?} after SIGINT", sent.elapsed());
    reader.join().unwrap();
    seen.extend(rx.try_iter().map(|l| l + "\n"));
    assert!(!status.success(), "an interrupted build must fail:\n{seen}");
    assert!(seen.contains("error: interrupted; the guest was stopped"), "{seen}");
    assert!(!seen.contains("published"), "{seen}");
}

#[test]
fn config_show_prints_each_targets_build_configuration() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let out = run(home, &["config", "show", "--target", "arm64"]);
    assert!(out.status.success(), "{}", combined(&out));
    let text = stdout(&out);
    let dir = home.join("targets/arm64/portage");
    assert!(text.starts_with(&format!("# build configuration of arm64: {}\n", dir.display())), "{text}");
    for f in ["make.conf", "package.use", "package.accept_keywords", "world", "repos.conf"] {
        assert!(text.contains(&format!("\n## {f}\n")), "{f} missing:\n{text}");
        assert!(dir.join(f).is_file(), "{f}: defaults are written on first use");
    }
    assert!(text.contains("ACCEPT_LICENSE=\"*\""), "{text}");

    std::fs::write(dir.join("world"), "dbh-test/greeter\n").unwrap();
    std::fs::create_dir_all(home.join("targets/riscv64")).unwrap();
    let out = run(home, &["config", "show"]);
    let text = stdout(&out);
    assert!(out.status.success(), "{}", combined(&out));
    assert!(text.contains("# from: command line (--home)"), "settings come first:\n{text}");
    assert!(text.contains("\n## world\ndbh-test/greeter\n"), "{text}");
    assert!(!text.contains("build configuration of riscv64"), "only targets that have one:\n{text}");

    let out = run(home, &["config", "show", "--target", "nosuch"]);
    assert!(!out.status.success());
    assert!(combined(&out).contains("nosuch"), "{}", combined(&out));
}

#[test]
fn a_build_without_atoms_needs_a_world() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let key = run(home, &["key", "generate"]);
    assert!(key.status.success(), "{}", combined(&key));
    let out = run(home, &["vm", "build", "--target", "arm64"]);
    let text = combined(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("no atom given") && text.contains("targets/arm64/portage/world"), "{text}");
    assert!(text.contains("hint: "), "{text}");
    assert!(!home.join("images/arm64/run/state.json").exists(), "nothing boots");
}

/// A real Portage client (profile `profiles/dbh/<target>` of the fixture repo) configured with
/// `dbh binhost conf` and the exported key installs `atom` from `dbh serve` with verify-signature
/// on; returns the client (and the directory holding it).
pub fn install_from_serve(home: &Path, target: &str, atom: &str) -> (tempfile::TempDir, Prefix) {
    let srv = Serve::start(home, None, &[], &[]);
    let conf = run(home, &["binhost", "conf", "--target", target, "--url", &format!("http://{}", srv.addr)]);
    assert!(conf.status.success(), "{}", combined(&conf));
    assert!(stdout(&conf).contains("verify-signature = true"), "{}", stdout(&conf));
    let tmp = tempfile::tempdir().unwrap();
    let client = Prefix::new(
        &tmp.path().join("client"),
        PrefixOptions { profile: target, make_conf: "GPG_VERIFY_USER_DROP=\"\"\nGPG_VERIFY_GROUP_DROP=\"\"\n", ..Default::default() },
    );
    client.add_binrepo(&format!("dbh-{target}"), &stdout(&conf));
    let keys = dbh::sign::KeyStore::new(home.join("keys"));
    client.trust_key(keys.public_armored().unwrap().as_bytes(), &keys.fingerprint().unwrap());
    let out = client.ok("emerge", &["--getbinpkgonly", atom], &[]);
    assert!(!out.contains("verification failed"), "{out}");
    (tmp, client)
}

/// `path` is an ELF file for machine `e_machine` (183 = AArch64).
pub fn assert_elf_machine(path: &Path, e_machine: u16) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    assert_eq!(&bytes[..4], b"\x7fELF", "{} is not an ELF file", path.display());
    assert_eq!(u16::from_le_bytes([bytes[18], bytes[19]]), e_machine, "{} has the wrong e_machine", path.display());
}

pub fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            found.extend(walk(&p));
        } else {
            found.push(p);
        }
    }
    found
}

/// The REPO_REVISIONS header key dbh writes survives `dbh binhost index` and real Portage's own
/// rewrite of the index (`emaint binhost --fix` after a package went missing), and a second
/// publish merges into it.
#[test]
fn repo_revisions_survive_reindexing_by_dbh_and_by_portage() {
    let tmp = tempfile::tempdir().unwrap();
    let prefix = Prefix::new(&tmp.path().join("p"), PrefixOptions::default());
    let pkgdir = prefix.pkgdir();
    let files: Vec<PathBuf> = walk(super::portage::built_pkgdir()).into_iter().filter(|p| p.to_string_lossy().ends_with(".gpkg.tar")).collect();
    assert_eq!(files.len(), 2, "{files:?}");
    let target = dbh::target::Targets::builtin().get("amd64").unwrap().clone();
    let publish = |files: &[PathBuf], repo: &str, rev: &str| {
        let revs = BTreeMap::from([(repo.to_owned(), rev.to_owned())]);
        let edit = |h: &mut BTreeMap<String, String>| dbh::build::merge_repo_revisions(h, &revs);
        dbh::binhost::add::add_with_header(&pkgdir, &target, files, None, &edit, &dbh::events::Silent).unwrap();
    };
    let header = || {
        let text = std::fs::read_to_string(pkgdir.join("Packages")).unwrap();
        text.split("\n\n").next().unwrap().to_owned()
    };
    publish(&files, "dbh-test", "abc");
    assert!(header().contains("\nREPO_REVISIONS: {\"dbh-test\": \"abc\"}\n"), "{}", header());
    publish(&files[..1], "gentoo", "123");
    let both = "\nREPO_REVISIONS: {\"dbh-test\": \"abc\", \"gentoo\": \"123\"}\n";
    assert!(header().contains(both), "{}", header());

    let index = run(tmp.path(), &["binhost", "index", pkgdir.to_str().unwrap()]);
    assert!(index.status.success(), "{}", combined(&index));
    assert!(header().contains(both), "dbh binhost index keeps it:\n{}", header());

    // Make Portage rewrite the index: one package file goes missing.
    let gone = walk(&pkgdir).into_iter().find(|p| p.to_string_lossy().ends_with("-1.gpkg.tar")).unwrap();
    std::fs::remove_file(&gone).unwrap();
    let before = header();
    prefix.ok("emaint", &["binhost", "--fix"], &[]);
    assert_ne!(header(), before, "Portage rewrote the index");
    assert!(header().contains(both), "Portage keeps it:\n{}", header());
}

/// `dbh --home HOME ARGS` with the venv's Portage, whose egencache makes the metadata cache of
/// the fixture repository (it has none) once per revision.
fn run_with_portage(home: &Path, args: &[&str]) -> Output {
    let out = command(home, args).env("DBH_PORTAGE_EMERGE", super::portage::portage().venv.join("bin/emerge")).output().unwrap();
    eprintln!("dbh {args:?}: {}\n{}", out.status, combined(&out));
    out
}

/// The repository reaches the guest as a read-only squashfs snapshot on its own virtio disk; a
/// second build at the same revision reuses the cached image (not remade: same inode and mtime,
/// no mksquashfs, no egencache), a new commit makes a new one and REPO_REVISIONS records it.
#[test]
fn vm_build_mounts_repositories_from_cached_read_only_snapshots() {
    if super::image::image_home("arm64").is_none() {
        return;
    }
    let home = product_home(None);
    let home = home.path();
    let work = tempfile::tempdir().unwrap();
    let (repo, commit) = git_repo(work.path());
    let key = run(home, &["key", "generate"]);
    assert!(key.status.success(), "{}", combined(&key));

    // 1. First build: snapshot made (with egencache), mounted read-only from a block device.
    let mut args = build_args(&repo, &["dbh-test/hello"]);
    args.insert(2, "--keep-vm");
    let out = run_with_portage(home, &args);
    let text = combined(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("generating one with egencache") && text.contains("made snapshot"), "{text}");
    assert!(stdout(&out).contains("published dbh-test/hello-1.0"), "{text}");
    let image = home.join(format!("repos/dbh-test/snapshots/{commit}.sqfs"));
    assert!(image.is_file(), "{text}");
    let mnt = run(home, &["vm", "exec", "--target", "arm64", "--", "findmnt", "-n", "-o", "SOURCE,FSTYPE,OPTIONS", "/var/db/repos/dbh-test"]);
    let line = stdout(&mnt);
    eprintln!("findmnt in the guest: {line}");
    assert!(mnt.status.success(), "{}", combined(&mnt));
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert!(fields.len() == 3 && fields[0].starts_with("/dev/vd") && fields[1] == "squashfs", "{line}");
    assert!(fields[2].split(',').any(|o| o == "ro"), "mounted read-only: {line}");
    let serial = run(home, &["vm", "exec", "--target", "arm64", "--", "sh", "-c", &format!("cat /sys/block/{}/serial", fields[0].trim_start_matches("/dev/"))]);
    assert_eq!(stdout(&serial).trim(), "repo-dbh-test");
    let write = run(home, &["vm", "exec", "--target", "arm64", "--", "touch", "/var/db/repos/dbh-test/x"]);
    assert!(!write.status.success() && combined(&write).contains("Read-only file system"), "{}", combined(&write));
    let cache = run(home, &["vm", "exec", "--target", "arm64", "--", "cat", "/var/db/repos/dbh-test/metadata/md5-cache/dbh-test/hello-1.0"]);
    assert!(stdout(&cache).contains("EAPI=8"), "the guest sees the generated metadata cache: {}", combined(&cache));
    let stop = run(home, &["vm", "stop", "--target", "arm64"]);
    assert!(stop.status.success(), "{}", combined(&stop));
    assert_no_qemu(home);

    // 2. The same revision: the cached snapshot, untouched.
    let meta = |p: &Path| {
        let m = std::fs::metadata(p).unwrap();
        (std::os::unix::fs::MetadataExt::ino(&m), m.modified().unwrap())
    };
    let before = meta(&image);
    let out = run_with_portage(home, &build_args(&repo, &["dbh-test/hello"]));
    let text = combined(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains(&format!("repository dbh-test at {commit}: using the cached snapshot")), "{text}");
    assert!(!text.contains("made snapshot") && !text.contains("egencache"), "{text}");
    assert_eq!(meta(&image), before, "the cached image is not remade");
    assert_no_qemu(home);

    // 3. A new commit: a new snapshot, recorded with what it built.
    std::fs::write(repo.join("dbh-test/greeter/note.txt"), "a new commit\n").unwrap();
    for args in [&["add", "-A"][..], &["-c", "user.name=t", "-c", "user.email=t@t.invalid", "commit", "-q", "-m", "two"]] {
        assert!(std::process::Command::new("git").arg("-C").arg(&repo).args(args).status().unwrap().success());
    }
    let two = String::from_utf8(std::process::Command::new("git").arg("-C").arg(&repo).args(["rev-parse", "HEAD"]).output().unwrap().stdout).unwrap();
    let two = two.trim();
    let out = run_with_portage(home, &build_args(&repo, &["dbh-test/greeter"]));
    let text = combined(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains(&format!("repository dbh-test at {two}: made snapshot")), "{text}");
    assert!(home.join(format!("repos/dbh-test/snapshots/{two}.sqfs")).is_file());
    assert!(stdout(&out).contains("published dbh-test/greeter-1.0"), "{text}");
    let index = std::fs::read_to_string(home.join("binhost/arm64/Packages")).unwrap();
    let header = index.split("\n\n").next().unwrap();
    assert!(header.contains(&format!("\nREPO_REVISIONS: {{\"dbh-test\": \"{two}\"}}\n")), "{header}");
    assert!(last_emerge_log(home).contains(&format!("# repository dbh-test at {two}")));
    assert_no_qemu(home);
}

/// Deliverables 5 and 6 on the stage3-shaped test stage: sizes from the command line, the scratch
/// disk under the build trees, a `--keep-vm` guest reused warm by the next build, and `vm image
/// update` installing a package from the binhost into the base image so that the next throw-away
/// guest has it.
#[test]
fn sized_build_on_scratch_warm_reuse_and_image_update() {
    if super::image::image_home("arm64").is_none() {
        return;
    }
    let home = product_home(None);
    let home = home.path();
    let work = tempfile::tempdir().unwrap();
    let (repo, _) = git_repo(work.path());
    let repo = repo.as_path();
    assert!(run(home, &["key", "generate"]).status.success());

    // `dbh config show` says where each size comes from.
    // The user's config ($XDG_CONFIG_HOME/dbh/dbh.toml): ./dbh.toml is not read as root.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(home.join("dbh")).unwrap();
    std::fs::write(home.join("dbh/dbh.toml"), "[vm.arm64]\nscratch_size = \"20G\"\n").unwrap();
    let shown = command(home, &["config", "show"]).current_dir(dir.path()).output().unwrap();
    let text = stdout(&shown);
    assert!(text.contains("vm.arm64.scratch_size = \"20G\""), "{text}");
    assert!(text.contains("# from: this host (all") && text.contains("vm.cpus = "), "{text}");
    assert!(text.contains("# from: this host (half of"), "{text}");

    // A kept guest is detached: stop it even when an assertion fails.
    struct StopOnDrop<'a>(&'a Path);
    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            let _ = run(self.0, &["vm", "stop", "--target", "arm64"]);
        }
    }
    let _stop = StopOnDrop(home);

    // 1. A sized build that keeps its guest.
    let t0 = Instant::now();
    let mut args = build_args(repo, &["dbh-test/hello"]);
    args.extend(["--keep-vm", "--cpus", "1", "--memory", "1536M"]);
    let out = command(home, &args).current_dir(dir.path()).output().unwrap();
    let text = combined(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("1 vCPUs, 1536 MiB, 20 GiB scratch"), "{text}");
    assert!(text.contains("keeps running (--keep-vm)"), "{text}");
    eprintln!("first build with --keep-vm: {:?}", t0.elapsed());
    let pid = std::fs::read_to_string(home.join("images/arm64/run/state.json")).unwrap();
    let inside = run(home, &["vm", "exec", "--target", "arm64", "--", "sh", "-c", "nproc; grep MemTotal /proc/meminfo; grep ' /var/tmp/portage ' /proc/mounts; df -k /var/tmp/portage | tail -n 1"]);
    let text = stdout(&inside);
    assert!(inside.status.success(), "{}", combined(&inside));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "1", "{text}");
    let kib: u64 = lines[1].split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!((1_300_000..1_600_000).contains(&kib), "MemTotal {kib} kB for --memory 1536M");
    assert!(lines[2].contains(" /var/tmp/portage ext4 "), "the build trees are on the scratch disk: {text}");
    let size_kib: u64 = lines[3].split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(size_kib > 19 << 20, "a 20G scratch disk: {text}");
    let scratch = home.join("images/arm64/run/scratch.img");
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&scratch).unwrap();
    assert_eq!(meta.len(), 20 << 30);
    assert!(meta.blocks() * 512 < 512 << 20, "the scratch disk is sparse: {} bytes used", meta.blocks() * 512);

    // 2. The next build reuses the running guest: no second QEMU, no boot.
    let t1 = Instant::now();
    let out = build(home, repo, &["dbh-test/greeter"]);
    let text = combined(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("reusing the running arm64 guest"), "{text}");
    assert!(!text.contains("already running"), "{text}");
    assert!(stdout(&out).contains("published dbh-test/greeter-1.0"), "{text}");
    assert_eq!(std::fs::read_to_string(home.join("images/arm64/run/state.json")).unwrap(), pid, "the same guest");
    eprintln!("warm build: {:?}", t1.elapsed());
    assert!(run(home, &["vm", "stop", "--target", "arm64"]).status.success());
    assert_no_qemu(home);
    assert!(!scratch.exists(), "the scratch disk goes with the guest");

    // 3. vm image update: the default build tools are there (distcc, gpg) ...
    let profile = ["--repo", repo.to_str().unwrap(), "--profile", "dbh-test:dbh/arm64"];
    let mut args = vec!["vm", "image", "update", "--target", "arm64"];
    args.extend(profile);
    let out = run(home, &args);
    assert!(out.status.success(), "{}", combined(&out));
    assert!(stdout(&out).contains("nothing to install; the image is unchanged"), "{}", combined(&out));
    // ... and a package from the binhost goes into the base image.
    let disk = home.join("images/arm64/disk.qcow2");
    let before = std::fs::symlink_metadata(&disk).unwrap();
    args.push("dbh-test/greeter");
    let out = run(home, &args);
    let text = combined(&out);
    assert!(out.status.success(), "{text}");
    assert!(stdout(&out).contains("installed dbh-test/greeter into the base image"), "{text}");
    let after = std::fs::symlink_metadata(&disk).unwrap();
    assert!(before.file_type().is_symlink() && after.file_type().is_file(), "disk.qcow2 was replaced, not written through");
    let info = std::fs::read_to_string(home.join("images/arm64/image.toml")).unwrap();
    assert!(info.contains("dbh-test/greeter"), "image.toml records the update: {info}");
    assert_no_qemu(home);
    // A throw-away guest of the updated image has greeter and hello, and no build inputs.
    let out = run(home, &["vm", "exec", "--target", "arm64", "--", "sh", "-c", "ls /var/db/pkg/dbh-test; ls /var/db/repos; ls /var/cache/binpkgs | wc -l"]);
    let text = stdout(&out);
    assert!(out.status.success(), "{}", combined(&out));
    assert!(text.contains("greeter-1.0") && text.contains("hello-1.0"), "{text}");
    assert!(!text.contains("dbh-test\n"), "the repository is not left in the image: {text}");
    assert!(text.trim_end().ends_with('0'), "no seeded binpkgs left: {text}");
    assert_no_qemu(home);
}
