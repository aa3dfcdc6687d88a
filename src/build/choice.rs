//! `--backend auto`: which backend builds a request, and why.
//!
//! Cross-compiling is fast but only trustworthy for packages known to cross-compile cleanly, so
//! `auto` takes the cross backend only when every requested atom is listed in the target file's
//! `[cross] safe` (`cat/pn` or `cat/*`) and the host has the target's cross compiler and a Portage;
//! anything else (a set, an unlisted package, no compiler, no emerge, no atom) builds in a guest.
//! The reason is part of the answer so the command can print it.

use super::BuildError;
use super::cross::HostPortage;
use super::toolchain::{Toolchain, ToolchainError};
use crate::target::Target;

/// A backend `auto` can pick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Picked {
    Cross(Toolchain),
    Vm,
}

/// The pick and a sentence saying why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub picked: Picked,
    pub reason: String,
}

impl Choice {
    pub fn backend_name(&self) -> &'static str {
        match self.picked {
            Picked::Cross(_) => "cross",
            Picked::Vm => "vm",
        }
    }
}

/// `cat/pn` of a package atom (`>=cat/pn-1.0-r1:0/1::repo[use]` → `cat/pn`); `None` for sets and
/// anything without a category.
pub fn atom_package(atom: &str) -> Option<String> {
    if atom.starts_with('@') {
        return None;
    }
    let versioned = atom.starts_with(['<', '>', '=', '~']);
    let mut s = atom.trim_start_matches(['<', '>', '=', '~', '!']);
    for sep in ["[", "::", ":"] {
        if let Some((head, _)) = s.split_once(sep) {
            s = head;
        }
    }
    let s = s.trim_end_matches('*');
    let (cat, mut pn) = s.split_once('/')?;
    if versioned {
        let mut parts: Vec<&str> = pn.split('-').collect();
        if parts.len() > 1 && parts.last().is_some_and(|p| p.len() > 1 && p.starts_with('r') && p[1..].bytes().all(|b| b.is_ascii_digit())) {
            parts.pop();
        }
        if parts.len() > 1 && parts.last().is_some_and(|p| p.starts_with(|c: char| c.is_ascii_digit())) {
            parts.pop();
        }
        let len = parts.join("-").len();
        pn = &pn[..len];
    }
    (!cat.is_empty() && !pn.is_empty()).then(|| format!("{cat}/{pn}"))
}

/// Whether `atom` is covered by the target's `[cross] safe` list.
pub fn is_cross_safe(target: &Target, atom: &str) -> bool {
    let Some(pkg) = atom_package(atom) else { return false };
    let cat = pkg.split_once('/').map_or("", |(c, _)| c);
    target.cross.safe.iter().any(|s| s == &pkg || s.strip_suffix("/*").is_some_and(|c| c == cat))
}

/// Picks the backend for `atoms` given the outcome of looking for the target's cross compiler and
/// for the host's Portage.
pub fn choose(
    target: &Target,
    atoms: &[String],
    toolchain: Result<Toolchain, ToolchainError>,
    portage: Result<HostPortage, BuildError>,
) -> Choice {
    let vm = |reason: String| Choice { picked: Picked::Vm, reason };
    if atoms.is_empty() {
        return vm(format!("no atom given: the {} world file is built in a guest", target.name));
    }
    let unsafe_atoms: Vec<&str> = atoms.iter().filter(|a| !is_cross_safe(target, a)).map(String::as_str).collect();
    if !unsafe_atoms.is_empty() {
        let listed = if target.cross.safe.is_empty() { "(none)".to_string() } else { target.cross.safe.join(", ") };
        return vm(format!(
            "{} {} not listed as cross-safe for {} (its [cross] safe list: {listed})",
            unsafe_atoms.join(", "),
            if unsafe_atoms.len() == 1 { "is" } else { "are" },
            target.name
        ));
    }
    let what = format!("{} {} listed as cross-safe for {}", atoms.join(", "), if atoms.len() == 1 { "is" } else { "are" }, target.name);
    match (toolchain, portage) {
        (Ok(t), Ok(_)) => {
            let reason = format!("{what} and {} was found", t.gcc.file_name().map_or_else(|| t.gcc.display().to_string(), |n| n.to_string_lossy().into_owned()));
            Choice { picked: Picked::Cross(t), reason }
        }
        (Err(e), _) => vm(format!("{what} but {e}")),
        (_, Err(e)) => vm(format!("{what} but {e} (set portage.emerge or DBH_PORTAGE_EMERGE to use a venv's)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::Targets;
    use std::path::PathBuf;

    fn arm64() -> Target {
        let mut t = Targets::builtin().get("arm64").unwrap().clone();
        t.cross.safe = vec!["dbh-test/*".into(), "app-misc/hello".into()];
        t
    }

    fn portage() -> Result<HostPortage, BuildError> {
        Ok(HostPortage { emerge: PathBuf::from("/usr/bin/emerge"), venv: None })
    }

    fn gcc() -> Toolchain {
        Toolchain { triplet: "aarch64-linux-gnu".into(), gcc: PathBuf::from("/usr/bin/aarch64-linux-gnu-gcc"), gxx: None }
    }

    #[test]
    fn atoms_reduce_to_their_package() {
        for (atom, pkg) in [
            ("dbh-test/hello", Some("dbh-test/hello")),
            (">=dbh-test/hello-1.0-r2:0/1::dbh-test[debug]", Some("dbh-test/hello")),
            ("=app-misc/foo-bar-2.1*", Some("app-misc/foo-bar")),
            ("~sys-libs/zlib-1.3", Some("sys-libs/zlib")),
            ("dev-libs/libfoo-2:3", Some("dev-libs/libfoo-2")),
            ("@world", None),
            ("hello", None),
        ] {
            assert_eq!(atom_package(atom).as_deref(), pkg, "{atom}");
        }
    }

    #[test]
    fn cross_when_every_atom_is_safe_and_a_compiler_exists() {
        let t = arm64();
        let c = choose(&t, &["dbh-test/hello".into(), "=app-misc/hello-1".into()], Ok(gcc()), portage());
        assert_eq!(c.picked, Picked::Cross(gcc()));
        assert_eq!(c.reason, "dbh-test/hello, =app-misc/hello-1 are listed as cross-safe for arm64 and aarch64-linux-gnu-gcc was found");
        assert_eq!(c.backend_name(), "cross");
    }

    #[test]
    fn vm_when_an_atom_is_not_listed_or_no_compiler() {
        let t = arm64();
        let c = choose(&t, &["dbh-test/hello".into(), "sys-libs/zlib".into(), "@world".into()], Ok(gcc()), portage());
        assert_eq!(c.picked, Picked::Vm);
        assert!(c.reason.starts_with("sys-libs/zlib, @world are not listed as cross-safe for arm64"), "{}", c.reason);
        let missing = super::super::toolchain::find_in(&t, std::ffi::OsStr::new("/nonexistent"));
        let c = choose(&t, &["dbh-test/greeter".into()], missing, portage());
        assert_eq!(c.picked, Picked::Vm);
        assert!(c.reason.starts_with("dbh-test/greeter is listed as cross-safe for arm64 but no cross compiler"), "{}", c.reason);
        let no_emerge = Err(BuildError::NoEmerge { looked: None });
        let c = choose(&t, &["dbh-test/greeter".into()], Ok(gcc()), no_emerge);
        assert_eq!(c.picked, Picked::Vm);
        assert!(c.reason.ends_with("but no `emerge` found on PATH (set portage.emerge or DBH_PORTAGE_EMERGE to use a venv's)"), "{}", c.reason);
        let c = choose(&t, &[], Ok(gcc()), portage());
        assert_eq!((c.picked, c.reason.as_str()), (Picked::Vm, "no atom given: the arm64 world file is built in a guest"));
    }
}
