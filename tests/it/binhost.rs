//! `dbh binhost index|check|add` against real Portage: the index dbh writes for a PKGDIR that
//! `emerge --buildpkg` filled equals Portage's own, entry by entry, and `emaint binhost --check`
//! finds it clean; `check` finds what emaint misses; `add` survives SIGKILL at any point, refuses
//! bad inputs without touching what is published, and concurrent adds never lose or duplicate.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use crate::cli::dbh;
use crate::portage::{built_pkgdir, combined, copy_tree, Prefix, PrefixOptions};

/// Header keys Portage takes from the builder's configuration (`_pkgindex_header_keys`,
/// USE_EXPAND_* and PROFILE from make.profile): dbh has no Portage configuration when it indexes a
/// directory, so it keeps them from an existing index but never invents them.
const PORTAGE_CONFIG_HEADER_KEYS: &[&str] = &[
    "ACCEPT_KEYWORDS", "ACCEPT_LICENSE", "ACCEPT_PROPERTIES", "ACCEPT_RESTRICT", "CBUILD", "CONFIG_PROTECT",
    "CONFIG_PROTECT_MASK", "ELIBC", "FEATURES", "GENTOO_MIRRORS", "IUSE_IMPLICIT", "KERNEL", "PROFILE", "USE",
    "USERLAND", "USE_EXPAND", "USE_EXPAND_IMPLICIT", "USE_EXPAND_UNPREFIXED", "USE_EXPAND_VALUES_ARCH",
    "USE_EXPAND_VALUES_ELIBC", "USE_EXPAND_VALUES_KERNEL", "USE_EXPAND_VALUES_USERLAND",
];

type Stanza = BTreeMap<String, String>;

fn stanzas(text: &str) -> Vec<Stanza> {
    text.split("\n\n")
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.lines().map(|l| {
            let (k, v) = l.split_once(": ").unwrap_or((l.trim_end_matches(':'), ""));
            (k.to_owned(), v.to_owned())
        }).collect())
        .collect()
}

pub fn run_dbh(args: &[&str]) -> Output {
    dbh().args(args).env_remove("DBH_HOME").output().unwrap()
}

fn dbh_ok(args: &[&str]) -> String {
    let out = run_dbh(args);
    assert!(out.status.success(), "dbh {} failed:\n{}", args.join(" "), combined(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A copy of the PKGDIR real Portage built, as `<tmp>/pkgdir`.
fn portage_pkgdir(tmp: &Path) -> PathBuf {
    let dir = tmp.join("pkgdir");
    copy_tree(built_pkgdir(), &dir);
    dir
}

fn emaint(tmp: &Path, pkgdir: &Path, action: &str) -> Output {
    let prefix = Prefix::new(&tmp.join("emaint-prefix"), PrefixOptions::default());
    prefix.run("emaint", &["binhost", action], &[("PKGDIR", s(pkgdir))])
}

fn gunzip(path: &Path) -> String {
    let mut text = String::new();
    flate2::read::MultiGzDecoder::new(std::fs::File::open(path).unwrap()).read_to_string(&mut text).unwrap();
    text
}

/// Packages.gz equals Packages and both mtimes are TIMESTAMP.
pub fn assert_index_files_consistent(dir: &Path) -> Stanza {
    let text = std::fs::read_to_string(dir.join("Packages")).unwrap();
    assert_eq!(gunzip(&dir.join("Packages.gz")), text, "Packages.gz differs from Packages");
    let header = stanzas(&text).remove(0);
    let ts: i64 = header["TIMESTAMP"].parse().unwrap();
    for f in ["Packages", "Packages.gz"] {
        assert_eq!(std::fs::metadata(dir.join(f)).unwrap().mtime(), ts, "{f} mtime is not TIMESTAMP");
    }
    header
}

#[test]
fn index_of_a_portage_pkgdir_equals_portages_and_emaint_finds_it_clean() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = portage_pkgdir(tmp.path());
    let portage_text = std::fs::read_to_string(dir.join("Packages")).unwrap();
    std::fs::remove_file(dir.join("Packages")).unwrap();
    std::fs::remove_file(dir.join("Packages.gz")).unwrap();

    dbh_ok(&["binhost", "index", s(&dir)]);
    let ours_text = std::fs::read_to_string(dir.join("Packages")).unwrap();
    let header = assert_index_files_consistent(&dir);
    let ours = stanzas(&ours_text);
    let theirs = stanzas(&portage_text);

    // Header: what dbh writes equals Portage's; the rest comes from Portage's configuration.
    for (k, v) in &header {
        if k != "TIMESTAMP" {
            assert_eq!(Some(v), theirs[0].get(k), "header {k}");
        }
    }
    for k in theirs[0].keys() {
        if !header.contains_key(k) {
            assert!(PORTAGE_CONFIG_HEADER_KEYS.contains(&k.as_str()), "dbh lacks header key {k}");
        }
    }
    // Entries: key by key; REPO_REVISIONS is written only by emerge's own inject (Portage drops
    // it whenever it reads an index back, and emaint never writes it).
    assert_eq!(ours.len(), theirs.len());
    for (a, b) in ours[1..].iter().zip(&theirs[1..]) {
        let mut b = b.clone();
        b.remove("REPO_REVISIONS");
        assert_eq!(a, &b);
    }

    let out = emaint(tmp.path(), &dir, "--check");
    assert!(out.status.success() && combined(&out).trim().is_empty(), "emaint --check: {}", combined(&out));
    dbh_ok(&["binhost", "check", s(&dir)]);

    // emaint --fix from scratch writes the same entries byte for byte.
    let fixed = tmp.path().join("fixed");
    copy_tree(&dir, &fixed);
    std::fs::remove_file(fixed.join("Packages")).unwrap();
    std::fs::remove_file(fixed.join("Packages.gz")).unwrap();
    let out = emaint(tmp.path(), &fixed, "--fix");
    assert!(out.status.success(), "{}", combined(&out));
    let emaint_text = std::fs::read_to_string(fixed.join("Packages")).unwrap();
    assert_eq!(stanzas(&emaint_text)[1..], ours[1..]);
    // The entry text itself, too (key order, MTIME/REPO last).
    assert_eq!(ours_text.split_once("\n\n").unwrap().1, emaint_text.split_once("\n\n").unwrap().1);
}

#[test]
fn reindex_is_incremental_and_never_lowers_the_timestamp() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = portage_pkgdir(tmp.path());
    // Starting from Portage's index: nothing changed, nothing is rewritten.
    let before = std::fs::read(dir.join("Packages")).unwrap();
    let out = dbh_ok(&["binhost", "index", s(&dir)]);
    let _ = out;
    assert!(std::fs::read(dir.join("Packages")).unwrap() == before, "an up-to-date index was rewritten");
    let ts0: u64 = stanzas(&String::from_utf8(before).unwrap())[0]["TIMESTAMP"].parse().unwrap();

    // A future TIMESTAMP (clock skew) still goes up, by TIMESTAMP_STEP (Portage's
    // If-Modified-Since tolerance + 1).
    let text = std::fs::read_to_string(dir.join("Packages")).unwrap();
    let future = ts0 + 100_000;
    std::fs::write(dir.join("Packages"), text.replace(&format!("TIMESTAMP: {ts0}\n"), &format!("TIMESTAMP: {future}\n"))).unwrap();
    std::fs::remove_file(dir.join("dbh-test/greeter/greeter-1.0-1.gpkg.tar")).unwrap();
    let out = run_dbh(&["binhost", "index", s(&dir)]);
    assert!(out.status.success(), "{}", combined(&out));
    assert!(combined(&out).contains("1 unchanged"), "hello must be reused, not re-read: {}", combined(&out));
    let header = assert_index_files_consistent(&dir);
    assert_eq!(header["TIMESTAMP"], (future + dbh::binhost::TIMESTAMP_STEP).to_string());
    assert_eq!(header["PACKAGES"], "1");
    dbh_ok(&["binhost", "check", s(&dir)]);
    // Header values Portage derived from its configuration are kept.
    assert_eq!(header["PROFILE"], "dbh/amd64");
}

#[test]
fn check_reports_what_emaint_misses() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = portage_pkgdir(tmp.path());
    dbh_ok(&["binhost", "check", s(&dir)]);
    let text = std::fs::read_to_string(dir.join("Packages")).unwrap();
    let hello = stanzas(&text).into_iter().find(|e| e.get("CPV").is_some_and(|c| c == "dbh-test/hello-1.0")).unwrap();
    // A wrong MD5 and a duplicated BUILD_ID (greeter claims hello's CPV and id), plus an
    // unindexed file and a Packages.gz that no longer matches.
    let broken = text
        .replace(&hello["MD5"], "00000000000000000000000000000000")
        .replace("CPV: dbh-test/greeter-1.0", "CPV: dbh-test/hello-1.0");
    std::fs::write(dir.join("Packages"), &broken).unwrap();
    let ts = filetime(&dir.join("Packages.gz"));
    set_mtime(&dir.join("Packages"), ts);
    std::fs::copy(dir.join("dbh-test/hello/hello-1.0-1.gpkg.tar"), dir.join("dbh-test/hello/hello-1.0-7.gpkg.tar")).unwrap();
    std::fs::write(dir.join("dbh-test/hello/hello-1.0-8.gpkg.tar"), b"garbage").unwrap();

    // emaint sees only the new files.
    let out = emaint(tmp.path(), &dir, "--check");
    let emaint_text = combined(&out);
    assert!(!emaint_text.contains("MD5") && !emaint_text.contains("Packages.gz"), "{emaint_text}");

    let out = run_dbh(&["binhost", "check", s(&dir)]);
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{}", combined(&out));
    for needle in [
        "Packages.gz: does not match Packages",
        "MD5 is 00000000000000000000000000000000 in the index",
        "dbh-test/hello-1.0 has BUILD_ID 1 2 times",
        "hello-1.0-7.gpkg.tar: dbh-test/hello-1.0 is not in Packages",
        "hello-1.0-8.gpkg.tar: unusable binary package",
        "CPV is dbh-test/hello-1.0 in the index, dbh-test/greeter-1.0 in the file",
    ] {
        assert!(report.contains(needle), "check did not report {needle:?}:\n{report}");
    }

    // A missing file and a garbage index.
    std::fs::remove_file(dir.join("dbh-test/greeter/greeter-1.0-1.gpkg.tar")).unwrap();
    let report = String::from_utf8_lossy(&run_dbh(&["binhost", "check", s(&dir)]).stdout).into_owned();
    assert!(report.contains("greeter-1.0-1.gpkg.tar: indexed as dbh-test/hello-1.0"), "{report}");
    std::fs::write(dir.join("Packages"), "VERSION: 0\n\nCPV: a/b-1\nthis is not an index\n").unwrap();
    let out = run_dbh(&["binhost", "check", s(&dir)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("Packages: unreadable index: line 4"), "{}", combined(&out));
    // index refuses to rewrite a garbage index (naming file and line); --full rebuilds it.
    let out = run_dbh(&["binhost", "index", s(&dir)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(combined(&out).contains(&format!("{}: line 4", dir.join("Packages").display())), "{}", combined(&out));
    dbh_ok(&["binhost", "index", "--full", s(&dir)]);
    assert_index_files_consistent(&dir);
}

fn filetime(p: &Path) -> i64 {
    std::fs::metadata(p).unwrap().mtime()
}

fn set_mtime(p: &Path, t: i64) {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(t as u64);
    std::fs::File::options().write(true).open(p).unwrap().set_modified(t).unwrap();
}

// ---------------------------------------------------------------------------------------------
// dbh binhost add

fn fixture(rel: &str) -> PathBuf {
    built_pkgdir().join(rel)
}

const HELLO: &str = "dbh-test/hello/hello-1.0-1.gpkg.tar";
const GREETER: &str = "dbh-test/greeter/greeter-1.0-1.gpkg.tar";

/// A home with a signing key; returns it and its amd64 binhost dir.
fn keyed_home() -> (tempfile::TempDir, PathBuf) {
    let home = tempfile::Builder::new().prefix("dbh-home-").tempdir().unwrap();
    dbh_ok(&["--home", s(home.path()), "key", "generate", "--uid", "t <t@dbh.invalid>"]);
    let dir = home.path().join("binhost/amd64");
    (home, dir)
}

fn add_cmd(home: &Path, files: &[&Path]) -> std::process::Command {
    let mut cmd = dbh();
    cmd.env_remove("DBH_HOME").arg("--home").arg(home).args(["-q", "binhost", "add", "--target", "amd64"]);
    cmd.args(files);
    cmd
}

/// Every entry's file exists with the SIZE and MD5 the index gives; BUILD_IDs are unique per CPV.
fn assert_entries_match_files(dir: &Path) -> Vec<Stanza> {
    use md5::Digest as _;
    let text = std::fs::read_to_string(dir.join("Packages")).unwrap();
    let entries: Vec<Stanza> = stanzas(&text).into_iter().skip(1).collect();
    let mut ids = std::collections::HashSet::new();
    for e in &entries {
        let bytes = std::fs::read(dir.join(&e["PATH"])).unwrap_or_else(|err| panic!("{}: {err}", e["PATH"]));
        assert_eq!(bytes.len().to_string(), e["SIZE"], "{}", e["PATH"]);
        assert_eq!(hex::encode(md5::Md5::digest(&bytes)), e["MD5"], "{}", e["PATH"]);
        assert!(ids.insert((e["CPV"].clone(), e["BUILD_ID"].clone())), "duplicate BUILD_ID: {e:?}");
    }
    entries
}

fn listing(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().unwrap() != ".dbh.lock" {
                out.push((p.strip_prefix(dir).unwrap().display().to_string(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn add_signs_allocates_build_ids_and_indexes() {
    let (home, dir) = keyed_home();
    let out = add_cmd(home.path(), &[&fixture(HELLO), &fixture(GREETER)]).output().unwrap();
    assert!(out.status.success(), "{}", combined(&out));
    let out = add_cmd(home.path(), &[&fixture(HELLO), &fixture(HELLO)]).output().unwrap();
    assert!(out.status.success(), "{}", combined(&out));
    let entries = assert_entries_match_files(&dir);
    let ids: Vec<(String, String)> = entries.iter().map(|e| (e["CPV"].clone(), e["BUILD_ID"].clone())).collect();
    let want: Vec<(String, String)> = [("greeter", 1), ("hello", 1), ("hello", 2), ("hello", 3)]
        .iter()
        .map(|(p, i)| (format!("dbh-test/{p}-1.0"), i.to_string()))
        .collect();
    assert_eq!(ids, want);
    assert!(dir.join("dbh-test/hello/hello-1.0-3.gpkg.tar").is_file());
    let header = assert_index_files_consistent(&dir);
    assert_eq!((header["ARCH"].as_str(), header["CHOST"].as_str()), ("amd64", "x86_64-pc-linux-gnu"));
    dbh_ok(&["binhost", "check", s(&dir)]);
    // Real Portage, trusting the key as `dbh binhost conf` says, finds the binhost clean (emaint
    // verifies every signature).
    let tmp = tempfile::tempdir().unwrap();
    let prefix = Prefix::new(&tmp.path().join("emaint-prefix"), PrefixOptions::default());
    let fpr = crate::publish::fingerprint(home.path());
    let armored = dbh_ok(&["--home", s(home.path()), "key", "export"]);
    prefix.trust_key(armored.as_bytes(), &fpr);
    let out = prefix.run("emaint", &["binhost", "--check"], &[("PKGDIR", s(&dir))]);
    assert!(out.status.success() && combined(&out).trim().is_empty(), "emaint --check: {}", combined(&out));
    // Signed: the rewritten packages carry signatures and a clear-signed Manifest.
    let list = std::process::Command::new("tar").arg("tf").arg(dir.join("dbh-test/hello/hello-1.0-3.gpkg.tar")).output().unwrap();
    let names = String::from_utf8_lossy(&list.stdout);
    assert!(names.contains("hello-1.0-3/metadata.tar.zst.sig") && names.contains("hello-1.0-3/image.tar.zst.sig"), "{names}");
}

#[test]
fn add_without_a_key_or_with_bad_inputs_publishes_nothing() {
    let home = tempfile::tempdir().unwrap();
    let out = add_cmd(home.path(), &[&fixture(HELLO)]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(combined(&out).contains("dbh key generate"), "{}", combined(&out));

    let (home, dir) = keyed_home();
    let out = add_cmd(home.path(), &[&fixture(HELLO)]).output().unwrap();
    assert!(out.status.success(), "{}", combined(&out));
    let before = listing(&dir);
    let tmp = tempfile::tempdir().unwrap();
    let good = std::fs::read(fixture(HELLO)).unwrap();
    let truncated = tmp.path().join("hello-1.0-1.gpkg.tar");
    std::fs::write(&truncated, &good[..5000]).unwrap();
    let empty = tmp.path().join("empty-1.0.gpkg.tar");
    std::fs::write(&empty, b"").unwrap();
    // Manifest mismatch: one byte of the image member changed, size kept.
    let tampered = tmp.path().join("tampered").join("hello-1.0-1.gpkg.tar");
    std::fs::create_dir_all(tampered.parent().unwrap()).unwrap();
    let mut bytes = good.clone();
    let at = {
        let mut ar = tar::Archive::new(std::io::Cursor::new(good.clone()));
        let e = ar.entries().unwrap().map(|e| e.unwrap()).find(|e| e.path().unwrap().ends_with("image.tar.zst")).unwrap();
        e.raw_file_position() as usize + e.size() as usize / 2
    };
    bytes[at] ^= 0x55;
    std::fs::write(&tampered, &bytes).unwrap();
    for bad in [&truncated, &empty, &tampered] {
        // The bad file comes second: the good first one must not be published either.
        let out = add_cmd(home.path(), &[&fixture(GREETER), bad]).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{}: {}", bad.display(), combined(&out));
        assert!(combined(&out).contains(s(bad)), "the error must name {}: {}", bad.display(), combined(&out));
        assert!(listing(&dir) == before, "{}: the binhost changed", bad.display());
    }
    // A garbage index in the target dir: refused with file and line, nothing changes.
    std::fs::write(dir.join("Packages"), b"VERSION: 0\n\nCPV: x/y-1\n\x00\x01garbage\n\n").unwrap();
    let before = listing(&dir);
    let out = add_cmd(home.path(), &[&fixture(GREETER)]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(combined(&out).contains(&format!("{}: line 4", dir.join("Packages").display())), "{}", combined(&out));
    assert!(listing(&dir) == before, "garbage index: the binhost changed");
}

/// SIGKILL at random points of `dbh binhost add`: after each, check passes (unindexed files of
/// the interrupted add are journaled, invisible to clients) and every entry's file is intact.
#[test]
fn add_survives_sigkill_anywhere() {
    let (home, dir) = keyed_home();
    let files = [fixture(HELLO), fixture(GREETER)];
    let refs: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    let t = std::time::Instant::now();
    let out = add_cmd(home.path(), &refs).output().unwrap();
    assert!(out.status.success(), "{}", combined(&out));
    let span = t.elapsed().as_micros() as u64 + 1;
    let mut seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    eprintln!("sigkill seed {seed}, add takes {span} µs");
    for round in 0..24 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let delay = std::time::Duration::from_micros(seed % (span * 12 / 10));
        let mut child = add_cmd(home.path(), &refs).spawn().unwrap();
        std::thread::sleep(delay);
        let _ = child.kill();
        let _ = child.wait();
        let out = run_dbh(&["binhost", "check", s(&dir)]);
        assert!(out.status.success(), "round {round} (killed after {delay:?}): check failed:\n{}", combined(&out));
        assert_entries_match_files(&dir);
    }
    // The next add finishes what was interrupted and cleans up.
    let out = add_cmd(home.path(), &refs).output().unwrap();
    assert!(out.status.success(), "{}", combined(&out));
    dbh_ok(&["binhost", "check", s(&dir)]);
    assert_entries_match_files(&dir);
    let stray: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".dbh-tmp") || n == ".dbh-pending")
        .collect();
    assert!(stray.is_empty(), "left behind: {stray:?}");
    // Every file on disk is indexed; `index` also finishes an interrupted add (and its journal).
    std::fs::write(dir.join(".dbh-pending"), "dbh-test/hello/hello-1.0-1.gpkg.tar\n").unwrap();
    let out = run_dbh(&["binhost", "index", s(&dir)]);
    assert!(!dir.join(".dbh-pending").exists());
    assert!(combined(&out).contains("(0 read"), "files were not indexed by add: {}", combined(&out));
}

#[test]
fn concurrent_adds_lose_nothing_and_never_duplicate_a_build_id() {
    let (home, dir) = keyed_home();
    let files = [fixture(HELLO), fixture(GREETER)];
    let refs: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    let rounds = 3;
    for _ in 0..rounds {
        let a = add_cmd(home.path(), &refs).spawn().unwrap();
        let b = add_cmd(home.path(), &refs).spawn().unwrap();
        for c in [a, b] {
            let out = c.wait_with_output().unwrap();
            assert!(out.status.success(), "{}", combined(&out));
        }
    }
    let entries = assert_entries_match_files(&dir);
    for cpv in ["dbh-test/hello-1.0", "dbh-test/greeter-1.0"] {
        let mut ids: Vec<u64> = entries.iter().filter(|e| e["CPV"] == cpv).map(|e| e["BUILD_ID"].parse().unwrap()).collect();
        ids.sort();
        assert_eq!(ids, (1..=2 * rounds).collect::<Vec<u64>>(), "{cpv}");
    }
    dbh_ok(&["binhost", "check", s(&dir)]);
}

/// The one state SIGKILL can leave between the two index renames, made on purpose: Packages.gz
/// already new, Packages still old. `check` accepts it when the generation records show it (see
/// tests/it/lifecycle.rs) or, without them, with the add's journal naming the new files; the
/// next add repairs it.
#[test]
fn check_accepts_an_add_interrupted_between_the_index_renames_only_with_its_journal() {
    let (home, dir) = keyed_home();
    let out = add_cmd(home.path(), &[&fixture(HELLO)]).output().unwrap();
    assert!(out.status.success(), "{}", combined(&out));
    let old = std::fs::read(dir.join("Packages")).unwrap();
    let old_mtime = filetime(&dir.join("Packages"));
    let out = add_cmd(home.path(), &[&fixture(GREETER)]).output().unwrap();
    assert!(out.status.success(), "{}", combined(&out));
    std::fs::write(dir.join("Packages"), &old).unwrap();
    set_mtime(&dir.join("Packages"), old_mtime);
    let out = run_dbh(&["binhost", "check", s(&dir)]);
    assert!(out.status.success(), "the generation records explain it: {}", combined(&out));
    assert!(combined(&out).contains("a publish was interrupted"), "{}", combined(&out));
    std::fs::remove_dir_all(dir.join(".dbh-generations")).unwrap();
    let out = run_dbh(&["binhost", "check", s(&dir)]);
    assert_eq!(out.status.code(), Some(1), "without generations or a journal this is an inconsistency: {}", combined(&out));
    std::fs::write(dir.join(".dbh-pending"), "dbh-test/greeter/greeter-1.0-1.gpkg.tar\n").unwrap();
    let out = run_dbh(&["binhost", "check", s(&dir)]);
    assert!(out.status.success(), "{}", combined(&out));
    assert!(combined(&out).contains("an add was interrupted"), "{}", combined(&out));
    let out = add_cmd(home.path(), &[&fixture(HELLO)]).output().unwrap();
    assert!(out.status.success(), "{}", combined(&out));
    dbh_ok(&["binhost", "check", s(&dir)]);
    assert!(!dir.join(".dbh-pending").exists());
    assert_eq!(assert_entries_match_files(&dir).len(), 3);
}
