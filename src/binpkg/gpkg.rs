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
    // Name lookups go through sets: a hostile package may have 100 000 members, and every
    // check below is one pass (a search per member made this quadratic).
    let mut names: std::collections::HashSet<String> = std::collections::HashSet::new();
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
        if !names.insert(name.to_owned()) {
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
    let signed_members: std::collections::HashSet<&str> =
        members.iter().filter(|m| m.role != Role::Signature).map(|m| m.name.as_str()).collect();
    for m in members.iter().filter(|m| m.role == Role::Signature) {
        let base = &m.name[..m.name.len() - 4];
        if !signed_members.contains(base) {
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
    let by_name: std::collections::HashMap<&str, &Line> = lines.iter().map(|l| (l.name.as_str(), l)).collect();
    for m in members.iter().filter(|m| m.role != Role::Manifest) {
        match by_name.get(m.name.as_str()) {
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
    let listed: std::collections::HashSet<&str> =
        members.iter().filter(|m| m.role != Role::Manifest).map(|m| m.name.as_str()).collect();
    if let Some(l) = lines.iter().find(|l| !listed.contains(l.name.as_str())) {
        return Err(Fault::Digest { member: l.name.clone(), reason: "is listed in the Manifest but missing from the package".into() });
    }
    let signed = manifest::is_signed(&manifest_raw) || members.iter().any(|m| m.role == Role::Signature);
    Ok(Layout { top, members, manifest_raw, manifest: lines, signed })
}

/// Reads a member whole (only for the small ones: metadata, signatures).
pub(crate) fn member_bytes<S: Source + ?Sized>(src: &S, m: &Member, limit: u64) -> Result<Vec<u8>, Fault> {
    if m.size > limit {
        return Err(Fault::bad(format!("member `{}` is {} bytes long, more than the {limit}-byte cap for it", m.name, m.size)));
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
            // The cap is checked on the announced size, before a byte is read into memory.
            super::limits::check_len(key, entry.size())?;
            let mut value = Vec::with_capacity(entry.size().min(1 << 20) as usize);
            entry.read_to_end(&mut value).map_err(bad)?;
            md.add(key, value)?;
        }
    }
    if limited.limit() == 0 {
        return Err(Fault::bad(format!(
            "`{member}` unpacks to more than {MAX_METADATA} bytes, the per-package metadata cap (binpkg::MAX_METADATA): a decompression bomb or a package dbh will not index"
        )));
    }
    Ok(md)
}

/// Reads the metadata member: checks its hashes against the Manifest, decompresses it in memory.
pub(crate) fn metadata<S: Source + ?Sized>(src: &S, layout: &Layout, path: &Path) -> Result<Metadata, Fault> {
    let m = layout.metadata_member();
    let Role::Metadata(comp) = m.role else { unreachable!("metadata_member") };
    let bytes = member_bytes(src, m, MAX_METADATA)?;
    check_digest(layout, &m.name, &manifest::Hasher::of(&m.name, &bytes))?;
    let dec = comp.slice_decoder(&bytes, &m.name)?;
    parse_metadata_tar(dec, &m.name, path)
}

/// What [`verify`] established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub format: super::Format,
    /// The package carries signatures.
    pub signed: bool,
    /// Signatures were checked against the given certificates (all good).
    pub signatures_checked: bool,
    /// Members whose hashes matched the Manifest.
    pub members: Vec<String>,
}

/// Reads through a stream, hashing what passes.
struct Hashing<R> {
    inner: R,
    hasher: manifest::Hasher,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Checks a package completely: every GPKG member's size and BLAKE2B/SHA512 against the Manifest
/// and, with `certs`, the clear-signed Manifest and each member's detached signature — the checks
/// Portage's `_verify_binpkg` makes before it installs. XPAK has no Manifest or signatures: its
/// layout is checked, and asking for signatures fails.
pub fn verify(path: &Path, certs: Option<&crate::sign::Verifier>) -> Result<Verified, super::BinpkgError> {
    let format = super::Format::of(path).ok_or_else(|| super::BinpkgError::UnknownFormat { path: path.to_owned() })?;
    let src = super::open(path)?;
    verify_source(&src, path, format, certs).map_err(|f| f.at(path))
}

pub(crate) fn verify_source<S: Source + Sync + ?Sized>(
    src: &S,
    path: &Path,
    format: super::Format,
    certs: Option<&crate::sign::Verifier>,
) -> Result<Verified, Fault> {
    if format == super::Format::Xpak {
        super::xpak::read(src, path)?;
        if certs.is_some() {
            return Err(Fault::Unsigned("it is an XPAK package, and XPAK cannot carry signatures".into()));
        }
        return Ok(Verified { format, signed: false, signatures_checked: false, members: Vec::new() });
    }
    let mut layout = layout(src)?;
    if let Some(certs) = certs {
        if !manifest::is_signed(&layout.manifest_raw) {
            return Err(Fault::Unsigned("its Manifest is not clear-signed".into()));
        }
        let text = certs
            .verify_cleartext(&layout.manifest_raw)
            .map_err(|source| Fault::Signature { member: MANIFEST_MEMBER.into(), source })?;
        let text = String::from_utf8(text).map_err(|_| Fault::bad("the signed Manifest is not UTF-8".into()))?;
        let signed_lines = manifest::parse(&text)?;
        if signed_lines != layout.manifest {
            // The text outside what the signature covers differs: trust only the signed part.
            return Err(Fault::Signature {
                member: MANIFEST_MEMBER.into(),
                source: crate::sign::SignError::BadSignature("the Manifest's text differs from what was signed".into()),
            });
        }
        layout.manifest = signed_lines;
    }
    let mut members = Vec::new();
    let by_name: std::collections::HashMap<&str, &Member> = layout.members.iter().map(|m| (m.name.as_str(), m)).collect();
    let lines: std::collections::HashMap<&str, &Line> = layout.manifest.iter().map(|l| (l.name.as_str(), l)).collect();
    for m in layout.members.iter().filter(|m| m.role != Role::Manifest) {
        let reader = Hashing { inner: member_reader(src, m), hasher: manifest::Hasher::new() };
        let needs_sig = certs.is_some() && matches!(m.role, Role::Metadata(_) | Role::Image(_));
        let line = if needs_sig {
            let certs = certs.expect("needs_sig");
            let sig_name = format!("{}.sig", m.name);
            let Some(sig) = by_name.get(sig_name.as_str()).copied() else {
                return Err(Fault::Unsigned(format!("`{}` has no signature member `{sig_name}`", m.name)));
            };
            let sig = member_bytes(src, sig, manifest::MAX_MANIFEST)?;
            let mut reader = reader;
            certs
                .verify_detached_reader(&mut reader, &sig)
                .map_err(|source| Fault::Signature { member: m.name.clone(), source })?;
            // The verifier may stop short of the end; hash whatever is left.
            std::io::copy(&mut reader, &mut std::io::sink()).map_err(Fault::Io)?;
            reader.hasher.line(&m.name)
        } else {
            let mut reader = reader;
            std::io::copy(&mut reader, &mut std::io::sink()).map_err(Fault::Io)?;
            reader.hasher.line(&m.name)
        };
        let want = lines.get(m.name.as_str()).ok_or_else(|| Fault::Digest {
            member: m.name.clone(),
            reason: "is not listed in the Manifest".into(),
        })?;
        manifest::check(want, &line).map_err(|reason| Fault::Digest { member: m.name.clone(), reason })?;
        members.push(m.name.clone());
    }
    metadata(src, &layout, path)?;
    Ok(Verified { format, signed: layout.signed, signatures_checked: certs.is_some(), members })
}

/// Walks the image of a GPKG (decompressing it, nothing is written) and refuses any member that
/// could leave the image root when extracted: the rules of [`super::limits::ImageCheck`], which
/// are Portage's extraction checks plus the symlink rules. `binhost add` runs this before it
/// signs anything, so what it publishes extracts cleanly with Portage and `rootfs build`.
pub fn check_image(path: &Path) -> Result<(), super::BinpkgError> {
    let src = super::open(path)?;
    check_image_source(&src).map_err(|f| f.at(path))
}

pub(crate) fn check_image_source<S: Source + ?Sized>(src: &S) -> Result<(), Fault> {
    let layout = layout(src)?;
    let image = layout.image_member();
    let Role::Image(comp) = image.role else { unreachable!("image_member") };
    let dec = comp.decoder(member_reader(src, image), &image.name)?;
    let mut ar = tar::Archive::new(dec);
    let bad = |e: std::io::Error| Fault::bad(format!("`{}` cannot be read: {e}", image.name));
    let mut check = super::limits::ImageCheck::gpkg();
    for entry in ar.entries().map_err(bad)? {
        let entry = entry.map_err(bad)?;
        let kind = super::limits::Kind::of(entry.header().entry_type());
        let link = entry.link_name_bytes();
        check.entry(&entry.path_bytes(), kind, link.as_deref())?;
    }
    Ok(())
}

/// How [`rewrite_gpkg`] and [`xpak_to_gpkg`] change a package.
#[derive(Default, Clone, Copy)]
pub struct Rewrite<'a> {
    /// Store this BUILD_ID in the metadata.
    pub build_id: Option<u64>,
    /// Sign like `gpkg-sign`: detached `.sig` for metadata and image, clear-signed Manifest.
    /// Without a signer the output is unsigned (old signatures would no longer match).
    pub signer: Option<&'a crate::sign::Signer>,
}

/// The top directory for a destination file: its name without `.gpkg.tar`; for other names (a
/// caller's temp file) `<PF>-<BUILD_ID>` as Portage names it, else the `fallback`.
fn top_for(dst: &Path, md: Option<&Metadata>, fallback: &str) -> String {
    let from_md = md.and_then(|md| {
        let pf = md.get("PF")?.trim();
        (!pf.is_empty() && !pf.contains('/')).then(|| match md.build_id() {
            Some(id) => format!("{pf}-{id}"),
            None => pf.to_owned(),
        })
    });
    let fallback = from_md.as_deref().unwrap_or(fallback);
    dst.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_suffix(".gpkg.tar"))
        .filter(|s| !s.is_empty())
        .unwrap_or(fallback)
        .to_owned()
}

/// Writes `metadata/<KEY>` files as an uncompressed tar, deterministic headers, stored order.
fn metadata_tar(md: &Metadata, mtime: u64) -> std::io::Result<Vec<u8>> {
    let mut w = tarfmt::Writer::new(Vec::new());
    for (key, value) in md.entries() {
        w.member(&format!("metadata/{key}"), value, mtime)?;
    }
    w.finish()
}

/// The output container, tracking Manifest lines and signing as Portage's `gpkg-sign` does.
struct Out<'a> {
    w: tarfmt::Writer<std::io::BufWriter<std::fs::File>>,
    top: String,
    lines: Vec<Line>,
    signer: Option<&'a crate::sign::Signer>,
    dst: &'a Path,
    mtime: u64,
}

impl Out<'_> {
    fn write_err(&self, e: std::io::Error) -> super::BinpkgError {
        super::BinpkgError::Write { path: self.dst.to_owned(), source: e }
    }

    fn small(&mut self, name: &str, data: &[u8]) -> Result<(), super::BinpkgError> {
        let full = format!("{}/{name}", self.top);
        let mtime = self.mtime;
        self.w.member(&full, data, mtime).map_err(|e| self.write_err(e))?;
        if name != MANIFEST_MEMBER {
            self.lines.push(manifest::Hasher::of(name, data));
        }
        Ok(())
    }

    /// A member whose bytes are at hand; signed when there is a signer.
    fn signed_small(&mut self, name: &str, data: &[u8]) -> Result<(), super::BinpkgError> {
        self.small(name, data)?;
        if let Some(signer) = self.signer {
            let sig = signer.sign_detached_armored(data).map_err(|e| Fault::Sign(e).at(self.dst))?;
            self.small(&format!("{name}.sig"), &sig)?;
        }
        Ok(())
    }

    /// A large member streamed from `r` (`size` bytes): copied, hashed and signed in one pass.
    /// Returns its Manifest line so the caller can compare it with the source's.
    fn streamed(
        &mut self,
        name: &str,
        size: u64,
        mtime: u64,
        mut r: impl Read,
        src_path: &Path,
    ) -> Result<Line, super::BinpkgError> {
        let full = format!("{}/{name}", self.top);
        self.w.begin(&full, size, mtime).map_err(|e| self.write_err(e))?;
        let mut signing = match self.signer {
            Some(s) => Some(s.detached().map_err(|e| Fault::Sign(e).at(self.dst))?),
            None => None,
        };
        let mut hasher = manifest::Hasher::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut copied = 0u64;
        loop {
            let n = match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Fault::Io(e).at(src_path)),
            };
            hasher.update(&buf[..n]);
            if let Some(s) = signing.as_mut() {
                std::io::Write::write_all(s, &buf[..n]).map_err(|e| self.write_err(e))?;
            }
            self.w.data(&buf[..n]).map_err(|e| self.write_err(e))?;
            copied += n as u64;
        }
        if copied != size {
            return Err(Fault::truncated(&format!("`{name}` ended after {copied} of {size} bytes")).at(src_path));
        }
        self.w.finish_member().map_err(|e| self.write_err(e))?;
        let line = hasher.line(name);
        self.lines.push(line.clone());
        if let Some(s) = signing {
            let sig = s.finish().map_err(|e| Fault::Sign(e).at(self.dst))?;
            self.small(&format!("{name}.sig"), &sig)?;
        }
        Ok(line)
    }

    fn finish(mut self) -> Result<(), super::BinpkgError> {
        let text: String = self.lines.iter().map(Line::to_text).collect();
        let manifest = match self.signer {
            Some(s) => s.sign_cleartext(text.as_bytes()).map_err(|e| Fault::Sign(e).at(self.dst))?,
            None => text.into_bytes(),
        };
        self.small(MANIFEST_MEMBER, &manifest)?;
        let dst = self.dst.to_owned();
        let werr = |e: std::io::Error| super::BinpkgError::Write { path: dst.clone(), source: e };
        let out = self.w.finish().map_err(werr)?;
        let file = out.into_inner().map_err(|e| werr(e.into_error()))?;
        file.sync_all().map_err(werr)
    }
}

fn create(dst: &Path) -> Result<std::io::BufWriter<std::fs::File>, super::BinpkgError> {
    let file = fs_err::File::create(dst).map_err(|source| super::BinpkgError::Write { path: dst.to_owned(), source })?;
    Ok(std::io::BufWriter::with_capacity(256 * 1024, file.into_parts().0))
}

/// Rewrites a GPKG into `dst` (callers write to a temp file and rename; it is fsynced when this
/// returns Ok): optionally a new
/// BUILD_ID (metadata re-packed with the same compression) and new signatures in `gpkg-sign`'s
/// form. The image member's bytes are stream-copied unchanged, and checked against the source
/// Manifest on the way; old `.sig` members are dropped. Member order and Manifest order follow
/// Portage: gpkg-1, metadata, metadata.sig, image, image.sig, Manifest.
pub fn rewrite_gpkg(src: &Path, dst: &Path, opts: &Rewrite) -> Result<(), super::BinpkgError> {
    let source = super::open(src)?;
    let layout = layout(&source).map_err(|f| f.at(src))?;
    let version_mtime = layout.member(VERSION_MEMBER).map(|m| m.mtime).unwrap_or(0);
    let meta = layout.metadata_member().clone();
    let Role::Metadata(comp) = meta.role else { unreachable!("metadata_member") };
    let meta_bytes = member_bytes(&source, &meta, MAX_METADATA).map_err(|f| f.at(src))?;
    check_digest(&layout, &meta.name, &manifest::Hasher::of(&meta.name, &meta_bytes)).map_err(|f| f.at(src))?;
    let dec = comp.slice_decoder(&meta_bytes, &meta.name).map_err(|f| f.at(src))?;
    let mut md = parse_metadata_tar(dec, &meta.name, src).map_err(|f| f.at(src))?;
    let meta_bytes = match opts.build_id {
        None => meta_bytes,
        Some(id) => {
            md.set("BUILD_ID", id.to_string());
            let tar = metadata_tar(&md, meta.mtime).map_err(|e| Fault::Write(e).at(dst))?;
            comp.compress(&tar, &meta.name).map_err(|f| f.at(dst))?
        }
    };
    let mut out = Out {
        w: tarfmt::Writer::new(create(dst)?),
        // Without a new BUILD_ID the source's directory name stays (it may be `<PF>` alone).
        top: top_for(dst, opts.build_id.map(|_| &md), &layout.top),
        lines: Vec::new(),
        signer: opts.signer,
        dst,
        mtime: version_mtime,
    };
    out.small(VERSION_MEMBER, b"")?;
    out.mtime = meta.mtime;
    out.signed_small(&meta.name, &meta_bytes)?;
    let image = layout.image_member().clone();
    out.mtime = image.mtime;
    let line = out.streamed(&image.name, image.size, image.mtime, member_reader(&source, &image), src)?;
    check_digest(&layout, &image.name, &line).map_err(|f| f.at(src))?;
    out.finish()
}

/// Converts an XPAK package into a GPKG at `dst`: metadata from the XPAK index
/// (`metadata.tar.zst`), the image re-packed under `image/` as `image.tar.zst`, the way Portage
/// lays out GPKG, then signed like [`rewrite_gpkg`]. XPAK cannot carry signatures, so a binhost
/// that clients verify must convert on import. Like [`rewrite_gpkg`], `dst` is fsynced when this
/// returns Ok.
pub fn xpak_to_gpkg(src: &Path, dst: &Path, opts: &Rewrite) -> Result<(), super::BinpkgError> {
    let source = super::open(src)?;
    let (xl, mut md) = super::xpak::read(&source, src).map_err(|f| f.at(src))?;
    if let Some(id) = opts.build_id {
        md.set("BUILD_ID", id.to_string());
    }
    let mtime = md.build_time().unwrap_or(0);
    let comp = xl.image_compression.ok_or_else(|| {
        Fault::bad("the XPAK image is not compressed with a format dbh recognises".into()).at(src)
    })?;
    let meta = metadata_tar(&md, mtime).map_err(|e| Fault::Write(e).at(dst))?;
    let meta = Compression::Zstd.compress(&meta, "metadata.tar.zst").map_err(|f| f.at(dst))?;
    // The outer header needs the image's size first: build it in an anonymous temp file beside dst.
    let dir = dst.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut image = tempfile::tempfile_in(dir).map_err(|source| super::BinpkgError::Write { path: dir.to_owned(), source })?;
    {
        let werr = |e: std::io::Error| Fault::Write(e).at(dst);
        let enc = zstd::stream::write::Encoder::new(std::io::BufWriter::new(&mut image), 3).map_err(werr)?;
        let mut builder = tar::Builder::new(enc);
        builder.mode(tar::HeaderMode::Deterministic);
        let dec = comp.decoder(Section::new(&source, 0, xl.image_len), "the XPAK image").map_err(|f| f.at(src))?;
        let mut ar = tar::Archive::new(dec);
        let rerr = |e: std::io::Error| Fault::bad(format!("the XPAK image cannot be read: {e}")).at(src);
        let prefixed = |p: &[u8]| -> Result<String, super::BinpkgError> {
            let p = std::str::from_utf8(p)
                .map_err(|_| Fault::bad("the XPAK image has a path that is not UTF-8".into()).at(src))?;
            let rel = p.trim_start_matches("./").trim_start_matches('/').trim_end_matches('/');
            if rel.split('/').any(|c| c == "..") {
                return Err(Fault::bad(format!("the XPAK image has a path `{p}` that leaves the image")).at(src));
            }
            Ok(if rel.is_empty() || rel == "." { "image".into() } else { format!("image/{rel}") })
        };
        let mut check = super::limits::ImageCheck::xpak();
        for entry in ar.entries().map_err(rerr)? {
            let mut entry = entry.map_err(rerr)?;
            // The same image rules as GPKG (absolute names were silently made relative here).
            check
                .entry(
                    &entry.path_bytes(),
                    super::limits::Kind::of(entry.header().entry_type()),
                    entry.link_name_bytes().as_deref(),
                )
                .map_err(|f| f.at(src))?;
            let mut header = entry.header().clone();
            let path = prefixed(&entry.path_bytes())?;
            let kind = header.entry_type();
            if kind.is_hard_link() {
                let target = entry.link_name_bytes().map(|l| l.into_owned()).unwrap_or_default();
                let target = prefixed(&target)?;
                builder.append_link(&mut header, &path, &target).map_err(werr)?;
            } else if kind.is_symlink() {
                let target = entry.link_name_bytes().map(|l| l.into_owned()).unwrap_or_default();
                let target = String::from_utf8(target)
                    .map_err(|_| Fault::bad(format!("symlink `{path}` has a target that is not UTF-8")).at(src))?;
                builder.append_link(&mut header, &path, &target).map_err(werr)?;
            } else {
                builder.append_data(&mut header, &path, &mut entry).map_err(werr)?;
            }
        }
        let enc = builder.into_inner().map_err(werr)?;
        let buf = enc.finish().map_err(werr)?;
        buf.into_inner().map_err(|e| werr(e.into_error()))?;
    }
    let image_len = image.metadata().map_err(|e| Fault::Write(e).at(dst))?.len();
    let mut out = Out { w: tarfmt::Writer::new(create(dst)?), top: top_for(dst, Some(&md), "package"), lines: Vec::new(), signer: opts.signer, dst, mtime };
    out.small(VERSION_MEMBER, b"")?;
    out.signed_small("metadata.tar.zst", &meta)?;
    use std::io::Seek;
    image.rewind().map_err(|e| Fault::Write(e).at(dst))?;
    out.streamed("image.tar.zst", image_len, mtime, std::io::BufReader::new(image), dst)?;
    out.finish()
}
