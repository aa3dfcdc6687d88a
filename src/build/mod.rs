//! Building binary packages for a target: the dispatch ([`backend`]), the backends ([`vm`]: a throw-away guest; [`cross`]:
//! Portage on the host with a cross compiler; [`chroot`]: the target's stage under qemu-user), the
//! host's cross [`toolchain`], the [`choice`] between backends, and what they share: the build
//! request, outcome and error (here), the per-target Portage configuration ([`portage_config`]),
//! repositories and profiles ([`repos`]), the host-side checks before a build ([`prepare`]),
//! following emerge's output ([`emerge`]), and the host backends' locks, staging PKGDIR and
//! publishing ([`host`]).

pub mod backend;
pub mod choice;
pub mod chroot;
pub mod cross;
pub mod distcc;
pub mod emerge;
pub mod host;
pub mod plan;
pub mod portage_config;
pub mod prepare;
pub mod repos;
pub mod toolchain;
pub mod vm;

// The shared parts keep their `build::` paths (the backends and rootfs use them as before).
pub use emerge::{EmergeLine, Follower, Planned, failed_package, parse_line, parse_merge_list_line, run_emerge};
pub use host::{HOST_EMERGE_ARGS, check_indexed, emerge_and_publish, staged_binpkgs};
pub(crate) use host::{fresh_staging, lock_dir, symlink, write};
pub use portage_config::{CONFIG_FILES, PortageConfig};
pub use prepare::{Prepared, prepare};
pub use repos::{merge_repo_revisions, repo_name, repo_revision, repos_conf_sections, split_profile};

use std::path::{Path, PathBuf};

use crate::hint::Hint;

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
    /// Keep a binhost current: `--update --deep --newuse` with the binpkg checks (`--update`).
    pub update: bool,
    /// Keep the image's own binhosts (a stage3's `gentoobinhost.conf`) beside dbh's (setting
    /// `build.gentoo_binhost`); by default the guest uses only dbh's.
    pub gentoo_binhost: bool,
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
    /// The packages built from source and why the binhost's binpkg did not do (`cpv`, reason).
    pub rebuilt: Vec<(String, String)>,
}

impl Outcome {
    /// The failed packages as the build's error: for the host-side backends with a hint to build
    /// them in a guest instead; for a guest with each package's log.
    pub fn failures(&self, backend: backend::Kind, target: &str) -> Result<(), BuildError> {
        if self.failed.is_empty() {
            return Ok(());
        }
        Err(match backend {
            backend::Kind::Vm => BuildError::GuestFailed {
                target: target.to_owned(),
                packages: self.failed.iter().map(|f| (f.cpv.clone(), f.log.clone())).collect(),
            },
            host => BuildError::BackendFailed {
                backend: host.name(),
                target: target.to_owned(),
                packages: self.failed.iter().map(|f| f.cpv.clone()).collect(),
                log_dir: self.log_dir.clone(),
            },
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("no signing key in {dir}: published packages must be signed")]
    NoKey { dir: PathBuf },
    #[error("cannot use {path} as an ebuild repository: {reason}")]
    BadRepo { path: PathBuf, reason: String },
    #[error("profile `{profile}` is not of the form REPO:PATH")]
    BadProfile { profile: String },
    #[error("{0}")]
    Io(#[from] crate::util::fs::PathError),
    #[error("the {target} guest's binary package {path} does not match its Packages index: {reason}")]
    Mismatch { target: String, path: String, reason: String },
    #[error("cannot read the {target} guest's Packages index: {reason}")]
    GuestIndex { target: String, reason: String },
    #[error("{0}")]
    Toolchain(#[from] toolchain::ToolchainError),
    #[error("{0}")]
    Chroot(#[from] chroot::ChrootError),
    #[error("{0}")]
    Process(#[from] crate::process::ProcessError),
    #[error("{0}")]
    Repo(#[from] crate::repo::RepoError),
    #[error("{0}")]
    Sign(#[from] crate::sign::SignError),
    #[error("{0}")]
    Binhost(#[from] crate::binhost::BinhostError),
    #[error("{0}")]
    Binpkg(#[from] crate::binpkg::BinpkgError),
    #[error("{0}")]
    Image(#[from] crate::image::ImageError),
    #[error("{0}")]
    Vm(#[from] crate::vm::VmError),
    #[error("{0}")]
    Guest(#[from] crate::guest::GuestError),
    #[error("{0}")]
    Rootfs(#[from] Box<crate::rootfs::RootfsError>),
    #[error("{0}")]
    Serve(#[from] crate::serve::ServeError),
    #[error("emerge in the {target} guest did not start (exit status {status}): {tail}")]
    EmergeFailed { target: String, status: u32, tail: String },
    #[error("emerge for {target} ({backend} backend) did not start (exit status {status}): {tail}")]
    HostEmergeFailed { backend: &'static str, target: String, status: i32, tail: String },
    #[error("{} package(s) failed to build for {target} with the {backend} backend: {}", .packages.len(), .packages.join(", "))]
    BackendFailed { backend: &'static str, target: String, packages: Vec<String>, log_dir: PathBuf },
    #[error("the {path} staging PKGDIR's {file} does not match its Packages index: {reason}")]
    StagedMismatch { path: PathBuf, file: String, reason: String },
    #[error("cannot read the Packages index of the staging PKGDIR {path}: {reason}")]
    StagedIndex { path: PathBuf, reason: String },
    #[error("another dbh build for {target} is using {dir}")]
    Busy { target: String, dir: PathBuf },
    #[error("no `emerge` found{}", .looked.as_ref().map(|p| format!(" at {}", p.display())).unwrap_or_else(|| " on PATH".into()))]
    NoEmerge { looked: Option<PathBuf> },
    #[error("nothing to build for {target}: no atom given and {world} lists none")]
    NothingToBuild { target: String, world: PathBuf },
    #[error("the {target} guest has no gpg: it cannot verify the binary packages it fetches from dbh's binhost")]
    GuestNoGpg { target: String },
    #[error("cannot start the async runtime for the guest")]
    Runtime(#[source] std::io::Error),
    #[error("{} package(s) failed to build: {}", .packages.len(), .packages.iter().map(|(cpv, log)| format!("{cpv} (log: {})", log.as_deref().map_or_else(|| "none".into(), |p| p.display().to_string()))).collect::<Vec<_>>().join(", "))]
    GuestFailed { target: String, packages: Vec<(String, Option<PathBuf>)> },
    #[error("nothing to install into the {target} base image from: {binhost} has no Packages index")]
    NothingToInstall { target: String, binhost: PathBuf },
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
            BuildError::BadProfile { .. } => Some("name it as `eselect profile list` does, e.g. gentoo:default/linux/arm64/23.0".into()),
            BuildError::HostEmergeFailed { target, .. } => Some(format!(
                "see the log above; a package that does not build this way may build in a guest: `dbh build --backend vm --target {target} ATOM`"
            )),
            BuildError::BackendFailed { backend, target, packages, log_dir } => Some(format!(
                "logs are in {}; packages that {} can be built in a guest: `dbh build --backend vm --target {target} {}`",
                log_dir.display(),
                if *backend == "cross" { "do not cross-compile" } else { "fail this way" },
                packages.iter().map(|c| format!("={c}")).collect::<Vec<_>>().join(" ")
            )),
            BuildError::GuestNoGpg { target } => Some(format!(
                "install app-crypt/gnupg into the image (a Gentoo stage3 has it): `dbh vm image update --target {target}` takes it from the binhost"
            )),
            BuildError::NothingToInstall { target, .. } => Some(format!(
                "build the tools into the binhost first, e.g. `dbh vm build --target {target} app-crypt/gnupg sys-devel/distcc`"
            )),
            BuildError::Busy { .. } => Some("wait for it to finish; builds of one target on the host run one at a time".into()),
            BuildError::NoEmerge { .. } => Some(
                "on Gentoo, Portage is installed; elsewhere install it from PyPI into a venv \
                 (`python3 -m venv ~/.local/portage && ~/.local/portage/bin/pip install portage`) and point dbh at it \
                 with DBH_PORTAGE_EMERGE=~/.local/portage/bin/emerge (setting `portage.emerge`)"
                    .into(),
            ),
            _ => None,
        }
    }
}

fn io<'a>(doing: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> BuildError + 'a {
    crate::util::fs::at(doing, path)
}

/// UTC `YYYYMMDD-HHMMSS` for log directory names.
pub fn timestamp() -> String {
    crate::util::time::log_stamp()
}
