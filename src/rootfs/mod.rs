//! Release engineering: `dbh rootfs build` — install packages from a target's binhost into an
//! empty root with the host's real Portage, then pack that root reproducibly (tar.zst, tar.xz,
//! squashfs, ext4 `.img`/`.qcow2` optionally bootable through a UKI on an ESP, OCI image layout)
//! with the files Gentoo's own releases put beside a stage: a DIGESTS file (BLAKE2B + SHA512), a
//! package list and detached OpenPGP signatures.
//!
//! - [`portage`]: the throw-away Portage config root and the `emerge --root` runs;
//! - [`pack`]: the reproducible tar writer and the OCI layout;
//! - [`disk`]: squashfs, ext4 and the bootable GPT disk;
//! - [`release`]: DIGESTS, the package list and the signatures.
//!
//! Reproducibility: every timestamp is clamped to `SOURCE_DATE_EPOCH` (default: the newest
//! `BUILD_TIME` among the installed packages), owners are numeric, entries are sorted, Portage's
//! own run-time state (`mtimedb`, `emerge.log`) is dropped, and no host path reaches the output.

pub mod disk;
pub mod pack;
pub mod portage;
pub mod release;

use std::path::{Path, PathBuf};

use crate::hint::Hint;
use crate::events::{Event, Reporter};
use crate::sign::KeyStore;
use crate::target::Target;

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    TarZst,
    TarXz,
    Squashfs,
    Qcow2,
    /// A raw disk image (ext4 filesystem, or a GPT disk when bootable).
    Img,
    /// An OCI image layout directory.
    Oci,
}

impl Format {
    /// The format a file name asks for.
    pub fn from_path(path: &Path) -> Option<Format> {
        let name = path.file_name()?.to_string_lossy().to_ascii_lowercase();
        let name = name.trim_end_matches('/');
        [
            (".tar.zst", Format::TarZst),
            (".tzst", Format::TarZst),
            (".tar.xz", Format::TarXz),
            (".txz", Format::TarXz),
            (".squashfs", Format::Squashfs),
            (".sqfs", Format::Squashfs),
            (".qcow2", Format::Qcow2),
            (".img", Format::Img),
            (".raw", Format::Img),
            (".oci", Format::Oci),
        ]
        .into_iter()
        .find(|(ext, _)| name.ends_with(ext))
        .map(|(_, f)| f)
    }

    pub fn name(self) -> &'static str {
        match self {
            Format::TarZst => "tar.zst",
            Format::TarXz => "tar.xz",
            Format::Squashfs => "squashfs",
            Format::Qcow2 => "qcow2",
            Format::Img => "img",
            Format::Oci => "oci",
        }
    }

    fn is_disk(self) -> bool {
        matches!(self, Format::Qcow2 | Format::Img)
    }
}

/// Where the binary packages come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Binhost {
    /// A local PKGDIR (e.g. `$DBH_HOME/binhost/<target>`).
    Dir(PathBuf),
    /// An HTTP(S) binhost, fetched by Portage itself (`--getbinpkgonly`).
    Url(String),
}

impl Binhost {
    pub fn parse(text: &str) -> Binhost {
        if text.starts_with("http://") || text.starts_with("https://") {
            Binhost::Url(text.trim_end_matches('/').to_owned())
        } else {
            Binhost::Dir(std::path::absolute(text).unwrap_or_else(|_| PathBuf::from(text)))
        }
    }
}

/// Boot files for `--bootable` disks.
#[derive(Debug, Clone, Default)]
pub struct Boot {
    /// The kernel image [default: the newest `/boot/vmlinuz-*`, `/boot/Image*` or
    /// `/usr/src/linux/arch/*/boot/Image` of the root].
    pub kernel: Option<PathBuf>,
    /// A ready initramfs [default: generated from `modules`' root, else from the rootfs itself].
    pub initrd: Option<PathBuf>,
    /// `<root>/lib/modules/<version>` for a generated initramfs [default: the rootfs's own].
    pub modules: Option<PathBuf>,
    /// [default: `root=LABEL=dbh-root rw console=<target console> panic=-1`]
    pub cmdline: Option<String>,
    pub stub: Option<PathBuf>,
}

/// One `dbh rootfs build`.
pub struct Request {
    pub binhost: Binhost,
    pub repos: Vec<PathBuf>,
    /// `REPO:PATH`; `None` = the target's.
    pub profile: Option<String>,
    pub out: PathBuf,
    pub format: Format,
    /// `Some` = make a bootable disk.
    pub boot: Option<Boot>,
    pub atoms: Vec<String>,
    /// The host's `emerge` (setting `portage.emerge`).
    pub emerge: PathBuf,
    /// The binhost's signing key: verifies binpkgs and signs the outputs when it exists.
    pub keys: KeyStore,
    /// Fixed timestamp; `None` = the newest BUILD_TIME of the installed packages.
    pub source_date_epoch: Option<u64>,
    /// Extra `make.conf` lines (the target's `$DBH_HOME/targets/<T>/portage/make.conf`).
    pub make_conf: String,
    /// `package.use` and `package.accept_keywords` lines (the same directory's), so that what
    /// the builds were allowed to use is allowed here too.
    pub package_use: String,
    pub package_accept_keywords: String,
    /// Where Portage's output is kept when the install fails (`$DBH_HOME/logs/<T>/<time>/`).
    pub log_dir: PathBuf,
}

/// One installed package, from the root's vdb.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Installed {
    /// `cat/pf`
    pub cpv: String,
    pub build_id: Option<u64>,
    pub build_time: Option<u64>,
}

/// What a build wrote.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub out: PathBuf,
    pub packages: Vec<Installed>,
    pub source_date_epoch: u64,
    /// Every file written beside the output (DIGESTS, package list, signatures).
    pub beside: Vec<PathBuf>,
    /// Notes worth a line on stdout (e.g. a pkg_postinst that failed).
    pub warnings: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("the binhost {binhost} has no binary package for {atom}")]
    MissingBinpkg { atom: String, binhost: String, target: String },
    #[error("cannot fetch the package index of the binhost {url}: {reason}")]
    BinhostUnreachable { url: String, reason: String },
    #[error("dbh rootfs build must run as root: the root's files keep their owners and modes")]
    NotRoot,
    #[error("cannot tell the output format of {out} from its name")]
    UnknownFormat { out: PathBuf },
    #[error("--bootable needs a disk output (.img or .qcow2), not {format}")]
    BootableNeedsDisk { format: &'static str },
    #[error("the profile's repository `{repo}` was not given with --repo and is not at {tried}")]
    NoProfileRepo { repo: String, tried: PathBuf },
    #[error("the binhost directory {dir} does not exist")]
    NoBinhost { dir: PathBuf },
    #[error("cannot find Portage's global configuration (make.globals) for {emerge}; tried {tried}")]
    NoPortageConfig { emerge: PathBuf, tried: String },
    #[error("emerge failed installing into the root ({what})")]
    Emerge { what: String, log: PathBuf, tail: String },
    #[error("no kernel for the bootable image: the root has none under /boot and --kernel was not given")]
    NoKernel,
    #[error("{0}")]
    Io(#[from] crate::util::fs::PathError),
    #[error("{0}")]
    Process(#[from] crate::process::ProcessError),
    #[error("{0}")]
    Sign(#[from] crate::sign::SignError),
    #[error("{0}")]
    Uki(#[from] crate::uki::UkiError),
    #[error("{0}")]
    Build(#[from] crate::build::BuildError),
}

impl Hint for RootfsError {
    fn hint(&self) -> Option<String> {
        match self {
            RootfsError::MissingBinpkg { atom, target, .. } => {
                Some(format!("build it first: dbh build --target {target} {atom}"))
            }
            RootfsError::BinhostUnreachable { .. } => {
                Some("check the URL (a target's binhost, e.g. http://HOST:8080/arm64) and that `dbh serve` runs there".into())
            }
            RootfsError::NotRoot => Some("run it as root (e.g. with sudo); --dry-run works as any user".into()),
            RootfsError::UnknownFormat { .. } => Some(
                "name it .tar.zst, .tar.xz, .squashfs, .img, .qcow2 or .oci, or pass --format".into(),
            ),
            RootfsError::BootableNeedsDisk { .. } => Some("use --out NAME.qcow2 or NAME.img".into()),
            RootfsError::NoProfileRepo { repo, .. } => {
                Some(format!("pass the `{repo}` repository with --repo PATH, or another profile with --profile REPO:PATH"))
            }
            RootfsError::NoBinhost { .. } => {
                Some("build packages into it first (dbh build), or pass --binhost URL|DIR".into())
            }
            RootfsError::NoPortageConfig { .. } => Some(
                "point the setting portage.emerge (env DBH_PORTAGE_EMERGE) at a complete Portage install".into(),
            ),
            RootfsError::Emerge { log, tail, .. } => Some(format!(
                "the full output is in {}; its end:\n{tail}",
                log.display()
            )),
            RootfsError::NoKernel => Some("pass --kernel PATH (and --modules DIR or --initrd FILE)".into()),
            _ => None,
        }
    }
}

pub(crate) fn io<'a>(doing: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> RootfsError + 'a {
    crate::util::fs::at(doing, path)
}

/// The work directory goes away with a failed build; the log its error points at is kept.
fn keep_log(err: RootfsError, log_dir: &Path) -> RootfsError {
    match err {
        RootfsError::Emerge { what, log, tail } => {
            let kept = log_dir.join("rootfs-emerge.log");
            let log = match fs_err::create_dir_all(log_dir).and_then(|()| fs_err::copy(&log, &kept)) {
                Ok(_) => kept,
                Err(_) => log,
            };
            RootfsError::Emerge { what, log, tail }
        }
        other => other,
    }
}

/// Checks the request before anything is written.
fn check(req: &Request) -> Result<(), RootfsError> {
    if req.boot.is_some() && !req.format.is_disk() {
        return Err(RootfsError::BootableNeedsDisk { format: req.format.name() });
    }
    if let Binhost::Dir(dir) = &req.binhost
        && !dir.is_dir()
    {
        return Err(RootfsError::NoBinhost { dir: dir.clone() });
    }
    Ok(())
}

/// `--dry-run`: the packages `emerge --pretend` would install, in order (`cat/pf-BUILD_ID` as
/// Portage prints them). Writes nothing but a temporary config root.
pub fn dry_run(target: &Target, req: &Request, reporter: &dyn Reporter) -> Result<Vec<String>, RootfsError> {
    check(req)?;
    let work = tempfile::Builder::new().prefix("dbh-rootfs-").tempdir().map_err(io("create", &std::env::temp_dir()))?;
    let client = portage::Client::new(target, req, work.path(), reporter)?;
    client.pretend()
}

/// Installs, packs, writes DIGESTS, package list and signatures. The output (and every file beside
/// it) appears only when all of it succeeded; a failure leaves nothing at `req.out`.
pub fn build(target: &Target, req: &Request, reporter: &dyn Reporter) -> Result<Outcome, RootfsError> {
    check(req)?;
    if !nix::unistd::geteuid().is_root() {
        return Err(RootfsError::NotRoot);
    }
    let out_dir = req.out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs_err::create_dir_all(out_dir).map_err(io("create", out_dir))?;
    // Work beside the output: the final renames stay on one filesystem, and an interrupted run
    // leaves only a dot-directory that the next run does not mistake for output.
    let work = tempfile::Builder::new()
        .prefix(".dbh-rootfs-")
        .tempdir_in(out_dir)
        .map_err(io("create a work directory in", out_dir))?;
    let root = work.path().join("root");
    fs_err::create_dir_all(&root).map_err(io("create", &root))?;

    let client = portage::Client::new(target, req, work.path(), reporter)?;
    let planned = client.pretend()?;
    let warnings = client.install(&root, planned.len() as u64).map_err(|e| keep_log(e, &req.log_dir))?;
    portage::drop_runtime_state(&root)?;

    let packages = portage::installed(&root)?;
    let sde = req
        .source_date_epoch
        .or_else(|| packages.iter().filter_map(|p| p.build_time).max())
        .unwrap_or(0);
    reporter.event(Event::Note {
        message: format!("{} package(s) installed; SOURCE_DATE_EPOCH={sde}", packages.len()),
    });
    portage::pin_vdb_metadata(&root, sde)?;
    pack::clamp_mtimes(&root, sde)?;

    let file_name = req.out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "rootfs".into());
    let staged = work.path().join(&file_name);
    reporter.event(Event::Note { message: format!("packing {} as {}", req.out.display(), req.format.name()) });
    match req.format {
        Format::TarZst | Format::TarXz => pack::write_tarball(&root, &staged, req.format, sde)?,
        Format::Oci => pack::write_oci(&root, &staged, target, sde)?,
        Format::Squashfs => disk::squashfs(&root, &staged, sde)?,
        Format::Img | Format::Qcow2 => {
            disk::disk_image(&root, &staged, work.path(), req.format, req.boot.as_ref(), target, sde, reporter)?
        }
    }

    let extras = release::write_beside(&staged, &file_name, &packages, &req.keys, reporter)?;
    // Publish: the beside-files first, the output last, so a present output always has its
    // DIGESTS; an old output of the same name is replaced.
    let mut beside = Vec::new();
    for extra in &extras {
        let name = extra.file_name().expect("beside-files have names");
        let dest = out_dir.join(name);
        fs_err::rename(extra, &dest).map_err(io("move into place", &dest))?;
        beside.push(dest);
    }
    if req.out.is_dir() {
        fs_err::remove_dir_all(&req.out).map_err(io("replace", &req.out))?;
    }
    fs_err::rename(&staged, &req.out).map_err(io("move into place", &req.out))?;
    Ok(Outcome { out: req.out.clone(), packages, source_date_epoch: sde, beside, warnings })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_follow_the_extension() {
        assert_eq!(Format::from_path(Path::new("a/r.tar.zst")), Some(Format::TarZst));
        assert_eq!(Format::from_path(Path::new("r.TAR.XZ")), Some(Format::TarXz));
        assert_eq!(Format::from_path(Path::new("r.squashfs")), Some(Format::Squashfs));
        assert_eq!(Format::from_path(Path::new("r.qcow2")), Some(Format::Qcow2));
        assert_eq!(Format::from_path(Path::new("r.img")), Some(Format::Img));
        assert_eq!(Format::from_path(Path::new("r.oci")), Some(Format::Oci));
        assert_eq!(Format::from_path(Path::new("r.tar")), None);
    }

    #[test]
    fn binhost_urls_and_dirs() {
        assert_eq!(Binhost::parse("http://h:8080/arm64/"), Binhost::Url("http://h:8080/arm64".into()));
        assert!(matches!(Binhost::parse("some/dir"), Binhost::Dir(p) if p.is_absolute()));
    }

    #[test]
    fn missing_binpkg_names_the_fix() {
        let e = RootfsError::MissingBinpkg { atom: "dbh-test/x".into(), binhost: "B".into(), target: "arm64".into() };
        assert_eq!(e.to_string(), "the binhost B has no binary package for dbh-test/x");
        assert_eq!(e.hint().unwrap(), "build it first: dbh build --target arm64 dbh-test/x");
    }
}
