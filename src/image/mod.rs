//! Guest images: `dbh vm image create` turns a stage tarball into `$DBH_HOME/images/<target>/`
//! (layout in `docs/vm-contract.md`): `disk.qcow2` (ext4, label `dbh-root`, no partition table),
//! `esp.img` + `uki.efi` for UEFI targets or `vmlinuz` + `initrd.img` + `cmdline` for direct-boot
//! ones, the pinned SSH host key and the client key pair under `ssh/`, and `image.toml`.
//!
//! Boot path (`image.toml` `boot`, with the reason in `boot_note` and a log line): a UKI where a
//! systemd-stub is found (`--stub`, the stage, the host; [`uki::find_stub`]). A Gentoo stage3 has
//! none (systemd's `boot` USE flag is off in stage profiles) and a host has only its own
//! architecture's, so without one the image keeps `vmlinuz` + `initrd.img` + `cmdline` and the
//! firmware boots the kernel's own EFI stub (`CONFIG_EFI_STUB`: arm64, riscv64 and x86 distribution
//! kernels are PE/COFF EFI applications), which QEMU passes to it through fw_cfg with
//! `-kernel/-initrd/-append` (edk2's QemuKernelLoaderFsDxe: AAVMF, OVMF, RiscVVirt).
//!
//! Order of work: fetch and verify the stage against its DIGESTS ([`stage`]) before anything is
//! unpacked; unpack into a staging directory inside a temporary directory under `images/`;
//! configure the root (keys, sshd, network, init system, Portage); `mkfs.ext4 -d` + `qemu-img
//! convert`; initramfs + UKI + ESP; then rename the temporary directory into place, so a failed
//! create leaves the previous image untouched.
//!
//! Ownership: unpacking as root keeps the stage's owners, modes and xattrs. As a normal user the
//! files end up owned by that user (the kernel does not allow otherwise) and `mkfs.ext4 -d` copies
//! that into the image, which breaks setuid programs and sshd's ownership checks: run `image create`
//! as root (or inside `unshare -r`/a user namespace that maps root).

pub mod configure;
pub mod stage;

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::hint::Hint;
use crate::events::{Event, Reporter, Unit};
use crate::process::Cmd;
use crate::settings::Home;
use crate::target::{Boot, Target};
use crate::uki::{self, initramfs, UkiError};

pub use configure::InitSystem;
pub use stage::StageError;

/// The root filesystem's label; the UKI command line mounts `root=LABEL=dbh-root`.
pub const ROOT_LABEL: &str = "dbh-root";
/// `image.toml` `boot`: the firmware boots `esp.img`, which holds a UKI (`uki.efi`).
pub const BOOT_UKI: &str = "uefi";
/// `image.toml` `boot`: the firmware boots `vmlinuz` (a PE/COFF EFI application: the kernel's own
/// EFI stub) with `initrd.img` and `cmdline`, which QEMU hands it through fw_cfg.
pub const BOOT_EFI_KERNEL: &str = "efi-kernel";
/// `image.toml` `boot`: no firmware; QEMU loads `vmlinuz` + `initrd.img` itself (ppc64le).
pub const BOOT_DIRECT: &str = "direct";
/// Free space added to the root filesystem beyond its contents (room for builds).
pub const HEADROOM_BYTES: u64 = 4 << 30;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{0}")]
    Stage(#[from] StageError),
    #[error("{0}")]
    Uki(#[from] UkiError),
    #[error("{0}")]
    Process(#[from] crate::process::ProcessError),
    #[error("cannot unpack the stage {path}")]
    Unpack {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a stage tarball dbh can unpack (tar.xz, tar.zst, tar.gz, tar.bz2 or tar)")]
    UnknownCompression { path: PathBuf },
    #[error("the stage has no kernel in /boot (looked for vmlinuz-*, vmlinux-*, kernel-*, Image-*) with modules in /lib/modules")]
    NoKernel,
    #[error("{0}")]
    File(#[from] crate::util::fs::FileError),
    #[error("no systemd-stub for a UKI, and the kernel {path} cannot boot as an EFI application on target `{target}`: {reason}")]
    NotEfiKernel { path: PathBuf, target: String, reason: String },
    #[error("vm.disk_size is {} MiB, but the stage alone takes {} MiB", .wanted >> 20, .content >> 20)]
    DiskTooSmall { wanted: u64, content: u64 },
    #[error("a guest of target `{target}` is running ({lock} is locked); stop it before replacing its image")]
    Running { target: String, lock: PathBuf },
}

impl Hint for ImageError {
    fn hint(&self) -> Option<String> {
        match self {
            ImageError::NoKernel => Some(
                "Gentoo stage3s carry no kernel: pass one with --kernel and --modules, e.g. from \
                 sys-kernel/gentoo-kernel-bin (…/usr/src/linux-*/arch/<arch>/boot/Image or bzImage and \
                 /lib/modules/<version>)"
                    .into(),
            ),
            ImageError::Running { target, .. } => Some(format!("run `dbh vm stop --target {target}`")),
            ImageError::DiskTooSmall { content, .. } => Some(format!(
                "set vm.disk_size (or [vm.<target>] disk_size) to at least {} MiB, or leave it unset",
                (content + content / 4) >> 20
            )),
            ImageError::NotEfiKernel { .. } => Some(
                "pass a kernel built with CONFIG_EFI_STUB (every distribution kernel, sys-kernel/gentoo-kernel-bin) \
                 with --kernel and --modules, or a systemd-stub for a UKI with --stub"
                    .into(),
            ),
            _ => None,
        }
    }
}

/// What `image create` is asked to do.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub stage: String,
    pub digests: Option<String>,
    pub keyring: Option<PathBuf>,
    /// Skip the DIGESTS signature check (`--insecure-no-signature`).
    pub insecure_no_signature: bool,
    pub kernel: Option<PathBuf>,
    pub modules: Option<PathBuf>,
    pub stub: Option<PathBuf>,
    pub initramfs_tools: initramfs::Tools,
    /// Size of the root filesystem (setting `vm.disk_size`) [default: the stage + 25 % + 4 GiB].
    pub disk_bytes: Option<u64>,
}

impl CreateOptions {
    pub fn new(stage: impl Into<String>) -> CreateOptions {
        CreateOptions {
            stage: stage.into(),
            digests: None,
            keyring: None,
            insecure_no_signature: false,
            kernel: None,
            modules: None,
            stub: None,
            initramfs_tools: initramfs::Tools::Auto,
            disk_bytes: None,
        }
    }
}

/// `image.toml`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImageInfo {
    pub target: String,
    /// Unix seconds.
    pub created: u64,
    pub stage: StageInfo,
    pub kernel_version: String,
    pub init_system: InitSystem,
    pub guest_pkgdir: String,
    pub portage: String,
    pub cmdline: String,
    /// [`BOOT_UKI`], [`BOOT_EFI_KERNEL`] or [`BOOT_DIRECT`].
    pub boot: String,
    /// Why this boot path, in a sentence (what `image create` said).
    #[serde(default)]
    pub boot_note: String,
    pub initramfs: InitramfsInfo,
    pub disk_size: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StageInfo {
    pub location: String,
    pub sha512: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InitramfsInfo {
    pub busybox: bool,
    pub modules: Vec<String>,
}

impl ImageInfo {
    pub fn load(dir: &Path) -> Result<ImageInfo, ImageError> {
        let path = dir.join("image.toml");
        let text = fs_err::read_to_string(&path).map_err(|source| ImageError::File(crate::util::fs::FileError::Read { path: path.clone(), source }))?;
        toml::from_str(&text).map_err(|e| ImageError::File(crate::util::fs::FileError::Read {
            path,
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
        }))
    }
}

fn io_write(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::File(crate::util::fs::FileError::Write { path: path.to_owned(), source })
}

/// Creates (or replaces) the target's image. Returns what was written to `image.toml`.
pub fn create(home: &Home, target: &Target, opts: &CreateOptions, reporter: &dyn Reporter) -> Result<ImageInfo, ImageError> {
    let final_dir = home.images(&target.name);
    let images = final_dir.parent().expect("images/<target> has a parent").to_owned();
    fs_err::create_dir_all(&images).map_err(io_write(&images))?;
    refuse_if_running(target, &final_dir)?;

    // 1. Fetch and verify before unpacking anything.
    let cache = home.cache();
    let stage_name = stage::file_name(&opts.stage);
    let digests_loc = opts.digests.clone().unwrap_or_else(|| format!("{}.DIGESTS", opts.stage));
    let stage_path = stage::fetch(&opts.stage, &cache, reporter)?;
    let digests_path = stage::fetch(&digests_loc, &cache, reporter)?;
    let keyring = stage::release_keyring(opts.keyring.as_deref(), opts.insecure_no_signature, &digests_loc)?;
    if opts.insecure_no_signature {
        tracing::warn!(
            "--insecure-no-signature: the signature of {digests_loc} is NOT verified; the stage is only checked against \
             its digests, so a mirror that replaced both would not be noticed"
        );
    }
    let detached = match (&keyring, stage::is_url(&digests_loc)) {
        (Some(_), true) => stage::fetch(&format!("{digests_loc}.asc"), &cache, reporter).ok(),
        (Some(_), false) => Some(PathBuf::from(format!("{digests_loc}.asc"))),
        (None, _) => None,
    };
    let digests_name = stage::file_name(&digests_loc);
    let text = stage::digests_text(&digests_path, &digests_name, detached.as_deref(), keyring.as_deref())?;
    let verified = stage::verify(&stage_path, &stage_name, &text, &digests_name, reporter)?;

    // 2. Everything below happens in a temporary directory next to the final one.
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{}.new-", target.name))
        .tempdir_in(&images)
        .map_err(io_write(&images))?;
    let work = tmp.path();
    let staging = work.join("root");
    fs_err::create_dir_all(&staging).map_err(io_write(&staging))?;
    unpack(&stage_path, &staging, reporter)?;

    // 3. Kernel and modules.
    let (kernel_path, modules_dir, kernel_version) = find_kernel(&staging, opts)?;
    let kernel = fs_err::read(&kernel_path).map_err(|source| ImageError::File(crate::util::fs::FileError::Read { path: kernel_path.clone(), source }))?;

    // 4. Configure the root.
    let ssh_dir = work.join("ssh");
    let configured = configure::configure(&staging, target, &ssh_dir, reporter)?;

    // 5. Boot files (built from the configured root, before it is packed).
    let cmdline = uki::default_cmdline(target);
    let initrd = initramfs::build(&initramfs::Spec {
        root: &staging,
        modules_dir: Some(&modules_dir),
        modules: &target.initramfs.modules,
        tools: opts.initramfs_tools,
        compression: initramfs::Compression::Gzip,
    })
    .map_err(UkiError::from)?;
    reporter.event(Event::Note {
        message: format!(
            "initramfs: {} bytes, tools from {}, modules: {}",
            initrd.data.len(),
            if initrd.busybox { "busybox" } else { "the stage" },
            initrd.load_order.join(" ")
        ),
    });
    let (boot, boot_note) = match &target.boot {
        Boot::Uefi { efi_arch, .. } => match uki::find_stub(target, opts.stub.as_deref(), Some(&staging)) {
            Ok(stub) => {
                let uki_bytes = uki::assemble(&uki::UkiParts {
                    stub: stub.clone(),
                    kernel,
                    initrd: initrd.data.clone(),
                    cmdline: cmdline.clone(),
                    osrel: uki::os_release(Some(&staging)),
                    uname: Some(kernel_version.clone()),
                })?;
                let uki_path = work.join("uki.efi");
                fs_err::write(&uki_path, &uki_bytes).map_err(io_write(&uki_path))?;
                make_esp(&uki_path, efi_arch, &work.join("esp.img"), uki_bytes.len() as u64)?;
                (BOOT_UKI.to_owned(), format!("UKI on the ESP, made with the systemd-stub {}", stub.display()))
            }
            // A Gentoo stage3 has no systemd-stub and a host has only its own architecture's: the
            // kernel is an EFI application itself, which the firmware loads through fw_cfg.
            Err(UkiError::NoStub { stub, looked, .. }) => {
                let looked = looked.replace(&staging.display().to_string(), "<stage>");
                efi_kernel_check(&kernel, &kernel_path, target)?;
                write_kernel_files(work, &kernel, &initrd.data, &cmdline)?;
                (
                    BOOT_EFI_KERNEL.to_owned(),
                    format!(
                        "no systemd-stub {stub} (looked in {looked}): the firmware boots the kernel's own EFI stub, \
                         loaded with the initramfs and command line through QEMU's fw_cfg (-kernel/-initrd/-append)"
                    ),
                )
            }
            Err(e) => return Err(e.into()),
        },
        Boot::Direct => {
            write_kernel_files(work, &kernel, &initrd.data, &cmdline)?;
            (BOOT_DIRECT.to_owned(), "QEMU loads the kernel and initramfs directly (no UEFI for this machine)".to_owned())
        }
    };
    reporter.event(Event::Note { message: format!("boot ({boot}): {boot_note}") });

    // 6. The disk.
    let disk_size = make_disk(&staging, work, opts.disk_bytes, reporter)?;
    fs_err::remove_dir_all(&staging).map_err(io_write(&staging))?;

    let info = ImageInfo {
        target: target.name.clone(),
        created: crate::util::time::now_secs(),
        stage: StageInfo { location: opts.stage.clone(), sha512: verified.sha512 },
        kernel_version,
        init_system: configured.init,
        guest_pkgdir: configure::GUEST_PKGDIR.into(),
        portage: configured.portage,
        cmdline,
        boot,
        boot_note,
        initramfs: InitramfsInfo { busybox: initrd.busybox, modules: initrd.load_order },
        disk_size,
    };
    let toml_path = work.join("image.toml");
    fs_err::write(&toml_path, toml::to_string_pretty(&info).expect("image.toml serialises"))
        .map_err(io_write(&toml_path))?;

    // 7. Swap into place.
    refuse_if_running(target, &final_dir)?;
    let work = tmp.keep();
    if final_dir.exists() {
        let old = images.join(format!(".{}.old-{}", target.name, std::process::id()));
        fs_err::rename(&final_dir, &old).map_err(io_write(&final_dir))?;
        fs_err::rename(&work, &final_dir).map_err(io_write(&final_dir))?;
        let _ = fs_err::remove_dir_all(&old);
    } else {
        fs_err::rename(&work, &final_dir).map_err(io_write(&final_dir))?;
    }
    reporter.event(Event::Note { message: format!("image for {} written to {}", target.name, final_dir.display()) });
    Ok(info)
}

/// `vmlinuz`, `initrd.img` and `cmdline` for a boot through QEMU's -kernel/-initrd/-append.
fn write_kernel_files(work: &Path, kernel: &[u8], initrd: &[u8], cmdline: &str) -> Result<(), ImageError> {
    for (name, data) in [("vmlinuz", kernel), ("initrd.img", initrd), ("cmdline", format!("{cmdline}\n").as_bytes())] {
        let path = work.join(name);
        fs_err::write(&path, data).map_err(io_write(&path))?;
    }
    Ok(())
}

/// The firmware can only start a kernel that is a PE/COFF EFI application of the target's machine
/// type (`CONFIG_EFI_STUB`; arm64/riscv64 `Image`, x86 `bzImage`), not a bare ELF `vmlinux` or a
/// compressed `Image.gz`.
fn efi_kernel_check(kernel: &[u8], path: &Path, target: &Target) -> Result<(), ImageError> {
    let expected: u16 = match target.uname_machine.as_str() {
        "aarch64" => 0xaa64,
        "x86_64" => 0x8664,
        "riscv64" => 0x5064,
        _ => 0,
    };
    match uki::pe::parse(kernel, path) {
        Ok(info) if expected == 0 || info.machine == expected => Ok(()),
        Ok(info) => Err(ImageError::NotEfiKernel {
            path: path.to_owned(),
            target: target.name.clone(),
            reason: format!("its PE machine type is {:#06x}, not {expected:#06x}", info.machine),
        }),
        Err(e) => Err(ImageError::NotEfiKernel { path: path.to_owned(), target: target.name.clone(), reason: e.to_string() }),
    }
}

fn refuse_if_running(target: &Target, dir: &Path) -> Result<(), ImageError> {
    let lock = dir.join("run/lock");
    let Ok(file) = std::fs::File::open(&lock) else { return Ok(()) };
    // A running VM holds it exclusively; an error taking it counts as running too, as before.
    if !crate::util::fs::try_lock(&file, crate::util::fs::Lock::Shared).unwrap_or(false) {
        return Err(ImageError::Running { target: target.name.clone(), lock });
    }
    Ok(())
}

/// Opens a (possibly compressed) tarball, choosing the decompressor by magic bytes.
fn open_tar(path: &Path) -> Result<Box<dyn Read>, ImageError> {
    let mut f = fs_err::File::open(path).map_err(|source| ImageError::File(crate::util::fs::FileError::Read { path: path.to_owned(), source }))?;
    let mut magic = [0u8; 6];
    let n = f.read(&mut magic).map_err(|source| ImageError::File(crate::util::fs::FileError::Read { path: path.to_owned(), source }))?;
    let f = fs_err::File::open(path).map_err(|source| ImageError::File(crate::util::fs::FileError::Read { path: path.to_owned(), source }))?;
    let r = std::io::BufReader::with_capacity(1 << 20, f);
    let m = &magic[..n];
    Ok(if m.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Box::new(xz2::read::XzDecoder::new_multi_decoder(r))
    } else if m.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(zstd::stream::read::Decoder::with_buffer(r).map_err(|source| ImageError::File(crate::util::fs::FileError::Read { path: path.to_owned(), source }))?)
    } else if m.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::MultiGzDecoder::new(r))
    } else if m.starts_with(b"BZh") {
        Box::new(bzip2::read::MultiBzDecoder::new(r))
    } else if n >= 6 {
        // Maybe a plain tar: check "ustar" at 257.
        let mut head = vec![0u8; 263];
        let mut f = fs_err::File::open(path).map_err(|source| ImageError::File(crate::util::fs::FileError::Read { path: path.to_owned(), source }))?;
        if f.read_exact(&mut head).is_ok() && &head[257..262] == b"ustar" {
            Box::new(std::io::BufReader::new(f.into_parts().0))
        } else {
            return Err(ImageError::UnknownCompression { path: path.to_owned() });
        }
    } else {
        return Err(ImageError::UnknownCompression { path: path.to_owned() });
    })
}

/// Unpacks the stage keeping owners (as root), modes, xattrs and mtimes.
pub fn unpack(stage: &Path, dest: &Path, reporter: &dyn Reporter) -> Result<(), ImageError> {
    let task = format!("unpack:{}", stage.display());
    reporter.event(Event::Start {
        task: task.clone(),
        label: format!("unpacking {}", stage::file_name(&stage.to_string_lossy())),
        total: None,
        unit: Unit::Spinner,
    });
    let reader = open_tar(stage)?;
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(nix::unistd::geteuid().is_root());
    archive.set_unpack_xattrs(true);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(true);
    let err = |source| ImageError::Unpack { path: stage.to_owned(), source };
    let mut count = 0u64;
    for entry in archive.entries().map_err(err)? {
        let mut entry = entry.map_err(err)?;
        // Device nodes are recreated by devtmpfs at boot; unprivileged mknod would fail anyway.
        if matches!(entry.header().entry_type(), tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo) {
            continue;
        }
        entry.unpack_in(dest).map_err(err)?;
        count += 1;
        if count.is_multiple_of(2000) {
            reporter.event(Event::Progress { task: task.clone(), position: count, message: None });
        }
    }
    reporter.event(Event::Finish { task, message: format!("unpacked {count} entries") });
    Ok(())
}

/// Picks the kernel and its modules: the options' when given, else the newest `/boot` kernel
/// whose version has a `/lib/modules/<version>` directory.
fn find_kernel(root: &Path, opts: &CreateOptions) -> Result<(PathBuf, PathBuf, String), ImageError> {
    if let (Some(kernel), Some(modules)) = (&opts.kernel, &opts.modules) {
        let version = uki::modules_version(modules).unwrap_or_default();
        // Give the guest the same modules so it can load more than the initramfs does.
        let dest = root.join("lib/modules").join(&version);
        if !dest.exists() && !version.is_empty() {
            Cmd::new("cp").arg("-a").arg(modules).arg(&dest).output()?;
        }
        return Ok((kernel.clone(), modules.clone(), version));
    }
    let modroot = ["lib/modules", "usr/lib/modules"].iter().map(|d| root.join(d)).find(|d| d.is_dir());
    let mut candidates = Vec::new();
    if let (Ok(entries), Some(modroot)) = (std::fs::read_dir(root.join("boot")), &modroot) {
        for e in entries.filter_map(Result::ok) {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(version) = ["vmlinuz-", "vmlinux-", "kernel-", "Image-"].iter().find_map(|p| name.strip_prefix(p)) else {
                continue;
            };
            if modroot.join(version).is_dir() && std::fs::metadata(e.path()).is_ok_and(|m| m.is_file()) {
                candidates.push((version.to_owned(), e.path(), modroot.join(version)));
            }
        }
    }
    candidates.sort_by(|a, b| version_cmp(&a.0, &b.0));
    let (version, kernel, modules) = candidates.pop().ok_or(ImageError::NoKernel)?;
    Ok((kernel, modules, version))
}

/// Orders kernel versions numerically where they are numbers ("6.10" > "6.9").
fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let key = |s: &str| -> Vec<(u64, String)> {
        s.split(|c: char| !c.is_ascii_alphanumeric())
            .map(|p| (p.parse::<u64>().unwrap_or(0), p.to_owned()))
            .collect()
    };
    key(a).cmp(&key(b))
}

/// Bytes the tree occupies (allocated blocks), without following symlinks.
fn tree_size(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.filter_map(Result::ok) {
            let Ok(m) = e.metadata() else { continue };
            total += m.blocks() * 512 + 256; // + inode overhead
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    total
}

fn make_disk(staging: &Path, work: &Path, wanted: Option<u64>, reporter: &dyn Reporter) -> Result<u64, ImageError> {
    let content = tree_size(staging);
    let size = match wanted {
        Some(w) if w < content + content / 8 => {
            return Err(ImageError::DiskTooSmall { wanted: w, content });
        }
        Some(w) => w >> 20 << 20,
        None => (content + content / 4 + HEADROOM_BYTES).div_ceil(1 << 20) << 20,
    };
    let raw = work.join("disk.raw");
    reporter.event(Event::Note { message: format!("making the root filesystem ({} MiB, sparse)", size >> 20) });
    Cmd::new("mkfs.ext4")
        .args(["-q", "-F", "-L", ROOT_LABEL, "-d"])
        .arg(staging)
        .arg(&raw)
        .arg(format!("{}k", size >> 10))
        .install_hint("e2fsprogs (Debian) or sys-fs/e2fsprogs (Gentoo), version 1.43 or newer for -d")
        .output()?;
    Cmd::new("qemu-img")
        .args(["convert", "-O", "qcow2"])
        .arg(&raw)
        .arg(work.join("disk.qcow2"))
        .install_hint("qemu-utils (Debian) or app-emulation/qemu (Gentoo)")
        .output()?;
    fs_err::remove_file(&raw).map_err(io_write(&raw))?;
    Ok(size)
}

fn make_esp(uki: &Path, efi_arch: &str, esp: &Path, uki_len: u64) -> Result<(), ImageError> {
    // KiB: the UKI + 8 MiB of FAT overhead and slack.
    let kib = uki_len / 1024 + 8192;
    Cmd::new("mkfs.vfat")
        .arg("-C")
        .arg(esp)
        .arg(kib.to_string())
        .install_hint("dosfstools (Debian) or sys-fs/dosfstools (Gentoo)")
        .output()?;
    Cmd::new("mmd")
        .arg("-i")
        .arg(esp)
        .args(["::/EFI", "::/EFI/BOOT"])
        .install_hint("mtools (Debian) or sys-fs/mtools (Gentoo)")
        .output()?;
    Cmd::new("mcopy")
        .arg("-i")
        .arg(esp)
        .arg(uki)
        .arg(format!("::/EFI/BOOT/BOOT{}.EFI", efi_arch.to_ascii_uppercase()))
        .install_hint("mtools (Debian) or sys-fs/mtools (Gentoo)")
        .output()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_sort_numerically() {
        let mut v = vec!["6.9.1-gentoo", "6.10.2-gentoo", "6.1.0-50-cloud-arm64"];
        v.sort_by(|a, b| version_cmp(a, b));
        assert_eq!(v, ["6.1.0-50-cloud-arm64", "6.9.1-gentoo", "6.10.2-gentoo"]);
    }

    #[test]
    fn unpack_refuses_unknown_formats() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.tar.xz");
        std::fs::write(&p, b"definitely not a tarball, just some bytes").unwrap();
        let err = unpack(&p, dir.path(), &crate::events::Silent).unwrap_err();
        assert!(matches!(err, ImageError::UnknownCompression { .. }), "{err}");
    }
}
