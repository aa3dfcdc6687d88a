//! distcc offload for guest builds (`dbh vm build --distcc`, setting `build.distcc`): the guest's
//! compile jobs run on the host's cross compiler (and on extra distcc hosts from `distcc.hosts`).
//!
//! This module owns the host `distccd` dbh starts for one build, the compiler whitelist it is given,
//! and the guest side: the masquerade directory Portage's `FEATURES=distcc` puts first in PATH, and
//! the make.conf lines. Nothing here is fatal: whatever keeps offload from working (no distccd, no
//! cross compiler, no distcc in the guest, the daemon unreachable) is said once as a warning and the
//! build goes on in the guest alone.
//!
//! - The daemon listens on 127.0.0.1 only, on a free port, `--allow 127.0.0.1/32`: QEMU's user-mode
//!   network (the VM runner's `-netdev user`) lets the guest reach the host's loopback as 10.0.2.2,
//!   and those connections arrive from 127.0.0.1, so nothing outside this host can use the daemon.
//! - distcc ≥ 3.3 refuses compiler names it does not know. The guest sends its Gentoo CHOST name
//!   (`aarch64-unknown-linux-gnu-gcc`), the host may only have a distribution triplet
//!   (`aarch64-linux-gnu-gcc`): a private directory holds symlinks named by the CHOST to the
//!   toolchain's compilers, and `DISTCC_CMDLIST` lists exactly those (distccd then maps the name it
//!   receives to the listed path and skips its /usr/lib/distcc whitelist), so the host's /usr is
//!   never touched.
//! - The daemon is its own process group (its preforked workers with it), killed on drop and by
//!   `PR_SET_PDEATHSIG` if dbh dies.

use std::io::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use super::BuildError;
use super::toolchain::{self, Toolchain};
use crate::events::{Event, Reporter};
use crate::guest::{Guest, shell_quote};
use crate::process::Cmd;
use crate::target::Target;

/// Where the guest reaches the host's loopback through QEMU's user-mode network.
pub const GUEST_HOST_ADDR: &str = "10.0.2.2";
/// How long a fresh distccd may take to accept connections.
pub const DISTCCD_START_DEADLINE: Duration = Duration::from_secs(10);
/// How long the guest may take to open a connection to the daemon.
const GUEST_CONNECT_TIMEOUT_SECS: u32 = 5;
/// Portage puts `/usr/lib/distcc/bin` (else `/usr/lib/distcc`) first in PATH for FEATURES=distcc.
pub const GUEST_MASQUERADE_DIR: &str = "/usr/lib/distcc/bin";
/// The guest's make.conf, which the distcc settings are appended to (later lines win).
const GUEST_MAKE_CONF: &str = "/etc/portage/make.conf";
/// Jobs assumed for an extra host given without `/N` (distcc's own default limit).
const DEFAULT_HOST_JOBS: u32 = 4;

/// What the user asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DistccOptions {
    /// The daemon program (setting `distcc.distccd`; default `distccd` on PATH).
    pub distccd: Option<PathBuf>,
    /// Jobs the host's distccd runs at once; `None` = the host's CPUs.
    pub jobs: Option<u32>,
    /// Extra distcc hosts in DISTCC_HOSTS syntax (`host/8`, `host:3632/4,lzo`): a pool of machines
    /// that have the target's `${CHOST}-gcc` whitelisted in their own distccd.
    pub hosts: Vec<String>,
}

/// The host side of one build's offload; dropping it stops the daemon.
#[derive(Debug)]
pub struct Offload {
    daemon: Option<Daemon>,
    /// The daemon's compiler directory (dropped after the daemon: fields drop in order).
    _dir: Option<tempfile::TempDir>,
    hosts: Vec<String>,
    warned: bool,
}

#[derive(Debug)]
struct Daemon {
    child: Child,
    port: u16,
    jobs: u32,
    log: PathBuf,
    toolchain: Toolchain,
    host_version: Option<String>,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let pgid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGTERM);
        let until = Instant::now() + Duration::from_secs(2);
        while Instant::now() < until {
            if let Ok(Some(_)) = self.child.try_wait() {
                // The workers got the same signal; SIGKILL any that linger.
                let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// One extra host's job count: the `/N` of `host[:port]/N[,opts]`.
pub fn host_jobs(spec: &str) -> u32 {
    spec.split_once('/')
        .and_then(|(_, rest)| rest.split(',').next())
        .and_then(|n| n.trim().parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(DEFAULT_HOST_JOBS)
}

/// The make.conf block for the guest: FEATURES=distcc, DISTCC_HOSTS, MAKEOPTS raised to the remote
/// jobs. No `localhost` in the list: a TCG guest compiles 10–20× slower than the host, so a job kept
/// local would hold up the end of the build; distcc still compiles locally when no host answers.
/// `-network-sandbox`: the compile must reach the hosts, and the SOCKS proxy Portage offers a
/// sandboxed build (`DISTCC_SOCKS_PROXY`, a UNIX socket) is read only by Gentoo's patched distcc.
pub fn make_conf_lines(hosts: &[String], local_jobs: u32) -> String {
    let remote: u32 = hosts.iter().map(|h| host_jobs(h)).sum();
    // Preprocessing and linking stay in the guest: twice the remote slots keeps them all busy.
    let jobs = (2 * remote).max(local_jobs).max(1);
    format!(
        "# --- dbh: distcc offload ---\nFEATURES=\"${{FEATURES}} distcc -network-sandbox\"\nDISTCC_HOSTS=\"{}\"\nMAKEOPTS=\"-j{jobs}\"\n",
        hosts.join(" ")
    )
}

/// The guest-side script: checks what offload needs, writes the masquerade directory and prints
/// `key=value` lines (`missing=PROGRAM`, `version=GCC VERSION`, `reachable=HOST:PORT`, `ready=yes`).
/// Arguments: CHOST, then `HOST PORT` pairs to probe.
const GUEST_SCRIPT: &str = r#"
chost=$1; shift
dcc=$(command -v distcc) || { echo "missing=distcc"; exit 0; }
command -v "$chost-gcc" >/dev/null || { echo "missing=$chost-gcc"; exit 0; }
echo "version=$("$chost-gcc" -dumpfullversion 2>/dev/null || "$chost-gcc" -dumpversion)"
while [ $# -ge 2 ]; do
	if python3 -c 'import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=int(sys.argv[3])).close()' "$1" "$2" "$TIMEOUT" 2>/dev/null; then
		echo "reachable=$1:$2"
	fi
	shift 2
done
d=$MASQ
mkdir -p "$d" || exit 1
# The CHOST-named masquerades send the full name; bare gcc/cc (and g++/c++) go through them.
for t in gcc g++; do
	command -v "$chost-$t" >/dev/null || continue
	ln -sfn "$dcc" "$d/$chost-$t"
done
printf '#!/bin/sh\nexec %s/%s-gcc "$@"\n' "$d" "$chost" > "$d/gcc"
cp "$d/gcc" "$d/cc"
if [ -e "$d/$chost-g++" ]; then
	printf '#!/bin/sh\nexec %s/%s-g++ "$@"\n' "$d" "$chost" > "$d/g++"
	cp "$d/g++" "$d/c++"
fi
chmod 0755 "$d"/*
echo "ready=yes"
"#;

impl Offload {
    /// Starts the host's distccd for `target` (never fails: a reason not to is reported once and
    /// the build goes on without the host's daemon). The daemon logs to `<log_dir>/distccd.log`.
    pub fn start(target: &Target, opts: &DistccOptions, log_dir: &Path, reporter: &dyn Reporter) -> Offload {
        let mut offload = Offload { daemon: None, _dir: None, hosts: opts.hosts.clone(), warned: false };
        match Daemon::start(target, opts, log_dir) {
            Ok((d, dir)) => {
                offload._dir = Some(dir);
                reporter.event(Event::Note {
                    message: format!(
                        "{}: distccd on 127.0.0.1:{} ({} jobs, {} as {}-gcc); log: {}",
                        target.name,
                        d.port,
                        d.jobs,
                        d.toolchain.gcc.display(),
                        target.chost,
                        d.log.display()
                    ),
                });
                offload.daemon = Some(d);
            }
            Err(reason) => {
                if offload.hosts.is_empty() {
                    offload.warn(reporter, &format!("{reason}; building in the guest alone"));
                } else {
                    offload.warn(reporter, &format!("{reason}; only the hosts of setting distcc.hosts take compile jobs"));
                }
            }
        }
        offload
    }

    /// The host's daemon port, when it runs.
    pub fn port(&self) -> Option<u16> {
        self.daemon.as_ref().map(|d| d.port)
    }

    /// The daemon's log, when it runs.
    pub fn log(&self) -> Option<&Path> {
        self.daemon.as_ref().map(|d| d.log.as_path())
    }

    fn warn(&mut self, reporter: &dyn Reporter, what: &str) {
        if !self.warned {
            self.warned = true;
            reporter.event(Event::Note { message: format!("warning: distcc offload: {what}") });
        }
    }

    /// Prepares the guest for offload: masquerade wrappers, and the [`make_conf_lines`] appended to
    /// its /etc/portage/make.conf — so call it after that file is written for this build. Returns
    /// whether offload is on; when it cannot work it says why (once per build) and changes nothing
    /// in make.conf.
    pub async fn configure_guest(&mut self, guest: &Guest, target: &Target, jobs: u32, reporter: &dyn Reporter) -> Result<bool, BuildError> {
        if self.daemon.is_none() && self.hosts.is_empty() {
            return Ok(false);
        }
        let mut probes = Vec::new();
        if let Some(d) = &self.daemon {
            probes.push((GUEST_HOST_ADDR.to_owned(), d.port));
        }
        let mut cmd = format!(
            "MASQ={} TIMEOUT={GUEST_CONNECT_TIMEOUT_SECS} sh -c {} dbh-distcc {}",
            GUEST_MASQUERADE_DIR,
            shell_quote(GUEST_SCRIPT),
            shell_quote(&target.chost)
        );
        for (host, port) in &probes {
            cmd.push_str(&format!(" {} {port}", shell_quote(host)));
        }
        let out = guest.exec_ok(&cmd).await?.stdout_str();
        let get = |key: &str| out.lines().find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('='))).map(str::to_owned);
        if let Some(missing) = get("missing") {
            self.warn(reporter, &format!("the {} guest has no `{missing}`; building in the guest alone", target.name));
            return Ok(false);
        }
        let mut hosts = Vec::new();
        if let Some(d) = &self.daemon {
            let addr = format!("{GUEST_HOST_ADDR}:{}", d.port);
            if out.lines().any(|l| l == format!("reachable={addr}")) {
                hosts.push(format!("{addr}/{}", d.jobs));
                if let (Some(guest_v), Some(host_v)) = (get("version"), d.host_version.as_deref())
                    && guest_v != host_v
                {
                    reporter.event(Event::Note {
                        message: format!(
                            "warning: the {} guest's {}-gcc is {guest_v} but the host's {} is {host_v}: objects compiled on the host may differ from local ones",
                            target.name,
                            target.chost,
                            d.toolchain.gcc.display()
                        ),
                    });
                }
            } else {
                let hint = if self.hosts.is_empty() { "building in the guest alone" } else { "only the hosts of setting distcc.hosts take compile jobs" };
                self.warn(reporter, &format!("the {} guest cannot reach the host's distccd at {addr}; {hint}", target.name));
            }
        }
        hosts.extend(self.hosts.iter().cloned());
        if hosts.is_empty() || get("ready").is_none() {
            return Ok(false);
        }
        let lines = make_conf_lines(&hosts, jobs);
        guest.exec_ok(&format!("printf '\\n%s' {} >> {GUEST_MAKE_CONF}", shell_quote(&lines))).await?;
        reporter.event(Event::Note { message: format!("{}: compile jobs go to {}", target.name, hosts.join(" ")) });
        Ok(true)
    }

    /// Stops the daemon and reports how many compile jobs it ran (`Event::Count distcc.jobs`).
    pub fn finish(mut self, reporter: &dyn Reporter) -> u64 {
        let Some(d) = self.daemon.take() else { return 0 };
        let log = d.log.clone();
        drop(d);
        let jobs = count_jobs(&std::fs::read_to_string(&log).unwrap_or_default());
        reporter.event(Event::Count { name: "distcc.jobs".into(), value: jobs });
        reporter.event(Event::Note { message: format!("distccd ran {jobs} compile job(s) for the guest (log: {})", log.display()) });
        jobs
    }
}

/// The compile jobs a distccd log shows as done (`COMPILE_OK` job summaries).
pub fn count_jobs(log: &str) -> u64 {
    log.lines().filter(|l| l.contains("(dcc_job_summary)") && l.contains(" COMPILE_OK ")).count() as u64
}

/// The host's compiler version as `gcc -dumpfullversion` prints it.
fn compiler_version(gcc: &Path) -> Option<String> {
    let out = Cmd::new(gcc).arg("-dumpfullversion").output().ok()?;
    let v = out.stdout_str().trim().to_owned();
    (!v.is_empty()).then_some(v)
}

impl Daemon {
    fn start(target: &Target, opts: &DistccOptions, log_dir: &Path) -> Result<(Daemon, tempfile::TempDir), String> {
        let toolchain = toolchain::find(target).map_err(|e| {
            let hint = crate::hint::Hint::hint(&e).map_or_else(String::new, |h| format!(" (hint: {h})"));
            format!("{e}{hint}")
        })?;
        let program = opts.distccd.clone().unwrap_or_else(|| PathBuf::from("distccd"));
        let Some(program) = crate::util::path::which(&program) else {
            return Err(format!(
                "`{}` is not installed on this host (install distcc: Debian `apt-get install distcc`, Gentoo `emerge sys-devel/distcc`)",
                program.display()
            ));
        };
        let jobs = opts.jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u32)).max(1);
        let dir = private_dir(target, &toolchain).map_err(|e| format!("cannot prepare distccd's compiler directory: {e}"))?;
        let log = log_dir.join("distccd.log");
        let host_version = compiler_version(&toolchain.gcc);
        let path = crate::util::path::prepend_to_path([dir.path().join("bin")]).map_err(|e| format!("cannot build distccd's PATH: {e}"))?;

        let mut last = String::new();
        // A free port can be taken between probing and distccd's bind: try a few.
        for _ in 0..3 {
            let port = crate::util::net::free_port().map_err(|e| format!("cannot find a free port on 127.0.0.1: {e}"))?;
            let cmd = Cmd::new(&program)
                .args(["--no-detach", "--daemon", "--log-stderr", "--log-level", "info", "--listen", "127.0.0.1"])
                .arg("--port")
                .arg(port.to_string())
                .args(["--allow", "127.0.0.1/32", "--jobs"])
                .arg(jobs.to_string())
                .env("PATH", &path)
                .env("DISTCC_CMDLIST", dir.path().join("cmdlist"))
                .env("DISTCC_CMDLIST_NUMWORDS", "1");
            // The log is dbh's descriptor: distccd drops root for its own user, who could not open
            // a file under $DBH_HOME.
            let file = fs_err::OpenOptions::new().create(true).append(true).open(&log).map_err(|e| e.to_string())?.into_parts().0;
            let mut command = cmd.std_command();
            command.stdin(Stdio::null()).stdout(file.try_clone().map_err(|e| e.to_string())?).stderr(file);
            command.process_group(0);
            crate::process::die_with_parent(&mut command, libc::SIGTERM);
            let child = command.spawn().map_err(|e| format!("cannot start `{}`: {e}", cmd.display()))?;
            let mut daemon = Daemon { child, port, jobs, log: log.clone(), toolchain: toolchain.clone(), host_version: host_version.clone() };
            match daemon.wait_ready() {
                Ok(()) => return Ok((daemon, dir)),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Waits until the daemon accepts connections; fails with its log tail when it exits first.
    fn wait_ready(&mut self) -> Result<(), String> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let until = Instant::now() + DISTCCD_START_DEADLINE;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "distccd exited ({status}) before accepting connections on {addr}; its log {} ends:\n{}",
                    self.log.display(),
                    crate::vm::tail_lines(&self.log, 10)
                ));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() > until {
                return Err(format!(
                    "timed out after {}s waiting for distccd to accept connections on {addr}",
                    DISTCCD_START_DEADLINE.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The names distccd accepts for `target`: the CHOST's, and the toolchain's own when they differ.
pub fn compiler_names(target: &Target, toolchain: &Toolchain) -> Vec<(String, PathBuf)> {
    let mut names = Vec::new();
    let mut triplets = vec![target.chost.clone()];
    if toolchain.triplet != target.chost {
        triplets.push(toolchain.triplet.clone());
    }
    for t in &triplets {
        names.push((format!("{t}-gcc"), toolchain.gcc.clone()));
        names.push((format!("{t}-cc"), toolchain.gcc.clone()));
        if let Some(gxx) = &toolchain.gxx {
            names.push((format!("{t}-g++"), gxx.clone()));
            names.push((format!("{t}-c++"), gxx.clone()));
        }
    }
    names
}

/// A world-readable temporary directory: `bin/<name>` symlinks to the toolchain and `cmdlist`
/// naming exactly them (distccd's workers run as its own user and must read both).
fn private_dir(target: &Target, toolchain: &Toolchain) -> std::io::Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new().prefix("dbh-distccd-").tempdir()?;
    let bin = dir.path().join("bin");
    fs_err::create_dir(&bin)?;
    let mut list = Vec::new();
    for (name, real) in compiler_names(target, toolchain) {
        let link = bin.join(&name);
        std::os::unix::fs::symlink(&real, &link)?;
        writeln!(list, "{}", link.display())?;
    }
    fs_err::write(dir.path().join("cmdlist"), list)?;
    for p in [dir.path(), bin.as_path()] {
        fs_err::set_permissions(p, std::fs::Permissions::from_mode(0o755))?;
    }
    fs_err::set_permissions(dir.path().join("cmdlist"), std::fs::Permissions::from_mode(0o644))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::Targets;

    fn notes(c: &crate::events::Collector) -> Vec<String> {
        c.events
            .lock()
            .unwrap()
            .iter()
            .filter_map(|e| match e {
                Event::Note { message } => Some(message.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_missing_daemon_is_one_warning_not_an_error() {
        let targets = Targets::builtin();
        let logs = tempfile::tempdir().unwrap();
        let events = crate::events::Collector::default();
        let opts = DistccOptions { distccd: Some("/nonexistent/distccd".into()), ..Default::default() };
        let offload = Offload::start(targets.get("arm64").unwrap(), &opts, logs.path(), &events);
        assert_eq!(offload.port(), None);
        let notes = notes(&events);
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].starts_with("warning: distcc offload: "), "{notes:?}");
        assert!(notes[0].ends_with("building in the guest alone"), "{notes:?}");
        assert_eq!(offload.finish(&events), 0);
    }

    #[test]
    fn the_daemon_accepts_connections_and_is_gone_after_finish() {
        let targets = Targets::builtin();
        let arm64 = targets.get("arm64").unwrap();
        if crate::util::path::which("distccd").is_none() || toolchain::find(arm64).is_err() {
            eprintln!("no distccd or no aarch64 cross gcc here; skipping");
            return;
        }
        let logs = tempfile::tempdir().unwrap();
        let events = crate::events::Collector::default();
        let offload = Offload::start(arm64, &DistccOptions { jobs: Some(1), ..Default::default() }, logs.path(), &events);
        let port = offload.port().unwrap_or_else(|| panic!("{:?}", notes(&events)));
        let pid = offload.daemon.as_ref().unwrap().child.id();
        TcpStream::connect(("127.0.0.1", port)).unwrap();
        assert_eq!(offload.finish(&events), 0);
        assert!(!Path::new(&format!("/proc/{pid}")).exists() || std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap().contains(") Z"));
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err(), "the daemon still listens");
        assert!(std::fs::read_to_string(logs.path().join("distccd.log")).unwrap().contains("listening on 127.0.0.1"));
    }

    #[test]
    fn host_jobs_come_from_the_slash_suffix() {
        assert_eq!(host_jobs("10.0.2.2:4000/8"), 8);
        assert_eq!(host_jobs("builder/6,lzo"), 6);
        assert_eq!(host_jobs("builder"), DEFAULT_HOST_JOBS);
        assert_eq!(host_jobs("builder/0"), DEFAULT_HOST_JOBS);
    }

    #[test]
    fn make_conf_raises_makeopts_to_twice_the_remote_slots() {
        let text = make_conf_lines(&["10.0.2.2:4000/2".into(), "big/8".into()], 1);
        assert!(text.contains("FEATURES=\"${FEATURES} distcc -network-sandbox\""), "{text}");
        assert!(text.contains("DISTCC_HOSTS=\"10.0.2.2:4000/2 big/8\""), "{text}");
        assert!(text.contains("MAKEOPTS=\"-j20\""), "{text}");
        assert!(make_conf_lines(&["h/1".into()], 6).contains("MAKEOPTS=\"-j6\""));
    }

    #[test]
    fn job_summaries_are_counted() {
        let log = "distccd[1] (dcc_job_summary) client: 127.0.0.1:5 COMPILE_OK exit:0 sig:0 core:0 ret:0 time:24ms /x/aarch64-unknown-linux-gnu-gcc u1.c\n\
                   distccd[1] (dcc_job_summary) client: 127.0.0.1:6 OTHER exit:0 sig:0 core:0 ret:108 time:0ms\n\
                   distccd[2] (dcc_job_summary) client: 127.0.0.1:7 COMPILE_OK exit:0 sig:0 core:0 ret:0 time:9ms /x/aarch64-unknown-linux-gnu-gcc u2.c\n";
        assert_eq!(count_jobs(log), 2);
    }

    #[test]
    fn the_whitelist_maps_chost_names_to_the_distribution_toolchain() {
        let targets = Targets::builtin();
        let arm64 = targets.get("arm64").unwrap();
        let tc = Toolchain { triplet: "aarch64-linux-gnu".into(), gcc: "/usr/bin/aarch64-linux-gnu-gcc".into(), gxx: None };
        let dir = private_dir(arm64, &tc).unwrap();
        let list = std::fs::read_to_string(dir.path().join("cmdlist")).unwrap();
        let names: Vec<&str> = list.lines().map(|l| l.rsplit('/').next().unwrap()).collect();
        assert_eq!(names, ["aarch64-unknown-linux-gnu-gcc", "aarch64-unknown-linux-gnu-cc", "aarch64-linux-gnu-gcc", "aarch64-linux-gnu-cc"]);
        let link = dir.path().join("bin/aarch64-unknown-linux-gnu-gcc");
        assert_eq!(std::fs::read_link(link).unwrap(), Path::new("/usr/bin/aarch64-linux-gnu-gcc"));
        let mode = std::fs::metadata(dir.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o755);
    }
}
