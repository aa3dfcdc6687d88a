//! Unified Kernel Images: a systemd-stub with the kernel, initramfs, command line and os-release
//! appended as PE sections ([`pe`]), the initramfs dbh generates for guests ([`initramfs`]), and
//! where to find the stub for a target.
//!
//! The stub is looked up, in order: `--stub`; the target's stage (`/usr/lib/systemd/boot/efi/`);
//! the host's systemd-boot/systemd-stub directories (Debian `systemd-boot-efi`, Gentoo
//! `sys-apps/systemd-utils[boot]` / `sys-apps/systemd[boot]`). A foreign-arch stub can be fetched on
//! Debian without touching dpkg: `apt-get download systemd-boot-efi:arm64 && dpkg -x …`.

pub mod elf;
pub mod initramfs;
pub mod pe;

use std::path::{Path, PathBuf};

use crate::hint::Hint;
use crate::target::{Boot, Target};

pub use initramfs::InitramfsError;
pub use pe::PeError;

/// Directories holding systemd-stub files (`linux<efi arch>.efi.stub`), host or stage relative.
pub const STUB_DIRS: &[&str] = &["usr/lib/systemd/boot/efi", "lib/systemd/boot/efi", "usr/lib64/systemd/boot/efi"];

#[derive(Debug, thiserror::Error)]
pub enum UkiError {
    #[error("no systemd-stub `{stub}` for target `{target}` (looked in {looked})")]
    NoStub { target: String, stub: String, looked: String, debian_arch: String },
    #[error("target `{target}` boots its kernel directly (no UEFI in QEMU for it): it has no UKI")]
    NotUefi { target: String },
    #[error("{0}")]
    File(#[from] crate::util::fs::FileError),
    #[error("{0}")]
    Pe(#[from] PeError),
    #[error("{0}")]
    Initramfs(#[from] InitramfsError),
}

impl Hint for UkiError {
    fn hint(&self) -> Option<String> {
        match self {
            UkiError::NoStub { stub, debian_arch, .. } => Some(format!(
                "install systemd-boot-efi (Debian) or sys-apps/systemd-utils[boot] (Gentoo), or pass --stub FILE; \
                 for another architecture on Debian: `apt-get download systemd-boot-efi:{debian_arch}` and \
                 `dpkg -x` it, then pass --stub …/usr/lib/systemd/boot/efi/{stub}"
            )),
            _ => None,
        }
    }
}

/// The stub file name for a UEFI target.
pub fn stub_name(target: &Target) -> Result<&str, UkiError> {
    match &target.boot {
        Boot::Uefi { stub, .. } => Ok(stub),
        Boot::Direct => Err(UkiError::NotUefi { target: target.name.clone() }),
    }
}

/// Finds the target's systemd-stub: an explicit path wins, then the stage, then the host.
pub fn find_stub(target: &Target, explicit: Option<&Path>, stage: Option<&Path>) -> Result<PathBuf, UkiError> {
    if let Some(p) = explicit {
        return Ok(p.to_owned());
    }
    let name = stub_name(target)?;
    let mut looked = Vec::new();
    let roots: Vec<PathBuf> = stage.into_iter().map(Path::to_owned).chain([PathBuf::from("/")]).collect();
    for root in &roots {
        for dir in STUB_DIRS {
            let p = root.join(dir).join(name);
            if p.is_file() {
                return Ok(p);
            }
            looked.push(p.display().to_string());
        }
    }
    Err(UkiError::NoStub {
        target: target.name.clone(),
        stub: name.to_owned(),
        looked: looked.join(", "),
        debian_arch: target.debian_arch.clone(),
    })
}

/// The default kernel command line for a target's guest (see docs/vm-contract.md).
pub fn default_cmdline(target: &Target) -> String {
    format!(
        "root=LABEL={} rw console={},115200 panic=-1 net.ifnames=0",
        crate::image::ROOT_LABEL,
        target.qemu.console
    )
}

/// What goes into a UKI.
#[derive(Debug, Clone)]
pub struct UkiParts {
    pub stub: PathBuf,
    pub kernel: Vec<u8>,
    pub initrd: Vec<u8>,
    pub cmdline: String,
    pub osrel: String,
    pub uname: Option<String>,
}

/// Assembles the UKI (sections in ukify 257's order: .osrel .cmdline .uname .linux .initrd).
pub fn assemble(parts: &UkiParts) -> Result<Vec<u8>, UkiError> {
    let stub = fs_err::read(&parts.stub).map_err(|source| UkiError::File(crate::util::fs::FileError::Read { path: parts.stub.clone(), source }))?;
    let mut sections = vec![
        pe::NewSection { name: ".osrel".into(), data: parts.osrel.clone().into_bytes(), virtual_size: None },
        pe::NewSection { name: ".cmdline".into(), data: parts.cmdline.clone().into_bytes(), virtual_size: None },
    ];
    if let Some(uname) = &parts.uname {
        sections.push(pe::NewSection { name: ".uname".into(), data: uname.clone().into_bytes(), virtual_size: None });
    }
    sections.push(pe::NewSection { name: ".linux".into(), data: parts.kernel.clone(), virtual_size: None });
    // ukify leaves out what is empty; an empty .initrd would only confuse the stub.
    if !parts.initrd.is_empty() {
        sections.push(pe::NewSection { name: ".initrd".into(), data: parts.initrd.clone(), virtual_size: None });
    }
    Ok(pe::add_sections(&stub, &parts.stub, &sections)?)
}

/// Writes `data` to `path` atomically and durably ([`crate::util::fs::write_atomic`]).
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), UkiError> {
    crate::util::fs::write_atomic(path, data).map_err(|source| UkiError::File(crate::util::fs::FileError::Write { path: path.to_owned(), source }))
}

/// An os-release for the `.osrel` section: the root's own when it has one, else a dbh one.
pub fn os_release(root: Option<&Path>) -> String {
    root.and_then(|r| {
        ["etc/os-release", "usr/lib/os-release"].iter().find_map(|p| {
            // Follow the usual etc -> usr/lib symlink inside the root, not on the host.
            let path = r.join(p);
            match std::fs::read_link(&path) {
                Ok(t) if t.is_absolute() => std::fs::read_to_string(r.join(t.strip_prefix("/").ok()?)).ok(),
                Ok(t) => std::fs::read_to_string(path.parent()?.join(t)).ok(),
                Err(_) => std::fs::read_to_string(&path).ok(),
            }
        })
    })
    .unwrap_or_else(|| "ID=dbh\nNAME=\"dbh guest\"\nPRETTY_NAME=\"dbh guest\"\n".into())
}

/// The kernel version of a modules directory (`…/lib/modules/<version>`).
pub fn modules_version(modules: &Path) -> Option<String> {
    modules.file_name().map(|n| n.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::Targets;

    #[test]
    fn default_cmdline_follows_the_contract() {
        let t = Targets::builtin();
        assert_eq!(
            default_cmdline(t.get("arm64").unwrap()),
            "root=LABEL=dbh-root rw console=ttyAMA0,115200 panic=-1 net.ifnames=0"
        );
    }

    #[test]
    fn missing_stub_names_the_package() {
        let t = Targets::builtin();
        let dir = tempfile::tempdir().unwrap();
        match find_stub(t.get("riscv64").unwrap(), None, Some(dir.path())) {
            Ok(p) => assert!(p.starts_with("/usr") || p.starts_with("/lib")),
            Err(e) => {
                assert!(e.to_string().contains("linuxriscv64.efi.stub"), "{e}");
                assert!(e.hint().unwrap().contains("systemd-boot-efi:riscv64"));
            }
        }
        assert!(matches!(find_stub(t.get("ppc64le").unwrap(), None, None), Err(UkiError::NotUefi { .. })));
    }

    #[test]
    fn assemble_puts_sections_in_ukify_order() {
        let dir = tempfile::tempdir().unwrap();
        let stub = dir.path().join("stub.efi");
        std::fs::write(&stub, pe::tests::fake_stub()).unwrap();
        let uki = assemble(&UkiParts {
            stub,
            kernel: vec![9; 3000],
            initrd: vec![8; 2000],
            cmdline: "console=ttyS0".into(),
            osrel: os_release(None),
            uname: Some("6.1.0".into()),
        })
        .unwrap();
        let info = pe::tests::check_layout(&uki);
        let names: Vec<_> = info.sections.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, [".text", ".data", ".osrel", ".cmdline", ".uname", ".linux", ".initrd"]);
        assert!(info.section_data(&uki, ".initrd").unwrap() == [8; 2000], ".initrd holds the initramfs");
    }
}
