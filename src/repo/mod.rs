//! Ebuild repositories as builders see them: which repositories a build uses ([`plan`]), the
//! revision each is at ([`revision`]: git commit, `<commit>-dirty`, or a content hash), the
//! read-only squashfs snapshot made once per revision and cached under `$DBH_HOME/repos/`
//! ([`snapshot`], with a metadata cache from `egencache` when the tree has none), and the
//! repositories dbh manages itself for hosts that are not Gentoo ([`sync`]: `dbh repo sync`).
//!
//! Layout (docs/vm-build.md, "Repositories"):
//! `$DBH_HOME/repos/<name>/.lock` (flock held by every writer of this directory),
//! `snapshots/<key>.sqfs` + `snapshots/<key>.json` (immutable once renamed into place),
//! `source.json`, `git/` (bare mirror), `trees/<revision>/` and `current` (managed repositories).
//! Nothing here holds a tree in memory: trees are walked one directory at a time, files are
//! streamed through the hasher, and mksquashfs/egencache/git/rsync do the heavy lifting.

pub mod snapshot;
pub mod sync;

use std::io::Read as _;
use std::path::{Path, PathBuf};

use sha2::Digest as _;

use crate::hint::Hint;
use crate::events::{Event, Reporter};
use crate::process::Cmd;
use crate::settings::Home;

pub use snapshot::{Snapshot, snapshot};

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("{0}")]
    Io(#[from] crate::util::fs::PathError),
    #[error("cannot use {path} as an ebuild repository: {reason}")]
    NotARepo { path: PathBuf, reason: String },
    #[error("`{name}` is not a valid repository name")]
    BadName { name: String },
    #[error("making the snapshot of repository {name} failed: {reason}")]
    Snapshot { name: String, reason: String },
    #[error("generating the metadata cache of repository {name} at {revision} with egencache failed")]
    Egencache {
        name: String,
        revision: String,
        #[source]
        source: crate::process::ProcessError,
    },
    #[error("repository {name} is not managed by dbh and no URL was given")]
    NoUrl { name: String },
    #[error("repository {name} has never been synced ({dir} has no tree)")]
    NeverSynced { name: String, dir: PathBuf },
    #[error("syncing repository {name} from {url} failed")]
    SyncFailed {
        name: String,
        url: String,
        #[source]
        source: crate::process::ProcessError,
    },
    #[error("{url} is not a repository dbh can sync from: {reason}")]
    BadUrl { url: String, reason: String },
    #[error(transparent)]
    Process(#[from] crate::process::ProcessError),
}

impl Hint for RepoError {
    fn hint(&self) -> Option<String> {
        match self {
            RepoError::NotARepo { .. } => {
                Some("an ebuild repository has its name in profiles/repo_name (or metadata/layout.conf repo-name)".into())
            }
            RepoError::BadName { .. } => Some("repository names are letters, digits, `_` and `-` (PMS 3.1.5), e.g. gentoo".into()),
            RepoError::Snapshot { .. } => {
                Some("mksquashfs comes with squashfs-tools (Debian) / sys-fs/squashfs-tools (Gentoo); see the message above".into())
            }
            RepoError::Egencache { .. } => Some(
                "egencache comes with Portage; point dbh at it with the setting portage.emerge (egencache is its sibling), \
                 or give the repository a metadata/md5-cache"
                    .into(),
            ),
            RepoError::NoUrl { name } => {
                Some(format!("give the URL once: `dbh repo sync {name} --url URL` (a git URL, rsync://…, or a local directory)"))
            }
            RepoError::NeverSynced { name, .. } => Some(format!("run `dbh repo sync {name} --url URL` first")),
            RepoError::SyncFailed { .. } => Some("check the URL and that git/rsync can reach it; run with -v for the full output".into()),
            RepoError::BadUrl { .. } => Some("use a git URL (https://…, git://…, file://…, a path to a git checkout) or rsync://HOST/MODULE".into()),
            RepoError::Process(e) => e.hint(),
            _ => None,
        }
    }
}

pub(crate) fn io<'a>(doing: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> RepoError + 'a {
    crate::util::fs::at(doing, path)
}

/// Where a build's repository comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// `--repo PATH`.
    Cli,
    /// A section of the target's repos.conf whose location exists on the host.
    ReposConf,
    /// `dbh repo sync NAME`: `$DBH_HOME/repos/NAME/current`.
    Managed,
}

/// One repository a build uses, on the host.
#[derive(Debug, Clone)]
pub struct Source {
    pub name: String,
    pub path: PathBuf,
    pub origin: Origin,
    /// Known without looking at the tree (a managed tree is named by its revision).
    pub revision: Option<String>,
}

/// A revision: what `REPO_REVISIONS` records, and the key of the cached snapshot (the same unless
/// the tree is a dirty git checkout, whose content decides which snapshot is right).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revision {
    pub recorded: String,
    pub key: String,
}

/// Repository names as PMS allows them (they also name directories and QEMU drive serials here).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('-')
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// `$DBH_HOME/repos/<name>/`.
pub fn dir(home: &Home, name: &str) -> PathBuf {
    home.root().join("repos").join(name)
}

/// The revision `path` is at: a clean git checkout's commit; `<commit>-dirty` (keyed by the
/// content too) when `git status` shows changes under `path`, with a warning; otherwise
/// `tree-<sha256 of the content>`.
pub fn revision(path: &Path, reporter: &dyn Reporter) -> Result<Revision, RepoError> {
    revision_with(path, &|p| content_hash(p), reporter)
}

/// [`revision`] with the content hash remembered under `home` ([`content_hash_cached`]): a
/// plain directory of 20 000 ebuilds is stat'ed, not read, when nothing in it changed.
pub fn revision_cached(home: &Home, path: &Path, reporter: &dyn Reporter) -> Result<Revision, RepoError> {
    revision_with(path, &|p| content_hash_cached(home, p), reporter)
}

fn revision_with(path: &Path, content_hash: &dyn Fn(&Path) -> Result<String, RepoError>, reporter: &dyn Reporter) -> Result<Revision, RepoError> {
    let git = |args: &[&str]| Cmd::new("git").arg("-C").arg(path).args(args).output().ok();
    if let Some(head) = git(&["rev-parse", "--verify", "-q", "HEAD"]).map(|o| o.stdout_str().trim().to_owned())
        && head.len() >= 40
        && let Some(status) = git(&["status", "--porcelain", "--", "."])
    {
        if status.stdout_str().trim().is_empty() {
            return Ok(Revision { recorded: head.clone(), key: head });
        }
        reporter.event(Event::Note {
            message: format!("warning: {} has changes not committed to {head}; its revision is recorded as {head}-dirty", path.display()),
        });
        let hash = content_hash(path)?;
        return Ok(Revision { recorded: format!("{head}-dirty"), key: format!("{head}-dirty-{}", &hash[..16]) });
    }
    let hash = content_hash(path)?;
    let rev = format!("tree-{}", &hash[..32]);
    Ok(Revision { recorded: rev.clone(), key: rev })
}

/// The revision of `src`: its known one, else [`revision_cached`] of its tree.
pub fn source_revision(home: &Home, src: &Source, reporter: &dyn Reporter) -> Result<Revision, RepoError> {
    match &src.revision {
        Some(r) => Ok(Revision { recorded: r.clone(), key: r.clone() }),
        None => revision_cached(home, &src.path, reporter),
    }
}

/// SHA-256 over every entry's metadata under `root` (relative path, kind, mode, size, mtime and
/// ctime in nanoseconds, device and inode): one `fstatat` per entry, no file is read.
///
/// This is what a nothing-new re-run pays for a plain-directory repository, so it is cheap: each
/// directory is opened once and its entries are stat'ed relative to it (no path is resolved from
/// `/` again), and the top-level entries (an ebuild repository's categories) are spread over the
/// host's cores. Each top-level entry gets its own digest and the result hashes those in name
/// order, so the value does not depend on which thread did what.
fn stat_fingerprint(root: &Path) -> Result<String, RepoError> {
    use rustix::fs::{Mode, OFlags};
    let open = |path: &Path| {
        rustix::fs::open(path, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
            .map_err(|e| io("read", path)(e.into()))
    };
    let (top_dir, top) = sorted_names(open(root)?).map_err(|e| io("read", root)(e))?;
    let top_fd = top_dir.fd().map_err(|e| io("read", root)(e.into()))?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 8).min(top.len().max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut digests: Vec<Option<[u8; 32]>> = vec![None; top.len()];
    let results = std::sync::Mutex::new(&mut digests);
    let failed: std::sync::Mutex<Option<RepoError>> = std::sync::Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                let mut rel = Vec::new();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(name) = top.get(i) else { break };
                    let mut h = sha2::Sha256::new();
                    rel.clear();
                    rel.extend_from_slice(name.to_bytes());
                    match fingerprint_entry(top_fd, name, &mut rel, &mut h) {
                        Ok(()) => results.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(h.finalize().into()),
                        Err(e) => {
                            let path = root.join(std::ffi::OsStr::from_bytes(&rel));
                            failed.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(io("read", &path)(e));
                            break;
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    let mut h = sha2::Sha256::new();
    for (name, digest) in top.iter().zip(&digests) {
        h.update(name.to_bytes_with_nul());
        h.update(digest.expect("every entry was hashed or the walk failed"));
    }
    Ok(hex::encode(h.finalize()))
}

use std::os::unix::ffi::OsStrExt as _;

/// The entries of the directory `fd` in byte order, without `.`, `..`, `.git` and `.svn`, and
/// the directory stream (its descriptor serves the `fstatat`s of those entries).
fn sorted_names(fd: std::os::fd::OwnedFd) -> std::io::Result<(rustix::fs::Dir, Vec<std::ffi::CString>)> {
    let mut dir = rustix::fs::Dir::new(fd)?;
    let mut names = Vec::new();
    for entry in &mut dir {
        let name = entry?.file_name().to_owned();
        if !matches!(name.to_bytes(), b"." | b".." | b".git" | b".svn") {
            names.push(name);
        }
    }
    names.sort();
    Ok((dir, names))
}

/// Hashes `name` (in the directory `dir`, at `rel` below the root) and, for a directory,
/// everything below it. `rel` is left as it was given.
fn fingerprint_entry(dir: std::os::fd::BorrowedFd<'_>, name: &std::ffi::CStr, rel: &mut Vec<u8>, h: &mut sha2::Sha256) -> std::io::Result<()> {
    use rustix::fs::{AtFlags, FileType, Mode, OFlags};
    let st = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
    h.update(&rel[..]);
    h.update([0]);
    for v in [
        st.st_mode as i64,
        st.st_size as i64,
        st.st_mtime as i64,
        st.st_mtime_nsec as i64,
        st.st_ctime as i64,
        st.st_ctime_nsec as i64,
        st.st_dev as i64,
        st.st_ino as i64,
    ] {
        h.update(v.to_le_bytes());
    }
    if FileType::from_raw_mode(st.st_mode as _) != FileType::Directory {
        return Ok(());
    }
    let sub = rustix::fs::openat(dir, name, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())?;
    let (sub, children) = sorted_names(sub)?;
    let len = rel.len();
    for child in children {
        rel.push(b'/');
        rel.extend_from_slice(child.to_bytes());
        fingerprint_entry(sub.fd()?, &child, rel, h)?;
        rel.truncate(len);
    }
    Ok(())
}

/// [`content_hash`] of `root`, remembered in `$DBH_HOME/repos/.content-hashes/<sha256 of the
/// path>` with the tree's [`stat_fingerprint`]: while the fingerprint is unchanged the files are
/// not read again, the way git's index trusts stat data. ctime cannot be set back (`touch` moves
/// it forward), so any edit, rename or permission change is seen. The fingerprint is taken
/// before the content is read: a file changed meanwhile makes the next fingerprint differ, so a
/// stale pair is never reused. Written atomically; a cache that cannot be written is only slower.
pub fn content_hash_cached(home: &Home, root: &Path) -> Result<String, RepoError> {
    let fingerprint = stat_fingerprint(root)?;
    let abs = std::fs::canonicalize(root).map_err(io("read", root))?;
    let dir = home.root().join("repos/.content-hashes");
    let file = dir.join(hex::encode(sha2::Sha256::digest(abs.as_os_str().as_encoded_bytes())));
    if let Ok(text) = std::fs::read_to_string(&file)
        && let Some((fp, hash)) = text.trim().split_once(' ')
        && fp == fingerprint
        && hash.len() == 64
    {
        return Ok(hash.to_owned());
    }
    let hash = content_hash(root)?;
    if std::fs::create_dir_all(&dir).is_ok() {
        let _ = snapshot::write_atomic(&file, format!("{fingerprint} {hash}\n").as_bytes());
    }
    Ok(hash)
}

/// SHA-256 over the tree under `root` (without `.git`/`.svn`), in name order: each entry's
/// relative path, kind, executable bit and content (or link target). Streams every file; holds
/// one directory listing at a time.
pub fn content_hash(root: &Path) -> Result<String, RepoError> {
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    walk(root, &mut |rel, path, kind| {
        use std::os::unix::fs::PermissionsExt as _;
        h.update(rel.as_os_str().as_encoded_bytes());
        h.update([0]);
        match kind {
            Kind::Dir => h.update(b"d\0"),
            Kind::Symlink => {
                let target = std::fs::read_link(path).map_err(io("read", path))?;
                h.update(b"l\0");
                h.update(target.as_os_str().as_encoded_bytes());
                h.update([0]);
            }
            Kind::File => {
                let meta = std::fs::metadata(path).map_err(io("read", path))?;
                h.update(if meta.permissions().mode() & 0o111 != 0 { b"x\0" } else { b"f\0" });
                h.update(meta.len().to_le_bytes());
                let mut f = std::fs::File::open(path).map_err(io("read", path))?;
                loop {
                    let n = f.read(&mut buf).map_err(io("read", path))?;
                    if n == 0 {
                        break;
                    }
                    h.update(&buf[..n]);
                }
            }
        }
        Ok(())
    })?;
    Ok(hex::encode(h.finalize()))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Dir,
    File,
    Symlink,
}

/// Calls `f(relative path, absolute path, kind)` for every entry under `root` except VCS
/// metadata, depth first, entries of each directory in name order.
pub(crate) fn walk(root: &Path, f: &mut dyn FnMut(&Path, &Path, Kind) -> Result<(), RepoError>) -> Result<(), RepoError> {
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let abs = root.join(&rel);
        let mut entries: Vec<_> = std::fs::read_dir(&abs).map_err(io("read", &abs))?.flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        let mut dirs = Vec::new();
        for e in entries {
            let name = e.file_name();
            if name == ".git" || name == ".svn" {
                continue;
            }
            let rel = rel.join(&name);
            let path = e.path();
            let t = e.file_type().map_err(io("read", &path))?;
            let kind = if t.is_dir() {
                Kind::Dir
            } else if t.is_symlink() {
                Kind::Symlink
            } else {
                Kind::File
            };
            f(&rel, &path, kind)?;
            if kind == Kind::Dir {
                dirs.push(rel);
            }
        }
        stack.extend(dirs.into_iter().rev());
    }
    Ok(())
}

/// The name of the ebuild repository at `path` (profiles/repo_name, else layout.conf repo-name).
pub fn repo_name(path: &Path) -> Result<String, RepoError> {
    let bad = |reason: &str| RepoError::NotARepo { path: path.to_owned(), reason: reason.into() };
    if !path.is_dir() {
        return Err(bad("it is not a directory"));
    }
    let name = fs_err::read_to_string(path.join("profiles/repo_name")).ok().map(|t| t.trim().to_owned()).filter(|n| !n.is_empty());
    let name = name.or_else(|| {
        let text = fs_err::read_to_string(path.join("metadata/layout.conf")).ok()?;
        text.lines().find_map(|l| l.split_once('=').filter(|(k, _)| k.trim() == "repo-name").map(|(_, v)| v.trim().to_owned()))
    });
    let name = name.ok_or_else(|| bad("it has no profiles/repo_name"))?;
    if !valid_name(&name) {
        return Err(RepoError::BadName { name });
    }
    Ok(name)
}

/// The repositories a build uses, each once (a `--repo` wins over a repos.conf section of the same
/// name, which wins over a dbh-managed tree): every `--repo`; every section of the target's
/// `repos_conf` whose `location` is a repository directory on the host; and the dbh-managed
/// repository of each name that is still missing and is either named by a repos.conf section
/// (whose location the host lacks) or is the profile's repository. Sections with no host tree
/// and no managed tree stay the guest's own business.
pub fn plan(home: &Home, cli: &[(String, PathBuf)], repos_conf: &str, profile_repo: &str) -> Vec<Source> {
    let mut out: Vec<Source> = cli
        .iter()
        .map(|(n, p)| Source { name: n.clone(), path: p.clone(), origin: Origin::Cli, revision: None })
        .collect();
    let has = |out: &[Source], n: &str| out.iter().any(|s| s.name == n);
    let mut wanted = Vec::new();
    for (name, body) in crate::build::repos_conf_sections(repos_conf) {
        if name == "DEFAULT" || has(&out, &name) {
            continue;
        }
        let location = body.lines().find_map(|l| l.split_once('=').filter(|(k, _)| k.trim() == "location").map(|(_, v)| v.trim().to_owned()));
        match location.map(PathBuf::from).filter(|p| p.is_absolute() && repo_name(p).is_ok()) {
            Some(path) => out.push(Source { name, path, origin: Origin::ReposConf, revision: None }),
            None => wanted.push(name),
        }
    }
    wanted.push(profile_repo.to_owned());
    for name in wanted {
        if has(&out, &name) || !valid_name(&name) {
            continue;
        }
        if let Some((path, rev)) = sync::current(home, &name) {
            out.push(Source { name, path, origin: Origin::Managed, revision: Some(rev) });
        }
    }
    out
}

/// The guest-side repos.conf for the snapshots: each at `/var/db/repos/<name>`, never synced.
pub fn guest_repos_conf(profile_repo: &str, names: &[String]) -> String {
    let mut conf = format!("# written by dbh before each build\n[DEFAULT]\nmain-repo = {profile_repo}\n");
    for name in names {
        conf.push_str(&format!("\n[{name}]\nlocation = /var/db/repos/{name}\nauto-sync = no\n"));
    }
    conf
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Silent;
    impl Reporter for Silent {
        fn event(&self, _: Event) {}
    }

    fn git(dir: &Path, args: &[&str]) -> String {
        let out = std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(["-c", "user.name=t", "-c", "user.email=t@t.invalid"])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    #[test]
    fn names_are_checked() {
        assert!(valid_name("gentoo") && valid_name("dbh-test") && valid_name("my_overlay2"));
        assert!(!valid_name("") && !valid_name("-x") && !valid_name("a/b") && !valid_name("a b") && !valid_name("../x"));
    }

    #[test]
    fn revisions_git_dirty_and_content() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("profiles")).unwrap();
        std::fs::write(dir.path().join("profiles/repo_name"), "r\n").unwrap();
        let plain = revision(dir.path(), &Silent).unwrap();
        assert!(plain.recorded.starts_with("tree-") && plain.recorded.len() == 37, "{plain:?}");
        assert_eq!(plain.key, plain.recorded);
        assert_eq!(revision(dir.path(), &Silent).unwrap(), plain, "the same content, the same revision");
        std::fs::write(dir.path().join("profiles/x"), "1").unwrap();
        let changed = revision(dir.path(), &Silent).unwrap();
        assert_ne!(changed, plain);
        // A file made executable is another tree.
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(dir.path().join("profiles/x"), std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_ne!(revision(dir.path(), &Silent).unwrap(), changed);

        git(dir.path(), &["init", "-q"]);
        git(dir.path(), &["add", "-A"]);
        git(dir.path(), &["commit", "-q", "-m", "x"]);
        let head = git(dir.path(), &["rev-parse", "HEAD"]);
        assert_eq!(revision(dir.path(), &Silent).unwrap(), Revision { recorded: head.clone(), key: head.clone() });
        std::fs::write(dir.path().join("profiles/x"), "2").unwrap();
        let dirty = revision(dir.path(), &Silent).unwrap();
        assert_eq!(dirty.recorded, format!("{head}-dirty"));
        assert!(dirty.key.starts_with(&format!("{head}-dirty-")), "{dirty:?}");
        std::fs::write(dir.path().join("profiles/x"), "3").unwrap();
        assert_ne!(revision(dir.path(), &Silent).unwrap().key, dirty.key, "other dirty content, another snapshot");
    }

    #[test]
    fn the_cached_content_hash_sees_every_change() {
        let home = tempfile::tempdir().unwrap();
        let home = Home::new(home.path());
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("c/p")).unwrap();
        std::fs::write(dir.path().join("c/p/p-1.ebuild"), "EAPI=8\n").unwrap();
        let first = content_hash_cached(&home, dir.path()).unwrap();
        assert_eq!(first, content_hash(dir.path()).unwrap());
        assert_eq!(std::fs::read_dir(home.root().join("repos/.content-hashes")).unwrap().count(), 1);
        assert_eq!(content_hash_cached(&home, dir.path()).unwrap(), first, "unchanged: from the cache");
        // Same size, mtime put back: ctime still moves, so the edit is seen.
        let f = dir.path().join("c/p/p-1.ebuild");
        let mtime = std::fs::metadata(&f).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&f, "EAPI=7\n").unwrap();
        std::fs::File::options().write(true).open(&f).unwrap().set_modified(mtime).unwrap();
        let edited = content_hash_cached(&home, dir.path()).unwrap();
        assert_ne!(edited, first);
        assert_eq!(edited, content_hash(dir.path()).unwrap());
        // A new file, and a cache entry that is garbage, are both handled.
        std::fs::write(dir.path().join("c/p/p-2.ebuild"), "EAPI=8\n").unwrap();
        assert_eq!(content_hash_cached(&home, dir.path()).unwrap(), content_hash(dir.path()).unwrap());
        for e in std::fs::read_dir(home.root().join("repos/.content-hashes")).unwrap().flatten() {
            std::fs::write(e.path(), "garbage").unwrap();
        }
        assert_eq!(content_hash_cached(&home, dir.path()).unwrap(), content_hash(dir.path()).unwrap());
    }

    #[test]
    fn the_stat_fingerprint_is_stable_and_sees_renames_modes_and_deep_edits() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        // More top-level entries than threads, so the work is really shared out.
        for c in 0..40 {
            std::fs::create_dir_all(dir.path().join(format!("cat-{c}/pkg/files"))).unwrap();
            std::fs::write(dir.path().join(format!("cat-{c}/pkg/pkg-1.ebuild")), "EAPI=8\n").unwrap();
            std::fs::write(dir.path().join(format!("cat-{c}/pkg/files/a.patch")), "x").unwrap();
        }
        std::fs::create_dir(dir.path().join(".git")).unwrap();
        let first = stat_fingerprint(dir.path()).unwrap();
        for _ in 0..5 {
            assert_eq!(stat_fingerprint(dir.path()).unwrap(), first, "nothing changed");
        }
        std::fs::write(dir.path().join(".git/HEAD"), "ref").unwrap();
        assert_eq!(stat_fingerprint(dir.path()).unwrap(), first, ".git is not part of the tree");
        let deep = dir.path().join("cat-17/pkg/files/a.patch");
        std::fs::set_permissions(&deep, std::fs::Permissions::from_mode(0o755)).unwrap();
        let chmodded = stat_fingerprint(dir.path()).unwrap();
        assert_ne!(chmodded, first, "a mode change three levels down");
        std::fs::rename(&deep, dir.path().join("cat-17/pkg/files/b.patch")).unwrap();
        assert_ne!(stat_fingerprint(dir.path()).unwrap(), chmodded, "a rename");
        // An unreadable subtree is an error naming it (root reads everything, so remove instead).
        let gone = dir.path().join("nope");
        let err = stat_fingerprint(&gone).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }

    #[test]
    fn the_content_hash_ignores_vcs_metadata() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), "x").unwrap();
        let before = content_hash(dir.path()).unwrap();
        std::fs::create_dir(dir.path().join(".git")).unwrap();
        std::fs::write(dir.path().join(".git/HEAD"), "y").unwrap();
        assert_eq!(content_hash(dir.path()).unwrap(), before);
    }

    #[test]
    fn the_plan_takes_cli_host_and_managed_repositories() {
        let home_dir = tempfile::tempdir().unwrap();
        let home = Home::new(home_dir.path());
        let host = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(host.path().join("profiles")).unwrap();
        std::fs::write(host.path().join("profiles/repo_name"), "overlay\n").unwrap();
        let conf = format!(
            "[overlay]\nlocation = {}\n[missing]\nlocation = /nonexistent/missing\n[cli]\nlocation = /elsewhere\n",
            host.path().display()
        );
        let cli = vec![("cli".to_owned(), PathBuf::from("/src/cli"))];
        let plan = plan(&home, &cli, &conf, "gentoo");
        let names: Vec<(&str, &Origin)> = plan.iter().map(|s| (s.name.as_str(), &s.origin)).collect();
        assert_eq!(names, [("cli", &Origin::Cli), ("overlay", &Origin::ReposConf)]);
        assert_eq!(plan[1].path, host.path());
    }

    #[test]
    fn the_guest_repos_conf_names_every_snapshot() {
        let c = guest_repos_conf("gentoo", &["gentoo".into(), "dbh-test".into()]);
        assert!(c.contains("main-repo = gentoo\n"), "{c}");
        assert!(c.contains("[dbh-test]\nlocation = /var/db/repos/dbh-test\nauto-sync = no\n"), "{c}");
    }
}
