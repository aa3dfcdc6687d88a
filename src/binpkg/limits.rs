//! What dbh accepts from a binary package before it indexes or signs it: a build guest runs
//! ebuild code as root, so every metadata value and every image path is untrusted input.
//!
//! - Metadata: a cap per value (larger for values that never reach the index, such as
//!   `environment.bz2` or `NEEDED.ELF.2`), a cap per package ([`super::MAX_METADATA`]), times in
//!   a range every consumer can represent (an HTTP date ends in year 9999), numbers parsed with
//!   checked arithmetic.
//! - Image: the checks of Portage's `tar_safe_extract._check_member` (`portage/gpkg.py`) —
//!   no absolute names, no `..`, no duplicates, no device nodes or FIFOs, hard links only to
//!   members listed before — plus two Portage leaves to its on-disk `realpath` check: no member
//!   below a symlink member, and no symlink whose target climbs above the image root. GPKG
//!   images and XPAK images (converted on `add`) follow the same rules.

use std::collections::HashSet;

use super::Fault;

/// The last second that every consumer can show: 9999-12-31T23:59:59Z (HTTP dates, Portage's
/// `time.strftime`). A BUILD_TIME or TIMESTAMP beyond it is refused.
pub const MAX_TIME: u64 = 253_402_300_799;

/// Largest value of a key that goes into the `Packages` index (KEYWORDS, RDEPEND, …). Real
/// packages stay far below: the largest RDEPEND in ::gentoo is a few KiB.
pub const MAX_INDEX_VALUE: usize = 256 * 1024;

/// Largest value of any other metadata entry (environment.bz2, NEEDED.ELF.2 of a big package).
pub const MAX_VALUE: usize = 32 * 1024 * 1024;

/// Largest BUILD_ID: Portage compares them as integers, dbh keeps them in a u64 limited to the
/// signed range so that every reader (`_parse_build_id`, the index) agrees.
pub const MAX_BUILD_ID: u64 = i64::MAX as u64;

/// Most members an image may have (a texlive-sized package has ~200 000).
pub const MAX_IMAGE_ENTRIES: usize = 4_000_000;

/// Metadata keys whose value `scan` copies into the index (Portage's `_aux_cache_keys`).
fn goes_into_index(key: &str) -> bool {
    matches!(
        key,
        "BDEPEND" | "BUILD_ID" | "BUILD_TIME" | "CATEGORY" | "CHOST" | "DEFINED_PHASES" | "DEPEND" | "EAPI"
            | "IDEPEND" | "IUSE" | "KEYWORDS" | "LICENSE" | "PDEPEND" | "PF" | "PROPERTIES" | "PROVIDES"
            | "RDEPEND" | "repository" | "REQUIRES" | "RESTRICT" | "SLOT" | "USE" | "USER_PATCHES" | "DESCRIPTION"
    )
}

/// Checks a metadata value's length against its cap (before reading it, where the length is
/// announced).
pub(crate) fn check_len(key: &str, len: u64) -> Result<(), Fault> {
    let (cap, which) = if goes_into_index(key) {
        (MAX_INDEX_VALUE, "binpkg::MAX_INDEX_VALUE, for values copied into the index")
    } else {
        (MAX_VALUE, "binpkg::MAX_VALUE")
    };
    if len > cap as u64 {
        return Err(Fault::bad(format!(
            "metadata entry `{key}` is {len} bytes long, more than the {cap}-byte cap ({which})"
        )));
    }
    Ok(())
}

/// Checks one metadata value: its size cap and, for the numeric keys, its range.
pub(crate) fn check_value(key: &str, value: &[u8]) -> Result<(), Fault> {
    check_len(key, value.len() as u64)?;
    match key {
        "BUILD_TIME" => {
            number(key, value, MAX_TIME, "after 9999-12-31 (binpkg::MAX_TIME)")?;
        }
        "BUILD_ID" => {
            number(key, value, MAX_BUILD_ID, "larger than i64::MAX (binpkg::MAX_BUILD_ID)")?;
        }
        _ => {}
    }
    Ok(())
}

/// A decimal metadata number (surrounding whitespace allowed, as Portage strips it) ≤ `max`.
fn number(key: &str, value: &[u8], max: u64, beyond: &str) -> Result<Option<u64>, Fault> {
    let text = std::str::from_utf8(value).unwrap_or("").trim();
    if text.is_empty() {
        return Ok(None);
    }
    let shown: String = text.chars().take(40).collect();
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Fault::bad(format!("metadata entry `{key}` is `{shown}`, not a decimal number")));
    }
    match text.parse::<u64>() {
        Ok(n) if n <= max => Ok(Some(n)),
        _ => Err(Fault::bad(format!("metadata entry `{key}` is {shown}, {beyond}"))),
    }
}

/// The kind of an image member, as far as the rules care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    File,
    Dir,
    Symlink,
    HardLink,
    /// Character or block device, FIFO.
    Special,
    /// A PAX or GNU extension header (describes other members, is never extracted).
    Extension,
    Other(u8),
}

impl Kind {
    pub(crate) fn of(t: tar::EntryType) -> Kind {
        use tar::EntryType as E;
        match t {
            E::Regular | E::Continuous | E::GNUSparse => Kind::File,
            E::Directory => Kind::Dir,
            E::Symlink => Kind::Symlink,
            E::Link => Kind::HardLink,
            E::Char | E::Block | E::Fifo => Kind::Special,
            E::XGlobalHeader | E::XHeader | E::GNULongName | E::GNULongLink => Kind::Extension,
            other => Kind::Other(other.as_byte()),
        }
    }
}

/// Walks an image's members in order and refuses the first one that could leave the image root
/// when extracted (see the module docs).
pub(crate) struct ImageCheck {
    /// `Some("image")` for GPKG (every member lies under `image/`), `None` for XPAK.
    prefix: Option<&'static str>,
    seen: HashSet<Vec<u8>>,
    dirs: HashSet<Vec<u8>>,
    symlinks: HashSet<Vec<u8>>,
}

impl ImageCheck {
    pub(crate) fn gpkg() -> ImageCheck {
        ImageCheck { prefix: Some("image"), seen: HashSet::new(), dirs: HashSet::new(), symlinks: HashSet::new() }
    }

    pub(crate) fn xpak() -> ImageCheck {
        ImageCheck { prefix: None, seen: HashSet::new(), dirs: HashSet::new(), symlinks: HashSet::new() }
    }

    /// The member's path below the image root, normalised (`./` and empty components dropped).
    fn relative(&self, name: &[u8]) -> Result<Vec<Vec<u8>>, String> {
        let shown = String::from_utf8_lossy(name);
        if name.first() == Some(&b'/') {
            return Err(format!("`{shown}` is an absolute path"));
        }
        let mut comps: Vec<Vec<u8>> = Vec::new();
        for c in name.split(|b| *b == b'/') {
            match c {
                b"" | b"." => {}
                b".." => return Err(format!("`{shown}` contains `..` and could leave the image root")),
                c if c.contains(&0) => return Err(format!("`{shown}` contains a NUL byte")),
                c => comps.push(c.to_vec()),
            }
        }
        if let Some(prefix) = self.prefix {
            if comps.first().map(Vec::as_slice) != Some(prefix.as_bytes()) {
                return Err(format!("`{shown}` is not under `{prefix}/`"));
            }
            comps.remove(0);
        }
        Ok(comps)
    }

    /// Checks the next member: `name` as stored, its kind, and its link target when it has one.
    pub(crate) fn entry(&mut self, name: &[u8], kind: Kind, link: Option<&[u8]>) -> Result<(), Fault> {
        if kind == Kind::Extension {
            return Ok(());
        }
        let shown = String::from_utf8_lossy(name).into_owned();
        let bad = |why: String| Fault::bad(format!("image member {why}"));
        if self.seen.len() >= MAX_IMAGE_ENTRIES {
            return Err(bad(format!("count exceeds {MAX_IMAGE_ENTRIES} (binpkg::MAX_IMAGE_ENTRIES)")));
        }
        let comps = self.relative(name).map_err(bad)?;
        let key = comps.join(&b'/');
        if comps.is_empty() {
            // The root itself (`./`, `image/`): only as a directory, and only once.
            return match kind {
                Kind::Dir if self.dirs.insert(Vec::new()) => Ok(()),
                _ => Err(bad(format!("`{shown}` names the image root itself"))),
            };
        }
        for i in 1..comps.len() {
            if self.symlinks.contains(&comps[..i].join(&b'/')) {
                return Err(bad(format!("`{shown}` lies below a symlink member, which could point outside the image")));
            }
        }
        if !self.seen.insert(key.clone()) {
            return Err(bad(format!("`{shown}` is listed twice")));
        }
        match kind {
            Kind::File | Kind::Extension => {}
            Kind::Dir => {
                self.dirs.insert(key);
            }
            Kind::Special => return Err(bad(format!("`{shown}` is a device node or FIFO"))),
            Kind::Other(t) => return Err(bad(format!("`{shown}` has tar type `{}`, which dbh does not publish", t as char))),
            Kind::Symlink => {
                let target = link.unwrap_or_default();
                let tshown = String::from_utf8_lossy(target);
                if target.is_empty() || target.contains(&0) {
                    return Err(bad(format!("`{shown}` is a symlink with an empty or NUL-containing target")));
                }
                // Absolute targets are relative to the root the package is installed into;
                // relative ones start at the link's directory. Neither may climb above the root.
                let mut at: Vec<&[u8]> = if target[0] == b'/' {
                    Vec::new()
                } else {
                    comps[..comps.len() - 1].iter().map(Vec::as_slice).collect()
                };
                for c in target.split(|b| *b == b'/') {
                    match c {
                        b"" | b"." => {}
                        b".." => {
                            if at.pop().is_none() {
                                return Err(bad(format!("`{shown}` is a symlink to `{tshown}`, which leaves the image root")));
                            }
                        }
                        c => at.push(c),
                    }
                }
                self.symlinks.insert(key);
            }
            Kind::HardLink => {
                let target = link.unwrap_or_default();
                let tshown = String::from_utf8_lossy(target).into_owned();
                let tcomps = self
                    .relative(target)
                    .map_err(|why| bad(format!("`{shown}` is a hard link whose target {why}")))?;
                let tkey = tcomps.join(&b'/');
                if tkey == key || !self.seen.contains(&tkey) || self.dirs.contains(&tkey) || self.symlinks.contains(&tkey) {
                    return Err(bad(format!(
                        "`{shown}` is a hard link to `{tshown}`, which is not a file listed before it in the image"
                    )));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(members: &[(&str, Kind, Option<&str>)]) -> Result<(), String> {
        let mut c = ImageCheck::gpkg();
        for (n, k, l) in members {
            c.entry(n.as_bytes(), *k, l.map(str::as_bytes)).map_err(|f| format!("{f:?}"))?;
        }
        Ok(())
    }

    #[test]
    fn portage_images_pass() {
        check(&[
            ("image/", Kind::Dir, None),
            ("image/usr/", Kind::Dir, None),
            ("image/usr/bin/", Kind::Dir, None),
            ("image/usr/bin/hello", Kind::File, None),
            ("image/usr/bin/hi", Kind::HardLink, Some("image/usr/bin/hello")),
            ("image/usr/bin/hey", Kind::Symlink, Some("hello")),
            ("image/usr/lib/libx.so", Kind::Symlink, Some("../lib64/libx.so.1")),
            ("image/etc/localtime", Kind::Symlink, Some("/usr/share/zoneinfo/UTC")),
        ])
        .unwrap();
    }

    #[test]
    fn escapes_are_refused() {
        for (members, what) in [
            (vec![("image/../../../../etc/cron.d/evil", Kind::File, None)], "`..`"),
            (vec![("/etc/abs-evil", Kind::File, None)], "absolute"),
            (vec![("etc/evil", Kind::File, None)], "not under `image/`"),
            (vec![("image/etc/shadow", Kind::Symlink, Some("../../../../etc/shadow"))], "leaves the image root"),
            (vec![("image/x", Kind::Symlink, Some("/../etc/shadow"))], "leaves the image root"),
            (vec![("image/etc", Kind::Symlink, Some("/etc")), ("image/etc/cron.d/evil", Kind::File, None)], "below a symlink"),
            (vec![("image/x", Kind::HardLink, Some("/etc/shadow"))], "absolute"),
            (vec![("image/x", Kind::HardLink, Some("image/y"))], "listed before"),
            (vec![("image/a", Kind::File, None), ("image/./a", Kind::File, None)], "twice"),
            (vec![("image/dev/sda", Kind::Special, None)], "device node"),
        ] {
            let e = check(&members).unwrap_err();
            assert!(e.contains(what), "{members:?}: {e}");
        }
    }

    #[test]
    fn values_have_caps_and_ranges() {
        assert!(check_value("BUILD_TIME", b"1700000000\n").is_ok());
        assert!(check_value("BUILD_TIME", b"253402300799").is_ok());
        for bad in ["253402300800", "18446744073709551615", "18446744073709551616", "-1", "1e9"] {
            let e = format!("{:?}", check_value("BUILD_TIME", bad.as_bytes()).unwrap_err());
            assert!(e.contains("BUILD_TIME"), "{e}");
        }
        assert!(check_value("BUILD_ID", b"9223372036854775807").is_ok());
        assert!(check_value("BUILD_ID", b"9223372036854775808").is_err());
        let big = vec![b'a'; MAX_INDEX_VALUE + 1];
        let e = format!("{:?}", check_value("KEYWORDS", &big).unwrap_err());
        assert!(e.contains("KEYWORDS") && e.contains("MAX_INDEX_VALUE"), "{e}");
        assert!(check_value("NEEDED.ELF.2", &big).is_ok());
    }
}
