//! `dbh client explain` against real Portage clients (prefixes of the test venv) of a binhost
//! served by `dbh serve`: a USE mismatch and a keyword mismatch each make `emerge -pv
//! --getbinpkg` build from source; explain names exactly that package and flag (or keyword) and
//! prints the line that fixes it; with the line added, real emerge takes the binpkg and explain
//! exits 0. A client whose cached index is older than the binhost's (a `frozen` binrepo, so
//! Portage keeps its copy) gets "stale cache" and the `rm` that fixes it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::cli::dbh;
use crate::portage::{Prefix, PrefixOptions, built_pkgdir, combined, copy_tree, fixture_repo, portage};
use crate::publish::{dbh_ok, fingerprint, published_home};
use crate::serve::Serve;

/// `dbh client explain` run the way a user on the client runs it: with the client's Portage
/// environment (the prefix's EPREFIX and config root) and `portage.emerge` naming its emerge.
fn explain(cl: &Prefix, url: &str, atoms: &[&str]) -> Output {
    let p = portage();
    let mut cmd: Command = dbh();
    cmd.env_clear()
        .env("HOME", cl.root.join("home"))
        .env("PATH", format!("{}:{}:/usr/sbin:/usr/bin:/sbin:/bin", p.shim.display(), p.venv.join("bin").display()))
        .env("PORTAGE_OVERRIDE_EPREFIX", &cl.root)
        .env("PORTAGE_CONFIGROOT", &cl.root)
        .env("DBH_PORTAGE_EMERGE", p.venv.join("bin/emerge"))
        .args(["client", "explain", "--binhost", url])
        .args(atoms);
    let out = cmd.output().unwrap();
    eprintln!("dbh client explain {atoms:?}: {}\n{}", out.status, combined(&out));
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A client of `url` (binrepos.conf from `dbh binhost conf`, the key trusted).
fn client(dir: &Path, home: &Path, url: &str, repos: &[PathBuf]) -> Prefix {
    let cl = Prefix::new(dir, PrefixOptions { repos, ..PrefixOptions::default() });
    let conf = dbh_ok(home, &["binhost", "conf", "--target", "amd64", "--url", url.trim_end_matches("/amd64")]);
    cl.add_binrepo("dbh", &conf);
    cl.trust_key(dbh_ok(home, &["key", "export"]).as_bytes(), &fingerprint(home));
    cl
}

/// `[binary` or `[ebuild` for `cpv` in emerge's plan.
fn planned(cl: &Prefix, atom: &str, cpv: &str) -> &'static str {
    let text = cl.ok("emerge", &["--pretend", "--verbose", "--getbinpkg", atom], &[]);
    let line = text.lines().find(|l| l.contains(cpv)).unwrap_or_else(|| panic!("{cpv} not planned:\n{text}"));
    if line.starts_with("[binary") {
        "binary"
    } else if line.starts_with("[ebuild") {
        "ebuild"
    } else {
        panic!("{line}")
    }
}

#[test]
fn explain_names_the_flag_and_the_line_that_takes_the_binpkg() {
    let (home, _) = published_home();
    let serve = Serve::start(home.path(), None, &[], &[]);
    let url = serve.url("/amd64");
    let tmp = tempfile::tempdir().unwrap();
    let cl = client(&tmp.path().join("cl"), home.path(), &url, &[]);

    // As configured, everything comes from the binhost: exit 0.
    let out = explain(&cl, &url, &["dbh-test/greeter"]);
    assert!(out.status.success(), "{}", combined(&out));
    assert!(stdout(&out).contains("2 package(s) from a binhost, 0 from source"), "{}", combined(&out));

    // The binhost built hello with USE=-debug; this client turns debug on.
    std::fs::write(cl.root.join("etc/portage/package.use"), "dbh-test/hello debug\n").unwrap();
    assert_eq!(planned(&cl, "dbh-test/greeter", "dbh-test/hello-1.0"), "ebuild");
    let out = explain(&cl, &url, &["dbh-test/greeter"]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{}", combined(&out));
    assert!(text.contains("dbh-test/hello-1.0: built from source: USE differs: the binhost built it with debug off, this client wants it on"), "{text}");
    assert!(!text.contains("dbh-test/greeter-1.0: built from source"), "only hello is named: {text}");
    let line = text.lines().find_map(|l| l.trim().strip_prefix("fix: add to /etc/portage/package.use:")).expect("a package.use line").trim().to_owned();
    assert_eq!(line, "dbh-test/hello -debug");

    // With the printed line, real emerge takes the binpkg and explain is satisfied.
    std::fs::write(cl.root.join("etc/portage/package.use"), format!("dbh-test/hello debug\n{line}\n")).unwrap();
    assert_eq!(planned(&cl, "dbh-test/greeter", "dbh-test/hello-1.0"), "binary");
    assert!(explain(&cl, &url, &["dbh-test/greeter"]).status.success());
}

/// A repository `dbh-extra` whose hello-1.1 is keyworded ~amd64 only.
fn extra_repo(dir: &Path) -> PathBuf {
    let repo = dir.join("extra");
    std::fs::create_dir_all(repo.join("profiles")).unwrap();
    std::fs::create_dir_all(repo.join("metadata")).unwrap();
    std::fs::write(repo.join("profiles/repo_name"), "dbh-extra\n").unwrap();
    std::fs::write(repo.join("metadata/layout.conf"), "masters = dbh-test\nthin-manifests = true\nsign-manifests = false\n").unwrap();
    let hello = repo.join("dbh-test/hello");
    std::fs::create_dir_all(&hello).unwrap();
    copy_tree(&fixture_repo().join("dbh-test/hello/files"), &hello.join("files"));
    let ebuild = std::fs::read_to_string(fixture_repo().join("dbh-test/hello/hello-1.0.ebuild")).unwrap();
    let ebuild: String = ebuild.lines().map(|l| if l.starts_with("KEYWORDS=") { "KEYWORDS=\"~amd64\"" } else { l }).collect::<Vec<_>>().join("\n");
    std::fs::write(hello.join("hello-1.1.ebuild"), ebuild + "\n").unwrap();
    repo
}

#[test]
fn explain_names_the_keyword_and_a_stale_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let extra = extra_repo(tmp.path());
    let repos = [extra.clone()];
    // The binhost carries hello-1.1 (built where ~amd64 is accepted) and greeter.
    let bld = Prefix::new(&tmp.path().join("bld"), PrefixOptions { repos: &repos, make_conf: "ACCEPT_KEYWORDS=\"amd64 ~amd64\"\n", ..PrefixOptions::default() });
    bld.ok("emerge", &["--buildpkg", "--quiet-build=y", "=dbh-test/hello-1.1"], &[]);
    let home = tempfile::Builder::new().prefix("dbh-explain-").tempdir().unwrap();
    let home = home.path();
    dbh_ok(home, &["key", "generate", "--uid", "t <t@dbh.invalid>"]);
    let hello = bld.pkgdir().join("dbh-test/hello/hello-1.1-1.gpkg.tar");
    dbh_ok(home, &["binhost", "add", "--target", "amd64", hello.to_str().unwrap()]);
    let serve = Serve::start(home, None, &[], &[]);
    let url = serve.url("/amd64");

    // A stable client: hello-1.1 is not visible, hello-1.0 is built from source.
    let cl = client(&tmp.path().join("cl"), home, &url, &repos);
    assert_eq!(planned(&cl, "dbh-test/hello", "dbh-test/hello-1.0"), "ebuild");
    let out = explain(&cl, &url, &["dbh-test/hello"]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{}", combined(&out));
    assert!(text.contains("dbh-test/hello-1.0: built from source: keyword: the binhost has dbh-test/hello-1.1 (KEYWORDS=\"~amd64\")"), "{text}");
    let line = text.lines().find_map(|l| l.trim().strip_prefix("fix: add to /etc/portage/package.accept_keywords:")).expect("a keywords line").trim().to_owned();
    assert_eq!(line, "=dbh-test/hello-1.1 ~amd64");
    std::fs::write(cl.root.join("etc/portage/package.accept_keywords"), format!("{line}\n")).unwrap();
    assert_eq!(planned(&cl, "dbh-test/hello", "dbh-test/hello-1.1"), "binary");
    assert!(explain(&cl, &url, &["dbh-test/hello"]).status.success());

    // Stale cache: the client keeps its copy (frozen), the binhost gets greeter afterwards.
    let conf = cl.root.join("etc/portage/binrepos.conf/dbh.conf");
    let frozen = std::fs::read_to_string(&conf).unwrap() + "frozen = yes\n";
    std::fs::write(&conf, frozen).unwrap();
    std::thread::sleep(std::time::Duration::from_secs(1)); // a newer TIMESTAMP
    let greeter = built_pkgdir().join("dbh-test/greeter/greeter-1.0-1.gpkg.tar");
    dbh_ok(home, &["binhost", "add", "--target", "amd64", greeter.to_str().unwrap()]);
    assert_eq!(planned(&cl, "dbh-test/greeter", "dbh-test/greeter-1.0"), "ebuild");
    let out = explain(&cl, &url, &["dbh-test/greeter"]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{}", combined(&out));
    let cache = cl.root.join("var/cache/edb/binhost").join(serve.addr.split(':').next().unwrap()).join("amd64/Packages");
    assert!(text.contains(&format!("stale cache: {} has TIMESTAMP", cache.display())), "{text}");
    assert!(text.contains(&format!("fix: rm -f {}", cache.display())), "{text}");
    assert!(text.contains("dbh-test/greeter-1.0: built from source: the binhost has it, but the client's cached index"), "{text}");
    std::fs::remove_file(&cache).unwrap();
    assert_eq!(planned(&cl, "dbh-test/greeter", "dbh-test/greeter-1.0"), "binary");
}
