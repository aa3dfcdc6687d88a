//! The `Packages` index: parsing and rendering exactly as Portage's `PackageIndex`
//! (`portage/getbinpkg.py`) and `binarytree` (`portage/dbapi/bintree.py`) do.
//!
//! Format: stanzas of `KEY: value` lines, each followed by one blank line. The first stanza is the
//! header (`VERSION`, `TIMESTAMP`, `PACKAGES`, ARCH/CHOST/PROFILE, …), every further stanza one
//! package. Portage sorts keys by their *internal* names (`_mtime_` for `MTIME`, `repository` for
//! `REPO`, `DESCRIPTION` for `DESC`), which is why `MTIME` and `REPO` come last; it omits empty
//! values, values equal to its per-package defaults (`EAPI: 0`, `SLOT: 0`) and `CHOST`/`REPO` when
//! they equal the header's; packages are sorted by CPV (string order), we add BUILD_ID as the
//! tie-breaker that Portage leaves to chance.
//!
//! Parsing is stricter than Portage's (which silently skips lines it does not understand and stops
//! at the first double blank line): anything but a well-formed index is an error naming the line,
//! because an index we cannot read exactly is an index we must not rewrite.

use std::collections::BTreeMap;
use std::fmt;

/// The index version Portage 3 writes and accepts (`_pkgindex_version`).
pub const VERSION: u32 = 0;

/// Package keys Portage keeps when it reads an index (`_pkgindex_allowed_pkg_keys`, as written on
/// disk); everything else (e.g. `BLAKE2B`, `REPO_REVISIONS`) is dropped when we rewrite an entry.
pub const ALLOWED_PKG_KEYS: &[&str] = &[
    "BASE_URI", "BDEPEND", "BUILD_ID", "BUILD_TIME", "CHOST", "CPV", "DEFINED_PHASES", "DEPEND",
    "DESC", "EAPI", "FETCHCOMMAND", "IDEPEND", "IUSE", "KEYWORDS", "LICENSE", "MD5", "MTIME",
    "PATH", "PDEPEND", "PKGINDEX_URI", "PROPERTIES", "PROVIDES", "RDEPEND", "REPO", "REQUIRES",
    "RESTRICT", "RESUMECOMMAND", "SHA1", "SIZE", "SLOT", "USE", "USER_PATCHES",
];

/// `ALLOWED_PKG_KEYS.contains(key)`, as a `match` (indexes are big; this runs per key).
pub fn is_allowed(key: &str) -> bool {
    matches!(
        key,
        "BASE_URI" | "BDEPEND" | "BUILD_ID" | "BUILD_TIME" | "CHOST" | "CPV" | "DEFINED_PHASES" | "DEPEND"
            | "DESC" | "EAPI" | "FETCHCOMMAND" | "IDEPEND" | "IUSE" | "KEYWORDS" | "LICENSE" | "MD5" | "MTIME"
            | "PATH" | "PDEPEND" | "PKGINDEX_URI" | "PROPERTIES" | "PROVIDES" | "RDEPEND" | "REPO" | "REQUIRES"
            | "RESTRICT" | "RESUMECOMMAND" | "SHA1" | "SIZE" | "SLOT" | "USE" | "USER_PATCHES"
    )
}

/// Keys a package inherits from the header when absent (`_pkgindex_inherited_keys`).
pub const INHERITED_KEYS: &[&str] = &["CHOST", "REPO"];


/// The key Portage sorts by: its internal name for the three translated keys.
pub fn sort_name(key: &str) -> &str {
    match key {
        "MTIME" => "_mtime_",
        "REPO" => "repository",
        "DESC" => "DESCRIPTION",
        other => other,
    }
}

/// Why a `Packages` file could not be read; the caller adds the file name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

impl std::error::Error for ParseError {}

fn err(line: usize, message: impl Into<String>) -> ParseError {
    ParseError { line, message: message.into() }
}

/// One package stanza. Keys are kept as written on disk (`MTIME`, `REPO`); after parsing,
/// `CHOST`/`REPO` inherited from the header are filled in, as Portage's `readBody` does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Entry {
    pub fields: BTreeMap<String, String>,
    /// First line of the stanza in the file it was read from (0 when built in memory).
    pub line: usize,
}

impl Entry {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields.get(key).map(String::as_str).filter(|v| !v.is_empty())
    }
    pub fn set(&mut self, key: &str, value: impl Into<String>) {
        self.fields.insert(key.to_owned(), value.into());
    }
    pub fn cpv(&self) -> &str {
        self.get("CPV").unwrap_or_default()
    }
    pub fn path(&self) -> Option<&str> {
        self.get("PATH")
    }
    pub fn build_id(&self) -> Option<u64> {
        self.get("BUILD_ID").and_then(|v| v.parse().ok())
    }
    pub fn size(&self) -> Option<u64> {
        self.get("SIZE").and_then(|v| v.parse().ok())
    }
    pub fn mtime(&self) -> Option<i64> {
        self.get("MTIME").and_then(|v| v.parse().ok())
    }
    /// The path Portage assumes for an entry without PATH (`cpv + ".tbz2"`).
    pub fn effective_path(&self) -> String {
        self.path().map_or_else(|| format!("{}.tbz2", self.cpv()), str::to_owned)
    }
    /// Drops keys Portage would drop on reading.
    pub fn retain_allowed(&mut self) {
        if self.fields.keys().all(|k| is_allowed(k)) {
            return;
        }
        self.fields.retain(|k, _| is_allowed(k));
    }
}

/// A whole index: header and packages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Index {
    pub header: BTreeMap<String, String>,
    pub packages: Vec<Entry>,
}

impl Default for Index {
    fn default() -> Index {
        Index::new()
    }
}

impl Index {
    /// A fresh index with only `VERSION: 0`.
    pub fn new() -> Index {
        let mut header = BTreeMap::new();
        header.insert("VERSION".to_owned(), VERSION.to_string());
        Index { header, packages: Vec::new() }
    }

    pub fn header(&self, key: &str) -> Option<&str> {
        self.header.get(key).map(String::as_str).filter(|v| !v.is_empty())
    }

    pub fn timestamp(&self) -> Option<u64> {
        self.header("TIMESTAMP").and_then(|v| v.parse().ok())
    }

    /// Parses a `Packages` file. Errors name the line; they never panic, whatever the input.
    pub fn parse(bytes: &[u8]) -> Result<Index, ParseError> {
        let text = std::str::from_utf8(bytes).map_err(|e| {
            let line = bytes[..e.valid_up_to()].iter().filter(|b| **b == b'\n').count() + 1;
            err(line, "is not valid UTF-8")
        })?;
        if text.is_empty() {
            return Err(err(1, "the file is empty"));
        }
        if !text.ends_with("\n\n") {
            let line = text.lines().count().max(1);
            return Err(err(
                line,
                "the file does not end with a blank line after its last stanza (truncated?)",
            ));
        }
        // Every stanza is terminated by a blank line, so splitting off the final "\n" leaves
        // exactly the lines of the file.
        let mut stanzas: Vec<(usize, BTreeMap<String, String>)> = Vec::new();
        let mut current: Option<(usize, RawFields<'_>)> = None;
        for (i, line) in text[..text.len() - 1].split('\n').enumerate() {
            let n = i + 1;
            if line.is_empty() {
                match current.take() {
                    Some((start, fields)) => stanzas.push((start, build_fields(fields)?)),
                    None => {
                        return Err(err(
                            n,
                            "a second blank line in a row (Portage stops reading the index here)",
                        ));
                    }
                }
                continue;
            }
            let Some((key, rest)) = line.split_once(':') else {
                return Err(err(n, format!("expected `KEY: value`, found {:?}", clip(line))));
            };
            if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err(err(n, format!("invalid key {:?}", clip(key))));
            }
            let value = match rest.strip_prefix(' ') {
                Some(v) => v,
                None if rest.is_empty() => "",
                None => return Err(err(n, format!("expected a space after `{key}:`"))),
            };
            if value.contains('\r') {
                return Err(err(n, format!("the value of `{key}` contains a carriage return")));
            }
            let (_, fields) = current.get_or_insert_with(|| (n, Vec::with_capacity(24)));
            fields.push((key, value, n));
        }
        debug_assert!(current.is_none(), "text ends with a blank line");
        let mut stanzas = stanzas.into_iter();
        let (header_line, header) = stanzas.next().ok_or_else(|| err(1, "there is no header"))?;
        match header.get("VERSION").map(String::as_str) {
            None => {
                return Err(err(
                    header_line,
                    "the header has no VERSION (Portage rejects such an index)",
                ));
            }
            Some(v) => match v.parse::<i64>() {
                Ok(v) if v <= i64::from(VERSION) => {}
                _ => {
                    return Err(err(
                        header_line,
                        format!("unsupported index VERSION {v:?} (Portage reads {VERSION})"),
                    ));
                }
            },
        }
        if let Some(ts) = header.get("TIMESTAMP") {
            // Every later step adds to it, formats it as a date or sets it as an mtime: a value
            // no date can show is refused here, with the line, rather than panicking there.
            let ok = !ts.is_empty() && ts.bytes().all(|b| b.is_ascii_digit());
            if !ok || ts.parse::<u64>().map_or(true, |t| t > crate::binpkg::MAX_TIME) {
                let line = text.lines().position(|l| l.starts_with("TIMESTAMP:")).map_or(header_line, |i| i + 1);
                return Err(err(
                    line,
                    format!(
                        "TIMESTAMP {:?} is not a time in seconds up to {} (9999-12-31)",
                        clip(ts),
                        crate::binpkg::MAX_TIME
                    ),
                ));
            }
        }
        if header.contains_key("CPV") {
            return Err(err(header_line, "the header contains CPV: the index has no header"));
        }
        let mut packages = Vec::new();
        for (line, mut fields) in stanzas {
            match fields.get("CPV") {
                Some(cpv) if !cpv.is_empty() => {}
                _ => return Err(err(line, "package stanza without CPV")),
            }
            for key in INHERITED_KEYS {
                if let Some(v) = header.get(*key).filter(|v| !v.is_empty()) {
                    fields.entry((*key).to_owned()).or_insert_with(|| v.clone());
                }
            }
            packages.push(Entry { fields, line });
        }
        Ok(Index { header, packages })
    }

    /// Sorts packages by CPV (Portage's order), then BUILD_ID.
    pub fn sort(&mut self) {
        let mut keyed: Vec<(String, Option<u64>, Entry)> = std::mem::take(&mut self.packages)
            .into_iter()
            .map(|e| (e.cpv().to_owned(), e.build_id(), e))
            .collect();
        keyed.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        self.packages = keyed.into_iter().map(|(_, _, e)| e).collect();
    }

    /// Packages in index order: by CPV, then BUILD_ID.
    pub fn packages_sorted(&self) -> Vec<&Entry> {
        let mut order: Vec<(&str, Option<u64>, &Entry)> =
            self.packages.iter().map(|e| (e.cpv(), e.build_id(), e)).collect();
        // Usually already sorted: then this is one linear pass.
        order.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        order.into_iter().map(|(_, _, e)| e).collect()
    }

    /// Renders the index as Portage's `PackageIndex.write` does (packages sorted first).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(512 + self.packages.len() * 640);
        write_stanza(&mut out, self.header.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let (chost, repo) = (self.header("CHOST"), self.header("REPO"));
        for entry in self.packages_sorted() {
            let fields = entry.fields.iter().filter(|(k, v)| match k.as_str() {
                "CHOST" => chost != Some(v.as_str()),
                "REPO" => repo != Some(v.as_str()),
                // Portage's per-package defaults (`_pkgindex_default_pkg_data`), never written.
                "EAPI" | "SLOT" => v.as_str() != "0",
                _ => true,
            });
            write_stanza(&mut out, fields.map(|(k, v)| (k.as_str(), v.as_str())));
        }
        out
    }
}

/// Adds `new` entries to an index given as text, copying every other stanza byte for byte: the
/// fast path of `add` on big binhosts (no per-entry maps). `header` is the complete new header.
/// Returns `None` whenever the result could differ from parsing, editing and rendering the index
/// (text not exactly as we render it, unsorted stanzas, keys Portage would drop, inherited
/// CHOST/REPO changing); the caller then takes the slow path. Entries whose PATH equals a new
/// entry's are replaced.
pub fn splice(old: &str, header: &BTreeMap<String, String>, new: &[Entry]) -> Option<String> {
    let mut count = 0usize;
    let (old_header, body) = old.split_once("\n\n")?;
    let parsed = Index::parse(format!("{old_header}\n\n").as_bytes()).ok()?;
    for key in INHERITED_KEYS {
        if parsed.header(key) != header.get(*key).map(String::as_str).filter(|v| !v.is_empty()) {
            return None;
        }
    }
    let new_index = Index { header: header.clone(), packages: new.to_vec() };
    let rendered = new_index.render();
    let (new_header, new_body) = rendered.split_once("\n\n")?;
    let mut new_stanzas: Vec<(&str, Option<u64>, &str)> = Vec::new();
    for (entry, text) in new_index.packages_sorted().into_iter().zip(new_body.split_terminator("\n\n")) {
        new_stanzas.push((entry.cpv(), entry.build_id(), text));
    }
    let new_paths: Vec<&str> = new.iter().filter_map(Entry::path).collect();

    let _ = new_header;
    let mut out = String::with_capacity(old.len() + rendered.len());
    let mut pending = new_stanzas.iter().peekable();
    let mut last: Option<(&str, Option<u64>)> = None;
    if !body.is_empty() && !body.ends_with("\n\n") && body != "\n" {
        return None;
    }
    for stanza in body.split_terminator("\n\n") {
        let (mut cpv, mut build_id, mut path) = (None, None, None);
        let mut prev_key = "";
        for line in stanza.split('\n') {
            let (key, value) = line.split_once(": ")?;
            if value.is_empty() || !is_allowed(key) || key == "EAPI" && value == "0" || key == "SLOT" && value == "0" {
                return None;
            }
            // Keys must be in rendering order (which also rules out duplicates).
            if sort_name(prev_key) >= sort_name(key) && !prev_key.is_empty() {
                return None;
            }
            if value.contains('\r') || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return None;
            }
            match key {
                "CPV" => cpv = Some(value),
                "BUILD_ID" => build_id = Some(value.parse::<u64>().ok()?),
                "PATH" => path = Some(value),
                "CHOST" if Some(value) == header.get("CHOST").map(String::as_str) => return None,
                "REPO" if Some(value) == header.get("REPO").map(String::as_str) => return None,
                _ => {}
            }
            prev_key = key;
        }
        let cpv = cpv?;
        if last.is_some_and(|l| l > (cpv, build_id)) {
            return None;
        }
        last = Some((cpv, build_id));
        while let Some((_, _, text)) = pending.next_if(|(c, b, _)| (*c, *b) < (cpv, build_id)) {
            out.push_str(text);
            out.push_str("\n\n");
            count += 1;
        }
        if path.is_some_and(|p| new_paths.contains(&p)) {
            continue;
        }
        out.push_str(stanza);
        out.push_str("\n\n");
        count += 1;
    }
    for (_, _, text) in pending {
        out.push_str(text);
        out.push_str("\n\n");
        count += 1;
    }
    let mut header = header.clone();
    header.insert("PACKAGES".into(), count.to_string());
    let mut text = String::with_capacity(out.len() + 2048);
    write_stanza(&mut text, header.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    text.push_str(&out);
    Some(text)
}

/// Writes one stanza, keys in Portage's order. Callers pass fields in key order (they come from
/// a `BTreeMap`), which equals Portage's order except for the translated keys: those are moved
/// to their place by their internal name.
fn write_stanza<'a>(out: &mut String, fields: impl Iterator<Item = (&'a str, &'a str)>) {
    let mut plain: Vec<(&str, &str)> = Vec::with_capacity(24);
    let mut moved: Vec<(&str, &str)> = Vec::new();
    for (k, v) in fields {
        if v.is_empty() {
            continue;
        }
        if sort_name(k) == k {
            plain.push((k, v));
        } else {
            moved.push((k, v));
        }
    }
    debug_assert!(plain.windows(2).all(|w| w[0].0 < w[1].0), "fields come sorted");
    moved.sort_by(|a, b| sort_name(a.0).cmp(sort_name(b.0)));
    for (k, v) in moved {
        let at = plain.partition_point(|(p, _)| sort_name(p) < sort_name(k));
        plain.insert(at, (k, v));
    }
    for (k, v) in plain {
        out.push_str(k);
        out.push_str(": ");
        out.push_str(v);
        out.push('\n');
    }
    out.push('\n');
}

/// A stanza's `(key, value, line)`s as read.
type RawFields<'a> = Vec<(&'a str, &'a str, usize)>;

/// The fields of one stanza as a map; a key given twice is an error at its second line.
fn build_fields(mut fields: RawFields<'_>) -> Result<BTreeMap<String, String>, ParseError> {
    // Stable and nearly sorted already (Portage writes keys in order): close to linear.
    fields.sort_by(|a, b| a.0.cmp(b.0));
    if let Some(w) = fields.windows(2).find(|w| w[0].0 == w[1].0) {
        let line = w[0].2.max(w[1].2);
        return Err(err(line, format!("`{}` appears twice in the same stanza", w[0].0)));
    }
    Ok(fields.into_iter().map(|(k, v, _)| (k.to_owned(), v.to_owned())).collect())
}

fn clip(s: &str) -> String {
    s.chars().take(60).collect()
}

/// Portage's value normalisation for metadata (`" ".join(v.split())`).
pub fn normalize(value: &str) -> String {
    value.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The index real Portage 3.0.83 wrote in the lab (docs/lab.md, "What Portage writes into `Packages`"), header trimmed.
    const PORTAGE: &str = "ARCH: amd64
CHOST: x86_64-pc-linux-gnu
IUSE_IMPLICIT: prefix prefix-guest prefix-stack
PACKAGES: 2
PROFILE: lab
TIMESTAMP: 1795534646
USE_EXPAND_VALUES_ARCH: amd64
VERSION: 0

BUILD_ID: 1
BUILD_TIME: 1795534646
CPV: dbh-test/greeter-1.0
DEFINED_PHASES: install
EAPI: 8
KEYWORDS: amd64
LICENSE: MIT
MD5: 854e8a53985a3de540da7ef7494c02f6
PATH: dbh-test/greeter/greeter-1.0-1.gpkg.tar
RDEPEND: dbh-test/hello
SHA1: aa3f0cd7f7b4910175d1760a1f82fa6a9542cc82
SIZE: 10240
USE: amd64 elibc_glibc kernel_linux userland_GNU
MTIME: 1795534646
REPO: dbh-lab

BUILD_ID: 1
BUILD_TIME: 1795534644
CPV: dbh-test/hello-1.0
DEFINED_PHASES: compile install
EAPI: 8
IUSE: debug
KEYWORDS: amd64
LICENSE: MIT
MD5: 896a1b910fa25af2243a4d8911bbcf54
PATH: dbh-test/hello/hello-1.0-1.gpkg.tar
REQUIRES: x86_64: libc.so.6
RESTRICT: mirror
SHA1: 77690e63e9659239cf19996acd1f2d8152959b5e
SIZE: 20480
USE: amd64 elibc_glibc kernel_linux userland_GNU
MTIME: 1795534645
REPO: dbh-lab

";

    #[test]
    fn portage_index_round_trips_byte_for_byte() {
        let index = Index::parse(PORTAGE.as_bytes()).unwrap();
        assert_eq!(index.packages.len(), 2);
        assert_eq!(index.packages[1].get("REQUIRES"), Some("x86_64: libc.so.6"));
        assert_eq!(index.packages[1].line, 26);
        assert_eq!(index.render(), PORTAGE);
    }

    #[test]
    fn inherited_and_default_values_are_omitted_and_order_is_portages() {
        let mut index = Index::new();
        index.header.insert("CHOST".into(), "x86_64-pc-linux-gnu".into());
        let mut e = Entry::default();
        for (k, v) in [
            ("CPV", "a/b-1"),
            ("REPO", "r"),
            ("MTIME", "5"),
            ("SLOT", "0"),
            ("EAPI", "0"),
            ("CHOST", "x86_64-pc-linux-gnu"),
            ("DESC", "d"),
            ("USE", ""),
            ("BUILD_ID", "2"),
        ] {
            e.set(k, v);
        }
        let mut e1 = e.clone();
        e1.set("BUILD_ID", "10");
        e1.set("CHOST", "aarch64-unknown-linux-gnu");
        let mut e0 = e.clone();
        e0.set("CPV", "a/a-1");
        index.packages = vec![e1, e, e0];
        let text = index.render();
        assert_eq!(
            text,
            "CHOST: x86_64-pc-linux-gnu\nVERSION: 0\n\n\
             BUILD_ID: 2\nCPV: a/a-1\nDESC: d\nMTIME: 5\nREPO: r\n\n\
             BUILD_ID: 2\nCPV: a/b-1\nDESC: d\nMTIME: 5\nREPO: r\n\n\
             BUILD_ID: 10\nCHOST: aarch64-unknown-linux-gnu\nCPV: a/b-1\nDESC: d\nMTIME: 5\nREPO: r\n\n"
        );
        // Reading fills the inherited CHOST back in.
        insta::assert_snapshot!("packages_rendered", text);
        let back = Index::parse(text.as_bytes()).unwrap();
        assert_eq!(back.packages[0].get("CHOST"), Some("x86_64-pc-linux-gnu"));
        assert_eq!(back.render(), text);
    }

    #[test]
    fn garbage_is_an_error_naming_the_line() {
        let cases: &[(&[u8], usize, &str)] = &[
            (b"", 1, "empty"),
            (b"VERSION: 0\n", 1, "truncated"),
            (b"VERSION: 0\n\nCPV: a/b-1\nSIZE", 4, "truncated"),
            (b"VERSION: 0\n\nCPV: a/b-1\nnonsense here\n\n", 4, "KEY: value"),
            (b"VERSION: 0\n\nSIZE: 1\n\n", 3, "without CPV"),
            (b"TIMESTAMP: 1\n\n", 1, "no VERSION"),
            (b"VERSION: 99\n\n", 1, "unsupported"),
            (b"VERSION: 0\n\n\nCPV: a/b-1\n\n", 3, "second blank line"),
            (b"VERSION: 0\n\nCPV: a/b-1\nCPV: a/b-2\n\n", 4, "twice"),
            (b"VERSION: 0\n\nCPV:a/b-1\n\n", 3, "space"),
            (b"VERSION: 0\n\xff\xfe\n\n", 2, "UTF-8"),
            (b"VERSION: 0\n\nbad key: x\n\n", 3, "invalid key"),
        ];
        for (input, line, what) in cases {
            let e = Index::parse(input).unwrap_err();
            assert_eq!(e.line, *line, "{input:?}: {e}");
            assert!(e.message.contains(what), "{input:?}: {e}");
        }
    }

    #[test]
    fn is_allowed_matches_the_list() {
        assert!(ALLOWED_PKG_KEYS.iter().all(|k| is_allowed(k)));
        assert!(!is_allowed("REPO_REVISIONS") && !is_allowed("BLAKE2B") && !is_allowed(""));
    }

    /// The fast path gives exactly what parse + edit + render gives, or declines.
    #[test]
    fn splice_equals_the_slow_path() {
        let old = Index::parse(PORTAGE.as_bytes()).unwrap();
        let mut header = old.header.clone();
        header.insert("PACKAGES".into(), "3".into());
        header.insert("TIMESTAMP".into(), "1795534700".into());
        let mut cases: Vec<Vec<Entry>> = Vec::new();
        for (cpv, id, path) in [
            ("dbh-test/a-1", "4", "dbh-test/a/a-1-4.gpkg.tar"),
            ("dbh-test/hello-1.0", "2", "dbh-test/hello/hello-1.0-2.gpkg.tar"),
            ("dbh-test/hello-1.0", "0", "dbh-test/hello/hello-1.0-0.gpkg.tar"),
            ("zzz/last-2", "1", "zzz/last/last-2-1.gpkg.tar"),
            // Replaces greeter's entry (same PATH).
            ("dbh-test/greeter-1.0", "1", "dbh-test/greeter/greeter-1.0-1.gpkg.tar"),
        ] {
            let mut e = Entry::default();
            for (k, v) in [("CPV", cpv), ("BUILD_ID", id), ("PATH", path), ("SIZE", "1"), ("MTIME", "2"), ("MD5", "m"), ("SHA1", "s"), ("REPO", "dbh-lab"), ("CHOST", "x86_64-pc-linux-gnu"), ("SLOT", "0")] {
                e.set(k, v);
            }
            cases.push(vec![e]);
        }
        cases.push(cases.iter().flatten().cloned().collect());
        for new in cases {
            let mut slow = old.clone();
            let paths: Vec<String> = new.iter().map(Entry::effective_path).collect();
            slow.packages.retain(|e| !paths.contains(&e.effective_path()));
            slow.packages.extend(new.clone());
            let mut h = header.clone();
            h.insert("PACKAGES".into(), slow.packages.len().to_string());
            slow.header = h;
            assert_eq!(splice(PORTAGE, &header, &new).as_deref(), Some(slow.render().as_str()));
        }
        // Declines what it cannot copy verbatim.
        let changed_chost = {
            let mut h = header.clone();
            h.insert("CHOST".into(), "aarch64-unknown-linux-gnu".into());
            h
        };
        assert_eq!(splice(PORTAGE, &changed_chost, &[]), None);
        let with_unknown = PORTAGE.replace("RDEPEND: dbh-test/hello\n", "RDEPEND: dbh-test/hello\nREPO_REVISIONS: {}\n");
        assert_eq!(splice(&with_unknown, &header, &[]), None);
        let unsorted = PORTAGE.replace("CPV: dbh-test/greeter-1.0", "CPV: dbh-test/zzz-1.0");
        assert_eq!(splice(&unsorted, &header, &[]), None);
    }

    #[test]
    fn empty_index_and_empty_values() {
        let index = Index::parse(b"PACKAGES: 0\nURI:\nVERSION: 0\n\n").unwrap();
        assert_eq!(index.header("URI"), None);
        assert_eq!(index.render(), "PACKAGES: 0\nVERSION: 0\n\n");
    }

    /// Seeded random inputs (mutated valid indexes and plain noise) never panic the parser, and
    /// whatever parses renders to something that parses again to the same index.
    #[test]
    fn random_inputs_never_panic() {
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let alphabet = b"ABCPV:/ \n\n-_0123456789abz\r\xff";
        for round in 0..20_000 {
            let mut input = PORTAGE.as_bytes().to_vec();
            if round % 4 == 0 {
                let len = (next() % 200) as usize;
                input = (0..len).map(|_| alphabet[(next() % alphabet.len() as u64) as usize]).collect();
            } else {
                for _ in 0..(next() % 4 + 1) {
                    let pos = (next() % input.len() as u64) as usize;
                    match next() % 3 {
                        0 => input[pos] = alphabet[(next() % alphabet.len() as u64) as usize],
                        1 => {
                            input.remove(pos);
                        }
                        _ => input.truncate(pos),
                    }
                    if input.is_empty() {
                        break;
                    }
                }
            }
            if let Ok(index) = Index::parse(&input) {
                let text = index.render();
                let again = Index::parse(text.as_bytes())
                    .unwrap_or_else(|e| panic!("re-parse of {text:?} failed: {e}"));
                assert_eq!(again.render(), text);
            }
        }
    }
}
