//! (Re)indexing a binhost directory: find the binary packages, turn each into an index entry the
//! way Portage's `_populate_local` + `_pkgindex_entry` do, reuse entries whose file did not change,
//! and write `Packages`/`Packages.gz` when anything changed.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use md5::Digest as _;

use super::deps::{self, USE_EVALUATED_KEYS};
use super::index::{normalize, Entry, Index};
use super::{BinhostError, DirLock};
use crate::events::{Event, Reporter, Unit};
use crate::target::Target;

/// File name endings Portage reads as binary packages.
pub const SUFFIXES: &[&str] = &[".gpkg.tar", ".xpak", ".tbz2"];

/// Metadata keys Portage copies from a binary package into its index entry
/// (`dbapi._aux_cache_keys`, minus those computed from the file).
const METADATA_KEYS: &[&str] = &[
    "BDEPEND", "BUILD_ID", "BUILD_TIME", "CHOST", "DEFINED_PHASES", "DEPEND", "EAPI", "IDEPEND",
    "IUSE", "KEYWORDS", "LICENSE", "PDEPEND", "PROPERTIES", "PROVIDES", "RDEPEND", "repository",
    "REQUIRES", "RESTRICT", "SLOT", "USE", "USER_PATCHES",
];

/// A package file under the binhost root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// Path relative to the root, `/`-separated (the index's PATH).
    pub rel: String,
    pub size: u64,
    pub mtime: i64,
}

/// Every regular file under `dir` whose name ends in a package suffix, sorted by path. Names
/// starting with `.` (our temp files, hidden directories) and non-UTF-8 names are skipped, as
/// Portage effectively does.
pub fn walk(dir: &Path) -> Result<Vec<Found>, BinhostError> {
    let mut found = Vec::new();
    let mut stack = vec![(dir.to_owned(), String::new())];
    while let Some((abs, rel)) = stack.pop() {
        for entry in fs_err::read_dir(&abs)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with('.') {
                continue;
            }
            let child_rel = if rel.is_empty() { name.to_owned() } else { format!("{rel}/{name}") };
            let kind = entry.file_type()?;
            if kind.is_dir() {
                stack.push((entry.path(), child_rel));
            } else if kind.is_file() && SUFFIXES.iter().any(|s| name.ends_with(s)) {
                let meta = fs_err::symlink_metadata(entry.path())?;
                found.push(Found { rel: child_rel, size: meta.len(), mtime: meta.mtime() });
            }
        }
    }
    found.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok(found)
}

/// Why a file got no index entry (Portage prints a warning and skips it as well).
#[derive(Debug)]
pub enum Skip {
    Unreadable(BinhostError),
    Invalid(String),
}

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Skip::Unreadable(e) => f.write_str(&crate::hint::chain(e)),
            Skip::Invalid(reason) => f.write_str(reason),
        }
    }
}

/// Packages up to this size are read into memory whole.
const IN_MEMORY_LIMIT: u64 = 8 * 1024 * 1024;

/// MD5 and SHA1 of bytes, hex.
pub fn hash_bytes(bytes: &[u8]) -> (String, String) {
    (hex::encode(md5::Md5::digest(bytes)), hex::encode(sha1::Sha1::digest(bytes)))
}

/// MD5 and SHA1 of a file, hex (`_pkgindex_hashes`), read once with a large buffer.
pub fn hash_file(path: &Path) -> Result<(String, String), BinhostError> {
    let mut file = fs_err::File::open(path)?;
    let mut md5 = md5::Md5::new();
    let mut sha1 = sha1::Sha1::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        md5.update(&buf[..n]);
        sha1.update(&buf[..n]);
    }
    Ok((hex::encode(md5.finalize()), hex::encode(sha1.finalize())))
}

/// Builds the index entry for the package at `root/found.rel`: metadata, USE-evaluated
/// dependencies, PATH, SIZE, MTIME, MD5, SHA1. Applies Portage's validity rules for names and
/// locations, so that an entry we write is one Portage would have written too.
pub fn entry_for(root: &Path, found: &Found) -> Result<Entry, Skip> {
    entry_for_file(&root.join(&found.rel), found)
}

/// [`entry_for`] for a file that is still at `path` (a temp file) but will be at `found.rel`.
pub fn entry_for_file(path: &Path, found: &Found) -> Result<Entry, Skip> {
    let path = path.to_owned();
    let unreadable = |source| Skip::Unreadable(BinhostError::Package { path: path.clone(), source: Box::new(source) });
    // Small packages (the common case) are read once: metadata and digests from the same bytes.
    let (pkg, digests) = if found.size <= IN_MEMORY_LIMIT {
        let bytes = fs_err::read(&path).map_err(|e| Skip::Unreadable(e.into()))?;
        let pkg = if found.rel.ends_with(".gpkg.tar") {
            crate::binpkg::read_gpkg_bytes(&bytes)
        } else {
            crate::binpkg::read_xpak_bytes(&bytes)
        };
        (pkg.map_err(unreadable)?, Some(hash_bytes(&bytes)))
    } else {
        (crate::binpkg::read(&path).map_err(unreadable)?, None)
    };
    let meta = &pkg.metadata;
    let get = |k: &str| meta.get(k).map(normalize).unwrap_or_default();
    let (cat, pf, slot) = (get("CATEGORY"), get("PF"), get("SLOT"));
    let missing: Vec<&str> = [("CATEGORY", &cat), ("PF", &pf), ("SLOT", &slot)]
        .iter()
        .filter(|(_, v)| v.is_empty())
        .map(|(k, _)| *k)
        .collect();
    if !missing.is_empty() {
        return Err(Skip::Invalid(format!("missing metadata key(s): {}", missing.join(", "))));
    }
    check_location(&found.rel, &cat, &pf)?;
    let mut entry = Entry::default();
    for key in METADATA_KEYS {
        let value = get(key);
        let key = if *key == "repository" { "REPO" } else { key };
        if !value.is_empty() {
            entry.set(key, value);
        } else if key == "EAPI" {
            entry.set(key, "0");
        }
    }
    if let Some(id) = entry.get("BUILD_ID") {
        let id: u64 = id
            .parse()
            .ok()
            .filter(|id| *id <= crate::binpkg::MAX_BUILD_ID)
            .ok_or_else(|| Skip::Invalid(format!("invalid BUILD_ID {id:?}")))?;
        entry.set("BUILD_ID", id.to_string());
    }
    eval_use_flags(&mut entry).map_err(Skip::Invalid)?;
    let (md5, sha1) = match digests {
        Some(d) => d,
        None => hash_file(&path).map_err(Skip::Unreadable)?,
    };
    entry.set("CPV", format!("{cat}/{pf}"));
    entry.set("PATH", found.rel.clone());
    entry.set("SIZE", found.size.to_string());
    entry.set("MTIME", found.mtime.to_string());
    entry.set("MD5", md5);
    entry.set("SHA1", sha1);
    Ok(entry)
}

/// Portage's `_eval_use_flags`.
fn eval_use_flags(entry: &mut Entry) -> Result<(), String> {
    let use_flags = entry.get("USE").unwrap_or_default().to_owned();
    let flags: Vec<&str> = use_flags.split_whitespace().collect();
    for key in USE_EVALUATED_KEYS {
        if let Some(value) = entry.fields.get(*key) {
            let reduced = deps::use_reduce(value, &flags, key.ends_with("DEPEND"))
                .map_err(|e| format!("{key}: {e}"))?;
            entry.set(key, reduced);
        }
    }
    Ok(())
}

/// The name and directory rules of `_populate_local` (multi-instance `cat/pn/pf-N.*`, flat
/// `cat/pf.*` or `All/pf.*`).
fn check_location(rel: &str, cat: &str, pf: &str) -> Result<(), Skip> {
    let (dir, file) = rel.rsplit_once('/').unwrap_or(("", rel));
    let bad = |why: &str| Err(Skip::Invalid(format!("{why} (metadata says {cat}/{pf})")));
    if !deps::valid_category(cat) {
        return bad("the category is not valid");
    }
    let build_id = deps::parse_build_id(file);
    let multi_instance = if file.ends_with(".xpak") {
        if build_id == 0 || file != format!("{pf}-{build_id}.xpak") {
            return bad("the file name is not PF-BUILD_ID.xpak");
        }
        true
    } else if file.ends_with(".gpkg.tar") {
        if build_id > 0 {
            if file != format!("{pf}-{build_id}.gpkg.tar") {
                return bad("the file name is not PF-BUILD_ID.gpkg.tar");
            }
            true
        } else {
            if file != format!("{pf}.gpkg.tar") {
                return bad("the file name is not PF.gpkg.tar");
            }
            false
        }
    } else {
        if file != format!("{pf}.tbz2") {
            return bad("the file name is not PF.tbz2");
        }
        false
    };
    if multi_instance {
        match deps::pkgsplit(pf) {
            Some((pn, _, _)) if dir == format!("{cat}/{pn}") => Ok(()),
            _ => bad("a multi-instance package must be in CATEGORY/PN/"),
        }
    } else if dir == cat || dir == "All" {
        Ok(())
    } else {
        bad("a package must be in its CATEGORY/ directory")
    }
}

/// Reads entries for many files in parallel (the work is hashing and small decompressions, so
/// plain threads over the available cores suffice).
pub fn read_entries(
    root: &Path,
    files: &[&Found],
    reporter: &dyn Reporter,
    task: &str,
) -> Vec<Result<Entry, Skip>> {
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(files.len().max(1));
    let mut results: Vec<Option<Result<Entry, Skip>>> = Vec::new();
    results.resize_with(files.len(), || None);
    let chunks: Vec<Vec<(usize, Result<Entry, Skip>)>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut out = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(found) = files.get(i) else { break };
                        out.push((i, entry_for(root, found)));
                        let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                        if n.is_multiple_of(256) {
                            reporter.event(Event::Progress {
                                task: task.to_owned(),
                                position: n as u64,
                                message: None,
                            });
                        }
                    }
                    out
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().expect("index worker panicked")).collect()
    });
    for (i, r) in chunks.into_iter().flatten() {
        results[i] = Some(r);
    }
    results.into_iter().map(|r| r.expect("every file was read")).collect()
}

/// How to fill the header.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options<'a> {
    /// Re-read every package, not only changed ones.
    pub full: bool,
    /// Take ARCH, CHOST and PROFILE from this target.
    pub target: Option<&'a Target>,
}

/// What a reindex did.
#[derive(Debug, Default)]
pub struct Outcome {
    pub packages: usize,
    pub read: usize,
    pub reused: usize,
    pub dropped: usize,
    pub skipped: Vec<(PathBuf, String)>,
    /// False when the index was already up to date and was left alone.
    pub written: bool,
}

/// `dbh binhost index DIR`: takes the lock, removes stale temp files, reindexes.
pub fn index_dir(dir: &Path, opts: Options<'_>, reporter: &dyn Reporter) -> Result<Outcome, BinhostError> {
    if !dir.is_dir() {
        return Err(BinhostError::NotADir { path: dir.to_owned() });
    }
    let _lock = DirLock::exclusive(dir, reporter)?;
    super::clean_stale_temps(dir)?;
    let old = match super::read_index(dir) {
        Ok(old) => old,
        // --full does not need the old entries; a broken index is what it is for.
        Err(BinhostError::Parse { path, source }) if opts.full => {
            reporter.event(Event::Note {
                message: format!("ignoring the unreadable index {}: {source}", path.display()),
            });
            None
        }
        Err(e) => return Err(e),
    };
    let outcome = reindex_locked(dir, old, opts, reporter)?;
    // Whatever an interrupted add placed is indexed now: its journal is done.
    match fs_err::remove_file(dir.join(super::JOURNAL)) {
        Ok(()) => super::sync_dir(dir)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    Ok(outcome)
}

/// Reindexes `dir` with the lock held, starting from the already parsed old index.
pub fn reindex_locked(
    dir: &Path,
    old: Option<Index>,
    opts: Options<'_>,
    reporter: &dyn Reporter,
) -> Result<Outcome, BinhostError> {
    let files = walk(dir)?;
    let had_index = old.is_some();
    let old = old.unwrap_or_default();
    let mut by_path: HashMap<String, &Entry> = HashMap::new();
    for e in &old.packages {
        by_path.entry(e.effective_path()).or_insert(e);
    }
    let mut outcome = Outcome::default();
    let mut entries = Vec::with_capacity(files.len());
    let mut to_read = Vec::new();
    for found in &files {
        match by_path.get(found.rel.as_str()) {
            Some(e) if !opts.full && reusable(e, found) => {
                let mut e = (*e).clone();
                e.retain_allowed();
                e.line = 0;
                entries.push(e);
                outcome.reused += 1;
            }
            _ => to_read.push(found),
        }
    }
    let task = format!("index:{}", dir.display());
    if !to_read.is_empty() {
        reporter.event(Event::Start {
            task: task.clone(),
            label: format!("indexing {}", dir.display()),
            total: Some(to_read.len() as u64),
            unit: Unit::Items,
        });
    }
    let results = read_entries(dir, &to_read, reporter, &task);
    for (found, result) in to_read.iter().zip(results) {
        match result {
            Ok(e) => {
                entries.push(e);
                outcome.read += 1;
            }
            Err(skip) => {
                let path = dir.join(&found.rel);
                reporter.event(Event::Note {
                    message: format!("skipping {}: {skip}", path.display()),
                });
                outcome.skipped.push((path, skip.to_string()));
            }
        }
    }
    let present: std::collections::HashSet<&str> = files.iter().map(|f| f.rel.as_str()).collect();
    outcome.dropped = old.packages.iter().filter(|e| !present.contains(e.effective_path().as_str())).count();
    let mut index = Index { header: old.header.clone(), packages: entries };
    fill_header(&mut index, opts.target);
    index.sort();
    outcome.packages = index.packages.len();
    outcome.written = commit(dir, &old, had_index, index)?;
    reporter.event(Event::Count { name: "binhost.read".into(), value: outcome.read as u64 });
    reporter.event(Event::Count { name: "binhost.reused".into(), value: outcome.reused as u64 });
    if !to_read.is_empty() {
        reporter.event(Event::Finish {
            task,
            message: format!("read {} package(s)", outcome.read),
        });
    }
    Ok(outcome)
}

fn reusable(e: &Entry, found: &Found) -> bool {
    e.size() == Some(found.size)
        && e.mtime() == Some(found.mtime)
        && e.get("MD5").is_some()
        && e.get("SHA1").is_some()
}

/// Sets VERSION/ARCH/CHOST/PROFILE: from the target when given, else kept from the old header,
/// else derived from the packages (the most common CHOST, and the ARCH of the built-in target
/// with that CHOST).
pub fn fill_header(index: &mut Index, target: Option<&Target>) {
    let h = &mut index.header;
    h.insert("VERSION".into(), super::index::VERSION.to_string());
    if let Some(t) = target {
        h.insert("ARCH".into(), t.arch.clone());
        h.insert("CHOST".into(), t.chost.clone());
        h.insert("PROFILE".into(), t.profile_path().to_owned());
        return;
    }
    if h.get("CHOST").is_none_or(|v| v.is_empty()) {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for e in &index.packages {
            if let Some(c) = e.get("CHOST") {
                *counts.entry(c).or_default() += 1;
            }
        }
        // Most common; ties go to the smallest name so the result is deterministic.
        if let Some((chost, _)) = counts.iter().max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0))) {
            h.insert("CHOST".into(), (*chost).to_owned());
        }
    }
    if h.get("ARCH").is_none_or(|v| v.is_empty())
        && let Some(arch) = h.get("CHOST").and_then(|c| arch_for_chost(c))
    {
        h.insert("ARCH".into(), arch);
    }
}

/// Portage's ARCH for a CHOST: the built-in target with that CHOST, else by the CPU part.
pub fn arch_for_chost(chost: &str) -> Option<String> {
    if let Some(t) = crate::target::Targets::builtin().iter().find(|t| t.chost == chost) {
        return Some(t.arch.clone());
    }
    let cpu = chost.split('-').next()?;
    let arch = match cpu {
        "x86_64" => "amd64",
        "aarch64" | "aarch64_be" => "arm64",
        c if c.starts_with("riscv") => "riscv",
        c if c.starts_with("powerpc64") => "ppc64",
        c if c.starts_with("powerpc") => "ppc",
        c if c.starts_with("arm") => "arm",
        c if c.len() == 4 && c.starts_with('i') && c.ends_with("86") => "x86",
        "s390x" => "s390",
        c if c.starts_with("loongarch") => "loong",
        c if c.starts_with("mips") => "mips",
        "sparc64" => "sparc",
        "alpha" => "alpha",
        c if c.starts_with("hppa") => "hppa",
        c if c.starts_with("m68k") => "m68k",
        _ => return None,
    };
    Some(arch.to_owned())
}

/// Writes the new index unless it equals the old one (then the old TIMESTAMP stays, so clients
/// keep getting 304). Keys Portage drops on reading (e.g. emerge's REPO_REVISIONS) do not count
/// as a change on their own. TIMESTAMP never goes down: max(now, old + 1).
fn commit(dir: &Path, old: &Index, had_index: bool, mut index: Index) -> Result<bool, BinhostError> {
    index.header.insert("PACKAGES".into(), index.packages.len().to_string());
    let old_ts = old.timestamp();
    if had_index && let Some(ts) = old_ts {
        index.header.insert("TIMESTAMP".into(), ts.to_string());
        let old_text = old.render();
        let clean = old.packages.iter().all(|e| e.fields.keys().all(|k| super::index::is_allowed(k)));
        let same = if clean {
            index.render() == old_text
        } else {
            let mut allowed = old.clone();
            allowed.packages.iter_mut().for_each(Entry::retain_allowed);
            index.render() == allowed.render()
        };
        if same && files_match(dir, &old_text, ts) {
            return Ok(false);
        }
    }
    let ts = super::next_timestamp(old_ts);
    index.header.insert("TIMESTAMP".into(), ts.to_string());
    super::write_index(dir, &index)?;
    Ok(true)
}

/// Do Packages and Packages.gz on disk hold exactly `text`, with mtime `ts`?
fn files_match(dir: &Path, text: &str, ts: u64) -> bool {
    let ok = |name: &str| std::fs::metadata(dir.join(name)).is_ok_and(|m| m.mtime() == ts as i64);
    ok("Packages")
        && ok("Packages.gz")
        && std::fs::read(dir.join("Packages")).is_ok_and(|b| b == text.as_bytes())
        && gunzip(&dir.join("Packages.gz")).is_ok_and(|b| b == text.as_bytes())
}

/// Decompresses a whole gzip file, every member of it (dbh writes one member per block).
pub fn gunzip(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(std::io::BufReader::new(std::fs::File::open(path)?)).read_to_end(&mut out)?;
    Ok(out)
}
