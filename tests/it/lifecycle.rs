//! The binhost lifecycle (generations, rollback, rm, prune) against real Portage and real
//! `dbh serve`: a client installs from generation 2, follows a rollback to generation 1 (fresh and
//! with its cached index) and a roll forward; prune keeps what kept generations list and leaves
//! the binhost clean for `emaint binhost --check`; rm warns about dependants; SIGKILL at random
//! points of prune/rollback always leaves one whole generation published; add and prune
//! concurrently lose nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cli::dbh;
use crate::portage::{built_pkgdir, combined, Prefix, PrefixOptions};
use crate::publish::{dbh_ok, fingerprint};
use crate::serve::Serve;

const HELLO: &str = "dbh-test/hello/hello-1.0-1.gpkg.tar";
const GREETER: &str = "dbh-test/greeter/greeter-1.0-1.gpkg.tar";

fn fixture(rel: &str) -> PathBuf {
    built_pkgdir().join(rel)
}

fn cmd(home: &Path, args: &[&str]) -> Command {
    let mut c = dbh();
    c.env_remove("DBH_HOME").arg("--home").arg(home).args(args);
    c
}

fn keyed_home() -> (tempfile::TempDir, PathBuf) {
    let home = tempfile::Builder::new().prefix("dbh-life-").tempdir().unwrap();
    dbh_ok(home.path(), &["key", "generate", "--uid", "t <t@dbh.invalid>"]);
    let dir = home.path().join("binhost/amd64");
    (home, dir)
}

fn add(home: &Path, files: &[&str]) {
    let mut args = vec!["-q", "binhost", "add", "--target", "amd64"];
    let paths: Vec<String> = files.iter().map(|f| fixture(f).display().to_string()).collect();
    args.extend(paths.iter().map(String::as_str));
    dbh_ok(home, &args);
}

fn generations(home: &Path) -> Vec<serde_json::Value> {
    let text = dbh_ok(home, &["binhost", "generations", "--target", "amd64", "--json"]);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}):\n{text}"))
}

/// `(CPV, BUILD_ID)` of every entry of the published Packages.
fn indexed(dir: &Path) -> Vec<(String, u64)> {
    let text = std::fs::read_to_string(dir.join("Packages")).unwrap();
    let mut out = Vec::new();
    for stanza in text.split("\n\n").skip(1).filter(|s| !s.is_empty()) {
        let get = |k: &str| stanza.lines().find_map(|l| l.strip_prefix(&format!("{k}: ")).map(str::to_owned));
        out.push((get("CPV").unwrap(), get("BUILD_ID").unwrap().parse().unwrap()));
    }
    out
}

fn check_clean(dir: &Path) {
    let out = Command::new(env!("CARGO_BIN_EXE_dbh")).args(["binhost", "check"]).arg(dir).output().unwrap();
    assert!(out.status.success(), "dbh binhost check:\n{}", combined(&out));
}

fn gunzip(path: &Path) -> String {
    use std::io::Read;
    let mut s = String::new();
    flate2::read::MultiGzDecoder::new(std::fs::File::open(path).unwrap()).read_to_string(&mut s).unwrap();
    s
}

/// The BUILD_ID of the installed greeter, from the client's vdb.
fn installed_build_id(cl: &Prefix) -> String {
    std::fs::read_to_string(cl.root.join("var/db/pkg/dbh-test/greeter-1.0/BUILD_ID")).unwrap().trim().to_owned()
}

fn client(dir: &Path, home: &Path, url: &str) -> Prefix {
    let cl = Prefix::new(dir, PrefixOptions::default());
    let conf = dbh_ok(home, &["binhost", "conf", "--target", "amd64", "--url", url]);
    cl.add_binrepo("dbh", &conf);
    let key = dbh_ok(home, &["key", "export"]);
    cl.trust_key(key.as_bytes(), &fingerprint(home));
    cl
}

#[test]
fn a_real_client_follows_rollback_and_roll_forward() {
    let (home, dir) = keyed_home();
    add(home.path(), &[HELLO, GREETER]); // generation 1: greeter-1.0-1
    add(home.path(), &[GREETER]); // generation 2: + greeter-1.0-2
    let gens = generations(home.path());
    assert_eq!(gens.len(), 2, "{gens:?}");
    assert_eq!(gens[1]["added"], serde_json::json!(["dbh-test/greeter-1.0-2"]));
    assert_eq!(gens[1]["packages"], 3);
    // Packages.gz is several gzip members (header, blocks) and equals Packages.
    assert_eq!(gunzip(&dir.join("Packages.gz")), std::fs::read_to_string(dir.join("Packages")).unwrap());
    let members = std::fs::read(dir.join("Packages.gz")).unwrap().windows(3).filter(|w| w == &[0x1f, 0x8b, 8]).count();
    assert!(members >= 2, "Packages.gz has {members} gzip member(s)");

    let serve = Serve::start(home.path(), None, &[], &[]);
    let url = serve.url("");
    let url = url.trim_end_matches('/');
    let tmp = tempfile::tempdir().unwrap();
    let cl = client(&tmp.path().join("cl"), home.path(), url);
    cl.ok("emerge", &["--getbinpkgonly", "dbh-test/greeter"], &[]);
    assert_eq!(installed_build_id(&cl), "2");
    assert!(serve.wait_log("/amd64/Packages.gz", std::time::Duration::from_secs(5)), "the client did not read Packages.gz:\n{}", serve.log());

    let ts2: u64 = gens[1]["timestamp"].as_u64().unwrap();
    let out = dbh_ok(home.path(), &["binhost", "rollback", "--target", "amd64", "--to", "1"]);
    assert!(out.contains("generation 3: rollback to 1"), "{out}");
    let gens = generations(home.path());
    assert_eq!(gens[2]["removed"], serde_json::json!(["dbh-test/greeter-1.0-2"]));
    assert!(gens[2]["timestamp"].as_u64().unwrap() > ts2, "TIMESTAMP must move forward: {gens:?}");
    assert_eq!(indexed(&dir), vec![("dbh-test/greeter-1.0".into(), 1), ("dbh-test/hello-1.0".into(), 1)]);
    // The file of generation 2 stays: a kept generation lists it.
    assert!(dir.join("dbh-test/greeter/greeter-1.0-2.gpkg.tar").is_file());
    check_clean(&dir);

    // The client holding its cached generation-2 index, seconds after it was published, gets
    // the new index, not a 304 (Portage sends its TIMESTAMP + 5 s as If-Modified-Since; each
    // generation's TIMESTAMP is ahead of the one before by more), and reinstalls generation 1's
    // greeter.
    assert!(gens[2]["timestamp"].as_u64().unwrap() >= ts2 + 6, "{gens:?}");
    let before = serve.log().len();
    cl.ok("emerge", &["--getbinpkgonly", "dbh-test/greeter"], &[]);
    assert_eq!(installed_build_id(&cl), "1", "the cached client follows the rollback:\n{}", &serve.log()[before..]);
    assert!(serve.log()[before..].contains(" GET /amd64/Packages.gz 200 "), "{}", &serve.log()[before..]);
    // A fresh client installs generation 1's greeter.
    let fresh = client(&tmp.path().join("fresh"), home.path(), url);
    fresh.ok("emerge", &["--getbinpkgonly", "dbh-test/greeter"], &[]);
    assert_eq!(installed_build_id(&fresh), "1");

    // Roll forward (default --to: the generation before the current one is 2); a fresh client
    // installs greeter-1.0-2 again.
    let out = dbh_ok(home.path(), &["binhost", "rollback", "--target", "amd64"]);
    assert!(out.contains("generation 4: rollback to 2"), "{out}");
    // The cached client again, and a fresh one: greeter-1.0-2.
    cl.ok("emerge", &["--getbinpkgonly", "dbh-test/greeter"], &[]);
    assert_eq!(installed_build_id(&cl), "2", "the cached client follows the roll-forward");
    let again = client(&tmp.path().join("again"), home.path(), url);
    again.ok("emerge", &["--getbinpkgonly", "dbh-test/greeter"], &[]);
    assert_eq!(installed_build_id(&again), "2");
    check_clean(&dir);

    // The target page shows the current generation and the history.
    let page = reqwest::blocking::get(serve.url("/amd64/")).unwrap().text().unwrap();
    assert!(page.contains("<h2>Generations</h2>") && page.contains("generation <strong>4</strong>"), "{page}");
    assert!(page.contains("rollback to 1") && page.contains("dbh-test/greeter-1.0-2"), "{page}");
    let text = dbh_ok(home.path(), &["binhost", "generations", "--target", "amd64"]);
    assert_eq!(text.lines().count(), 4, "{text}");
    assert!(text.lines().nth(3).unwrap().starts_with('*'), "{text}");

    let out = cmd(home.path(), &["binhost", "rollback", "--target", "amd64", "--to", "9"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(combined(&out).contains("has no generation 9 (it has 1, 2, 3, 4)"), "{}", combined(&out));
}

#[test]
fn prune_keeps_the_newest_and_files_kept_generations_list() {
    let (home, dir) = keyed_home();
    add(home.path(), &[HELLO, GREETER]);
    add(home.path(), &[HELLO]);
    add(home.path(), &[HELLO]);
    let old: Vec<PathBuf> = [1, 2].iter().map(|i| dir.join(format!("dbh-test/hello/hello-1.0-{i}.gpkg.tar"))).collect();
    let sizes: u64 = old.iter().map(|p| std::fs::metadata(p).unwrap().len()).sum();

    let out = dbh_ok(home.path(), &["binhost", "prune", "--target", "amd64", "--keep", "1", "--dry-run"]);
    assert!(out.contains("would drop dbh-test/hello-1.0-1"), "{out}");
    assert_eq!(indexed(&dir).len(), 4, "--dry-run changed the index");

    // Default --keep-generations 5: the index loses them, the files stay (generations list them).
    let out = dbh_ok(home.path(), &["binhost", "prune", "--target", "amd64", "--keep", "1"]);
    assert!(out.contains("dropped 2 package(s) from the index, 0 file(s)"), "{out}");
    assert_eq!(indexed(&dir), vec![("dbh-test/greeter-1.0".into(), 1), ("dbh-test/hello-1.0".into(), 3)]);
    assert!(old.iter().all(|p| p.is_file()), "a file a kept generation lists was deleted");
    check_clean(&dir);

    // Only the newest generation's files kept: the two old files go, bytes reported.
    let out = dbh_ok(home.path(), &["binhost", "prune", "--target", "amd64", "--keep", "1", "--keep-generations", "1"]);
    assert!(out.contains(&format!("freed {sizes} bytes")), "expected {sizes} bytes freed:\n{out}");
    assert!(old.iter().all(|p| !p.exists()), "old files remain:\n{out}");
    assert!(dir.join("dbh-test/hello/hello-1.0-3.gpkg.tar").is_file());
    assert_eq!(generations(home.path()).len(), 1);
    check_clean(&dir);
    let tmp = tempfile::tempdir().unwrap();
    let prefix = Prefix::new(&tmp.path().join("emaint"), PrefixOptions::default());
    let key = dbh_ok(home.path(), &["key", "export"]);
    prefix.trust_key(key.as_bytes(), &fingerprint(home.path()));
    let out = prefix.run("emaint", &["binhost", "--check"], &[("PKGDIR", dir.to_str().unwrap())]);
    assert!(out.status.success() && combined(&out).trim().is_empty(), "emaint --check: {}", combined(&out));

    // Old logs go by age (setting binhost.log_max_age_days).
    let logs = home.path().join("logs/amd64");
    std::fs::create_dir_all(&logs).unwrap();
    std::fs::write(logs.join("old.log"), "x").unwrap();
    std::fs::write(logs.join("new.log"), "y").unwrap();
    let past = std::time::SystemTime::now() - std::time::Duration::from_secs(40 * 86_400);
    std::fs::File::options().write(true).open(logs.join("old.log")).unwrap().set_modified(past).unwrap();
    let out = dbh_ok(home.path(), &["binhost", "prune", "--target", "amd64"]);
    assert!(out.contains("old.log") && !logs.join("old.log").exists() && logs.join("new.log").exists(), "{out}");
}

#[test]
fn rm_of_a_dependency_warns_naming_the_dependant() {
    let (home, dir) = keyed_home();
    add(home.path(), &[HELLO, GREETER]);
    let out = cmd(home.path(), &["binhost", "rm", "--target", "amd64", "--dry-run", "dbh-test/hello"]).output().unwrap();
    assert!(out.status.success(), "{}", combined(&out));
    assert!(combined(&out).contains("would remove dbh-test/hello-1.0-1"), "{}", combined(&out));
    assert_eq!(indexed(&dir).len(), 2);
    let out = cmd(home.path(), &["binhost", "rm", "--target", "amd64", "dbh-test/hello"]).output().unwrap();
    let text = combined(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("warning: dbh-test/greeter-1.0-1 (still published) has RDEPEND on dbh-test/hello"), "{text}");
    assert_eq!(indexed(&dir), vec![("dbh-test/greeter-1.0".into(), 1)]);
    let gens = generations(home.path());
    assert_eq!(gens.last().unwrap()["removed"], serde_json::json!(["dbh-test/hello-1.0-1"]));
    check_clean(&dir);
    let out = cmd(home.path(), &["binhost", "rm", "--target", "amd64", "dbh-test/nothing"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(combined(&out).contains("matches `dbh-test/nothing`"), "{}", combined(&out));
}

/// The published Packages and Packages.gz are each exactly one recorded generation's index.
fn assert_one_whole_generation(dir: &Path, round: usize) {
    let gdir = dir.join(".dbh-generations");
    let mut texts = BTreeMap::new();
    for e in std::fs::read_dir(&gdir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if let Some(n) = name.strip_suffix(".Packages.gz") {
            texts.insert(gunzip(&p), n.to_owned());
        }
    }
    let plain = std::fs::read_to_string(dir.join("Packages")).unwrap();
    let gz = gunzip(&dir.join("Packages.gz"));
    assert!(texts.contains_key(&plain), "round {round}: Packages is no generation's index");
    assert!(texts.contains_key(&gz), "round {round}: Packages.gz is no generation's index");
    for (cpv, id) in indexed(dir) {
        let (cat, pf) = cpv.split_once('/').unwrap();
        let pn = pf.rsplit_once('-').unwrap().0;
        assert!(dir.join(format!("{cat}/{pn}/{pf}-{id}.gpkg.tar")).is_file(), "round {round}: {cpv}-{id} indexed but gone");
    }
}

#[test]
fn prune_and_rollback_survive_sigkill_anywhere() {
    let (home, dir) = keyed_home();
    add(home.path(), &[HELLO, GREETER]);
    for _ in 0..3 {
        add(home.path(), &[HELLO]);
    }
    let time = |args: &[&str]| {
        let t = std::time::Instant::now();
        let out = cmd(home.path(), args).output().unwrap();
        assert!(out.status.success(), "{}", combined(&out));
        t.elapsed().as_micros() as u64 + 1
    };
    let span = time(&["-q", "binhost", "rollback", "--target", "amd64", "--to", "1"])
        .max(time(&["-q", "binhost", "prune", "--target", "amd64", "--keep", "2", "--keep-generations", "4"]));
    let mut seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    eprintln!("sigkill seed {seed}, an operation takes {span} µs");
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for round in 0..24 {
        let gens = generations(home.path());
        let numbers: Vec<u64> = gens.iter().map(|g| g["generation"].as_u64().unwrap()).collect();
        let to = numbers[(next() % numbers.len() as u64) as usize].to_string();
        let keep = (1 + next() % 2).to_string();
        let keep_gens = (1 + next() % 4).to_string();
        let args: Vec<&str> = if round % 2 == 0 {
            vec!["-q", "binhost", "rollback", "--target", "amd64", "--to", &to]
        } else {
            vec!["-q", "binhost", "prune", "--target", "amd64", "--keep", &keep, "--keep-generations", &keep_gens]
        };
        let delay = std::time::Duration::from_micros(next() % (span * 12 / 10));
        let mut child = cmd(home.path(), &args).spawn().unwrap();
        std::thread::sleep(delay);
        let _ = child.kill();
        let _ = child.wait();
        assert_one_whole_generation(&dir, round);
        check_clean(&dir);
        // New generations for the next rounds (and an add after a kill recovers first).
        add(home.path(), &[HELLO]);
        assert_one_whole_generation(&dir, round);
    }
    check_clean(&dir);
    let stray: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".dbh-tmp") || n == ".dbh-prune")
        .collect();
    assert!(stray.is_empty() || stray.iter().all(|n| n == ".dbh-prune"), "left behind: {stray:?}");
}

#[test]
fn concurrent_add_and_prune_lose_nothing() {
    let (home, dir) = keyed_home();
    add(home.path(), &[HELLO, GREETER]);
    let rounds = 4;
    for _ in 0..rounds {
        let mut a = cmd(home.path(), &["-q", "binhost", "add", "--target", "amd64"]);
        a.arg(fixture(HELLO));
        let a = a.spawn().unwrap();
        let p = cmd(home.path(), &["-q", "binhost", "prune", "--target", "amd64", "--keep", "1", "--keep-generations", "1"]).spawn().unwrap();
        for c in [a, p] {
            let out = c.wait_with_output().unwrap();
            assert!(out.status.success(), "{}", combined(&out));
        }
        check_clean(&dir);
    }
    // Every add's package got a BUILD_ID; the newest is published, with its file.
    let hello: Vec<u64> = indexed(&dir).into_iter().filter(|(c, _)| c == "dbh-test/hello-1.0").map(|(_, i)| i).collect();
    assert!(hello.contains(&(1 + rounds)), "hello BUILD_IDs published: {hello:?}");
    assert!(indexed(&dir).iter().any(|(c, _)| c == "dbh-test/greeter-1.0"), "greeter was lost");
    assert_one_whole_generation(&dir, 0);
    check_clean(&dir);
}

/// `prune --unreferenced` (eclean-pkg's rule): a package whose ebuild its repository no longer has
/// leaves the index, with the repository that decided named; the rest stays and the binhost is
/// clean for `dbh binhost check`.
#[test]
fn prune_unreferenced_drops_what_the_repository_no_longer_has() {
    let (home, dir) = keyed_home();
    add(home.path(), &[HELLO, GREETER]);
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    crate::portage::copy_tree(&crate::portage::fixture_repo(), &repo);
    std::fs::remove_dir_all(repo.join("dbh-test/greeter")).unwrap();
    let repo_arg = repo.to_str().unwrap();

    let out = dbh_ok(home.path(), &["binhost", "prune", "--target", "amd64", "--unreferenced", "--repo", repo_arg, "--dry-run"]);
    let why = format!("repository dbh-test ({repo_arg}) has no dbh-test/greeter/greeter-1.0.ebuild");
    assert!(out.contains("would drop dbh-test/greeter-1.0-1") && out.contains(&why), "{out}");
    assert!(!out.contains("hello"), "{out}");
    assert_eq!(indexed(&dir).len(), 2, "--dry-run changed the index");

    let out = dbh_ok(home.path(), &["binhost", "prune", "--target", "amd64", "--unreferenced", "--repo", repo_arg]);
    assert!(out.contains(&why) && out.contains("dropped 1 package(s) from the index"), "{out}");
    assert_eq!(indexed(&dir), vec![("dbh-test/hello-1.0".into(), 1)]);
    let gens = generations(home.path());
    assert_eq!(gens.last().unwrap()["removed"], serde_json::json!(["dbh-test/greeter-1.0-1"]));
    check_clean(&dir);

    // Without a repository to ask, it says how to give one.
    let out = cmd(home.path(), &["binhost", "prune", "--target", "amd64", "--unreferenced"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", combined(&out));
    assert!(combined(&out).contains("--repo"), "{}", combined(&out));
}
