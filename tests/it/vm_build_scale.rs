//! `dbh vm build` at the scale of a real binhost: 2 000 generated packages (≥ 1 GB) and a
//! repository of 20 000 generated ebuilds (`scale_gen`, cached in ~/.cache/dbh-tests/scale). A
//! nothing-new `--update` of the target's world is decided by the host's real Portage (from the
//! test venv) before any guest boots: it finishes in seconds, and dbh's own peak RSS (VmHWM of
//! the dbh process, sampled from /proc) stays under 200 MB — nothing of the binhost is read into
//! dbh's memory or copied anywhere.

use std::path::Path;
use std::time::{Duration, Instant};

use super::cli::dbh;
use super::portage::{combined, fixture_repo};
use super::scale_gen;

/// A user's `$DBH_HOME` with `binhost` as the arm64 binhost, a signing key and the generated
/// world; returns the target's Portage configuration directory.
fn user_home(home: &Path, binhost: &Path) -> std::path::PathBuf {
    std::fs::create_dir_all(home.join("binhost")).unwrap();
    std::os::unix::fs::symlink(binhost, home.join("binhost/arm64")).unwrap();
    let key = super::vm_build::run(home, &["key", "generate"]);
    assert!(key.status.success(), "{}", combined(&key));
    let cfg = home.join("targets/arm64/portage");
    std::fs::create_dir_all(&cfg).unwrap();
    std::fs::write(cfg.join("world"), scale_gen::world()).unwrap();
    cfg
}

#[test]
fn a_nothing_new_update_over_a_2000_package_binhost_and_20000_ebuilds_boots_nothing() {
    let emerge = super::portage::portage().venv.join("bin/emerge");
    let dbh_bin = Path::new(env!("CARGO_BIN_EXE_dbh"));
    let t0 = Instant::now();
    let repo = scale_gen::repo(&fixture_repo(), 20_000);
    let binhost = scale_gen::binhost(dbh_bin, 2_000, 520 * 1024);
    eprintln!("scale fixtures ready in {:?}", t0.elapsed());
    let bytes: u64 = super::vm_build::walk(&binhost).iter().map(|p| std::fs::metadata(p).unwrap().len()).sum();
    assert!(bytes >= 1_000_000_000, "the binhost is {bytes} bytes");

    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let cfg = user_home(home, &binhost);

    let mut cmd = dbh();
    cmd.arg("--home").arg(home).env("XDG_CONFIG_HOME", home).env("DBH_PORTAGE_EMERGE", &emerge);
    cmd.args(["vm", "build", "--target", "arm64", "--update", "--repo"]).arg(&repo).args(["--profile", "dbh-scale:dbh/arm64"]);
    // The first run makes the repository's snapshot (once per revision: mksquashfs of 20 000
    // ebuilds); the daily re-run finds it cached.
    let first = cmd.output().unwrap();
    assert!(first.status.success(), "{}", combined(&first));
    let t = Instant::now();
    let (out, peak_kb) = scale_gen::run_measured(&mut cmd);
    let wall = t.elapsed();
    let text = combined(&out);
    eprintln!("nothing-new re-run: {wall:?}, dbh VmHWM {peak_kb} kB\n{text}");
    assert!(out.status.success(), "{text}");
    assert!(text.contains("arm64: nothing to build, no guest booted"), "{text}");
    assert!(text.contains(&format!("all {} package(s) of the request are in the binhost", scale_gen::WORLD)), "{text}");
    assert!(peak_kb > 0 && peak_kb < 200 * 1024, "dbh's peak RSS {peak_kb} kB");
    // Bare boot of the arm64 guest under TCG is ~16 s; with nothing to do there is no boot at all.
    assert!(wall < Duration::from_secs(20), "{wall:?}");
    assert!(!home.join("images/arm64/run/state.json").exists(), "no guest started");
    // Nothing changed since the first run's check: the re-run answered from its memo.
    assert!(text.contains("are those of the last check"), "{text}");

    // Any input changed (here the world file, by a comment) runs Portage's resolver again.
    std::fs::write(cfg.join("world"), format!("# weekly\n{}", scale_gen::world())).unwrap();
    let out = cmd.output().unwrap();
    let text = combined(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("arm64: nothing to build, no guest booted") && !text.contains("are those of the last check"), "{text}");
    assert!(std::fs::read_to_string(super::vm_build::last_log_dir(home).join("plan.log")).unwrap().contains("[binary"), "emerge planned again");
}

/// The nothing-new check uses the same repositories the guest would get, not only `--repo`s: a
/// dbh-managed repository (`dbh repo sync`, how `::gentoo` gets in on a host that is not Gentoo)
/// and a host tree named by the target's repos.conf (a Gentoo host's `/var/db/repos/gentoo`).
/// There is no guest image in these homes, so a run that tried to boot would fail.
#[test]
fn a_nothing_new_update_from_a_managed_or_host_repository_boots_nothing() {
    let emerge = super::portage::portage().venv.join("bin/emerge");
    let dbh_bin = Path::new(env!("CARGO_BIN_EXE_dbh"));
    let repo = scale_gen::repo(&fixture_repo(), scale_gen::WORLD);
    let binhost = scale_gen::binhost(dbh_bin, scale_gen::WORLD, 520 * 1024);
    for how in ["managed", "repos.conf"] {
        let home = tempfile::tempdir().unwrap();
        let home = home.path();
        let cfg = user_home(home, &binhost);
        if how == "managed" {
            let out = super::vm_build::run(home, &["repo", "sync", "dbh-scale", "--url", &repo.to_string_lossy()]);
            assert!(out.status.success(), "{}", combined(&out));
        } else {
            std::fs::write(cfg.join("repos.conf"), format!("[dbh-scale]\nlocation = {}\n", repo.display())).unwrap();
        }
        let mut cmd = dbh();
        cmd.arg("--home").arg(home).env("XDG_CONFIG_HOME", home).env("DBH_PORTAGE_EMERGE", &emerge);
        cmd.args(["vm", "build", "--target", "arm64", "--update", "--profile", "dbh-scale:dbh/arm64"]);
        for run in 0..2 {
            let out = cmd.output().unwrap();
            let text = combined(&out);
            assert!(out.status.success(), "{how}, run {run}: {text}");
            assert!(text.contains("arm64: nothing to build, no guest booted"), "{how}, run {run}: {text}");
            assert!(text.contains("repository dbh-scale at tree-"), "{how}: the snapshot's revision is reported: {text}");
            // The first run asks the host's Portage; the second answers from its memo.
            assert_eq!(text.contains("are those of the last check"), run == 1, "{how}, run {run}: {text}");
        }
        assert!(!home.join("images/arm64/run/state.json").exists(), "{how}: no guest started");
    }
}
