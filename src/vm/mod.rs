//! The VM runner: boots a target's guest image under QEMU, waits for its SSH server, stops it.
//!
//! It owns `$DBH_HOME/images/<target>/run/` (docs/vm-contract.md): `lock` (an flock held while a VM
//! runs — QEMU inherits the locked descriptor, so the lock lives exactly as long as the VM),
//! `state.json`, `qmp.sock`, `console.log`, `qemu.log` (QEMU's own stderr), `vars.fd` and
//! `overlay.qcow2`.
//!
//! QEMU never outlives dbh unless asked to: it runs in its own process group (a Ctrl-C at the
//! terminal reaches dbh, which then stops the guest), gets SIGKILL from the kernel if the dbh
//! thread that started it dies (`PR_SET_PDEATHSIG`), and [`Vm`]'s `Drop` kills its group. Only
//! `dbh vm start` starts a detached VM, recorded as such in `state.json` for `dbh vm stop`.

pub mod firmware;
pub mod qemu;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::hint::Hint;
use crate::events::{Event, Reporter, Unit};
use crate::guest::{Guest, GuestError, Keys};
use crate::process::{Cmd, ProcessError};
use crate::settings::Home;
use crate::target::Target;
use qemu::{Accel, Launch, QemuVersion};

/// Default deadline from QEMU's start to an SSH session, under TCG.
pub const BOOT_DEADLINE_TCG: Duration = Duration::from_secs(300);
/// Under KVM a guest that has not answered after this long will not.
pub const BOOT_DEADLINE_KVM: Duration = Duration::from_secs(120);
/// QEMU creates its QMP socket within milliseconds; 10 s covers a loaded host.
pub const QMP_DEADLINE: Duration = Duration::from_secs(10);
/// How long a guest gets to power itself off after ACPI power-button.
pub const POWERDOWN_DEADLINE: Duration = Duration::from_secs(20);
/// After `quit` or SIGKILL QEMU is gone within a second; this is the margin.
const EXIT_DEADLINE: Duration = Duration::from_secs(10);
/// Console lines shown with a timeout.
const CONSOLE_TAIL_LINES: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// SIGINT or SIGTERM arrived while a guest was in use; dropping the future killed it.
    #[error("{}; the guest was stopped", if *.signal == "SIGINT" { "interrupted" } else { "terminated" })]
    Interrupted { signal: &'static str },
    #[error("cannot catch {signal}")]
    CatchSignal {
        signal: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the {target} guest image is incomplete: {path} is missing")]
    ImageMissing { target: String, path: PathBuf },
    #[error("no UEFI firmware for target {target} ({arch}): no QEMU firmware descriptor fits and none of {} exists", .tried.join(", "))]
    FirmwareMissing { target: String, arch: String, tried: Vec<String> },
    #[error("target {target} boots its kernel directly and needs no firmware")]
    NoFirmwareNeeded { target: String },
    #[error("cannot tell the version of `{binary}` from `{output}`")]
    QemuVersionUnknown { binary: String, output: String },
    #[error("target {target} needs QEMU {needed} or newer, but `{binary}` is {found}")]
    QemuTooOld { target: String, binary: String, found: QemuVersion, needed: QemuVersion },
    #[error("the {target} guest is already running (pid {pid})")]
    AlreadyRunning { target: String, pid: u32 },
    #[error("the {target} guest is not running")]
    NotRunning { target: String },
    /// `output` is QEMU's stderr and the console tail, as [`tails`] renders them.
    #[error("QEMU for the {target} guest {how} before {waiting_for}{output}")]
    QemuExited { target: String, how: String, waiting_for: String, output: String },
    #[error("timed out after {}s waiting for {what}{}", .after.as_secs(), tails("", .console))]
    Timeout { what: String, after: Duration, console: String },
    #[error("QMP on {socket} failed while {doing}")]
    Qmp {
        socket: PathBuf,
        doing: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Io(#[from] crate::util::fs::PathError),
    #[error("no free TCP port on 127.0.0.1 for the guest's SSH")]
    NoPort(#[source] std::io::Error),
    #[error("{0}")]
    Process(#[from] ProcessError),
    #[error("{0}")]
    Guest(#[from] GuestError),
}

fn tails(stderr: &str, console: &str) -> String {
    let mut s = String::new();
    if !stderr.trim().is_empty() {
        s.push_str("; QEMU said:\n");
        s.push_str(&indent(stderr));
    }
    if console.trim().is_empty() {
        s.push_str("; the serial console stayed empty");
    } else {
        s.push_str(&format!("; last console lines:\n{}", indent(console)));
    }
    s
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n")
}

impl Hint for VmError {
    fn hint(&self) -> Option<String> {
        match self {
            VmError::ImageMissing { target, .. } => {
                Some(format!("make the image first: dbh vm image create --target {target} --stage STAGE"))
            }
            VmError::FirmwareMissing { arch, .. } => Some(firmware::package_hint(arch)),
            VmError::QemuTooOld { binary, .. } => Some(format!(
                "install a newer QEMU (Debian 12: `apt-get install -t bookworm-backports {}`), or override the \
                 target in $XDG_CONFIG_HOME/dbh/vm-images/",
                qemu::install_hint(binary).split(' ').next().unwrap_or("qemu-system-misc")
            )),
            VmError::AlreadyRunning { target, .. } => {
                Some(format!("use it (`dbh vm ssh --target {target}`) or stop it (`dbh vm stop --target {target}`)"))
            }
            VmError::NotRunning { target } => Some(format!("start it with `dbh vm start --target {target}`")),
            VmError::Timeout { .. } | VmError::QemuExited { .. } => {
                Some("the whole console log is in $DBH_HOME/images/<target>/run/console.log".into())
            }
            _ => None,
        }
    }
}

/// Races `fut` against SIGINT/SIGTERM; on a signal the future is dropped (a [`Vm`] in it is killed
/// by its `Drop`, so QEMU never outlives dbh) and the result says which signal it was.
pub async fn with_signals<F: std::future::Future>(fut: F) -> Result<F::Output, VmError> {
    use tokio::signal::unix::{SignalKind, signal};
    let catch = |kind, name| signal(kind).map_err(|source| VmError::CatchSignal { signal: name, source });
    let mut int = catch(SignalKind::interrupt(), "SIGINT")?;
    let mut term = catch(SignalKind::terminate(), "SIGTERM")?;
    tokio::select! {
        r = fut => Ok(r),
        _ = int.recv() => Err(VmError::Interrupted { signal: "SIGINT" }),
        _ = term.recv() => Err(VmError::Interrupted { signal: "SIGTERM" }),
    }
}

/// `run/state.json`: what another dbh needs to find and stop a running VM.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct State {
    pub target: String,
    pub pid: u32,
    pub pgid: u32,
    pub ssh_port: u16,
    pub qmp: PathBuf,
    /// Unix seconds.
    pub started: u64,
    /// Started by `dbh vm start`: nobody waits for it, `dbh vm stop` ends it.
    pub detached: bool,
    pub accel: Accel,
}

/// Which accelerator to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AccelChoice {
    /// KVM when the host can run the target natively and a probe guest works, else TCG.
    #[default]
    Auto,
    Tcg,
    Kvm,
}

#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// From QEMU's start to an SSH session; default [`BOOT_DEADLINE_TCG`] / [`BOOT_DEADLINE_KVM`].
    pub boot_deadline: Option<Duration>,
    /// Leave the VM running when this `Vm` is dropped and dbh exits (`dbh vm start`).
    pub detached: bool,
    pub accel: AccelChoice,
    /// Keep the previous run's overlay (the guest's changes) instead of a fresh one.
    pub keep_overlay: bool,
    /// Read-only disks to attach (repository snapshots, see [`crate::repo`]).
    pub disks: Vec<qemu::ReadOnlyDisk>,
    /// vCPUs [default: [`qemu::default_smp`]], capped by the target's `qemu.max_cpus`.
    pub cpus: Option<u32>,
    /// Guest RAM in MiB [default: the target file's `qemu.memory_mib`].
    pub memory_mib: Option<u32>,
    /// Attach a fresh sparse scratch disk of this many bytes (ext4, label [`SCRATCH_LABEL`]) for
    /// PORTAGE_TMPDIR; it is removed with the run's overlay.
    pub scratch_bytes: Option<u64>,
}

/// The scratch disk's filesystem label; the guest mounts `LABEL=dbh-scratch`.
pub const SCRATCH_LABEL: &str = "dbh-scratch";

/// How an image boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageBoot {
    /// The firmware boots `esp.img` (a UKI).
    Uki,
    /// The firmware boots `vmlinuz`'s own EFI stub, handed over by QEMU through fw_cfg.
    EfiKernel,
    /// No firmware: QEMU loads `vmlinuz` + `initrd.img`.
    Direct,
}

/// The image's boot path: `image.toml`'s `boot` when it says, else what its files are.
pub fn image_boot(target: &Target, image_dir: &Path) -> ImageBoot {
    if !target.is_uefi() {
        return ImageBoot::Direct;
    }
    let declared = std::fs::read_to_string(image_dir.join("image.toml"))
        .ok()
        .and_then(|t| t.parse::<toml::Table>().ok())
        .and_then(|t| t.get("boot").and_then(|b| b.as_str()).map(str::to_owned));
    match declared.as_deref() {
        Some(crate::image::BOOT_EFI_KERNEL) => ImageBoot::EfiKernel,
        Some(crate::image::BOOT_UKI) => ImageBoot::Uki,
        _ if !image_dir.join("esp.img").exists() && image_dir.join("vmlinuz").exists() => ImageBoot::EfiKernel,
        _ => ImageBoot::Uki,
    }
}

/// The files of a target's image and run directory.
#[derive(Debug, Clone)]
pub struct Paths {
    pub image: PathBuf,
    pub run: PathBuf,
}

impl Paths {
    pub fn new(home: &Home, target: &str) -> Paths {
        let image = home.images(target);
        Paths { run: image.join("run"), image }
    }
    pub fn lock(&self) -> PathBuf {
        self.run.join("lock")
    }
    pub fn state(&self) -> PathBuf {
        self.run.join("state.json")
    }
    pub fn console(&self) -> PathBuf {
        self.run.join("console.log")
    }
    pub fn qemu_log(&self) -> PathBuf {
        self.run.join("qemu.log")
    }
    pub fn qmp(&self) -> PathBuf {
        self.run.join("qmp.sock")
    }
    pub fn known_hosts(&self) -> PathBuf {
        self.run.join("known_hosts")
    }
}

fn io(doing: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> VmError {
    let path = path.to_owned();
    move |source| VmError::Io(crate::util::fs::PathError { doing, path, source })
}

/// The last `n` lines of a (console) file, without the terminal control noise.
pub fn tail_lines(path: &Path, n: usize) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<String> = text
        .split(['\n', '\r'])
        .map(|l| l.chars().filter(|c| !c.is_control() || *c == '\t').collect::<String>())
        .filter(|l| !l.trim().is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}


/// The flock on `run/lock`, held while a VM runs.
#[derive(Debug)]
struct Lock {
    file: File,
}

impl Lock {
    /// `Ok(None)` when another process holds it.
    fn try_acquire(path: &Path) -> Result<Option<Lock>, VmError> {
        use crate::util::fs as ufs;
        let file = ufs::open_lock_file(path).map_err(|e| VmError::Io(crate::util::fs::PathError { doing: "open", path: path.to_owned(), source: e }))?;
        match ufs::try_lock(&file, ufs::Lock::Exclusive) {
            Ok(true) => Ok(Some(Lock { file })),
            Ok(false) => Ok(None),
            Err(source) => Err(VmError::Io(crate::util::fs::PathError { doing: "lock", path: path.to_owned(), source })),
        }
    }
}

fn read_state(paths: &Paths) -> Option<State> {
    let text = std::fs::read_to_string(paths.state()).ok()?;
    serde_json::from_str(&text).ok()
}

fn remove_run_files(paths: &Paths) {
    for p in [paths.state(), paths.qmp()] {
        let _ = std::fs::remove_file(p);
    }
}

/// What `dbh vm status` reports.
#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    Running(State),
    Stopped,
}

/// Whether the target's VM runs, cleaning up after a dbh that was killed.
pub fn status(home: &Home, target: &str) -> Result<Status, VmError> {
    let paths = Paths::new(home, target);
    if !paths.run.is_dir() {
        return Ok(Status::Stopped);
    }
    match Lock::try_acquire(&paths.lock())? {
        Some(_lock) => {
            if paths.state().exists() {
                tracing::info!("removing the stale state of a VM that is gone ({})", paths.state().display());
                remove_run_files(&paths);
            }
            Ok(Status::Stopped)
        }
        None => match read_state(&paths) {
            Some(state) => Ok(Status::Running(state)),
            // Locked while a start is still writing its state.
            None => Ok(Status::Running(State {
                target: target.to_owned(),
                pid: 0,
                pgid: 0,
                ssh_port: 0,
                qmp: paths.qmp(),
                started: crate::util::time::now_secs(),
                detached: false,
                accel: Accel::Tcg,
            })),
        },
    }
}

/// A QEMU guest started by this process.
pub struct Vm {
    target: String,
    paths: Paths,
    child: Option<tokio::process::Child>,
    state: State,
    guest: Option<Guest>,
    _lock: Option<Lock>,
    keep_overlay: bool,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm").field("target", &self.target).field("state", &self.state).finish()
    }
}

/// How to end a VM.
#[derive(Debug, Clone, Copy)]
pub enum Shutdown {
    /// ACPI power button with this deadline, then QMP `quit`, then SIGKILL.
    Powerdown(Duration),
    /// QMP `quit` at once (a throw-away overlay has nothing worth syncing), then SIGKILL.
    Quit,
}

fn check_image(target: &Target, paths: &Paths) -> Result<ImageBoot, VmError> {
    let boot = image_boot(target, &paths.image);
    let mut needed = vec!["disk.qcow2", "ssh/id_ed25519", "ssh/host_ed25519_key.pub"];
    match boot {
        ImageBoot::Uki => needed.push("esp.img"),
        ImageBoot::EfiKernel | ImageBoot::Direct => needed.extend(["vmlinuz", "initrd.img", "cmdline"]),
    }
    for f in needed {
        let path = paths.image.join(f);
        if !path.exists() {
            return Err(VmError::ImageMissing { target: target.name.clone(), path });
        }
    }
    Ok(boot)
}


impl Vm {
    /// Boots the target's image and returns once an SSH session to it is established.
    pub async fn start(home: &Home, target: &Target, opts: &StartOptions, reporter: &dyn Reporter) -> Result<Vm, VmError> {
        let paths = Paths::new(home, &target.name);
        let boot = check_image(target, &paths)?;
        let version = qemu::check_version(target)?;
        let firmware = if target.is_uefi() { Some(firmware::find(target)?) } else { None };
        fs_err::create_dir_all(&paths.run).map_err(|e| VmError::Io(crate::util::fs::PathError { doing: "create", path: paths.run.clone(), source: e }))?;
        let lock = match Lock::try_acquire(&paths.lock())? {
            Some(lock) => lock,
            None => {
                let pid = read_state(&paths).map_or(0, |s| s.pid);
                return Err(VmError::AlreadyRunning { target: target.name.clone(), pid });
            }
        };
        if let Some(stale) = read_state(&paths) {
            reporter.event(Event::Note {
                message: format!(
                    "cleaned up after a {} VM whose dbh was killed (QEMU pid {} is gone)",
                    target.name, stale.pid
                ),
            });
            remove_run_files(&paths);
        }
        let accel = match opts.accel {
            AccelChoice::Tcg => Accel::Tcg,
            AccelChoice::Kvm => Accel::Kvm,
            AccelChoice::Auto if qemu::kvm_usable(target, &home.cache()) => Accel::Kvm,
            AccelChoice::Auto => Accel::Tcg,
        };
        let deadline = opts.boot_deadline.unwrap_or(match accel {
            Accel::Tcg => BOOT_DEADLINE_TCG,
            Accel::Kvm => BOOT_DEADLINE_KVM,
        });
        let cmdline = if boot == ImageBoot::Uki {
            None
        } else {
            let path = paths.image.join("cmdline");
            Some(fs_err::read_to_string(&path).map_err(io("read", &path))?.trim().to_owned())
        };
        let mut launch = Launch {
            image_dir: paths.image.clone(),
            run_dir: paths.run.clone(),
            firmware,
            accel,
            smp: qemu::smp_for(target, opts.cpus.unwrap_or_else(qemu::default_smp)),
            memory_mib: opts.memory_mib.unwrap_or(target.qemu.memory_mib),
            ssh_port: 0,
            version,
            cmdline,
            disks: opts.disks.clone(),
            scratch: None,
        };
        if opts.scratch_bytes.is_some() {
            launch.scratch = Some(launch.scratch_path());
        }
        prepare_run_files(target, &paths, &launch, opts.keep_overlay, opts.scratch_bytes)?;

        let task = format!("vm-boot-{}", target.name);
        reporter.event(Event::Start {
            task: task.clone(),
            label: format!("booting the {} guest ({accel})", target.name),
            total: None,
            unit: Unit::Spinner,
        });
        let started = Instant::now();
        // The port is free when probed; QEMU may still lose a race for it, then try another.
        let keys = Keys::in_image(&paths.image);
        let mut lock = Some(lock);
        let mut attempt = 0;
        loop {
            attempt += 1;
            launch.ssh_port = crate::util::net::free_port().map_err(VmError::NoPort)?;
            let child = spawn(target, &paths, &launch, lock.as_ref().expect("held until the end"), opts.detached)?;
            let pid = child.id().unwrap_or(0);
            let state = State {
                target: target.name.clone(),
                pid,
                pgid: pid,
                ssh_port: launch.ssh_port,
                qmp: paths.qmp(),
                started: crate::util::time::now_secs(),
                detached: opts.detached,
                accel,
            };
            let json = serde_json::to_string_pretty(&state).expect("state serialises");
            let mut vm = Vm {
                target: target.name.clone(),
                paths: paths.clone(),
                child: Some(child),
                state,
                guest: None,
                _lock: None,
                keep_overlay: opts.keep_overlay,
            };
            fs_err::write(paths.state(), json).map_err(io("write", &paths.state()))?;
            match vm.wait_for_ssh(deadline, started, &keys, reporter, &task).await {
                Ok(guest) => {
                    vm.guest = Some(guest);
                    vm._lock = lock.take();
                    reporter.event(Event::Finish {
                        task,
                        message: format!(
                            "{} guest up in {:.1}s ({} vCPUs, {} MiB{}), SSH on 127.0.0.1:{}",
                            target.name,
                            started.elapsed().as_secs_f64(),
                            launch.smp,
                            launch.memory_mib,
                            opts.scratch_bytes.map_or(String::new(), |b| format!(", {} GiB scratch", b >> 30)),
                            vm.state.ssh_port
                        ),
                    });
                    return Ok(vm);
                }
                Err(VmError::QemuExited { output, .. }) if attempt < 3 && output.contains("host forwarding") => {
                    tracing::info!("QEMU lost port {} to another program; trying another", launch.ssh_port);
                    vm.kill_now().await;
                    prepare_run_files(target, &paths, &launch, opts.keep_overlay, opts.scratch_bytes)?;
                }
                Err(e) => {
                    reporter.event(Event::Finish { task, message: format!("{} guest failed to boot", target.name) });
                    vm.kill_now().await;
                    return Err(e);
                }
            }
        }
    }

    async fn wait_for_ssh(
        &mut self,
        deadline: Duration,
        started: Instant,
        keys: &Keys,
        reporter: &dyn Reporter,
        task: &str,
    ) -> Result<Guest, VmError> {
        let what = format!("the {} guest's SSH server on 127.0.0.1:{} (its `SSH-` banner)", self.target, self.state.ssh_port);
        let mut last_line = String::new();
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                return Err(VmError::QemuExited {
                    target: self.target.clone(),
                    how: describe_exit(status),
                    waiting_for: what,
                    output: tails(
                        &tail_lines(&self.paths.qemu_log(), CONSOLE_TAIL_LINES),
                        &tail_lines(&self.paths.console(), CONSOLE_TAIL_LINES),
                    ),
                });
            }
            if started.elapsed() >= deadline {
                return Err(VmError::Timeout {
                    what,
                    after: deadline,
                    console: tail_lines(&self.paths.console(), CONSOLE_TAIL_LINES),
                });
            }
            let line = tail_lines(&self.paths.console(), 1);
            if line != last_line {
                reporter.event(Event::Progress {
                    task: task.to_owned(),
                    position: started.elapsed().as_secs(),
                    message: Some(line.chars().take(100).collect()),
                });
                last_line = line;
            }
            let left = deadline.saturating_sub(started.elapsed());
            let probe = crate::guest::probe_banner(self.state.ssh_port);
            if let Ok(Some(stream)) = tokio::time::timeout(left, probe).await {
                let left = deadline.saturating_sub(started.elapsed());
                // The probe's connection goes on as the SSH session: one sshd fork less under TCG.
                let connect = Guest::connect_stream(&self.target, self.state.ssh_port, keys, stream);
                match tokio::time::timeout(left, connect).await {
                    Ok(Ok(guest)) => return Ok(guest),
                    // The guest's sshd may drop early connections while it finishes starting.
                    Ok(Err(GuestError::Connect { .. })) => {}
                    Ok(Err(e)) => return Err(e.into()),
                    Err(_) => continue,
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The SSH session to the guest.
    pub fn guest(&self) -> &Guest {
        self.guest.as_ref().expect("a started Vm has a guest")
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn paths(&self) -> &Paths {
        &self.paths
    }

    /// Ends the VM and waits until QEMU has exited.
    pub async fn stop(mut self, how: Shutdown, reporter: &dyn Reporter) -> Result<(), VmError> {
        if let Some(guest) = self.guest.take() {
            guest.disconnect().await;
        }
        let mut child = self.child.take();
        let result = shut_down(&self.target, &self.state, &self.paths, how, reporter, child.as_mut()).await;
        self.cleanup();
        result
    }

    /// Leaves a detached VM running: the `Vm` is forgotten without killing QEMU.
    pub async fn release(mut self) {
        if let Some(guest) = self.guest.take() {
            guest.disconnect().await;
        }
        self.child = None;
        self._lock = None;
    }

    async fn kill_now(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_group(self.state.pgid);
            let _ = tokio::time::timeout(EXIT_DEADLINE, child.wait()).await;
        }
        self.cleanup();
    }

    fn cleanup(&mut self) {
        remove_run_files(&self.paths);
        if !self.keep_overlay {
            let _ = std::fs::remove_file(self.paths.run.join("overlay.qcow2"));
            let _ = std::fs::remove_file(self.paths.run.join("scratch.img"));
        }
        self._lock = None;
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_group(self.state.pgid);
            let until = Instant::now() + Duration::from_secs(5);
            while Instant::now() < until {
                if !matches!(child.try_wait(), Ok(None)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            remove_run_files(&self.paths);
        }
    }
}

fn describe_exit(status: std::process::ExitStatus) -> String {
    match crate::process::Termination::from_status(status) {
        None => "exited with status 0".into(),
        Some(t) => t.to_string(),
    }
}

fn kill_group(pgid: u32) {
    if pgid > 1 {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid as i32), nix::sys::signal::Signal::SIGKILL);
    }
}

fn prepare_run_files(
    target: &Target,
    paths: &Paths,
    launch: &Launch,
    keep_overlay: bool,
    scratch_bytes: Option<u64>,
) -> Result<(), VmError> {
    if let (Some(bytes), Some(scratch)) = (scratch_bytes, &launch.scratch)
        && !(keep_overlay && scratch.exists())
    {
        make_scratch(scratch, bytes)?;
    }
    let overlay = launch.overlay();
    if !(keep_overlay && overlay.exists()) {
        let _ = std::fs::remove_file(&overlay);
        let disk = std::path::absolute(paths.image.join("disk.qcow2")).unwrap_or_else(|_| paths.image.join("disk.qcow2"));
        Cmd::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-b"])
            .arg(&disk)
            .args(["-F", "qcow2"])
            .arg(&overlay)
            .install_hint("qemu-utils (Debian) or app-emulation/qemu (Gentoo)")
            .output()?;
    }
    if let Some(fw) = &launch.firmware
        && !(keep_overlay && launch.vars().exists())
    {
        fs_err::copy(&fw.vars, launch.vars()).map_err(io("copy the firmware variables to", &launch.vars()))?;
    }
    let _ = target;
    // Truncated so that the error tails show this boot only.
    fs_err::write(paths.console(), b"").map_err(io("write", &paths.console()))?;
    Ok(())
}

/// A sparse raw file with an empty ext4 on it, made on the host (the guest needs no mkfs): no
/// journal (a throw-away build tree needs none) and inode tables left uninitialised, which is safe
/// because a fresh sparse file reads as zeros (the guest mounts it with `noinit_itable`). Costs a
/// few MiB of real disk, whatever its size.
pub fn make_scratch(path: &Path, bytes: u64) -> Result<(), VmError> {
    let _ = std::fs::remove_file(path);
    let file = fs_err::File::create(path).map_err(io("create", path))?;
    file.set_len(bytes).map_err(io("size", path))?;
    drop(file);
    Cmd::new("mkfs.ext4")
        .args(["-q", "-F", "-L", SCRATCH_LABEL, "-m", "0", "-O", "^has_journal", "-E", "lazy_itable_init=1,nodiscard"])
        .arg(path)
        .install_hint("e2fsprogs (Debian) or sys-fs/e2fsprogs (Gentoo)")
        .output()?;
    Ok(())
}

/// Mounts the scratch disk on `dir` in the guest (for PORTAGE_TMPDIR's `portage/`); a guest without
/// one (an old image, `dbh vm start`) keeps its root filesystem.
pub fn mount_scratch_command(dir: &str) -> String {
    let d = crate::guest::shell_quote(dir);
    format!(
        "mkdir -p {d} && if ! mountpoint -q {d}; then mount -o noinit_itable,discard LABEL={SCRATCH_LABEL} {d}; fi && chmod 0775 {d} && \
         {{ chown portage:portage {d} 2>/dev/null || :; }}"
    )
}

fn spawn(target: &Target, paths: &Paths, launch: &Launch, lock: &Lock, detached: bool) -> Result<tokio::process::Child, VmError> {
    let cmd = Cmd::new(&target.qemu.binary)
        .args(qemu::argv(target, launch))
        .install_hint(qemu::install_hint(&target.qemu.binary));
    let log = fs_err::File::create(paths.qemu_log()).map_err(io("create", &paths.qemu_log()))?.into_parts().0;
    let mut command = cmd.tokio_command();
    command
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().map_err(io("open", &paths.qemu_log()))?)
        .stderr(log)
        .kill_on_drop(false);
    if !detached {
        // Its own group: a Ctrl-C at the terminal reaches dbh, which stops the guest properly.
        command.process_group(0);
    }
    let lock_fd = lock.file.as_raw_fd();
    // SAFETY: only async-signal-safe calls (fcntl, setsid) between fork and exec.
    unsafe {
        command.pre_exec(move || {
            // QEMU inherits the locked descriptor: the lock is held as long as QEMU lives.
            if libc::fcntl(lock_fd, libc::F_SETFD, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            // Its own session (and group): a closing terminal's SIGHUP does not reach it.
            if detached && libc::setsid() == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    if !detached {
        crate::process::die_with_parent(command.as_std_mut(), libc::SIGKILL);
    }
    command.spawn().map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            VmError::Process(ProcessError::NotFound {
                program: target.qemu.binary.clone(),
                install: Some(qemu::install_hint(&target.qemu.binary)),
            })
        } else {
            VmError::Process(ProcessError::Spawn { command: cmd.display(), source })
        }
    })
}

/// QMP client over the VM's socket.
type Qmp = qapi::futures::QapiStream<
    qapi::futures::QmpStreamTokio<tokio::io::ReadHalf<tokio::net::UnixStream>>,
    qapi::futures::QmpStreamTokio<tokio::io::WriteHalf<tokio::net::UnixStream>>,
>;

async fn qmp_connect(socket: &Path) -> Result<Qmp, VmError> {
    let err = |doing: &str| {
        let socket = socket.to_owned();
        let doing = doing.to_owned();
        move |source| VmError::Qmp { socket, doing, source }
    };
    let started = Instant::now();
    loop {
        match qapi::futures::QmpStreamTokio::open_uds(socket).await {
            Ok(negotiation) => {
                return tokio::time::timeout(QMP_DEADLINE, negotiation.negotiate())
                    .await
                    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))
                    .and_then(|r| r)
                    .map_err(err("negotiating capabilities"));
            }
            Err(e) if started.elapsed() < QMP_DEADLINE => {
                tracing::debug!("QMP {} not ready: {e}", socket.display());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(err("connecting")(e)),
        }
    }
}

async fn qmp_command<C>(qmp: &mut Qmp, socket: &Path, cmd: C, doing: &str) -> Result<(), VmError>
where
    C: qapi::qmp::QmpCommand + 'static,
{
    match tokio::time::timeout(QMP_DEADLINE, qmp.execute(cmd)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(VmError::Qmp {
            socket: socket.to_owned(),
            doing: doing.to_owned(),
            source: std::io::Error::other(e.to_string()),
        }),
        Err(_) => Err(VmError::Qmp {
            socket: socket.to_owned(),
            doing: doing.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::TimedOut, format!("no answer within {}s", QMP_DEADLINE.as_secs())),
        }),
    }
}

/// Waits for QEMU to exit: our child, or (another process's VM) until its pid is gone.
async fn wait_exit(child: Option<&mut tokio::process::Child>, pid: u32, deadline: Duration) -> bool {
    match child {
        Some(child) => tokio::time::timeout(deadline, child.wait()).await.is_ok(),
        None => {
            let until = Instant::now() + deadline;
            while Instant::now() < until {
                if !process_alive(pid) {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            !process_alive(pid)
        }
    }
}

/// A zombie counts as gone: it has exited and released its files (and the lock).
fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

async fn shut_down(
    target: &str,
    state: &State,
    paths: &Paths,
    how: Shutdown,
    reporter: &dyn Reporter,
    mut child: Option<&mut tokio::process::Child>,
) -> Result<(), VmError> {
    let qmp_path = &state.qmp;
    let mut qmp = match tokio::time::timeout(QMP_DEADLINE, qmp_connect(qmp_path)).await {
        Ok(Ok(q)) => Some(q),
        Ok(Err(e)) => {
            tracing::warn!("{e}; killing the {target} guest instead");
            None
        }
        Err(_) => None,
    };
    if let (Some(q), Shutdown::Powerdown(deadline)) = (qmp.as_mut(), how) {
        reporter.event(Event::Note { message: format!("asking the {target} guest to power off (ACPI)") });
        if qmp_command(q, qmp_path, qapi::qmp::system_powerdown {}, "sending system_powerdown").await.is_ok()
            && wait_exit(child.as_deref_mut(), state.pid, deadline).await
        {
            return Ok(());
        }
        reporter.event(Event::Note {
            message: format!("the {target} guest did not power off within {}s; quitting QEMU", deadline.as_secs()),
        });
    }
    if let Some(q) = qmp.as_mut() {
        // QEMU closes the socket as it quits: an EOF here is success.
        let _ = qmp_command(q, qmp_path, qapi::qmp::quit {}, "sending quit").await;
        if wait_exit(child.as_deref_mut(), state.pid, EXIT_DEADLINE).await {
            return Ok(());
        }
    }
    reporter.event(Event::Note { message: format!("killing QEMU of the {target} guest (pid {})", state.pid) });
    kill_group(state.pgid);
    if wait_exit(child, state.pid, EXIT_DEADLINE).await {
        Ok(())
    } else {
        Err(VmError::Timeout {
            what: format!("QEMU (pid {}) to exit after SIGKILL", state.pid),
            after: EXIT_DEADLINE,
            console: tail_lines(&paths.console(), CONSOLE_TAIL_LINES),
        })
    }
}

/// Stops the target's VM that another dbh process started (`dbh vm stop`).
pub async fn stop_running(home: &Home, target: &str, how: Shutdown, reporter: &dyn Reporter) -> Result<(), VmError> {
    let paths = Paths::new(home, target);
    let state = match status(home, target)? {
        Status::Stopped => return Err(VmError::NotRunning { target: target.to_owned() }),
        Status::Running(state) => state,
    };
    shut_down(target, &state, &paths, how, reporter, None).await?;
    // The lock frees once QEMU has exited and its starter (if attached) has let go.
    let until = Instant::now() + EXIT_DEADLINE;
    while Instant::now() < until {
        if let Some(_lock) = Lock::try_acquire(&paths.lock())? {
            remove_run_files(&paths);
            if state.detached {
                let _ = std::fs::remove_file(paths.run.join("overlay.qcow2"));
                let _ = std::fs::remove_file(paths.run.join("scratch.img"));
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Connects to the target's running VM (started by `dbh vm start` or another dbh).
pub async fn connect_running(home: &Home, target: &str) -> Result<(State, Guest), VmError> {
    let paths = Paths::new(home, target);
    match status(home, target)? {
        Status::Running(state) if state.ssh_port != 0 => {
            let guest = Guest::connect(target, state.ssh_port, &Keys::in_image(&paths.image)).await?;
            Ok((state, guest))
        }
        _ => Err(VmError::NotRunning { target: target.to_owned() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_tail_drops_control_noise() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.log");
        std::fs::write(&p, "a\r\n\x1b[2Jb\n\n c \r\nd").unwrap();
        assert_eq!(tail_lines(&p, 2), " c \nd");
        assert_eq!(tail_lines(&dir.path().join("none"), 5), "");
    }

    #[test]
    fn timeout_error_names_what_and_shows_console() {
        let err = VmError::Timeout { what: "the SSH banner".into(), after: Duration::from_secs(30), console: "x\ny".into() };
        assert_eq!(err.to_string(), "timed out after 30s waiting for the SSH banner; last console lines:\n    x\n    y");
    }

    #[test]
    fn status_of_a_fresh_home_is_stopped_and_stale_state_is_cleaned() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::new(dir.path());
        assert_eq!(status(&home, "arm64").unwrap(), Status::Stopped);
        let paths = Paths::new(&home, "arm64");
        std::fs::create_dir_all(&paths.run).unwrap();
        std::fs::write(paths.state(), "{}").unwrap();
        assert_eq!(status(&home, "arm64").unwrap(), Status::Stopped);
        assert!(!paths.state().exists());
    }

    #[test]
    fn a_held_lock_means_running() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::new(dir.path());
        let paths = Paths::new(&home, "arm64");
        std::fs::create_dir_all(&paths.run).unwrap();
        let state = State {
            target: "arm64".into(),
            pid: 42,
            pgid: 42,
            ssh_port: 2222,
            qmp: paths.qmp(),
            started: 1,
            detached: true,
            accel: Accel::Tcg,
        };
        std::fs::write(paths.state(), serde_json::to_string(&state).unwrap()).unwrap();
        // Another open file description: flock conflicts even within one process.
        let _held = Lock::try_acquire(&paths.lock()).unwrap().unwrap();
        assert_eq!(status(&home, "arm64").unwrap(), Status::Running(state));
        assert!(Lock::try_acquire(&paths.lock()).unwrap().is_none());
    }
}
