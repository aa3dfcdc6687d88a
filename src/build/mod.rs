//! Building binary packages for a target: the backends (only [`vm`] so far), the host's cross
//! [`toolchain`], and what they share —
//! the build request, the per-target Portage configuration on the host, the outcome.

pub mod toolchain;
pub mod vm;

use std::path::{Path, PathBuf};

use crate::error::Hint;
use crate::settings::Home;

/// What to build, independent of the backend.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// Local ebuild repositories made available to the build (each named by profiles/repo_name).
    pub repos: Vec<PathBuf>,
    /// `REPO:PATH` as `eselect profile` names it; `None` = the target's.
    pub profile: Option<String>,
    /// MAKEOPTS -jN.
    pub jobs: u32,
    pub atoms: Vec<String>,
    pub emerge_args: Vec<String>,
}

/// One package that did not build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedPackage {
    /// `cat/pf`.
    pub cpv: String,
    /// Its build log on the host, when the guest still had it.
    pub log: Option<PathBuf>,
    /// The last lines of that log.
    pub tail: String,
}

/// What a build did.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub published: Vec<crate::binhost::add::Added>,
    pub failed: Vec<FailedPackage>,
    /// `$DBH_HOME/logs/<target>/<timestamp>`: emerge.log and the failed packages' logs.
    pub log_dir: PathBuf,
    /// Binary packages that came back from the builder (new or changed ones only).
    pub transferred: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("no signing key in {dir}: published packages must be signed")]
    NoKey { dir: PathBuf },
    #[error("cannot use {path} as an ebuild repository: {reason}")]
    BadRepo { path: PathBuf, reason: String },
    #[error("profile `{profile}` is not of the form REPO:PATH")]
    BadProfile { profile: String },
    #[error("cannot {doing} {path}")]
    Io {
        doing: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the {target} guest's binary package {path} does not match its Packages index: {reason}")]
    Mismatch { target: String, path: String, reason: String },
    #[error("cannot read the {target} guest's Packages index: {reason}")]
    GuestIndex { target: String, reason: String },
    #[error(transparent)]
    Toolchain(#[from] toolchain::ToolchainError),
    #[error("emerge in the {target} guest did not start (exit status {status}): {tail}")]
    EmergeFailed { target: String, status: u32, tail: String },
    #[error("nothing to build for {target}: no atom given and {world} lists none")]
    NothingToBuild { target: String, world: PathBuf },
}

impl Hint for BuildError {
    fn hint(&self) -> Option<String> {
        match self {
            BuildError::NoKey { .. } => Some("create one with `dbh key generate`".into()),
            BuildError::BadRepo { .. } => {
                Some("an ebuild repository has its name in profiles/repo_name (or metadata/layout.conf repo-name)".into())
            }
            BuildError::NothingToBuild { target, .. } => Some(format!(
                "name atoms on the command line, or list them (one per line) in the world file; see `dbh config show --target {target}`"
            )),
            BuildError::Toolchain(e) => e.hint(),
            BuildError::BadProfile { .. } => Some("name it as `eselect profile list` does, e.g. gentoo:default/linux/arm64/23.0".into()),
            _ => None,
        }
    }
}

fn io<'a>(doing: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> BuildError + 'a {
    move |source| BuildError::Io { doing, path: path.to_owned(), source }
}

/// The name of the ebuild repository at `path` (profiles/repo_name, else layout.conf repo-name).
pub fn repo_name(path: &Path) -> Result<String, BuildError> {
    let bad = |reason: &str| BuildError::BadRepo { path: path.to_owned(), reason: reason.into() };
    if !path.is_dir() {
        return Err(bad("it is not a directory"));
    }
    if let Ok(text) = fs_err::read_to_string(path.join("profiles/repo_name")) {
        let name = text.trim();
        if !name.is_empty() {
            return Ok(name.to_owned());
        }
    }
    if let Ok(text) = fs_err::read_to_string(path.join("metadata/layout.conf")) {
        for line in text.lines() {
            if let Some((k, v)) = line.split_once('=')
                && k.trim() == "repo-name"
            {
                return Ok(v.trim().to_owned());
            }
        }
    }
    Err(bad("it has no profiles/repo_name"))
}

/// Splits `REPO:PATH`.
pub fn split_profile(profile: &str) -> Result<(String, String), BuildError> {
    match profile.split_once(':') {
        Some((repo, path)) if !repo.is_empty() && !path.is_empty() => Ok((repo.to_owned(), path.to_owned())),
        _ => Err(BuildError::BadProfile { profile: profile.to_owned() }),
    }
}

/// The revision `path` is at, for REPO_REVISIONS: its git commit (`<commit>-dirty` when files under
/// `path` differ from it, with a note), `None` when it is not in a git checkout or git is missing.
pub fn repo_revision(path: &Path, reporter: &dyn crate::events::Reporter) -> Option<String> {
    let git = |args: &[&str]| crate::process::Cmd::new("git").arg("-C").arg(path).args(args).output().ok();
    let head = git(&["rev-parse", "--verify", "HEAD"])?.stdout_str().trim().to_owned();
    if head.is_empty() {
        return None;
    }
    let status = git(&["status", "--porcelain", "--", "."])?.stdout_str();
    if status.trim().is_empty() {
        return Some(head);
    }
    reporter.event(crate::events::Event::Note {
        message: format!(
            "warning: {} has changes not committed to {head}; its revision is recorded as {head}-dirty",
            path.display()
        ),
    });
    Some(format!("{head}-dirty"))
}

/// Merges `revisions` (repository name → revision) into the index header's `REPO_REVISIONS`, a
/// JSON object written as Portage's `json.dumps(..., sort_keys=True)` does; other repositories'
/// entries stay. An unreadable old value is replaced.
pub fn merge_repo_revisions(header: &mut std::collections::BTreeMap<String, String>, revisions: &std::collections::BTreeMap<String, String>) {
    if revisions.is_empty() {
        return;
    }
    let mut all: std::collections::BTreeMap<String, String> = header
        .get("REPO_REVISIONS")
        .and_then(|v| serde_json::from_str(v).ok())
        .unwrap_or_default();
    all.extend(revisions.iter().map(|(k, v)| (k.clone(), v.clone())));
    let json = |s: &str| serde_json::to_string(s).expect("a string serializes");
    let body: Vec<String> = all.iter().map(|(k, v)| format!("{}: {}", json(k), json(v))).collect();
    header.insert("REPO_REVISIONS".into(), format!("{{{}}}", body.join(", ")));
}

/// Default files of `$DBH_HOME/targets/<target>/portage/`, written on first use.
const DEFAULT_MAKE_CONF: &str = "\
# dbh: added to the builder's /etc/portage/make.conf before every build of this target.
# dbh itself sets MAKEOPTS, FEATURES=buildpkg, BINPKG_FORMAT and PKGDIR after this file.
# Every license is accepted so that any package can be built; restrict it here if you need to.
ACCEPT_LICENSE=\"*\"
";
const DEFAULT_PACKAGE_USE: &str = "# dbh: synced to the builder's /etc/portage/package.use/dbh\n";
const DEFAULT_ACCEPT_KEYWORDS: &str = "# dbh: synced to the builder's /etc/portage/package.accept_keywords/dbh\n";
const DEFAULT_WORLD: &str = "\
# dbh: what `dbh vm build --target T` builds when no atom is given, one atom or @set per line.
# Synced to the builder as the set @dbh-world (/etc/portage/sets/dbh-world).
";
const DEFAULT_REPOS_CONF: &str = "\
# dbh: synced to the builder's /etc/portage/repos.conf/50-dbh-host.conf before every build.
# Repositories the builder has or syncs itself (--repo ones are added after this and win), e.g.
# [guru]
# location = /var/db/repos/guru
# sync-type = git
# sync-uri = https://github.com/gentoo-mirror/guru.git
";

/// The files of `$DBH_HOME/targets/<target>/portage/`, in the order `dbh config show` prints them.
pub const CONFIG_FILES: &[&str] = &["make.conf", "package.use", "package.accept_keywords", "world", "repos.conf"];

/// The host's per-target Portage configuration; created with defaults on first use.
#[derive(Debug, Clone)]
pub struct PortageConfig {
    pub make_conf: String,
    pub package_use: String,
    pub package_accept_keywords: String,
    /// Atoms and @sets, one per line: the build's default when no atom is given.
    pub world: String,
    /// repos.conf sections added to the builder's own (besides `--repo` ones).
    pub repos_conf: String,
}

impl PortageConfig {
    pub fn dir(home: &Home, target: &str) -> PathBuf {
        home.target_config(target).join("portage")
    }

    pub fn load_or_create(home: &Home, target: &str) -> Result<PortageConfig, BuildError> {
        let dir = Self::dir(home, target);
        std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        let read = |name: &str, default: &str| -> Result<String, BuildError> {
            let path = dir.join(name);
            if !path.exists() {
                std::fs::write(&path, default).map_err(io("write", &path))?;
            }
            if path.is_dir() {
                // A directory like /etc/portage's own: its files concatenated in name order.
                let mut names: Vec<PathBuf> =
                    std::fs::read_dir(&path).map_err(io("read", &path))?.flatten().map(|e| e.path()).collect();
                names.sort();
                let mut all = String::new();
                for f in names.iter().filter(|f| f.is_file()) {
                    all.push_str(&std::fs::read_to_string(f).map_err(io("read", f))?);
                    all.push('\n');
                }
                return Ok(all);
            }
            std::fs::read_to_string(&path).map_err(io("read", &path))
        };
        Ok(PortageConfig {
            make_conf: read("make.conf", DEFAULT_MAKE_CONF)?,
            package_use: read("package.use", DEFAULT_PACKAGE_USE)?,
            package_accept_keywords: read("package.accept_keywords", DEFAULT_ACCEPT_KEYWORDS)?,
            world: read("world", DEFAULT_WORLD)?,
            repos_conf: read("repos.conf", DEFAULT_REPOS_CONF)?,
        })
    }

    /// The atoms of the `world` file (comments and blank lines dropped).
    pub fn world_atoms(&self) -> Vec<String> {
        self.world
            .lines()
            .map(|l| l.split_once('#').map_or(l, |(a, _)| a).trim())
            .filter(|l| !l.is_empty())
            .flat_map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_is_split_at_the_first_colon() {
        assert_eq!(split_profile("dbh-test:dbh/arm64").unwrap(), ("dbh-test".into(), "dbh/arm64".into()));
        assert!(split_profile("dbh/arm64").is_err());
        assert!(split_profile(":x").is_err());
    }

    #[test]
    fn repo_name_comes_from_the_repository() {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/repo");
        assert_eq!(repo_name(&root).unwrap(), "dbh-test");
        let e = repo_name(&root.join("licenses")).unwrap_err();
        assert!(e.to_string().contains("profiles/repo_name"), "{e}");
    }

    #[test]
    fn portage_config_defaults_are_written_once() {
        let home = tempfile::tempdir().unwrap();
        let home = Home::new(home.path());
        let c = PortageConfig::load_or_create(&home, "arm64").unwrap();
        assert!(c.make_conf.contains("ACCEPT_LICENSE"));
        let dir = PortageConfig::dir(&home, "arm64");
        std::fs::write(dir.join("make.conf"), "X=1\n").unwrap();
        assert_eq!(PortageConfig::load_or_create(&home, "arm64").unwrap().make_conf, "X=1\n");
        for f in CONFIG_FILES {
            assert!(dir.join(f).is_file(), "{f} is written on first use");
        }
        assert!(c.world_atoms().is_empty(), "the default world builds nothing");
        assert!(c.repos_conf.lines().all(|l| l.starts_with('#')), "{}", c.repos_conf);
    }

    #[test]
    fn repo_revisions_merge_like_portage_writes_them() {
        let mut header = std::collections::BTreeMap::new();
        let revs = |pairs: &[(&str, &str)]| pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        merge_repo_revisions(&mut header, &revs(&[("gentoo", "abc")]));
        assert_eq!(header["REPO_REVISIONS"], r#"{"gentoo": "abc"}"#);
        merge_repo_revisions(&mut header, &revs(&[("dbh-test", "d\"1"), ("gentoo", "def")]));
        assert_eq!(header["REPO_REVISIONS"], r#"{"dbh-test": "d\"1", "gentoo": "def"}"#);
        merge_repo_revisions(&mut header, &revs(&[]));
        assert_eq!(header["REPO_REVISIONS"], r#"{"dbh-test": "d\"1", "gentoo": "def"}"#);
    }

    #[test]
    fn repo_revision_is_the_git_commit() {
        let dir = tempfile::tempdir().unwrap();
        let silent = crate::events::Silent;
        assert_eq!(repo_revision(dir.path(), &silent), None, "not a git checkout");
        let git = |args: &[&str]| {
            let ok = std::process::Command::new("git")
                .arg("-C")
                .arg(dir.path())
                .args(["-c", "user.name=t", "-c", "user.email=t@t"])
                .args(args)
                .status()
                .unwrap()
                .success();
            assert!(ok, "git {args:?}");
        };
        git(&["init", "-q"]);
        std::fs::write(dir.path().join("a"), "1").unwrap();
        git(&["add", "a"]);
        git(&["commit", "-q", "-m", "a"]);
        let head = repo_revision(dir.path(), &silent).unwrap();
        assert_eq!(head.len(), 40, "{head}");
        std::fs::write(dir.path().join("a"), "2").unwrap();
        assert_eq!(repo_revision(dir.path(), &silent).unwrap(), format!("{head}-dirty"));
    }

    #[test]
    fn world_atoms_skip_comments() {
        let home = tempfile::tempdir().unwrap();
        let home = Home::new(home.path());
        let dir = PortageConfig::dir(&home, "arm64");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("world"), "# mine\ndbh-test/hello\n\n  @dbh-extra # a set\n").unwrap();
        let c = PortageConfig::load_or_create(&home, "arm64").unwrap();
        assert_eq!(c.world_atoms(), ["dbh-test/hello", "@dbh-extra"]);
    }
}
