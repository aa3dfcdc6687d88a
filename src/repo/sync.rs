//! Repositories dbh manages itself (`dbh repo sync NAME [--url URL]`), for hosts that are not
//! Gentoo and have no `/var/db/repos/gentoo`: `$DBH_HOME/repos/<name>/`
//! - `source.json`: the URL and how it is synced (`git` or `rsync`), remembered from `--url`;
//! - `git/`: a bare, shallow mirror (git URLs), fetched with `--depth=1` into `refs/dbh/synced`;
//! - `trees/<revision>/`: one immutable checkout per revision (a git commit, or for rsync the
//!   content hash `tree-<sha256>`), made in a dot-named temp directory and renamed into place;
//! - `current`: a symlink to `trees/<revision>`, replaced atomically (symlink + rename).
//!
//! Every write happens under the repository's flock (the one snapshots take), so a build never
//! snapshots a tree that is being replaced; leftovers of a killed sync are removed by the next.
//! rsync updates hard-link unchanged files to the previous tree (`--link-dest`): trees are never
//! written in place, so sharing inodes is safe.

use std::path::{Path, PathBuf};

use super::snapshot::{lock, write_atomic};
use super::{RepoError, dir, io, valid_name};
use crate::events::{Event, Reporter};
use crate::process::Cmd;
use crate::settings::Home;

/// How a managed repository is updated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Git,
    Rsync,
}

/// `source.json`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SourceConf {
    pub url: String,
    #[serde(rename = "type")]
    pub method: Method,
}

/// What a sync did.
#[derive(Debug, Clone)]
pub struct Synced {
    pub name: String,
    pub revision: String,
    pub tree: PathBuf,
    /// The revision differs from the one before.
    pub changed: bool,
}

fn is_git_dir(p: &Path) -> bool {
    p.join(".git").exists() || (p.join("HEAD").is_file() && p.join("objects").is_dir())
}

/// Decides how `url` is synced.
pub fn method_for(url: &str) -> Result<Method, RepoError> {
    if url.starts_with("rsync://") || url.contains("::") {
        return Ok(Method::Rsync);
    }
    let local = url.strip_prefix("file://").or_else(|| url.starts_with('/').then_some(url));
    if let Some(path) = local {
        let p = Path::new(path);
        if !p.is_dir() {
            return Err(RepoError::BadUrl { url: url.into(), reason: "no such directory".into() });
        }
        return Ok(if is_git_dir(p) { Method::Git } else { Method::Rsync });
    }
    if ["https://", "http://", "git://", "ssh://", "git@"].iter().any(|s| url.starts_with(s)) {
        return Ok(Method::Git);
    }
    Err(RepoError::BadUrl { url: url.into(), reason: "neither a git URL, an rsync URL nor an absolute path".into() })
}

/// The current tree of the managed repository `name` and its revision, if it was ever synced.
pub fn current(home: &Home, name: &str) -> Option<(PathBuf, String)> {
    let d = dir(home, name);
    let link = std::fs::read_link(d.join("current")).ok()?;
    let rev = link.file_name()?.to_string_lossy().into_owned();
    let tree = d.join(&link);
    tree.is_dir().then_some((tree, rev))
}

pub fn read_source(home: &Home, name: &str) -> Option<SourceConf> {
    serde_json::from_str(&std::fs::read_to_string(dir(home, name).join("source.json")).ok()?).ok()
}

/// Updates the managed repository `name` from `url` (remembered), or from the URL it was synced
/// from before.
pub fn sync(home: &Home, name: &str, url: Option<&str>, reporter: &dyn Reporter) -> Result<Synced, RepoError> {
    if !valid_name(name) {
        return Err(RepoError::BadName { name: name.into() });
    }
    let conf = match url {
        Some(u) => SourceConf { url: u.to_owned(), method: method_for(u)? },
        None => read_source(home, name).ok_or_else(|| RepoError::NoUrl { name: name.into() })?,
    };
    let d = dir(home, name);
    let _lock = lock(home, name, reporter)?;
    let trees = d.join("trees");
    std::fs::create_dir_all(&trees).map_err(io("create", &trees))?;
    for parent in [&d, &trees] {
        for e in std::fs::read_dir(parent).map_err(io("read", parent))?.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.contains(".tmp-") || n.starts_with(".index-") {
                let p = e.path();
                let _ = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
            }
        }
    }
    if url.is_some() {
        write_atomic(&d.join("source.json"), format!("{:#}\n", serde_json::to_value(&conf).expect("serializes")).as_bytes())?;
    }
    let before = current(home, name).map(|(_, r)| r);
    let pid = std::process::id();
    let failed = |source| RepoError::SyncFailed { name: name.into(), url: conf.url.clone(), source };
    reporter.event(Event::Note { message: format!("syncing repository {name} from {} ({:?})", conf.url, conf.method) });
    let revision = match conf.method {
        Method::Git => {
            let mirror = d.join("git");
            if !mirror.join("HEAD").is_file() {
                let tmp = d.join(format!(".git.tmp-{pid}"));
                Cmd::new("git").args(["init", "-q", "--bare"]).arg(&tmp).output()?;
                std::fs::rename(&tmp, &mirror).map_err(io("rename into place", &mirror))?;
            }
            let git = || Cmd::new("git").arg(format!("--git-dir={}", mirror.display()));
            git().args(["fetch", "-q", "--depth=1", "--no-tags", &conf.url, "+HEAD:refs/dbh/synced"]).output().map_err(failed)?;
            let rev = git().args(["rev-parse", "--verify", "refs/dbh/synced^{commit}"]).output()?.stdout_str().trim().to_owned();
            let tree = trees.join(&rev);
            if !tree.is_dir() {
                let tmp = trees.join(format!(".{rev}.tmp-{pid}"));
                std::fs::create_dir_all(&tmp).map_err(io("create", &tmp))?;
                let index = d.join(format!(".index-{pid}"));
                git()
                    .env("GIT_INDEX_FILE", &index)
                    .arg(format!("--work-tree={}", tmp.display()))
                    .args(["checkout", "-q", "-f", &rev, "--", "."])
                    .output()?;
                let _ = std::fs::remove_file(&index);
                std::fs::rename(&tmp, &tree).map_err(io("rename into place", &tree))?;
            }
            rev
        }
        Method::Rsync => {
            let tmp = trees.join(format!(".new.tmp-{pid}"));
            let src = conf.url.strip_prefix("file://").unwrap_or(&conf.url);
            let mut cmd = Cmd::new("rsync")
                .args(["-a", "--delete", "--exclude=/.git", "--exclude=/.svn"])
                .install_hint("rsync (Debian) or net-misc/rsync (Gentoo)");
            if let Some((tree, _)) = current(home, name) {
                cmd = cmd.arg(format!("--link-dest={}", tree.display()));
            }
            cmd.arg(format!("{}/", src.trim_end_matches('/'))).arg(format!("{}/", tmp.display())).output().map_err(failed)?;
            let rev = format!("tree-{}", &super::content_hash(&tmp)?[..32]);
            let tree = trees.join(&rev);
            if tree.is_dir() {
                let _ = std::fs::remove_dir_all(&tmp);
            } else {
                std::fs::rename(&tmp, &tree).map_err(io("rename into place", &tree))?;
            }
            rev
        }
    };
    let tree = trees.join(&revision);
    super::repo_name(&tree)?;
    let link_tmp = d.join(format!(".current.tmp-{pid}"));
    std::os::unix::fs::symlink(Path::new("trees").join(&revision), &link_tmp).map_err(io("create", &link_tmp))?;
    std::fs::rename(&link_tmp, d.join("current")).map_err(io("rename into place", &d.join("current")))?;
    // Older trees are no longer current; their snapshots (if any) stay in snapshots/.
    for e in std::fs::read_dir(&trees).map_err(io("read", &trees))?.flatten() {
        if e.file_name().to_string_lossy() != revision.as_str() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    let changed = before.as_deref() != Some(revision.as_str());
    Ok(Synced { name: name.into(), revision, tree, changed })
}

/// One repository under `$DBH_HOME/repos/`.
#[derive(Debug, Clone)]
pub struct Listed {
    pub name: String,
    pub source: Option<SourceConf>,
    /// The managed tree's revision.
    pub current: Option<String>,
    /// `(revision recorded, image, size)` of each cached snapshot.
    pub snapshots: Vec<(String, PathBuf, u64)>,
}

/// Everything under `$DBH_HOME/repos/`, by name.
pub fn list(home: &Home) -> Vec<Listed> {
    let root = home.root().join("repos");
    let mut names: Vec<String> = std::fs::read_dir(&root)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| valid_name(n))
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let snaps = dir(home, &name).join("snapshots");
            let mut snapshots: Vec<(String, PathBuf, u64)> = std::fs::read_dir(&snaps)
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    let key = n.strip_suffix(".sqfs").filter(|_| !n.starts_with('.'))?.to_owned();
                    let meta: serde_json::Value =
                        serde_json::from_str(&std::fs::read_to_string(snaps.join(format!("{key}.json"))).ok()?).ok()?;
                    let rev = meta["revision"].as_str().unwrap_or(&key).to_owned();
                    Some((rev, e.path(), e.metadata().ok()?.len()))
                })
                .collect();
            snapshots.sort();
            Listed { source: read_source(home, &name), current: current(home, &name).map(|(_, r)| r), snapshots, name }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_choose_the_method() {
        assert_eq!(method_for("rsync://rsync.gentoo.org/gentoo-portage").unwrap(), Method::Rsync);
        assert_eq!(method_for("https://github.com/gentoo-mirror/gentoo.git").unwrap(), Method::Git);
        let d = tempfile::tempdir().unwrap();
        assert_eq!(method_for(&d.path().display().to_string()).unwrap(), Method::Rsync);
        std::fs::create_dir(d.path().join(".git")).unwrap();
        assert_eq!(method_for(&format!("file://{}", d.path().display())).unwrap(), Method::Git);
        assert!(method_for("/nonexistent/x").is_err());
        assert!(method_for("gentoo").is_err());
    }
}
