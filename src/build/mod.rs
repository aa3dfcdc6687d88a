//! Building binary packages for a target: the backends ([`vm`]: a throw-away guest; [`cross`]:
//! Portage on the host with a cross compiler; [`chroot`]: the target's stage under qemu-user), the
//! host's cross [`toolchain`], the [`choice`] between backends, and what they share — the build
//! request, the per-target Portage configuration on the host, following emerge's output, checking
//! a builder's PKGDIR against its index, publishing, the outcome.

pub mod choice;
pub mod chroot;
pub mod cross;
pub mod distcc;
pub mod plan;
pub mod toolchain;
pub mod vm;

use std::collections::{BTreeSet, VecDeque};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::Error;
use crate::binhost::index::Index;
use crate::error::Hint;
use crate::events::{Event, Reporter, Unit};
use crate::process::Cmd;
use crate::settings::Home;
use crate::sign::{KeyStore, Signer};
use crate::target::Target;

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
    #[error(transparent)]
    Chroot(#[from] chroot::ChrootError),
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
}

impl Hint for BuildError {
    fn hint(&self) -> Option<String> {
        match self {
            BuildError::NoKey { .. } => Some("create one with `dbh key generate`".into()),
            BuildError::BadRepo { .. } => {
                Some("an ebuild repository has its name in profiles/repo_name (or metadata/layout.conf repo-name)".into())
            }
            BuildError::Toolchain(e) => e.hint(),
            BuildError::Chroot(e) => e.hint(),
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
                "install app-crypt/gnupg into the image (a Gentoo stage3 has it), e.g. `dbh vm image update --target {target} app-crypt/gnupg`"
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

/// UTC `YYYYMMDD-HHMMSS` for log directory names.
pub fn timestamp() -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86400, secs % 86400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}{m:02}{d:02}-{:02}{:02}{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// The lines emerge prints that dbh follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmergeLine {
    /// `>>> Emerging (N of M) cat/pf::repo` (also `Emerging binary`): the build of `cpv` started.
    Emerging { n: u64, m: u64, cpv: String, binary: bool },
    /// `>>> Completed (N of M) cat/pf::repo`.
    Completed { n: u64, m: u64, cpv: String },
    /// The current package entered a phase, named for the progress bar (`>>> Compiling source in
    /// …` → "compiling", `>>> Installing (N of M) …` → "merging").
    Phase(&'static str),
}

/// emerge's phase lines (after `>>> `) and how the bar names them; first match wins.
const PHASES: &[(&str, &str)] = &[
    ("Unpacking source", "unpacking"),
    ("Preparing source", "preparing"),
    ("Configuring source", "configuring"),
    ("Compiling source", "compiling"),
    ("Test phase", "testing"),
    ("Install ", "installing into the image"),
    ("Completed installing", "checking the image"),
    ("Creating binpkg", "creating the binpkg"),
    ("Extracting ", "extracting the binpkg"),
];

/// Parses one line of emerge's output.
pub fn parse_line(line: &str) -> Option<EmergeLine> {
    let rest = line.trim_start().strip_prefix(">>> ")?;
    if let Some(counted) = parse_counted(rest) {
        return Some(counted);
    }
    PHASES.iter().find(|(prefix, _)| rest.starts_with(prefix)).map(|(_, name)| EmergeLine::Phase(name))
}

/// `KIND (N of M) cat/pf::repo`.
fn parse_counted(rest: &str) -> Option<EmergeLine> {
    let (kind, rest) = rest.split_once('(')?;
    let (count, rest) = rest.split_once(')')?;
    let (n, m) = count.split_once(" of ")?;
    let (n, m) = (n.trim().parse().ok()?, m.trim().parse().ok()?);
    let cpv = rest.split_whitespace().next()?;
    let cpv = cpv.split_once("::").map_or(cpv, |(c, _)| c).to_owned();
    if !cpv.contains('/') {
        return None;
    }
    match kind.trim() {
        "Emerging" => Some(EmergeLine::Emerging { n, m, cpv, binary: false }),
        "Emerging binary" => Some(EmergeLine::Emerging { n, m, cpv, binary: true }),
        "Completed" => Some(EmergeLine::Completed { n, m, cpv }),
        "Installing" => Some(EmergeLine::Phase("merging")),
        _ => None,
    }
}

/// One entry of emerge's merge list (`[ebuild  N    ] cat/pf::repo  USE="a -b* (c)" 0 KiB`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    /// `ebuild` or `binary`.
    pub binary: bool,
    pub cpv: String,
    /// The flags shown enabled (marks `*`, `%` and parentheses removed), sorted.
    pub use_enabled: Vec<String>,
}

/// Parses a merge-list line of `emerge --verbose`.
pub fn parse_merge_list_line(line: &str) -> Option<Planned> {
    let rest = line.trim_start().strip_prefix('[')?;
    let (kind, rest) = rest.split_once(']')?;
    let binary = match kind.split_whitespace().next()? {
        "ebuild" => false,
        "binary" => true,
        _ => return None,
    };
    let mut words = rest.split_whitespace();
    let cpv = words.next()?;
    let cpv = cpv.split_once("::").map_or(cpv, |(c, _)| c).to_owned();
    if !cpv.contains('/') {
        return None;
    }
    let mut use_enabled = Vec::new();
    if let Some((_, after)) = rest.split_once(" USE=\"") {
        let flags = after.split('"').next().unwrap_or_default();
        for f in flags.split_whitespace() {
            let f = f.trim_matches(|c| c == '(' || c == ')').trim_end_matches(['*', '%']);
            let f = f.trim_matches(|c| c == '(' || c == ')');
            if !f.is_empty() && !f.starts_with('-') {
                use_enabled.push(f.to_owned());
            }
        }
    }
    use_enabled.sort();
    Some(Planned { binary, cpv, use_enabled })
}

/// Follows one emerge run line by line, whichever backend runs it: writes emerge.log, turns
/// `Emerging`/`Completed` lines into progress events, keeps a tail for errors, and knows which
/// packages started but never completed (the failed ones).
pub struct Follower {
    task: String,
    label: String,
    log: Option<std::fs::File>,
    echo: bool,
    total: Option<u64>,
    /// The package being built now (its position), for phase messages.
    current: Option<(u64, String)>,
    started: Vec<String>,
    completed: BTreeSet<String>,
    /// Started from source (not `Emerging binary`).
    from_source: BTreeSet<String>,
    /// The enabled USE flags of each package in emerge's merge list (`--verbose`).
    planned_use: std::collections::BTreeMap<String, Vec<String>>,
    tail: VecDeque<String>,
}

impl Follower {
    /// Creates `log_path` with `command` as its first line.
    pub fn new(task: String, label: String, log_path: &Path, command: &str, echo: bool) -> Result<Follower, BuildError> {
        let mut log = std::fs::File::create(log_path).map_err(io("create", log_path))?;
        let _ = writeln!(log, "# {command}");
        Ok(Follower { task, label, log: Some(log), echo, total: None, current: None, started: Vec::new(), completed: BTreeSet::new(), from_source: BTreeSet::new(), planned_use: Default::default(), tail: VecDeque::new() })
    }

    /// A line for emerge.log only (e.g. which revision each repository is at).
    pub fn log_only(&mut self, line: &str) {
        if let Some(log) = &mut self.log {
            let _ = writeln!(log, "{line}");
        }
    }

    pub fn line(&mut self, line: &str, reporter: &dyn Reporter) {
        if let Some(log) = &mut self.log {
            let _ = writeln!(log, "{line}");
        }
        if self.echo {
            reporter.event(Event::Note { message: line.to_owned() });
        }
        if self.tail.len() == 30 {
            self.tail.pop_front();
        }
        self.tail.push_back(line.to_owned());
        match parse_line(line) {
            Some(EmergeLine::Emerging { n, m, cpv, binary }) => {
                if self.total != Some(m) {
                    reporter.event(Event::Start { task: self.task.clone(), label: self.label.clone(), total: Some(m), unit: Unit::Items });
                    self.total = Some(m);
                }
                let what = if binary { "installing binary" } else { "building" };
                if !binary {
                    self.from_source.insert(cpv.clone());
                }
                reporter.event(Event::Progress { task: self.task.clone(), position: n - 1, message: Some(format!("{what} {cpv}")) });
                self.current = Some((n, cpv.clone()));
                self.started.push(cpv);
            }
            Some(EmergeLine::Completed { n, cpv, .. }) => {
                reporter.event(Event::Progress { task: self.task.clone(), position: n, message: Some(format!("completed {cpv}")) });
                self.current = None;
                self.completed.insert(cpv);
            }
            Some(EmergeLine::Phase(phase)) => {
                if let Some((n, cpv)) = &self.current {
                    reporter.event(Event::Progress { task: self.task.clone(), position: n - 1, message: Some(format!("{cpv}: {phase}")) });
                }
            }
            None => {
                if let Some(p) = parse_merge_list_line(line) {
                    self.planned_use.insert(p.cpv, p.use_enabled);
                }
            }
        }
    }

    /// The packages built from source that completed, each with its enabled USE flags when the
    /// merge list showed them.
    pub fn built(&self) -> Vec<(String, Option<Vec<String>>)> {
        self.from_source
            .iter()
            .filter(|c| self.completed.contains(*c))
            .map(|c| (c.clone(), self.planned_use.get(c).cloned()))
            .collect()
    }

    /// Closes the log and ends the progress task; returns the packages that started but did not
    /// complete, and the last lines of output.
    pub fn finish(mut self, status: i64, reporter: &dyn Reporter) -> (Vec<String>, String) {
        self.log = None;
        if self.total.is_some() {
            reporter.event(Event::Finish { task: self.task.clone(), message: format!("emerge exited with status {status}") });
        }
        let unfinished = self.started.iter().filter(|c| !self.completed.contains(*c)).cloned().collect();
        (unfinished, Vec::from(self.tail).join("\n"))
    }
}

/// Whether a builder's binpkg at `path` (relative to its PKGDIR) matches its entry in that
/// PKGDIR's `Packages`; the reason when not.
pub fn check_indexed(index: &Index, path: &str, size: u64, md5: &str) -> Result<(), String> {
    let entry = index.packages.iter().find(|e| e.effective_path() == path).ok_or_else(|| "it has no entry".to_string())?;
    if entry.size() != Some(size) {
        return Err(format!("SIZE {:?} in the index, {size} on disk", entry.get("SIZE")));
    }
    if let Some(m) = entry.get("MD5")
        && !m.eq_ignore_ascii_case(md5)
    {
        return Err(format!("MD5 {m} in the index, {md5} on disk"));
    }
    Ok(())
}

/// Every binpkg a host-side builder wrote into its (fresh) staging PKGDIR, each checked against
/// that PKGDIR's `Packages` like the VM backend checks the guest's.
pub fn staged_binpkgs(pkgdir: &Path) -> Result<Vec<PathBuf>, BuildError> {
    use md5::Digest as _;
    let mut files = Vec::new();
    let mut stack = vec![pkgdir.to_owned()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).map_err(io("read", &dir))?.flatten() {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(path);
            } else if !name.starts_with('.') && (name.ends_with(".gpkg.tar") || name.ends_with(".tbz2") || name.ends_with(".xpak")) {
                files.push(path);
            }
        }
    }
    files.sort();
    if files.is_empty() {
        return Ok(files);
    }
    let index_path = pkgdir.join("Packages");
    let text = std::fs::read(&index_path).map_err(io("read", &index_path))?;
    let index = Index::parse(&text).map_err(|e| BuildError::StagedIndex { path: pkgdir.to_owned(), reason: e.to_string() })?;
    for f in &files {
        let bytes = std::fs::read(f).map_err(io("read", f))?;
        let rel = f.strip_prefix(pkgdir).unwrap_or(f).to_string_lossy().into_owned();
        let md5 = hex::encode(md5::Md5::digest(&bytes));
        check_indexed(&index, &rel, bytes.len() as u64, &md5)
            .map_err(|reason| BuildError::StagedMismatch { path: pkgdir.to_owned(), file: rel.clone(), reason })?;
    }
    Ok(files)
}

/// What every backend checks and loads on the host before it starts building.
pub struct Prepared {
    pub signer: Signer,
    pub profile_repo: String,
    pub profile_path: String,
    /// `(name, path)` of every `--repo`.
    pub repos: Vec<(String, PathBuf)>,
    pub config: PortageConfig,
    pub binhost_dir: PathBuf,
    /// `$DBH_HOME/logs/<target>/<timestamp>`, created.
    pub log_dir: PathBuf,
}

pub fn prepare(home: &Home, target: &Target, req: &Request) -> Result<Prepared, Error> {
    let keys = KeyStore::new(home.keys());
    if !keys.exists() {
        return Err(BuildError::NoKey { dir: home.keys() }.into());
    }
    let signer = keys.signer()?;
    let profile = req.profile.clone().unwrap_or_else(|| target.profile.clone());
    let (profile_repo, profile_path) = split_profile(&profile)?;
    let mut repos = Vec::new();
    for path in &req.repos {
        let abs = std::path::absolute(path).map_err(io("resolve", path))?;
        repos.push((repo_name(&abs)?, abs));
    }
    let config = PortageConfig::load_or_create(home, &target.name)?;
    if req.atoms.is_empty() && config.world_atoms().is_empty() {
        let world = PortageConfig::dir(home, &target.name).join("world");
        return Err(BuildError::NothingToBuild { target: target.name.clone(), world }.into());
    }
    let log_dir = home.logs(&target.name).join(timestamp());
    std::fs::create_dir_all(&log_dir).map_err(io("create", &log_dir))?;
    Ok(Prepared { signer, profile_repo, profile_path, repos, config, binhost_dir: home.binhost(&target.name), log_dir })
}

impl Prepared {
    /// What emerge is asked for: the request's atoms, else the atoms of the target's world file.
    pub fn atoms(&self, req: &Request) -> Vec<String> {
        if req.atoms.is_empty() { self.config.world_atoms() } else { req.atoms.clone() }
    }

    /// Signs and publishes `files` into the target's binhost (atomic, re-indexed) and counts them.
    pub fn publish(&self, target: &Target, files: &[PathBuf], reporter: &dyn Reporter) -> Result<Vec<crate::binhost::add::Added>, Error> {
        let published = if files.is_empty() {
            Vec::new()
        } else {
            crate::binhost::add::add(&self.binhost_dir, target, files, Some(&self.signer), reporter)?
        };
        reporter.event(Event::Count { name: "binpkg.transferred".into(), value: files.len() as u64 });
        Ok(published)
    }

    /// repos.conf (for `PORTAGE_REPOSITORIES`, which replaces every repos.conf) naming the profile's
    /// repository as main-repo: the target's own repos.conf sections, then every `--repo` at
    /// `location(name, path)` (a `--repo` wins over a section of the same name), then `fallback`
    /// for the profile's repository when neither names it.
    pub fn repos_conf(&self, location: impl Fn(&str, &Path) -> String, fallback: Option<String>) -> String {
        let mut conf = format!("# written by dbh before each build\n[DEFAULT]\nmain-repo = {}\n", self.profile_repo);
        let own = repos_conf_sections(&self.config.repos_conf);
        for (name, text) in &own {
            if name != "DEFAULT" && !self.repos.iter().any(|(n, _)| n == name) {
                conf.push('\n');
                conf.push_str(text);
            }
        }
        for (name, path) in &self.repos {
            conf.push_str(&format!("\n[{name}]\nlocation = {}\nauto-sync = no\n", location(name, path)));
        }
        let named = |n: &str| self.repos.iter().any(|(r, _)| r == n) || own.iter().any(|(o, _)| o == n);
        if let Some(loc) = fallback.filter(|_| !named(&self.profile_repo)) {
            conf.push_str(&format!("\n[{}]\nlocation = {loc}\nauto-sync = no\n", self.profile_repo));
        }
        conf
    }
}

/// The `[name]` sections of a repos.conf text with their lines (comments and blank lines dropped).
pub fn repos_conf_sections(text: &str) -> Vec<(String, String)> {
    let mut sections: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') || t.starts_with(';') {
            continue;
        }
        if let Some(name) = t.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            sections.push((name.trim().to_owned(), format!("{t}\n")));
        } else if let Some((_, body)) = sections.last_mut() {
            body.push_str(t);
            body.push('\n');
        }
    }
    sections
}

/// Copies a failed package's build log into the log directory and reports it.
pub fn failed_package(cpv: &str, build_log: Option<&Path>, log_dir: &Path, reporter: &dyn Reporter) -> FailedPackage {
    let local = cpv.split_once('/').map(|(cat, pf)| log_dir.join(format!("{cat}:{pf}.log")));
    let log = match (build_log, local) {
        (Some(src), Some(dst)) if std::fs::copy(src, &dst).is_ok() => Some(dst),
        _ => None,
    };
    let tail = log.as_deref().map(|p| crate::vm::tail_lines(p, 20)).unwrap_or_default();
    reporter.event(Event::Note {
        message: format!(
            "{cpv} failed to build; log: {}\n{tail}",
            log.as_deref().map_or_else(|| "(not found)".into(), |p| p.display().to_string())
        ),
    });
    FailedPackage { cpv: cpv.to_owned(), log, tail }
}

/// emerge's options for the host-side backends. Their root (sysroot, unpacked stage) keeps what
/// was built before, so `--update --changed-use` builds a requested package again only when a newer
/// version or other USE flags call for it — the VM backend gets the same from `--usepkg` and its
/// served binhost; building the same thing twice publishes nothing the second time.
pub const HOST_EMERGE_ARGS: &[&str] = &["--buildpkg", "--update", "--changed-use", "--jobs=1", "--keep-going", "--color=n", "--quiet-build=n"];

/// An exclusive flock on `<dir>/.lock` for the duration of a host-side build (one sysroot or
/// chroot cannot take two emerges at once); released when the file is dropped.
pub(crate) fn lock_dir(dir: &Path, target: &str) -> Result<std::fs::File, BuildError> {
    std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    let path = dir.join(".lock");
    let file = std::fs::File::create(&path).map_err(io("create", &path))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(BuildError::Busy { target: target.to_owned(), dir: dir.to_owned() }),
        Err(std::fs::TryLockError::Error(e)) => Err(BuildError::Io { doing: "lock", path, source: e }),
    }
}

/// A fresh staging PKGDIR `<base>/pkgdir-*` for one host-side build. Call it holding
/// [`lock_dir`]: staging directories of builds that were killed (no destructor ran) are removed.
pub(crate) fn fresh_staging(base: &Path) -> Result<tempfile::TempDir, BuildError> {
    for e in std::fs::read_dir(base).map_err(io("read", base))?.flatten() {
        if e.file_name().to_string_lossy().starts_with("pkgdir-") {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    tempfile::Builder::new().prefix("pkgdir-").tempdir_in(base).map_err(io("create a staging PKGDIR in", base))
}

pub(crate) fn write(path: &Path, text: &str) -> Result<(), BuildError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    }
    std::fs::write(path, text).map_err(io("write", path))
}

pub(crate) fn symlink(to: &Path, link: &Path) -> Result<(), BuildError> {
    if let Some(dir) = link.parent() {
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    }
    if std::fs::symlink_metadata(link).is_ok() {
        std::fs::remove_file(link).map_err(io("replace", link))?;
    }
    std::os::unix::fs::symlink(to, link).map_err(io("create the symlink", link))
}

/// The end of every host-side build: runs `cmd` (an emerge writing binpkgs into `staging`, its
/// PORTAGE_TMPDIR/portage seen from the host at `build_dirs`), keeps failed packages' logs, then
/// checks and publishes what landed in `staging`.
#[allow(clippy::too_many_arguments)]
pub fn emerge_and_publish(
    backend: &'static str,
    cmd: &Cmd,
    target: &Target,
    prep: Prepared,
    staging: &Path,
    build_dirs: &Path,
    echo: bool,
    reporter: &dyn Reporter,
) -> Result<Outcome, Error> {
    let (failed, status, tail) = run_emerge(cmd, &target.name, &prep.log_dir, echo, reporter, |cpv| {
        let (cat, pf) = cpv.split_once('/')?;
        Some(build_dirs.join(cat).join(pf).join("temp/build.log"))
    })?;
    if status != 0 && failed.is_empty() {
        return Err(BuildError::HostEmergeFailed { backend, target: target.name.clone(), status, tail }.into());
    }
    let files = staged_binpkgs(staging)?;
    let published = prep.publish(target, &files, reporter)?;
    Ok(Outcome { published, failed, log_dir: prep.log_dir, transferred: files.len() as u64, rebuilt: Vec::new() })
}

/// Runs an emerge command on the host, following it; returns the failed packages (with their
/// logs copied into `log_dir`), the exit status and the output's tail.
pub fn run_emerge(
    cmd: &Cmd,
    target: &str,
    log_dir: &Path,
    echo: bool,
    reporter: &dyn Reporter,
    build_log: impl Fn(&str) -> Option<PathBuf>,
) -> Result<(Vec<FailedPackage>, i32, String), Error> {
    let command = cmd.display();
    let mut follower = Follower::new(format!("build:{target}"), format!("emerge for {target}"), &log_dir.join("emerge.log"), &command, echo)?;
    reporter.event(Event::Note { message: format!("{target}: {command}") });
    let status = match cmd.run_lines(|_: crate::process::Stream, line| follower.line(line, reporter)) {
        Ok(()) => 0,
        Err(crate::process::ProcessError::Failed { termination: crate::process::Termination::Code(code), .. }) => code,
        Err(e) => return Err(e.into()),
    };
    let (unfinished, tail) = follower.finish(i64::from(status), reporter);
    let failed = unfinished
        .iter()
        .map(|cpv| {
            let src = build_log(cpv).filter(|p| p.is_file());
            failed_package(cpv, src.as_deref(), log_dir, reporter)
        })
        .collect();
    Ok((failed, status, tail))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_list_lines_name_the_package_and_its_use() {
        let p = parse_merge_list_line("[ebuild  N     ] dbh-test/hello-1.1::dbh-test  USE=\"-debug* nls% (static)\" 0 KiB").unwrap();
        assert_eq!(p, Planned { binary: false, cpv: "dbh-test/hello-1.1".into(), use_enabled: vec!["nls".into(), "static".into()] });
        let p = parse_merge_list_line("[binary   R    ] dbh-test/greeter-1.0-1::dbh-test  0 KiB").unwrap();
        assert!(p.binary && p.use_enabled.is_empty());
        assert_eq!(parse_merge_list_line(">>> Emerging (1 of 2) a/b-1"), None);
        assert_eq!(parse_merge_list_line("[blocks B      ] a/b"), None);
    }


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
    fn emerge_progress_lines_are_parsed() {
        assert_eq!(
            parse_line(">>> Emerging (1 of 2) dbh-test/hello-1.0::dbh-test"),
            Some(EmergeLine::Emerging { n: 1, m: 2, cpv: "dbh-test/hello-1.0".into(), binary: false })
        );
        assert_eq!(
            parse_line(">>> Emerging binary (2 of 3) dbh-test/greeter-1.0-r1::dbh-test"),
            Some(EmergeLine::Emerging { n: 2, m: 3, cpv: "dbh-test/greeter-1.0-r1".into(), binary: true })
        );
        assert_eq!(
            parse_line(">>> Completed (2 of 2) dbh-test/greeter-1.0::dbh-test"),
            Some(EmergeLine::Completed { n: 2, m: 2, cpv: "dbh-test/greeter-1.0".into() })
        );
        assert_eq!(parse_line(">>> Emerging (1 of 2) to /"), None);
        assert_eq!(parse_line(" * Emerging (1 of 2) x/y"), None);
        assert_eq!(parse_line(">>> Jobs: 1 of 2 complete"), None);
    }

    /// emerge's output as captured from the arm64 test guest building greeter and hello.
    #[test]
    fn a_real_emerge_run_gives_packages_and_phases_in_order() {
        let log = include_str!("../../tests/fixtures/emerge/build-hello-greeter.log");
        let mut seen = Vec::new();
        let mut current = String::new();
        for line in log.lines() {
            match parse_line(line) {
                Some(EmergeLine::Emerging { n, m, cpv, binary }) => {
                    assert!(!binary);
                    seen.push(format!("{n}/{m} {cpv}"));
                    current = cpv;
                }
                Some(EmergeLine::Phase(p)) => seen.push(format!("{current}: {p}")),
                Some(EmergeLine::Completed { n, cpv, .. }) => seen.push(format!("done {n} {cpv}")),
                None => {}
            }
        }
        let h = "dbh-test/hello-1.0";
        let g = "dbh-test/greeter-1.0";
        let expected = [
            format!("1/2 {h}"),
            format!("{h}: unpacking"),
            format!("{h}: preparing"),
            format!("{h}: configuring"),
            format!("{h}: compiling"),
            format!("{h}: testing"),
            format!("{h}: installing into the image"),
            format!("{h}: checking the image"),
            format!("{h}: creating the binpkg"),
            format!("{h}: merging"),
            format!("done 1 {h}"),
            format!("2/2 {g}"),
            format!("{g}: installing into the image"),
            format!("{g}: checking the image"),
            format!("{g}: creating the binpkg"),
            format!("{g}: merging"),
            format!("done 2 {g}"),
        ];
        assert_eq!(seen, expected);
    }

    /// The same packages installed from the seeded binhost (`@dbh-world`, nothing to build).
    #[test]
    fn a_real_binary_emerge_run_is_followed_too() {
        let log = include_str!("../../tests/fixtures/emerge/binary-hello-greeter.log");
        let seen: Vec<EmergeLine> = log.lines().filter_map(parse_line).collect();
        let cpv = |s: &str| s.to_owned();
        assert_eq!(
            seen,
            [
                EmergeLine::Emerging { n: 1, m: 2, cpv: cpv("dbh-test/hello-1.0"), binary: true },
                EmergeLine::Phase("extracting the binpkg"),
                EmergeLine::Phase("extracting the binpkg"),
                EmergeLine::Phase("merging"),
                EmergeLine::Completed { n: 1, m: 2, cpv: cpv("dbh-test/hello-1.0") },
                EmergeLine::Emerging { n: 2, m: 2, cpv: cpv("dbh-test/greeter-1.0"), binary: true },
                EmergeLine::Phase("extracting the binpkg"),
                EmergeLine::Phase("extracting the binpkg"),
                EmergeLine::Phase("merging"),
                EmergeLine::Completed { n: 2, m: 2, cpv: cpv("dbh-test/greeter-1.0") },
            ]
        );
    }

    #[test]
    fn follower_knows_what_did_not_complete() {
        let dir = tempfile::tempdir().unwrap();
        let events = crate::events::Collector::default();
        let mut f = Follower::new("t".into(), "emerge".into(), &dir.path().join("emerge.log"), "emerge x", false).unwrap();
        for l in [">>> Emerging (1 of 2) a/b-1::r", ">>> Completed (1 of 2) a/b-1::r", ">>> Emerging (2 of 2) a/c-1::r", "boom"] {
            f.line(l, &events);
        }
        let (failed, tail) = f.finish(1, &events);
        assert_eq!(failed, ["a/c-1"]);
        assert!(tail.ends_with("boom"));
        let log = std::fs::read_to_string(dir.path().join("emerge.log")).unwrap();
        assert!(log.starts_with("# emerge x\n>>> Emerging"), "{log}");
    }

    #[test]
    fn host_backends_get_the_targets_repos_conf_and_the_repos() {
        let home = tempfile::tempdir().unwrap();
        let home = Home::new(home.path());
        let mut config = PortageConfig::load_or_create(&home, "arm64").unwrap();
        config.repos_conf = "# mine\n[DEFAULT]\nmain-repo = x\n[guru]\nlocation = /var/db/repos/guru\n\n[r]\nlocation = /old\n[gentoo]\nlocation = /g\n".into();
        let mut prep = Prepared {
            signer: crate::sign::Signer::generate_ephemeral("t <t@t>").unwrap(),
            profile_repo: "gentoo".into(),
            profile_path: "default/linux/arm64/23.0".into(),
            repos: vec![("r".into(), PathBuf::from("/src/r"))],
            config,
            binhost_dir: home.binhost("arm64"),
            log_dir: home.logs("arm64"),
        };
        let conf = prep.repos_conf(|n, _| format!("/var/db/repos/{n}"), Some("/fallback".into()));
        assert_eq!(
            conf,
            "# written by dbh before each build\n[DEFAULT]\nmain-repo = gentoo\n\n[guru]\nlocation = /var/db/repos/guru\n\n\
             [gentoo]\nlocation = /g\n\n[r]\nlocation = /var/db/repos/r\nauto-sync = no\n"
        );
        prep.config.repos_conf.clear();
        assert!(prep.repos_conf(|_, p| p.display().to_string(), Some("/fallback".into())).ends_with("[gentoo]\nlocation = /fallback\nauto-sync = no\n"));
    }

    #[test]
    fn one_host_build_per_directory() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock_dir(dir.path(), "arm64").unwrap();
        let e = lock_dir(dir.path(), "arm64").unwrap_err();
        assert!(e.to_string().starts_with("another dbh build for arm64 is using"), "{e}");
        drop(held);
        lock_dir(dir.path(), "arm64").unwrap();
    }

    #[test]
    fn timestamps_are_utc_civil_dates() {
        let t = timestamp();
        assert_eq!(t.len(), 15, "{t}");
        assert!(t.starts_with("20"), "{t}");
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
