//! The compressions a GPKG member or an XPAK image may use (Portage's `ext_list` and
//! `_compressors`), and the streaming decoders/encoders for those dbh handles in-process.

use std::io::{self, Read, Write};

use super::Fault;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Bzip2,
    Lz4,
    Lzip,
    Lzop,
    Xz,
    Zstd,
}

const ALL: [Compression; 8] = [
    Compression::Gzip,
    Compression::Bzip2,
    Compression::Lz4,
    Compression::Lzip,
    Compression::Lzop,
    Compression::Xz,
    Compression::Zstd,
    Compression::None,
];

impl Compression {
    /// Portage's name (`BINPKG_COMPRESS`).
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Bzip2 => "bzip2",
            Compression::Lz4 => "lz4",
            Compression::Lzip => "lzip",
            Compression::Lzop => "lzop",
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
        }
    }

    /// The suffix after `.tar` in a GPKG member name.
    pub fn ext(self) -> &'static str {
        match self {
            Compression::None => "",
            Compression::Gzip => ".gz",
            Compression::Bzip2 => ".bz2",
            Compression::Lz4 => ".lz4",
            Compression::Lzip => ".lz",
            Compression::Lzop => ".lzo",
            Compression::Xz => ".xz",
            Compression::Zstd => ".zst",
        }
    }

    /// Splits `metadata.tar.zst` into (`metadata`, zstd); `None` if it is not `<x>.tar[.<ext>]`
    /// with an extension Portage knows.
    pub fn split(file_name: &str) -> Option<(&str, Compression)> {
        ALL.iter().find_map(|c| file_name.strip_suffix(&format!(".tar{}", c.ext())).map(|stem| (stem, *c)))
    }

    /// Recognises a compressed stream by its magic bytes (XPAK images carry no name).
    pub fn sniff(head: &[u8]) -> Option<Compression> {
        let table: [(&[u8], Compression); 7] = [
            (b"BZh", Compression::Bzip2),
            (&[0x28, 0xb5, 0x2f, 0xfd], Compression::Zstd),
            (&[0xfd, b'7', b'z', b'X', b'Z', 0], Compression::Xz),
            (&[0x1f, 0x8b], Compression::Gzip),
            (&[0x04, 0x22, 0x4d, 0x18], Compression::Lz4),
            (b"LZIP", Compression::Lzip),
            (&[0x89, b'L', b'Z', b'O'], Compression::Lzop),
        ];
        table.iter().find(|(m, _)| head.starts_with(m)).map(|(_, c)| *c)
    }

    fn unsupported(self, member: &str) -> Fault {
        Fault::Compression { member: member.to_owned(), compression: self.name().to_owned() }
    }

    /// A decompressing reader; `member` names the data in errors.
    pub(crate) fn decoder<'a, R: Read + 'a>(self, r: R, member: &str) -> Result<Box<dyn Read + 'a>, Fault> {
        Ok(match self {
            Compression::None => Box::new(r),
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(r)),
            Compression::Bzip2 => Box::new(bzip2::read::MultiBzDecoder::new(r)),
            Compression::Xz => Box::new(xz2::read::XzDecoder::new_multi_decoder(r)),
            Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(r).map_err(Fault::Io)?),
            Compression::Lz4 | Compression::Lzip | Compression::Lzop => return Err(self.unsupported(member)),
        })
    }

    /// A decompressing reader over bytes in memory; avoids zstd's 128 KiB input buffer, which
    /// dominates when thousands of small metadata members are read for an index.
    pub(crate) fn slice_decoder<'a>(self, data: &'a [u8], member: &str) -> Result<Box<dyn Read + 'a>, Fault> {
        match self {
            Compression::Zstd => Ok(Box::new(zstd::stream::read::Decoder::with_buffer(data).map_err(Fault::Io)?)),
            other => other.decoder(data, member),
        }
    }

    /// Compresses `data` completely (metadata members are small).
    pub(crate) fn compress(self, data: &[u8], member: &str) -> Result<Vec<u8>, Fault> {
        let out = Vec::with_capacity(data.len() / 2 + 64);
        let w = |e: io::Error| Fault::Write(e);
        Ok(match self {
            Compression::None => data.to_vec(),
            Compression::Gzip => {
                let mut e = flate2::write::GzEncoder::new(out, flate2::Compression::default());
                e.write_all(data).map_err(w)?;
                e.finish().map_err(w)?
            }
            Compression::Bzip2 => {
                let mut e = bzip2::write::BzEncoder::new(out, bzip2::Compression::best());
                e.write_all(data).map_err(w)?;
                e.finish().map_err(w)?
            }
            Compression::Xz => {
                let mut e = xz2::write::XzEncoder::new(out, 6);
                e.write_all(data).map_err(w)?;
                e.finish().map_err(w)?
            }
            Compression::Zstd => zstd::stream::encode_all(data, 3).map_err(w)?,
            Compression::Lz4 | Compression::Lzip | Compression::Lzop => return Err(self.unsupported(member)),
        })
    }
}
