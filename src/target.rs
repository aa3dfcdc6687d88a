//! Targets: every per-architecture fact dbh needs, as data.
//!
//! Built-in targets are the `vm-images/*.toml` files of the source tree, embedded in the binary.
//! A file of the same name in `/etc/dbh/vm-images/` or `$XDG_CONFIG_HOME/dbh/vm-images/` replaces
//! the built-in one; other names there add targets. A target name is also its binhost's URL path
//! segment (`http://host:8080/<target>/`), so names are restricted to `[a-z0-9][a-z0-9._-]*`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::hint::Hint;

/// The built-in target files, embedded at compile time.
const BUILTIN: &[(&str, &str)] = &[
    ("arm64", include_str!("../vm-images/arm64.toml")),
    ("amd64", include_str!("../vm-images/amd64.toml")),
    ("riscv64", include_str!("../vm-images/riscv64.toml")),
    ("ppc64le", include_str!("../vm-images/ppc64le.toml")),
];

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("unknown target `{name}`")]
    Unknown { name: String, known: Vec<String> },
    #[error("target file {path} is invalid")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("target file {path} defines `{found}`, but its file name says `{expected}`")]
    NameMismatch { path: PathBuf, expected: String, found: String },
    #[error("`{name}` is not a valid target name (from {path})")]
    BadName { name: String, path: PathBuf },
    #[error("cannot read target directory {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Hint for TargetError {
    fn hint(&self) -> Option<String> {
        match self {
            TargetError::Unknown { known, .. } => Some(format!(
                "known targets: {}; add your own as $XDG_CONFIG_HOME/dbh/vm-images/<name>.toml",
                known.join(", ")
            )),
            TargetError::NameMismatch { .. } => Some("rename the file or fix its `name` key".into()),
            TargetError::BadName { .. } => {
                Some("use lower-case letters, digits, `.`, `_` and `-`, starting with a letter or digit".into())
            }
            _ => None,
        }
    }
}

/// One build target: an architecture + profile + flavour, e.g. `arm64`, `arm64-musl`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Target {
    pub name: String,
    pub description: String,
    /// Portage's ARCH (e.g. `arm64`, `riscv`, `ppc64`).
    pub arch: String,
    /// The stable keyword packages need (`ACCEPT_KEYWORDS`).
    pub keyword: String,
    pub chost: String,
    /// Default profile as `eselect profile` names it, `REPO:PATH`.
    pub profile: String,
    /// What `uname -m` prints in the guest.
    pub uname_machine: String,
    /// ELF `e_machine` of the target's binaries.
    pub elf_machine: u16,
    /// Debian's name for the architecture (test guests are made from Debian packages).
    pub debian_arch: String,
    /// Where Gentoo publishes this target's stage3 (a directory URL).
    pub stage3_url: String,
    pub qemu: Qemu,
    pub boot: Boot,
    pub initramfs: Initramfs,
    #[serde(default)]
    pub cross: Cross,
    /// Where the definition came from (a file path, or `built-in`).
    #[serde(skip)]
    pub source: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Qemu {
    pub binary: String,
    pub machine: String,
    pub cpu_tcg: String,
    pub cpu_kvm: String,
    pub memory_mib: u32,
    pub disk_device: String,
    pub net_device: String,
    /// The guest's serial console device name (`console=` on the kernel command line).
    pub console: String,
    #[serde(default)]
    pub extra_args: Vec<String>,
    /// Oldest QEMU that boots this target as configured ("8.1").
    #[serde(default)]
    pub min_version: Option<String>,
    /// Most vCPUs the machine takes as configured (arm64 `virt` with its default GICv2: 8).
    #[serde(default)]
    pub max_cpus: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Boot {
    /// EFI firmware boots a UKI from the ESP.
    Uefi {
        /// EFI architecture suffix (`BOOT<efi_arch>.EFI`).
        efi_arch: String,
        /// systemd-stub file name.
        stub: String,
        /// Architecture name in QEMU's firmware descriptors (`/usr/share/qemu/firmware/*.json`).
        firmware_arch: String,
        /// Known firmware code paths, tried in order after the descriptors.
        firmware_code: Vec<String>,
        firmware_vars: Vec<String>,
    },
    /// No UEFI for this machine in QEMU: kernel and initramfs are passed directly.
    Direct,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Initramfs {
    /// Kernel modules, in load order, needed to reach the root disk and the network.
    pub modules: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Cross {
    /// Compiler triplets to look for as `<triplet>-gcc`, best first (crossdev's CHOST first).
    #[serde(default)]
    pub triplets: Vec<String>,
    /// Packages (`cat/pn`) or categories (`cat/*`) known to cross-compile cleanly.
    #[serde(default)]
    pub safe: Vec<String>,
}

impl Target {
    pub fn is_uefi(&self) -> bool {
        matches!(self.boot, Boot::Uefi { .. })
    }

    /// The `PROFILE`'s path part (`default/linux/arm64/23.0`).
    pub fn profile_path(&self) -> &str {
        self.profile.split_once(':').map_or(&self.profile, |(_, p)| p)
    }
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
}

fn parse(text: &str, path: &Path, file_stem: &str, source: String) -> Result<Target, TargetError> {
    let mut target: Target =
        toml::from_str(text).map_err(|e| TargetError::Parse { path: path.to_owned(), source: e })?;
    if target.name != file_stem {
        return Err(TargetError::NameMismatch {
            path: path.to_owned(),
            expected: file_stem.to_owned(),
            found: target.name,
        });
    }
    if !valid_name(&target.name) {
        return Err(TargetError::BadName { name: target.name, path: path.to_owned() });
    }
    target.source = source;
    Ok(target)
}

/// All known targets by name.
#[derive(Debug, Clone)]
pub struct Targets {
    targets: BTreeMap<String, Target>,
}

impl Targets {
    /// Built-ins, then `/etc/dbh/vm-images`, then the user's config dir.
    pub fn load() -> Result<Targets, TargetError> {
        let mut dirs = vec![PathBuf::from("/etc/dbh/vm-images")];
        if let Some(cfg) = std::env::var_os("XDG_CONFIG_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        {
            dirs.push(cfg.join("dbh/vm-images"));
        }
        Self::load_from(&dirs)
    }

    pub fn builtin() -> Targets {
        Self::load_from(&[]).expect("built-in targets are valid (tested)")
    }

    pub fn load_from(dirs: &[PathBuf]) -> Result<Targets, TargetError> {
        let mut targets = BTreeMap::new();
        for (name, text) in BUILTIN {
            let path = PathBuf::from(format!("vm-images/{name}.toml"));
            targets.insert(name.to_string(), parse(text, &path, name, "built-in".into())?);
        }
        for dir in dirs {
            let entries = match fs_err::read_dir(dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => return Err(TargetError::Read { path: dir.clone(), source }),
            };
            let mut files: Vec<PathBuf> = entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "toml"))
                .collect();
            files.sort();
            for path in files {
                let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_owned();
                let text = fs_err::read_to_string(&path)
                    .map_err(|source| TargetError::Read { path: path.clone(), source })?;
                let target = parse(&text, &path, &stem, path.display().to_string())?;
                targets.insert(stem, target);
            }
        }
        Ok(Targets { targets })
    }

    pub fn get(&self, name: &str) -> Result<&Target, TargetError> {
        self.targets.get(name).ok_or_else(|| TargetError::Unknown {
            name: name.to_owned(),
            known: self.targets.keys().cloned().collect(),
        })
    }

    pub fn iter(&self) -> impl Iterator<Item = &Target> {
        self.targets.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_parse_and_cover_the_four_arches() {
        let t = Targets::builtin();
        let names: Vec<_> = t.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["amd64", "arm64", "ppc64le", "riscv64"]);
        let arm = t.get("arm64").unwrap();
        assert_eq!(arm.chost, "aarch64-unknown-linux-gnu");
        assert_eq!(arm.profile_path(), "default/linux/arm64/23.0");
        assert!(arm.is_uefi());
        assert!(!t.get("ppc64le").unwrap().is_uefi());
    }

    #[test]
    fn user_file_overrides_and_adds() {
        let dir = tempfile::tempdir().unwrap();
        let text = include_str!("../vm-images/arm64.toml").replace("name = \"arm64\"", "name = \"arm64-musl\"")
            .replace("aarch64-unknown-linux-gnu\"\nprofile", "aarch64-unknown-linux-musl\"\nprofile");
        std::fs::write(dir.path().join("arm64-musl.toml"), text).unwrap();
        let t = Targets::load_from(&[dir.path().to_owned()]).unwrap();
        let musl = t.get("arm64-musl").unwrap();
        assert_eq!(musl.chost, "aarch64-unknown-linux-musl");
        assert!(musl.source.ends_with("arm64-musl.toml"));
    }

    #[test]
    fn unknown_target_lists_known_ones() {
        let err = Targets::builtin().get("sparc").unwrap_err();
        assert_eq!(err.to_string(), "unknown target `sparc`");
        assert!(err.hint().unwrap().contains("amd64, arm64, ppc64le, riscv64"));
    }

    #[test]
    fn file_name_must_match_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("foo.toml"), include_str!("../vm-images/arm64.toml")).unwrap();
        let err = Targets::load_from(&[dir.path().to_owned()]).unwrap_err();
        assert!(matches!(err, TargetError::NameMismatch { .. }), "{err}");
    }
}
