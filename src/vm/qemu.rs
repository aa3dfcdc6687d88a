//! The QEMU command line for a target, the QEMU version check and the KVM probe.
//!
//! [`argv`] is a pure function of the target, the paths and the run's choices (accelerator, ports,
//! QEMU version), so that every target's command line is pinned by a snapshot test.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::VmError;
use super::firmware::Firmware;
use crate::process::Cmd;
use crate::target::Target;

/// A QEMU release, from `qemu-system-X --version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct QemuVersion {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
}

impl std::fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

impl QemuVersion {
    /// Parses "8.1" or "10.0.2".
    pub fn parse(text: &str) -> Option<QemuVersion> {
        let mut parts = text.trim().split('.').map(|p| p.parse::<u32>());
        let major = parts.next()?.ok()?;
        let minor = parts.next().unwrap_or(Ok(0)).ok()?;
        let micro = parts.next().unwrap_or(Ok(0)).ok()?;
        Some(QemuVersion { major, minor, micro })
    }

    /// Parses the first line of `--version`: "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2…)".
    pub fn from_version_output(output: &str) -> Option<QemuVersion> {
        let rest = output.lines().next()?.split("version ").nth(1)?;
        QemuVersion::parse(rest.split_whitespace().next()?)
    }
}

/// Asks the target's QEMU binary for its version and refuses targets that need a newer one.
pub fn check_version(target: &Target) -> Result<QemuVersion, VmError> {
    let out = Cmd::new(&target.qemu.binary)
        .arg("--version")
        .install_hint(install_hint(&target.qemu.binary))
        .output()?;
    let text = out.stdout_str();
    let version = QemuVersion::from_version_output(&text).ok_or_else(|| VmError::QemuVersionUnknown {
        binary: target.qemu.binary.clone(),
        output: text.lines().next().unwrap_or_default().to_owned(),
    })?;
    if let Some(min) = target.qemu.min_version.as_deref().and_then(QemuVersion::parse)
        && version < min
    {
        return Err(VmError::QemuTooOld {
            target: target.name.clone(),
            binary: target.qemu.binary.clone(),
            found: version,
            needed: min,
        });
    }
    Ok(version)
}

/// Which package provides a QEMU system binary.
pub fn install_hint(binary: &str) -> String {
    let debian = match binary {
        "qemu-system-aarch64" | "qemu-system-arm" => "qemu-system-arm",
        "qemu-system-x86_64" | "qemu-system-i386" => "qemu-system-x86",
        "qemu-system-ppc64" | "qemu-system-ppc" => "qemu-system-ppc",
        "qemu-system-riscv64" => "qemu-system-riscv (Debian 13) or qemu-system-misc",
        _ => "qemu-system-misc",
    };
    format!("{debian} (Debian) or app-emulation/qemu with the matching QEMU_SOFTMMU_TARGETS (Gentoo)")
}

/// How the guest's CPU is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Tcg,
    Kvm,
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
        })
    }
}

/// Everything [`argv`] needs besides the target.
#[derive(Debug, Clone)]
pub struct Launch {
    /// `$DBH_HOME/images/<target>/`
    pub image_dir: PathBuf,
    /// `$DBH_HOME/images/<target>/run/`
    pub run_dir: PathBuf,
    /// UEFI targets: the firmware found by [`super::firmware::find`].
    pub firmware: Option<Firmware>,
    pub accel: Accel,
    pub smp: u32,
    /// Guest RAM (setting `vm.memory`; the target file's `qemu.memory_mib` when not given).
    pub memory_mib: u32,
    /// Host port forwarded to the guest's port 22.
    pub ssh_port: u16,
    pub version: QemuVersion,
    /// The kernel command line (the image's `cmdline` file) when QEMU loads the kernel with
    /// `-kernel/-initrd/-append`: direct-boot targets, and UEFI images without a UKI, whose
    /// firmware then starts the kernel's EFI stub from fw_cfg. `None`: the firmware boots the ESP.
    pub cmdline: Option<String>,
    /// Read-only raw disks after the root disk and the ESP (repository snapshots).
    pub disks: Vec<ReadOnlyDisk>,
    /// A scratch disk for PORTAGE_TMPDIR (raw, sparse, ext4 labelled `dbh-scratch`), thrown away
    /// with the run.
    pub scratch: Option<PathBuf>,
}

/// A raw image attached read-only, found in the guest by its virtio serial
/// (`/sys/block/vdX/serial`; at most 20 bytes, VIRTIO_BLK_ID_BYTES).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadOnlyDisk {
    pub path: PathBuf,
    pub serial: String,
}

impl Launch {
    pub fn overlay(&self) -> PathBuf {
        self.run_dir.join("overlay.qcow2")
    }
    pub fn vars(&self) -> PathBuf {
        self.run_dir.join("vars.fd")
    }
    pub fn console(&self) -> PathBuf {
        self.run_dir.join("console.log")
    }
    pub fn qmp(&self) -> PathBuf {
        self.run_dir.join("qmp.sock")
    }
    pub fn scratch_path(&self) -> PathBuf {
        self.run_dir.join("scratch.img")
    }
}

/// The QEMU arguments (without the program) for `target`.
pub fn argv(target: &Target, l: &Launch) -> Vec<String> {
    let q = &target.qemu;
    let p = |path: &Path| path.display().to_string();
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    push(&["-name", &format!("dbh-{},process=dbh-{}", target.name, target.name)]);
    push(&["-machine", &q.machine]);
    match l.accel {
        Accel::Tcg => push(&["-accel", "tcg,thread=multi", "-cpu", &q.cpu_tcg]),
        Accel::Kvm => push(&["-accel", "kvm", "-cpu", &q.cpu_kvm]),
    }
    push(&["-smp", &l.smp.to_string(), "-m", &l.memory_mib.to_string()]);
    if let Some(fw) = &l.firmware {
        push(&["-drive", &format!("if=pflash,format=raw,unit=0,readonly=on,file={}", p(&fw.code))]);
        push(&["-drive", &format!("if=pflash,format=raw,unit=1,file={}", p(&l.vars()))]);
    }
    // The root disk comes first so that it is the guest's vda; the ESP is read-only (the image is
    // shared by every run) and first in the firmware's boot order.
    push(&["-drive", &format!("if=none,id=root,format=qcow2,discard=unmap,file={}", p(&l.overlay()))]);
    push(&["-device", &format!("{},drive=root", q.disk_device)]);
    match &l.cmdline {
        None if target.is_uefi() => {
            let esp = l.image_dir.join("esp.img");
            push(&["-drive", &format!("if=none,id=esp,format=raw,readonly=on,file={}", p(&esp))]);
            push(&["-device", &format!("{},drive=esp,bootindex=0", q.disk_device)]);
        }
        cmdline => {
            push(&["-kernel", &p(&l.image_dir.join("vmlinuz")), "-initrd", &p(&l.image_dir.join("initrd.img"))]);
            push(&["-append", cmdline.as_deref().unwrap_or_default()]);
        }
    }
    // The scratch disk after the boot disks: the guest finds it by its label, not its name.
    if let Some(scratch) = &l.scratch {
        push(&["-drive", &format!("if=none,id=scratch,format=raw,discard=unmap,file={}", p(scratch))]);
        push(&["-device", &format!("{},drive=scratch,serial=dbh-scratch", q.disk_device)]);
    }
    // After the root disk and the ESP, so that those keep their names; never bootable.
    for (i, d) in l.disks.iter().enumerate() {
        push(&["-drive", &format!("if=none,id=ro{i},format=raw,readonly=on,file={}", p(&d.path))]);
        push(&["-device", &format!("{},drive=ro{i},serial={}", q.disk_device, d.serial)]);
    }
    // One NIC, user-mode networking, SSH reachable only from this host.
    push(&["-netdev", &format!("user,id=net0,hostfwd=tcp:127.0.0.1:{}-:22", l.ssh_port)]);
    push(&["-device", &format!("{},netdev=net0", q.net_device)]);
    push(&["-display", "none", "-monitor", "none", "-serial", &format!("file:{}", p(&l.console()))]);
    push(&["-qmp", &format!("unix:{},server=on,wait=off", p(&l.qmp()))]);
    push(&["-no-reboot"]);
    // Without it QEMU ≥ 8 probes audio backends, and a QEMU whose module directory belongs to
    // another build aborts (docs/lab.md, "QEMU 7.2 limits and QEMU 10").
    if l.version >= (QemuVersion { major: 8, minor: 0, micro: 0 }) {
        push(&["-audio", "none"]);
    }
    a.extend(q.extra_args.iter().cloned());
    a
}

/// The host's machine name as `uname -m` prints it.
pub fn host_machine() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.machine().to_string_lossy().into_owned())
        .unwrap_or_else(|_| std::env::consts::ARCH.to_owned())
}

/// How long the KVM probe guest may take.
const KVM_PROBE_DEADLINE: Duration = Duration::from_secs(10);

/// Whether KVM really runs a guest of `target`'s architecture on this host: only when the host's
/// machine equals the target's and a probe guest executes code. `/dev/kvm` alone proves nothing
/// here (the node exists on these machines, guests fail). The answer is cached under `cache_dir`
/// per host boot (`/proc/sys/kernel/random/boot_id`).
pub fn kvm_usable(target: &Target, cache_dir: &Path) -> bool {
    if host_machine() != target.uname_machine || !Path::new("/dev/kvm").exists() {
        return false;
    }
    let boot_id = fs_err::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let cache = cache_dir.join(format!("kvm-probe-v2-{}.txt", target.qemu.binary));
    if let Ok(text) = fs_err::read_to_string(&cache)
        && let Some((id, answer)) = text.split_once('\n')
        && id == boot_id.trim()
    {
        return answer.trim() == "yes";
    }
    let ok = probe_kvm(target, &host_machine());
    tracing::info!("KVM probe for {}: {}", target.qemu.binary, if ok { "works" } else { "does not work" });
    if fs_err::create_dir_all(cache_dir).is_ok() {
        let _ = fs_err::write(&cache, format!("{}\n{}\n", boot_id.trim(), if ok { "yes" } else { "no" }));
    }
    ok
}

/// Runs a tiny guest under KVM, with the target's machine and KVM CPU model, that writes to QEMU's
/// isa-debug-exit port: QEMU then exits with status (1 << 1) | 1 = 3, which only happens if the
/// vCPU really executed the instruction. The CPU model matters: on these machines `-machine pc`
/// with the default CPU passes, while `-cpu host` aborts setting an MSR, as real guests do.
fn probe_kvm(target: &Target, host: &str) -> bool {
    let binary = target.qemu.binary.as_str();
    if host != "x86_64" {
        // No probe guest for other hosts yet: stay on TCG rather than guess.
        return false;
    }
    let Ok(dir) = tempfile::tempdir() else { return false };
    // 64 KiB BIOS; the reset vector is its last 16 bytes: mov al,1; out 0xf4,al; hlt.
    let mut bios = vec![0xf4u8; 65536];
    bios[65536 - 16..65536 - 11].copy_from_slice(&[0xb0, 0x01, 0xe6, 0xf4, 0xf4]);
    let bios_path = dir.path().join("probe.bin");
    if fs_err::write(&bios_path, &bios).is_err() {
        return false;
    }
    let cmd = Cmd::new(binary)
        .args(["-accel", "kvm", "-machine", &target.qemu.machine, "-cpu", &target.qemu.cpu_kvm])
        .args(["-nodefaults", "-display", "none", "-no-reboot", "-m", "16"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-bios"])
        .arg(&bios_path);
    let mut command = cmd.std_command();
    command.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    let Ok(mut child) = command.spawn() else { return false };
    let deadline = std::time::Instant::now() + KVM_PROBE_DEADLINE;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.code() == Some(3),
            Ok(None) if std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
}

/// Every host core: under TCG each vCPU is a host thread, and a build guest is the host's job.
pub fn default_smp() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
}

/// `-smp` for `target`: the wanted count within what its machine supports (`qemu.max_cpus`).
pub fn smp_for(target: &Target, wanted: u32) -> u32 {
    target.qemu.max_cpus.map_or(wanted, |max| wanted.min(max)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::Targets;

    fn launch(target: &Target) -> Launch {
        let home = Path::new("/home/u/.local/share/dbh/images").join(&target.name);
        let firmware = match &target.boot {
            crate::target::Boot::Uefi { firmware_code, firmware_vars, .. } => Some(Firmware {
                code: PathBuf::from(&firmware_code[0]),
                vars: PathBuf::from(&firmware_vars[0]),
                descriptor: None,
            }),
            crate::target::Boot::Direct => None,
        };
        Launch {
            run_dir: home.join("run"),
            image_dir: home,
            firmware,
            accel: Accel::Tcg,
            smp: 2,
            memory_mib: target.qemu.memory_mib,
            ssh_port: 40022,
            version: QemuVersion { major: 10, minor: 0, micro: 2 },
            cmdline: (!target.is_uefi())
                .then(|| "root=LABEL=dbh-root rw console=hvc0 panic=-1".to_owned()),
            disks: Vec::new(),
            scratch: None,
        }
    }

    /// Repository snapshots: read-only raw drives after the root disk and the ESP, with serials.
    #[test]
    fn argv_with_repository_disks() {
        let t = Targets::builtin();
        let target = t.get("arm64").unwrap();
        let mut l = launch(target);
        l.disks = vec![
            ReadOnlyDisk { path: "/home/u/.local/share/dbh/repos/gentoo/snapshots/abc.sqfs".into(), serial: "repo-gentoo".into() },
            ReadOnlyDisk { path: "/home/u/.local/share/dbh/repos/dbh-test/snapshots/def.sqfs".into(), serial: "repo-dbh-test".into() },
        ];
        insta::assert_snapshot!("argv_arm64_repository_disks", argv(target, &l).join("\n"));
    }

    #[test]
    fn an_image_without_a_uki_boots_its_kernel_through_the_firmware() {
        let t = Targets::builtin();
        for name in ["arm64", "amd64", "riscv64"] {
            let target = t.get(name).unwrap();
            let mut l = launch(target);
            l.cmdline = Some("root=LABEL=dbh-root rw console=ttyAMA0,115200".into());
            l.scratch = Some(l.run_dir.join("scratch.img"));
            l.memory_mib = 6144;
            let args = argv(target, &l).join(" ");
            assert!(args.contains("if=pflash,format=raw,unit=0,readonly=on"), "{args}");
            assert!(args.contains("-kernel /home/u/.local/share/dbh/images/") && args.contains("/vmlinuz -initrd "), "{args}");
            assert!(args.contains("-append root=LABEL=dbh-root rw console=ttyAMA0,115200"), "{args}");
            assert!(!args.contains("esp.img"), "{args}");
            assert!(args.contains("-m 6144"), "{args}");
            assert!(args.contains("format=raw,discard=unmap,file=/home/u/.local/share/dbh/images/") && args.contains("drive=scratch,serial=dbh-scratch"), "{args}");
        }
    }

    #[test]
    fn smp_is_capped_by_the_machine() {
        let t = Targets::builtin();
        assert_eq!(smp_for(t.get("arm64").unwrap(), 64), 8);
        assert_eq!(smp_for(t.get("amd64").unwrap(), 64), 64);
        assert_eq!(smp_for(t.get("amd64").unwrap(), 0), 1);
    }

    #[test]
    fn argv_per_target() {
        for target in Targets::builtin().iter() {
            let args = argv(target, &launch(target));
            insta::assert_snapshot!(format!("argv_{}", target.name), args.join("\n"));
        }
    }

    #[test]
    fn kvm_uses_the_kvm_cpu() {
        let t = Targets::builtin();
        let target = t.get("amd64").unwrap();
        let mut l = launch(target);
        l.accel = Accel::Kvm;
        let args = argv(target, &l).join(" ");
        assert!(args.contains("-accel kvm -cpu host"), "{args}");
        assert!(!args.contains("tcg"), "{args}");
    }

    #[test]
    fn old_qemu_gets_no_audio_flag() {
        let t = Targets::builtin();
        let target = t.get("arm64").unwrap();
        let mut l = launch(target);
        l.version = QemuVersion { major: 7, minor: 2, micro: 22 };
        assert!(!argv(target, &l).iter().any(|a| a == "-audio"));
    }

    #[test]
    fn version_parsing() {
        let v = QemuVersion::from_version_output(
            "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\nCopyright",
        )
        .unwrap();
        assert_eq!(v, QemuVersion { major: 10, minor: 0, micro: 2 });
        assert!(QemuVersion::parse("8.1").unwrap() > QemuVersion::parse("7.2.22").unwrap());
        assert!(QemuVersion::parse("10.0").unwrap() > QemuVersion::parse("8.1").unwrap());
    }

    #[test]
    fn this_hosts_qemu_passes_the_riscv_minimum() {
        let t = Targets::builtin();
        if let Ok(v) = check_version(t.get("riscv64").unwrap()) {
            assert!(v >= QemuVersion::parse("8.1").unwrap());
        }
    }

    #[test]
    fn kvm_is_never_used_for_a_foreign_target_and_the_probe_answer_is_cached() {
        let dir = tempfile::tempdir().unwrap();
        let t = Targets::builtin();
        let foreign = if host_machine() == "aarch64" { "amd64" } else { "arm64" };
        assert!(!kvm_usable(t.get(foreign).unwrap(), dir.path()));
        let native = t.iter().find(|t| t.uname_machine == host_machine());
        if let (Some(native), true) = (native, Path::new("/dev/kvm").exists()) {
            // A real probe guest (on these machines /dev/kvm exists and guests fail: false).
            let first = kvm_usable(native, dir.path());
            eprintln!("KVM for {} on this host: {first}", native.name);
            let cached = dir.path().join(format!("kvm-probe-v2-{}.txt", native.qemu.binary));
            if host_machine() == "x86_64" && Cmd::new(&native.qemu.binary).arg("--version").output().is_ok() {
                assert!(cached.exists(), "the probe result is cached");
                assert_eq!(kvm_usable(native, dir.path()), first);
            }
        }
    }

    #[test]
    fn too_old_qemu_is_refused_with_a_hint() {
        let mut target = Targets::builtin().get("arm64").unwrap().clone();
        target.qemu.min_version = Some("99.0".into());
        if Cmd::new(&target.qemu.binary).arg("--version").output().is_err() {
            return;
        }
        let err = check_version(&target).unwrap_err();
        assert!(err.to_string().contains("needs QEMU 99.0.0"), "{err}");
        use crate::hint::Hint;
        assert!(err.hint().unwrap().contains("qemu"), "{:?}", err.hint());
    }
}
