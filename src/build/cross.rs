//! The cross backend: real Portage on the host builds for the target with CBUILD = the host,
//! CHOST = the target's, and the host's cross compiler ([`super::toolchain`]), the way crossdev's
//! `cross-emerge` does.
//!
//! Layout under `$DBH_HOME/cross/<target>/`:
//! - `sysroot/`: ROOT = SYSROOT = PORTAGE_CONFIGROOT. Packages are installed here so that later
//!   builds find their headers and libraries (DEPEND goes to SYSROOT); its `etc/portage/` is
//!   rewritten before every build from the target's host configuration
//!   (`$DBH_HOME/targets/<target>/portage/`) plus dbh's cross settings.
//! - `build-root/`: only for Portage installed as a Python module (a venv from PyPI): such an
//!   install takes the venv as its own EPREFIX and would read the "running root" config there, so
//!   dbh points `PORTAGE_OVERRIDE_EPREFIX` at this directory (global config linked to the venv's,
//!   the same profile) and sets `EPREFIX=""` for the target, whose packages must not carry a prefix.
//!   A system Portage (Gentoo) runs with the host's real `/` as the running root, as crossdev does.
//! - `bin/`: shims (`gtar` → tar) for hosts that are not Gentoo.
//! - a fresh staging PKGDIR per build (FEATURES=buildpkg), checked against its `Packages`, then
//!   signed and published through [`crate::binhost::add`] like the VM backend's packages.
//!
//! CC/CXX carry `--sysroot=<sysroot>` (cross-boss's way), so headers and libraries of packages
//! cross-built before are found; a distribution cross gcc (Debian's `aarch64-linux-gnu-gcc`) still
//! finds its own libc under its tool directory. The binpkgs' CHOST/ARCH come from make.conf and the
//! profile, i.e. the target's, whatever triplet the compiler is named by.

use std::path::{Path, PathBuf};

use super::toolchain::{self, Toolchain};
use super::{BuildError, Outcome, Prepared, Request, io, symlink, write};
use crate::events::{Event, Reporter};
use crate::process::Cmd;
use crate::settings::Home;
use crate::target::Target;

/// Backend options besides the request.
#[derive(Debug, Clone, Default)]
pub struct CrossOptions {
    /// The host's `emerge` (setting `portage.emerge`): a path, or a name looked up in PATH.
    pub emerge: PathBuf,
    /// Pass every line of emerge's output on as a note (`-v`).
    pub echo_output: bool,
}

/// `$DBH_HOME/cross/<target>`.
pub fn dir(home: &Home, target: &str) -> PathBuf {
    home.root().join("cross").join(target)
}

/// The host's Portage: where `emerge` is and whether it is a module (venv) install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPortage {
    pub emerge: PathBuf,
    /// `<venv>` for a module install (its `pyvenv.cfg` is next to `bin/`).
    pub venv: Option<PathBuf>,
}

impl HostPortage {
    /// `emerge` is a path, or a name looked up in PATH (setting `portage.emerge`, default `emerge`).
    pub fn find(emerge: &Path) -> Result<HostPortage, BuildError> {
        let is_path = emerge.as_os_str().as_encoded_bytes().contains(&b'/');
        // A path given in the settings is taken as it is (a venv's emerge is a script Portage's
        // own Python runs); a bare name follows PATH's rules (crate::util::path).
        let found = if is_path { Some(emerge.to_owned()).filter(|p| p.is_file()) } else { crate::util::path::which(emerge) };
        let emerge = found.ok_or_else(|| BuildError::NoEmerge { looked: is_path.then(|| emerge.to_owned()) })?;
        let emerge = std::path::absolute(&emerge).unwrap_or(emerge);
        let venv = emerge.parent().and_then(Path::parent).filter(|v| v.join("pyvenv.cfg").is_file()).map(Path::to_owned);
        Ok(HostPortage { emerge, venv })
    }

    /// `bin/` of this Portage (put on PATH: ebuild helpers call `portageq` etc.).
    pub fn bin(&self) -> &Path {
        self.emerge.parent().unwrap_or(Path::new("/"))
    }
}

/// The host's triplet in Gentoo's spelling (CBUILD).
pub fn host_triplet() -> String {
    match std::env::consts::ARCH {
        "x86_64" => "x86_64-pc-linux-gnu".into(),
        arch => format!("{arch}-unknown-linux-gnu"),
    }
}

/// The cross settings of the sysroot's make.conf (before the user's and the build's).
pub fn cross_make_conf(target: &Target, tc: &Toolchain, sysroot: &Path) -> String {
    let sys = sysroot.display();
    let gcc = tc.gcc.display();
    let gxx = tc.gxx.as_ref().map_or_else(|| tc.gcc.with_file_name(format!("{}-g++", tc.triplet)), Clone::clone);
    let mut s = format!(
        "# dbh: cross-compile for {name} on this host (CBUILD = host, CHOST = target)\n\
         CBUILD=\"{cbuild}\"\nCHOST=\"{chost}\"\n\
         CC=\"{gcc} --sysroot={sys}\"\nCXX=\"{gxx} --sysroot={sys}\"\nCPP=\"{gcc} --sysroot={sys} -E\"\n",
        name = target.name,
        cbuild = host_triplet(),
        chost = target.chost,
        gxx = gxx.display(),
    );
    for (var, tool) in [
        ("AR", "ar"),
        ("AS", "as"),
        ("LD", "ld"),
        ("NM", "nm"),
        ("RANLIB", "ranlib"),
        ("STRIP", "strip"),
        ("OBJCOPY", "objcopy"),
        ("OBJDUMP", "objdump"),
        ("READELF", "readelf"),
    ] {
        if let Some(path) = tc.tool(tool) {
            s.push_str(&format!("{var}=\"{}\"\n", path.display()));
        }
    }
    // A stage3's make.conf sets these; without them every package would build at -O0. The
    // user's make.conf comes after and overrides them.
    s.push_str(
        "COMMON_FLAGS=\"-O2 -pipe\"\nCFLAGS=\"${COMMON_FLAGS}\"\nCXXFLAGS=\"${COMMON_FLAGS}\"\n\
         FCFLAGS=\"${COMMON_FLAGS}\"\nFFLAGS=\"${COMMON_FLAGS}\"\n",
    );
    s.push_str(&format!(
        "PKG_CONFIG_SYSROOT_DIR=\"{sys}\"\n\
         PKG_CONFIG_LIBDIR=\"{sys}/usr/lib64/pkgconfig:{sys}/usr/lib/pkgconfig:{sys}/usr/share/pkgconfig\"\n\
         PKG_CONFIG_PATH=\"\"\n"
    ));
    s
}

/// The user Portage runs as: the invoking one (no `portage` user is needed on the host).
pub(crate) fn user_and_group() -> (String, String) {
    let uid = nix::unistd::getuid();
    let gid = nix::unistd::getgid();
    let user = nix::unistd::User::from_uid(uid).ok().flatten().map_or_else(|| "root".into(), |u| u.name);
    let group = nix::unistd::Group::from_gid(gid).ok().flatten().map_or_else(|| "root".into(), |g| g.name);
    (user, group)
}

/// Where the profile's repository is on the host: a `--repo`, else Gentoo's usual place.
fn profile_repo_location(prep: &Prepared) -> PathBuf {
    prep.repos
        .iter()
        .find(|(n, _)| *n == prep.profile_repo)
        .map_or_else(|| PathBuf::from("/var/db/repos").join(&prep.profile_repo), |(_, p)| p.clone())
}

/// The settings every host-side emerge run gets after the user's make.conf.
fn build_settings(jobs: u32, pkgdir: &Path, distdir: &Path, tmpdir: &Path) -> String {
    let (user, group) = user_and_group();
    format!(
        "# --- dbh: build settings ---\nMAKEOPTS=\"-j{}\"\n\
         FEATURES=\"${{FEATURES}} buildpkg binpkg-multi-instance -pkgdir-index-trusted -sandbox -usersandbox -userpriv -userfetch -usersync -ipc-sandbox -network-sandbox -pid-sandbox -mount-sandbox\"\n\
         BINPKG_FORMAT=\"gpkg\"\nPKGDIR=\"{}\"\nDISTDIR=\"{}\"\nPORTAGE_TMPDIR=\"{}\"\n\
         PORTAGE_USERNAME=\"{user}\"\nPORTAGE_GRPNAME=\"{group}\"\nCLEAN_DELAY=\"0\"\nEMERGE_WARNING_DELAY=\"0\"\n",
        jobs.max(1),
        pkgdir.display(),
        distdir.display(),
        tmpdir.display(),
    )
}

/// Cross-builds `req.atoms` for `target` on the host and publishes what was built. Returns the
/// outcome also when packages failed (the caller turns `failed` into an error with a hint).
pub fn build(home: &Home, target: &Target, req: &Request, opts: &CrossOptions, reporter: &dyn Reporter) -> Result<Outcome, BuildError> {
    let tc = toolchain::find(target).map_err(BuildError::from)?;
    let portage = HostPortage::find(&opts.emerge)?;
    let base = dir(home, &target.name);
    let _lock = super::lock_dir(&base, &target.name)?;
    let prep = super::prepare(home, target, req)?;
    let sysroot = base.join("sysroot");
    let tmpdir = sysroot.join("var/tmp");
    for d in [&sysroot, &tmpdir, &base.join("bin")] {
        std::fs::create_dir_all(d).map_err(io("create", d))?;
    }
    let staging = super::fresh_staging(&base)?;
    let distdir = home.distfiles();
    std::fs::create_dir_all(&distdir).map_err(io("create", &distdir))?;

    // The sysroot's configuration, rewritten every time from the host's per-target one.
    let profile_dir = profile_repo_location(&prep).join("profiles").join(&prep.profile_path);
    let etc = sysroot.join("etc/portage");
    symlink(&profile_dir, &etc.join("make.profile"))?;
    let make_conf = format!(
        "# written by dbh before each cross build; edit {}/make.conf instead\n{}\n# --- dbh: $DBH_HOME/targets/{}/portage/make.conf ---\n{}\n{}",
        super::PortageConfig::dir(home, &target.name).display(),
        cross_make_conf(target, &tc, &sysroot),
        target.name,
        prep.config.make_conf,
        build_settings(req.jobs, staging.path(), &distdir, &tmpdir),
    );
    write(&etc.join("make.conf"), &make_conf)?;
    write(&etc.join("package.use/dbh"), &prep.config.package_use)?;
    write(&etc.join("package.accept_keywords/dbh"), &prep.config.package_accept_keywords)?;
    let repos_conf = prep.repos_conf(|_, path| path.display().to_string(), Some(profile_repo_location(&prep).display().to_string()));

    let mut cmd = Cmd::new(&portage.emerge).env_clear();
    if let Some(venv) = &portage.venv {
        let broot = base.join("build-root");
        symlink(&venv.join("share/portage/config"), &broot.join("share/portage/config"))?;
        symlink(&profile_dir, &broot.join("etc/portage/make.profile"))?;
        let (user, group) = user_and_group();
        write(
            &broot.join("etc/portage/make.conf"),
            &format!(
                "# dbh: the running root of a venv Portage during cross builds (build tools come from the host)\n\
                 PORTAGE_USERNAME=\"{user}\"\nPORTAGE_GRPNAME=\"{group}\"\nFEATURES=\"-sandbox -usersandbox -userpriv\"\n"
            ),
        )?;
        cmd = cmd.env("PORTAGE_OVERRIDE_EPREFIX", &broot);
    }
    let shims = base.join("bin");
    if !on_path("gtar") {
        // Portage's helpers call GNU tar by its Gentoo name.
        let tar = ["/bin/tar", "/usr/bin/tar"].into_iter().map(Path::new).find(|p| p.exists()).unwrap_or(Path::new("/bin/tar"));
        symlink(tar, &shims.join("gtar"))?;
    }
    if !tc.matches_chost(target) {
        chost_shims(&tc, &target.chost, &shims)?;
    }
    let path = crate::util::path::prepend_to_path([
        shims.clone(),
        portage.bin().to_owned(),
        tc.gcc.parent().unwrap_or(Path::new("/usr/bin")).to_owned(),
    ])
    .unwrap_or_default();
    let home_dir = base.join("home");
    std::fs::create_dir_all(&home_dir).map_err(io("create", &home_dir))?;
    let mut args: Vec<String> = super::HOST_EMERGE_ARGS.iter().map(|a| a.to_string()).collect();
    args.extend(prep.atoms(req));
    args.extend(req.emerge_args.iter().cloned());
    let cmd = cmd
        .env("PATH", path)
        .env("HOME", &home_dir)
        .env("TERM", "dumb")
        .env("LC_ALL", "C.UTF-8")
        .env("NOCOLOR", "true")
        .env("EPREFIX", "")
        .env("ROOT", &sysroot)
        .env("SYSROOT", &sysroot)
        .env("PORTAGE_CONFIGROOT", &sysroot)
        .env("PORTAGE_REPOSITORIES", &repos_conf)
        .args(&args);

    reporter.event(Event::Note {
        message: format!("{}: cross-compiling with {} (CHOST {}) into {}", target.name, tc.gcc.display(), target.chost, sysroot.display()),
    });
    super::emerge_and_publish("cross", &cmd, target, prep, staging.path(), &tmpdir.join("portage"), opts.echo_output, reporter)
}

/// `<CHOST>-<tool>` links to a distribution toolchain named by another triplet: Portage's helpers
/// (estrip) and many build systems call `${CHOST}-strip`, `${CHOST}-gcc` etc. by name.
pub fn chost_shims(tc: &Toolchain, chost: &str, dir: &Path) -> Result<(), BuildError> {
    const TOOLS: &[&str] = &[
        "gcc", "g++", "cpp", "c++", "ar", "as", "ld", "nm", "ranlib", "strip", "objcopy", "objdump", "readelf", "gcc-ar", "gcc-nm",
        "gcc-ranlib", "addr2line", "size", "strings",
    ];
    for tool in TOOLS {
        let src = if *tool == "gcc" { Some(tc.gcc.clone()) } else { tc.tool(tool) };
        if let Some(src) = src {
            symlink(&src, &dir.join(format!("{chost}-{tool}")))?;
        }
    }
    Ok(())
}

fn on_path(program: &str) -> bool {
    crate::util::path::which(program).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::Targets;

    #[test]
    fn make_conf_names_the_target_and_the_debian_tools() {
        let targets = Targets::builtin();
        let arm64 = targets.get("arm64").unwrap();
        let bin = tempfile::tempdir().unwrap();
        for tool in ["gcc", "g++", "ar", "strip"] {
            let p = bin.path().join(format!("aarch64-linux-gnu-{tool}"));
            std::fs::write(&p, "").unwrap();
            std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        }
        let tc = toolchain::find_in(arm64, bin.path().as_os_str()).unwrap();
        let text = cross_make_conf(arm64, &tc, Path::new("/h/cross/arm64/sysroot"));
        let b = bin.path().display();
        assert!(text.contains("CHOST=\"aarch64-unknown-linux-gnu\""), "{text}");
        assert!(text.contains(&format!("CC=\"{b}/aarch64-linux-gnu-gcc --sysroot=/h/cross/arm64/sysroot\"")), "{text}");
        assert!(text.contains(&format!("CXX=\"{b}/aarch64-linux-gnu-g++ --sysroot=/h/cross/arm64/sysroot\"")), "{text}");
        assert!(text.contains(&format!("STRIP=\"{b}/aarch64-linux-gnu-strip\"")), "{text}");
        assert!(!text.contains("RANLIB"), "{text}");
        assert!(text.contains("PKG_CONFIG_SYSROOT_DIR=\"/h/cross/arm64/sysroot\""), "{text}");
        assert!(text.contains(&format!("CBUILD=\"{}\"", host_triplet())), "{text}");
        assert!(text.contains("COMMON_FLAGS=\"-O2 -pipe\"\nCFLAGS=\"${COMMON_FLAGS}\""), "{text}");
    }

    #[test]
    fn venv_portage_is_recognised() {
        let v = tempfile::tempdir().unwrap();
        std::fs::create_dir(v.path().join("bin")).unwrap();
        std::fs::write(v.path().join("bin/emerge"), "").unwrap();
        let found = HostPortage::find(&v.path().join("bin/emerge")).unwrap();
        assert_eq!(found.venv, None);
        std::fs::write(v.path().join("pyvenv.cfg"), "").unwrap();
        let found = HostPortage::find(&v.path().join("bin/emerge")).unwrap();
        assert_eq!(found.venv.as_deref(), Some(v.path()));
        assert_eq!(found.bin(), v.path().join("bin"));
        let missing = HostPortage::find(Path::new("/nonexistent/emerge")).unwrap_err();
        assert_eq!(missing.to_string(), "no `emerge` found at /nonexistent/emerge");
        let missing = HostPortage::find(Path::new("no-such-emerge")).unwrap_err();
        assert_eq!(missing.to_string(), "no `emerge` found on PATH");
    }
}
