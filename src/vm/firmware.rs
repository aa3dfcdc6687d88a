//! Finding the UEFI firmware (code + vars template) for a target.
//!
//! QEMU's firmware descriptors (`/usr/share/qemu/firmware/*.json`, docs/interop/firmware.json) come
//! first: they are what the distribution says goes with its QEMU. Among them dbh takes flash-mapped
//! firmware for the target's architecture and machine, preferring images without Secure Boot and
//! without enrolled keys (a test guest's UKI is unsigned). Then the known paths of the target file.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::VmError;
use crate::target::{Boot, Target};

/// The firmware pair a UEFI guest boots: read-only code and the template of its variable store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Firmware {
    pub code: PathBuf,
    pub vars: PathBuf,
    /// The descriptor it came from, or `None` for a known path of the target file.
    pub descriptor: Option<PathBuf>,
}

/// The system's descriptor directories, lowest priority first (QEMU's documented search order is
/// /usr/share, /etc, then the user's; a same-named file in a later one overrides).
pub const DESCRIPTOR_DIRS: &[&str] = &["/usr/share/qemu/firmware", "/etc/qemu/firmware"];

#[derive(Debug, Deserialize)]
struct Descriptor {
    #[serde(rename = "interface-types", default)]
    interface_types: Vec<String>,
    mapping: Mapping,
    #[serde(default)]
    targets: Vec<DescTarget>,
    #[serde(default)]
    features: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct Mapping {
    device: String,
    executable: Option<FlashFile>,
    #[serde(rename = "nvram-template")]
    nvram_template: Option<FlashFile>,
}

#[derive(Debug, Deserialize)]
struct FlashFile {
    filename: PathBuf,
    #[serde(default = "raw")]
    format: String,
}

fn raw() -> String {
    "raw".into()
}

#[derive(Debug, Deserialize)]
struct DescTarget {
    architecture: String,
    #[serde(default)]
    machines: Vec<String>,
}

/// Finds the firmware for `target` on this system.
pub fn find(target: &Target) -> Result<Firmware, VmError> {
    let dirs: Vec<PathBuf> = DESCRIPTOR_DIRS.iter().map(PathBuf::from).collect();
    find_in(target, &dirs, Path::new("/"))
}

/// [`find`] with explicit descriptor directories and a root under which every firmware path is
/// looked up (tests use a temporary tree).
pub fn find_in(target: &Target, descriptor_dirs: &[PathBuf], root: &Path) -> Result<Firmware, VmError> {
    let Boot::Uefi { firmware_arch, firmware_code, firmware_vars, .. } = &target.boot else {
        return Err(VmError::NoFirmwareNeeded { target: target.name.clone() });
    };
    let rooted = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
    if let Some(fw) = from_descriptors(firmware_arch, &target.qemu.machine, descriptor_dirs, &rooted) {
        return Ok(fw);
    }
    let code = firmware_code.iter().map(PathBuf::from).find(|p| rooted(p).is_file());
    let vars = firmware_vars.iter().map(PathBuf::from).find(|p| rooted(p).is_file());
    match (code, vars) {
        (Some(code), Some(vars)) => Ok(Firmware { code: rooted(&code), vars: rooted(&vars), descriptor: None }),
        _ => Err(VmError::FirmwareMissing {
            target: target.name.clone(),
            arch: firmware_arch.clone(),
            tried: firmware_code.iter().chain(firmware_vars).cloned().collect(),
        }),
    }
}

fn from_descriptors(
    arch: &str,
    machine: &str,
    dirs: &[PathBuf],
    rooted: &dyn Fn(&Path) -> PathBuf,
) -> Option<Firmware> {
    // Same file name in a later directory overrides; then files are considered in name order
    // (the numeric prefixes are the priority, as in QEMU/libvirt).
    let mut files: std::collections::BTreeMap<std::ffi::OsString, PathBuf> = Default::default();
    for dir in dirs {
        let Ok(entries) = fs_err::read_dir(rooted(dir)) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "json") {
                files.insert(entry.file_name(), path);
            }
        }
    }
    let machine_base = machine.split(',').next().unwrap_or(machine);
    let mut best: Option<(u8, Firmware)> = None;
    for path in files.values() {
        let Ok(text) = fs_err::read_to_string(path) else { continue };
        let Ok(desc) = serde_json::from_str::<Descriptor>(&text) else {
            tracing::debug!("ignoring unreadable firmware descriptor {}", path.display());
            continue;
        };
        if desc.mapping.device != "flash" || !desc.interface_types.iter().any(|t| t == "uefi") {
            continue;
        }
        let fits = desc.targets.iter().any(|t| {
            t.architecture == arch && t.machines.iter().any(|m| machine_matches(m, machine_base))
        });
        let (Some(code), Some(vars)) = (&desc.mapping.executable, &desc.mapping.nvram_template) else {
            continue;
        };
        if !fits || code.format != "raw" || vars.format != "raw" {
            continue;
        }
        if !rooted(&code.filename).is_file() || !rooted(&vars.filename).is_file() {
            continue;
        }
        let has = |f: &str| desc.features.iter().any(|x| x == f);
        // Lower is better: plain, then Secure Boot without keys, then enrolled keys. SMM-only
        // images need `-machine smm=on` which the target files do not ask for.
        let rank = u8::from(has("secure-boot")) + 2 * u8::from(has("enrolled-keys")) + u8::from(has("requires-smm"));
        if best.as_ref().is_none_or(|(r, _)| rank < *r) {
            best = Some((
                rank,
                Firmware {
                    code: rooted(&code.filename),
                    vars: rooted(&vars.filename),
                    descriptor: Some(path.clone()),
                },
            ));
        }
    }
    best.map(|(_, fw)| fw)
}

/// A descriptor's machine pattern (`virt-*`, `pc-q35-*`) against the target's machine (`virt`, `q35`):
/// the short names are QEMU aliases of the newest versioned machine.
fn machine_matches(pattern: &str, machine: &str) -> bool {
    if glob(pattern, machine) {
        return true;
    }
    let stem = pattern.trim_end_matches('*').trim_end_matches('-');
    stem == machine || stem == format!("pc-{machine}")
}

fn glob(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((pre, rest)) => {
            text.starts_with(pre)
                && (0..=text.len() - pre.len()).any(|i| {
                    text.is_char_boundary(pre.len() + i) && glob(rest, &text[pre.len() + i..])
                })
        }
    }
}

/// Which package provides a target's firmware, for the error hint.
pub fn package_hint(arch: &str) -> String {
    let debian = match arch {
        "aarch64" => "qemu-efi-aarch64",
        "x86_64" => "ovmf",
        "riscv64" => "qemu-efi-riscv64 (Debian 13 trixie; bookworm has none)",
        "arm" => "qemu-efi-arm",
        _ => "the edk2 firmware package for this architecture",
    };
    format!("install {debian} (Debian) or sys-firmware/edk2-bin (Gentoo)")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::Targets;

    fn write(root: &Path, path: &str, text: &str) {
        let p = root.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    fn descriptor(code: &str, vars: &str, arch: &str, machine: &str, features: &[&str]) -> String {
        serde_json::json!({
            "interface-types": ["uefi"],
            "mapping": {"device": "flash",
                        "executable": {"filename": code, "format": "raw"},
                        "nvram-template": {"filename": vars, "format": "raw"}},
            "targets": [{"architecture": arch, "machines": [machine]}],
            "features": features,
        })
        .to_string()
    }

    #[test]
    fn descriptor_without_secure_boot_wins() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for f in ["/fw/sec.fd", "/fw/plain.fd", "/fw/vars.fd", "/fw/enrolled.fd"] {
            write(root, f, "x");
        }
        write(root, "/d/40-enrolled.json",
            &descriptor("/fw/enrolled.fd", "/fw/vars.fd", "x86_64", "pc-q35-*", &["secure-boot", "enrolled-keys"]));
        write(root, "/d/50-sec.json", &descriptor("/fw/sec.fd", "/fw/vars.fd", "x86_64", "pc-q35-*", &["secure-boot", "requires-smm"]));
        write(root, "/d/60-plain.json", &descriptor("/fw/plain.fd", "/fw/vars.fd", "x86_64", "pc-q35-*", &[]));
        write(root, "/d/61-arm.json", &descriptor("/fw/sec.fd", "/fw/vars.fd", "aarch64", "virt-*", &[]));
        let t = Targets::builtin();
        let fw = find_in(t.get("amd64").unwrap(), &[PathBuf::from("/d")], root).unwrap();
        assert_eq!(fw.code, root.join("fw/plain.fd"));
        assert_eq!(fw.descriptor, Some(root.join("d/60-plain.json")));
        let fw = find_in(t.get("arm64").unwrap(), &[PathBuf::from("/d")], root).unwrap();
        assert_eq!(fw.code, root.join("fw/sec.fd"));
    }

    #[test]
    fn known_paths_when_no_descriptor_fits() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(root, "/usr/share/AAVMF/AAVMF_CODE.fd", "c");
        write(root, "/usr/share/qemu/edk2-arm-vars.fd", "v");
        let fw = find_in(Targets::builtin().get("arm64").unwrap(), &[], root).unwrap();
        assert_eq!(fw.code, root.join("usr/share/AAVMF/AAVMF_CODE.fd"));
        assert_eq!(fw.vars, root.join("usr/share/qemu/edk2-arm-vars.fd"));
        assert_eq!(fw.descriptor, None);
    }

    #[test]
    fn missing_firmware_names_target_and_package() {
        let dir = tempfile::tempdir().unwrap();
        let err = find_in(Targets::builtin().get("riscv64").unwrap(), &[], dir.path()).unwrap_err();
        assert!(err.to_string().contains("riscv64"), "{err}");
        use crate::hint::Hint;
        let hint = err.hint().unwrap();
        assert!(hint.contains("qemu-efi-riscv64") && hint.contains("sys-firmware/edk2-bin"), "{hint}");
    }

    #[test]
    fn direct_boot_targets_need_none() {
        let err = find_in(Targets::builtin().get("ppc64le").unwrap(), &[], Path::new("/")).unwrap_err();
        assert!(matches!(err, VmError::NoFirmwareNeeded { .. }));
    }

    #[test]
    fn machine_patterns() {
        assert!(machine_matches("virt-*", "virt"));
        assert!(machine_matches("pc-q35-*", "q35"));
        assert!(machine_matches("pc-q35-*", "pc-q35-10.0"));
        assert!(!machine_matches("pc-i440fx-*", "q35"));
        assert!(!machine_matches("virt-*", "sbsa-ref"));
    }

    #[test]
    fn this_hosts_arm64_firmware_comes_from_a_descriptor() {
        if !Path::new("/usr/share/qemu/firmware/60-edk2-aarch64.json").exists() {
            return;
        }
        let fw = find(Targets::builtin().get("arm64").unwrap()).unwrap();
        assert_eq!(fw.code, Path::new("/usr/share/AAVMF/AAVMF_CODE.fd"));
    }
}
