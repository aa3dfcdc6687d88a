//! Real Portage (PyPI) as builder and binhost client, each in its own Prefix-style config root.
//!
//! `tests/setup-host.sh` creates the venv (`~/.cache/dbh-tests/venv-portage-<version>`, or
//! `$DBH_TEST_PORTAGE_VENV`). A prefix is EPREFIX = ROOT config root of its own: Portage reads
//! `<prefix>/etc/portage`, keeps its vdb in `<prefix>/var/db/pkg` and installs under `<prefix>`.
//! The recipe follows docs/lab.md ("A self-contained Portage prefix"): `PORTAGE_OVERRIDE_EPREFIX`, a `gtar` shim, no
//! sandbox, root as the portage user.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

pub const PORTAGE_VERSION: &str = "3.0.83";

/// The test ebuild repository.
pub fn fixture_repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/repo")
}

pub fn cache_dir() -> PathBuf {
    std::env::var_os("DBH_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").expect("HOME")).join(".cache/dbh-tests"))
}

/// A directory under `target/test-output/<name>` that survives the test, for logs and screenshots.
pub fn output_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-output").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub struct Portage {
    pub venv: PathBuf,
    /// `<venv>/share/portage/config`: make.globals, binrepos.conf, sets.
    pub global_config: PathBuf,
    /// PATH directory with the `gtar` shim.
    pub shim: PathBuf,
}

/// The Portage venv, checked once per test run.
pub fn portage() -> &'static Portage {
    static P: OnceLock<Portage> = OnceLock::new();
    P.get_or_init(|| {
        let venv = std::env::var_os("DBH_TEST_PORTAGE_VENV")
            .map(PathBuf::from)
            .unwrap_or_else(|| cache_dir().join(format!("venv-portage-{PORTAGE_VERSION}")));
        assert!(
            venv.join("bin/emerge").exists(),
            "real Portage is not installed at {}: run `bash tests/setup-host.sh` first (it creates the venv with `pip install portage=={PORTAGE_VERSION}`)",
            venv.display()
        );
        let venv = venv.canonicalize().unwrap();
        let shim = cache_dir().join("shim");
        std::fs::create_dir_all(&shim).unwrap();
        let gtar = shim.join("gtar");
        if !gtar.exists() {
            // Portage's helpers call GNU tar by its Gentoo name.
            let _ = std::os::unix::fs::symlink("/bin/tar", &gtar);
        }
        Portage { global_config: venv.join("share/portage/config"), venv, shim }
    })
}

/// One Portage config root.
pub struct Prefix {
    pub root: PathBuf,
}

pub struct PrefixOptions<'a> {
    /// Profile directory name under the fixture repo's `profiles/dbh/`.
    pub profile: &'a str,
    /// Extra make.conf lines.
    pub make_conf: &'a str,
    /// Extra ebuild repositories besides the fixture repo.
    pub repos: &'a [PathBuf],
}

impl Default for PrefixOptions<'_> {
    fn default() -> Self {
        PrefixOptions { profile: "amd64", make_conf: "", repos: &[] }
    }
}

impl Prefix {
    pub fn new(root: &Path, opts: PrefixOptions) -> Prefix {
        let p = portage();
        for d in [
            "etc/portage/repos.conf",
            "etc/portage/binrepos.conf",
            "share/portage/config",
            "var/tmp",
            "var/cache/binpkgs",
            "var/cache/distfiles",
            "var/db/pkg",
            "var/lib/portage",
            "var/log/portage",
            "home",
        ] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        for f in ["make.globals", "sets"] {
            let link = root.join("share/portage/config").join(f);
            let _ = std::os::unix::fs::symlink(p.global_config.join(f), link);
        }
        // Portage's own binrepos.conf sets `[DEFAULT] verify-signature = true`; keep it so that
        // clients verify by default, exactly like a real system.
        let _ = std::os::unix::fs::symlink(
            p.global_config.join("binrepos.conf"),
            root.join("share/portage/config/binrepos.conf"),
        );
        let repo = fixture_repo();
        let _ = std::os::unix::fs::symlink(
            repo.join("profiles/dbh").join(opts.profile),
            root.join("etc/portage/make.profile"),
        );
        let mut repos_conf = format!(
            "[DEFAULT]\nmain-repo = dbh-test\n\n[dbh-test]\nlocation = {}\nauto-sync = no\n",
            repo.display()
        );
        for extra in opts.repos {
            let name = std::fs::read_to_string(extra.join("profiles/repo_name")).unwrap();
            repos_conf.push_str(&format!(
                "\n[{}]\nlocation = {}\nauto-sync = no\n",
                name.trim(),
                extra.display()
            ));
        }
        std::fs::write(root.join("etc/portage/repos.conf/dbh.conf"), repos_conf).unwrap();
        let make_conf = format!(
            r#"# EPREFIX comes from PORTAGE_OVERRIDE_EPREFIX; PORTAGE_CONFIGROOT = EPREFIX, ROOT = /
PKGDIR="${{EPREFIX}}/var/cache/binpkgs"
DISTDIR="${{EPREFIX}}/var/cache/distfiles"
PORTAGE_TMPDIR="${{EPREFIX}}/var/tmp"
PORTAGE_LOGDIR="${{EPREFIX}}/var/log/portage"
BINPKG_GPG_VERIFY_GPG_HOME="${{EPREFIX}}/etc/portage/gnupg"
ACCEPT_LICENSE="*"
CFLAGS="-O2 -pipe"
PORTAGE_USERNAME="root"
PORTAGE_GRPNAME="root"
PORTAGE_INST_UID="0"
PORTAGE_INST_GID="0"
PORTAGE_TRUST_HELPER=""
FEATURES="-sandbox -usersandbox -userpriv -userfetch -usersync -ipc-sandbox -network-sandbox -pid-sandbox -mount-sandbox"
CLEAN_DELAY="0"
EMERGE_WARNING_DELAY="0"
BINPKG_FORMAT="gpkg"
{}
"#,
            opts.make_conf
        );
        std::fs::write(root.join("etc/portage/make.conf"), make_conf).unwrap();
        Prefix { root: root.to_owned() }
    }

    pub fn pkgdir(&self) -> PathBuf {
        self.root.join("var/cache/binpkgs")
    }

    pub fn gnupg(&self) -> PathBuf {
        self.root.join("etc/portage/gnupg")
    }

    /// A command from the venv (`emerge`, `emaint`, …) run against this prefix with a scrubbed
    /// environment, so the host's settings never leak in.
    pub fn command(&self, program: &str) -> Command {
        let p = portage();
        let mut cmd = Command::new(p.venv.join("bin").join(program));
        cmd.env_clear()
            .env("HOME", self.root.join("home"))
            .env("TERM", "dumb")
            .env("LC_ALL", "C.UTF-8")
            .env(
                "PATH",
                format!(
                    "{}:{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    p.shim.display(),
                    p.venv.join("bin").display()
                ),
            )
            .env("PORTAGE_OVERRIDE_EPREFIX", &self.root)
            .env("PORTAGE_CONFIGROOT", &self.root)
            .env("NOCOLOR", "true");
        cmd
    }

    /// Runs a venv program; returns its output whatever the exit status.
    pub fn run(&self, program: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = self.command(program);
        cmd.args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
    }

    /// Runs a venv program and panics with its output unless it succeeds.
    pub fn ok(&self, program: &str, args: &[&str], env: &[(&str, &str)]) -> String {
        let out = self.run(program, args, env);
        let text = combined(&out);
        assert!(out.status.success(), "`{program} {}` failed ({}):\n{text}", args.join(" "), out.status);
        text
    }

    /// Writes a binrepos.conf entry for a binhost.
    pub fn add_binrepo(&self, name: &str, text: &str) {
        std::fs::write(self.root.join("etc/portage/binrepos.conf").join(format!("{name}.conf")), text).unwrap();
    }

    /// Imports an armored public key into the prefix's verification keyring with full trust, the
    /// way `dbh binhost conf` tells users to, and makes it readable for gpg running as `nobody`.
    pub fn trust_key(&self, armored: &[u8], fingerprint: &str) {
        let home = self.gnupg();
        std::fs::create_dir_all(&home).unwrap();
        let gpg = |args: &[&str], input: &[u8]| {
            use std::io::Write;
            let mut child = Command::new("gpg")
                .arg("--homedir")
                .arg(&home)
                .args(["--batch", "--no-tty"])
                .args(args)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            child.stdin.take().unwrap().write_all(input).unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success(), "gpg {args:?}: {}", combined(&out));
        };
        gpg(&["--import"], armored);
        gpg(&["--import-ownertrust"], format!("{fingerprint}:6:\n").as_bytes());
        gpg(&["--check-trustdb"], b"");
        // Portage runs gpg as `nobody` when root: the keyring must be readable by it.
        Command::new("chmod").arg("-R").arg("go+rX").arg(&home).status().unwrap();
    }
}

pub fn combined(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Copies a directory tree (binpkgs and indexes), keeping mtimes.
pub fn copy_tree(from: &Path, to: &Path) {
    let st = Command::new("cp").arg("-a").arg(from).arg(to).status().unwrap();
    assert!(st.success(), "cp -a {} {}", from.display(), to.display());
}

/// A PKGDIR with dbh-test/hello and dbh-test/greeter built by real Portage (`emerge --buildpkg`),
/// made once per test run; copy it before changing anything.
pub fn built_pkgdir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = tempfile::Builder::new().prefix("dbh-bld-").tempdir().unwrap().keep();
        let bld = Prefix::new(&base.join("bld"), PrefixOptions::default());
        bld.ok("emerge", &["--buildpkg", "--quiet-build=y", "dbh-test/greeter"], &[]);
        bld.pkgdir()
    })
}

/// Same-length check that the harness itself works: Portage builds the fixture packages.
#[test]
fn real_portage_builds_the_fixture_packages() {
    let pkgdir = built_pkgdir();
    assert!(pkgdir.join("dbh-test/hello/hello-1.0-1.gpkg.tar").is_file());
    assert!(pkgdir.join("dbh-test/greeter/greeter-1.0-1.gpkg.tar").is_file());
    let index = std::fs::read_to_string(pkgdir.join("Packages")).unwrap();
    assert!(index.contains("CPV: dbh-test/hello-1.0\n"), "{index}");
}
