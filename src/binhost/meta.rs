//! Fast metadata-only reading of binary packages for indexing: the GPKG's `metadata.tar.*`
//! member (never the image) or the XPAK trailer, as a key → raw value map.
//!
//! The index scanner reads thousands of packages; this reader touches only the tar headers and
//! the small metadata member. Full reading, verification and rewriting live in [`crate::binpkg`].

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// The two container formats Portage reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Gpkg,
    Xpak,
}

/// Metadata of one package, values as stored (possibly ending in `\n`).
#[derive(Debug, Clone, Default)]
pub struct Meta {
    pub values: BTreeMap<String, String>,
}

impl Meta {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }
}

/// Reads the metadata of the package at `path`; the error says what is wrong with the file.
pub fn read(path: &Path) -> Result<(Kind, Meta), String> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let mut file = std::fs::File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    if name.ends_with(".gpkg.tar") {
        read_gpkg(&mut file).map(|m| (Kind::Gpkg, m))
    } else {
        read_xpak(&mut file).map(|m| (Kind::Xpak, m))
    }
}

const MAX_METADATA: u64 = 64 * 1024 * 1024;

fn read_gpkg(file: &mut std::fs::File) -> Result<Meta, String> {
    let mut archive = tar::Archive::new(std::io::BufReader::with_capacity(64 * 1024, file));
    let entries = archive.entries().map_err(|e| format!("not a tar archive: {e}"))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("cannot read tar: {e}"))?;
        let member = entry.path().map_err(|e| format!("bad member name: {e}"))?.to_string_lossy().into_owned();
        let Some((_, base)) = member.rsplit_once('/') else { continue };
        let Some(comp) = base.strip_prefix("metadata.tar") else { continue };
        if comp.ends_with(".sig") {
            continue;
        }
        if entry.size() > MAX_METADATA {
            return Err(format!("member {member} is implausibly large"));
        }
        let mut raw = Vec::with_capacity(entry.size() as usize);
        entry.read_to_end(&mut raw).map_err(|e| format!("cannot read member {member}: {e}"))?;
        let inner = decompress(comp, &raw).map_err(|e| format!("cannot decompress {member}: {e}"))?;
        return parse_metadata_tar(&inner).map_err(|e| format!("member {member}: {e}"));
    }
    Err("no metadata.tar member: not a GPKG".into())
}

fn decompress(comp: &str, raw: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let limited = |r: &mut dyn Read, out: &mut Vec<u8>| r.take(MAX_METADATA).read_to_end(out).map(|_| ());
    match comp {
        "" => out.extend_from_slice(raw),
        ".zst" => limited(&mut zstd::stream::read::Decoder::new(raw)?, &mut out)?,
        ".gz" => limited(&mut flate2::read::GzDecoder::new(raw), &mut out)?,
        ".bz2" => limited(&mut bzip2::read::BzDecoder::new(raw), &mut out)?,
        ".xz" => limited(&mut xz2::read::XzDecoder::new(raw), &mut out)?,
        other => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                format!("compression `{other}` is not supported"),
            ));
        }
    }
    Ok(out)
}

fn parse_metadata_tar(bytes: &[u8]) -> Result<Meta, String> {
    let mut meta = Meta::default();
    let mut archive = tar::Archive::new(bytes);
    for entry in archive.entries().map_err(|e| e.to_string())? {
        let mut entry = entry.map_err(|e| e.to_string())?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry.path().map_err(|e| e.to_string())?.to_string_lossy().into_owned();
        let key = path.rsplit('/').next().unwrap_or_default().to_owned();
        let mut value = Vec::new();
        entry.read_to_end(&mut value).map_err(|e| e.to_string())?;
        meta.values.insert(key, String::from_utf8_lossy(&value).into_owned());
    }
    Ok(meta)
}

fn read_xpak(file: &mut std::fs::File) -> Result<Meta, String> {
    let len = file.seek(SeekFrom::End(0)).map_err(|e| e.to_string())?;
    if len < 16 {
        return Err("too short for an XPAK trailer".into());
    }
    let mut tail = [0u8; 8];
    file.seek(SeekFrom::End(-8)).map_err(|e| e.to_string())?;
    file.read_exact(&mut tail).map_err(|e| e.to_string())?;
    if &tail[4..] != b"STOP" {
        return Err("no XPAK trailer (does not end in STOP)".into());
    }
    let size = u64::from(u32::from_be_bytes(tail[..4].try_into().expect("4 bytes")));
    if size + 8 > len || size < 24 {
        return Err(format!("XPAK size {size} does not fit the file"));
    }
    let mut xpak = vec![0u8; size as usize];
    file.seek(SeekFrom::End(-8 - size as i64)).map_err(|e| e.to_string())?;
    file.read_exact(&mut xpak).map_err(|e| e.to_string())?;
    if !xpak.starts_with(b"XPAKPACK") || !xpak.ends_with(b"XPAKSTOP") {
        return Err("XPAK block lacks XPAKPACK/XPAKSTOP".into());
    }
    let be = |at: usize| -> Result<usize, String> {
        xpak.get(at..at + 4)
            .map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")) as usize)
            .ok_or_else(|| "XPAK index runs past its end".to_string())
    };
    let index_len = be(8)?;
    let data_len = be(12)?;
    let index_start = 16usize;
    let data_start = index_start.checked_add(index_len).ok_or("XPAK index too large")?;
    if data_start.checked_add(data_len).is_none_or(|end| end + 8 > xpak.len()) {
        return Err("XPAK lengths do not fit the block".into());
    }
    let mut meta = Meta::default();
    let mut at = index_start;
    while at < data_start {
        let name_len = be(at)?;
        let name = xpak.get(at + 4..at + 4 + name_len).ok_or("XPAK index runs past its end")?;
        let offset = be(at + 4 + name_len)?;
        let vlen = be(at + 8 + name_len)?;
        let value = offset
            .checked_add(vlen)
            .filter(|end| *end <= data_len)
            .map(|end| &xpak[data_start + offset..data_start + end])
            .ok_or("XPAK value runs past the data")?;
        meta.values.insert(String::from_utf8_lossy(name).into_owned(), String::from_utf8_lossy(value).into_owned());
        at += 12 + name_len;
    }
    Ok(meta)
}
