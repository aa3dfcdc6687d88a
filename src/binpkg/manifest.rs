//! The GPKG `Manifest`: one `DATA <name> <size> BLAKE2B <hex> SHA512 <hex>` line per member
//! (Portage's `_record_checksum`/`_load_manifest`), optionally wrapped in an OpenPGP clear-signature.

use std::io::Read;

use blake2::Blake2b512;
use sha2::{Digest, Sha512};

use super::Fault;

pub const BEGIN_SIGNED: &str = "-----BEGIN PGP SIGNED MESSAGE-----";
const BEGIN_SIGNATURE: &str = "-----BEGIN PGP SIGNATURE-----";

/// Largest Manifest dbh reads: a handful of lines, even with a signature.
pub const MAX_MANIFEST: u64 = 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub name: String,
    pub size: u64,
    /// `(algorithm, lowercase hex)` in the order written.
    pub hashes: Vec<(String, String)>,
}

impl Line {
    pub fn hash(&self, algo: &str) -> Option<&str> {
        self.hashes.iter().find(|(a, _)| a == algo).map(|(_, h)| h.as_str())
    }

    pub fn to_text(&self) -> String {
        let mut s = format!("DATA {} {}", self.name, self.size);
        for (a, h) in &self.hashes {
            s.push(' ');
            s.push_str(a);
            s.push(' ');
            s.push_str(h);
        }
        s.push('\n');
        s
    }
}

/// Whether a Manifest is clear-signed.
pub fn is_signed(text: &[u8]) -> bool {
    text.starts_with(BEGIN_SIGNED.as_bytes())
        || memfind(text, BEGIN_SIGNATURE.as_bytes()).is_some()
}

fn memfind(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The text of a clear-signed message without checking the signature (reading only: verification
/// uses the text the verifier returns). Unsigned input is returned as it is.
pub(crate) fn cleartext(data: &[u8]) -> Result<String, Fault> {
    let text = std::str::from_utf8(data).map_err(|_| Fault::bad("the Manifest is not UTF-8".into()))?;
    if !text.starts_with(BEGIN_SIGNED) {
        return Ok(text.to_owned());
    }
    let body_start = text
        .find("\n\n")
        .or_else(|| text.find("\r\n\r\n"))
        .ok_or_else(|| Fault::bad("the clear-signed Manifest has no blank line after its header".into()))?;
    let body = &text[body_start..].trim_start_matches(['\r', '\n']);
    let end = body
        .find(&format!("\n{BEGIN_SIGNATURE}"))
        .ok_or_else(|| Fault::bad("the clear-signed Manifest has no signature block".into()))?;
    let mut out = String::new();
    for line in body[..end].split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        out.push_str(line.strip_prefix("- ").unwrap_or(line));
        out.push('\n');
    }
    Ok(out)
}

/// Parses DATA lines like Portage's `_load_manifest`: blank lines skipped, anything else refused.
pub(crate) fn parse(text: &str) -> Result<Vec<Line>, Fault> {
    let mut lines: Vec<Line> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (no, raw) in text.lines().enumerate() {
        let words: Vec<&str> = raw.split_whitespace().collect();
        if words.is_empty() {
            continue;
        }
        let bad = |what: &str| Fault::bad(format!("Manifest line {}: {what}: `{}`", no + 1, raw.trim()));
        if words[0] != "DATA" || words.len() < 3 {
            return Err(bad("not a `DATA name size …` line"));
        }
        let name = words[1].to_owned();
        if !seen.insert(name.clone()) {
            return Err(bad("the file is listed twice"));
        }
        let size: u64 = words[2].parse().map_err(|_| bad("the size is not a number"))?;
        let rest = &words[3..];
        if !rest.len().is_multiple_of(2) {
            return Err(bad("a hash name without a value"));
        }
        let hashes = rest.chunks(2).map(|c| (c[0].to_owned(), c[1].to_ascii_lowercase())).collect();
        lines.push(Line { name, size, hashes });
    }
    Ok(lines)
}

/// BLAKE2B and SHA512 of a stream, the two hashes Portage writes (MANIFEST2_HASH_DEFAULTS).
#[derive(Clone, Default)]
pub struct Hasher {
    blake2b: Blake2b512,
    sha512: Sha512,
    size: u64,
}

impl Hasher {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn update(&mut self, data: &[u8]) {
        self.blake2b.update(data);
        self.sha512.update(data);
        self.size += data.len() as u64;
    }

    pub fn line(self, name: &str) -> Line {
        Line {
            name: name.to_owned(),
            size: self.size,
            hashes: vec![
                ("BLAKE2B".into(), hex::encode(self.blake2b.finalize())),
                ("SHA512".into(), hex::encode(self.sha512.finalize())),
            ],
        }
    }

    pub fn of(name: &str, data: &[u8]) -> Line {
        let mut h = Hasher::new();
        h.update(data);
        h.line(name)
    }

    /// Hashes everything `r` yields, passing each chunk to `each` as well (copy, sign).
    pub fn read_all(
        name: &str,
        mut r: impl Read,
        mut each: impl FnMut(&[u8]) -> std::io::Result<()>,
    ) -> std::io::Result<Line> {
        let mut h = Hasher::new();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            h.update(&buf[..n]);
            each(&buf[..n])?;
        }
        Ok(h.line(name))
    }
}

/// Compares a computed line with the Manifest's: size, and every hash both know, at least one
/// (Portage's rule: unknown algorithms are skipped, a known one that differs is fatal).
pub fn check(expected: &Line, got: &Line) -> Result<(), String> {
    if expected.size != got.size {
        return Err(format!("size is {} bytes, the Manifest says {}", got.size, expected.size));
    }
    let mut checked = 0;
    for (algo, hex) in &got.hashes {
        if let Some(want) = expected.hash(algo) {
            if want != hex {
                return Err(format!("{algo} is {hex}, the Manifest says {want}"));
            }
            checked += 1;
        }
    }
    if checked == 0 {
        return Err("the Manifest has neither a BLAKE2B nor a SHA512 hash for it".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_hashes_match_portage() {
        // The gpkg-1 line of a Manifest written by Portage 3.0.83.
        let l = Hasher::of("gpkg-1", b"");
        assert_eq!(
            l.to_text(),
            "DATA gpkg-1 0 BLAKE2B 786a02f742015903c6c6fd852552d272912f4740e15847618a86e217f71f5419d25e1031afee585313896444934eb04b903a685b1448b755d56f701afe9be2ce SHA512 cf83e1357eefb8bdf1542850d66d8007d620e4050b5715dc83f4a921d36ce9ce47d0d13c5d85f2b0ff8318d2877eec2f63b931bd47417a81a538327af927da3e\n"
        );
        let parsed = parse(&l.to_text()).unwrap();
        assert_eq!(parsed, vec![l]);
    }

    #[test]
    fn bad_lines_are_refused() {
        assert!(parse("DIST x 1\n").is_err());
        assert!(parse("DATA x one\n").is_err());
        assert!(parse("DATA x 1 BLAKE2B\n").is_err());
        assert!(parse("DATA x 1\nDATA x 1\n").is_err());
    }

    #[test]
    fn cleartext_undoes_dash_escaping() {
        let signed = "-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA512\n\nDATA a 1\n- -x\n-----BEGIN PGP SIGNATURE-----\n\nxx\n-----END PGP SIGNATURE-----\n";
        assert_eq!(cleartext(signed.as_bytes()).unwrap(), "DATA a 1\n-x\n");
        assert!(is_signed(signed.as_bytes()));
    }
}
