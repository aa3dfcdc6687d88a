//! The host's real Portage installing a target's binary packages into an empty root.
//!
//! A throw-away config root `<work>/cfg` holds everything Portage reads: `make.conf` (target CHOST
//! and keywords, the binhost as PKGDIR or a binrepos.conf entry, signature verification against
//! the binhost's key in `etc/portage/gnupg`), `make.profile` (a profile of a `--repo`), and a link
//! to Portage's global configuration. Portage then runs with
//! `PORTAGE_OVERRIDE_EPREFIX=<cfg>` (the *running* root's config is the throw-away one, never the
//! host's `/etc/portage`), `EPREFIX=` (the *target* root has no prefix: files land at
//! `DEST/usr/...`), `PORTAGE_CONFIGROOT=<cfg>` and `--root=DEST`. This works for a Portage in a
//! venv (a "module" install) as for a Gentoo host's own.
//!
//! Package scripts (`pkg_preinst`, `pkg_postinst`) run on the host with `ROOT=DEST`, like any
//! Gentoo ROOT install; a script that executes the target's binaries fails there. Portage reports
//! such a failure and goes on; dbh passes each one on as a warning instead of hiding it.

use std::path::{Path, PathBuf};

use super::{Binhost, Installed, Request, RootfsError, io};
use crate::events::{Event, Reporter, Unit};
use crate::process::Cmd;
use crate::target::Target;

/// A Portage client for one build.
pub struct Client<'a> {
    cfg: PathBuf,
    emerge: PathBuf,
    binhost: Binhost,
    target: &'a Target,
    repositories: String,
    atoms: Vec<String>,
    log: PathBuf,
    reporter: &'a dyn Reporter,
}

/// Portage's global configuration directory (the one holding `make.globals`) for an `emerge`:
/// a venv's `<venv>/share/portage/config` or a system install's `/usr/share/portage/config`.
fn global_config(emerge: &Path) -> Result<PathBuf, RootfsError> {
    let real = std::fs::canonicalize(emerge).unwrap_or_else(|_| emerge.to_owned());
    let mut tried = Vec::new();
    for start in [emerge, real.as_path()] {
        let mut dir = start.parent();
        for _ in 0..4 {
            let Some(d) = dir else { break };
            tried.push(d.join("share/portage/config"));
            dir = d.parent();
        }
    }
    tried.push(PathBuf::from("/usr/share/portage/config"));
    tried
        .iter()
        .find(|d| d.join("make.globals").is_file())
        .cloned()
        .ok_or_else(|| RootfsError::NoPortageConfig {
            emerge: emerge.to_owned(),
            tried: tried.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
        })
}

fn write(path: &Path, text: &str) -> Result<(), RootfsError> {
    fs_err::write(path, text).map_err(io("write", path))
}

impl<'a> Client<'a> {
    pub fn new(target: &'a Target, req: &Request, work: &Path, reporter: &'a dyn Reporter) -> Result<Client<'a>, RootfsError> {
        // The same lookup (and error with its install hint) as the cross backend's.
        let emerge = crate::build::cross::HostPortage::find(&req.emerge)?.emerge;
        let cfg = work.join("cfg");
        let portage = cfg.join("etc/portage");
        for d in [portage.join("binrepos.conf"), cfg.join("share/portage"), cfg.join("tmp"), cfg.join("home"), cfg.join("pkgdir")] {
            fs_err::create_dir_all(&d).map_err(io("create", &d))?;
        }
        let global = global_config(&emerge)?;
        let link = cfg.join("share/portage/config");
        std::os::unix::fs::symlink(&global, &link).map_err(io("link", &link))?;

        // Repositories and profile, named the way `dbh vm build` names them.
        let (profile_repo, profile_path) =
            crate::build::split_profile(req.profile.as_deref().unwrap_or(&target.profile))?;
        let mut repos: Vec<(String, PathBuf)> = Vec::new();
        for path in &req.repos {
            let path = std::path::absolute(path).unwrap_or_else(|_| path.clone());
            repos.push((crate::build::repo_name(&path)?, path));
        }
        if !repos.iter().any(|(n, _)| *n == profile_repo) {
            let tried = PathBuf::from("/var/db/repos").join(&profile_repo);
            if !tried.join("profiles").is_dir() {
                return Err(RootfsError::NoProfileRepo { repo: profile_repo, tried });
            }
            repos.push((profile_repo.clone(), tried));
        }
        let mut repositories = format!("[DEFAULT]\nmain-repo = {profile_repo}\n");
        for (name, path) in &repos {
            repositories.push_str(&format!("\n[{name}]\nlocation = {}\nauto-sync = no\n", path.display()));
        }
        let profile_dir = repos.iter().find(|(n, _)| *n == profile_repo).expect("added above").1.join("profiles").join(&profile_path);
        let make_profile = portage.join("make.profile");
        std::os::unix::fs::symlink(&profile_dir, &make_profile).map_err(io("link", &make_profile))?;

        // Verification: against the binhost's own key when there is one.
        let verify = req.keys.exists();
        let gnupg = portage.join("gnupg");
        if verify {
            import_key(&req.keys, &gnupg)?;
        }
        let pkgdir = match &req.binhost {
            Binhost::Dir(dir) => dir.clone(),
            Binhost::Url(url) => {
                write(
                    &portage.join("binrepos.conf/dbh.conf"),
                    &format!("[dbh]\nsync-uri = {url}\npriority = 10\nverify-signature = {verify}\n"),
                )?;
                cfg.join("pkgdir")
            }
        };
        let mut features = vec![
            "-sandbox", "-usersandbox", "-userpriv", "-userfetch", "-usersync", "-ipc-sandbox",
            "-network-sandbox", "-pid-sandbox", "-mount-sandbox", "-news", "-merge-wait",
            // The binhost's Packages is dbh's own: Portage must neither rescan nor rewrite it.
            "pkgdir-index-trusted",
        ];
        if !verify {
            features.push("binpkg-ignore-signature");
            reporter.event(Event::Note {
                message: format!("no signing key in {}: binary package signatures are not verified", req.keys.dir().display()),
            });
        }
        let make_conf = format!(
            r#"# dbh rootfs build: throw-away configuration for installing {target} binary packages into a root
ACCEPT_LICENSE="*"
{user}
CHOST="{chost}"
ACCEPT_KEYWORDS="{keyword}"
PKGDIR="{pkgdir}"
PORTAGE_TMPDIR="{cfg}/tmp"
PORTAGE_LOGDIR=""
PORTAGE_USERNAME="root"
PORTAGE_GRPNAME="root"
PORTAGE_TRUST_HELPER=""
BINPKG_GPG_VERIFY_GPG_HOME="{gnupg}"
GPG_VERIFY_USER_DROP=""
GPG_VERIFY_GROUP_DROP=""
FEATURES="${{FEATURES}} {features}"
CLEAN_DELAY="0"
EMERGE_WARNING_DELAY="0"
"#,
            target = target.name,
            user = req.make_conf,
            chost = target.chost,
            keyword = target.keyword,
            pkgdir = pkgdir.display(),
            cfg = cfg.display(),
            gnupg = gnupg.display(),
            features = features.join(" "),
        );
        write(&portage.join("make.conf"), &make_conf)?;
        write(&portage.join("package.use"), &req.package_use)?;
        write(&portage.join("package.accept_keywords"), &req.package_accept_keywords)?;
        Ok(Client {
            log: work.join("emerge.log"),
            cfg,
            emerge,
            binhost: req.binhost.clone(),
            target,
            repositories,
            atoms: req.atoms.clone(),
            reporter,
        })
    }

    fn binhost_name(&self) -> String {
        match &self.binhost {
            Binhost::Dir(d) => d.display().to_string(),
            Binhost::Url(u) => u.clone(),
        }
    }

    fn command(&self, root: &Path, extra: &[&str]) -> Cmd {
        let fetch = match self.binhost {
            Binhost::Dir(_) => "--usepkgonly",
            Binhost::Url(_) => "--getbinpkgonly",
        };
        self.command_with(root, fetch, extra)
    }

    /// The config root Portage reads (`<work>/cfg`): callers may add e.g. `etc/portage/sets/`.
    pub fn config_root(&self) -> &Path {
        &self.cfg
    }

    /// `emerge --pretend --usepkg EXTRA ATOMS` into an empty root: may build from the repositories,
    /// takes the binhost's binpkgs where they fit. Returns emerge's exit status and its output
    /// (kept in the log too); the caller reads the merge list (`[ebuild …]` / `[binary …]` lines,
    /// printed with `--verbose`).
    pub fn plan(&self, extra: &[&str]) -> Result<(bool, String), RootfsError> {
        let probe = self.cfg.join("plan-root");
        fs_err::create_dir_all(&probe).map_err(io("create", &probe))?;
        let mut lines = Vec::new();
        let cmd = self.command_with(&probe, "--usepkg", &["--pretend", "--verbose"]).args(extra).args(&self.atoms);
        let result = cmd.run_lines(|_, line| lines.push(line.to_owned()));
        let text = lines.join("\n");
        append_log(&self.log, &cmd.display(), &text)?;
        Ok((result.is_ok(), text))
    }

    fn command_with(&self, root: &Path, fetch: &str, extra: &[&str]) -> Cmd {
        let emerge_dir = self.emerge.parent().map(Path::to_owned).unwrap_or_default();
        let path = format!(
            "{}:{}",
            emerge_dir.display(),
            std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin".into())
        );
        Cmd::new(&self.emerge)
            .env_clear()
            .env("PATH", path)
            .env("HOME", self.cfg.join("home"))
            .env("TERM", "dumb")
            .env("LC_ALL", "C.UTF-8")
            .env("NOCOLOR", "true")
            .env("PORTAGE_OVERRIDE_EPREFIX", &self.cfg)
            .env("EPREFIX", "")
            .env("PORTAGE_CONFIGROOT", &self.cfg)
            .env("PORTAGE_REPOSITORIES", &self.repositories)
            .arg(format!("--root={}", root.display()))
            .args([fetch, "--with-bdeps=n", "--color=n", "--nospinner", "--ask=n", "--jobs=1"])
            .args(extra)
    }

    /// `emerge --pretend`: the binary packages that would be installed, as Portage names them
    /// (`cat/pf-BUILD_ID`), in merge order. A request Portage cannot satisfy from the binhost is
    /// [`RootfsError::MissingBinpkg`].
    pub fn pretend(&self) -> Result<Vec<String>, RootfsError> {
        let probe = self.cfg.join("pretend-root");
        fs_err::create_dir_all(&probe).map_err(io("create", &probe))?;
        let mut lines = Vec::new();
        let cmd = self.command(&probe, &["--pretend"]).args(&self.atoms);
        let result = cmd.run_lines(|_, line| lines.push(line.to_owned()));
        let text = lines.join("\n");
        append_log(&self.log, &cmd.display(), &text)?;
        if let Some(reason) = unreachable_binhost(&text) {
            return Err(RootfsError::BinhostUnreachable { url: self.binhost_name(), reason });
        }
        if let Some(atom) = missing_binpkg(&text) {
            return Err(RootfsError::MissingBinpkg { atom, binhost: self.binhost_name(), target: self.target.name.clone() });
        }
        if let Err(e) = result {
            return Err(RootfsError::Emerge { what: e.to_string(), log: self.log.clone(), tail: tail(&text, 15) });
        }
        Ok(planned(&text))
    }

    /// Installs the requested atoms into `root`; `total` packages drive the progress. Returns the
    /// warnings (failed package scripts).
    pub fn install(&self, root: &Path, total: u64) -> Result<Vec<String>, RootfsError> {
        let task = "rootfs.install".to_owned();
        self.reporter.event(Event::Start {
            task: task.clone(),
            label: format!("installing into the {} root", self.target.name),
            total: Some(total),
            unit: Unit::Items,
        });
        self.reporter.event(Event::Note {
            message: "package scripts run on this host with ROOT set; one that needs the target's own binaries fails and is reported".into(),
        });
        let mut lines = Vec::new();
        let mut warnings = Vec::new();
        let cmd = self.command(root, &[]).args(&self.atoms);
        let mut current = String::new();
        let mut completed = 0;
        let result = cmd.run_lines(|_, line| {
            if let Some(cpv) = emerging_line(line) {
                current = cpv;
            }
            if let Some((n, cpv)) = progress_line(line) {
                completed = completed.max(n);
                self.reporter.event(Event::Progress { task: task.clone(), position: n, message: Some(cpv) });
            }
            // Portage keeps going after a failed pkg_postinst (vartree.py: "It's stupid to bail
            // out here"); the package is installed but its script's work is missing.
            if let Some(code) = line.split("FAILED postinst: ").nth(1) {
                // Portage says it twice: when it happens and in the closing summary.
                let w = format!("{current}: pkg_postinst failed (status {}); its work is missing from the root", code.trim());
                if !warnings.contains(&w) {
                    warnings.push(w);
                }
            }
            lines.push(line.to_owned());
        });
        let text = lines.join("\n");
        append_log(&self.log, &cmd.display(), &text)?;
        if let Some(atom) = missing_binpkg(&text) {
            return Err(RootfsError::MissingBinpkg { atom, binhost: self.binhost_name(), target: self.target.name.clone() });
        }
        // emerge exits 1 after a failed pkg_postinst although it installed the package; when
        // every planned package completed and those were the only failures, the root is whole.
        let only_postinst = !warnings.is_empty() && completed == total;
        if let Err(e) = result
            && !only_postinst
        {
            return Err(RootfsError::Emerge { what: e.to_string(), log: self.log.clone(), tail: tail(&text, 20) });
        }
        self.reporter.event(Event::Finish { task, message: format!("{total} package(s) installed") });
        for w in &warnings {
            self.reporter.event(Event::Note { message: format!("warning: {w} (package scripts run on this host)") });
        }
        Ok(warnings)
    }
}

/// Imports the binhost's public key into a Portage verification keyring with full trust.
fn import_key(keys: &crate::sign::KeyStore, gnupg: &Path) -> Result<(), RootfsError> {
    use std::os::unix::fs::PermissionsExt;
    fs_err::create_dir_all(gnupg).map_err(io("create", gnupg))?;
    fs_err::set_permissions(gnupg, std::fs::Permissions::from_mode(0o700)).map_err(io("chmod", gnupg))?;
    let public = keys.public_armored()?;
    let fpr = keys.fingerprint()?;
    let gpg = |args: &[&str], input: Vec<u8>| -> Result<(), RootfsError> {
        Cmd::new("gpg")
            .arg("--homedir")
            .arg(gnupg)
            .args(["--batch", "--no-tty", "--quiet"])
            .args(args)
            .stdin_bytes(input)
            .install_hint("gnupg (Debian) or app-crypt/gnupg (Gentoo): Portage verifies binpkg signatures with it")
            .output()?;
        Ok(())
    };
    gpg(&["--import"], public.into_bytes())?;
    gpg(&["--import-ownertrust"], format!("{fpr}:6:\n").into_bytes())?;
    gpg(&["--check-trustdb"], Vec::new())?;
    Ok(())
}

fn append_log(log: &Path, command: &str, text: &str) -> Result<(), RootfsError> {
    use std::io::Write;
    let mut f = fs_err::OpenOptions::new().create(true).append(true).open(log).map_err(io("write", log))?;
    writeln!(f, "$ {command}\n{text}\n").map_err(io("write", log))
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The reason after `!!! [name] Error fetching binhost package info from 'URL'` (bintree.py).
pub fn unreachable_binhost(text: &str) -> Option<String> {
    let mut lines = text.lines().skip_while(|l| !l.contains("Error fetching binhost package info"));
    lines.next()?;
    let reason = lines.next().unwrap_or_default();
    Some(reason.split_once("] ").map_or(reason, |(_, r)| r).trim().to_owned())
}

/// The atom of `emerge: there are no binary packages to satisfy "ATOM"` (a requested atom or a
/// dependency of one).
pub fn missing_binpkg(text: &str) -> Option<String> {
    let line = text.lines().find(|l| l.contains("there are no binary packages to satisfy"))?;
    let start = line.find('"')? + 1;
    let end = start + line[start..].find('"')?;
    Some(line[start..end].to_owned())
}

/// `[binary  N    ] dbh-test/hello-1.0-1 to /root/ USE=…` → `dbh-test/hello-1.0-1`.
pub fn planned(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| l.starts_with("[binary") || l.starts_with("[ebuild"))
        .filter_map(|l| l.split_once(']').and_then(|(_, rest)| rest.split_whitespace().next()))
        .map(str::to_owned)
        .collect()
}

/// `>>> Emerging binary (1 of 2) dbh-test/hello-1.0::dbh-test for /root/` → `dbh-test/hello-1.0`.
fn emerging_line(line: &str) -> Option<String> {
    let rest = line.strip_prefix(">>> Emerging binary (")?;
    let (_, rest) = rest.split_once(") ")?;
    Some(rest.split_whitespace().next()?.split("::").next()?.to_owned())
}

/// `>>> Completed (1 of 2) dbh-test/hello-1.0::dbh-test to /root/` → (1, `dbh-test/hello-1.0`).
fn progress_line(line: &str) -> Option<(u64, String)> {
    let rest = line.strip_prefix(">>> Completed (")?;
    let (n, rest) = rest.split_once(" of ")?;
    let (_, rest) = rest.split_once(") ")?;
    let cpv = rest.split_whitespace().next()?.split("::").next()?.to_owned();
    Some((n.parse().ok()?, cpv))
}

/// Removes what only describes this run of Portage (timestamps, logs, the binhost cache), so
/// that two builds give the same tree.
pub fn drop_runtime_state(root: &Path) -> Result<(), RootfsError> {
    for rel in ["var/cache/edb/mtimedb", "var/log/emerge.log", "var/log/emerge-fetch.log"] {
        let p = root.join(rel);
        if p.exists() {
            fs_err::remove_file(&p).map_err(io("remove", &p))?;
        }
    }
    for rel in ["var/log/portage", "var/cache/edb/binhost", "var/cache/edb/dep", "var/tmp/portage"] {
        let p = root.join(rel);
        if p.is_dir() {
            fs_err::remove_dir_all(&p).map_err(io("remove", &p))?;
        }
    }
    Ok(())
}

/// Portage ≥ 3.0.83 caches each vdb entry in `<pkg>/metadata`, valid while its `#dir_mtime=`
/// equals the directory's mtime in ns. The directories get the clamped time, so the line is
/// rewritten to it: the cache stays valid and the bytes stop depending on when the build ran.
/// Rewriting a file in place leaves its directory's mtime alone.
pub fn pin_vdb_metadata(root: &Path, sde: u64) -> Result<(), RootfsError> {
    for p in installed(root)? {
        let path = root.join("var/db/pkg").join(&p.cpv).join("metadata");
        let Ok(text) = std::fs::read_to_string(&path) else { continue };
        let fixed: String = text
            .lines()
            .map(|l| if l.starts_with("#dir_mtime=") { format!("#dir_mtime={sde}000000000\n") } else { format!("{l}\n") })
            .collect();
        if fixed != text {
            fs_err::write(&path, fixed).map_err(io("write", &path))?;
        }
    }
    Ok(())
}

/// The packages in the root's vdb (`var/db/pkg/<cat>/<pf>/`), sorted.
pub fn installed(root: &Path) -> Result<Vec<Installed>, RootfsError> {
    let vdb = root.join("var/db/pkg");
    let mut found = Vec::new();
    let read_num = |p: PathBuf| std::fs::read_to_string(p).ok().and_then(|t| t.trim().parse::<u64>().ok());
    let Ok(cats) = std::fs::read_dir(&vdb) else { return Ok(found) };
    for cat in cats.flatten() {
        if !cat.path().is_dir() {
            continue;
        }
        for pkg in std::fs::read_dir(cat.path()).map_err(io("read", &cat.path()))?.flatten() {
            let dir = pkg.path();
            if !dir.is_dir() || pkg.file_name().to_string_lossy().starts_with(['-', '.']) {
                continue;
            }
            found.push(Installed {
                cpv: format!("{}/{}", cat.file_name().to_string_lossy(), pkg.file_name().to_string_lossy()),
                build_id: read_num(dir.join("BUILD_ID")),
                build_time: read_num(dir.join("BUILD_TIME")),
            });
        }
    }
    found.sort();
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rootfs::Binhost;

    #[test]
    fn pretend_output_is_parsed() {
        let text = "Calculating dependencies ... done!\n\n[binary  N     ] dbh-test/hello-1.0-1 to /r/ USE=\"-debug\" \n[binary  N     ] dbh-test/greeter-1.0-1 to /r/\n";
        assert_eq!(planned(text), ["dbh-test/hello-1.0-1", "dbh-test/greeter-1.0-1"]);
        let miss = "\nemerge: there are no binary packages to satisfy \"dbh-test/broken\" for /r/.\n";
        assert_eq!(missing_binpkg(miss).as_deref(), Some("dbh-test/broken"));
        assert_eq!(missing_binpkg(text), None);
        let down = "\n\n!!! [dbh] Error fetching binhost package info from 'http://h/x'\n!!! [dbh] <urlopen error [Errno 111] Connection refused>\n";
        assert_eq!(unreachable_binhost(down).as_deref(), Some("<urlopen error [Errno 111] Connection refused>"));
        assert_eq!(unreachable_binhost(text), None);
    }

    #[test]
    fn completed_lines_drive_progress() {
        assert_eq!(
            progress_line(">>> Completed (2 of 3) dbh-test/greeter-1.0::dbh-test to /r/"),
            Some((2, "dbh-test/greeter-1.0".into()))
        );
        assert_eq!(progress_line(">>> Emerging binary (1 of 2) x/y-1::r for /r/"), None);
        assert_eq!(emerging_line(">>> Emerging binary (1 of 2) x/y-1::r for /r/").as_deref(), Some("x/y-1"));
    }

    /// The emerge command line and the throw-away make.conf, as a reviewer sees them.
    #[test]
    fn emerge_command_and_make_conf_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let venv = dir.path().join("venv");
        std::fs::create_dir_all(venv.join("bin")).unwrap();
        std::fs::create_dir_all(venv.join("share/portage/config")).unwrap();
        std::fs::write(venv.join("share/portage/config/make.globals"), "").unwrap();
        std::fs::write(venv.join("bin/emerge"), "").unwrap();
        let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/repo");
        let target = crate::target::Targets::builtin().get("arm64").unwrap().clone();
        let req = Request {
            binhost: Binhost::Dir(dir.path().join("binhost")),
            repos: vec![repo.clone()],
            profile: Some("dbh-test:dbh/arm64".into()),
            out: dir.path().join("r.tar.zst"),
            format: super::super::Format::TarZst,
            boot: None,
            atoms: vec!["dbh-test/greeter".into()],
            emerge: venv.join("bin/emerge"),
            keys: crate::sign::KeyStore::new(dir.path().join("keys")),
            source_date_epoch: None,
            make_conf: "# the target's make.conf\n".into(),
            package_use: String::new(),
            package_accept_keywords: String::new(),
            log_dir: dir.path().join("logs"),
        };
        let work = dir.path().join("work");
        let client = Client::new(&target, &req, &work, &crate::events::Silent).unwrap();
        let path = std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin".into());
        let clean = |t: String| {
            t.replace(&*dir.path().to_string_lossy(), "$TMP").replace(&*repo.to_string_lossy(), "$REPO").replace(&path, "$PATH")
        };
        let cmd = client.command(&dir.path().join("root"), &[]).args(&client.atoms);
        insta::assert_snapshot!("emerge_install", clean(cmd.display()));
        insta::assert_snapshot!("make_conf", clean(std::fs::read_to_string(work.join("cfg/etc/portage/make.conf")).unwrap()));
    }

    #[test]
    fn global_config_of_a_venv_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let venv = dir.path();
        std::fs::create_dir_all(venv.join("bin")).unwrap();
        std::fs::create_dir_all(venv.join("share/portage/config")).unwrap();
        std::fs::write(venv.join("share/portage/config/make.globals"), "").unwrap();
        std::fs::write(venv.join("bin/emerge"), "").unwrap();
        assert_eq!(global_config(&venv.join("bin/emerge")).unwrap(), venv.join("share/portage/config"));
    }
}
