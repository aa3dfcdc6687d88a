//! The client trust script (`GET /<target>/trust.sh`, `dbh binhost conf --trust-script`) against
//! Gentoo's own key handling: the real getuto (vendored unmodified in tests/fixtures/getuto) with
//! `ROOT` = a client prefix and a stand-in `gentoo-release.asc`, real gpg, real Portage verifying
//! with `verify-signature = true`, real `dbh serve`.
//!
//! "Gentoo's binhost" is a second dbh home whose signing key plays the release key: its public key
//! is the prefix's `usr/share/openpgp-keys/gentoo-release.asc`, and it publishes dbh-test/hello;
//! dbh's binhost publishes dbh-test/greeter (which depends on hello). So `emerge --getbinpkgonly
//! greeter` needs both keys trusted at once.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

use crate::portage::{built_pkgdir, combined, Prefix, PrefixOptions};
use crate::publish::{dbh_ok, fingerprint};
use crate::serve::Serve;

fn getuto() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/getuto/getuto")
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A dbh home publishing `pkgs` (paths under the Portage-built PKGDIR) signed by its own key.
fn home_with(pkgs: &[&str], uid: &str) -> (tempfile::TempDir, String) {
    let home = tempfile::Builder::new().prefix("dbh-trust-").tempdir().unwrap();
    dbh_ok(home.path(), &["key", "generate", "--uid", uid]);
    let src = built_pkgdir();
    let files: Vec<String> = pkgs.iter().map(|p| src.join(p).display().to_string()).collect();
    let mut args = vec!["binhost", "add", "--target", "amd64"];
    args.extend(files.iter().map(String::as_str));
    dbh_ok(home.path(), &args);
    let fpr = fingerprint(home.path());
    (home, fpr)
}

/// Runs a trust script as root with `ROOT=root`, the way a user runs it (`sh trust.sh`).
fn run_script(script: &Path, root: &Path, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new("sh");
    cmd.arg(script).env("ROOT", root).env_remove("GNUPGHOME").env("LC_ALL", "C.UTF-8");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

/// A client prefix with Gentoo's stand-in release keys installed and both binhosts configured.
fn client(dir: &Path, release_key: &str, gentoo_url: &str, dbh_conf: &str, make_conf: &str) -> Prefix {
    let cl = Prefix::new(dir, PrefixOptions { make_conf, ..PrefixOptions::default() });
    let keys = cl.root.join("usr/share/openpgp-keys");
    std::fs::create_dir_all(&keys).unwrap();
    std::fs::write(keys.join("gentoo-release.asc"), release_key).unwrap();
    // Like a stage3's binrepos.conf/gentoobinhost.conf (verify-signature comes from Portage's
    // [DEFAULT]); lower priority than dbh's.
    cl.add_binrepo("gentoobinhost", &format!("[gentoobinhost]\nsync-uri = {gentoo_url}/amd64/\npriority = 1\n"));
    cl.add_binrepo("dbh-amd64", dbh_conf);
    cl
}

fn install_both(cl: &Prefix, what: &str) -> String {
    let out = cl.run("emerge", &["--getbinpkgonly", "--quiet-build=y", "dbh-test/greeter"], &[]);
    let log = combined(&out);
    assert!(out.status.success(), "{what}: emerge --getbinpkgonly failed:\n{log}");
    assert!(!log.contains("verification failed") && !log.contains("undefined trust"), "{what}:\n{log}");
    let hello = Command::new(cl.root.join("usr/bin/hello")).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&hello.stdout), "hello from dbh-test\n", "{what}:\n{log}");
    for cpv in ["dbh-test/hello-1.0", "dbh-test/greeter-1.0"] {
        assert!(cl.root.join("var/db/pkg").join(cpv).is_dir(), "{what}: {cpv} is not installed:\n{log}");
    }
    log
}

#[test]
fn trust_script_with_real_getuto_keeps_gentoo_and_dbh_keys_verifying() {
    if !is_root() {
        crate::skip("getuto and Portage's keyring need root");
        return;
    }
    let (gentoo, gentoo_fpr) = home_with(&["dbh-test/hello/hello-1.0-1.gpkg.tar"], "Gentoo stand-in release <releng@example.org>");
    let (dbh, dbh_fpr) = home_with(&["dbh-test/greeter/greeter-1.0-1.gpkg.tar"], "dbh test binhost <test@dbh.invalid>");
    assert_ne!(gentoo_fpr, dbh_fpr);
    let release_key = dbh_ok(gentoo.path(), &["key", "export"]);
    let gentoo_srv = Serve::start(gentoo.path(), None, &[], &[]);
    let dbh_srv = Serve::start(dbh.path(), None, &[], &[]);
    // Two hosts, since Portage keys its index cache by host name and path.
    let gentoo_url = format!("http://localhost:{}", gentoo_srv.addr.rsplit(':').next().unwrap());
    let http = reqwest::blocking::Client::new();
    let conf = http.get(dbh_srv.url("/amd64/binrepos.conf")).send().unwrap().text().unwrap();
    assert!(conf.contains("/amd64/trust.sh") && !conf.contains("import-ownertrust"), "{conf}");
    let page = http.get(dbh_srv.url("/amd64/")).send().unwrap().text().unwrap();
    assert!(page.contains("href=\"trust.sh\"") && page.contains("locally signs it"), "{page}");
    let resp = http.get(dbh_srv.url("/amd64/trust.sh")).send().unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/x-shellscript"));
    let script_text = resp.text().unwrap();
    assert!(script_text.starts_with("#!/bin/sh\n") && script_text.contains(&format!("DBH_FPR='{dbh_fpr}'")));

    let tmp = tempfile::tempdir().unwrap();
    let out = crate::portage::output_dir("trust");
    let script = tmp.path().join("trust.sh");
    std::fs::write(&script, &script_text).unwrap();

    // 1. getuto installed: the script lets getuto create the keyring, then adds dbh's key.
    let root = tmp.path().join("cl");
    let helper = tmp.path().join("trust-helper");
    // Portage runs PORTAGE_TRUST_HELPER with its own environment; this client's ROOT is the prefix.
    std::fs::write(&helper, format!("#!/bin/sh\nROOT='{}' exec bash '{}' \"$@\"\n", root.display(), getuto().display())).unwrap();
    Command::new("chmod").arg("755").arg(&helper).status().unwrap();
    let cl = client(&root, &release_key, &gentoo_url, &conf, &format!("PORTAGE_TRUST_HELPER=\"{}\"", helper.display()));
    let getuto_env = [("GETUTO", helper.to_str().unwrap()), ("DBH_FINGERPRINT", dbh_fpr.as_str())];
    let o = run_script(&script, &root, &getuto_env);
    std::fs::write(out.join("trust-1.log"), combined(&o)).unwrap();
    assert!(o.status.success(), "trust.sh failed:\n{}", combined(&o));
    let text = combined(&o);
    assert!(text.contains("to create") && text.contains("Initializing"), "getuto did not create the keyring:\n{text}");
    assert!(text.contains(&format!("locally signed key {dbh_fpr}")), "{text}");
    assert!(cl.gnupg().join("pass").is_file() && cl.gnupg().join("mykeyid").is_file());

    // Portage runs the real getuto (due for a refresh) before fetching; both keys verify after it.
    let last = cl.gnupg().join(".getuto.last");
    let old = SystemTime::now() - Duration::from_secs(3 * 86400);
    std::fs::File::options().write(true).open(&last).unwrap().set_modified(old).unwrap();
    let log = install_both(&cl, "after trust.sh with getuto");
    std::fs::write(out.join("emerge-1.log"), &log).unwrap();
    let refreshed = std::fs::metadata(&last).unwrap().modified().unwrap();
    assert!(refreshed > old + Duration::from_secs(86400), "Portage did not run getuto's refresh:\n{log}");
    // hello came signed by the stand-in release key, greeter by dbh's key.
    let (g, d) = (gentoo_srv.log(), dbh_srv.log());
    assert!(g.contains("GET /amd64/dbh-test/hello/hello-1.0-1.gpkg.tar 200"), "{g}");
    assert!(d.contains("GET /amd64/dbh-test/greeter/greeter-1.0-1.gpkg.tar 200"), "{d}");

    // Idempotent: a second run changes nothing and still succeeds.
    let o = run_script(&script, &root, &getuto_env);
    assert!(o.status.success() && combined(&o).contains("already locally signed"), "{}", combined(&o));
    // getuto run by hand again (refresh due) leaves both trusted: reinstall both from the binhosts.
    std::fs::File::options().write(true).open(&last).unwrap().set_modified(old).unwrap();
    let g = Command::new(&helper).arg("-v").env("LC_ALL", "C.UTF-8").output().unwrap();
    assert!(g.status.success(), "getuto refresh failed:\n{}", combined(&g));
    assert!(combined(&g).contains("Updating GnuPG keyring"), "{}", combined(&g));
    let _ = std::fs::remove_dir_all(cl.root.join("var/cache/binhost"));
    let o = cl.run("emerge", &["--getbinpkgonly", "--oneshot", "dbh-test/hello", "dbh-test/greeter"], &[]);
    assert!(o.status.success() && !combined(&o).contains("verification failed"), "{}", combined(&o));

    // 2. Without getuto: the same script (this time from the CLI) makes a keyring getuto's way.
    let cli_script = dbh_ok(dbh.path(), &["binhost", "conf", "--target", "amd64", "--url", &dbh_srv.url(""), "--trust-script"]);
    assert!(cli_script.contains(&format!("DBH_FPR='{dbh_fpr}'")));
    let script2 = tmp.path().join("trust-cli.sh");
    std::fs::write(&script2, &cli_script).unwrap();
    let root2 = tmp.path().join("cl2");
    let cl2 = client(&root2, &release_key, &gentoo_url, &conf, "");
    let o = run_script(&script2, &root2, &[("GETUTO", "/nonexistent/getuto")]);
    std::fs::write(out.join("trust-2.log"), combined(&o)).unwrap();
    assert!(o.status.success() && combined(&o).contains("getuto is not installed"), "{}", combined(&o));
    install_both(&cl2, "after trust.sh without getuto");
    // A later getuto (installed afterwards) refreshing that keyring keeps both verifying too.
    let helper2 = tmp.path().join("trust-helper2");
    std::fs::write(&helper2, format!("#!/bin/sh\nROOT='{}' exec bash '{}' \"$@\"\n", root2.display(), getuto().display())).unwrap();
    Command::new("chmod").arg("755").arg(&helper2).status().unwrap();
    std::fs::File::options().write(true).open(cl2.gnupg().join(".getuto.last")).unwrap().set_modified(old).unwrap();
    let g = Command::new(&helper2).env("LC_ALL", "C.UTF-8").output().unwrap();
    assert!(g.status.success(), "{}", combined(&g));
    let _ = std::fs::remove_dir_all(cl2.root.join("var/cache/binhost"));
    let o = cl2.run("emerge", &["--getbinpkgonly", "--oneshot", "dbh-test/hello", "dbh-test/greeter"], &[]);
    assert!(o.status.success() && !combined(&o).contains("verification failed"), "{}", combined(&o));
}

#[test]
fn trust_script_stops_on_a_tampered_key_a_wrong_fingerprint_or_a_foreign_keyring() {
    if !is_root() {
        crate::skip("the trust script needs root");
        return;
    }
    let home = tempfile::tempdir().unwrap();
    dbh_ok(home.path(), &["key", "generate", "--uid", "dbh test binhost <test@dbh.invalid>"]);
    let fpr = fingerprint(home.path());
    let script = dbh_ok(home.path(), &["binhost", "conf", "--target", "amd64", "--url", "http://h:1", "--trust-script"]);
    let tmp = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = tmp.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let no_getuto = [("GETUTO", "/nonexistent/getuto")];

    // A flipped character inside the key block: in its first base64 line, the public-key packet
    // (after the armor headers and their blank line).
    let lines: Vec<&str> = script.lines().collect();
    let start = lines.iter().position(|l| l.starts_with("-----BEGIN PGP PUBLIC KEY BLOCK")).unwrap();
    let blank = start + lines[start..].iter().position(|l| l.trim().is_empty()).unwrap();
    let victim = blank + 1;
    assert!(lines[victim].len() > 20, "not a base64 line: {}", lines[victim]);
    let mut tampered_lines: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    let mut chars: Vec<char> = tampered_lines[victim].chars().collect();
    chars[10] = if chars[10] == 'A' { 'B' } else { 'A' };
    tampered_lines[victim] = chars.into_iter().collect();
    let tampered = write("tampered.sh", &(tampered_lines.join("\n") + "\n"));
    let root = tmp.path().join("r1");
    let o = run_script(&tampered, &root, &no_getuto);
    let text = combined(&o);
    assert!(!o.status.success(), "a tampered key was accepted:\n{text}");
    assert!(text.contains("error: the binhost key in this script"), "{text}");
    assert!(!root.join("etc/portage/gnupg").exists(), "the keyring was touched before the key was checked");

    // The fingerprint written into the script does not match its key.
    let mut other = fpr.clone();
    other.replace_range(0..1, if fpr.starts_with('0') { "1" } else { "0" });
    let mismatch = write("mismatch.sh", &script.replace(&format!("DBH_FPR='{fpr}'"), &format!("DBH_FPR='{other}'")));
    let o = run_script(&mismatch, &root, &no_getuto);
    let text = combined(&o);
    assert!(!o.status.success() && text.contains(&format!("has fingerprint {fpr}, not {other}")), "{text}");
    assert!(!root.join("etc/portage/gnupg").exists());

    // The user's own fingerprint (from the binhost's operator) disagrees.
    let good = write("good.sh", &script);
    let o = run_script(&good, &root, &[("GETUTO", "/nonexistent/getuto"), ("DBH_FINGERPRINT", &other)]);
    assert!(!o.status.success() && combined(&o).contains("(DBH_FINGERPRINT)"), "{}", combined(&o));

    // A keyring made by the old "import + ownertrust" steps (no getuto pass file) is refused with the fix.
    let cl = Prefix::new(&tmp.path().join("old"), PrefixOptions::default());
    cl.trust_key(dbh_ok(home.path(), &["key", "export"]).as_bytes(), &fpr);
    let o = run_script(&good, &cl.root, &no_getuto);
    let text = combined(&o);
    assert!(!o.status.success() && text.contains("has no pass file") && text.contains("mv "), "{text}");
}
