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

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{BuildError, FailedPackage, Outcome, PortageConfig, Request};
use crate::Error;
use crate::binhost::{self, index::Index};
use crate::events::{Event, Reporter, Unit};
use crate::guest::{Guest, shell_join, shell_quote};
use crate::settings::Home;
use crate::sign::KeyStore;
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

/// The lines emerge prints that dbh follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmergeLine {
    /// `>>> Emerging (N of M) cat/pf::repo` (also `Emerging binary`): the build of `cpv` started.
    Emerging { n: u64, m: u64, cpv: String, binary: bool },
    /// `>>> Completed (N of M) cat/pf::repo`.
    Completed { n: u64, m: u64, cpv: String },
}

/// Parses one line of emerge's output.
pub fn parse_line(line: &str) -> Option<EmergeLine> {
    let rest = line.trim_start().strip_prefix(">>> ")?;
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
        _ => None,
    }
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

/// UTC `YYYYMMDD-HHMMSS` for log directory names.
fn timestamp() -> String {
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
    let keys = KeyStore::new(home.keys());
    if !keys.exists() {
        return Err(BuildError::NoKey { dir: home.keys() }.into());
    }
    let signer = keys.signer()?;
    let profile = req.profile.clone().unwrap_or_else(|| target.profile.clone());
    let (profile_repo, profile_path) = super::split_profile(&profile)?;
    let mut repos = Vec::new();
    for path in &req.repos {
        let name = super::repo_name(path)?;
        repos.push((name, tar_dir(path)?));
    }
    let config = PortageConfig::load_or_create(home, &target.name)?;
    let binhost_dir = home.binhost(&target.name);
    let seed = tar_binhost(&binhost_dir)?;
    let log_dir = home.logs(&target.name).join(timestamp());
    std::fs::create_dir_all(&log_dir).map_err(|source| BuildError::Io { doing: "create", path: log_dir.clone(), source })?;

    let mut distcc = req.distcc.as_ref().map(|o| super::distcc::Offload::start(target, o, &log_dir, reporter));

    let start = StartOptions { boot_deadline: opts.boot_deadline, detached: opts.keep_vm, ..Default::default() };
    let vm = Vm::start(home, target, &start, reporter).await?;
    let result = in_guest(vm.guest(), target, req, &repos, &config, (&profile_repo, &profile_path), seed.as_deref(), &log_dir, opts.echo_output, distcc.as_mut(), reporter).await;
    if let Some(d) = distcc {
        d.finish(reporter);
    }
    if opts.keep_vm {
        reporter.event(Event::Note { message: format!("the {} guest keeps running (--keep-vm); stop it with `dbh vm stop --target {}`", target.name, target.name) });
        vm.release().await;
    } else {
        vm.stop(Shutdown::Quit, reporter).await?;
    }
    let (downloads, failed, _tmp) = result?;

    let published = if downloads.is_empty() {
        Vec::new()
    } else {
        binhost::add::add(&binhost_dir, target, &downloads, Some(&signer), reporter)?
    };
    let transferred = downloads.len() as u64;
    reporter.event(Event::Count { name: "binpkg.transferred".into(), value: transferred });
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
    distcc: Option<&mut super::distcc::Offload>,
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
    if let Some(d) = distcc {
        d.configure_guest(guest, target, req.jobs, reporter).await?;
    }
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
    let log_path = log_dir.join("emerge.log");
    let mut log = std::fs::File::create(&log_path).map_err(|source| BuildError::Io { doing: "create", path: log_path.clone(), source })?;
    let _ = writeln!(log, "# {command}");
    let mut started: Vec<String> = Vec::new();
    let mut completed: BTreeSet<String> = BTreeSet::new();
    let mut total_announced = None;
    let mut tail: Vec<String> = Vec::new();
    reporter.event(Event::Note { message: format!("{}: {}", target.name, shell_join(&args)) });
    let status = guest
        .exec(&command, |_, line| {
            let _ = writeln!(log, "{line}");
            if echo {
                reporter.event(Event::Note { message: line.to_owned() });
            }
            tail.push(line.to_owned());
            if tail.len() > 30 {
                tail.remove(0);
            }
            match parse_line(line) {
                Some(EmergeLine::Emerging { n, m, cpv, binary }) => {
                    if total_announced != Some(m) {
                        reporter.event(Event::Start { task: task.clone(), label: format!("emerge on {}", target.name), total: Some(m), unit: Unit::Items });
                        total_announced = Some(m);
                    }
                    let what = if binary { "installing binary" } else { "building" };
                    reporter.event(Event::Progress { task: task.clone(), position: n - 1, message: Some(format!("{what} {cpv}")) });
                    started.push(cpv);
                }
                Some(EmergeLine::Completed { n, cpv, .. }) => {
                    reporter.event(Event::Progress { task: task.clone(), position: n, message: Some(format!("completed {cpv}")) });
                    completed.insert(cpv);
                }
                None => {}
            }
        })
        .await?;
    drop(log);
    if total_announced.is_some() {
        reporter.event(Event::Finish { task: task.clone(), message: format!("emerge exited with status {status}") });
    }

    let mut failed = Vec::new();
    for cpv in started.iter().filter(|c| !completed.contains(*c)) {
        let Some((cat, pf)) = cpv.split_once('/') else { continue };
        let local = log_dir.join(format!("{cat}:{pf}.log"));
        let remote = format!("/var/tmp/portage/{cat}/{pf}/temp/build.log");
        let log = match guest.download(&remote, &local).await {
            Ok(()) => Some(local),
            Err(_) => None,
        };
        let tail = log.as_deref().map(|p| crate::vm::tail_lines(p, 20)).unwrap_or_default();
        reporter.event(Event::Note {
            message: format!(
                "{cpv} failed to build; log: {}\n{tail}",
                log.as_deref().map_or_else(|| "(not found in the guest)".into(), |p| p.display().to_string())
            ),
        });
        failed.push(FailedPackage { cpv: cpv.clone(), log, tail });
    }
    if status != 0 && failed.is_empty() {
        return Err(BuildError::EmergeFailed { target: target.name.clone(), status, tail: tail.join("\n") }.into());
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
            let entry = index
                .packages
                .iter()
                .find(|e| e.effective_path() == l.path)
                .ok_or_else(|| mismatch("it has no entry".into()))?;
            if entry.size() != Some(l.size) {
                return Err(mismatch(format!("SIZE {:?} in the index, {} on disk", entry.get("SIZE"), l.size)).into());
            }
            if let Some(md5) = entry.get("MD5")
                && !md5.eq_ignore_ascii_case(&l.md5)
            {
                return Err(mismatch(format!("MD5 {md5} in the index, {} on disk", l.md5)).into());
            }
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

    #[test]
    fn only_new_or_changed_files_are_taken() {
        let before = parse_listing("10 aa a/b/b-1-1.gpkg.tar\n20 bb a/c/c-1-1.gpkg.tar\n");
        let after = parse_listing("10 aa a/b/b-1-1.gpkg.tar\n21 bc a/c/c-1-1.gpkg.tar\n5 cc a/d/d-1-1.gpkg.tar\nnoise\n");
        let paths: Vec<String> = new_files(&before, &after).into_iter().map(|l| l.path).collect();
        assert_eq!(paths, ["a/c/c-1-1.gpkg.tar", "a/d/d-1-1.gpkg.tar"]);
        assert!(new_files(&after, &after).is_empty());
    }

    #[test]
    fn timestamps_are_utc_civil_dates() {
        let t = timestamp();
        assert_eq!(t.len(), 15, "{t}");
        assert!(t.starts_with("20"), "{t}");
    }
}
