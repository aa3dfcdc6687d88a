//! The VM backend: unless the host's Portage finds the request satisfied by the binhost already
//! ([`super::plan`]: then nothing boots), boot a throw-away guest of the target (fresh overlay,
//! or the warm one a `--keep-vm` build left) with each ebuild repository attached as a read-only
//! squashfs snapshot ([`crate::repo`]: made once per revision, cached on the host, mounted at
//! `/var/db/repos/<name>`), give it the host's per-target Portage configuration, serve it the
//! target's binhost over HTTP on the host's loopback (the guest is a Portage client of dbh's own
//! binhost: it fetches the binpkgs its graph needs and verifies their signatures against the
//! binhost's key in its `/etc/portage/gnupg`), run `emerge --buildpkg --usepkg --getbinpkg` over
//! SSH, pull back only the binpkgs built in this run (by path + size + MD5 against a listing taken
//! before the build), check them against the guest's `Packages`, and publish them through
//! [`binhost::add`] (signed, BUILD_IDs allocated on the host, atomic, locked, re-indexed).
//!
//! Interruption: the caller drops the future on Ctrl-C; the `Vm` is killed by its `Drop`. Publishing
//! is one synchronous `binhost::add` call at the end, which is atomic, so an interrupted build
//! publishes nothing half-done.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use super::{EmergeLine, parse_line};
use super::{BuildError, FailedPackage, Follower, Outcome, PortageConfig, Request};
use crate::binhost::{self, index::Index};
use crate::events::{Event, Reporter, Unit};
use crate::guest::{Guest, shell_join, shell_quote};
use crate::settings::Home;
use crate::target::Target;
use crate::vm::{Shutdown, StartOptions, Vm};

/// Where the guest keeps its binary packages (the test stage and dbh images agree).
pub const GUEST_PKGDIR: &str = "/var/cache/binpkgs";

/// The guest's DISTDIR (a stage3's default); what appears there is kept in `$DBH_HOME/distfiles`.
pub const GUEST_DISTDIR: &str = "/var/cache/distfiles";

/// Backend options besides the request.
#[derive(Debug, Clone, Default)]
pub struct VmOptions {
    pub keep_vm: bool,
    pub boot_deadline: Option<Duration>,
    /// Pass every line of emerge's output on as a note (`-v`).
    pub echo_output: bool,
    /// egencache for repositories without a metadata cache.
    pub repo_tools: crate::repo::snapshot::Tools,
    /// vCPUs and RAM of the guest (settings `vm.cpus`, `vm.memory`).
    pub cpus: Option<u32>,
    pub memory_mib: Option<u32>,
    /// A fresh sparse scratch disk of this size for PORTAGE_TMPDIR (setting `vm.scratch_size`).
    pub scratch_bytes: Option<u64>,
    /// The host's `emerge` (setting `portage.emerge`) that decides before booting whether
    /// anything is to be built ([`super::plan::satisfied`]); `None` = `emerge` on PATH.
    pub emerge: Option<PathBuf>,
}

/// Where the scratch disk goes in the guest: `$PORTAGE_TMPDIR/portage`, Portage's build trees.
pub const GUEST_BUILD_DIR: &str = "/var/tmp/portage";

/// The guest a build runs in: booted for it, or one a `--keep-vm` build left running.
enum Running {
    Own(Box<Vm>),
    Warm(Guest),
}

impl Running {
    fn guest(&self) -> &Guest {
        match self {
            Running::Own(vm) => vm.guest(),
            Running::Warm(guest) => guest,
        }
    }
}

/// Boots the target's guest for a build, or reuses the one a `--keep-vm` build left running
/// (warm: no boot, its scratch disk and downloaded binpkgs are still there).
async fn guest_for_build(
    home: &Home,
    target: &Target,
    opts: &VmOptions,
    disks: Vec<crate::vm::qemu::ReadOnlyDisk>,
    reporter: &dyn Reporter,
) -> Result<Running, BuildError> {
    if let crate::vm::Status::Running(state) = crate::vm::status(home, &target.name)?
        && state.detached
        && state.ssh_port != 0
    {
        let (_, guest) = crate::vm::connect_running(home, &target.name).await?;
        reporter.event(Event::Note {
            message: format!(
                "reusing the running {} guest (pid {}, left by --keep-vm): no boot",
                target.name, state.pid
            ),
        });
        return Ok(Running::Warm(guest));
    }
    let start = StartOptions {
        boot_deadline: opts.boot_deadline,
        detached: opts.keep_vm,
        cpus: opts.cpus,
        memory_mib: opts.memory_mib,
        scratch_bytes: opts.scratch_bytes,
        disks,
        ..Default::default()
    };
    Ok(Running::Own(Box::new(Vm::start(home, target, &start, reporter).await?)))
}

/// One binary package file in the guest's PKGDIR.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Listed {
    pub path: String,
    pub size: u64,
    pub md5: String,
}

/// Parses a listing of `SIZE MD5 PATH` lines.
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

/// Parses what [`list_command`] prints: `SIZE PATH` lines, a `--` line, then md5sum's
/// `MD5  ./PATH` lines; a file missing from either half is left out.
pub fn parse_find_listing(text: &str) -> BTreeMap<String, Listed> {
    let (sizes, sums) = text.split_once("\n--\n").unwrap_or((text, ""));
    let md5s: BTreeMap<&str, &str> = sums
        .lines()
        .filter_map(|l| {
            let (md5, path) = l.split_once("  ")?;
            Some((path.strip_prefix("./").unwrap_or(path), md5))
        })
        .collect();
    sizes
        .lines()
        .filter_map(|l| {
            let (size, path) = l.split_once(' ')?;
            let md5 = md5s.get(path)?;
            Some((path.to_owned(), Listed { path: path.to_owned(), size: size.parse().ok()?, md5: (*md5).to_owned() }))
        })
        .collect()
}

/// The binpkgs of `after` that are not in `before` with the same size and MD5.
pub fn new_files(before: &BTreeMap<String, Listed>, after: &BTreeMap<String, Listed>) -> Vec<Listed> {
    after.values().filter(|l| before.get(&l.path) != Some(l)).cloned().collect()
}

/// Lists the guest PKGDIR's binpkgs with sizes and MD5s. find + md5sum rather than a Python
/// script: a python3 start costs about a second in a TCG guest, and this runs twice per build.
fn list_command() -> String {
    let q = shell_quote(GUEST_PKGDIR);
    let select = r"-type f \( -name '*.gpkg.tar' -o -name '*.tbz2' -o -name '*.xpak' \) ! -name '.*'";
    format!("[ -d {q} ] || exit 0; cd {q} && find . {select} -printf '%s %P\\n' && echo -- && find . {select} -exec md5sum {{}} +")
}

async fn list_pkgdir(guest: &Guest) -> Result<BTreeMap<String, Listed>, BuildError> {
    let out = guest.exec_ok(&list_command()).await?;
    Ok(parse_find_listing(&out.stdout_str()))
}

/// Appends a root-owned 0644 file `path` holding `data`.
fn append_file(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]) -> Result<(), BuildError> {
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(crate::util::time::now_secs());
    h.set_entry_type(tar::EntryType::Regular);
    b.append_data(&mut h, path, data).map_err(|source| BuildError::Io(crate::util::fs::PathError { doing: "pack", path: path.into(), source }))
}

/// The host side of the sync, built before booting: one tar stream for `tar -C / -x` in the
/// guest holding dbh's files under `etc/portage` (the
/// make.conf part as `make.conf.dbh-tail`, joined to the image's own by [`SYNC_SCRIPT`];
/// `binrepos.conf/dbh.conf` naming the host's binhost when `binhost_url` is given). No binpkg and
/// no repository goes in: the guest fetches the binpkgs its graph needs from that URL, and the
/// repositories are attached snapshots. One stream and one command instead of a dozen uploads:
/// every process started in a TCG guest costs tens of milliseconds.
fn bundle(
    target: &Target,
    req: &Request,
    repos: &[String],
    config: &PortageConfig,
    profile_repo: &str,
    binhost_url: Option<&str>,
    mirror_url: &str,
) -> Result<Vec<u8>, BuildError> {
    let mut b = tar::Builder::new(Vec::new());
    let conf = crate::repo::guest_repos_conf(profile_repo, repos);
    // The host's repos.conf first, the snapshots after it (Portage reads the directory in name
    // order, later sections win).
    append_file(&mut b, "etc/portage/repos.conf/50-dbh-host.conf", config.repos_conf.as_bytes())?;
    append_file(&mut b, "etc/portage/repos.conf/zz-dbh.conf", conf.as_bytes())?;
    append_file(&mut b, &format!("etc/portage/sets/{WORLD_SET}"), config.world.as_bytes())?;
    append_file(&mut b, "etc/portage/package.use/dbh", config.package_use.as_bytes())?;
    append_file(&mut b, "etc/portage/package.accept_keywords/dbh", config.package_accept_keywords.as_bytes())?;
    // -pkgdir-index-trusted: the guest's PKGDIR starts empty and gets the fetched and built
    // binpkgs; Portage keeps its index. -sandbox/-usersandbox: a test stage has no sandbox binary;
    // builds are throw-away anyway. No binpkg-ignore-signature: what comes from the binhost is
    // verified (binrepos.conf `verify-signature`); what the guest builds itself is unsigned.
    let tail = format!(
        "\n# --- dbh: $DBH_HOME/targets/{}/portage/make.conf ---\n{}\n# --- dbh: build settings ---\nMAKEOPTS=\"-j{}\"\nFEATURES=\"${{FEATURES}} buildpkg binpkg-multi-instance -pkgdir-index-trusted -sandbox -usersandbox\"\nBINPKG_FORMAT=\"gpkg\"\nPKGDIR=\"{GUEST_PKGDIR}\"\nDISTDIR=\"{GUEST_DISTDIR}\"\n{}",
        target.name,
        config.make_conf,
        req.jobs.max(1),
        if req.gentoo_binhost { "" } else { "# Only dbh's own binhost (binrepos.conf/dbh.conf); build.gentoo_binhost keeps the image's.\nPORTAGE_BINHOST=\"\"\n" },
    );
    append_file(&mut b, "etc/portage/make.conf.dbh-tail", tail.as_bytes())?;
    // The host's distfiles as Portage's `local` mirror (/etc/portage/mirrors): tried before
    // GENTOO_MIRRORS and SRC_URI, and the only place a RESTRICT="fetch" or "mirror" file may come
    // from, so a file placed in $DBH_HOME/distfiles by hand reaches the build as it would through
    // DISTDIR. GENTOO_MIRRORS stay the target make.conf's.
    let mirrors = format!("# written by dbh for this build: the host's $DBH_HOME/distfiles\nlocal {mirror_url}\n");
    append_file(&mut b, "etc/portage/mirrors.dbh-tail", mirrors.as_bytes())?;
    if let Some(url) = binhost_url {
        append_file(&mut b, "etc/portage/binrepos.conf/dbh.conf", binrepos_conf(&target.name, url).as_bytes())?;
    }
    b.into_inner().map_err(|source| BuildError::Io(crate::util::fs::PathError { doing: "pack", path: "the guest's configuration".into(), source }))
}

/// Run in the guest with the bundle on stdin (after `rm -rf` of the repositories' directories):
/// unpacks it and makes /etc/portage/make.conf and /etc/portage/mirrors the image's own (kept once
/// as `*.dbh-base`) followed by dbh's part; a `mirrors` directory gets dbh's part as its last file
/// (Portage reads it in name order; the last `local` line wins).
const SYNC_SCRIPT: &str = "tar -C / -xf - && cd /etc/portage \
    && { [ -e make.conf.dbh-base ] || cp make.conf make.conf.dbh-base 2>/dev/null || : > make.conf.dbh-base; } \
    && cat make.conf.dbh-base make.conf.dbh-tail > make.conf.dbh-part && mv -f make.conf.dbh-part make.conf \
    && rm -f make.conf.dbh-tail \
    && if [ -d mirrors ]; then mv -f mirrors.dbh-tail mirrors/zz-dbh; else \
    { [ -e mirrors.dbh-base ] || cp mirrors mirrors.dbh-base 2>/dev/null || : > mirrors.dbh-base; } \
    && cat mirrors.dbh-base mirrors.dbh-tail > mirrors.dbh-part && mv -f mirrors.dbh-part mirrors \
    && rm -f mirrors.dbh-tail; fi";

/// The virtio serial of the `i`th snapshot disk: `repo-<name>` when that fits in virtio-blk's 20
/// bytes, else `repo<i>-<start of the name>`.
pub fn disk_serial(i: usize, name: &str) -> String {
    let s = format!("repo-{name}");
    if s.len() <= 20 { s } else { format!("repo{i}-{}", &name[..name.len().min(12)]) }
}

/// Mounts each snapshot disk (found by its serial in /sys/block) read-only at
/// `/var/db/repos/<name>`, over whatever the image has there. squashfs is a module in Debian's and
/// Gentoo's distribution kernels: modprobe, else insmod (a stage without depmod output has no
/// modules.dep).
pub fn mount_script(repos: &[(String, String)]) -> String {
    let mut s = String::from(
        "{ grep -qw squashfs /proc/filesystems || modprobe squashfs 2>/dev/null \
         || insmod \"$(find /lib/modules/$(uname -r)/ -name 'squashfs.ko*' | head -n 1)\" \
         || { echo 'dbh: the guest kernel cannot mount squashfs (needs CONFIG_SQUASHFS)' >&2; exit 1; }; } \
         && m() { for b in /sys/block/*; do if [ \"$(cat $b/serial 2>/dev/null)\" = \"$1\" ]; then mkdir -p \"$2\" \
         && { umount \"$2\" 2>/dev/null; mount -t squashfs -o ro \"/dev/${b##*/}\" \"$2\"; }; return; fi; done; \
         echo \"dbh: no disk with serial $1 for $2\" >&2; return 1; }",
    );
    for (serial, name) in repos {
        s.push_str(&format!(" && m {} {}", shell_quote(serial), shell_quote(&format!("/var/db/repos/{name}"))));
    }
    s
}

/// Runs `cmd` in the guest with `data` on its stdin; a non-zero exit is an error with its stderr.
async fn exec_with_input(guest: &Guest, cmd: String, data: &[u8]) -> Result<(), BuildError> {
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

/// The `binrepos.conf` entry the guest gets for dbh's binhost of `target` at `url`: highest
/// priority, signatures verified against the key [`guest_keyring`] installs.
pub fn binrepos_conf(target: &str, url: &str) -> String {
    format!(
        "# written by dbh for this build: the host's binhost of {target}, served on the host's loopback\n\
         [dbh-{target}]\npriority = 9999\nsync-uri = {url}\nverify-signature = true\n"
    )
}

/// The binhost server of one build: dbh's own `serve` code on 127.0.0.1 (a free port), reached
/// from the guest as QEMU user-net's gateway 10.0.2.2 (whose connections arrive from 127.0.0.1),
/// so nothing is reachable from outside this host. It streams files from disk (sendfile): dbh's
/// memory does not grow with the binhost. It also serves `$DBH_HOME/distfiles` as a Gentoo
/// mirror (`/distfiles/<name>`), the guest's `local` mirror: a source tarball any backend
/// downloaded once is not downloaded again.
struct BinhostServer {
    port: u16,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl BinhostServer {
    async fn start(home: &Home, access_log: &Path) -> Result<BinhostServer, BuildError> {
        let distfiles = home.distfiles();
        // Served even before the first package is published (then only the distfiles).
        for dir in [home.root().join("binhost"), distfiles.clone()] {
            std::fs::create_dir_all(&dir).map_err(|source| BuildError::Io(crate::util::fs::PathError { doing: "create", path: dir.clone(), source }))?;
        }
        let config = crate::serve::Config {
            dir: home.root().join("binhost"),
            listen: vec!["127.0.0.1:0".into()],
            public_url: None,
            priority: 9999,
            key_file: home.keys().join("public.asc"),
            limits: crate::serve::Limits::default(),
            target_config: None,
            distfiles: Some(distfiles),
        };
        let server = crate::serve::Server::bind(config).await?;
        let log = std::fs::File::create(access_log).map_err(|source| BuildError::Io(crate::util::fs::PathError { doing: "create", path: access_log.to_owned(), source }))?;
        server.log_access_to(log);
        let port = server.local_addrs().first().map(|a| a.port()).unwrap_or_default();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            if let Err(e) = server.run(async { let _ = rx.await; }).await {
                tracing::warn!("the build's binhost server stopped: {e}");
            }
        });
        Ok(BinhostServer { port, stop: Some(tx), task })
    }

    /// The URL the guest uses for `target`'s binhost.
    fn guest_url(&self, target: &str) -> String {
        format!("http://{GATEWAY}:{}/{target}", self.port)
    }

    /// The mirror URL of the host's distfiles as the guest sees it (Portage appends `/distfiles/`).
    fn mirror_url(&self) -> String {
        format!("http://{GATEWAY}:{}", self.port)
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
    }
}

/// QEMU user networking's address of the host as the guest sees it.
const GATEWAY: &str = "10.0.2.2";

/// The repositories of a build as attached snapshots.
struct Snapshots {
    /// name → the revision `REPO_REVISIONS` records.
    revisions: BTreeMap<String, String>,
    /// name → the revision's key (content identity, also of a dirty checkout).
    keys: BTreeMap<String, String>,
    /// `(disk serial, repository name)` for [`mount_script`].
    mounts: Vec<(String, String)>,
    disks: Vec<crate::vm::qemu::ReadOnlyDisk>,
    names: Vec<String>,
    /// `(name, host path)` of each, for the host's plan.
    sources: Vec<(String, PathBuf)>,
}

/// Every repository of the build as a read-only snapshot at its revision, made once and cached.
fn attach_snapshots(
    home: &Home,
    prep: &super::prepare::Prepared,
    tools: &crate::repo::snapshot::Tools,
    reporter: &dyn Reporter,
) -> Result<Snapshots, BuildError> {
    let sources = crate::repo::plan(home, &prep.repos, &prep.config.repos_conf, &prep.profile_repo);
    let mut out = Snapshots {
        revisions: BTreeMap::new(),
        keys: BTreeMap::new(),
        mounts: Vec::new(),
        disks: Vec::new(),
        names: Vec::new(),
        sources: sources.iter().map(|s| (s.name.clone(), s.path.clone())).collect(),
    };
    for (i, src) in sources.iter().enumerate() {
        let snap = crate::repo::snapshot(home, src, &sources, tools, reporter)?;
        out.revisions.insert(snap.name.clone(), snap.revision.recorded.clone());
        out.keys.insert(snap.name.clone(), snap.revision.key.clone());
        let serial = disk_serial(i, &snap.name);
        out.mounts.push((serial.clone(), snap.name.clone()));
        out.disks.push(crate::vm::qemu::ReadOnlyDisk { path: snap.image, serial });
        out.names.push(snap.name);
    }
    Ok(out)
}

/// Builds `req.atoms` in a throw-away guest of `target` and publishes what was built.
/// Returns the outcome also when packages failed (the caller turns `failed` into the exit code).
pub async fn build(
    home: &Home,
    target: &Target,
    req: &Request,
    opts: &VmOptions,
    reporter: &dyn Reporter,
) -> Result<Outcome, BuildError> {
    // Everything that can be checked on the host is checked before booting.
    let prep = super::prepare(home, target, req)?;
    let (config, profile_repo, profile_path) = (&prep.config, &prep.profile_repo, &prep.profile_path);
    let mut req = req.clone();
    if req.atoms.is_empty() {
        // prepare() made sure the world file lists something.
        req.atoms = vec![format!("@{WORLD_SET}")];
    }
    let req = &req;
    let mut timings = Timings::default();
    let snaps = attach_snapshots(home, &prep, &opts.repo_tools, reporter)?;
    let Snapshots { revisions, keys: repo_keys, mounts, disks, names: repo_names, sources } = snaps;
    let plan_repos = super::plan::Repos { paths: sources, keys: repo_keys };
    timings.lap("snapshot");
    let log_dir = prep.log_dir.clone();
    let have_binhost = prep.binhost_dir.join("Packages").is_file();
    if have_binhost && let Some(why) = super::plan::satisfied(home, target, &prep, req, opts.emerge.as_deref(), &plan_repos, reporter)? {
        reporter.event(Event::Note { message: format!("{}: nothing to build, no guest booted: {why}", target.name) });
        reporter.event(Event::Count { name: "binpkg.transferred".into(), value: 0 });
        return Ok(Outcome { published: Vec::new(), failed: Vec::new(), log_dir, transferred: 0, rebuilt: Vec::new() });
    }
    timings.lap("plan");
    // The binhost and the distfiles are served for the guest only while it runs; an empty binhost
    // is not offered.
    let server = BinhostServer::start(home, &log_dir.join("binhost-access.log")).await?;
    let url = have_binhost.then(|| server.guest_url(&target.name));
    let bundle = bundle(target, req, &repo_names, config, profile_repo, url.as_deref(), &server.mirror_url())?;
    let keys = crate::sign::KeyStore::new(home.keys());
    let key = (keys.public_armored()?, keys.fingerprint()?);
    timings.lap("prepare");

    let mut distcc = req.distcc.as_ref().map(|o| super::distcc::Offload::start(target, o, &log_dir, reporter));

    let running = match guest_for_build(home, target, opts, disks, reporter).await {
        Ok(running) => running,
        Err(e) => {
            server.stop().await;
            return Err(e);
        }
    };
    timings.lap("boot");
    let distdir = home.distfiles();
    let inputs = GuestInputs {
        repos: &mounts,
        revisions: &revisions,
        profile: (profile_repo, profile_path),
        bundle: &bundle,
        key: have_binhost.then_some((key.0.as_str(), key.1.as_str())),
        gentoo_binhost: req.gentoo_binhost,
        distdir: &distdir,
    };
    let result = in_guest(running.guest(), target, req, &inputs, &log_dir, opts.echo_output, &mut timings, distcc.as_mut(), reporter).await;
    if let Some(d) = distcc {
        d.finish(reporter);
    }
    match running {
        Running::Warm(guest) => {
            reporter.event(Event::Note { message: format!("the {} guest keeps running; stop it with `dbh vm stop --target {}`", target.name, target.name) });
            guest.disconnect().await;
        }
        Running::Own(vm) if opts.keep_vm => {
            reporter.event(Event::Note { message: format!("the {} guest keeps running (--keep-vm): the next build reuses it; stop it with `dbh vm stop --target {}`", target.name, target.name) });
            vm.release().await;
        }
        Running::Own(vm) => vm.stop(Shutdown::Quit, reporter).await?,
    }
    server.stop().await;
    timings.lap("stop");
    let (downloads, failed, built, _tmp) = result?;
    // Why each package was built rather than taken from the binhost.
    let rebuilt = if built.is_empty() { Vec::new() } else { super::plan::reasons(&prep.binhost_dir, &built) };
    for (cpv, why) in &rebuilt {
        reporter.event(Event::Note { message: format!("{}: built {cpv}: {why}", target.name) });
    }

    // The revisions go into the header with the packages they built, in the same atomic step.
    let published = if downloads.is_empty() {
        Vec::new()
    } else {
        let edit = |h: &mut BTreeMap<String, String>| super::merge_repo_revisions(h, &revisions);
        binhost::add::add_with_header(&prep.binhost_dir, target, &downloads, Some(&prep.signer), &edit, reporter)?
    };
    timings.lap("publish");
    let transferred = downloads.len() as u64;
    reporter.event(Event::Count { name: "binpkg.transferred".into(), value: transferred });
    timings.report(&target.name, reporter);
    Ok(Outcome { published, failed, log_dir, transferred, rebuilt })
}

/// emerge's command line in the guest. `--getbinpkg` when the binhost is served; `--update`
/// asks for the options that keep a binhost current: only what changed is built, a binpkg whose
/// USE or dependencies no longer match the tree is not reused. `--verbose` prints the merge list
/// with USE flags, from which dbh says why each package was built.
pub fn emerge_args(req: &Request, getbinpkg: bool) -> Vec<String> {
    // emerge turns `--getbinpkg` into `--usepkg` whatever comes after it, so a user's
    // `-- --usepkg=n` (build everything from source) must drop both of dbh's options, and
    // `--getbinpkg=n` dbh's `--getbinpkg`.
    let no_usepkg = says_no(&req.emerge_args, "--usepkg");
    let no_getbinpkg = no_usepkg || says_no(&req.emerge_args, "--getbinpkg");
    let mut args: Vec<String> = vec!["emerge".into(), "--buildpkg".into()];
    if !no_usepkg {
        args.push("--usepkg".into());
    }
    if getbinpkg && !no_getbinpkg {
        args.push("--getbinpkg".into());
    }
    if req.update {
        args.extend(UPDATE_ARGS.iter().map(|a| (*a).to_owned()));
    }
    args.extend(["--verbose", "--jobs=1", "--keep-going", "--color=n", "--quiet-build=n"].map(String::from));
    args.extend(req.atoms.iter().cloned());
    args.extend(req.emerge_args.iter().cloned());
    args
}

/// Whether emerge's `args` set the boolean option `opt` to no (`--opt=n`, `--opt n`, …); the last
/// one given wins, as in emerge.
fn says_no(args: &[String], opt: &str) -> bool {
    let mut no = false;
    for (i, a) in args.iter().enumerate() {
        let value = if a == opt {
            args.get(i + 1).map(String::as_str).filter(|v| matches!(*v, "y" | "n" | "yes" | "no" | "True" | "False"))
        } else if let Some(v) = a.strip_prefix(opt).and_then(|r| r.strip_prefix('=')) {
            Some(v)
        } else {
            continue;
        };
        no = matches!(value, Some("n" | "no" | "False"));
    }
    no
}

/// `dbh vm build --update`'s emerge options.
pub const UPDATE_ARGS: &[&str] =
    &["--update", "--deep", "--newuse", "--with-bdeps=y", "--binpkg-changed-deps=y", "--binpkg-respect-use=y"];

/// Run before the sync: dbh decides which binhosts the guest uses. Every entry of the image's
/// `/etc/portage/binrepos.conf` (a stage3's `gentoobinhost.conf` names Gentoo's binhost, which a
/// build guest may not reach) is moved to `/etc/portage/binrepos.conf.dbh-off/`, so that only
/// dbh's `dbh.conf` is left. Setting `build.gentoo_binhost` keeps them.
const ONLY_DBH_BINHOST: &str = "b=/etc/portage/binrepos.conf; o=/etc/portage/binrepos.conf.dbh-off; \
    if [ -f $b ]; then mkdir -p $o && mv -f $b $o/binrepos.conf; fi; \
    if [ -d $b ]; then for f in $b/*; do [ -e \"$f\" ] || continue; mkdir -p $o && mv -f \"$f\" $o/; done; fi; :";

/// Undoes [`ONLY_DBH_BINHOST`] and dbh's `binrepos.conf/dbh.conf` (run in `/etc/portage`), for
/// a base image that keeps its own binhosts.
const RESTORE_BINHOSTS: &str = "rm -f binrepos.conf/dbh.conf; o=binrepos.conf.dbh-off; if [ -d $o ]; then \
    if [ -f $o/binrepos.conf ]; then rmdir binrepos.conf 2>/dev/null; mv -f $o/binrepos.conf binrepos.conf; fi; \
    for f in $o/*; do [ -e \"$f\" ] || continue; mkdir -p binrepos.conf && mv -f \"$f\" binrepos.conf/; done; rmdir $o; fi; \
    rmdir binrepos.conf 2>/dev/null; :";

/// Run in the guest's /etc/portage after `vm image update`: the image's own `mirrors` again (an
/// empty one, which the sync step makes where there was none, goes).
const RESTORE_MIRRORS: &str = "if [ -d mirrors ]; then rm -f mirrors/zz-dbh; elif [ -e mirrors.dbh-base ]; then \
    if [ -s mirrors.dbh-base ]; then mv -f mirrors.dbh-base mirrors; else rm -f mirrors mirrors.dbh-base; fi; fi";

/// Makes the guest's `/etc/portage/gnupg` trust the binhost's key, so that Portage verifies what
/// it fetches from dbh. The key is imported and given full trust the way a client's keyring is
/// (see `dbh binhost conf`); the directory is readable by the unprivileged user Portage verifies
/// as (`GPG_VERIFY_USER_DROP`). A guest without gpg cannot verify: that is an error, not a
/// silent downgrade.
async fn guest_keyring(guest: &Guest, target: &Target, armored: &str, fpr: &str) -> Result<(), BuildError> {
    let script = format!(
        "command -v gpg >/dev/null || {{ echo 'gpg is not installed in the guest' >&2; exit 3; }}; \
         G=/etc/portage/gnupg; install -d -m 0755 $G && \
         gpg --homedir $G --batch --no-tty --quiet --import && \
         echo {fpr}:6: | gpg --homedir $G --batch --no-tty --quiet --import-ownertrust && \
         gpg --homedir $G --batch --no-tty --quiet --check-trustdb && chmod -R go+rX $G"
    );
    exec_with_input(guest, script, armored.as_bytes()).await.map_err(|e| match e {
        BuildError::Guest(crate::guest::GuestError::CommandFailed { status: 3, .. }) => BuildError::GuestNoGpg { target: target.name.clone() },
        e => e,
    })
}

/// The user set the host's `world` file becomes in the guest (`/etc/portage/sets/dbh-world`).
pub const WORLD_SET: &str = "dbh-world";

/// Wall-clock time per step of a build, reported as `build.<step>_ms` counts (and one line at
/// `-v`), so that benchmarks can split dbh's own overhead from emerge's time.
#[derive(Debug)]
struct Timings {
    last: Instant,
    steps: Vec<(&'static str, Duration)>,
}

impl Default for Timings {
    fn default() -> Self {
        Timings { last: Instant::now(), steps: Vec::new() }
    }
}

impl Timings {
    fn lap(&mut self, step: &'static str) {
        let now = Instant::now();
        self.steps.push((step, now - self.last));
        self.last = now;
    }

    fn report(&self, target: &str, reporter: &dyn Reporter) {
        let mut line = format!("{target}: timings:");
        for (step, d) in &self.steps {
            reporter.event(Event::Count { name: format!("build.{step}_ms"), value: d.as_millis() as u64 });
            line.push_str(&format!(" {step} {:.1}s", d.as_secs_f64()));
        }
        tracing::info!("{line}");
    }
}

/// What goes into the guest before emerge runs.
struct GuestInputs<'a> {
    /// `(disk serial, repository name)` of every attached snapshot.
    repos: &'a [(String, String)],
    revisions: &'a BTreeMap<String, String>,
    /// The profile's repository and path in it.
    profile: (&'a str, &'a str),
    /// What [`bundle`] made.
    bundle: &'a [u8],
    /// The binhost's armored public key and fingerprint, when the guest fetches from it.
    key: Option<(&'a str, &'a str)>,
    /// Keep the image's own binhosts (setting `build.gentoo_binhost`).
    gentoo_binhost: bool,
    /// `$DBH_HOME/distfiles`, where what the guest downloaded goes.
    distdir: &'a Path,
}

/// Pulled binpkgs, failed packages, the packages built from source (cpv, enabled USE flags as
/// emerge showed them), and the directory holding the pulled files.
type GuestResult = (Vec<PathBuf>, Vec<FailedPackage>, Vec<(String, Option<Vec<String>>)>, tempfile::TempDir);

#[allow(clippy::too_many_arguments)]
async fn in_guest(
    guest: &Guest,
    target: &Target,
    req: &Request,
    inputs: &GuestInputs<'_>,
    log_dir: &Path,
    echo: bool,
    timings: &mut Timings,
    distcc: Option<&mut super::distcc::Offload>,
    reporter: &dyn Reporter,
) -> Result<GuestResult, BuildError> {
    let (revisions, key) = (inputs.revisions, inputs.key);
    let task = format!("build:{}", target.name);
    let sync = format!("sync:{}", target.name);
    reporter.event(Event::Start {
        task: sync.clone(),
        label: format!("{}: syncing repositories, configuration and binary packages", target.name),
        total: None,
        unit: Unit::Spinner,
    });
    sync_guest(guest, target, inputs).await?;
    if let Some(d) = distcc {
        d.configure_guest(guest, target, req.jobs, reporter).await?;
    }
    let before = list_pkgdir(guest).await?;
    reporter.event(Event::Finish { task: sync, message: format!("{}: guest ready for emerge", target.name) });
    timings.lap("sync");

    // emerge, followed line by line.
    let args = emerge_args(req, key.is_some());
    let command = format!("{} 2>&1", shell_join(&args));
    let mut follower = Follower::new(task.clone(), format!("emerge on {}", target.name), &log_dir.join("emerge.log"), &command, echo)?;
    for (name, rev) in revisions {
        follower.log_only(&format!("# repository {name} at {rev}"));
    }
    reporter.event(Event::Note { message: format!("{}: {}", target.name, shell_join(&args)) });
    let status = guest.exec(&command, |_, line| follower.line(line, reporter)).await?;
    let built = follower.built();
    let (unfinished, tail) = follower.finish(i64::from(status), reporter);
    timings.lap("emerge");
    // What was built is worth more than the distfiles: a failure to keep them is a warning.
    if let Err(e) = keep_distfiles(guest, target, inputs.distdir, reporter).await {
        reporter.event(Event::Note {
            message: format!("warning: {}: the downloaded distfiles were not kept in {}: {e}; the packages are published all the same", target.name, inputs.distdir.display()),
        });
    }

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
        return Err(BuildError::EmergeFailed { target: target.name.clone(), status, tail });
    }

    // Pull back what is new and was built here: the guest's PKGDIR also holds the binpkgs it
    // fetched from the binhost (signed copies of what is published already).
    let after = list_pkgdir(guest).await?;
    let mut fresh = new_files(&before, &after);
    let tmp = tempfile::Builder::new()
        .prefix("dbh-build-")
        .tempdir()
        .map_err(|source| BuildError::Io(crate::util::fs::PathError { doing: "create a temporary directory in", path: std::env::temp_dir(), source }))?;
    let mut downloads = Vec::new();
    let mut index = Index::default();
    if !fresh.is_empty() {
        let index_text = guest.exec_ok(&format!("cat {GUEST_PKGDIR}/Packages")).await?.stdout;
        index = Index::parse(&index_text)
            .map_err(|e| BuildError::GuestIndex { target: target.name.clone(), reason: e.to_string() })?;
        let built_here: std::collections::BTreeSet<&str> = built.iter().map(|(c, _)| c.as_str()).collect();
        fresh.retain(|l| index.packages.iter().find(|e| e.effective_path() == l.path).is_none_or(|e| built_here.contains(e.cpv())));
    }
    if !fresh.is_empty() {
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
    timings.lap("pull");
    let built = built.into_iter().filter(|(c, _)| !failed.iter().any(|f| &f.cpv == c)).collect();
    Ok((downloads, failed, built, tmp))
}

/// Copies what the guest downloaded into its DISTDIR to the host's `distdir`, each file under a
/// temporary name and renamed when complete (a killed build leaves no partial distfile; Portage
/// verified each against its Manifest before it got its name). Portage's own partial downloads
/// (`*.__download__`), lock files and dot files stay behind; a file the host has at the same size
/// is not copied again. Temporary names carry dbh's pid, so that builds of two targets sharing
/// the directory never write the same one and a killed build's leftovers are recognised and
/// removed by the next ([`sweep_parts`]).
async fn keep_distfiles(guest: &Guest, target: &Target, distdir: &Path, reporter: &dyn Reporter) -> Result<(), BuildError> {
    sweep_parts(distdir);
    let listing = guest
        .exec_ok(&format!("[ ! -d {GUEST_DISTDIR} ] || find {GUEST_DISTDIR} -maxdepth 1 -type f ! -name '.*' ! -name '*.__download__' ! -name '*._checksum_failure_.*' -printf '%s %f\\n'"))
        .await?
        .stdout_str();
    let mut kept = Vec::new();
    for line in listing.lines() {
        let Some((size, name)) = line.split_once(' ') else { continue };
        let Ok(size) = size.parse::<u64>() else { continue };
        // A name from the guest becomes a host path: one plain file name only.
        if name.is_empty() || name.starts_with('.') || name.contains(['/', '\0']) {
            continue;
        }
        let dest = distdir.join(name);
        if std::fs::metadata(&dest).is_ok_and(|m| m.len() == size) {
            continue;
        }
        let part = distdir.join(format!(".{name}.{}{PART_SUFFIX}", std::process::id()));
        guest.download(&format!("{GUEST_DISTDIR}/{name}"), &part).await?;
        std::fs::rename(&part, &dest).map_err(|source| BuildError::Io(crate::util::fs::PathError { doing: "rename into", path: dest.clone(), source }))?;
        kept.push(name.to_owned());
    }
    if !kept.is_empty() {
        reporter.event(Event::Note { message: format!("{}: kept {} new distfile(s) in {}: {}", target.name, kept.len(), distdir.display(), kept.join(" ")) });
    }
    Ok(())
}

/// The suffix of a distfile being copied from a guest (`.NAME.PID.dbh-part`).
const PART_SUFFIX: &str = ".dbh-part";

/// Removes the temporary distfiles of dbh processes that are gone (killed mid-copy); those of a
/// running dbh stay. A name without a pid (written by an older dbh) goes when it is a day old.
fn sweep_parts(distdir: &Path) {
    let Ok(entries) = std::fs::read_dir(distdir) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(stem) = name.to_str().filter(|n| n.starts_with('.')).and_then(|n| n.strip_suffix(PART_SUFFIX)) else { continue };
        let stale = match stem.rsplit_once('.').and_then(|(_, pid)| pid.parse::<u32>().ok()) {
            Some(pid) => pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists(),
            None => e.metadata().and_then(|m| m.modified()).is_ok_and(|t| t.elapsed().is_ok_and(|a| a > std::time::Duration::from_secs(86_400))),
        };
        if stale {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Mounts the repository snapshots, unpacks the bundle (dbh's Portage files), leaves only dbh's
/// binhost configured (unless `build.gentoo_binhost`), points make.profile at the profile, mounts
/// the scratch disk on the build directory if there is one, and trusts the binhost's key.
async fn sync_guest(guest: &Guest, target: &Target, inputs: &GuestInputs<'_>) -> Result<(), BuildError> {
    let GuestInputs { repos, profile: (profile_repo, profile_path), bundle, .. } = *inputs;
    let mut script = if repos.is_empty() { SYNC_SCRIPT.to_owned() } else { format!("{} && {SYNC_SCRIPT}", mount_script(repos)) };
    if !inputs.gentoo_binhost {
        script = format!("{ONLY_DBH_BINHOST} && {script}");
    }
    let link = |loc: &str| format!("ln -sfn {} /etc/portage/make.profile", shell_quote(&format!("{loc}/profiles/{profile_path}")));
    let own = repos.iter().any(|(_, n)| n == profile_repo);
    if own {
        script.push_str(&format!(" && {}", link(&format!("/var/db/repos/{profile_repo}"))));
    }
    // Build trees on the scratch disk when the guest has one (a missing label is not an error: the
    // root filesystem then holds them).
    script.push_str(&format!(
        " && {{ if [ -e /sys/block ] && grep -qs dbh-scratch /sys/block/*/serial; then {}; fi; }}",
        crate::vm::mount_scratch_command(GUEST_BUILD_DIR)
    ));
    exec_with_input(guest, script, bundle).await?;
    if !own {
        // A repository the guest already has (e.g. ::gentoo): ask Portage where it is.
        let loc = guest.exec_ok(&format!("portageq get_repo_path / {}", shell_quote(profile_repo))).await?.stdout_str();
        guest.exec_ok(&link(loc.trim())).await?;
    }
    if let Some((armored, fpr)) = inputs.key {
        guest_keyring(guest, target, armored, fpr).await?;
    }
    Ok(())
}

/// What `dbh vm image update` did.
#[derive(Debug, Clone, Default)]
pub struct ImageUpdate {
    /// The atoms emerge installed (empty: nothing was missing, the image is unchanged).
    pub installed: Vec<String>,
}

/// The build tools a base image gets by default: (atom, a program it installs).
pub const BUILD_TOOLS: &[(&str, &str)] = &[("sys-devel/distcc", "distcc"), ("app-crypt/gnupg", "gpg")];

/// `dbh vm image update`: boots the base image with an overlay, installs `atoms` (default: the
/// [`BUILD_TOOLS`] the image lacks) from the target's binhost with `emerge --getbinpkgonly`,
/// served the way a build's guest gets it, takes dbh's configuration and the fetched binpkgs out,
/// and makes the overlay the new `disk.qcow2` (`qemu-img convert` to a temporary file, then a
/// rename: an interrupted update leaves the old image). Every later guest starts from it.
pub async fn update_image(
    home: &Home,
    target: &Target,
    req: &Request,
    atoms: &[String],
    start: &StartOptions,
    repo_tools: &crate::repo::snapshot::Tools,
    reporter: &dyn Reporter,
) -> Result<ImageUpdate, BuildError> {
    if let crate::vm::Status::Running(state) = crate::vm::status(home, &target.name)? {
        return Err(crate::vm::VmError::AlreadyRunning { target: target.name.clone(), pid: state.pid }.into());
    }
    let mut req = req.clone();
    req.atoms = if atoms.is_empty() { BUILD_TOOLS.iter().map(|(a, _)| (*a).to_owned()).collect() } else { atoms.to_vec() };
    let prep = super::prepare(home, target, &req)?;
    if !prep.binhost_dir.join("Packages").is_file() {
        return Err(BuildError::NothingToInstall { target: target.name.clone(), binhost: prep.binhost_dir.clone() });
    }
    let snaps = attach_snapshots(home, &prep, repo_tools, reporter)?;
    let server = BinhostServer::start(home, &prep.log_dir.join("binhost-access.log")).await?;
    let url = server.guest_url(&target.name);
    let bundle = bundle(target, &req, &snaps.names, &prep.config, &prep.profile_repo, Some(&url), &server.mirror_url())?;
    let distdir = home.distfiles();
    let keys = crate::sign::KeyStore::new(home.keys());
    let key = (keys.public_armored()?, keys.fingerprint()?);
    let paths = crate::vm::Paths::new(home, &target.name);
    let overlay = paths.run.join("overlay.qcow2");
    // A fresh overlay that outlives the VM (keep_overlay), to be converted afterwards.
    let _ = std::fs::remove_file(&overlay);
    let _ = std::fs::remove_file(paths.run.join("vars.fd"));
    let opts = StartOptions { keep_overlay: true, detached: false, scratch_bytes: None, disks: snaps.disks.clone(), ..start.clone() };
    let vm = match Vm::start(home, target, &opts, reporter).await {
        Ok(vm) => vm,
        Err(e) => {
            server.stop().await;
            return Err(e.into());
        }
    };
    let inputs = GuestInputs {
        repos: &snaps.mounts,
        revisions: &BTreeMap::new(),
        profile: (&prep.profile_repo, &prep.profile_path),
        bundle: &bundle,
        key: Some((key.0.as_str(), key.1.as_str())),
        gentoo_binhost: req.gentoo_binhost,
        distdir: &distdir,
    };
    let result = install_in_guest(vm.guest(), target, &inputs, atoms, &prep.log_dir, reporter).await;
    server.stop().await;
    vm.stop(Shutdown::Quit, reporter).await?;
    let installed = match result {
        Ok(installed) => installed,
        Err(e) => {
            let _ = std::fs::remove_file(&overlay);
            return Err(e);
        }
    };
    if installed.is_empty() {
        let _ = std::fs::remove_file(&overlay);
        reporter.event(Event::Note { message: format!("{}: the base image has every build tool; unchanged", target.name) });
        return Ok(ImageUpdate { installed });
    }
    let disk = paths.image.join("disk.qcow2");
    let new = paths.image.join(".disk.qcow2.new");
    reporter.event(Event::Note { message: format!("{}: writing the updated base image {}", target.name, disk.display()) });
    crate::process::Cmd::new("qemu-img")
        .args(["convert", "-O", "qcow2"])
        .arg(&overlay)
        .arg(&new)
        .install_hint("qemu-utils (Debian) or app-emulation/qemu (Gentoo)")
        .output()?;
    // Running guests' overlays keep the old file open by descriptor; later ones chain to the new.
    std::fs::rename(&new, &disk).map_err(|source| BuildError::Io(crate::util::fs::PathError { doing: "replace", path: disk.clone(), source }))?;
    let _ = std::fs::remove_file(&overlay);
    record_update(&paths.image, &installed)?;
    Ok(ImageUpdate { installed })
}

/// Appends one line per update to `image.toml`'s `updates` (what was installed, when).
fn record_update(image: &Path, installed: &[String]) -> Result<(), BuildError> {
    let path = image.join("image.toml");
    let io = |source| BuildError::Io(crate::util::fs::PathError { doing: "update", path: path.clone(), source });
    let mut table: toml::Table = std::fs::read_to_string(&path).map_err(io)?.parse().unwrap_or_default();
    let now = crate::util::time::now_secs();
    let entry = toml::Value::String(format!("{now}: {}", installed.join(" ")));
    match table.get_mut("updates").and_then(|v| v.as_array_mut()) {
        Some(list) => list.push(entry),
        None => {
            table.insert("updates".into(), toml::Value::Array(vec![entry]));
        }
    }
    let tmp = image.join(".image.toml.new");
    std::fs::write(&tmp, toml::to_string_pretty(&table).unwrap_or_default()).map_err(|source| BuildError::Io(crate::util::fs::PathError { doing: "write", path: tmp.clone(), source }))?;
    std::fs::rename(&tmp, &path).map_err(io)?;
    Ok(())
}

async fn install_in_guest(
    guest: &Guest,
    target: &Target,
    inputs: &GuestInputs<'_>,
    atoms: &[String],
    log_dir: &Path,
    reporter: &dyn Reporter,
) -> Result<Vec<String>, BuildError> {
    // A base image without gpg cannot verify what it fetches, and gpg is what it is about to get:
    // that one bootstrap takes the host's own binhost on the host's loopback unverified (the host
    // signed and serves those files itself), and says so. Builds never do.
    let has_gpg = guest.exec_capture("command -v gpg").await?.status == 0;
    let inputs = &GuestInputs { key: inputs.key.filter(|_| has_gpg), ..*inputs };
    sync_guest(guest, target, inputs).await?;
    if !has_gpg {
        reporter.event(Event::Note {
            message: format!(
                "{}: the base image has no gpg; this update fetches from the host's own binhost on loopback without signature verification",
                target.name
            ),
        });
        guest.exec_ok("sed -i 's/^verify-signature = true$/verify-signature = false/' /etc/portage/binrepos.conf/dbh.conf").await?;
    }
    let wanted: Vec<String> = if atoms.is_empty() {
        let mut missing = Vec::new();
        for (atom, program) in BUILD_TOOLS {
            if guest.exec_capture(&format!("command -v {program}")).await?.status != 0 {
                missing.push((*atom).to_owned());
            } else {
                reporter.event(Event::Note { message: format!("{}: the image has {program}; {atom} is not installed again", target.name) });
            }
        }
        missing
    } else {
        atoms.to_vec()
    };
    if !wanted.is_empty() {
        let mut args: Vec<String> = ["emerge", "--getbinpkgonly", "--noreplace", "--color=n", "--quiet-build=n"].map(String::from).into();
        args.extend(wanted.iter().cloned());
        let command = format!("{} 2>&1", shell_join(&args));
        let task = format!("image-update:{}", target.name);
        let mut follower = Follower::new(task, format!("emerge into the {} base image", target.name), &log_dir.join("emerge.log"), &command, false)?;
        reporter.event(Event::Note { message: format!("{}: {}", target.name, shell_join(&args)) });
        let status = guest.exec(&command, |_, line| follower.line(line, reporter)).await?;
        let (_, tail) = follower.finish(i64::from(status), reporter);
        if status != 0 {
            return Err(BuildError::EmergeFailed { target: target.name.clone(), status, tail });
        }
    }
    // The base image keeps the installed packages, not the build's inputs: the snapshots are
    // unmounted and their mount points go.
    let repos: Vec<String> = inputs
        .repos
        .iter()
        .map(|(_, n)| {
            let dir = shell_quote(&format!("/var/db/repos/{n}"));
            format!("{{ umount {dir} 2>/dev/null; rmdir {dir}; }} &&")
        })
        .collect();
    guest
        .exec_ok(&format!(
            "{} rm -rf {GUEST_PKGDIR}/* && cd /etc/portage && {{ [ ! -e make.conf.dbh-base ] || mv -f make.conf.dbh-base make.conf; }} \
             && rm -f repos.conf/50-dbh-host.conf repos.conf/zz-dbh.conf sets/{WORLD_SET} package.use/dbh package.accept_keywords/dbh \
             && {RESTORE_MIRRORS} && {RESTORE_BINHOSTS} && sync",
            repos.join(" ")
        ))
        .await?;
    Ok(wanted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_parts_removes_only_what_a_dead_dbh_left() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // A pid that cannot be running: above the kernel's pid_max limit (2^22).
        let dead = format!(".a-1.tar.gz.{}{PART_SUFFIX}", (1u32 << 22) + 7);
        let mine = format!(".b-1.tar.gz.{}{PART_SUFFIX}", std::process::id());
        // pid 1 runs as long as the machine does.
        let alive = format!(".c-1.tar.gz.1{PART_SUFFIX}");
        let legacy = format!(".d-1.tar.gz{PART_SUFFIX}");
        for n in [&dead, &mine, &alive, &legacy, &"e-1.tar.gz".to_owned()] {
            std::fs::write(d.join(n), "x").unwrap();
        }
        sweep_parts(d);
        let left: std::collections::BTreeSet<String> = std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        let want: std::collections::BTreeSet<String> = [&mine, &alive, &legacy, &"e-1.tar.gz".to_owned()].into_iter().cloned().collect();
        assert_eq!(left, want, "a fresh pid-less leftover waits a day; distfiles are never touched");
        // A day-old pid-less leftover goes.
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(2 * 86_400);
        std::fs::File::options().write(true).open(d.join(&legacy)).unwrap().set_modified(old).unwrap();
        sweep_parts(d);
        assert!(!d.join(&legacy).exists() && d.join("e-1.tar.gz").exists());
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
    fn the_guest_listing_joins_sizes_and_checksums() {
        let text = "10 a/b/b-1-1.gpkg.tar\n20 a/c/c 1.tbz2\n7 a/d/d-1.xpak\n--\naa  ./a/b/b-1-1.gpkg.tar\nbb  ./a/c/c 1.tbz2\n";
        let l = parse_find_listing(text);
        assert_eq!(l.len(), 2, "{l:?}");
        assert_eq!(l["a/c/c 1.tbz2"], Listed { path: "a/c/c 1.tbz2".into(), size: 20, md5: "bb".into() });
        assert!(parse_find_listing("").is_empty());
    }

    /// The listing command run by a real shell on a real directory.
    #[test]
    fn the_listing_command_lists_binpkgs_only() {
        let dir = tempfile::tempdir().unwrap();
        let cmd = list_command().replace(&shell_quote(GUEST_PKGDIR), &shell_quote(&dir.path().to_string_lossy()));
        std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
        std::fs::write(dir.path().join("a/b/b-1-1.gpkg.tar"), "x").unwrap();
        std::fs::write(dir.path().join("a/b/.b-1-2.gpkg.tar"), "partial").unwrap();
        std::fs::write(dir.path().join("Packages"), "index").unwrap();
        let out = std::process::Command::new("sh").arg("-c").arg(&cmd).output().unwrap();
        assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
        let l = parse_find_listing(&String::from_utf8_lossy(&out.stdout));
        assert_eq!(l.keys().collect::<Vec<_>>(), ["a/b/b-1-1.gpkg.tar"]);
        assert_eq!(l["a/b/b-1-1.gpkg.tar"].md5, "9dd4e461268c8034f5c8564e155c67a6");
        assert_eq!(l["a/b/b-1-1.gpkg.tar"].size, 1);
    }

    #[test]
    fn serials_fit_virtio_blk() {
        assert_eq!(disk_serial(0, "gentoo"), "repo-gentoo");
        let long = disk_serial(3, "a-very-long-overlay-name");
        assert!(long.len() <= 20 && long.starts_with("repo3-"), "{long}");
    }

    /// The mount script run by a real shell: a disk that is not there is an error naming it.
    #[test]
    fn the_mount_script_parses_and_names_a_missing_disk() {
        let script = mount_script(&[("repo-nosuch-xyz".into(), "nosuch".into())]);
        let out = std::process::Command::new("sh").arg("-n").arg("-c").arg(&script).output().unwrap();
        assert!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(script.contains("m repo-nosuch-xyz /var/db/repos/nosuch"), "{script}");
    }

    #[test]
    fn the_bundle_holds_the_configuration_and_no_repository() {
        let home = tempfile::tempdir().unwrap();
        let home = Home::new(home.path());
        let config = PortageConfig::load_or_create(&home, "arm64").unwrap();
        let target = crate::target::Targets::builtin().get("arm64").unwrap().clone();
        let req = Request { jobs: 3, ..Default::default() };
        let url = "http://10.0.2.2:1234/arm64";
        let data = bundle(&target, &req, &["r".into()], &config, "r", Some(url), "http://10.0.2.2:1234").unwrap();
        let mut files = BTreeMap::new();
        for e in tar::Archive::new(&data[..]).entries().unwrap() {
            let mut e = e.unwrap();
            let mut text = String::new();
            std::io::Read::read_to_string(&mut e, &mut text).unwrap();
            files.insert(e.path().unwrap().to_string_lossy().into_owned(), text);
        }
        let names: Vec<&str> = files.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "etc/portage/binrepos.conf/dbh.conf",
                "etc/portage/make.conf.dbh-tail",
                "etc/portage/mirrors.dbh-tail",
                "etc/portage/package.accept_keywords/dbh",
                "etc/portage/package.use/dbh",
                "etc/portage/repos.conf/50-dbh-host.conf",
                "etc/portage/repos.conf/zz-dbh.conf",
                "etc/portage/sets/dbh-world",
            ]
        );
        assert!(files["etc/portage/make.conf.dbh-tail"].contains("MAKEOPTS=\"-j3\""));
        assert!(files["etc/portage/make.conf.dbh-tail"].contains("ACCEPT_LICENSE"));
        assert!(files["etc/portage/repos.conf/zz-dbh.conf"].contains("main-repo = r\n\n[r]\nlocation = /var/db/repos/r\nauto-sync = no\n"));
        let tail = &files["etc/portage/make.conf.dbh-tail"];
        assert!(!tail.contains("binpkg-ignore-signature"), "what comes from the binhost is verified:\n{tail}");
        assert!(tail.contains("PORTAGE_BINHOST=\"\""), "{tail}");
        assert!(!tail.contains("GENTOO_MIRRORS"), "the target's make.conf says which public mirrors:\n{tail}");
        assert_eq!(files["etc/portage/mirrors.dbh-tail"].lines().last(), Some("local http://10.0.2.2:1234"), "the host's distfiles are the local mirror");
        assert!(tail.contains("\nDISTDIR=\"/var/cache/distfiles\"\n"), "{tail}");
        let conf = &files["etc/portage/binrepos.conf/dbh.conf"];
        assert!(conf.contains("sync-uri = http://10.0.2.2:1234/arm64\n") && conf.contains("verify-signature = true\n"), "{conf}");
        // No binpkg ever goes into the bundle.
        assert!(!names.iter().any(|n| n.contains("binpkgs")), "{names:?}");
    }

    /// The binhost-disabling step run by a real shell on a fake /etc/portage.
    #[test]
    fn only_dbhs_binhost_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("etc/portage");
        std::fs::create_dir_all(etc.join("binrepos.conf")).unwrap();
        std::fs::write(etc.join("binrepos.conf/gentoobinhost.conf"), "[gentoobinhost]\nsync-uri = https://192.0.2.1/\n").unwrap();
        let script = ONLY_DBH_BINHOST.replace("/etc/portage", &etc.to_string_lossy());
        let out = std::process::Command::new("sh").arg("-c").arg(&script).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(!etc.join("binrepos.conf/gentoobinhost.conf").exists());
        assert!(etc.join("binrepos.conf.dbh-off/gentoobinhost.conf").is_file());
        // Twice (a warm guest) is fine, and so is an image without any.
        let out = std::process::Command::new("sh").arg("-c").arg(&script).output().unwrap();
        assert!(out.status.success());
    }

    #[test]
    fn update_asks_for_the_binpkg_checks() {
        let req = Request { update: true, atoms: vec!["@dbh-world".into()], ..Default::default() };
        let args = emerge_args(&req, true).join(" ");
        assert!(args.starts_with("emerge --buildpkg --usepkg --getbinpkg --update --deep --newuse --with-bdeps=y --binpkg-changed-deps=y --binpkg-respect-use=y --verbose"), "{args}");
        assert!(args.ends_with(" @dbh-world"), "{args}");
        let args = emerge_args(&Request::default(), false).join(" ");
        assert!(!args.contains("--getbinpkg") && !args.contains("--update"), "{args}");
        // The user's "from source" wins over dbh's binpkg options.
        let req = |extra: &[&str]| Request { emerge_args: extra.iter().map(|s| (*s).to_owned()).collect(), ..Default::default() };
        let args = emerge_args(&req(&["--usepkg=n"]), true).join(" ");
        assert!(args.starts_with("emerge --buildpkg --verbose") && args.ends_with(" --usepkg=n"), "{args}");
        let args = emerge_args(&req(&["--getbinpkg", "n"]), true).join(" ");
        assert!(args.starts_with("emerge --buildpkg --usepkg --verbose"), "{args}");
        let args = emerge_args(&req(&["--usepkg=n", "--usepkg=y"]), true).join(" ");
        assert!(args.starts_with("emerge --buildpkg --usepkg --getbinpkg --verbose"), "{args}");
        let args = emerge_args(&req(&["--usepkg-exclude", "a/b"]), true).join(" ");
        assert!(args.starts_with("emerge --buildpkg --usepkg --getbinpkg --verbose"), "{args}");
    }

    /// The sync step and its undo on a fake /etc/portage, run by a real shell: the image's own
    /// `mirrors` file (or none, or a directory) is followed by dbh's `local` line during the
    /// build, twice in a warm guest, and is the image's own again after `vm image update`.
    #[test]
    fn the_local_mirror_is_added_and_taken_back() {
        for own in [None, Some("local http://lan.example/gentoo\n"), Some("dir")] {
            let dir = tempfile::tempdir().unwrap();
            let etc = dir.path().join("etc/portage");
            std::fs::create_dir_all(&etc).unwrap();
            match own {
                Some("dir") => {
                    std::fs::create_dir_all(etc.join("mirrors")).unwrap();
                    std::fs::write(etc.join("mirrors/lan"), "gentoo http://lan.example/\n").unwrap();
                }
                Some(text) => std::fs::write(etc.join("mirrors"), text).unwrap(),
                None => {}
            }
            let sh = |script: &str| {
                let out = std::process::Command::new("sh").arg("-c").arg(script).current_dir(&etc).output().unwrap();
                assert!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr));
            };
            // SYNC_SCRIPT without its tar step (the bundle's files written here instead).
            let sync = SYNC_SCRIPT.replacen("tar -C / -xf - && cd /etc/portage", "true", 1);
            for _ in 0..2 {
                std::fs::write(etc.join("make.conf.dbh-tail"), "X=1\n").unwrap();
                std::fs::write(etc.join("mirrors.dbh-tail"), "local http://10.0.2.2:1\n").unwrap();
                sh(&sync);
                let ours = if own == Some("dir") { etc.join("mirrors/zz-dbh") } else { etc.join("mirrors") };
                let text = std::fs::read_to_string(&ours).unwrap();
                assert!(text.ends_with("local http://10.0.2.2:1\n"), "{text}");
                if let Some(t) = own.filter(|o| *o != "dir") {
                    assert_eq!(text.matches(t).count(), 1, "the image's own lines once, then dbh's: {text}");
                }
            }
            sh(RESTORE_MIRRORS);
            match own {
                None => assert!(!etc.join("mirrors").exists()),
                Some("dir") => {
                    assert!(!etc.join("mirrors/zz-dbh").exists());
                    assert!(etc.join("mirrors/lan").is_file());
                }
                Some(text) => assert_eq!(std::fs::read_to_string(etc.join("mirrors")).unwrap(), text),
            }
            assert!(!etc.join("mirrors.dbh-base").exists() || own == Some("dir"));
        }
    }

    /// The base image gets its own binhosts back after `vm image update`: a stage3's
    /// `binrepos.conf/gentoobinhost.conf`, and an old-style `binrepos.conf` file.
    #[test]
    fn image_update_restores_the_images_binhosts() {
        for file_style in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let etc = dir.path().join("etc/portage");
            let own = if file_style { etc.join("binrepos.conf") } else { etc.join("binrepos.conf/gentoobinhost.conf") };
            std::fs::create_dir_all(own.parent().unwrap()).unwrap();
            std::fs::write(&own, "[gentoobinhost]\nsync-uri = https://192.0.2.1/\n").unwrap();
            let off = ONLY_DBH_BINHOST.replace("/etc/portage", &etc.to_string_lossy());
            let sh = |script: &str| {
                let out = std::process::Command::new("sh").arg("-c").arg(script).current_dir(&etc).output().unwrap();
                assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            };
            sh(&off);
            std::fs::create_dir_all(etc.join("binrepos.conf")).unwrap();
            std::fs::write(etc.join("binrepos.conf/dbh.conf"), "[dbh-arm64]\n").unwrap();
            sh(RESTORE_BINHOSTS);
            assert!(own.is_file(), "{own:?} is back");
            assert!(!etc.join("binrepos.conf.dbh-off").exists() && !etc.join("binrepos.conf/dbh.conf").exists());
        }
    }
}

