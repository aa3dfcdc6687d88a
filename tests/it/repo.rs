//! Repositories: `dbh repo sync` from a local git URL and a local rsync source, snapshots made
//! by real mksquashfs (with real egencache from the Portage venv for a tree without a metadata
//! cache), cached per revision, never half-written (kill -9), and bounded at the scale of
//! ::gentoo: a generated repository of 20 000 ebuilds (cached in ~/.cache/dbh-tests with its
//! metadata/md5-cache already written — egencache on 20 000 ebuilds would take CI minutes; it is
//! tested on the small fixture repository instead).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use md5::Digest as _;

use super::cli::dbh;
use super::portage::{cache_dir, combined, copy_tree, fixture_repo, portage};

/// `dbh --home HOME ARGS` with the venv's Portage (egencache is emerge's sibling there).
fn command(home: &Path, args: &[&str]) -> Command {
    let mut cmd = dbh();
    cmd.arg("--home").arg(home).args(args).env("XDG_CONFIG_HOME", home);
    for (k, _) in std::env::vars() {
        if k.starts_with("DBH_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("DBH_PORTAGE_EMERGE", portage().venv.join("bin/emerge"));
    cmd
}

fn run(home: &Path, args: &[&str]) -> Output {
    let out = command(home, args).output().unwrap();
    eprintln!("dbh {args:?}: {}\n{}", out.status, combined(&out));
    out
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.name=dbh test", "-c", "user.email=test@dbh.invalid"])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "git {args:?}: {}", combined(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// How many ebuilds the scale repository has (the size of ::gentoo's order of magnitude).
pub const SCALE_EBUILDS: usize = 20_000;

/// A generated repository `dbh-scale` of `SCALE_EBUILDS` trivial ebuilds in 100 categories, with
/// its metadata/md5-cache (entries as egencache writes them, `_md5_` = the ebuild's MD5), made
/// once and cached in ~/.cache/dbh-tests/repo-scale-<n>-v1 (written to a temp dir and renamed).
pub fn scale_repo() -> PathBuf {
    let dir = cache_dir().join(format!("repo-scale-{SCALE_EBUILDS}-v1"));
    if dir.join("profiles/repo_name").is_file() {
        return dir;
    }
    let t0 = Instant::now();
    let tmp = cache_dir().join(format!(".repo-scale-tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let w = |p: &Path, text: &str| {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    };
    w(&tmp.join("profiles/repo_name"), "dbh-scale\n");
    w(&tmp.join("profiles/categories"), &(0..100).map(|c| format!("cat-{c:02}\n")).collect::<String>());
    w(&tmp.join("metadata/layout.conf"), "repo-name = dbh-scale\nmasters =\nthin-manifests = true\ncache-formats = md5-dict\n");
    w(&tmp.join("licenses/MIT"), "MIT\n");
    for i in 0..SCALE_EBUILDS {
        let (cat, pn) = (format!("cat-{:02}", i % 100), format!("pkg{i}"));
        let ebuild = format!(
            "EAPI=8\nDESCRIPTION=\"generated package {i}\"\nHOMEPAGE=\"https://example.invalid\"\nLICENSE=\"MIT\"\nSLOT=\"0\"\nKEYWORDS=\"arm64\"\nS=${{WORKDIR}}\n"
        );
        w(&tmp.join(format!("{cat}/{pn}/{pn}-1.ebuild")), &ebuild);
        let md5 = hex::encode(md5::Md5::digest(ebuild.as_bytes()));
        w(
            &tmp.join(format!("metadata/md5-cache/{cat}/{pn}-1")),
            &format!(
                "DEFINED_PHASES=-\nDESCRIPTION=generated package {i}\nEAPI=8\nHOMEPAGE=https://example.invalid\nKEYWORDS=arm64\nLICENSE=MIT\nSLOT=0\n_md5_={md5}\n"
            ),
        );
    }
    std::fs::rename(&tmp, &dir).or_else(|_| std::fs::remove_dir_all(&tmp)).unwrap();
    eprintln!("generated {SCALE_EBUILDS} ebuilds in {:?}", t0.elapsed());
    dir
}

fn unsquashfs_list(image: &Path) -> String {
    let out = Command::new("unsquashfs").arg("-l").arg("-d").arg("").arg(image).output().unwrap();
    assert!(out.status.success(), "unsquashfs -l {}: {}", image.display(), combined(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `dbh repo snapshot` prints `NAME REVISION IMAGE`.
fn snapshot_line(out: &Output) -> (String, String, PathBuf) {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut it = text.split_whitespace();
    let (n, r, i) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
    (n.into(), r.into(), PathBuf::from(i))
}

#[test]
fn a_repository_without_a_cache_gets_one_from_egencache_once_per_revision() {
    let home = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    copy_tree(&fixture_repo(), &repo);
    assert!(!repo.join("metadata/md5-cache").exists(), "the fixture has no cache of its own");
    git(&repo, &["init", "-q"]);
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-q", "-m", "one"]);
    let head = git(&repo, &["rev-parse", "HEAD"]);

    let out = run(home.path(), &["repo", "snapshot", repo.to_str().unwrap()]);
    assert!(out.status.success());
    let text = combined(&out);
    assert!(text.contains("generating one with egencache"), "{text}");
    let (name, rev, image) = snapshot_line(&out);
    assert_eq!((name.as_str(), rev.as_str()), ("dbh-test", head.as_str()));
    assert_eq!(image, home.path().join(format!("repos/dbh-test/snapshots/{head}.sqfs")));
    let listing = unsquashfs_list(&image);
    assert!(listing.contains("/metadata/md5-cache/dbh-test/hello-1.0"), "{listing}");
    assert!(listing.contains("/dbh-test/hello/hello-1.0.ebuild"), "{listing}");
    assert!(!listing.contains(".git"), "{listing}");
    let entry = Command::new("unsquashfs").args(["-cat"]).arg(&image).arg("metadata/md5-cache/dbh-test/hello-1.0").output().unwrap();
    assert!(String::from_utf8_lossy(&entry.stdout).contains("EAPI=8"), "{}", combined(&entry));
    assert!(!repo.join("metadata/md5-cache").exists(), "the user's tree is never written to");
    let meta = std::fs::read_to_string(image.with_extension("json")).unwrap();
    assert!(meta.contains("\"egencache\": true"), "{meta}");

    // The same revision: the cached image, no egencache, no mksquashfs.
    let inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&image).unwrap());
    let mtime = std::fs::metadata(&image).unwrap().modified().unwrap();
    let out = run(home.path(), &["repo", "snapshot", repo.to_str().unwrap()]);
    let text = combined(&out);
    assert!(out.status.success() && text.contains("using the cached snapshot"), "{text}");
    assert!(!text.contains("egencache") && !text.contains("made snapshot"), "{text}");
    assert_eq!(std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&image).unwrap()), inode);
    assert_eq!(std::fs::metadata(&image).unwrap().modified().unwrap(), mtime);

    // An uncommitted change: `<commit>-dirty`, a snapshot of its own; a commit: a new one.
    std::fs::write(repo.join("dbh-test/hello/files/extra.txt"), "x\n").unwrap();
    let out = run(home.path(), &["repo", "snapshot", repo.to_str().unwrap()]);
    let (_, rev, dirty_image) = snapshot_line(&out);
    assert_eq!(rev, format!("{head}-dirty"));
    assert_ne!(dirty_image, image);
    assert!(unsquashfs_list(&dirty_image).contains("/dbh-test/hello/files/extra.txt"));
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-q", "-m", "two"]);
    let out = run(home.path(), &["repo", "snapshot", repo.to_str().unwrap()]);
    let (_, rev2, _) = snapshot_line(&out);
    assert_eq!(rev2, git(&repo, &["rev-parse", "HEAD"]));
    assert!(combined(&out).contains("made snapshot"), "{}", combined(&out));

    let list = run(home.path(), &["repo", "list"]);
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(text.contains(&format!("snapshot: {head} ")) && text.contains(&format!("snapshot: {rev2} ")), "{text}");
}

#[test]
fn repo_sync_from_a_local_git_url_and_an_rsync_source() {
    let home = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let upstream = work.path().join("gentoo");
    copy_tree(&fixture_repo(), &upstream);
    std::fs::write(upstream.join("profiles/repo_name"), "gentoo\n").unwrap();
    std::fs::write(upstream.join("metadata/layout.conf"), "repo-name = gentoo\nmasters =\nthin-manifests = true\n").unwrap();
    git(&upstream, &["init", "-q"]);
    git(&upstream, &["add", "-A"]);
    git(&upstream, &["commit", "-q", "-m", "one"]);
    let one = git(&upstream, &["rev-parse", "HEAD"]);

    // Never synced, no URL: a clear error.
    let out = run(home.path(), &["repo", "sync", "gentoo"]);
    assert!(!out.status.success());
    assert!(combined(&out).contains("dbh repo sync gentoo --url URL"), "{}", combined(&out));

    let url = format!("file://{}", upstream.display());
    let out = run(home.path(), &["repo", "sync", "gentoo", "--url", &url]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("gentoo: now at {one}")), "{}", combined(&out));
    let tree = home.path().join("repos/gentoo/current");
    assert!(tree.join("dbh-test/hello/hello-1.0.ebuild").is_file());
    assert!(!tree.join(".git").exists());

    // A new upstream commit; the URL is remembered.
    std::fs::write(upstream.join("dbh-test/hello/files/new.txt"), "new\n").unwrap();
    git(&upstream, &["add", "-A"]);
    git(&upstream, &["commit", "-q", "-m", "two"]);
    let two = git(&upstream, &["rev-parse", "HEAD"]);
    let out = run(home.path(), &["repo", "sync", "gentoo"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("gentoo: now at {two}")), "{}", combined(&out));
    assert!(tree.join("dbh-test/hello/files/new.txt").is_file());
    assert!(!home.path().join(format!("repos/gentoo/trees/{one}")).exists(), "the old tree is gone");
    let out = run(home.path(), &["repo", "sync", "gentoo"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("gentoo: unchanged at {two}")), "{}", combined(&out));

    // The managed tree snapshots at its commit.
    let out = run(home.path(), &["repo", "snapshot", "gentoo"]);
    assert!(out.status.success());
    assert_eq!(snapshot_line(&out).1, two);
    let list = run(home.path(), &["repo", "list"]);
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(text.contains(&format!("synced from: {url} (Git)")) && text.contains(&format!("current: {two}")), "{text}");

    // rsync from a plain directory: revision = content hash; unchanged content, same revision.
    let plain = work.path().join("plain");
    copy_tree(&fixture_repo(), &plain);
    std::fs::write(plain.join("profiles/repo_name"), "plain\n").unwrap();
    std::fs::write(plain.join("metadata/layout.conf"), "repo-name = plain\nmasters =\nthin-manifests = true\n").unwrap();
    let out = run(home.path(), &["repo", "sync", "plain", "--url", plain.to_str().unwrap()]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let rev = text.split_whitespace().nth(3).unwrap().to_owned();
    assert!(rev.starts_with("tree-"), "{text}");
    let out = run(home.path(), &["repo", "sync", "plain"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("plain: unchanged at {rev}")), "{}", combined(&out));
    std::fs::write(plain.join("licenses/MIT"), "changed\n").unwrap();
    let out = run(home.path(), &["repo", "sync", "plain"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("plain: now at tree-"), "{}", combined(&out));
    assert_eq!(std::fs::read_to_string(home.path().join("repos/plain/current/licenses/MIT")).unwrap(), "changed\n");
}

/// Reads VmHWM (kB) of `pid` until it exits; the last value read is its peak.
fn watch_hwm(child: &mut std::process::Child) -> (std::process::ExitStatus, u64) {
    let mut hwm = 0;
    loop {
        if let Ok(s) = std::fs::read_to_string(format!("/proc/{}/status", child.id()))
            && let Some(kb) = s.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        {
            hwm = hwm.max(kb);
        }
        if let Some(status) = child.try_wait().unwrap() {
            return (status, hwm);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_snapshot_of_20000_ebuilds_is_bounded_and_dbh_memory_stays_flat() {
    let repo = scale_repo();
    let home = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    let mut child = command(home.path(), &["repo", "snapshot", repo.to_str().unwrap()]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let (status, hwm_kb) = watch_hwm(&mut child);
    let made = t0.elapsed();
    let out = child.wait_with_output().unwrap();
    assert!(status.success(), "{}", combined(&out));
    let (_, rev, image) = snapshot_line(&out);
    assert!(rev.starts_with("tree-"), "a tree outside git is named by its content: {rev}");
    let size = std::fs::metadata(&image).unwrap().len();
    eprintln!("snapshot of {SCALE_EBUILDS} ebuilds: {made:?}, {size} bytes, dbh VmHWM {hwm_kb} kB");
    assert!(hwm_kb > 0 && hwm_kb < 200 * 1024, "dbh's peak RSS {hwm_kb} kB must stay under 200 MB");
    assert!(made < Duration::from_secs(120), "the snapshot took {made:?}");
    let listing = unsquashfs_list(&image);
    assert_eq!(listing.lines().filter(|l| l.ends_with(".ebuild")).count(), SCALE_EBUILDS);
    assert_eq!(listing.lines().filter(|l| l.contains("/metadata/md5-cache/cat-")).count(), SCALE_EBUILDS + 100);

    // Reuse: hashing the tree again, no image made.
    let t1 = Instant::now();
    let out = run(home.path(), &["repo", "snapshot", repo.to_str().unwrap()]);
    let reuse = t1.elapsed();
    assert!(combined(&out).contains("using the cached snapshot"), "{}", combined(&out));
    eprintln!("re-use of the cached snapshot: {reuse:?} (make: {made:?}, ratio {:.2})", reuse.as_secs_f64() / made.as_secs_f64());
}

fn kill_mksquashfs_under(home: &Path) {
    let needle = home.display().to_string();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.starts_with("mksquashfs") && cmdline.contains(&needle) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

#[test]
fn a_snapshot_killed_mid_write_is_never_used() {
    let repo = scale_repo();
    let home = tempfile::tempdir().unwrap();
    let snaps = home.path().join("repos/dbh-scale/snapshots");
    let mut child = command(home.path(), &["repo", "snapshot", repo.to_str().unwrap()]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    // Kill dbh while mksquashfs writes its temp image.
    let until = Instant::now() + Duration::from_secs(120);
    let tmp_seen = loop {
        let tmp = std::fs::read_dir(&snaps).into_iter().flatten().flatten().any(|e| e.file_name().to_string_lossy().contains(".sqfs.tmp-"));
        if tmp || Instant::now() > until || child.try_wait().unwrap().is_some() {
            break tmp;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(tmp_seen, "mksquashfs's temp image never showed up");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    child.wait().unwrap();
    // The orphaned mksquashfs (its parent is gone) may still write its temp file: stop it.
    kill_mksquashfs_under(home.path());
    let finals: Vec<_> = std::fs::read_dir(&snaps).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().ends_with(".sqfs")).collect();
    assert!(finals.is_empty(), "a killed snapshot left an image under its final name: {:?}", finals.iter().map(|e| e.path()).collect::<Vec<_>>());

    // The next run makes a whole one (and clears the leftovers).
    let out = run(home.path(), &["repo", "snapshot", repo.to_str().unwrap()]);
    assert!(out.status.success());
    assert!(combined(&out).contains("made snapshot"), "{}", combined(&out));
    let (_, _, image) = snapshot_line(&out);
    assert_eq!(unsquashfs_list(&image).lines().filter(|l| l.ends_with(".ebuild")).count(), SCALE_EBUILDS);
    let left: Vec<_> = std::fs::read_dir(&snaps).unwrap().flatten().map(|e| e.file_name()).filter(|n| n.to_string_lossy().starts_with('.')).collect();
    // Only an orphaned mksquashfs of the killed run could still be writing; it never renames.
    assert!(left.iter().all(|n| !n.to_string_lossy().ends_with(".sqfs")), "{left:?}");
    let _ = std::io::stderr().flush();
}
