//! The VM runner against real QEMU guests (arm64 under TCG).
//!
//! Guest images:
//! - the product's: `dbh vm image create` from the Debian-based arm64 test stage served over HTTP
//!   (`super::image::image_home`), for the shared guest, exec through the CLI and host key pinning;
//! - a lab-style one: tests/it/vm_fixture/guest.sh builds a small guest in the contract's layout
//!   (busybox initramfs + dropbear, ext4 disk, pinned keys; UKI + ESP for arm64, kernel + initramfs
//!   for ppc64le's direct boot), cached in ~/.cache/dbh-tests/vm-<arch>-guest-<hash of the script>/.
//!   It boots in seconds and has what the lifecycle tests need: a disk variant without sshd, an init
//!   that ignores the ACPI power button, and ppc64le (no test stage exists for it).
//!
//! One product guest is booted once per test run and shared by the tests that only need *a* guest;
//! tests about the lifecycle boot their own. Every test checks that no QEMU process mentioning its
//! home directory is left.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use dbh::events::Silent;
use dbh::settings::Home;
use dbh::target::Targets;
use dbh::vm::{self, Shutdown, StartOptions, Vm, VmError};

use super::cli::dbh;

const SCRIPT: &str = include_str!("vm_fixture/guest.sh");

fn cache_root() -> PathBuf {
    std::env::var_os("DBH_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/dbh-tests"))
}

/// The cached arm64 guest image directory.
fn guest_image() -> PathBuf {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE.get_or_init(|| build_guest("arm64")).clone()
}

/// Builds (once, under a file lock so that parallel test processes build it once) the guest of a
/// Debian architecture.
fn build_guest(debian_arch: &str) -> PathBuf {
    use sha2::Digest;
    let hash = hex::encode(&sha2::Sha256::digest(SCRIPT.as_bytes())[..8]);
    let dir = cache_root().join(format!("vm-{debian_arch}-guest-{hash}"));
    let image = dir.join("image");
    std::fs::create_dir_all(&dir).unwrap();
    let lock = std::fs::File::create(dir.join("lock")).unwrap();
    lock_file(&lock);
    if !image.join(".done").exists() {
        let script = dir.join("guest.sh");
        std::fs::write(&script, SCRIPT).unwrap();
        let status = Command::new("sh")
            .arg(&script)
            .arg(debian_arch)
            .arg(&image)
            .arg(dir.join("work"))
            .stdin(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "building the {debian_arch} test guest failed");
        std::fs::write(image.join(".done"), "").unwrap();
    }
    image
}

pub(crate) fn lock_file(f: &std::fs::File) {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on an open descriptor.
    assert_eq!(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) }, 0);
}

/// A fresh $DBH_HOME whose images/arm64 links to the image made by `dbh vm image create` (falls
/// back to the lab-style guest where no test stage can be built); `host_key` replaces the pinned key.
pub(crate) fn product_home(host_key: Option<&str>) -> tempfile::TempDir {
    let Some(made) = super::image::image_home("arm64") else {
        eprintln!("no arm64 test stage here; using the lab-style guest");
        return home_with("disk.qcow2", host_key);
    };
    let image = made.join("images/arm64");
    let home = tempfile::Builder::new().prefix("dbh-vm-").tempdir().unwrap();
    let dir = home.path().join("images/arm64");
    std::fs::create_dir_all(dir.join("ssh")).unwrap();
    for entry in std::fs::read_dir(&image).unwrap().flatten() {
        let name = entry.file_name();
        if name != "run" && name != "ssh" {
            std::os::unix::fs::symlink(entry.path(), dir.join(&name)).unwrap();
        }
    }
    for f in ["id_ed25519", "id_ed25519.pub", "host_ed25519_key.pub"] {
        std::os::unix::fs::symlink(image.join("ssh").join(f), dir.join("ssh").join(f)).unwrap();
    }
    if let Some(key) = host_key {
        std::fs::remove_file(dir.join("ssh/host_ed25519_key.pub")).unwrap();
        std::fs::write(dir.join("ssh/host_ed25519_key.pub"), key).unwrap();
    }
    home
}

/// The pinned host key of the image under `home`.
fn pinned_key(home: &Path) -> String {
    std::fs::read_to_string(std::fs::canonicalize(home.join("images/arm64/ssh/host_ed25519_key.pub")).unwrap()).unwrap()
}

/// A fresh $DBH_HOME whose images/arm64 links to the cached lab-style image; `disk` picks the disk
/// variant, `host_key` replaces the pinned host key.
fn home_with(disk: &str, host_key: Option<&str>) -> tempfile::TempDir {
    let image = guest_image();
    let home = tempfile::Builder::new().prefix("dbh-vm-").tempdir().unwrap();
    let dir = home.path().join("images/arm64");
    std::fs::create_dir_all(dir.join("ssh")).unwrap();
    for f in ["esp.img", "uki.efi", "image.toml", "ssh/id_ed25519", "ssh/id_ed25519.pub", "ssh/host_ed25519_key.pub"] {
        std::os::unix::fs::symlink(image.join(f), dir.join(f)).unwrap();
    }
    std::os::unix::fs::symlink(image.join(disk), dir.join("disk.qcow2")).unwrap();
    if let Some(key) = host_key {
        std::fs::remove_file(dir.join("ssh/host_ed25519_key.pub")).unwrap();
        std::fs::write(dir.join("ssh/host_ed25519_key.pub"), key).unwrap();
    }
    home
}

/// QEMU processes whose command line mentions `home`.
fn qemu_processes(home: &Path) -> Vec<u32> {
    let needle = home.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.starts_with("qemu-system") && cmdline.contains(&needle) {
            found.push(pid);
        }
    }
    found
}

pub(crate) fn assert_no_qemu(home: &Path) {
    // A SIGKILLed QEMU may take a moment to be reaped.
    let until = Instant::now() + Duration::from_secs(5);
    while !qemu_processes(home).is_empty() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(qemu_processes(home), Vec::<u32>::new(), "QEMU left running for {}", home.display());
}

fn arm64() -> dbh::target::Target {
    Targets::builtin().get("arm64").unwrap().clone()
}

/// The guest shared by the tests that only need a running guest: booted once on a runtime whose
/// worker threads live as long as the test process, so QEMU (PR_SET_PDEATHSIG) dies with it.
struct Shared {
    rt: tokio::runtime::Runtime,
    home: tempfile::TempDir,
    vm: Vm,
}

fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let home = product_home(None);
        let h = Home::new(home.path());
        let vm = rt
            .block_on(rt.spawn(async move { Vm::start(&h, &arm64(), &StartOptions::default(), &Silent).await }))
            .unwrap()
            .expect("the shared arm64 guest boots");
        Shared { rt, home, vm }
    })
}

#[test]
fn exec_prints_uname_of_a_throw_away_guest_and_leaves_no_qemu() {
    let home = product_home(None);
    let out = dbh()
        .arg("--home")
        .arg(home.path())
        .args(["vm", "exec", "--target", "arm64", "--", "uname", "-m"])
        .env("XDG_CONFIG_HOME", home.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "aarch64\n");
    assert_no_qemu(home.path());
    assert!(!home.path().join("images/arm64/run/state.json").exists());
}

#[test]
fn exec_passes_output_and_status_of_the_running_guest_through() {
    let s = shared();
    let out = dbh()
        .arg("--home")
        .arg(s.home.path())
        .args(["vm", "exec", "--target", "arm64", "--", "sh", "-c", "echo to-out; echo to-err >&2; exit 7"])
        .env("XDG_CONFIG_HOME", s.home.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "to-out\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("to-err"));
    // It used the running guest: still exactly one QEMU for this home.
    assert_eq!(qemu_processes(s.home.path()), vec![s.vm.state().pid]);
}

#[test]
fn guest_api_streams_lines_moves_files_and_multiplexes_channels() {
    let s = shared();
    let guest = s.vm.guest();
    s.rt.block_on(async {
        let mut lines = Vec::new();
        let status = guest
            .exec("echo one; echo two >&2; printf 'three'; exit 3", |stream, line| lines.push((stream, line.to_owned())))
            .await
            .unwrap();
        assert_eq!(status, 3);
        use dbh::process::Stream::*;
        lines.sort_by_key(|(s, l)| (*s == Stderr, l.clone()));
        assert_eq!(lines, vec![(Stdout, "one".into()), (Stdout, "three".into()), (Stderr, "two".into())]);

        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        guest.upload_bytes(&data, "/tmp/blob", 0o640).await.unwrap();
        let stat = guest.exec_ok("stat -c '%a %s' /tmp/blob").await.unwrap();
        assert_eq!(stat.stdout_str().trim(), "640 300000");
        let dir = tempfile::tempdir().unwrap();
        guest.download("/tmp/blob", &dir.path().join("back")).await.unwrap();
        assert_eq!(std::fs::read(dir.path().join("back")).unwrap(), data);
        let missing = guest.download("/no/such/file", &dir.path().join("x")).await.unwrap_err();
        assert!(missing.to_string().contains("cat /no/such/file"), "{missing}");

        // Three commands at once over the one connection.
        let (a, b, c) = tokio::join!(
            guest.exec_capture("sleep 1; echo a"),
            guest.exec_capture("sleep 1; echo b"),
            guest.exec_capture("echo c")
        );
        assert_eq!(a.unwrap().stdout_str() + &b.unwrap().stdout_str() + &c.unwrap().stdout_str(), "a\nb\nc\n");
    });
}

#[test]
fn status_reports_the_running_guest() {
    let s = shared();
    let out = dbh()
        .arg("--home")
        .arg(s.home.path())
        .args(["vm", "status", "--target", "arm64"])
        .env("XDG_CONFIG_HOME", s.home.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("arm64: running"), "{text}");
    assert!(text.contains(&format!("pid: {}", s.vm.state().pid)), "{text}");
    assert!(text.contains(&format!("ssh: 127.0.0.1:{}", s.vm.state().ssh_port)), "{text}");
}

#[test]
fn a_guest_without_sshd_times_out_naming_the_wait_and_the_console() {
    let home = home_with("disk-nossh.qcow2", None);
    let h = Home::new(home.path());
    let opts = StartOptions { boot_deadline: Some(Duration::from_secs(25)), ..Default::default() };
    let started = Instant::now();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let err = rt.block_on(Vm::start(&h, &arm64(), &opts, &Silent)).unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(40), "took {:?}", started.elapsed());
    let text = err.to_string();
    assert!(matches!(err, VmError::Timeout { .. }), "{text}");
    assert!(text.starts_with("timed out after 25s waiting for the arm64 guest's SSH server"), "{text}");
    assert!(text.contains("last console lines:") && text.contains("dbh-guest: sshd disabled by /nossh"), "{text}");
    assert_no_qemu(home.path());
}

#[test]
fn a_guest_whose_host_key_differs_from_the_pinned_one_is_refused() {
    let other = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl other\n";
    let home = product_home(Some(other));
    let h = Home::new(home.path());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let err = rt.block_on(Vm::start(&h, &arm64(), &StartOptions::default(), &Silent)).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("has host key SHA256:"), "{text}");
    assert!(text.contains("but the image pins SHA256:"), "{text}");
    let real = ssh_key_fingerprint(&pinned_key(product_home(None).path()));
    assert!(text.contains(&real), "the error should name the guest's real key {real}: {text}");
    assert_no_qemu(home.path());
}

fn ssh_key_fingerprint(public: &str) -> String {
    let key = russh::keys::parse_public_key_base64(public.split_whitespace().nth(1).unwrap()).unwrap();
    key.fingerprint(russh::keys::HashAlg::Sha256).to_string()
}

#[test]
fn start_status_second_start_and_stop_of_a_guest_that_ignores_powerdown() {
    let home = home_with("disk.qcow2", None);
    let run = |args: &[&str]| {
        dbh()
            .arg("--home")
            .arg(home.path())
            .args(args)
            .env("XDG_CONFIG_HOME", home.path())
            .env("DBH_VM_POWERDOWN_TIMEOUT", "3")
            .output()
            .unwrap()
    };
    let started = run(&["vm", "start", "--target", "arm64"]);
    assert!(started.status.success(), "{}", String::from_utf8_lossy(&started.stderr));
    let text = String::from_utf8_lossy(&started.stdout);
    assert!(text.contains("SSH on 127.0.0.1:"), "{text}");
    // `dbh vm start` has exited; the detached guest still runs and answers.
    let pids = qemu_processes(home.path());
    assert_eq!(pids.len(), 1);
    let uname = run(&["vm", "exec", "--target", "arm64", "--", "uname", "-m"]);
    assert_eq!(String::from_utf8_lossy(&uname.stdout), "aarch64\n");

    let again = run(&["vm", "start", "--target", "arm64"]);
    assert_eq!(again.status.code(), Some(1));
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains(&format!("the arm64 guest is already running (pid {})", pids[0])), "{err}");

    // busybox init ignores the ACPI power button: stop must fall back to quit.
    let stopped = run(&["vm", "stop", "--target", "arm64"]);
    assert!(stopped.status.success(), "{}", String::from_utf8_lossy(&stopped.stderr));
    let notes = String::from_utf8_lossy(&stopped.stderr);
    assert!(notes.contains("did not power off within 3s; quitting QEMU"), "{notes}");
    assert_no_qemu(home.path());
    let status = run(&["vm", "status", "--target", "arm64"]);
    assert!(status.status.success());
    assert_eq!(String::from_utf8_lossy(&status.stdout), "arm64: not running\n");
    let stop_again = run(&["vm", "stop", "--target", "arm64"]);
    assert!(String::from_utf8_lossy(&stop_again.stderr).contains("is not running"));
}

#[test]
fn stop_kills_a_qemu_that_answers_neither_powerdown_nor_quit() {
    let home = home_with("disk.qcow2", None);
    let h = Home::new(home.path());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let vm = Vm::start(&h, &arm64(), &StartOptions::default(), &Silent).await.unwrap();
        let pid = vm.state().pid as i32;
        // A stopped QEMU accepts the QMP connection (the kernel does) but never answers.
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGSTOP).unwrap();
        let started = Instant::now();
        vm.stop(Shutdown::Powerdown(Duration::from_secs(2)), &Silent).await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(40), "{:?}", started.elapsed());
    });
    assert_no_qemu(home.path());
}

#[test]
fn qemu_dies_with_a_killed_dbh_and_its_stale_state_is_cleaned() {
    let home = home_with("disk.qcow2", None);
    let mut child = dbh()
        .arg("--home")
        .arg(home.path())
        .args(["-q", "vm", "exec", "--target", "arm64", "--", "sleep", "600"])
        .env("XDG_CONFIG_HOME", home.path())
        .spawn()
        .unwrap();
    let state = home.path().join("images/arm64/run/state.json");
    let until = Instant::now() + Duration::from_secs(120);
    while !(state.exists() && qemu_processes(home.path()).len() == 1) {
        assert!(Instant::now() < until, "the guest did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    child.wait().unwrap();
    assert_no_qemu(home.path());
    assert!(state.exists(), "a SIGKILLed dbh cannot clean up");
    let h = Home::new(home.path());
    // The kernel releases a dying QEMU's descriptors (the lock) just after its memory.
    let until = Instant::now() + Duration::from_secs(5);
    while vm::status(&h, "arm64").unwrap() != vm::Status::Stopped {
        assert!(Instant::now() < until, "the lock is still held: {:?}", vm::status(&h, "arm64"));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!state.exists(), "status cleans the stale state");
}

#[test]
fn sigterm_to_dbh_stops_its_guest() {
    let home = home_with("disk.qcow2", None);
    let child = dbh()
        .arg("--home")
        .arg(home.path())
        .args(["-q", "vm", "exec", "--target", "arm64", "--", "sleep", "600"])
        .env("XDG_CONFIG_HOME", home.path())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let state = home.path().join("images/arm64/run/state.json");
    let until = Instant::now() + Duration::from_secs(120);
    // Wait until the command runs in the guest (the SSH session exists), not only QEMU.
    while !(state.exists() && guest_runs(home.path(), "sleep 600")) {
        assert!(Instant::now() < until, "the guest did not start");
        std::thread::sleep(Duration::from_millis(250));
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("terminated; the guest was stopped"));
    assert_no_qemu(home.path());
    assert!(!state.exists());
}

/// Whether a process with `needle` in its command line runs in the guest of `home`.
fn guest_runs(home: &Path, needle: &str) -> bool {
    let out = dbh()
        .arg("--home")
        .arg(home)
        .args(["-q", "vm", "exec", "--target", "arm64", "--", "sh", "-c", "ps"])
        .env("XDG_CONFIG_HOME", home)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).contains(needle)
}

#[test]
fn ppc64le_boots_its_kernel_directly_and_answers() {
    let image = build_guest("ppc64el");
    let home = tempfile::Builder::new().prefix("dbh-vm-").tempdir().unwrap();
    let dir = home.path().join("images/ppc64le");
    std::fs::create_dir_all(dir.join("ssh")).unwrap();
    for f in ["disk.qcow2", "vmlinuz", "initrd.img", "cmdline", "ssh/id_ed25519", "ssh/host_ed25519_key.pub"] {
        std::os::unix::fs::symlink(image.join(f), dir.join(f)).unwrap();
    }
    let out = dbh()
        .arg("--home")
        .arg(home.path())
        .args(["vm", "exec", "--target", "ppc64le", "--", "uname", "-m"])
        .env("XDG_CONFIG_HOME", home.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ppc64le\n");
    let console = std::fs::read_to_string(dir.join("run/console.log")).unwrap();
    assert!(console.contains("dbh-guest: initramfs up on ppc64le"), "{console}");
    assert!(console.contains("root=LABEL=dbh-root"), "the direct-boot command line reaches the kernel: {console}");
    assert_no_qemu(home.path());
}

#[test]
fn vm_ssh_opens_a_shell_with_the_pinned_key() {
    let s = shared();
    let mut child = dbh()
        .arg("--home")
        .arg(s.home.path())
        .args(["vm", "ssh", "--target", "arm64"])
        .env("XDG_CONFIG_HOME", s.home.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"uname -m; exit 5\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "aarch64\n", "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(5));
    let known_hosts = std::fs::read_to_string(s.home.path().join("images/arm64/run/known_hosts")).unwrap();
    let pinned = pinned_key(s.home.path());
    assert!(known_hosts.contains(pinned.split_whitespace().nth(1).unwrap()), "{known_hosts}");
}

#[test]
fn boot_progress_is_reported_as_events() {
    let home = home_with("disk.qcow2", None);
    let h = Home::new(home.path());
    let events = dbh::events::Collector::default();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let vm = Vm::start(&h, &arm64(), &StartOptions::default(), &events).await.unwrap();
        vm.stop(Shutdown::Quit, &events).await.unwrap();
    });
    use dbh::events::{Event, Unit};
    let events = events.events.lock().unwrap().clone();
    assert!(
        events.iter().any(|e| matches!(e, Event::Start { task, unit: Unit::Spinner, .. } if task == "vm-boot-arm64")),
        "{events:?}"
    );
    assert!(
        // Which console lines are sampled depends on timing; that some are is the point.
        events.iter().any(|e| matches!(e, Event::Progress { message: Some(m), .. } if !m.trim().is_empty())),
        "console lines are shown while booting: {events:?}"
    );
    assert!(
        events.iter().any(|e| matches!(e, Event::Finish { message, .. } if message.contains("arm64 guest up in"))),
        "{events:?}"
    );
    assert_no_qemu(home.path());
}
