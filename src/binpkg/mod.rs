//! Portage binary packages: the GPKG (GLEP 78) and XPAK readers, Manifest verification, and the
//! GPKG writer that re-signs packages with the binhost key and rewrites their BUILD_ID.
//!
//! Reading takes metadata only: the outer tar's headers are read by offset, the small
//! `metadata.tar.<comp>` member is decompressed, the image is never touched. Layout rules follow
//! Portage's `gpkg.py` (`_verify_binpkg`) and `xpak.py`; every violation is an error naming the
//! file. `read_gpkg_bytes`/`read_xpak_bytes` are the panic-free entry points the fuzzers drive.

mod compression;
pub mod gpkg;
pub mod limits;
pub mod manifest;
mod tarfmt;
pub mod xpak;

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

pub use compression::Compression;
pub use limits::{MAX_BUILD_ID, MAX_INDEX_VALUE, MAX_TIME, MAX_VALUE};
pub use gpkg::{check_image, rewrite_gpkg, verify, xpak_to_gpkg, Rewrite, Verified};

use crate::hint::Hint;
use crate::sign::SignError;
use tarfmt::{FileSource, Source};

#[derive(Debug, thiserror::Error)]
pub enum BinpkgError {
    #[error("cannot read {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a valid binary package: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("{path} is not a binary package: the file name must end in .gpkg.tar, .xpak or .tbz2")]
    UnknownFormat { path: PathBuf },
    #[error("cannot read {path}: member `{member}` is compressed with {compression}, which dbh cannot decompress")]
    Compression { path: PathBuf, member: String, compression: String },
    #[error("{path} does not match its Manifest: `{member}` {reason}")]
    Digest { path: PathBuf, member: String, reason: String },
    #[error("{path}: the signature of `{member}` does not verify")]
    Signature {
        path: PathBuf,
        member: String,
        #[source]
        source: SignError,
    },
    #[error("{path} is not signed: {reason}")]
    Unsigned { path: PathBuf, reason: String },
    #[error("the metadata of {path} has no {key}")]
    MissingKey { path: PathBuf, key: &'static str },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot sign {path}")]
    Sign {
        path: PathBuf,
        #[source]
        source: SignError,
    },
}

impl Hint for BinpkgError {
    fn hint(&self) -> Option<String> {
        match self {
            BinpkgError::Compression { .. } => Some(
                "dbh reads GPKG members compressed with zstd, xz, bzip2 or gzip: rebuild with BINPKG_COMPRESS=zstd".into(),
            ),
            BinpkgError::Unsigned { .. } => Some(
                "sign it with `dbh binhost add`, which converts XPAK to GPKG and signs with the binhost key".into(),
            ),
            BinpkgError::Signature { source, .. } => source.hint().or_else(|| {
                Some("the package was changed after it was signed, or signed by another key".into())
            }),
            _ => None,
        }
    }
}

/// Why something failed, before it is tied to a file; see [`Fault::at`].
#[derive(Debug)]
pub(crate) enum Fault {
    Io(io::Error),
    Bad(String),
    Compression { member: String, compression: String },
    Digest { member: String, reason: String },
    Signature { member: String, source: SignError },
    Unsigned(String),
    Write(io::Error),
    Sign(SignError),
}

impl Fault {
    pub(crate) fn bad(reason: String) -> Fault {
        Fault::Bad(reason)
    }

    pub(crate) fn truncated(place: &str) -> Fault {
        Fault::Bad(format!("the file is truncated ({place})"))
    }

    pub(crate) fn at(self, path: &Path) -> BinpkgError {
        let path = path.to_owned();
        match self {
            Fault::Io(source) if source.kind() == io::ErrorKind::UnexpectedEof => {
                BinpkgError::Invalid { path, reason: "the file is truncated".into() }
            }
            Fault::Io(source) => BinpkgError::Io { path, source },
            Fault::Bad(reason) => BinpkgError::Invalid { path, reason },
            Fault::Compression { member, compression } => BinpkgError::Compression { path, member, compression },
            Fault::Digest { member, reason } => BinpkgError::Digest { path, member, reason },
            Fault::Signature { member, source } => BinpkgError::Signature { path, member, source },
            Fault::Unsigned(reason) => BinpkgError::Unsigned { path, reason },
            Fault::Write(source) => BinpkgError::Write { path, source },
            Fault::Sign(source) => BinpkgError::Sign { path, source },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Gpkg,
    Xpak,
}

impl Format {
    /// The format a file name announces, like Portage's `get_binpkg_format` by extension.
    pub fn of(path: &Path) -> Option<Format> {
        let name = path.file_name()?.to_str()?;
        if name.ends_with(".gpkg.tar") {
            Some(Format::Gpkg)
        } else if name.ends_with(".xpak") || name.ends_with(".tbz2") {
            Some(Format::Xpak)
        } else {
            None
        }
    }
}

/// One binary package as read from disk: its metadata and, for GPKG, its member layout.
#[derive(Debug, Clone)]
pub struct BinPkg {
    pub path: PathBuf,
    pub format: Format,
    /// Every metadata entry, as stored.
    pub metadata: Metadata,
    /// File size in bytes.
    pub size: u64,
    /// GPKG with `.sig` members or a clear-signed Manifest (not verified by [`read`]).
    pub signed: bool,
    /// Set for GPKG.
    pub gpkg: Option<gpkg::Layout>,
    /// Set for XPAK.
    pub xpak: Option<xpak::Layout>,
}

impl BinPkg {
    /// `CATEGORY/PF`.
    pub fn cpv(&self) -> Result<String, BinpkgError> {
        self.metadata.cpv()
    }
}

/// The metadata entries of a binary package (`metadata/<KEY>` files in GPKG, the XPAK index).
/// Text values are kept raw, trailing newline included; binary entries (`environment.bz2`) are
/// kept apart.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata {
    path: PathBuf,
    text: BTreeMap<String, String>,
    binary: BTreeMap<String, Vec<u8>>,
    /// Entry names in stored order (rewriting keeps it).
    order: Vec<String>,
}

/// Largest total of metadata values dbh accepts per package (real packages: a few KiB to a few
/// MiB; `environment.bz2` dominates).
pub const MAX_METADATA: u64 = 64 * 1024 * 1024;

impl Metadata {
    pub(crate) fn new(path: &Path) -> Metadata {
        Metadata { path: path.to_owned(), ..Default::default() }
    }

    /// Adds an entry, refusing bad names, duplicates and text that is not UTF-8 (only `*.bz2`
    /// entries such as `environment.bz2` may be binary).
    pub(crate) fn add(&mut self, key: &str, value: Vec<u8>) -> Result<(), Fault> {
        if key.is_empty() || key == "." || key == ".." || key.contains('/') || key.contains('\0') {
            return Err(Fault::bad(format!("metadata entry name `{key}` is not a plain file name")));
        }
        if self.text.contains_key(key) || self.binary.contains_key(key) {
            return Err(Fault::bad(format!("metadata entry `{key}` is listed twice")));
        }
        limits::check_value(key, &value)?;
        self.order.push(key.to_owned());
        match String::from_utf8(value) {
            Ok(text) => {
                self.text.insert(key.to_owned(), text);
            }
            Err(e) if key.ends_with(".bz2") => {
                self.binary.insert(key.to_owned(), e.into_bytes());
            }
            Err(_) => return Err(Fault::bad(format!("metadata entry `{key}` is not UTF-8 text"))),
        }
        Ok(())
    }

    /// The raw value of a text entry, trailing newline included.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.text.get(key).map(String::as_str)
    }

    /// Text entries, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.text.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// A binary entry (`environment.bz2`).
    pub fn binary(&self, key: &str) -> Option<&[u8]> {
        self.binary.get(key).map(Vec::as_slice)
    }

    /// Every entry as bytes, in stored order.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.order.iter().map(|k| {
            let v = self.text.get(k).map(|s| s.as_bytes()).or_else(|| self.binary.get(k).map(Vec::as_slice));
            (k.as_str(), v.unwrap_or_default())
        })
    }

    /// Replaces (or adds) a text entry.
    pub fn set(&mut self, key: &str, value: String) {
        if !self.order.iter().any(|k| k == key) {
            self.order.push(key.to_owned());
        }
        self.binary.remove(key);
        self.text.insert(key.to_owned(), value);
    }

    /// `CATEGORY/PF`, trimmed.
    pub fn cpv(&self) -> Result<String, BinpkgError> {
        let get = |key: &'static str| {
            self.get(key)
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .ok_or(BinpkgError::MissingKey { path: self.path.clone(), key })
        };
        Ok(format!("{}/{}", get("CATEGORY")?, get("PF")?))
    }

    /// `BUILD_ID` as a number, if present, numeric and at most [`MAX_BUILD_ID`].
    pub fn build_id(&self) -> Option<u64> {
        self.get("BUILD_ID")?.trim().parse().ok().filter(|id| *id <= MAX_BUILD_ID)
    }

    /// `BUILD_TIME` as seconds, if present and within [`MAX_TIME`] (checked when read).
    pub fn build_time(&self) -> Option<u64> {
        self.get("BUILD_TIME")?.trim().parse().ok().filter(|t| *t <= MAX_TIME)
    }
}

fn open(path: &Path) -> Result<FileSource, BinpkgError> {
    let file = fs_err::File::open(path).map_err(|source| BinpkgError::Io { path: path.to_owned(), source })?;
    let (file, _) = file.into_parts();
    FileSource::new(file).map_err(|source| BinpkgError::Io { path: path.to_owned(), source })
}

/// Reads a binary package's metadata; the format comes from the file name (`.gpkg.tar`, `.xpak`,
/// `.tbz2`). Checks the container layout, the Manifest's member list and sizes, and the metadata
/// member's hashes; the image is neither read nor decompressed (see [`verify`]).
pub fn read(path: &Path) -> Result<BinPkg, BinpkgError> {
    let format = Format::of(path).ok_or_else(|| BinpkgError::UnknownFormat { path: path.to_owned() })?;
    let src = open(path)?;
    read_source(&src, path, format)
}

fn read_source<S: Source + ?Sized>(src: &S, path: &Path, format: Format) -> Result<BinPkg, BinpkgError> {
    let size = src.len();
    match format {
        Format::Gpkg => {
            let layout = gpkg::layout(src).map_err(|f| f.at(path))?;
            let metadata = gpkg::metadata(src, &layout, path).map_err(|f| f.at(path))?;
            Ok(BinPkg { path: path.to_owned(), format, metadata, size, signed: layout.signed, gpkg: Some(layout), xpak: None })
        }
        Format::Xpak => {
            let (layout, metadata) = xpak::read(src, path).map_err(|f| f.at(path))?;
            Ok(BinPkg { path: path.to_owned(), format, metadata, size, signed: false, gpkg: None, xpak: Some(layout) })
        }
    }
}

/// [`read`] on a file already in memory (an index reads small packages once for metadata and
/// digests); the format comes from `path`'s name and errors name `path`.
pub fn read_bytes(path: &Path, bytes: &[u8]) -> Result<BinPkg, BinpkgError> {
    let format = Format::of(path).ok_or_else(|| BinpkgError::UnknownFormat { path: path.to_owned() })?;
    read_source(bytes, path, format)
}

/// [`read`] on a GPKG held in memory (fuzzing, tests); never panics.
pub fn read_gpkg_bytes(bytes: &[u8]) -> Result<BinPkg, BinpkgError> {
    read_source(bytes, Path::new("<memory>.gpkg.tar"), Format::Gpkg)
}

/// [`read`] on an XPAK held in memory (fuzzing, tests); never panics.
pub fn read_xpak_bytes(bytes: &[u8]) -> Result<BinPkg, BinpkgError> {
    read_source(bytes, Path::new("<memory>.xpak"), Format::Xpak)
}

/// [`check_image`] on a GPKG held in memory (fuzzing, tests); never panics.
pub fn check_image_bytes(bytes: &[u8]) -> Result<(), BinpkgError> {
    gpkg::check_image_source(bytes).map_err(|f| f.at(Path::new("<memory>.gpkg.tar")))
}

/// [`verify`] (hashes only, no signatures) on a GPKG held in memory (fuzzing); never panics.
pub fn verify_gpkg_bytes(bytes: &[u8]) -> Result<Verified, BinpkgError> {
    let path = Path::new("<memory>.gpkg.tar");
    gpkg::verify_source(bytes, path, Format::Gpkg, None).map_err(|f| f.at(path))
}

#[cfg(test)]
mod tests;
