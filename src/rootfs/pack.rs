//! Reproducible archives of a root: the tar writer (sorted entries, clamped mtimes, numeric
//! owners, hard links kept, no user/group names, no xattrs), `.tar.zst` / `.tar.xz`, and the OCI
//! image layout (one gzip layer, config, manifest, index; every digest and size real).

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{Format, RootfsError, io};
use crate::target::Target;

/// Sets every mtime newer than `sde` to `sde` (symlinks themselves, not their targets), so that
/// every output format — including those packed by external tools — carries clamped times.
pub fn clamp_mtimes(root: &Path, sde: u64) -> Result<(), RootfsError> {
    use nix::sys::stat::{UtimensatFlags, utimensat};
    use nix::sys::time::TimeSpec;
    let mut stack = vec![root.to_owned()];
    let mut all = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for e in fs_err::read_dir(&dir).map_err(io("read", &dir))? {
            let e = e.map_err(io("read", &dir))?;
            let p = e.path();
            if e.file_type().map_err(io("stat", &p))?.is_dir() {
                stack.push(p.clone());
            }
            all.push(p);
        }
    }
    let t = TimeSpec::new(sde as i64, 0);
    for p in all {
        let m = fs_err::symlink_metadata(&p).map_err(io("stat", &p))?;
        if m.mtime() as u64 > sde || m.mtime() < 0 || m.atime() as u64 != sde {
            let mtime = if (m.mtime() as u64) > sde || m.mtime() < 0 { t } else { TimeSpec::new(m.mtime(), 0) };
            utimensat(nix::fcntl::AT_FDCWD, &p, &t, &mtime, UtimensatFlags::NoFollowSymlink)
                .map_err(|e| RootfsError::Io(crate::util::fs::PathError { doing: "set the times of", path: p.clone(), source: e.into() }))?;
        }
    }
    Ok(())
}

/// Every path under `root`, relative, sorted bytewise (a directory before its contents).
pub fn sorted_entries(root: &Path) -> Result<Vec<PathBuf>, RootfsError> {
    fn walk(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> Result<(), RootfsError> {
        let dir = root.join(rel);
        let mut names: Vec<_> = fs_err::read_dir(&dir)
            .map_err(io("read", &dir))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(io("read", &dir))?;
        names.sort_by(|a, b| a.as_encoded_bytes().cmp(b.as_encoded_bytes()));
        for name in names {
            let child = rel.join(&name);
            let is_dir = fs_err::symlink_metadata(root.join(&child)).map_err(io("stat", &root.join(&child)))?.is_dir();
            out.push(child.clone());
            if is_dir {
                walk(root, &child, out)?;
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(root, Path::new(""), &mut out)?;
    Ok(out)
}

/// Writes the tree under `root` as a tar stream to `w`.
pub fn write_tar<W: Write>(root: &Path, w: W, sde: u64) -> Result<W, RootfsError> {
    let mut b = tar::Builder::new(w);
    b.mode(tar::HeaderMode::Complete);
    b.follow_symlinks(false);
    let mut links: HashMap<(u64, u64), PathBuf> = HashMap::new();
    let werr = |p: &Path| {
        let p = p.to_owned();
        move |source| RootfsError::Io(crate::util::fs::PathError { doing: "pack", path: p, source })
    };
    for rel in sorted_entries(root)? {
        let full = root.join(&rel);
        let m = fs_err::symlink_metadata(&full).map_err(io("stat", &full))?;
        let ft = m.file_type();
        let mut h = tar::Header::new_gnu();
        h.set_mode(m.mode() & 0o7777);
        h.set_uid(m.uid() as u64);
        h.set_gid(m.gid() as u64);
        h.set_mtime((m.mtime().max(0) as u64).min(sde));
        h.set_size(0);
        if ft.is_file() && m.nlink() > 1 {
            if let Some(first) = links.get(&(m.dev(), m.ino())) {
                h.set_entry_type(tar::EntryType::Link);
                b.append_link(&mut h, &rel, first).map_err(werr(&full))?;
                continue;
            }
            links.insert((m.dev(), m.ino()), rel.clone());
        }
        if ft.is_dir() {
            h.set_entry_type(tar::EntryType::Directory);
            b.append_data(&mut h, &rel, std::io::empty()).map_err(werr(&full))?;
        } else if ft.is_symlink() {
            let target = fs_err::read_link(&full).map_err(io("read", &full))?;
            h.set_entry_type(tar::EntryType::Symlink);
            b.append_link(&mut h, &rel, &target).map_err(werr(&full))?;
        } else if ft.is_file() {
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(m.len());
            let f = fs_err::File::open(&full).map_err(io("read", &full))?;
            b.append_data(&mut h, &rel, f).map_err(werr(&full))?;
        } else if ft.is_char_device() || ft.is_block_device() || ft.is_fifo() {
            h.set_entry_type(if ft.is_char_device() {
                tar::EntryType::Char
            } else if ft.is_block_device() {
                tar::EntryType::Block
            } else {
                tar::EntryType::Fifo
            });
            let rdev = m.rdev();
            h.set_device_major(nix::sys::stat::major(rdev) as u32).map_err(werr(&full))?;
            h.set_device_minor(nix::sys::stat::minor(rdev) as u32).map_err(werr(&full))?;
            b.append_data(&mut h, &rel, std::io::empty()).map_err(werr(&full))?;
        }
        // Sockets are run-time objects and never belong in an image.
    }
    b.into_inner().map_err(werr(root))
}

/// `.tar.zst` (zstd level 19, single-threaded) or `.tar.xz` (xz preset 6, single-threaded):
/// both deterministic for the same input.
pub fn write_tarball(root: &Path, out: &Path, format: Format, sde: u64) -> Result<(), RootfsError> {
    let file = std::io::BufWriter::new(fs_err::File::create(out).map_err(io("create", out))?);
    let werr = |source| RootfsError::Io(crate::util::fs::PathError { doing: "compress", path: out.to_owned(), source });
    let file = match format {
        Format::TarZst => {
            let enc = zstd::Encoder::new(file, 19).map_err(werr)?;
            write_tar(root, enc, sde)?.finish().map_err(werr)?
        }
        Format::TarXz => {
            let enc = xz2::write::XzEncoder::new(file, 6);
            write_tar(root, enc, sde)?.finish().map_err(werr)?
        }
        _ => unreachable!("write_tarball is only called for tarball formats"),
    };
    file.into_inner().map_err(|e| werr(e.into_error()))?.sync_all().map_err(werr)?;
    Ok(())
}

/// A writer that hashes what passes through it.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
    len: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The Go architecture name OCI uses for a target (`GOARCH`), and its variant.
pub fn oci_platform(target: &Target) -> (String, Option<&'static str>) {
    match target.debian_arch.as_str() {
        "arm64" => ("arm64".into(), Some("v8")),
        "ppc64el" => ("ppc64le".into(), None),
        "armhf" => ("arm".into(), Some("v7")),
        "i386" => ("386".into(), None),
        other => (other.into(), None),
    }
}

/// `1970-01-01T00:00:00Z` for seconds since the epoch (via the HTTP date, which is UTC too).
pub fn rfc3339(secs: u64) -> String {
    let http = httpdate::fmt_http_date(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs));
    // "Tue, 24 Nov 2026 21:18:57 GMT"
    let parts: Vec<&str> = http.split_whitespace().collect();
    let month = "JanFebMarAprMayJunJulAugSepOctNovDec".find(parts[2]).map_or(0, |i| i / 3 + 1);
    format!("{}-{month:02}-{}T{}Z", parts[3], parts[1], parts[4])
}


/// Writes a blob under `blobs/sha256/`; returns its digest and size.
fn put_blob(dir: &Path, data: &[u8]) -> Result<(String, u64), RootfsError> {
    let hex = hex::encode(Sha256::digest(data));
    let path = dir.join("blobs/sha256").join(&hex);
    fs_err::write(&path, data).map_err(io("write", &path))?;
    Ok((format!("sha256:{hex}"), data.len() as u64))
}

/// Compact JSON of any of the OCI documents, through a `dyn` so one closure serves them all.
mod erased_json {
    pub trait Json {
        fn bytes(&self) -> serde_json::Result<Vec<u8>>;
    }
    impl<T: serde::Serialize> Json for T {
        fn bytes(&self) -> serde_json::Result<Vec<u8>> {
            serde_json::to_vec(self)
        }
    }
}

/// An OCI image layout directory (OCI image-spec v1.1, its "image layout" chapter): `oci-layout`, `index.json`
/// (one manifest, tagged `latest`), and the manifest, config and one gzip layer as blobs.
pub fn write_oci(root: &Path, out: &Path, target: &Target, sde: u64) -> Result<(), RootfsError> {
    let blobs = out.join("blobs/sha256");
    fs_err::create_dir_all(&blobs).map_err(io("create", &blobs))?;
    let tmp = out.join("layer.tmp");
    let werr = |source| RootfsError::Io(crate::util::fs::PathError { doing: "write the layer", path: tmp.clone(), source });
    let file = fs_err::File::create(&tmp).map_err(io("create", &tmp))?;
    let compressed = Hashing { inner: std::io::BufWriter::new(file), hash: Sha256::new(), len: 0 };
    // mtime 0 and no file name in the gzip header: the same tar gives the same bytes.
    let gz = flate2::GzBuilder::new().mtime(0).write(compressed, flate2::Compression::default());
    let plain = Hashing { inner: gz, hash: Sha256::new(), len: 0 };
    let plain = write_tar(root, plain, sde)?;
    let diff_id = format!("sha256:{}", hex::encode(plain.hash.finalize()));
    let compressed = plain.inner.finish().map_err(werr)?;
    let layer_hex = hex::encode(compressed.hash.finalize());
    let layer_size = compressed.len;
    compressed.inner.into_inner().map_err(|e| werr(e.into_error()))?.sync_all().map_err(werr)?;
    let layer_path = blobs.join(&layer_hex);
    fs_err::rename(&tmp, &layer_path).map_err(io("move", &layer_path))?;

    // The documents through oci-spec's builders: the spec's own types, so a field cannot be
    // misspelt or of the wrong type. Compact JSON (serde_json::to_vec): same input, same bytes.
    use oci_spec::image::{
        Arch, ConfigBuilder, DescriptorBuilder, HistoryBuilder, ImageConfigurationBuilder, ImageIndexBuilder,
        ImageManifestBuilder, MediaType, Os, PlatformBuilder, RootFsBuilder,
    };
    let spec = |e: &dyn std::fmt::Display| RootfsError::Io(crate::util::fs::PathError {
        doing: "build the OCI documents for",
        path: out.to_owned(),
        source: std::io::Error::other(e.to_string()),
    });
    let json = |v: &dyn erased_json::Json| v.bytes().map_err(|e| spec(&e));
    let digest = |d: &str| d.parse::<oci_spec::image::Digest>().map_err(|e| spec(&e));
    let (arch, variant) = oci_platform(target);
    let created = rfc3339(sde);
    let mut config = ImageConfigurationBuilder::default()
        .architecture(Arch::from(arch.as_str()))
        .os(Os::Linux)
        .created(created.clone())
        .config(
            ConfigBuilder::default()
                .env(vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string()])
                .build()
                .map_err(|e| spec(&e))?,
        )
        .rootfs(RootFsBuilder::default().typ("layers").diff_ids(vec![diff_id]).build().map_err(|e| spec(&e))?)
        .history(vec![HistoryBuilder::default().created(created).created_by("dbh rootfs build").build().map_err(|e| spec(&e))?]);
    let mut platform = PlatformBuilder::default().architecture(Arch::from(arch.as_str())).os(Os::Linux);
    if let Some(v) = variant {
        config = config.variant(v);
        platform = platform.variant(v);
    }
    let config = config.build().map_err(|e| spec(&e))?;
    let (config_digest, config_size) = put_blob(out, &json(&config)?)?;
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(
            DescriptorBuilder::default()
                .media_type(MediaType::ImageConfig)
                .digest(digest(&config_digest)?)
                .size(config_size)
                .build()
                .map_err(|e| spec(&e))?,
        )
        .layers(vec![
            DescriptorBuilder::default()
                .media_type(MediaType::ImageLayerGzip)
                .digest(digest(&format!("sha256:{layer_hex}"))?)
                .size(layer_size)
                .build()
                .map_err(|e| spec(&e))?,
        ])
        .build()
        .map_err(|e| spec(&e))?;
    let (manifest_digest, manifest_size) = put_blob(out, &json(&manifest)?)?;
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(vec![
            DescriptorBuilder::default()
                .media_type(MediaType::ImageManifest)
                .digest(digest(&manifest_digest)?)
                .size(manifest_size)
                .platform(platform.build().map_err(|e| spec(&e))?)
                .annotations([("org.opencontainers.image.ref.name".to_string(), "latest".to_string())].into_iter().collect::<std::collections::HashMap<_, _>>())
                .build()
                .map_err(|e| spec(&e))?,
        ])
        .build()
        .map_err(|e| spec(&e))?;
    let index_path = out.join("index.json");
    fs_err::write(&index_path, json(&index)?).map_err(io("write", &index_path))?;
    let layout = out.join("oci-layout");
    let layout_doc = oci_spec::image::OciLayoutBuilder::default().image_layout_version("1.0.0").build().map_err(|e| spec(&e))?;
    fs_err::write(&layout, json(&layout_doc)?).map_err(io("write", &layout))?;
    // The layout's own files carry the same clamped time as the root.
    clamp_mtimes(out, sde)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_555_137), "2026-11-24T21:18:57Z");
    }

    #[test]
    fn tar_is_sorted_clamped_numeric_and_keeps_hard_links() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("r");
        std::fs::create_dir_all(root.join("b/c")).unwrap();
        std::fs::write(root.join("b/z"), "z").unwrap();
        std::fs::write(root.join("a"), "a").unwrap();
        std::fs::hard_link(root.join("a"), root.join("b/c/a2")).unwrap();
        std::os::unix::fs::symlink("../a", root.join("b/l")).unwrap();
        clamp_mtimes(&root, 1000).unwrap();
        let one = write_tar(&root, Vec::new(), 1000).unwrap();
        let two = write_tar(&root, Vec::new(), 1000).unwrap();
        assert_eq!(one, two);
        let mut ar = tar::Archive::new(&one[..]);
        let mut seen = Vec::new();
        for e in ar.entries().unwrap() {
            let e = e.unwrap();
            let h = e.header();
            assert_eq!(h.mtime().unwrap(), 1000);
            assert_eq!(h.username().unwrap(), Some(""));
            seen.push((e.path().unwrap().display().to_string(), h.entry_type()));
        }
        let names: Vec<_> = seen.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["a", "b", "b/c", "b/c/a2", "b/l", "b/z"]);
        assert_eq!(seen[3].1, tar::EntryType::Link);
        assert_eq!(seen[4].1, tar::EntryType::Symlink);
    }
}
