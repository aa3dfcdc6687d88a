//! The cross backend and `--backend auto` on the host: real Portage (the test venv, named through
//! the `portage.emerge` setting) with Debian's aarch64 cross gcc builds the fixture packages for
//! arm64 into a per-target sysroot; dbh signs and publishes them; a real Portage client installs
//! them from `dbh serve` with verify-signature on. No guest is booted.

use std::path::Path;

use super::portage::{combined, fixture_repo, portage};
use super::vm_build::{assert_elf_machine, install_from_serve, run, stdout, walk};

/// A home with a signing key whose settings file points dbh at the test Portage venv.
fn cross_home() -> tempfile::TempDir {
    let home = tempfile::Builder::new().prefix("dbh-cross-").tempdir().unwrap();
    // `run` scrubs DBH_* and sets XDG_CONFIG_HOME = home: the user config file carries the setting.
    std::fs::create_dir_all(home.path().join("dbh")).unwrap();
    std::fs::write(
        home.path().join("dbh/dbh.toml"),
        format!("[portage]\nemerge = \"{}\"\n", portage().venv.join("bin/emerge").display()),
    )
    .unwrap();
    let key = run(home.path(), &["key", "generate"]);
    assert!(key.status.success(), "{}", combined(&key));
    home
}

fn build(home: &Path, command: &[&str], atoms: &[&str]) -> std::process::Output {
    let repo = fixture_repo();
    let mut args = command.to_vec();
    args.extend(["--target", "arm64", "--repo", repo.to_str().unwrap(), "--profile", "dbh-test:dbh/arm64"]);
    args.extend_from_slice(atoms);
    let out = run(home, &args);
    eprintln!("dbh {} {atoms:?}: {}\n{}", command.join(" "), out.status, combined(&out));
    out
}

#[test]
fn cross_build_publishes_aarch64_packages_that_a_client_installs() {
    let home = cross_home();
    let home = home.path();

    let out = build(home, &["cross", "build"], &["dbh-test/hello"]);
    assert!(out.status.success(), "{}", combined(&out));
    assert!(stdout(&out).contains("published dbh-test/hello-1.0 (BUILD_ID 1)"), "{}", combined(&out));

    // greeter depends on hello, which is already in the sysroot: only greeter is built.
    let out = build(home, &["cross", "build"], &["dbh-test/greeter"]);
    assert!(out.status.success(), "{}", combined(&out));
    assert!(stdout(&out).contains("published dbh-test/greeter-1.0 (BUILD_ID 1)"), "{}", combined(&out));
    assert!(stdout(&out).contains("arm64: 1 binpkg(s) transferred"), "{}", combined(&out));
    assert_elf_machine(&home.join("cross/arm64/sysroot/usr/bin/hello"), 183);

    // The index says what a client checks: the target's CHOST and ARCH, not Debian's triplet.
    let index = std::fs::read_to_string(home.join("binhost/arm64/Packages")).unwrap();
    for stanza in index.split("\n\n").filter(|s| s.contains("CPV: ")) {
        let chost = stanza
            .lines()
            .find(|l| l.starts_with("CHOST: "))
            .unwrap_or_else(|| index.lines().take_while(|l| !l.is_empty()).find(|l| l.starts_with("CHOST: ")).unwrap_or(""));
        assert_eq!(chost, "CHOST: aarch64-unknown-linux-gnu", "{stanza}");
    }
    assert!(index.lines().any(|l| l == "ARCH: arm64"), "{index}");
    assert!(index.contains("CPV: dbh-test/greeter-1.0") && index.contains("CPV: dbh-test/hello-1.0"), "{index}");

    let (_tmp, client) = install_from_serve(home, "arm64", "dbh-test/greeter");
    assert_elf_machine(&client.root.join("usr/bin/hello"), 183);
    assert!(client.root.join("usr/bin/greeter").is_file());

    // Nothing changed: nothing is built or published again.
    let out = build(home, &["cross", "build"], &["dbh-test/greeter", "dbh-test/hello"]);
    assert!(out.status.success(), "{}", combined(&out));
    assert!(stdout(&out).contains("arm64: 0 binpkg(s) transferred, 0 published"), "{}", combined(&out));
}

#[test]
fn failed_cross_build_hints_at_the_vm_backend_and_keeps_the_rest() {
    let home = cross_home();
    let home = home.path();

    // `auto` takes the cross backend for cross-safe packages and says why.
    let out = build(home, &["build"], &["dbh-test/broken", "dbh-test/hello"]);
    let text = combined(&out);
    assert!(
        text.contains("backend: cross (dbh-test/broken, dbh-test/hello are listed as cross-safe for arm64 and aarch64-"),
        "{text}"
    );
    assert!(!out.status.success(), "a failed package must fail the command:\n{text}");
    assert!(text.contains("failed to build for arm64 with the cross backend: dbh-test/broken-1.0"), "{text}");
    assert!(text.contains("hint:") && text.contains("--backend vm"), "{text}");
    assert!(text.contains("fails on purpose"), "the log tail is shown:\n{text}");
    // What did build is published, and the failed package's log is kept.
    assert!(stdout(&out).contains("published dbh-test/hello-1.0 (BUILD_ID 1)"), "{text}");
    let logs: Vec<_> = walk(&home.join("logs/arm64")).into_iter().filter(|p| p.ends_with("dbh-test:broken-1.0.log")).collect();
    assert_eq!(logs.len(), 1, "the broken package's log is kept");
    assert!(std::fs::read_to_string(&logs[0]).unwrap().contains("fails on purpose"));
    let check = run(home, &["binhost", "check", home.join("binhost/arm64").to_str().unwrap()]);
    assert!(check.status.success(), "{}", combined(&check));
}

/// `dbh build --backend chroot`: the stage of the arm64 test image, unpacked, runs emerge under
/// qemu-user (binfmt_misc with the F flag) in bubblewrap; the packages are published and a client
/// installs them. Where binfmt_misc has no such handler or bubblewrap cannot make its sandbox, the
/// test checks the explained refusal instead (and says so in its output).
#[test]
fn chroot_build_runs_the_stage_under_qemu_user() {
    let Some(image) = super::image::image_home("arm64") else { return };
    let home = cross_home();
    let home = home.path();
    // Only what the chroot backend reads of the image: image.toml and the downloaded stage.
    std::fs::create_dir_all(home.join("images/arm64")).unwrap();
    std::fs::copy(image.join("images/arm64/image.toml"), home.join("images/arm64/image.toml")).unwrap();
    let info = dbh::image::ImageInfo::load(&home.join("images/arm64")).unwrap();
    let cached = dbh::image::stage::cached_path(&info.stage.location, &image.join("cache"));
    std::fs::create_dir_all(home.join("cache")).unwrap();
    std::os::unix::fs::symlink(&cached, dbh::image::stage::cached_path(&info.stage.location, &home.join("cache"))).unwrap();

    let out = build(home, &["build", "--backend", "chroot"], &["dbh-test/greeter"]);
    let text = combined(&out);
    let targets = dbh::target::Targets::builtin();
    if let Err(e) = dbh::build::chroot::preflight(targets.get("arm64").unwrap()) {
        eprintln!("NOTE: the chroot backend cannot run here ({e}); checking the refusal instead of a build");
        assert!(!out.status.success(), "{text}");
        assert!(text.contains(&e.to_string()) && text.contains("hint:"), "{text}");
        assert!(!home.join("binhost/arm64/Packages").exists());
        return;
    }
    assert!(out.status.success(), "{text}");
    assert!(stdout(&out).contains("published dbh-test/hello-1.0 (BUILD_ID 1)"), "{text}");
    assert!(stdout(&out).contains("published dbh-test/greeter-1.0 (BUILD_ID 1)"), "{text}");
    // Built by the stage's own (AArch64) gcc, run through qemu-user.
    assert_elf_machine(&home.join("chroot/arm64/root/usr/bin/hello"), 183);
    let (_tmp, client) = install_from_serve(home, "arm64", "dbh-test/greeter");
    assert_elf_machine(&client.root.join("usr/bin/hello"), 183);
}
