//! `dbh vm build`: real builds in the arm64 test guest (TCG or KVM, the image made by
//! `dbh vm image create` from the Debian-based test stage with gcc and Portage), published into
//! the host binhost, served by `dbh serve` and installed by a real Portage client that verifies
//! signatures. Three guest boots in one test, in order, sharing one $DBH_HOME:
//! 1. `broken` + `hello`: exit status non-zero, broken's log kept and shown, hello published;
//! 2. `greeter`: hello comes from the seeded binhost (not rebuilt), greeter is built; a client
//!    installs both and `hello` is an AArch64 ELF;
//! 3. `greeter` again: nothing to do, zero binpkgs transferred.

use std::path::Path;
use std::process::Output;

use super::cli::dbh;
use super::portage::{Prefix, PrefixOptions, combined, fixture_repo};
use super::serve::Serve;
use super::vm::{assert_no_qemu, product_home};

pub fn run(home: &Path, args: &[&str]) -> Output {
    let mut cmd = dbh();
    cmd.arg("--home").arg(home).args(args).env("XDG_CONFIG_HOME", home);
    for (k, _) in std::env::vars() {
        if k.starts_with("DBH_") {
            cmd.env_remove(k);
        }
    }
    cmd.output().unwrap()
}

fn build(home: &Path, atoms: &[&str]) -> Output {
    let repo = fixture_repo();
    let mut args = vec!["vm", "build", "--target", "arm64", "--repo", repo.to_str().unwrap(), "--profile", "dbh-test:dbh/arm64"];
    args.extend_from_slice(atoms);
    let out = run(home, &args);
    eprintln!("dbh vm build {atoms:?}: {}\n{}", out.status, combined(&out));
    out
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

    // Without a key nothing boots.
    let out = build(home, &["dbh-test/hello"]);
    assert!(!out.status.success());
    let text = combined(&out);
    assert!(text.contains("dbh key generate"), "{text}");
    assert!(!home.join("images/arm64/run/state.json").exists());

    let key = run(home, &["key", "generate"]);
    assert!(key.status.success(), "{}", combined(&key));

    // 1. A failing package beside a good one.
    let out = build(home, &["dbh-test/broken", "dbh-test/hello"]);
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

    // 2. greeter: hello is reused from the binhost, greeter built and published.
    let out = build(home, &["dbh-test/greeter"]);
    let text = combined(&out);
    assert!(out.status.success(), "{text}");
    assert!(stdout(&out).contains("published dbh-test/greeter-1.0 (BUILD_ID 1)"), "{text}");
    assert!(stdout(&out).contains("arm64: 1 binpkg(s) transferred"), "hello must come from the binhost:\n{text}");
    assert_no_qemu(home);
    let index = std::fs::read_to_string(home.join("binhost/arm64/Packages")).unwrap();
    assert!(index.contains("CHOST: aarch64-unknown-linux-gnu"), "{index}");
    assert!(index.contains("CPV: dbh-test/greeter-1.0") && index.contains("CPV: dbh-test/hello-1.0"), "{index}");

    // A real Portage client installs from `dbh serve`, verifying signatures.
    let (_tmp, client) = install_from_serve(home, "arm64", "dbh-test/greeter");
    assert_elf_machine(&client.root.join("usr/bin/hello"), 183);
    assert!(client.root.join("usr/bin/greeter").is_file());

    // 3. Nothing to do: no binpkg comes back.
    let out = build(home, &["dbh-test/greeter"]);
    let text = combined(&out);
    assert!(out.status.success(), "{text}");
    assert!(stdout(&out).contains("arm64: 0 binpkg(s) transferred, 0 published"), "{text}");
    assert_no_qemu(home);
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
