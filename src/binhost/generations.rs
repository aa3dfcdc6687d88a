//! Generations of a binhost's published index, and the block-structured `Packages.gz` that makes
//! every publish cost O(change) (docs/binhost-lifecycle.md).
//!
//! Owns the index write path: every change of `Packages` goes through [`publish`], which records
//! a generation — its number, time, TIMESTAMP, what changed (`CPV-BUILD_ID`s added and removed)
//! and the index it produced — in `.dbh-generations/` (a dot directory: neither Portage, our
//! scanner nor `dbh serve` ever looks inside).
//!
//! `Packages.gz` is a sequence of gzip members (RFC 1952 §2.2; Python's `GzipFile`, which Portage
//! reads it with, and `zcat` read them as one stream): one for the header, then one per block of
//! stanzas. Block boundaries are content-defined (after a stanza whose identity hashes to
//! 0 mod [`BLOCK_TARGET`]), so adding or removing one package changes one block: only that block
//! is compressed again, every other member is copied byte for byte from the current
//! `Packages.gz` after its plain text was compared with the new text (memcmp, not hashing).
//! [`publish_edit`] (add, rm) skips even the comparison: it is given the edits and touches only
//! the blocks they fall in.
//!
//! Storage: generation N is `N.json` (the record, with the member layout) and `N.Packages.gz`, a
//! hard link to the very inode that was published as `Packages.gz` — a generation's index costs
//! no copy, and `Packages.gz` being the same inode as the latest record's is how we know it was
//! published. `Packages` is its decompression.
//!
//! Crash safety, in [`publish`]: (1) both temp files complete and fsynced; (2) the temp
//! `Packages.gz` hard-linked as `N.Packages.gz`, `N.json` renamed into place, directory fsynced;
//! (3) `Packages.gz` then `Packages` renamed, directory fsynced. [`recover`] (run under the lock
//! by every writer first) finishes (3) when only `Packages.gz` made it, and removes a record that
//! never got published. So the published index is always one whole generation.

use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{io_at, sync_dir, BinhostError, TempFile};

/// Where generations live, relative to the binhost root.
pub const GEN_DIR: &str = ".dbh-generations";
/// Expected stanzas per gzip member: 10 000 packages make ~300 members of ~20 KiB text.
pub const BLOCK_TARGET: u64 = 32;
/// A block never holds more stanzas than this, whatever the hashes say.
pub const BLOCK_MAX: usize = 128;
/// Compression level of a block: small inputs, compressed once and then copied for ever.
const LEVEL: u32 = 6;

/// One gzip member after the header's: its plain and compressed length and stanza count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Block {
    pub plain: u64,
    pub gz: u64,
    pub count: u64,
}

/// One generation's record (`N.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generation {
    pub generation: u64,
    /// Unix seconds when it was published.
    pub time: u64,
    /// The index's TIMESTAMP (= mtime of its Packages and Packages.gz).
    pub timestamp: u64,
    /// What made it: `add`, `index`, `rm`, `prune`, `rollback to N`.
    pub op: String,
    pub packages: u64,
    /// `CPV-BUILD_ID` (or plain CPV for an entry without BUILD_ID), sorted.
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub header_plain: u64,
    pub header_gz: u64,
    pub blocks: Vec<Block>,
}

impl Generation {
    // Saturating: the lengths come from a file on disk and are compared with real file sizes.
    fn plain_len(&self) -> u64 {
        self.blocks.iter().fold(self.header_plain, |a, b| a.saturating_add(b.plain))
    }
    fn gz_len(&self) -> u64 {
        self.blocks.iter().fold(self.header_gz, |a, b| a.saturating_add(b.gz))
    }
}

pub fn gen_dir(dir: &Path) -> PathBuf {
    dir.join(GEN_DIR)
}

fn record_path(dir: &Path, n: u64) -> PathBuf {
    gen_dir(dir).join(format!("{n}.json"))
}

/// The published `Packages.gz` of generation `n`.
pub fn gz_path(dir: &Path, n: u64) -> PathBuf {
    gen_dir(dir).join(format!("{n}.Packages.gz"))
}

/// Every recorded generation, oldest first.
pub fn list(dir: &Path) -> Result<Vec<Generation>, BinhostError> {
    numbers(dir)?.into_iter().map(|n| read_record(dir, n)).collect()
}

/// The newest `n` records, oldest first (reads only those).
pub fn newest(dir: &Path, n: usize) -> Result<Vec<Generation>, BinhostError> {
    let all = numbers(dir)?;
    all[all.len().saturating_sub(n)..].iter().map(|g| read_record(dir, *g)).collect()
}

/// The numbers of the recorded generations, ascending.
pub fn numbers(dir: &Path) -> Result<Vec<u64>, BinhostError> {
    let mut numbers = Vec::new();
    match fs_err::read_dir(gen_dir(dir)) {
        Ok(entries) => {
            for e in entries {
                let name = e?.file_name();
                if let Some(n) = name.to_str().and_then(|n| n.strip_suffix(".json")).and_then(|n| n.parse::<u64>().ok()) {
                    numbers.push(n);
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    }
    numbers.sort_unstable();
    Ok(numbers)
}

pub fn read_record(dir: &Path, n: u64) -> Result<Generation, BinhostError> {
    let path = record_path(dir, n);
    let text = fs_err::read_to_string(&path)?;
    serde_json::from_str(&text).map_err(|e| BinhostError::Generation {
        path,
        reason: format!("is not a generation record: {e}"),
    })
}

/// The index text generation `n` published.
pub fn read_text(dir: &Path, n: u64) -> Result<String, BinhostError> {
    let path = gz_path(dir, n);
    let bytes = fs_err::read(&path)?;
    gunzip_all(&bytes).map_err(|e| BinhostError::Generation { path, reason: format!("cannot be decompressed: {e}") })
}

/// Decompresses every member of a gzip stream (flate2's `GzDecoder` stops after the first).
pub fn gunzip_all(bytes: &[u8]) -> std::io::Result<String> {
    let mut out = String::new();
    flate2::read::MultiGzDecoder::new(bytes).read_to_string(&mut out)?;
    Ok(out)
}

/// The PATHs an index text lists (every `PATH: ` line of its package stanzas).
pub fn paths_of(text: &str) -> Vec<String> {
    text.lines().filter_map(|l| l.strip_prefix("PATH: ")).map(str::to_owned).collect()
}

fn same_inode(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// How the published files relate to the records (read-only; `check` reports it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// No generation recorded yet.
    Unrecorded,
    /// Packages and Packages.gz are generation N.
    Published(u64),
    /// Packages.gz is generation N, Packages still N-1's: a publish was interrupted between the
    /// two renames (both are whole indexes; the next writer finishes it).
    GzAhead(u64),
    /// Generation N was recorded but never published (Packages.gz is N-1's); the next writer
    /// drops the record.
    Unpublished(u64),
    /// The published index is none of the recorded generations (written by another tool).
    External,
}

pub fn state(dir: &Path) -> Result<State, BinhostError> {
    observe(dir).map(|(state, _)| state)
}

/// The state, and the newest two records it was decided from (oldest first).
fn observe(dir: &Path) -> Result<(State, Vec<Generation>), BinhostError> {
    let gens = newest(dir, 2)?;
    let state = state_of(dir, &gens);
    Ok((state, gens))
}

fn state_of(dir: &Path, gens: &[Generation]) -> State {
    let Some(last) = gens.last() else { return State::Unrecorded };
    let published = dir.join("Packages.gz");
    let plain_is = |g: &Generation| {
        std::fs::metadata(dir.join("Packages")).is_ok_and(|m| m.len() == g.plain_len() && m.mtime() == g.timestamp as i64)
    };
    if same_inode(&published, &gz_path(dir, last.generation)) {
        if plain_is(last) {
            return State::Published(last.generation);
        }
        // Only the state between the two renames: Packages is still the previous generation's.
        let before = gens.len() >= 2 && plain_is(&gens[gens.len() - 2]);
        let missing = !dir.join("Packages").exists() && gens.len() == 1;
        return if before || missing { State::GzAhead(last.generation) } else { State::External };
    }
    if gens.len() >= 2 && same_inode(&published, &gz_path(dir, gens[gens.len() - 2].generation)) {
        return State::Unpublished(last.generation);
    }
    State::External
}

/// What a writer knows once [`recover`] is done: the state of the published index and the
/// newest record. Valid while the caller holds the lock it was observed under.
#[derive(Debug, Clone)]
pub struct Observed {
    pub state: State,
    pub last: Option<Generation>,
}

/// Brings an interrupted publish to a whole generation. Call with the lock held. Returns what
/// the generations are afterwards, so that the caller does not read them again.
pub fn recover(dir: &Path) -> Result<Observed, BinhostError> {
    let (state, mut gens) = observe(dir)?;
    match state {
        State::GzAhead(n) => {
            let g = read_record(dir, n)?;
            let text = read_text(dir, n)?;
            let mut plain = TempFile::new(dir, "Packages")?;
            plain.file().write_all(text.as_bytes()).map_err(|e| io_at(plain.path(), "cannot write", e))?;
            plain.persist(&dir.join("Packages"), Some(g.timestamp))?;
            sync_dir(dir)?;
            Ok(Observed { state: State::Published(n), last: Some(g) })
        }
        State::Unpublished(n) => {
            fs_err::remove_file(record_path(dir, n))?;
            let _ = std::fs::remove_file(gz_path(dir, n));
            sync_dir(&gen_dir(dir))?;
            let (state, mut gens) = observe(dir)?;
            Ok(Observed { state, last: gens.pop() })
        }
        state => Ok(Observed { state, last: gens.pop() }),
    }
}

/// Identity of a stanza: `CPV-BUILD_ID`, or CPV without a BUILD_ID.
pub fn stanza_id(stanza: &str) -> String {
    let (mut cpv, mut id) = ("", None);
    for line in stanza.lines() {
        if let Some(v) = line.strip_prefix("CPV: ") {
            cpv = v;
        } else if let Some(v) = line.strip_prefix("BUILD_ID: ") {
            id = Some(v);
        }
    }
    match id {
        Some(id) => format!("{cpv}-{id}"),
        None => cpv.to_owned(),
    }
}

/// Splits a body (everything after the header's blank line) into stanzas, each with its
/// terminating blank line.
fn stanzas(body: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = body;
    while let Some(i) = rest.find("\n\n") {
        out.push(&rest[..i + 2]);
        rest = &rest[i + 2..];
    }
    out
}

/// A cheap hash of a stanza's start (BUILD_ID, BUILD_TIME and CPV come first): it only decides
/// block boundaries, never identity.
fn boundary_hash(stanza: &str) -> u64 {
    let bytes = &stanza.as_bytes()[..stanza.len().min(96)];
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^ (h >> 29)
}

/// Content-defined blocks of consecutive stanzas, as (start, end) stanza indexes.
fn blocks_of(stanzas: &[&str]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, s) in stanzas.iter().enumerate() {
        if i + 1 - start >= BLOCK_MAX || boundary_hash(s).is_multiple_of(BLOCK_TARGET) {
            out.push((start, i + 1));
            start = i + 1;
        }
    }
    if start < stanzas.len() {
        out.push((start, stanzas.len()));
    }
    out
}

fn gzip_member(text: &[u8], mtime: u32) -> Vec<u8> {
    let mut enc = flate2::GzBuilder::new()
        .mtime(mtime)
        .write(Vec::with_capacity(text.len() / 4 + 64), flate2::Compression::new(LEVEL));
    enc.write_all(text).expect("writing to memory");
    enc.finish().expect("writing to memory")
}

/// The current Packages and Packages.gz, when they are exactly the latest generation's.
struct Current {
    record: Generation,
    plain: Vec<u8>,
    gz: Vec<u8>,
}

fn current(dir: &Path, last: &Generation) -> Option<Current> {
    if !same_inode(&dir.join("Packages.gz"), &gz_path(dir, last.generation)) {
        return None;
    }
    let plain = std::fs::read(dir.join("Packages")).ok()?;
    let gz = std::fs::read(dir.join("Packages.gz")).ok()?;
    (plain.len() as u64 == last.plain_len() && gz.len() as u64 == last.gz_len())
        .then(|| Current { record: last.clone(), plain, gz })
}

/// Publishes `text` (a complete index whose header says TIMESTAMP `timestamp`) as the next
/// generation, made by `op`. The caller holds the binhost's lock and has placed every file the
/// index lists.
pub fn publish(dir: &Path, text: &str, timestamp: u64, op: &str) -> Result<Generation, BinhostError> {
    recover(dir)?;
    let gdir = gen_dir(dir);
    if !gdir.is_dir() {
        fs_err::create_dir_all(&gdir)?;
        sync_dir(dir)?;
    }
    let last = newest(dir, 1)?.pop();
    let (header, body) = match text.find("\n\n") {
        Some(i) => (&text[..i + 2], &text[i + 2..]),
        None => (text, ""),
    };
    let new_stanzas = stanzas(body);
    let new_blocks = blocks_of(&new_stanzas);
    let cur = last.as_ref().and_then(|l| current(dir, l));

    // Old blocks by plain length: (offset in plain, offset in gz, index).
    let mut old_by_len: HashMap<u64, Vec<(usize, usize, usize)>> = HashMap::new();
    if let Some(c) = &cur {
        let (mut p, mut z) = (c.record.header_plain as usize, c.record.header_gz as usize);
        for (i, b) in c.record.blocks.iter().enumerate() {
            old_by_len.entry(b.plain).or_default().push((p, z, i));
            p += b.plain as usize;
            z += b.gz as usize;
        }
    }
    let mut reused_old = vec![false; cur.as_ref().map_or(0, |c| c.record.blocks.len())];
    let header_gz = gzip_member(header.as_bytes(), timestamp as u32);
    let mut members: Vec<std::borrow::Cow<'_, [u8]>> = Vec::with_capacity(new_blocks.len() + 1);
    let mut blocks = Vec::with_capacity(new_blocks.len());
    let mut added: BTreeSet<String> = BTreeSet::new();
    let mut offset = header.len();
    for (start, end) in &new_blocks {
        let len: usize = new_stanzas[*start..*end].iter().map(|s| s.len()).sum();
        let block_text = &body[offset - header.len()..offset - header.len() + len];
        offset += len;
        let found = cur.as_ref().and_then(|c| {
            old_by_len.get(&(len as u64))?.iter().find(|(p, _, i)| {
                !reused_old[*i] && &c.plain[*p..*p + len] == block_text.as_bytes()
            })
        });
        match (found, &cur) {
            (Some(&(_, z, i)), Some(c)) => {
                reused_old[i] = true;
                let gz_len = c.record.blocks[i].gz as usize;
                members.push(std::borrow::Cow::Borrowed(&c.gz[z..z + gz_len]));
                blocks.push(Block { plain: len as u64, gz: gz_len as u64, count: (end - start) as u64 });
            }
            _ => {
                let gz = gzip_member(block_text.as_bytes(), 0);
                blocks.push(Block { plain: len as u64, gz: gz.len() as u64, count: (end - start) as u64 });
                members.push(std::borrow::Cow::Owned(gz));
                added.extend(new_stanzas[*start..*end].iter().map(|s| stanza_id(s)));
            }
        }
    }
    // What went: stanzas of old blocks that were not reused (or, without a usable current
    // state, of the whole old index).
    let mut removed: BTreeSet<String> = BTreeSet::new();
    match &cur {
        Some(c) => {
            let mut p = c.record.header_plain as usize;
            for (i, b) in c.record.blocks.iter().enumerate() {
                if !reused_old[i] {
                    let t = String::from_utf8_lossy(&c.plain[p..p + b.plain as usize]);
                    removed.extend(stanzas(&t).iter().map(|s| stanza_id(s)));
                }
                p += b.plain as usize;
            }
        }
        None => {
            if let Ok(old) = std::fs::read_to_string(dir.join("Packages"))
                && let Some(i) = old.find("\n\n")
            {
                removed.extend(stanzas(&old[i + 2..]).iter().map(|s| stanza_id(s)));
            }
        }
    }
    let both: Vec<String> = added.intersection(&removed).cloned().collect();
    for id in &both {
        added.remove(id);
        removed.remove(id);
    }

    let number = last.as_ref().map_or(1, |l| l.generation + 1);
    let record = Generation {
        generation: number,
        time: super::now(),
        timestamp,
        op: op.to_owned(),
        packages: new_stanzas.len() as u64,
        added: added.into_iter().collect(),
        removed: removed.into_iter().collect(),
        header_plain: header.len() as u64,
        header_gz: header_gz.len() as u64,
        blocks,
    };

    // (1) Both files complete and durable.
    let mut gz = TempFile::new(dir, "Packages.gz")?;
    {
        let path = gz.path().to_owned();
        let mut w = std::io::BufWriter::new(gz.file());
        w.write_all(&header_gz).map_err(|e| io_at(&path, "cannot write", e))?;
        for m in &members {
            w.write_all(m).map_err(|e| io_at(&path, "cannot write", e))?;
        }
        w.flush().map_err(|e| io_at(&path, "cannot write", e))?;
    }
    let mut plain = TempFile::new(dir, "Packages")?;
    plain.file().write_all(text.as_bytes()).map_err(|e| io_at(plain.path(), "cannot write", e))?;
    commit(dir, gz, plain, &record)?;
    Ok(record)
}

/// Steps (1)–(3) of a publish once both temp files hold their complete content: fsync them
/// with the index's TIMESTAMP as mtime, record the generation, rename both into place.
fn commit(dir: &Path, mut gz: TempFile, mut plain: TempFile, record: &Generation) -> Result<(), BinhostError> {
    let (timestamp, number) = (record.timestamp, record.generation);
    let gdir = gen_dir(dir);
    gz.sync(Some(timestamp))?;
    plain.sync(Some(timestamp))?;
    // (2) The record.
    let link = gz_path(dir, number);
    let _ = std::fs::remove_file(&link);
    fs_err::hard_link(gz.path(), &link)?;
    let mut rec = TempFile::new(dir, "generation")?;
    let json = serde_json::to_vec_pretty(record).expect("a record serializes");
    rec.file().write_all(&json).map_err(|e| io_at(rec.path(), "cannot write", e))?;
    rec.persist(&record_path(dir, number), None)?;
    sync_dir(&gdir)?;
    // (3) Publish.
    gz.rename(&dir.join("Packages.gz"))?;
    plain.rename(&dir.join("Packages"))?;
    sync_dir(dir)
}

/// One change of the current index's body for [`publish_edit`]: bytes `start..end` of the
/// current `Packages` (past its header; `start == end` inserts) become `text` (whole stanzas,
/// each ending in its blank line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edit {
    pub start: usize,
    pub end: usize,
    pub text: String,
}

/// `old` (the current `Packages` text) with its header replaced by `header` and `edits` (sorted,
/// not overlapping) applied.
pub fn apply(old: &str, header: &str, edits: &[Edit]) -> String {
    let body_at = old.find("\n\n").map_or(old.len(), |i| i + 2);
    let mut out = String::with_capacity(old.len() + edits.iter().map(|e| e.text.len()).sum::<usize>());
    out.push_str(header);
    let mut pos = body_at;
    for e in edits {
        out.push_str(&old[pos..e.start]);
        out.push_str(&e.text);
        pos = e.end;
    }
    out.push_str(&old[pos..]);
    out
}

/// [`publish`] of `apply(old, header, edits)`, at O(change) when the published files are exactly
/// the latest generation (the usual case): only the blocks the edits touch are split and
/// compressed again; every other block is copied, for `Packages.gz` by the kernel from the
/// published file (copy_file_range), without being read or compared. Anything else — no
/// generation yet, files another tool wrote, a header of another length than recorded — takes
/// [`publish`]'s full path, which gives the same files. `seen` is what [`recover`] returned
/// under the lock the caller still holds (one read of the records per command).
///
/// The result equals [`publish`]'s, block boundaries included: a changed run of blocks starts
/// at an old boundary (everything before it is unchanged, and the boundary scan only looks
/// back to the last boundary) and is extended until it ends with a stanza that is a boundary
/// by its hash, so every block after it starts where it did.
pub fn publish_edit(
    dir: &Path,
    seen: &Observed,
    old: &str,
    header: &str,
    edits: &[Edit],
    timestamp: u64,
    op: &str,
) -> Result<Generation, BinhostError> {
    let full = || publish(dir, &apply(old, header, edits), timestamp, op);
    // `seen` came from `recover` under the lock the caller still holds: nothing has changed.
    let (State::Published(_), Some(last)) = (&seen.state, seen.last.clone()) else { return full() };
    let body_at = old.find("\n\n").map_or(old.len(), |i| i + 2);
    let (gz_file, plain_file) = match (std::fs::File::open(dir.join("Packages.gz")), std::fs::File::open(dir.join("Packages"))) {
        (Ok(g), Ok(p)) => (g, p),
        _ => return full(),
    };
    let usable = same_inode(&dir.join("Packages.gz"), &gz_path(dir, last.generation))
        && gz_file.metadata().is_ok_and(|m| m.len() == last.gz_len())
        && old.len() as u64 == last.plain_len()
        && plain_file.metadata().is_ok_and(|m| m.len() == last.plain_len())
        && body_at as u64 == last.header_plain
        && !last.blocks.is_empty()
        && header.ends_with("\n\n")
        && !header[..header.len() - 2].contains("\n\n");
    if !usable {
        return full();
    }
    let nb = last.blocks.len();
    let (mut poff, mut zoff) = (Vec::with_capacity(nb + 1), Vec::with_capacity(nb + 1));
    let (mut p, mut z) = (last.header_plain as usize, last.header_gz);
    for b in &last.blocks {
        poff.push(p);
        zoff.push(z);
        // Lengths from disk: the sum was compared with the file's length, but a wrapped sum
        // must not pass for it.
        match (usize::try_from(b.plain).ok().and_then(|n| p.checked_add(n)), z.checked_add(b.gz)) {
            (Some(np), Some(nz)) => (p, z) = (np, nz),
            _ => return full(),
        }
    }
    poff.push(p);
    zoff.push(z);
    // The record is data on disk: its offsets are only used when each one is where a stanza
    // ends in the text we hold (so no slice can fall inside a character or a stanza).
    if poff[1..].iter().any(|o| !old.is_char_boundary(*o) || !old[..*o].ends_with("\n\n")) {
        return full();
    }
    // The block an offset falls in (an insertion at a block's start belongs to that block, one
    // at the very end to the last block).
    let block_of = |at: usize| poff[1..].partition_point(|end| *end <= at).min(nb - 1);
    let mut dirty = vec![false; nb];
    for e in edits {
        if e.start < body_at || e.end < e.start || e.end > old.len() {
            return full();
        }
        let last_byte = if e.end > e.start { e.end - 1 } else { e.start };
        for d in &mut dirty[block_of(e.start)..=block_of(last_byte)] {
            *d = true;
        }
    }

    // The new layout: old blocks kept as they are, and the recompressed runs.
    enum Seg {
        Keep(usize, usize),
        New(Vec<u8>, Vec<u8>),
    }
    let mut segs: Vec<Seg> = Vec::new();
    let mut blocks: Vec<Block> = Vec::with_capacity(nb + 2);
    let (mut added, mut removed): (BTreeSet<String>, BTreeSet<String>) = (BTreeSet::new(), BTreeSet::new());
    let mut next_edit = 0;
    let mut i = 0;
    while i < nb {
        if !dirty[i] {
            let j = (i..nb).find(|k| dirty[*k]).unwrap_or(nb);
            segs.push(Seg::Keep(i, j));
            blocks.extend_from_slice(&last.blocks[i..j]);
            i = j;
            continue;
        }
        let a = i;
        let mut b = i;
        let first_edit = next_edit;
        let text = loop {
            while b + 1 < nb && dirty[b + 1] {
                b += 1;
            }
            let (from, to) = (poff[a], poff[b + 1]);
            let mut text = String::with_capacity(to - from);
            let mut pos = from;
            let mut k = first_edit;
            while k < edits.len() && block_of(edits[k].start) <= b {
                text.push_str(&old[pos..edits[k].start]);
                text.push_str(&edits[k].text);
                pos = edits[k].end;
                k += 1;
            }
            text.push_str(&old[pos..to]);
            next_edit = k;
            let ends_on_boundary = stanzas(&text).last().is_some_and(|s| boundary_hash(s).is_multiple_of(BLOCK_TARGET));
            if b + 1 == nb || ends_on_boundary {
                break text;
            }
            b += 1;
        };
        let old_run = &old[poff[a]..poff[b + 1]];
        removed.extend(stanzas(old_run).iter().map(|s| stanza_id(s)));
        let new_stanzas = stanzas(&text);
        added.extend(new_stanzas.iter().map(|s| stanza_id(s)));
        let mut plain = Vec::with_capacity(text.len());
        let mut gz = Vec::new();
        let mut at = 0;
        for (s, e) in blocks_of(&new_stanzas) {
            let len: usize = new_stanzas[s..e].iter().map(|t| t.len()).sum();
            let member = gzip_member(&text.as_bytes()[at..at + len], 0);
            blocks.push(Block { plain: len as u64, gz: member.len() as u64, count: (e - s) as u64 });
            gz.extend_from_slice(&member);
            at += len;
        }
        plain.extend_from_slice(text.as_bytes());
        segs.push(Seg::New(plain, gz));
        i = b + 1;
    }
    if next_edit != edits.len() {
        return full();
    }
    let both: Vec<String> = added.intersection(&removed).cloned().collect();
    for id in &both {
        added.remove(id);
        removed.remove(id);
    }
    let header_gz = gzip_member(header.as_bytes(), timestamp as u32);
    let record = Generation {
        generation: last.generation + 1,
        time: super::now(),
        timestamp,
        op: op.to_owned(),
        packages: blocks.iter().map(|b| b.count).sum(),
        added: added.into_iter().collect(),
        removed: removed.into_iter().collect(),
        header_plain: header.len() as u64,
        header_gz: header_gz.len() as u64,
        blocks,
    };

    let mut gz = TempFile::new(dir, "Packages.gz")?;
    let mut plain = TempFile::new(dir, "Packages")?;
    {
        let (gz_path_, plain_path) = (gz.path().to_owned(), plain.path().to_owned());
        let (gzf, pf) = (gz.file(), plain.file());
        gzf.write_all(&header_gz).map_err(werr(&gz_path_))?;
        // Kept ranges of both files are copied by the kernel: the caller's `old` is what
        // `Packages` holds (same length, read under the same lock), and nothing rewrites a
        // published file in place.
        pf.write_all(header.as_bytes()).map_err(werr(&plain_path))?;
        for seg in &segs {
            match seg {
                Seg::Keep(i, j) => {
                    let (from, len) = (poff[*i] as u64, (poff[*j] - poff[*i]) as u64);
                    copy_range(&plain_file, from, len, pf).map_err(werr(&plain_path))?;
                    copy_range(&gz_file, zoff[*i], zoff[*j] - zoff[*i], gzf).map_err(werr(&gz_path_))?;
                }
                Seg::New(p, z) => {
                    pf.write_all(p).map_err(werr(&plain_path))?;
                    gzf.write_all(z).map_err(werr(&gz_path_))?;
                }
            }
        }
    }
    commit(dir, gz, plain, &record)?;
    Ok(record)
}

fn werr(p: &Path) -> impl Fn(std::io::Error) -> BinhostError + '_ {
    move |e| io_at(p, "cannot write", e)
}

/// Appends `len` bytes of `from` at `offset` to `to` (in the kernel: copy_file_range, which
/// std's `io::copy` uses between files).
fn copy_range(from: &std::fs::File, offset: u64, len: u64, to: &mut std::fs::File) -> std::io::Result<()> {
    use std::io::Seek;
    let mut src = from;
    src.seek(std::io::SeekFrom::Start(offset))?;
    let copied = std::io::copy(&mut src.take(len), to)?;
    if copied != len {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, format!("copied {copied} of {len} bytes")));
    }
    Ok(())
}

/// Deletes the records (and their Packages.gz) of every generation but the newest `keep`.
/// Returns the numbers it dropped.
pub fn drop_older(dir: &Path, keep: usize) -> Result<Vec<u64>, BinhostError> {
    let gens = list(dir)?;
    let cut = gens.len().saturating_sub(keep.max(1));
    let mut dropped = Vec::new();
    for g in &gens[..cut] {
        // The record first: a generation without its index is never listed.
        fs_err::remove_file(record_path(dir, g.generation))?;
        let _ = std::fs::remove_file(gz_path(dir, g.generation));
        dropped.push(g.generation);
    }
    if !dropped.is_empty() {
        sync_dir(&gen_dir(dir))?;
    }
    Ok(dropped)
}

/// Every PATH any recorded generation lists.
pub fn retained_paths(dir: &Path) -> Result<BTreeSet<String>, BinhostError> {
    let mut out = BTreeSet::new();
    for g in list(dir)? {
        out.extend(paths_of(&read_text(dir, g.generation)?));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(n: usize, ts: u64) -> String {
        let mut t = format!("PACKAGES: {n}\nTIMESTAMP: {ts}\nVERSION: 0\n\n");
        for i in 0..n {
            t.push_str(&format!("BUILD_ID: 1\nCPV: c/p{i:05}-1\nPATH: c/p{i:05}/p{i:05}-1-1.gpkg.tar\nSIZE: {i}\n\n"));
        }
        t
    }

    #[test]
    fn publish_records_generations_and_reuses_blocks() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let a = index(1000, 10);
        let g1 = publish(dir, &a, 10, "index").unwrap();
        assert_eq!((g1.generation, g1.packages, g1.added.len()), (1, 1000, 1000));
        assert!(g1.blocks.len() > 10, "{} blocks", g1.blocks.len());
        let gz = std::fs::read(dir.join("Packages.gz")).unwrap();
        assert_eq!(gunzip_all(&gz).unwrap(), a);
        // Remove one stanza: one block changes.
        let drop = "BUILD_ID: 1\nCPV: c/p00500-1\nPATH: c/p00500/p00500-1-1.gpkg.tar\nSIZE: 500\n\n";
        let b = a.replace(drop, "").replace("TIMESTAMP: 10", "TIMESTAMP: 11").replace("PACKAGES: 1000", "PACKAGES: 999");
        let g2 = publish(dir, &b, 11, "rm").unwrap();
        assert_eq!(g2.removed, vec!["c/p00500-1-1".to_string()]);
        assert!(g2.added.is_empty(), "{:?}", g2.added);
        let changed = g2.blocks.iter().filter(|blk| !g1.blocks.contains(blk)).count();
        assert!(changed <= 2, "{changed} blocks recompressed");
        assert_eq!(gunzip_all(&std::fs::read(dir.join("Packages.gz")).unwrap()).unwrap(), b);
        assert_eq!(std::fs::read_to_string(dir.join("Packages")).unwrap(), b);
        assert_eq!(read_text(dir, 1).unwrap(), a);
        assert_eq!(state(dir).unwrap(), State::Published(2));
        assert_eq!(list(dir).unwrap().len(), 2);
    }

    /// publish_edit gives byte for byte the files and block layout publish gives for the same
    /// text, for insertions and removals anywhere (first, last, block boundaries, several at
    /// once), and marks only what changed as added or removed.
    #[test]
    fn publish_edit_equals_publish() {
        let stanza = |i: usize| format!("BUILD_ID: 1\nCPV: c/p{i:05}-1\nPATH: c/p{i:05}/p{i:05}-1-1.gpkg.tar\nSIZE: {i}\n\n");
        let header = |n: usize, ts: u64| format!("PACKAGES: {n}\nTIMESTAMP: {ts}\nVERSION: 0\n\n");
        // Every other number is in the index: the odd ones can be inserted between.
        let base: Vec<usize> = (0..4000).step_by(2).collect();
        let text_of = |ids: &[usize], ts: u64| {
            let mut t = header(ids.len(), ts);
            for i in ids {
                t.push_str(&stanza(*i));
            }
            t
        };
        let cases: Vec<(Vec<usize>, Vec<usize>)> = vec![
            (vec![1001], vec![]),
            (vec![], vec![1000]),
            (vec![1, 3999], vec![0, 3998]),
            (vec![], (0..400).step_by(2).collect()),
            ((1..600).step_by(2).collect(), vec![]),
            (vec![2001, 2003, 3001], vec![2000, 2002, 100]),
        ];
        for (case, (add, rm)) in cases.into_iter().enumerate() {
            let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
            let old = text_of(&base, 10);
            publish(a.path(), &old, 10, "index").unwrap();
            publish(b.path(), &old, 10, "index").unwrap();
            let mut ids: Vec<usize> = base.iter().copied().filter(|i| !rm.contains(i)).chain(add.iter().copied()).collect();
            ids.sort_unstable();
            let new = text_of(&ids, 16);
            let full = publish(a.path(), &new, 16, "add").unwrap();
            // The same change as edits of the old text.
            let body_at = header(base.len(), 10).len();
            let mut edits: Vec<Edit> = Vec::new();
            let mut pos = body_at;
            for i in 0..4000 {
                let s = stanza(i);
                if base.contains(&i) {
                    if rm.contains(&i) {
                        edits.push(Edit { start: pos, end: pos + s.len(), text: String::new() });
                    }
                    pos += s.len();
                } else if add.contains(&i) {
                    edits.push(Edit { start: pos, end: pos, text: s });
                }
            }
            let lean = publish_edit(b.path(), &recover(b.path()).unwrap(), &old, &header(ids.len(), 16), &edits, 16, "add").unwrap();
            assert_eq!(lean.blocks, full.blocks, "case {case}: block layout");
            assert_eq!((&lean.added, &lean.removed, lean.packages), (&full.added, &full.removed, full.packages), "case {case}");
            for f in ["Packages", "Packages.gz"] {
                assert_eq!(std::fs::read(a.path().join(f)).unwrap(), std::fs::read(b.path().join(f)).unwrap(), "case {case}: {f}");
            }
            assert_eq!(std::fs::read_to_string(b.path().join("Packages")).unwrap(), new, "case {case}");
            assert_eq!(state(b.path()).unwrap(), State::Published(2));
            let changed = lean.blocks.iter().filter(|blk| !publish_blocks_of(a.path(), 1).contains(blk)).count();
            assert!(changed <= 2 * (add.len() + rm.len()).max(1), "case {case}: {changed} blocks recompressed");
        }
    }

    fn publish_blocks_of(dir: &Path, n: u64) -> Vec<Block> {
        read_record(dir, n).unwrap().blocks
    }

    /// Without a usable current generation (none yet, or Packages.gz from another tool),
    /// publish_edit takes the full path and still publishes the edited text.
    #[test]
    fn publish_edit_falls_back_to_the_full_path() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let old = index(100, 10);
        std::fs::write(dir.join("Packages"), &old).unwrap();
        let at = old.find("BUILD_ID: 1\nCPV: c/p00050-1").unwrap();
        let end = at + old[at..].find("\n\n").unwrap() + 2;
        let g = publish_edit(dir, &recover(dir).unwrap(), &old, "PACKAGES: 99\nTIMESTAMP: 11\nVERSION: 0\n\n", &[Edit { start: at, end, text: String::new() }], 11, "rm")
            .unwrap();
        assert_eq!(g.packages, 99);
        let text = std::fs::read_to_string(dir.join("Packages")).unwrap();
        assert!(!text.contains("c/p00050-1") && text.contains("c/p00051-1") && text.starts_with("PACKAGES: 99\n"));
        assert_eq!(gunzip_all(&std::fs::read(dir.join("Packages.gz")).unwrap()).unwrap(), text);
    }

    #[test]
    fn recover_finishes_or_drops_an_interrupted_publish() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        publish(dir, &index(50, 10), 10, "index").unwrap();
        publish(dir, &index(60, 11), 11, "index").unwrap();
        // Packages.gz renamed, Packages not: put generation 1's Packages back.
        std::fs::write(dir.join("Packages"), index(50, 10)).unwrap();
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(10);
        std::fs::File::options().write(true).open(dir.join("Packages")).unwrap().set_modified(t).unwrap();
        assert_eq!(state(dir).unwrap(), State::GzAhead(2));
        let seen = recover(dir).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("Packages")).unwrap(), index(60, 11));
        assert_eq!(state(dir).unwrap(), State::Published(2));
        // What recover reports is what a fresh look says.
        assert_eq!((seen.state, seen.last.map(|g| g.generation)), (State::Published(2), Some(2)));
        // A record whose index never got published.
        std::fs::hard_link(gz_path(dir, 1), dir.join(".x")).unwrap();
        std::fs::rename(dir.join(".x"), dir.join("Packages.gz")).unwrap();
        assert_eq!(state(dir).unwrap(), State::Unpublished(2));
        let seen = recover(dir).unwrap();
        assert_eq!(list(dir).unwrap().len(), 1);
        assert_eq!(seen.state, state(dir).unwrap());
        assert_eq!(seen.last.map(|g| g.generation), Some(1));
    }
}
