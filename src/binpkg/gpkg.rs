//! GPKG (GLEP 78): an uncompressed tar whose members sit in one directory named like the file
//! (`<PF>-<BUILD_ID>/`): `gpkg-1`, `metadata.tar.<comp>`, `image.tar.<comp>`, optional `<member>.sig`
//! (armored detached signatures), and `Manifest` (clear-signed when the package is signed).

use std::io::Read;
use std::path::Path;

use super::compression::Compression;
use super::manifest::{self, Line};
use super::tarfmt::{self, Section, Source};
use super::{Fault, Metadata, MAX_METADATA};

pub const VERSION_MEMBER: &str = "gpkg-1";
pub const MANIFEST_MEMBER: &str = "Manifest";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Version,
    Metadata(Compression),
    Image(Compression),
    /// Armored detached signature of the member named without `.sig`.
    Signature,
    Manifest,
}

/// One member of the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Name inside the top directory (`metadata.tar.zst`).
    pub name: String,
    pub size: u64,
    /// Where its data starts in the file.
    pub offset: u64,
    pub mtime: u64,
    pub role: Role,
}

/// The container's structure, as [`layout`] found and checked it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The one top directory (`hello-1.0-1`).
    pub top: String,
    /// Members in container order.
    pub members: Vec<Member>,
    /// The Manifest exactly as stored (clear-signed or not).
    pub manifest_raw: Vec<u8>,
    /// Its DATA lines, from the cleartext (not verified here).
    pub manifest: Vec<Line>,
    /// `.sig` members present or the Manifest clear-signed.
    pub signed: bool,
}

impl Layout {
    pub fn member(&self, name: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.name == name)
    }

    pub fn metadata_member(&self) -> &Member {
        self.members.iter().find(|m| matches!(m.role, Role::Metadata(_))).expect("layout() checked")
    }

    pub fn image_member(&self) -> &Member {
        self.members.iter().find(|m| matches!(m.role, Role::Image(_))).expect("layout() checked")
    }

    pub fn manifest_line(&self, name: &str) -> Option<&Line> {
        self.manifest.iter().find(|l| l.name == name)
    }
}

fn classify(name: &str, full: &str) -> Result<Role, Fault> {
    if name == VERSION_MEMBER {
        return Ok(Role::Version);
    }
    if name == MANIFEST_MEMBER {
        return Ok(Role::Manifest);
    }
    if name.ends_with(".sig") {
        return Ok(Role::Signature);
    }
    for (stem, role) in [("metadata", Role::Metadata as fn(Compression) -> Role), ("image", Role::Image)] {
        if let Some(rest) = name.strip_prefix(stem).filter(|r| r.starts_with(".tar")) {
            return match Compression::split(name) {
                Some((s, c)) if s == stem => Ok(role(c)),
                _ => Err(Fault::Compression {
                    member: full.to_owned(),
                    compression: format!("an unknown compression (`{}`)", &rest[4..]),
                }),
            };
        }
    }
    Err(Fault::bad(format!("unexpected member `{full}` (a GPKG holds gpkg-1, metadata.tar.*, image.tar.*, *.sig and Manifest)")))
}

/// Reads and checks the container: one top directory, regular files only, no duplicates, no
/// names leaving the directory, exactly one of each required member, and a Manifest that lists
/// exactly the members with their sizes.
pub(crate) fn layout<S: Source + ?Sized>(src: &S) -> Result<Layout, Fault> {
    if src.len() == 0 {
        return Err(Fault::bad("the file is empty".into()));
    }
    let entries = tarfmt::list(src)?;
    if entries.is_empty() {
        return Err(Fault::bad("the tar archive has no members".into()));
    }
    let mut top: Option<(String, String)> = None;
    let mut members: Vec<Member> = Vec::new();
    for e in &entries {
        let full = e.name.as_str();
        if full.starts_with('/') {
            return Err(Fault::bad(format!("member `{full}` is an absolute path")));
        }
        let parts: Vec<&str> = full.split('/').collect();
        if parts.contains(&"..") {
            return Err(Fault::bad(format!("member `{full}` points outside the package directory")));
        }
        if parts.len() != 2 || parts.iter().any(|p| p.is_empty() || *p == ".") {
            return Err(Fault::bad(format!("member `{full}` is not a file directly inside the package's top directory")));
        }
        match &top {
            None => top = Some((parts[0].to_owned(), full.to_owned())),
            Some((t, first)) if t != parts[0] => {
                return Err(Fault::bad(format!("members are not in one top directory: `{first}` and `{full}`")));
            }
            Some(_) => {}
        }
        if e.kind != b'0' {
            return Err(Fault::bad(format!("member `{full}` is not a regular file")));
        }
        let name = parts[1];
        if members.iter().any(|m| m.name == name) {
            return Err(Fault::bad(format!("member `{full}` is listed twice")));
        }
        let role = classify(name, full)?;
        members.push(Member { name: name.to_owned(), size: e.size, offset: e.offset, mtime: e.mtime, role });
    }
    let (top, _) = top.expect("entries is not empty");
    let count = |f: fn(&Role) -> bool| members.iter().filter(|m| f(&m.role)).count();
    if count(|r| *r == Role::Version) == 0 {
        return Err(Fault::bad("there is no `gpkg-1` member: not a GPKG".into()));
    }
    for (what, n) in [
        ("metadata.tar.*", count(|r| matches!(r, Role::Metadata(_)))),
        ("image.tar.*", count(|r| matches!(r, Role::Image(_)))),
    ] {
        if n != 1 {
            return Err(Fault::bad(format!("it has {n} `{what}` members instead of one")));
        }
    }
    for m in members.iter().filter(|m| m.role == Role::Signature) {
        let base = &m.name[..m.name.len() - 4];
        if !members.iter().any(|o| o.name == base && o.role != Role::Signature) {
            return Err(Fault::bad(format!("signature `{top}/{}` belongs to no member", m.name)));
        }
    }
    let Some(man) = members.iter().find(|m| m.role == Role::Manifest) else {
        return Err(Fault::bad("there is no Manifest member".into()));
    };
    if man.size > manifest::MAX_MANIFEST {
        return Err(Fault::bad(format!("the Manifest is {} bytes long, more than dbh accepts", man.size)));
    }
    let mut manifest_raw = vec![0u8; man.size as usize];
    if !src.read_exact_at(man.offset, &mut manifest_raw).map_err(Fault::Io)? {
        return Err(Fault::truncated("inside the Manifest"));
    }
    let lines = manifest::parse(&manifest::cleartext(&manifest_raw)?)?;
    for m in members.iter().filter(|m| m.role != Role::Manifest) {
        match lines.iter().find(|l| l.name == m.name) {
            None => {
                return Err(Fault::Digest { member: m.name.clone(), reason: "is not listed in the Manifest".into() });
            }
            Some(l) if l.size != m.size => {
                return Err(Fault::Digest {
                    member: m.name.clone(),
                    reason: format!("is {} bytes long, the Manifest says {}", m.size, l.size),
                });
            }
            Some(_) => {}
        }
    }
    if let Some(l) = lines.iter().find(|l| !members.iter().any(|m| m.name == l.name && m.role != Role::Manifest)) {
        return Err(Fault::Digest { member: l.name.clone(), reason: "is listed in the Manifest but missing from the package".into() });
    }
    let signed = manifest::is_signed(&manifest_raw) || members.iter().any(|m| m.role == Role::Signature);
    Ok(Layout { top, members, manifest_raw, manifest: lines, signed })
}

/// Reads a member whole (only for the small ones: metadata, signatures).
pub(crate) fn member_bytes<S: Source + ?Sized>(src: &S, m: &Member, limit: u64) -> Result<Vec<u8>, Fault> {
    if m.size > limit {
        return Err(Fault::bad(format!("member `{}` is {} bytes long, more than dbh accepts", m.name, m.size)));
    }
    let mut buf = vec![0u8; m.size as usize];
    if !src.read_exact_at(m.offset, &mut buf).map_err(Fault::Io)? {
        return Err(Fault::truncated(&format!("inside `{}`", m.name)));
    }
    Ok(buf)
}

/// A member as a stream.
pub(crate) fn member_reader<'a, S: Source + ?Sized>(src: &'a S, m: &Member) -> Section<'a, S> {
    Section::new(src, m.offset, m.size)
}

/// Checks a member's bytes against its Manifest line.
pub(crate) fn check_digest(layout: &Layout, name: &str, got: &Line) -> Result<(), Fault> {
    let want = layout.manifest_line(name).ok_or_else(|| Fault::Digest {
        member: name.to_owned(),
        reason: "is not listed in the Manifest".into(),
    })?;
    manifest::check(want, got).map_err(|reason| Fault::Digest { member: name.to_owned(), reason })
}

/// Parses the (decompressed) metadata tar: regular `metadata/<KEY>` files only.
pub(crate) fn parse_metadata_tar(data: impl Read, member: &str, path: &Path) -> Result<Metadata, Fault> {
    let mut limited = data.take(MAX_METADATA + 1);
    let mut md = Metadata::new(path);
    let bad = |e: std::io::Error| Fault::bad(format!("`{member}` cannot be read: {e}"));
    {
        let mut ar = tar::Archive::new(&mut limited);
        for entry in ar.entries().map_err(bad)? {
            let mut entry = entry.map_err(bad)?;
            let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            if !entry.header().entry_type().is_file() {
                return Err(Fault::bad(format!("`{member}` holds `{name}`, which is not a regular file")));
            }
            let Some(key) = name.strip_prefix("metadata/") else {
                return Err(Fault::bad(format!("`{member}` holds `{name}`, which is not under `metadata/`")));
            };
            let mut value = Vec::with_capacity(entry.size().min(1 << 20) as usize);
            entry.read_to_end(&mut value).map_err(bad)?;
            md.add(key, value)?;
        }
    }
    if limited.limit() == 0 {
        return Err(Fault::bad(format!("`{member}` unpacks to more than {MAX_METADATA} bytes")));
    }
    Ok(md)
}

/// Reads the metadata member: checks its hashes against the Manifest, decompresses it in memory.
pub(crate) fn metadata<S: Source + ?Sized>(src: &S, layout: &Layout, path: &Path) -> Result<Metadata, Fault> {
    let m = layout.metadata_member();
    let Role::Metadata(comp) = m.role else { unreachable!("metadata_member") };
    let bytes = member_bytes(src, m, MAX_METADATA)?;
    check_digest(layout, &m.name, &manifest::Hasher::of(&m.name, &bytes))?;
    let dec = comp.decoder(&bytes[..], &m.name)?;
    parse_metadata_tar(dec, &m.name, path)
}
