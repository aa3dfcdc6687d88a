//! Building binary packages for a target: the backends (only [`vm`] so far), the host's cross
//! [`toolchain`], and what they share —
//! the build request, the per-target Portage configuration on the host, the outcome.

pub mod distcc;
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
    /// Offload the compiles through distcc (`--distcc`, setting `build.distcc`).
    pub distcc: Option<distcc::DistccOptions>,
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
}

impl Hint for BuildError {
    fn hint(&self) -> Option<String> {
        match self {
            BuildError::NoKey { .. } => Some("create one with `dbh key generate`".into()),
            BuildError::BadRepo { .. } => {
                Some("an ebuild repository has its name in profiles/repo_name (or metadata/layout.conf repo-name)".into())
            }
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

/// Default files of `$DBH_HOME/targets/<target>/portage/`, written on first use.
const DEFAULT_MAKE_CONF: &str = "\
# dbh: added to the builder's /etc/portage/make.conf before every build of this target.
# dbh itself sets MAKEOPTS, FEATURES=buildpkg, BINPKG_FORMAT and PKGDIR after this file.
# Every license is accepted so that any package can be built; restrict it here if you need to.
ACCEPT_LICENSE=\"*\"
";
const DEFAULT_PACKAGE_USE: &str = "# dbh: synced to the builder's /etc/portage/package.use/dbh\n";
const DEFAULT_ACCEPT_KEYWORDS: &str = "# dbh: synced to the builder's /etc/portage/package.accept_keywords/dbh\n";

/// The host's per-target Portage configuration; created with defaults on first use.
#[derive(Debug, Clone)]
pub struct PortageConfig {
    pub make_conf: String,
    pub package_use: String,
    pub package_accept_keywords: String,
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
        })
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
    }
}
