//! The VM backend: boot a throw-away guest of the target (fresh overlay), give it the ebuild
//! repositories, the host's per-target Portage configuration and the target's binhost (so that
//! `--usepkg` reuses what was built before), run `emerge --buildpkg --usepkg` over SSH, pull back
//! only the binpkgs that are new (by path + size + MD5 against a listing taken before the build),
//! check them against the guest's `Packages`, and publish them through [`binhost::add`] (signed,
//! BUILD_IDs allocated on the host, atomic, locked, re-indexed).
//!
//! Interruption: the caller drops the future on Ctrl-C; the `Vm` is killed by its `Drop`. Publishing
//! is one synchronous `binhost::add` call at the end, which is atomic, so an interrupted build
//! publishes nothing half-done.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use super::{EmergeLine, parse_line};
use super::{BuildError, FailedPackage, Follower, Outcome, PortageConfig, Request};
use crate::Error;
use crate::binhost::index::Index;
use crate::events::{Event, Reporter, Unit};
use crate::guest::{Guest, shell_join, shell_quote};
use crate::settings::Home;
use crate::target::Target;
use crate::vm::{Shutdown, StartOptions, Vm};

/// Where the guest keeps its binary packages (the test stage and dbh images agree).
pub const GUEST_PKGDIR: &str = "/var/cache/binpkgs";

/// Backend options besides the request.
#[derive(Debug, Clone, Default)]
pub struct VmOptions {
    pub keep_vm: bool,
    pub boot_deadline: Option<Duration>,
    /// Pass every line of emerge's output on as a note (`-v`).
    pub echo_output: bool,
}

/// One binary package file in the guest's PKGDIR.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Listed {
    pub path: String,
    pub size: u64,
    pub md5: String,
}

/// Parses the listing printed by [`LIST_SCRIPT`]: `SIZE MD5 PATH` per line.
pub fn parse_listing(text: &str) -> BTreeMap<String, Listed> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ' ');
            let size = it.next()?.parse().ok()?;
            let md5 = it.next()?.to_owned();
            let path = it.next()?.to_owned();
            Some((path.clone(), Listed { path, size, md5 }))
        })
        .collect()
}

/// The binpkgs of `after` that are not in `before` with the same size and MD5.
pub fn new_files(before: &BTreeMap<String, Listed>, after: &BTreeMap<String, Listed>) -> Vec<Listed> {
    after.values().filter(|l| before.get(&l.path) != Some(l)).cloned().collect()
}

const LIST_SCRIPT: &str = r#"
import hashlib, os, sys
root = sys.argv[1]
for d, _, files in os.walk(root):
    for f in sorted(files):
        if f.endswith((".gpkg.tar", ".tbz2", ".xpak")) and not f.startswith("."):
            p = os.path.join(d, f)
            h = hashlib.md5()
            with open(p, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            print(os.path.getsize(p), h.hexdigest(), os.path.relpath(p, root))
"#;

async fn list_pkgdir(guest: &Guest) -> Result<BTreeMap<String, Listed>, Error> {
    let cmd = format!("python3 -c {} {}", shell_quote(LIST_SCRIPT), GUEST_PKGDIR);
    let out = guest.exec_ok(&cmd).await?;
    Ok(parse_listing(&out.stdout_str()))
}

/// A tar stream of `dir` (for `tar -x` in the guest), skipping VCS metadata.
fn tar_dir(dir: &Path) -> Result<Vec<u8>, BuildError> {
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.mode(tar::HeaderMode::Deterministic);
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let abs = dir.join(&rel);
        let mut entries: Vec<_> = std::fs::read_dir(&abs)
            .map_err(|e| BuildError::Io { doing: "read", path: abs.clone(), source: e })?
            .flatten()
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name();
            if name == ".git" || name == ".svn" {
                continue;
            }
            let rel = rel.join(&name);
            let path = e.path();
            b.append_path_with_name(&path, &rel).map_err(|source| BuildError::Io { doing: "pack", path: path.clone(), source })?;
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(rel);
            }
        }
    }
    b.into_inner().map_err(|source| BuildError::Io { doing: "pack", path: dir.to_owned(), source })
}

/// A tar of the binhost's binary packages for the guest's PKGDIR, so that `--usepkg` reuses them.
///
/// GPKGs go in as unsigned copies: a guest without gpg (the test stage) cannot even open a
/// signed GPKG (Portage runs gpg whenever a Manifest is signed, binpkg-ignore-signature or not),
/// and these copies only ever serve installs inside the throw-away guest. No `Packages` goes in:
/// its SIZE/MD5 describe the signed files; the guest's Portage indexes what it finds.
fn tar_binhost(dir: &Path) -> Result<Option<Vec<u8>>, Error> {
    if !dir.join("Packages").is_file() {
        return Ok(None);
    }
    let tmp = tempfile::Builder::new()
        .prefix("dbh-seed-")
        .tempdir()
        .map_err(|source| BuildError::Io { doing: "create a temporary directory in", path: std::env::temp_dir(), source })?;
    fn pack(path: &Path) -> impl FnOnce(std::io::Error) -> BuildError + '_ {
        move |source| BuildError::Io { doing: "pack", path: path.to_owned(), source }
    }
    let mut b = tar::Builder::new(Vec::new());
    let mut stack = vec![PathBuf::new()];
    let mut n = 0;
    while let Some(rel) = stack.pop() {
        let abs = dir.join(&rel);
        let mut entries: Vec<_> =
            std::fs::read_dir(&abs).map_err(|e| BuildError::Io { doing: "read", path: abs.clone(), source: e })?.flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name();
            let s = name.to_string_lossy();
            if s.starts_with('.') {
                continue;
            }
            let rel = rel.join(&name);
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(rel);
            } else if s.ends_with(".gpkg.tar") {
                n += 1;
                // Same file name: the GPKG's top directory is named after it, and Portage checks that.
                let copy_dir = tmp.path().join(n.to_string());
                std::fs::create_dir(&copy_dir).map_err(|source| BuildError::Io { doing: "create", path: copy_dir.clone(), source })?;
                let copy = copy_dir.join(&name);
                crate::binpkg::rewrite_gpkg(&e.path(), &copy, &crate::binpkg::Rewrite { build_id: None, signer: None })?;
                b.append_path_with_name(&copy, &rel).map_err(pack(&e.path()))?;
            } else if s.ends_with(".tbz2") || s.ends_with(".xpak") {
                b.append_path_with_name(e.path(), &rel).map_err(pack(&e.path()))?;
            }
        }
    }
    Ok(Some(b.into_inner().map_err(pack(dir))?))
}

async fn untar(guest: &Guest, data: &[u8], dest: &str, replace: bool) -> Result<(), Error> {
    let q = shell_quote(dest);
    let prep = if replace { format!("rm -rf {q} && ") } else { String::new() };
    let cmd = format!("{prep}mkdir -p {q} && tar -C {q} -xf -");
    let mut input: &[u8] = data;
    let mut stderr = Vec::new();
    let status = guest
        .exec_raw(&cmd, Some(&mut input), |s, d| {
            if s == crate::process::Stream::Stderr {
                stderr.extend_from_slice(d)
            }
        })
        .await?;
    if status != 0 {
        return Err(crate::guest::GuestError::CommandFailed {
            target: String::new(),
            command: cmd,
            status,
            stderr: String::from_utf8_lossy(&stderr).trim().to_owned(),
        }
        .into());
    }
    Ok(())
}

/// Builds `req.atoms` in a throw-away guest of `target` and publishes what was built.
/// Returns the outcome also when packages failed (the caller turns `failed` into the exit code).
pub async fn build(
    home: &Home,
    target: &Target,
    req: &Request,
    opts: &VmOptions,
    reporter: &dyn Reporter,
) -> Result<Outcome, Error> {
    // Everything that can be checked on the host is checked before booting.
    let prep = super::prepare(home, target, req)?;
    let mut repos = Vec::new();
    for (name, path) in &prep.repos {
        repos.push((name.clone(), tar_dir(path)?));
    }
    let seed = tar_binhost(&prep.binhost_dir)?;
    let log_dir = prep.log_dir.clone();

    let start = StartOptions { boot_deadline: opts.boot_deadline, detached: opts.keep_vm, ..Default::default() };
    let vm = Vm::start(home, target, &start, reporter).await?;
    let result = in_guest(vm.guest(), target, req, &repos, &prep.config, (&prep.profile_repo, &prep.profile_path), seed.as_deref(), &log_dir, opts.echo_output, reporter).await;
    if opts.keep_vm {
        reporter.event(Event::Note { message: format!("the {} guest keeps running (--keep-vm); stop it with `dbh vm stop --target {}`", target.name, target.name) });
        vm.release().await;
    } else {
        vm.stop(Shutdown::Quit, reporter).await?;
    }
    let (downloads, failed, _tmp) = result?;

    let published = prep.publish(target, &downloads, reporter)?;
    let transferred = downloads.len() as u64;
    Ok(Outcome { published, failed, log_dir, transferred })
}

type GuestResult = (Vec<PathBuf>, Vec<FailedPackage>, tempfile::TempDir);

#[allow(clippy::too_many_arguments)]
async fn in_guest(
    guest: &Guest,
    target: &Target,
    req: &Request,
    repos: &[(String, Vec<u8>)],
    config: &PortageConfig,
    (profile_repo, profile_path): (&str, &str),
    seed: Option<&[u8]>,
    log_dir: &Path,
    echo: bool,
    reporter: &dyn Reporter,
) -> Result<GuestResult, Error> {
    let task = format!("build:{}", target.name);
    reporter.event(Event::Note { message: format!("{}: syncing repositories and configuration", target.name) });
    let mut conf = format!("# written by dbh before each build\n[DEFAULT]\nmain-repo = {profile_repo}\n");
    for (name, data) in repos {
        let dest = format!("/var/db/repos/{name}");
        untar(guest, data, &dest, true).await?;
        conf.push_str(&format!("\n[{name}]\nlocation = {dest}\n"));
    }
    guest.exec_ok("mkdir -p /etc/portage/repos.conf /etc/portage/package.use /etc/portage/package.accept_keywords").await?;
    guest.upload_bytes(conf.as_bytes(), "/etc/portage/repos.conf/zz-dbh.conf", 0o644).await?;
    let repo_loc = repos
        .iter()
        .find(|(n, _)| n == profile_repo)
        .map(|(n, _)| format!("/var/db/repos/{n}"));
    let repo_loc = match repo_loc {
        Some(l) => l,
        // A repository the guest already has (e.g. ::gentoo): ask Portage where it is.
        None => guest
            .exec_ok(&format!("portageq get_repo_path / {}", shell_quote(profile_repo)))
            .await?
            .stdout_str()
            .trim()
            .to_owned(),
    };
    guest
        .exec_ok(&format!(
            "ln -sfn {} /etc/portage/make.profile",
            shell_quote(&format!("{repo_loc}/profiles/{profile_path}"))
        ))
        .await?;
    let base = guest.exec_ok("cat /etc/portage/make.conf.dbh-base 2>/dev/null || cat /etc/portage/make.conf").await?.stdout;
    guest.upload_bytes(&base, "/etc/portage/make.conf.dbh-base", 0o644).await?;
    let mut make_conf = String::from_utf8_lossy(&base).into_owned();
    // binpkg-ignore-signature: the seeded binpkgs are the host's own, signed by dbh and copied over
    // the pinned SSH connection; the guest need not have gpg nor the host's key to reuse them.
    // -pkgdir-index-trusted: the seeded PKGDIR has no index yet, so Portage must scan it.
    // -sandbox/-usersandbox: a test stage has no sandbox binary; builds are throw-away anyway.
    make_conf.push_str(&format!(
        "\n# --- dbh: $DBH_HOME/targets/{}/portage/make.conf ---\n{}\n# --- dbh: build settings ---\nMAKEOPTS=\"-j{}\"\nFEATURES=\"${{FEATURES}} buildpkg binpkg-multi-instance binpkg-ignore-signature -pkgdir-index-trusted -sandbox -usersandbox\"\nBINPKG_FORMAT=\"gpkg\"\nPKGDIR=\"{GUEST_PKGDIR}\"\n",
        target.name,
        config.make_conf,
        req.jobs.max(1)
    ));
    guest.upload_bytes(make_conf.as_bytes(), "/etc/portage/make.conf", 0o644).await?;
    guest.upload_bytes(config.package_use.as_bytes(), "/etc/portage/package.use/dbh", 0o644).await?;
    guest.upload_bytes(config.package_accept_keywords.as_bytes(), "/etc/portage/package.accept_keywords/dbh", 0o644).await?;
    if let Some(seed) = seed {
        untar(guest, seed, GUEST_PKGDIR, false).await?;
    }
    let before = list_pkgdir(guest).await?;

    // emerge, followed line by line.
    let mut args: Vec<String> =
        ["emerge", "--buildpkg", "--usepkg", "--jobs=1", "--keep-going", "--color=n", "--quiet-build=n"].map(String::from).into();
    args.extend(req.atoms.iter().cloned());
    args.extend(req.emerge_args.iter().cloned());
    let command = format!("{} 2>&1", shell_join(&args));
    let mut follower = Follower::new(task.clone(), format!("emerge on {}", target.name), &log_dir.join("emerge.log"), &command, echo)?;
    reporter.event(Event::Note { message: format!("{}: {}", target.name, shell_join(&args)) });
    let status = guest.exec(&command, |_, line| follower.line(line, reporter)).await?;
    let (unfinished, tail) = follower.finish(i64::from(status), reporter);

    let mut failed = Vec::new();
    for cpv in &unfinished {
        let Some((cat, pf)) = cpv.split_once('/') else { continue };
        let fetched = log_dir.join(format!(".{cat}:{pf}.log"));
        let remote = format!("/var/tmp/portage/{cat}/{pf}/temp/build.log");
        let have = guest.download(&remote, &fetched).await.is_ok();
        failed.push(super::failed_package(cpv, have.then_some(fetched.as_path()), log_dir, reporter));
        let _ = std::fs::remove_file(&fetched);
    }
    if status != 0 && failed.is_empty() {
        return Err(BuildError::EmergeFailed { target: target.name.clone(), status, tail }.into());
    }

    // Pull back what is new.
    let after = list_pkgdir(guest).await?;
    let fresh = new_files(&before, &after);
    let tmp = tempfile::Builder::new()
        .prefix("dbh-build-")
        .tempdir()
        .map_err(|source| BuildError::Io { doing: "create a temporary directory in", path: std::env::temp_dir(), source })?;
    let mut downloads = Vec::new();
    if !fresh.is_empty() {
        let index_text = guest.exec_ok(&format!("cat {GUEST_PKGDIR}/Packages")).await?.stdout;
        let index = Index::parse(&index_text)
            .map_err(|e| BuildError::GuestIndex { target: target.name.clone(), reason: e.to_string() })?;
        let pull = format!("pull:{}", target.name);
        reporter.event(Event::Start { task: pull.clone(), label: "pulling binary packages".into(), total: Some(fresh.len() as u64), unit: Unit::Items });
        for (i, l) in fresh.iter().enumerate() {
            let mismatch = |reason: String| BuildError::Mismatch { target: target.name.clone(), path: l.path.clone(), reason };
            super::check_indexed(&index, &l.path, l.size, &l.md5).map_err(mismatch)?;
            reporter.event(Event::Progress { task: pull.clone(), position: i as u64, message: Some(l.path.clone()) });
            let local = tmp.path().join(l.path.replace('/', "--"));
            guest.download(&format!("{GUEST_PKGDIR}/{}", l.path), &local).await?;
            downloads.push(local);
        }
        reporter.event(Event::Finish { task: pull, message: format!("pulled {} binary package(s)", fresh.len()) });
    }
    Ok((downloads, failed, tmp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_new_or_changed_files_are_taken() {
        let before = parse_listing("10 aa a/b/b-1-1.gpkg.tar\n20 bb a/c/c-1-1.gpkg.tar\n");
        let after = parse_listing("10 aa a/b/b-1-1.gpkg.tar\n21 bc a/c/c-1-1.gpkg.tar\n5 cc a/d/d-1-1.gpkg.tar\nnoise\n");
        let paths: Vec<String> = new_files(&before, &after).into_iter().map(|l| l.path).collect();
        assert_eq!(paths, ["a/c/c-1-1.gpkg.tar", "a/d/d-1-1.gpkg.tar"]);
        assert!(new_files(&after, &after).is_empty());
    }
}
