//! XPAK (`.tbz2`/`.xpak`): a compressed image tar, then the XPAK blob, then its length and `STOP`.
//!
//! ```text
//! image … | "XPAKPACK" index_len:u32 data_len:u32 index data "XPAKSTOP" | blob_len:u32 "STOP"
//! index entry: name_len:u32 name offset:u32 len:u32   (offsets relative to data, big-endian)
//! ```
//! Layout from Portage's `xpak.py` (`tbz2.scan`, `xsplit_mem`); every length and offset is checked.

use std::path::Path;

use super::compression::Compression;
use super::tarfmt::Source;
use super::{Fault, Metadata, MAX_METADATA};

/// Where the parts of an XPAK file lie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The compressed image tar is bytes `0..image_len`.
    pub image_len: u64,
    /// Recognised from the image's first bytes (`None` if unknown).
    pub image_compression: Option<Compression>,
    /// Offset of `XPAKPACK`.
    pub blob_offset: u64,
}

fn be32(b: &[u8]) -> u64 {
    u64::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

pub(crate) fn read<S: Source + ?Sized>(src: &S, path: &Path) -> Result<(Layout, Metadata), Fault> {
    let len = src.len();
    if len == 0 {
        return Err(Fault::bad("the file is empty".into()));
    }
    if len < 16 + 24 {
        return Err(Fault::bad(format!("the file is {len} bytes long, too short for an XPAK trailer")));
    }
    let mut trailer = [0u8; 16];
    if !src.read_exact_at(len - 16, &mut trailer).map_err(Fault::Io)? {
        return Err(Fault::truncated("in the XPAK trailer"));
    }
    if &trailer[12..] != b"STOP" || &trailer[..8] != b"XPAKSTOP" {
        return Err(Fault::bad("no XPAK trailer (`XPAKSTOP` <length> `STOP`) at the end of the file".into()));
    }
    let blob_len = be32(&trailer[8..12]);
    if blob_len < 24 || blob_len + 8 > len {
        return Err(Fault::bad(format!("the XPAK trailer announces a {blob_len}-byte blob in a {len}-byte file")));
    }
    let blob_offset = len - 8 - blob_len;
    let mut head = [0u8; 16];
    if !src.read_exact_at(blob_offset, &mut head).map_err(Fault::Io)? {
        return Err(Fault::truncated("in the XPAK header"));
    }
    if &head[..8] != b"XPAKPACK" {
        return Err(Fault::bad(format!("no `XPAKPACK` where the trailer says the blob starts (offset {blob_offset})")));
    }
    let index_len = be32(&head[8..12]);
    let data_len = be32(&head[12..16]);
    if 16 + index_len + data_len + 8 != blob_len {
        return Err(Fault::bad(format!(
            "XPAK index ({index_len} bytes) and data ({data_len} bytes) do not add up to the blob length {blob_len}"
        )));
    }
    if data_len > MAX_METADATA {
        return Err(Fault::bad(format!(
            "XPAK data is {data_len} bytes, more than the per-package metadata cap of {MAX_METADATA} bytes (binpkg::MAX_METADATA)"
        )));
    }
    let mut index = vec![0u8; index_len as usize];
    let mut data = vec![0u8; data_len as usize];
    let index_at = blob_offset + 16;
    if !src.read_exact_at(index_at, &mut index).map_err(Fault::Io)?
        || !src.read_exact_at(index_at + index_len, &mut data).map_err(Fault::Io)?
    {
        return Err(Fault::truncated("in the XPAK blob"));
    }
    let mut metadata = Metadata::new(path);
    let mut pos = 0usize;
    while pos < index.len() {
        let bad = |what: String| Fault::bad(format!("XPAK index entry at index offset {pos}: {what}"));
        if index.len() - pos < 4 {
            return Err(bad("cut short".into()));
        }
        let name_len = be32(&index[pos..]) as usize;
        if name_len == 0 || index.len() - pos - 4 < name_len + 8 {
            return Err(bad(format!("name length {name_len} runs past the index")));
        }
        let name = std::str::from_utf8(&index[pos + 4..pos + 4 + name_len])
            .map_err(|_| bad("the name is not UTF-8".into()))?;
        let offset = be32(&index[pos + 4 + name_len..]);
        let vlen = be32(&index[pos + 8 + name_len..]);
        if offset.checked_add(vlen).is_none_or(|end| end > data_len) {
            return Err(bad(format!("`{name}` at data offset {offset}, {vlen} bytes, lies outside the {data_len}-byte data")));
        }
        metadata.add(name, data[offset as usize..(offset + vlen) as usize].to_vec())?;
        pos += 12 + name_len;
    }
    let mut magic = [0u8; 6];
    let n = src.read_at(0, &mut magic[..(blob_offset.min(6) as usize)]).map_err(Fault::Io)?;
    let image_compression = Compression::sniff(&magic[..n]);
    Ok((Layout { image_len: blob_offset, image_compression, blob_offset }, metadata))
}

/// Builds an XPAK blob with its trailer (tests, and the fuzz seed corpus).
pub fn blob(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut index = Vec::new();
    let mut data = Vec::new();
    for (name, value) in entries {
        index.extend_from_slice(&(name.len() as u32).to_be_bytes());
        index.extend_from_slice(name.as_bytes());
        index.extend_from_slice(&(data.len() as u32).to_be_bytes());
        index.extend_from_slice(&(value.len() as u32).to_be_bytes());
        data.extend_from_slice(value);
    }
    let mut out = b"XPAKPACK".to_vec();
    out.extend_from_slice(&(index.len() as u32).to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(&index);
    out.extend_from_slice(&data);
    out.extend_from_slice(b"XPAKSTOP");
    let blob_len = out.len() as u32;
    out.extend_from_slice(&blob_len.to_be_bytes());
    out.extend_from_slice(b"STOP");
    out
}
