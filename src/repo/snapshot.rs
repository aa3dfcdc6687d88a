//! The read-only squashfs snapshot of one repository at one revision,
//! `$DBH_HOME/repos/<name>/snapshots/<key>.sqfs`, made once and reused by every later build.
//!
//! Made under the repository's flock: leftovers of a killed maker (`.`-prefixed temp files and
//! staging trees in `snapshots/`) are removed first, mksquashfs writes `.<key>.sqfs.tmp-<pid>`,
//! the description `<key>.json` is written (temp + rename), and the image is renamed to
//! `<key>.sqfs` last: that rename is the commit point, so a snapshot cut short by kill -9 is
//! never found under its final name.
//!
//! A tree without `metadata/md5-cache` is first copied (file by file, without `.git`) into a
//! staging directory where Portage's `egencache --update` writes the cache; the image is made
//! from that copy. The user's tree is never written to.
//!
//! mksquashfs flags (reproducible, as catalyst's snapshots): `-noappend -no-xattrs -all-root
//! -mkfs-time 0 -all-time 0 -comp zstd`; Portage validates md5-cache entries by checksum, not by
//! mtime, so clamped times cost nothing.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::{Kind, RepoError, Revision, Source, dir, io, source_revision, walk};
use crate::events::{Event, Reporter};
use crate::process::Cmd;
use crate::settings::Home;

/// A snapshot ready to attach.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub name: String,
    pub revision: Revision,
    /// `$DBH_HOME/repos/<name>/snapshots/<key>.sqfs`.
    pub image: PathBuf,
    /// Made by this call (false: found in the cache).
    pub made: bool,
    /// egencache generated the metadata cache (when made).
    pub egencache: bool,
}

/// How to run Portage's egencache for trees without a metadata cache.
#[derive(Debug, Clone, Default)]
pub struct Tools {
    /// `egencache`, usually the sibling of the setting `portage.emerge`; `None`: not found.
    pub egencache: Option<PathBuf>,
}

impl Tools {
    /// egencache next to `emerge` (a path or a name on PATH), else on PATH.
    pub fn find(emerge: &Path) -> Tools {
        use crate::util::path::{is_executable, which};
        let emerge = if emerge.as_os_str().as_encoded_bytes().contains(&b'/') { Some(emerge.to_owned()) } else { which(emerge) };
        let sibling = emerge.and_then(|e| e.parent().map(|d| d.join("egencache"))).filter(|p| is_executable(p));
        Tools { egencache: sibling.or_else(|| which("egencache")) }
    }
}

/// The held flock on `$DBH_HOME/repos/<name>/.lock`.
pub(crate) struct Locked {
    _file: std::fs::File,
}

pub(crate) fn lock(home: &Home, name: &str, reporter: &dyn Reporter) -> Result<Locked, RepoError> {
    let d = dir(home, name);
    std::fs::create_dir_all(&d).map_err(io("create", &d))?;
    let path = d.join(".lock");
    let file = crate::util::fs::open_lock_file(&path).map_err(io("open", &path))?;
    if !crate::util::fs::try_lock(&file, crate::util::fs::Lock::Exclusive).map_err(io("lock", &path))? {
        reporter.event(Event::Note { message: format!("waiting for another dbh that is writing {}", d.display()) });
        file.lock().map_err(io("lock", &path))?;
    }
    Ok(Locked { _file: file })
}

fn has_metadata_cache(tree: &Path) -> bool {
    std::fs::read_dir(tree.join("metadata/md5-cache")).is_ok_and(|mut d| d.next().is_some())
}

/// The snapshot of `src` at its current revision: the cached one, or a new one. `others` are the
/// build's other repositories (egencache needs a repository's masters).
pub fn snapshot(home: &Home, src: &Source, others: &[Source], tools: &Tools, reporter: &dyn Reporter) -> Result<Snapshot, RepoError> {
    let revision = source_revision(home, src, reporter)?;
    let snaps = dir(home, &src.name).join("snapshots");
    let image = snaps.join(format!("{}.sqfs", revision.key));
    let found = |made, egencache| Snapshot { name: src.name.clone(), revision: revision.clone(), image: image.clone(), made, egencache };
    if image.is_file() {
        // Immutable once in place: no lock needed to use it.
        reporter.event(Event::Note { message: format!("repository {} at {}: using the cached snapshot {}", src.name, revision.recorded, image.display()) });
        return Ok(found(false, false));
    }
    let _lock = lock(home, &src.name, reporter)?;
    if image.is_file() {
        reporter.event(Event::Note { message: format!("repository {} at {}: using the snapshot another dbh just made", src.name, revision.recorded) });
        return Ok(found(false, false));
    }
    std::fs::create_dir_all(&snaps).map_err(io("create", &snaps))?;
    // Under the lock, every dot-entry is a leftover of a maker that died.
    for e in std::fs::read_dir(&snaps).map_err(io("read", &snaps))?.flatten() {
        if e.file_name().to_string_lossy().starts_with('.') {
            let p = e.path();
            let _ = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
        }
    }
    let t0 = Instant::now();
    let pid = std::process::id();
    let staging = snaps.join(format!(".staging-{}-{pid}", revision.key));
    let mut egencache = false;
    let tree: PathBuf = if has_metadata_cache(&src.path) {
        src.path.clone()
    } else if let Some(program) = &tools.egencache {
        reporter.event(Event::Note {
            message: format!("repository {} at {} has no metadata cache: generating one with egencache (once per revision)", src.name, revision.recorded),
        });
        copy_tree(&src.path, &staging)?;
        run_egencache(program, src, &staging, others, &snaps, &revision)?;
        egencache = true;
        staging.clone()
    } else {
        reporter.event(Event::Note {
            message: format!(
                "warning: repository {} has no metadata cache and no egencache was found (setting portage.emerge); \
                 the builder's Portage will generate it on every build",
                src.name
            ),
        });
        src.path.clone()
    };
    let tmp = snaps.join(format!(".{}.sqfs.tmp-{pid}", revision.key));
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get()).to_string();
    let made = Cmd::new("mksquashfs")
        .arg(&tree)
        .arg(&tmp)
        .args(["-noappend", "-no-xattrs", "-all-root", "-mkfs-time", "0", "-all-time", "0", "-comp", "zstd"])
        .args(["-processors", &jobs, "-no-progress", "-quiet", "-wildcards", "-e", "... .git", "... .svn"])
        .install_hint("squashfs-tools (Debian) or sys-fs/squashfs-tools (Gentoo)")
        .output();
    if staging.exists() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    if let Err(e) = made {
        let _ = std::fs::remove_file(&tmp);
        return Err(match e {
            crate::process::ProcessError::NotFound { .. } => e.into(),
            e => RepoError::Snapshot { name: src.name.clone(), reason: e.to_string() },
        });
    }
    let size = std::fs::metadata(&tmp).map_err(io("read", &tmp))?.len();
    let meta = serde_json::json!({
        "name": src.name,
        "revision": revision.recorded,
        "key": revision.key,
        "source": src.path.display().to_string(),
        "egencache": egencache,
        "made": crate::util::time::now_secs(),
        "size": size,
    });
    write_atomic(&snaps.join(format!("{}.json", revision.key)), format!("{meta:#}\n").as_bytes())?;
    // The image is mksquashfs's file: fsync it, rename it into place, fsync the directory.
    crate::util::fs::persist_file(&tmp, &image).map_err(io("move into place", &image))?;
    reporter.event(Event::Note {
        message: format!(
            "repository {} at {}: made snapshot {} ({:.1} MiB) in {:.1}s",
            src.name,
            revision.recorded,
            image.display(),
            size as f64 / 1048576.0,
            t0.elapsed().as_secs_f64()
        ),
    });
    Ok(found(true, egencache))
}

/// Writes `data` to `path` atomically and durably ([`crate::util::fs::write_atomic`]).
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> Result<(), RepoError> {
    crate::util::fs::write_atomic(path, data).map_err(io("write", path))
}

/// Copies the tree `src` (without VCS metadata) to `dst`, file by file.
pub(crate) fn copy_tree(src: &Path, dst: &Path) -> Result<(), RepoError> {
    std::fs::create_dir_all(dst).map_err(io("create", dst))?;
    walk(src, &mut |rel, path, kind| {
        let to = dst.join(rel);
        match kind {
            Kind::Dir => std::fs::create_dir(&to).map_err(io("create", &to)),
            Kind::Symlink => {
                let target = std::fs::read_link(path).map_err(io("read", path))?;
                std::os::unix::fs::symlink(target, &to).map_err(io("create", &to))
            }
            Kind::File => std::fs::copy(path, &to).map(|_| ()).map_err(io("copy to", &to)),
        }
    })
}

/// `egencache --update` for the repository copied to `tree`, with a private configuration root
/// (a venv Portage finds its own defaults under `PORTAGE_OVERRIDE_EPREFIX`, as in the cross
/// backend) so that the host's /etc/portage plays no part.
fn run_egencache(program: &Path, src: &Source, tree: &Path, others: &[Source], scratch: &Path, revision: &Revision) -> Result<(), RepoError> {
    let root = scratch.join(format!(".egencache-root-{}", std::process::id()));
    let etc = root.join("etc/portage");
    std::fs::create_dir_all(&etc).map_err(io("create", &etc))?;
    let mut repos = format!("[DEFAULT]\nmain-repo = {}\n\n[{}]\nlocation = {}\n", src.name, src.name, tree.display());
    for o in others.iter().filter(|o| o.name != src.name) {
        repos.push_str(&format!("\n[{}]\nlocation = {}\n", o.name, o.path.display()));
    }
    let (user, group) = crate::build::cross::user_and_group();
    std::fs::write(
        etc.join("make.conf"),
        format!("PORTAGE_USERNAME=\"{user}\"\nPORTAGE_GRPNAME=\"{group}\"\nFEATURES=\"-sandbox -usersandbox -userpriv\"\n"),
    )
    .map_err(io("write", &etc))?;
    let bin = program.parent().unwrap_or(Path::new("/usr/bin"));
    let venv = bin.parent().filter(|v| v.join("pyvenv.cfg").is_file());
    let path = crate::util::path::prepend_to_path([bin.to_owned()]).unwrap_or_default();
    let mut cmd = Cmd::new(program)
        .env_clear()
        .env("PATH", path)
        .env("HOME", &root)
        .env("LC_ALL", "C.UTF-8")
        .env("PORTAGE_CONFIGROOT", &root);
    if let Some(venv) = venv {
        let share = root.join("share/portage");
        std::fs::create_dir_all(&share).map_err(io("create", &share))?;
        let _ = std::os::unix::fs::symlink(venv.join("share/portage/config"), share.join("config"));
        cmd = cmd.env("PORTAGE_OVERRIDE_EPREFIX", &root);
    }
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get()).to_string();
    let cmd = cmd.args(["--repositories-configuration", &repos, "--repo", &src.name, "--update", "--jobs", &jobs]);
    let result = cmd.output();
    let _ = std::fs::remove_dir_all(&root);
    result.map_err(|source| RepoError::Egencache { name: src.name.clone(), revision: revision.recorded.clone(), source })?;
    if !has_metadata_cache(tree) {
        return Err(RepoError::Snapshot { name: src.name.clone(), reason: "egencache wrote no metadata/md5-cache".into() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_tree_keeps_links_and_modes_and_drops_git() {
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(src.path().join("a/.git")).unwrap();
        std::fs::write(src.path().join("a/.git/x"), "x").unwrap();
        std::fs::write(src.path().join("a/f"), "f").unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(src.path().join("a/f"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("f", src.path().join("a/l")).unwrap();
        let dst = tempfile::tempdir().unwrap();
        let dst = dst.path().join("copy");
        copy_tree(src.path(), &dst).unwrap();
        assert!(!dst.join("a/.git").exists());
        assert_eq!(std::fs::read_link(dst.join("a/l")).unwrap(), Path::new("f"));
        assert_eq!(std::fs::metadata(dst.join("a/f")).unwrap().permissions().mode() & 0o777, 0o755);
        assert_eq!(super::super::content_hash(src.path()).unwrap(), super::super::content_hash(&dst).unwrap());
    }
}
