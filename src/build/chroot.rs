//! The chroot backend: emerge runs inside the target's own stage, its foreign binaries executed by
//! qemu-user through binfmt_misc, in an unprivileged bubblewrap sandbox. No kernel boots, so it
//! starts in seconds, and the target's own compiler and libraries build the packages (no
//! cross-compilation problems); it is slower than the cross backend, as every program is emulated.
//!
//! Layout under `$DBH_HOME/chroot/<target>/`: `root/` is the stage that `dbh vm image create`
//! verified (its location and SHA512 are in `images/<target>/image.toml`; a URL stage is in the
//! download cache), unpacked once and kept between builds (so dependencies built before are
//! installed; `rm -r` it to start clean), `stage.sha512` says which stage it is. Each build binds
//! in a fresh staging PKGDIR at `/var/cache/binpkgs`, the host's `$DBH_HOME/distfiles` (the one
//! download cache of every backend) at `/var/cache/distfiles` and the `--repo`s read-only at
//! `/var/db/repos/<name>`; what lands in the staging PKGDIR is checked and published like every
//! other backend's packages.
//!
//! binfmt_misc needs the F ("fix binary") flag: the kernel then opens the qemu interpreter when it
//! is registered, so it works inside a root that does not contain it. This is checked first and
//! explained when missing.

use std::path::{Path, PathBuf};

use super::{BuildError, Outcome, Request, io, symlink, write};
use crate::hint::Hint;
use crate::events::{Event, Reporter};
use crate::image::{self, ImageInfo};
use crate::process::Cmd;
use crate::settings::Home;
use crate::target::Target;

/// Backend options besides the request.
#[derive(Debug, Clone, Default)]
pub struct ChrootOptions {
    /// Pass every line of emerge's output on as a note (`-v`).
    pub echo_output: bool,
}

pub const BINFMT_DIR: &str = "/proc/sys/fs/binfmt_misc";
const PKGDIR: &str = "/var/cache/binpkgs";
/// The root's DISTDIR: a bind mount of the host's `$DBH_HOME/distfiles`, shared by every backend.
const DISTDIR: &str = "/var/cache/distfiles";

#[derive(Debug, thiserror::Error)]
pub enum ChrootError {
    #[error("binfmt_misc is not mounted at {BINFMT_DIR}: {target} binaries cannot run on this host")]
    BinfmtNotMounted { target: String },
    #[error("no qemu-user handler for {target} binaries is registered with binfmt_misc ({entry} does not exist)")]
    BinfmtMissing { target: String, entry: PathBuf },
    #[error("the qemu-user handler {entry} for {target} binaries is disabled")]
    BinfmtDisabled { target: String, entry: PathBuf },
    #[error("the qemu-user handler {entry} for {target} binaries lacks the F (fix binary) flag (flags: {flags}): it cannot run inside a chroot")]
    BinfmtNoFixBinary { target: String, entry: PathBuf, flags: String },
    #[error("bubblewrap (`bwrap`) is not installed")]
    NoBwrap,
    #[error("bubblewrap cannot make its sandbox here: {reason}")]
    Sandbox { reason: String },
    #[error("no stage for the {target} chroot: {image_dir}/image.toml does not exist")]
    NoStage { target: String, image_dir: PathBuf },
    #[error("the stage {path} does not match the SHA512 recorded in the {target} image ({expected}); it changed since `dbh vm image create`")]
    StageChanged { target: String, path: PathBuf, expected: String },
}

impl Hint for ChrootError {
    fn hint(&self) -> Option<String> {
        let install = "on Debian/Ubuntu `apt-get install qemu-user-static binfmt-support` (then `systemctl restart systemd-binfmt` \
             if the handlers do not appear); on Gentoo emerge `app-emulation/qemu` with USE=static-user and \
             QEMU_USER_TARGETS set, then `rc-service qemu-binfmt start` (OpenRC) or `systemctl restart systemd-binfmt`";
        match self {
            ChrootError::BinfmtNotMounted { .. } => {
                Some(format!("mount it with `mount -t binfmt_misc binfmt_misc {BINFMT_DIR}` (as root), then register qemu-user: {install}"))
            }
            ChrootError::BinfmtMissing { .. } => Some(format!("register qemu-user's handlers: {install}")),
            ChrootError::BinfmtDisabled { entry, .. } => Some(format!("enable it with `echo 1 > {}`", entry.display())),
            ChrootError::BinfmtNoFixBinary { .. } => Some(format!(
                "register the handler with the F flag (Debian's qemu-user-static and Gentoo's qemu-binfmt do): {install}; \
                 or build in a guest with `--backend vm`"
            )),
            ChrootError::NoBwrap => Some("install it: `apt-get install bubblewrap` (Debian/Ubuntu) or `emerge sys-apps/bubblewrap` (Gentoo)".into()),
            ChrootError::Sandbox { .. } => Some(
                "bwrap needs user namespaces: as a normal user enable them (`sysctl kernel.unprivileged_userns_clone=1` on Debian, \
                 `sysctl kernel.apparmor_restrict_unprivileged_userns=0` on Ubuntu) or run dbh as root; in a container, allow \
                 namespaces (e.g. docker's --privileged); or build with `--backend vm`"
                    .into(),
            ),
            ChrootError::NoStage { target, .. } => Some(format!(
                "the chroot is made from the stage of the target's guest image: run `dbh vm image create --target {target} --stage URL` first"
            )),
            ChrootError::StageChanged { target, .. } => {
                Some(format!("re-create the image with `dbh vm image create --target {target} --stage …`"))
            }
        }
    }
}

/// Whether the host runs `target`'s binaries natively (no emulation needed).
pub fn native(target: &Target) -> bool {
    target.uname_machine == std::env::consts::ARCH
}

/// Checks that binfmt_misc under `dir` runs `target`'s binaries through qemu-user with the F flag.
pub fn check_binfmt(target: &Target, dir: &Path) -> Result<(), ChrootError> {
    if native(target) {
        return Ok(());
    }
    let t = target.name.clone();
    if !dir.join("status").exists() {
        return Err(ChrootError::BinfmtNotMounted { target: t });
    }
    let entry = dir.join(format!("qemu-{}", target.uname_machine));
    let Ok(text) = std::fs::read_to_string(&entry) else {
        return Err(ChrootError::BinfmtMissing { target: t, entry });
    };
    if text.lines().next().map(str::trim) != Some("enabled") {
        return Err(ChrootError::BinfmtDisabled { target: t, entry });
    }
    let flags = text.lines().find_map(|l| l.strip_prefix("flags:")).map(str::trim).unwrap_or("").to_owned();
    if !flags.contains('F') {
        return Err(ChrootError::BinfmtNoFixBinary { target: t, entry, flags });
    }
    Ok(())
}

/// Checks that bubblewrap can make the sandbox the build runs in (namespaces allowed here).
pub fn check_bwrap() -> Result<(), ChrootError> {
    let probe = Cmd::new("bwrap").args(["--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev", "--unshare-all", "--die-with-parent"]);
    let probe = if nix::unistd::geteuid().is_root() { probe } else { probe.args(["--unshare-user", "--uid", "0", "--gid", "0"]) };
    match probe.arg("true").output() {
        Ok(_) => Ok(()),
        Err(crate::process::ProcessError::NotFound { .. }) => Err(ChrootError::NoBwrap),
        Err(e) => Err(ChrootError::Sandbox { reason: e.to_string() }),
    }
}

/// Everything the chroot backend needs from the host, checked before anything is written:
/// binfmt_misc for the target, and bubblewrap.
pub fn preflight(target: &Target) -> Result<(), ChrootError> {
    check_binfmt(target, Path::new(BINFMT_DIR))?;
    check_bwrap()
}

/// `$DBH_HOME/chroot/<target>`.
pub fn dir(home: &Home, target: &str) -> PathBuf {
    home.root().join("chroot").join(target)
}

/// The unpacked stage, made from the image's stage when missing or when the image changed.
fn ensure_root(home: &Home, target: &Target, reporter: &dyn Reporter) -> Result<PathBuf, BuildError> {
    let info = ImageInfo::load(&home.images(&target.name))?;
    let base = dir(home, &target.name);
    let root = base.join("root");
    let marker = base.join("stage.sha512");
    if root.is_dir() && std::fs::read_to_string(&marker).is_ok_and(|m| m.trim() == info.stage.sha512) {
        return Ok(root);
    }
    // The download `image create` kept, else fetched again (and checked against the image's SHA512).
    let cached = image::stage::cached_path(&info.stage.location, &home.cache());
    let stage = if cached.is_file() {
        cached
    } else {
        image::stage::fetch(&info.stage.location, &home.cache(), reporter).map_err(image::ImageError::from)?
    };
    let sha512 = {
        use sha2::Digest as _;
        use std::io::Read as _;
        let mut f = std::fs::File::open(&stage).map_err(io("read", &stage))?;
        let mut h = sha2::Sha512::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).map_err(io("read", &stage))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        hex::encode(h.finalize())
    };
    if !sha512.eq_ignore_ascii_case(&info.stage.sha512) {
        return Err(BuildError::from(ChrootError::StageChanged { target: target.name.clone(), path: stage, expected: info.stage.sha512 }));
    }
    std::fs::create_dir_all(&base).map_err(io("create", &base))?;
    let tmp = base.join("root.new");
    for old in [&tmp, &root] {
        if old.exists() {
            std::fs::remove_dir_all(old).map_err(io("remove", old))?;
        }
    }
    let _ = std::fs::remove_file(&marker);
    std::fs::create_dir_all(&tmp).map_err(io("create", &tmp))?;
    reporter.event(Event::Note { message: format!("{}: unpacking the stage into {}", target.name, root.display()) });
    image::unpack(&stage, &tmp, reporter)?;
    std::fs::rename(&tmp, &root).map_err(io("rename into place", &root))?;
    std::fs::write(&marker, format!("{sha512}\n")).map_err(io("write", &marker))?;
    Ok(root)
}

/// Builds `req.atoms` in the target's stage under qemu-user and publishes what was built.
/// Returns the outcome also when packages failed.
pub fn build(home: &Home, target: &Target, req: &Request, opts: &ChrootOptions, reporter: &dyn Reporter) -> Result<Outcome, BuildError> {
    preflight(target).map_err(BuildError::from)?;
    let image_dir = home.images(&target.name);
    if !image_dir.join("image.toml").is_file() {
        return Err(BuildError::from(ChrootError::NoStage { target: target.name.clone(), image_dir }));
    }
    let base = dir(home, &target.name);
    let _lock = super::lock_dir(&base, &target.name)?;
    let prep = super::prepare(home, target, req)?;
    let root = ensure_root(home, target, reporter)?;
    let staging = super::fresh_staging(&base)?;
    // One download cache for every backend: the host's $DBH_HOME/distfiles is the root's DISTDIR.
    let distdir = home.distfiles();
    std::fs::create_dir_all(&distdir).map_err(io("create", &distdir))?;

    // Configuration inside the root: the stage's own make.conf (kept aside once), then the host's
    // per-target one, then the build settings, as the VM backend does in its guest.
    let etc = root.join("etc/portage");
    let base_conf = etc.join("make.conf.dbh-base");
    if !base_conf.exists() {
        let orig = std::fs::read_to_string(etc.join("make.conf")).unwrap_or_default();
        write(&base_conf, &orig)?;
    }
    let stage_conf = std::fs::read_to_string(&base_conf).map_err(io("read", &base_conf))?;
    // PORTAGE_USERNAME/GRPNAME root: inside the sandbox only root is mapped, so Portage must not
    // chown to the portage user; builds are throw-away, so -userpriv costs nothing.
    let make_conf = format!(
        "{stage_conf}\n# --- dbh: $DBH_HOME/targets/{}/portage/make.conf ---\n{}\n# --- dbh: build settings ---\nMAKEOPTS=\"-j{}\"\n\
         FEATURES=\"${{FEATURES}} buildpkg binpkg-multi-instance -pkgdir-index-trusted -sandbox -usersandbox -userpriv -userfetch -ipc-sandbox -network-sandbox -pid-sandbox -mount-sandbox\"\n\
         BINPKG_FORMAT=\"gpkg\"\nPKGDIR=\"{PKGDIR}\"\nDISTDIR=\"{DISTDIR}\"\nPORTAGE_USERNAME=\"root\"\nPORTAGE_GRPNAME=\"root\"\nCLEAN_DELAY=\"0\"\nEMERGE_WARNING_DELAY=\"0\"\n",
        target.name,
        prep.config.make_conf,
        req.jobs.max(1)
    );
    write(&etc.join("make.conf"), &make_conf)?;
    write(&etc.join("package.use/dbh"), &prep.config.package_use)?;
    write(&etc.join("package.accept_keywords/dbh"), &prep.config.package_accept_keywords)?;
    let inside = |name: &str| format!("/var/db/repos/{name}");
    symlink(&PathBuf::from(inside(&prep.profile_repo)).join("profiles").join(&prep.profile_path), &etc.join("make.profile"))?;
    let repos_conf = prep.repos_conf(|name, _| inside(name), Some(inside(&prep.profile_repo)));

    let mut bwrap = Cmd::new("bwrap")
        .install_hint("bubblewrap (Debian: `apt-get install bubblewrap`; Gentoo: sys-apps/bubblewrap)")
        .arg("--bind")
        .arg(&root)
        .arg("/")
        .args(["--proc", "/proc", "--dev", "/dev", "--ro-bind", "/sys", "/sys", "--tmpfs", "/tmp"])
        .arg("--bind")
        .arg(staging.path())
        .arg(PKGDIR)
        .arg("--bind")
        .arg(&distdir)
        .arg(DISTDIR);
    let mut mounts = vec![PKGDIR.to_owned(), DISTDIR.to_owned()];
    for (name, path) in &prep.repos {
        bwrap = bwrap.arg("--ro-bind").arg(path).arg(inside(name));
        mounts.push(inside(name));
    }
    // A profile repository that is no --repo: the host's copy (e.g. ::gentoo), when it has one.
    let host_repo = PathBuf::from(inside(&prep.profile_repo));
    if !prep.repos.iter().any(|(n, _)| *n == prep.profile_repo) && host_repo.is_dir() {
        bwrap = bwrap.arg("--ro-bind").arg(&host_repo).arg(inside(&prep.profile_repo));
        mounts.push(inside(&prep.profile_repo));
    }
    for m in &mounts {
        let d = root.join(m.trim_start_matches('/'));
        std::fs::create_dir_all(&d).map_err(io("create", &d))?;
    }
    bwrap = bwrap.args(["--unshare-all", "--die-with-parent"]);
    if !nix::unistd::geteuid().is_root() {
        bwrap = bwrap.args(["--unshare-user", "--uid", "0", "--gid", "0"]);
    }
    bwrap = bwrap
        .args(["--clearenv", "--setenv", "PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"])
        .args(["--setenv", "HOME", "/root", "--setenv", "TERM", "dumb", "--setenv", "NOCOLOR", "true"])
        .args(["--setenv", "PORTAGE_REPOSITORIES"])
        .arg(&repos_conf)
        .args(["--chdir", "/", "/usr/bin/emerge"])
        .args(super::HOST_EMERGE_ARGS)
        .args(prep.atoms(req))
        .args(&req.emerge_args);

    reporter.event(Event::Note {
        message: format!("{}: building in the stage at {} (qemu-user{})", target.name, root.display(), if native(target) { " not needed" } else { "" }),
    });
    super::emerge_and_publish("chroot", &bwrap, target, prep, staging.path(), &root.join("var/tmp/portage"), opts.echo_output, reporter)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::Targets;

    fn entry(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    #[test]
    fn binfmt_registration_is_checked_and_explained() {
        let targets = Targets::builtin();
        let mut arm64 = targets.get("arm64").unwrap().clone();
        if native(&arm64) {
            arm64.uname_machine = "riscv64".into();
        }
        let m = arm64.uname_machine.clone();
        let dir = tempfile::tempdir().unwrap();
        let err = check_binfmt(&arm64, dir.path()).unwrap_err();
        assert!(matches!(err, ChrootError::BinfmtNotMounted { .. }), "{err}");
        assert!(err.hint().unwrap().contains("mount -t binfmt_misc"));

        entry(dir.path(), "status", "enabled\n");
        let err = check_binfmt(&arm64, dir.path()).unwrap_err();
        assert!(err.to_string().contains(&format!("qemu-{m}")), "{err}");
        let hint = err.hint().unwrap();
        assert!(hint.contains("apt-get install qemu-user-static") && hint.contains("rc-service qemu-binfmt start"), "{hint}");

        entry(dir.path(), &format!("qemu-{m}"), "enabled\ninterpreter /usr/libexec/qemu-binfmt/x\nflags: PO\noffset 0\n");
        let err = check_binfmt(&arm64, dir.path()).unwrap_err();
        assert!(err.to_string().contains("lacks the F (fix binary) flag (flags: PO)"), "{err}");

        entry(dir.path(), &format!("qemu-{m}"), "disabled\ninterpreter /x\nflags: POF\n");
        assert!(matches!(check_binfmt(&arm64, dir.path()).unwrap_err(), ChrootError::BinfmtDisabled { .. }));

        entry(dir.path(), &format!("qemu-{m}"), "enabled\ninterpreter /x\nflags: POF\noffset 0\n");
        check_binfmt(&arm64, dir.path()).unwrap();
    }
}
