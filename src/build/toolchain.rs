//! The host's cross toolchain for a target: `<triplet>-gcc` found on PATH.
//!
//! Both the cross backend (Portage on the host, CBUILD ≠ CHOST) and distcc offload (the guest's
//! compiles run on the host) need the same compiler, so they find it here. The target file lists
//! triplets best first: crossdev's (= the target's CHOST) before distribution ones such as Debian's
//! `aarch64-linux-gnu`, whose triplet differs from Gentoo's CHOST.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use crate::hint::Hint;
use crate::target::Target;

/// A cross compiler for one target, found on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Toolchain {
    /// The triplet the tools are named by (`aarch64-linux-gnu`); may differ from the target's CHOST.
    pub triplet: String,
    /// `<triplet>-gcc`, absolute.
    pub gcc: PathBuf,
    /// `<triplet>-g++`, absolute, when installed.
    pub gxx: Option<PathBuf>,
}

impl Toolchain {
    /// Whether the compiler is named by the target's own CHOST (crossdev), so no name mapping is needed.
    pub fn matches_chost(&self, target: &Target) -> bool {
        self.triplet == target.chost
    }

    /// The tool `<triplet>-<tool>` (ar, ranlib, strip, ld, …) next to gcc, when it exists.
    pub fn tool(&self, tool: &str) -> Option<PathBuf> {
        let dir = self.gcc.parent()?;
        let path = dir.join(format!("{}-{tool}", self.triplet));
        crate::util::path::is_executable(&path).then_some(path)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ToolchainError {
    #[error("no cross compiler for target {target}: none of {} is on PATH", names(.triplets))]
    NotFound { target: String, triplets: Vec<String>, chost: String },
}

fn names(triplets: &[String]) -> String {
    if triplets.is_empty() {
        return "(the target file lists no [cross] triplets)".into();
    }
    triplets.iter().map(|t| format!("`{t}-gcc`")).collect::<Vec<_>>().join(", ")
}

impl Hint for ToolchainError {
    fn hint(&self) -> Option<String> {
        match self {
            ToolchainError::NotFound { target, triplets, chost } => {
                let debian = triplets.iter().find(|t| t.as_str() != chost).map_or_else(
                    String::new,
                    |t| format!(", on Debian/Ubuntu `apt-get install gcc-{t} g++-{t}`"),
                );
                Some(format!(
                    "on Gentoo run `crossdev --target {chost}`{debian}; or build in a guest with `--backend vm` \
                     (list more triplets under [cross] in the {target} target file)"
                ))
            }
        }
    }
}

/// Finds the target's cross compiler on `PATH`, trying the target's triplets in order.
pub fn find(target: &Target) -> Result<Toolchain, ToolchainError> {
    find_in(target, std::env::var_os("PATH").as_deref().unwrap_or_default())
}

/// [`find`] over an explicit search path (tests).
pub fn find_in(target: &Target, path: &OsStr) -> Result<Toolchain, ToolchainError> {
    for triplet in &target.cross.triplets {
        let Some(gcc) = search(path, &format!("{triplet}-gcc")) else { continue };
        let gxx = search(path, &format!("{triplet}-g++"));
        return Ok(Toolchain { triplet: triplet.clone(), gcc, gxx });
    }
    Err(ToolchainError::NotFound {
        target: target.name.clone(),
        triplets: target.cross.triplets.clone(),
        chost: target.chost.clone(),
    })
}

fn search(path: &OsStr, name: &str) -> Option<PathBuf> {
    crate::util::path::which_in(Path::new(name), Some(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::Targets;
    use std::os::unix::fs::PermissionsExt as _;

    fn fake_tool(dir: &Path, name: &str) {
        let path = dir.join(name);
        std::fs::write(&path, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn chost_triplet_wins_over_a_distribution_one() {
        let targets = Targets::builtin();
        let arm64 = targets.get("arm64").unwrap();
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        fake_tool(a.path(), "aarch64-linux-gnu-gcc");
        fake_tool(a.path(), "aarch64-linux-gnu-ar");
        fake_tool(b.path(), "aarch64-unknown-linux-gnu-gcc");
        let path = std::env::join_paths([a.path(), b.path()]).unwrap();
        let t = find_in(arm64, &path).unwrap();
        assert_eq!(t.triplet, "aarch64-unknown-linux-gnu");
        assert!(t.matches_chost(arm64));
        assert_eq!(t.gxx, None);

        let only_debian = std::env::join_paths([a.path()]).unwrap();
        let t = find_in(arm64, &only_debian).unwrap();
        assert_eq!(t.triplet, "aarch64-linux-gnu");
        assert!(!t.matches_chost(arm64));
        assert_eq!(t.tool("ar"), Some(a.path().join("aarch64-linux-gnu-ar")));
        assert_eq!(t.tool("ranlib"), None);
    }

    #[test]
    fn missing_compiler_names_the_triplets_and_the_packages() {
        let targets = Targets::builtin();
        let arm64 = targets.get("arm64").unwrap();
        let empty = tempfile::tempdir().unwrap();
        let err = find_in(arm64, empty.path().as_os_str()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no cross compiler for target arm64: none of `aarch64-unknown-linux-gnu-gcc`, `aarch64-linux-gnu-gcc` is on PATH"
        );
        let hint = err.hint().unwrap();
        assert!(hint.contains("crossdev --target aarch64-unknown-linux-gnu"), "{hint}");
        assert!(hint.contains("apt-get install gcc-aarch64-linux-gnu"), "{hint}");
        assert!(hint.contains("--backend vm"), "{hint}");
    }
}
