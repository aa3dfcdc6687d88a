//! Filesystem images of a root: squashfs (`mksquashfs`), ext4 (`mkfs.ext4 -d`, no loop mounts)
//! as a bare filesystem or, bootable, inside a GPT disk written here (ESP with
//! `EFI/BOOT/BOOT<ARCH>.EFI` = a UKI from [`crate::uki`], then the root partition), converted to
//! qcow2 by `qemu-img`. Reproducibility: fixed UUIDs and hash seed derived from the content,
//! `E2FSPROGS_FAKE_TIME`/`SOURCE_DATE_EPOCH` = the clamped time, a fixed FAT volume id.

use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{Boot, Format, RootfsError, io};
use crate::events::{Event, Reporter};
use crate::process::Cmd;
use crate::target::{self, Target};
use crate::uki;

/// The root filesystem's label; the UKI's default `root=LABEL=` names it.
pub const ROOT_LABEL: &str = crate::image::ROOT_LABEL;

pub fn squashfs(root: &Path, out: &Path, sde: u64) -> Result<(), RootfsError> {
    Cmd::new("mksquashfs")
        .arg(root)
        .arg(out)
        .args(["-noappend", "-no-xattrs", "-comp", "zstd", "-quiet", "-no-progress", "-mkfs-time"])
        .arg(sde.to_string())
        // mksquashfs refuses -mkfs-time together with SOURCE_DATE_EPOCH.
        .env_remove("SOURCE_DATE_EPOCH")
        .install_hint("squashfs-tools (Debian) or sys-fs/squashfs-tools (Gentoo)")
        .output()?;
    Ok(())
}

/// A UUID-shaped string derived from `seed` (stable for the same content).
fn uuid_from(seed: &[u8], salt: &str) -> [u8; 16] {
    let mut h = Sha256::new();
    h.update(salt.as_bytes());
    h.update(seed);
    let mut u = [0u8; 16];
    u.copy_from_slice(&h.finalize()[..16]);
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    u
}

fn uuid_text(u: &[u8; 16]) -> String {
    let h = hex::encode(u);
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

/// Bytes the tree occupies, without following symlinks.
fn tree_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let Ok(m) = e.metadata() else { continue };
            total += m.blocks() * 512 + 512;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    total
}

/// An ext4 filesystem image of `root` at `out` (sparse).
pub fn ext4(root: &Path, out: &Path, seed: &[u8], sde: u64) -> Result<u64, RootfsError> {
    let content = tree_size(root);
    let size = (content + content / 3 + (64 << 20)).div_ceil(1 << 20) << 20;
    let uuid = uuid_text(&uuid_from(seed, "ext4-uuid"));
    let hash_seed = uuid_text(&uuid_from(seed, "ext4-hash-seed"));
    Cmd::new("mkfs.ext4")
        .args(["-q", "-F", "-L", ROOT_LABEL, "-U", &uuid, "-b", "4096", "-I", "256", "-E"])
        .arg(format!("hash_seed={hash_seed},root_owner=0:0,lazy_itable_init=0,nodiscard"))
        .arg("-d")
        .arg(root)
        .arg(out)
        .arg(format!("{}k", size >> 10))
        .env("E2FSPROGS_FAKE_TIME", sde.to_string())
        .env("SOURCE_DATE_EPOCH", sde.to_string())
        .install_hint("e2fsprogs (Debian) or sys-fs/e2fsprogs (Gentoo), version 1.43 or newer for -d")
        .output()?;
    pin_inode_times(root, out, sde)?;
    Ok(size)
}

/// `mkfs.ext4 -d` copies each file's atime and ctime from the host (reading it moved the atime)
/// and stamps crtime with the clock; all three
/// are set to `sde` with debugfs (`sif PATH ctime|crtime @SECONDS`), so the image depends only
/// on the tree. Names debugfs cannot quote (a `"` or newline) keep their times.
fn pin_inode_times(root: &Path, image: &Path, sde: u64) -> Result<(), RootfsError> {
    let mut script = String::new();
    let mut paths = vec!["/".to_owned(), "/lost+found".to_owned()];
    for rel in super::pack::sorted_entries(root)? {
        let p = format!("/{}", rel.display());
        if !p.contains(['"', '\n']) {
            paths.push(p);
        }
    }
    for p in paths {
        for field in ["atime", "ctime", "crtime"] {
            script.push_str(&format!("sif \"{p}\" {field} @{sde}\n"));
        }
    }
    let file = image.with_extension("debugfs");
    fs_err::write(&file, script).map_err(io("write", &file))?;
    Cmd::new("debugfs")
        .arg("-w")
        .arg("-f")
        .arg(&file)
        .arg(image)
        .env("E2FSPROGS_FAKE_TIME", sde.to_string())
        .install_hint("e2fsprogs (Debian) or sys-fs/e2fsprogs (Gentoo)")
        .output()?;
    fs_err::remove_file(&file).map_err(io("remove", &file))?;
    Ok(())
}

/// The FAT ESP holding the UKI as the removable-media boot path.
fn esp(uki_path: &Path, efi_arch: &str, out: &Path, seed: &[u8], sde: u64) -> Result<(), RootfsError> {
    let len = fs_err::metadata(uki_path).map_err(io("stat", uki_path))?.len();
    let kib = (len / 1024 + 8192).div_ceil(1024) * 1024;
    let volid = hex::encode(&uuid_from(seed, "esp-volid")[..4]);
    // `mcopy -m` keeps the file's time in its FAT entry: the clamped one, not the build's.
    let t = nix::sys::time::TimeSpec::new(sde as i64, 0);
    nix::sys::stat::utimensat(nix::fcntl::AT_FDCWD, uki_path, &t, &t, nix::sys::stat::UtimensatFlags::FollowSymlink)
        .map_err(|e| RootfsError::Io(crate::util::fs::PathError { doing: "set the times of", path: uki_path.to_owned(), source: e.into() }))?;
    let sde = sde.to_string();
    Cmd::new("mkfs.vfat")
        .args(["-i", &volid, "-n", "ESP", "--invariant", "-C"])
        .arg(out)
        .arg(kib.to_string())
        .env("SOURCE_DATE_EPOCH", &sde)
        .install_hint("dosfstools (Debian) or sys-fs/dosfstools (Gentoo)")
        .output()?;
    Cmd::new("mmd")
        .arg("-i")
        .arg(out)
        .args(["::/EFI", "::/EFI/BOOT"])
        .env("SOURCE_DATE_EPOCH", &sde)
        .install_hint("mtools (Debian) or sys-fs/mtools (Gentoo)")
        .output()?;
    Cmd::new("mcopy")
        .arg("-m")
        .arg("-i")
        .arg(out)
        .arg(uki_path)
        .arg(format!("::/EFI/BOOT/BOOT{}.EFI", efi_arch.to_ascii_uppercase()))
        .env("SOURCE_DATE_EPOCH", &sde)
        .install_hint("mtools (Debian) or sys-fs/mtools (Gentoo)")
        .output()?;
    Ok(())
}

/// The newest kernel image under the root's /boot.
fn find_kernel(root: &Path) -> Option<PathBuf> {
    let boot = root.join("boot");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&boot)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let n = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            (n.starts_with("vmlinuz") || n.starts_with("Image") || n.starts_with("kernel-")) && p.is_file()
        })
        .collect();
    found.sort();
    found.pop()
}

/// `<root>/lib/modules/<version>` (or `usr/lib/...`) → `<root>`.
fn root_of_modules(modules: &Path) -> Option<PathBuf> {
    let lib = modules.parent()?.parent()?;
    let up = lib.parent()?;
    if up.file_name().is_some_and(|n| n == "usr") { up.parent().map(Path::to_owned) } else { Some(up.to_owned()) }
}

/// The UKI for the root: kernel, initramfs (given, or generated from the modules' root — its
/// busybox/shell run on the target's CPU, so they never come from the host), command line.
fn make_uki(root: &Path, boot: &Boot, target: &Target, out: &Path, reporter: &dyn Reporter) -> Result<(), RootfsError> {
    let kernel_path = boot.kernel.clone().or_else(|| find_kernel(root)).ok_or(RootfsError::NoKernel)?;
    let kernel = fs_err::read(&kernel_path).map_err(io("read", &kernel_path))?;
    let modules = boot.modules.clone().or_else(|| {
        let dir = root.join("lib/modules");
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir).ok()?.flatten().map(|e| e.path()).collect();
        v.sort();
        v.pop()
    });
    let tools_root = modules.as_deref().and_then(root_of_modules).unwrap_or_else(|| root.to_owned());
    let initrd = match &boot.initrd {
        Some(p) => fs_err::read(p).map_err(io("read", p))?,
        None => {
            let built = uki::initramfs::build(&uki::initramfs::Spec {
                root: &tools_root,
                modules_dir: modules.as_deref(),
                modules: &target.initramfs.modules,
                tools: uki::initramfs::Tools::Auto,
                compression: uki::initramfs::Compression::Gzip,
            })
            .map_err(uki::UkiError::from)?;
            reporter.event(Event::Note {
                message: format!("initramfs from {}: modules {}", tools_root.display(), built.load_order.join(" ")),
            });
            built.data
        }
    };
    let stub = uki::find_stub(target, boot.stub.as_deref(), Some(&tools_root))?;
    let bytes = uki::assemble(&uki::UkiParts {
        stub,
        kernel,
        initrd,
        cmdline: boot.cmdline.clone().unwrap_or_else(|| uki::default_cmdline(target)),
        osrel: uki::os_release(Some(root)),
        uname: modules.as_deref().and_then(uki::modules_version),
    })?;
    fs_err::write(out, bytes).map_err(io("write", out))?;
    Ok(())
}

const SECTOR: u64 = 512;
const ALIGN: u64 = 1 << 20;
const ESP_TYPE: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
const LINUX_FS_TYPE: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";

/// A GUID in its mixed-endian on-disk form.
fn guid_bytes(text: &str) -> [u8; 16] {
    let h: Vec<u8> = hex::decode(text.replace('-', "")).expect("valid GUID literal");
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&[h[3], h[2], h[1], h[0]]);
    b[4..6].copy_from_slice(&[h[5], h[4]]);
    b[6..8].copy_from_slice(&[h[7], h[6]]);
    b[8..].copy_from_slice(&h[8..]);
    b
}

/// The CRC-32 GPT headers and entry arrays carry (IEEE, as zlib's).
fn crc32(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}

/// One GPT partition: type, unique GUID, name, the image that fills it.
struct Part<'a> {
    type_guid: [u8; 16],
    guid: [u8; 16],
    name: &'a str,
    image: &'a Path,
}

/// Writes a GPT disk (protective MBR, primary and backup headers, 128 entries) holding `parts`,
/// each aligned to 1 MiB.
fn write_gpt(out: &Path, disk_guid: [u8; 16], parts: &[Part]) -> Result<(), RootfsError> {
    let mut layout = Vec::new();
    let mut next = ALIGN;
    for p in parts {
        let len = fs_err::metadata(p.image).map_err(io("stat", p.image))?.len().div_ceil(ALIGN) * ALIGN;
        layout.push((next / SECTOR, (next + len) / SECTOR - 1));
        next += len;
    }
    let total_sectors = (next + ALIGN) / SECTOR;
    let mut entries = vec![0u8; 128 * 128];
    for (i, (p, (first, last))) in parts.iter().zip(&layout).enumerate() {
        let e = &mut entries[i * 128..(i + 1) * 128];
        e[..16].copy_from_slice(&p.type_guid);
        e[16..32].copy_from_slice(&p.guid);
        e[32..40].copy_from_slice(&first.to_le_bytes());
        e[40..48].copy_from_slice(&last.to_le_bytes());
        for (j, c) in p.name.encode_utf16().take(36).enumerate() {
            e[56 + 2 * j..58 + 2 * j].copy_from_slice(&c.to_le_bytes());
        }
    }
    let entries_crc = crc32(&entries);
    let header = |current: u64, backup: u64, entries_lba: u64| {
        let mut h = vec![0u8; 92];
        h[..8].copy_from_slice(b"EFI PART");
        h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        h[12..16].copy_from_slice(&92u32.to_le_bytes());
        h[24..32].copy_from_slice(&current.to_le_bytes());
        h[32..40].copy_from_slice(&backup.to_le_bytes());
        h[40..48].copy_from_slice(&(ALIGN / SECTOR).to_le_bytes());
        h[48..56].copy_from_slice(&(total_sectors - 34).to_le_bytes());
        h[56..72].copy_from_slice(&disk_guid);
        h[72..80].copy_from_slice(&entries_lba.to_le_bytes());
        h[80..84].copy_from_slice(&128u32.to_le_bytes());
        h[84..88].copy_from_slice(&128u32.to_le_bytes());
        h[88..92].copy_from_slice(&entries_crc.to_le_bytes());
        let crc = crc32(&h);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        h
    };
    let last_lba = total_sectors - 1;
    let mut mbr = vec![0u8; 512];
    mbr[446 + 4] = 0xee;
    mbr[446 + 1..446 + 4].copy_from_slice(&[0, 2, 0]);
    mbr[446 + 5..446 + 8].copy_from_slice(&[0xff, 0xff, 0xff]);
    mbr[446 + 8..446 + 12].copy_from_slice(&1u32.to_le_bytes());
    mbr[446 + 12..446 + 16].copy_from_slice(&(u32::try_from(last_lba).unwrap_or(u32::MAX)).to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xaa;

    let werr = |source| RootfsError::Io(crate::util::fs::PathError { doing: "write the disk", path: out.to_owned(), source });
    let mut f = fs_err::File::create(out).map_err(io("create", out))?;
    f.set_len(total_sectors * SECTOR).map_err(werr)?;
    f.write_all(&mbr).map_err(werr)?;
    f.seek(SeekFrom::Start(SECTOR)).map_err(werr)?;
    f.write_all(&header(1, last_lba, 2)).map_err(werr)?;
    f.seek(SeekFrom::Start(2 * SECTOR)).map_err(werr)?;
    f.write_all(&entries).map_err(werr)?;
    f.seek(SeekFrom::Start((last_lba - 32) * SECTOR)).map_err(werr)?;
    f.write_all(&entries).map_err(werr)?;
    f.seek(SeekFrom::Start(last_lba * SECTOR)).map_err(werr)?;
    f.write_all(&header(last_lba, 1, last_lba - 32)).map_err(werr)?;
    for (p, (first, _)) in parts.iter().zip(&layout) {
        let mut src = fs_err::File::open(p.image).map_err(io("read", p.image))?;
        f.seek(SeekFrom::Start(first * SECTOR)).map_err(werr)?;
        copy_sparse(&mut src, &mut f).map_err(werr)?;
    }
    f.sync_all().map_err(werr)
}

/// Copies, seeking over all-zero blocks so the disk stays sparse.
fn copy_sparse(src: &mut impl std::io::Read, dst: &mut (impl Write + Seek)) -> std::io::Result<()> {
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let mut n = 0;
        while n < buf.len() {
            let r = src.read(&mut buf[n..])?;
            if r == 0 {
                break;
            }
            n += r;
        }
        if n == 0 {
            return Ok(());
        }
        if buf[..n].iter().all(|&b| b == 0) {
            dst.seek(SeekFrom::Current(n as i64))?;
        } else {
            dst.write_all(&buf[..n])?;
        }
        if n < buf.len() {
            return Ok(());
        }
    }
}

/// `.img` / `.qcow2`: the ext4 root alone, or with `boot` a GPT disk with ESP + root.
#[allow(clippy::too_many_arguments)]
pub fn disk_image(
    root: &Path,
    out: &Path,
    work: &Path,
    format: Format,
    boot: Option<&Boot>,
    target: &Target,
    sde: u64,
    reporter: &dyn Reporter,
) -> Result<(), RootfsError> {
    // Seed for UUIDs: what is installed and when, so that the same build gets the same ids.
    let seed = format!("{}\n{sde}\n{}", target.name, super::release::package_list(&super::portage::installed(root)?));
    let fs = work.join("root.ext4");
    ext4(root, &fs, seed.as_bytes(), sde)?;
    let raw = match boot {
        None => fs,
        Some(boot) => {
            let target::Boot::Uefi { efi_arch, .. } = &target.boot else {
                return Err(RootfsError::Uki(uki::UkiError::NotUefi { target: target.name.clone() }));
            };
            let uki_path = work.join("uki.efi");
            make_uki(root, boot, target, &uki_path, reporter)?;
            let esp_path = work.join("esp.fat");
            esp(&uki_path, efi_arch, &esp_path, seed.as_bytes(), sde)?;
            let disk = work.join("disk.raw");
            write_gpt(
                &disk,
                uuid_from(seed.as_bytes(), "disk"),
                &[
                    Part { type_guid: guid_bytes(ESP_TYPE), guid: uuid_from(seed.as_bytes(), "esp"), name: "ESP", image: &esp_path },
                    Part { type_guid: guid_bytes(LINUX_FS_TYPE), guid: uuid_from(seed.as_bytes(), "root"), name: "root", image: &fs },
                ],
            )?;
            reporter.event(Event::Note { message: format!("bootable GPT disk: ESP with EFI/BOOT/BOOT{efi_arch}.EFI, root labelled {ROOT_LABEL}") });
            disk
        }
    };
    match format {
        Format::Qcow2 => {
            Cmd::new("qemu-img")
                .args(["convert", "-f", "raw", "-O", "qcow2"])
                .arg(&raw)
                .arg(out)
                .install_hint("qemu-utils (Debian) or app-emulation/qemu (Gentoo)")
                .output()?;
        }
        _ => fs_err::rename(&raw, out).map_err(io("move", out))?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_and_guids() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        let g = guid_bytes(ESP_TYPE);
        assert_eq!(&g[..4], &[0x28, 0x73, 0x2a, 0xc1]);
        assert_eq!(uuid_text(&uuid_from(b"x", "s")), uuid_text(&uuid_from(b"x", "s")));
    }
}
