//! `dbh binhost add`: publish binary packages into a target's binhost.
//!
//! Every input is read and its Manifest verified first; a bad input stops the whole add before
//! anything is touched. Then, under the binhost's exclusive lock: BUILD_IDs are allocated (max
//! of the index, of files already on disk and of this batch, + 1, per CPV), each package is
//! rewritten as a GPKG with that BUILD_ID in its metadata and signed, written to a dot-temp file,
//! fsynced, and renamed to `cat/pn/pf-BUILD_ID.gpkg.tar`; then the index gets the new entries.
//!
//! Crash safety: packages are renamed into place (and their directories fsynced) before the index
//! that mentions them, so clients never see an entry without its file. The paths being published
//! are first recorded in the journal `.dbh-pending`: if dbh dies between the package renames and
//! the index rename, `check` knows those unindexed files are an interrupted add (not a problem
//! for clients, who cannot see them), and the next `add` or `index` indexes them. A failure
//! before the index is written removes what this run placed, so the previous `Packages` and
//! `Packages.gz` stay byte-identical and no stray files remain.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::index::{Entry, Index};
use super::scan::{self, Found, Options};
use super::{BinhostError, DirLock, TempDir, TempFile};
use crate::binpkg::{self, Format, Rewrite};
use crate::events::{Event, Reporter, Unit};
use crate::sign::Signer;
use crate::target::Target;

use super::JOURNAL;

/// One input, checked and ready to publish.
#[derive(Debug)]
struct Input {
    src: PathBuf,
    format: Format,
    category: String,
    pf: String,
    pn: String,
}

/// What got published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Added {
    pub source: PathBuf,
    pub cpv: String,
    pub build_id: u64,
    /// Relative to the binhost root.
    pub path: String,
}

/// Publishes `files` into `dir` (the target's binhost, created if missing). `signer` = `None`
/// publishes unsigned.
pub fn add(
    dir: &Path,
    target: &Target,
    files: &[PathBuf],
    signer: Option<&Signer>,
    reporter: &dyn Reporter,
) -> Result<Vec<Added>, BinhostError> {
    add_with_header(dir, target, files, signer, &|_| {}, reporter)
}

/// Edits the index header in the same atomic step as the packages go in (e.g. to merge
/// `REPO_REVISIONS`); runs after dbh has set VERSION/ARCH/CHOST/PROFILE/TIMESTAMP.
pub type HeaderEdit<'a> = &'a dyn Fn(&mut std::collections::BTreeMap<String, String>);

/// [`add`], with `edit` applied to the new index's header.
pub fn add_with_header(
    dir: &Path,
    target: &Target,
    files: &[PathBuf],
    signer: Option<&Signer>,
    edit: HeaderEdit<'_>,
    reporter: &dyn Reporter,
) -> Result<Vec<Added>, BinhostError> {
    let task = format!("add:{}", target.name);
    reporter.event(Event::Start {
        task: task.clone(),
        label: format!("publishing into {}", dir.display()),
        total: Some(files.len() as u64 * 2),
        unit: Unit::Items,
    });
    let mut inputs = Vec::new();
    for (i, src) in files.iter().enumerate() {
        reporter.event(Event::Progress {
            task: task.clone(),
            position: i as u64,
            message: Some(format!("verifying {}", src.display())),
        });
        inputs.push(check_input(src, target)?);
    }
    fs_err::create_dir_all(dir)?;
    let _lock = DirLock::exclusive(dir, reporter)?;
    super::clean_stale_temps(dir)?;
    // An interrupted publish is finished first, so the index read below is the current one.
    let seen = super::generations::recover(dir)?;
    let index_path = dir.join("Packages");
    let old_text = match super::IndexText::open(&index_path) {
        Ok(t) => Some(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            // Not UTF-8: let the parser say where.
            let bytes = fs_err::read(&index_path)?;
            let source = match Index::parse(&bytes) {
                Err(e) => e,
                Ok(_) => super::index::ParseError { line: 1, message: "is not valid UTF-8".into() },
            };
            return Err(BinhostError::Parse { path: index_path, source });
        }
        Err(e) => return Err(e.into()),
    };
    let pending = read_journal(dir)?;
    let parse = |text: &str| {
        Index::parse(text.as_bytes()).map_err(|source| BinhostError::Parse { path: index_path.clone(), source })
    };

    // BUILD_IDs: the largest known for the CPV (index, disk, this batch) + 1, all u64 up to
    // MAX_BUILD_ID, with checked arithmetic. `next` remembers where the largest came from, so
    // that running out names the file responsible instead of the input.
    // A published generation is sorted: lookups in it bisect instead of reading the whole text.
    let published = old_text.is_some() && matches!(seen.state, super::generations::State::Published(_));
    let mut next: HashMap<String, (u64, PathBuf)> = HashMap::new();
    for input in &inputs {
        let cpv = format!("{}/{}", input.category, input.pf);
        let mut max = (old_text.as_deref().map_or(0, |t| max_build_id(t, &cpv, published)), index_path.clone());
        for (id, path) in ids_on_disk(dir, input)? {
            if id > max.0 {
                max = (id, path);
            }
        }
        let slot = next.entry(cpv).or_insert((0, PathBuf::new()));
        if max.0 > slot.0 {
            *slot = max;
        }
    }
    let mut plan = Vec::new();
    for input in &inputs {
        let cpv = format!("{}/{}", input.category, input.pf);
        let (last, from) = next.get(&cpv).cloned().unwrap_or((0, PathBuf::new()));
        let Some(id) = last.checked_add(1).filter(|id| *id <= binpkg::MAX_BUILD_ID) else {
            return Err(BinhostError::BuildIdExhausted { cpv, path: from, id: last, max: binpkg::MAX_BUILD_ID });
        };
        next.insert(cpv.clone(), (id, input.src.clone()));
        let rel = format!("{}/{}/{}-{id}.gpkg.tar", input.category, input.pn, input.pf);
        plan.push((input, cpv, id, rel));
    }

    // Rewrite and sign into temp files; nothing is visible yet.
    let tmpdir = TempDir::new(dir)?;
    let verifier = signer.map(Signer::verifier);
    let mut temps = Vec::new();
    let mut entries = Vec::new();
    for (n, (input, _, id, rel)) in plan.iter().enumerate() {
        reporter.event(Event::Progress {
            task: task.clone(),
            position: (files.len() + n) as u64,
            message: Some(format!("signing {rel}")),
        });
        // Named like the destination: the GPKG writer names the top directory after the file.
        let name = rel.rsplit('/').next().expect("rel has a file name");
        let tmp = TempFile::at(tmpdir.path().join(name))?;
        let rewrite = Rewrite { build_id: Some(*id), signer };
        let result = match input.format {
            Format::Gpkg => binpkg::rewrite_gpkg(&input.src, tmp.path(), &rewrite),
            Format::Xpak => binpkg::xpak_to_gpkg(&input.src, tmp.path(), &rewrite),
        };
        result.map_err(|source| BinhostError::Package { path: input.src.clone(), source: Box::new(source) })?;
        // The writers fsync what they wrote (`Out::finish`); the metadata is the file's at the
        // path, which the writer may have re-created.
        let meta = fs_err::metadata(tmp.path())?;
        // What we publish must verify, signatures included, before anyone can see it.
        binpkg::verify(tmp.path(), verifier.as_ref())
            .map_err(|source| BinhostError::Package { path: tmp.path().to_owned(), source: Box::new(source) })?;
        // The entry, from the temp file: rename keeps size and mtime.
        use std::os::unix::fs::MetadataExt;
        let found = Found { rel: rel.clone(), size: meta.len(), mtime: meta.mtime() };
        let entry = scan::entry_for_file(tmp.path(), &found)
            .map_err(|skip| BinhostError::Invalid { path: input.src.clone(), reason: skip.to_string() })?;
        entries.push(entry);
        temps.push(tmp);
    }

    // The new index text, complete before anything is placed: a broken old index stops us here.
    // Without a journal from an earlier, interrupted run the old index is current and only the
    // new entries go in (spliced into the text when it is exactly as we write it, else parsed,
    // edited and rendered); with one, the directory is rescanned after placing, which also
    // indexes what the interrupted run placed.
    let old_ts = old_text.as_deref().and_then(header_timestamp);
    let ts = super::next_timestamp(old_ts);
    let new_text = if !pending.is_empty() {
        None
    } else {
        Some(index_text(old_text.as_deref(), &entries, target, ts, edit, &parse, published)?)
    };
    let old_index = match (&new_text, &old_text) {
        (None, Some(t)) => {
            // The rescan keeps the old header: edit it there.
            let mut old = parse(t)?;
            edit(&mut old.header);
            Some(old)
        }
        _ => None,
    };

    let rels: Vec<String> = plan.iter().map(|(_, _, _, rel)| rel.clone()).collect();
    write_journal(dir, &pending, &rels)?;
    let mut placed: Vec<PathBuf> = Vec::new();
    let result = (|| -> Result<(), BinhostError> {
        for (tmp, rel) in temps.into_iter().zip(&rels) {
            let dest = dir.join(rel);
            let parent = dest.parent().expect("rel has directories");
            create_dirs_synced(dir, parent)?;
            tmp.rename(&dest)?;
            placed.push(dest.clone());
            super::sync_dir(parent)?;
        }
        match new_text {
            Some(NewIndex::Text(text)) => super::write_index_as(dir, &text, Some(ts), "add").map(|_| ()),
            Some(NewIndex::Edits(header, edits)) => {
                let old = old_text.as_deref().expect("edits are of an old index");
                super::generations::publish_edit(dir, &seen, old, &header, &edits, ts, "add").map(|_| ())
            }
            None => {
                let opts = Options { full: false, target: Some(target) };
                scan::reindex_locked(dir, old_index, opts, reporter).map(|_| ())
            }
        }
    })();
    if let Err(e) = result {
        rollback(dir, &placed, &pending);
        return Err(e);
    }
    fs_err::remove_file(dir.join(JOURNAL))?;
    super::sync_dir(dir)?;

    let added: Vec<Added> = plan
        .iter()
        .map(|(input, cpv, id, rel)| Added { source: input.src.clone(), cpv: cpv.clone(), build_id: *id, path: rel.clone() })
        .collect();
    for a in &added {
        reporter.event(Event::Note { message: format!("published {}-{} as {}", a.cpv, a.build_id, a.path) });
    }
    reporter.event(Event::Count { name: "binhost.added".into(), value: added.len() as u64 });
    reporter.event(Event::Finish {
        task,
        message: format!("published {} package(s) into {}", added.len(), dir.display()),
    });
    Ok(added)
}

/// Reads and verifies one input; checks that it is a package for `target`.
fn check_input(src: &Path, target: &Target) -> Result<Input, BinhostError> {
    let meta = std::fs::metadata(src).map_err(|e| BinhostError::Invalid {
        path: src.to_owned(),
        reason: if e.kind() == std::io::ErrorKind::NotFound { "no such file".into() } else { e.to_string() },
    })?;
    if !meta.is_file() {
        return Err(BinhostError::Invalid { path: src.to_owned(), reason: "not a regular file".into() });
    }
    if meta.len() == 0 {
        return Err(BinhostError::Invalid { path: src.to_owned(), reason: "the file is empty".into() });
    }
    let pkg = binpkg::read(src).map_err(|source| BinhostError::Package { path: src.to_owned(), source: Box::new(source) })?;
    binpkg::verify(src, None).map_err(|source| BinhostError::Package { path: src.to_owned(), source: Box::new(source) })?;
    if pkg.format == Format::Gpkg {
        // XPAK images are checked by the same rules while they are converted.
        binpkg::check_image(src).map_err(|source| BinhostError::Package { path: src.to_owned(), source: Box::new(source) })?;
    }
    let get = |k: &str| pkg.metadata.get(k).map(super::index::normalize).unwrap_or_default();
    let (category, pf, slot) = (get("CATEGORY"), get("PF"), get("SLOT"));
    let invalid = |reason: String| BinhostError::Invalid { path: src.to_owned(), reason };
    if category.is_empty() || pf.is_empty() || slot.is_empty() {
        return Err(invalid("its metadata lacks CATEGORY, PF or SLOT".into()));
    }
    if !super::deps::valid_category(&category) {
        return Err(invalid(format!("`{category}` is not a valid category")));
    }
    let Some((pn, _, _)) = super::deps::pkgsplit(&pf) else {
        return Err(invalid(format!("`{pf}` is not a valid package name and version")));
    };
    let pn = pn.to_owned();
    let chost = get("CHOST");
    if !chost.is_empty() && chost != target.chost {
        return Err(BinhostError::WrongChost {
            path: src.to_owned(),
            found: chost,
            target: target.name.clone(),
            expected: target.chost.clone(),
        });
    }
    Ok(Input { src: src.to_owned(), format: pkg.format, category, pf, pn })
}

/// BUILD_IDs of files of the same PF already in `cat/pn/` (indexed or not), with their paths.
/// Any decimal suffix counts, however large: a file that would shadow our numbering must stop
/// the add with its name, not be skipped.
fn ids_on_disk(dir: &Path, input: &Input) -> Result<Vec<(u64, PathBuf)>, BinhostError> {
    let pkg_dir = dir.join(&input.category).join(&input.pn);
    let entries = match fs_err::read_dir(&pkg_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut ids = Vec::new();
    for entry in entries {
        let name = entry?.file_name();
        let Some(name) = name.to_str() else { continue };
        let stem = scan::SUFFIXES.iter().find_map(|s| name.strip_suffix(s));
        if let Some((pf, id)) = stem.and_then(|s| s.rsplit_once('-'))
            && pf == input.pf
            && !id.is_empty()
            && id.bytes().all(|b| b.is_ascii_digit())
        {
            // Beyond u64: as exhausted as it gets.
            let id = id.parse().unwrap_or(u64::MAX);
            ids.push((id, pkg_dir.join(name)));
        }
    }
    Ok(ids)
}

/// The new index: either as edits of the old text (the published generation, which dbh wrote
/// as it renders: only the new stanzas are rendered and put in their sorted places) or whole.
enum NewIndex {
    Edits(String, Vec<super::generations::Edit>),
    Text(String),
}

/// The index with `entries` added (Portage's `inject`): header from the old index plus the
/// target's ARCH/CHOST/PROFILE, PACKAGES, TIMESTAMP `ts`.
fn index_text(
    old: Option<&str>,
    entries: &[Entry],
    target: &Target,
    ts: u64,
    edit: HeaderEdit<'_>,
    parse: &dyn Fn(&str) -> Result<Index, BinhostError>,
    published: bool,
) -> Result<NewIndex, BinhostError> {
    let header_only = |t: &str| t.split_once("\n\n").map(|(h, _)| format!("{h}\n\n"));
    let mut index = match old.and_then(header_only) {
        // The header is small: parse it (its line numbers are the file's).
        Some(h) => parse(&h)?,
        None => match old {
            Some(t) => parse(t)?,
            None => Index::new(),
        },
    };
    scan::fill_header(&mut index, Some(target));
    index.header.insert("TIMESTAMP".into(), ts.to_string());
    edit(&mut index.header);
    if let Some(text) = old
        && published
        && let Some(edits) = insertions(text, &index.header, entries)
    {
        let mut header = index.header.clone();
        let count = header.get("PACKAGES").and_then(|v| v.parse::<usize>().ok());
        if let Some(count) = count {
            header.insert("PACKAGES".into(), (count + entries.len()).to_string());
            return Ok(NewIndex::Edits(Index { header, packages: Vec::new() }.render(), edits));
        }
    }
    if let Some(text) = old
        && let Some(spliced) = super::index::splice(text, &index.header, entries)
    {
        return Ok(NewIndex::Text(spliced));
    }
    let mut index = match old {
        Some(t) => {
            let mut full = parse(t)?;
            full.header = index.header;
            full
        }
        None => index,
    };
    for e in &mut index.packages {
        e.retain_allowed();
    }
    let new_paths: Vec<String> = entries.iter().map(Entry::effective_path).collect();
    index.packages.retain(|e| !new_paths.contains(&e.effective_path()));
    index.packages.extend(entries.iter().cloned());
    index.header.insert("PACKAGES".into(), index.packages.len().to_string());
    Ok(NewIndex::Text(index.render()))
}

/// Where `entries` go in `old`, a published generation's text (sorted by CPV and BUILD_ID, as
/// dbh renders), as insertions of their rendered stanzas: found by bisecting the text
/// ([`super::sorted`]). `None` when this is not a plain insertion (the header changes what
/// stanzas inherit, or a new PATH is already listed) or the text is not as dbh writes it: the
/// caller splices.
fn insertions(old: &str, header: &std::collections::BTreeMap<String, String>, entries: &[Entry]) -> Option<Vec<super::generations::Edit>> {
    let (old_header, _) = old.split_once("\n\n")?;
    let body_at = old_header.len() + 2;
    let parsed = Index::parse(format!("{old_header}\n\n").as_bytes()).ok()?;
    for key in super::index::INHERITED_KEYS {
        if parsed.header(key) != header.get(*key).map(String::as_str).filter(|v| !v.is_empty()) {
            return None;
        }
    }
    // A PATH is unique in an index; the text is sorted by CPV, not PATH, so this one reads it
    // all (a plain byte search, the cheapest full pass there is).
    for e in entries {
        let needle = format!("\nPATH: {}\n", e.effective_path());
        if memchr::memmem::find(old.as_bytes(), needle.as_bytes()).is_some() {
            return None;
        }
    }
    let rendered = Index { header: header.clone(), packages: entries.to_vec() };
    let sorted = rendered.packages_sorted();
    let text = rendered.render();
    let (_, body) = text.split_once("\n\n")?;
    let mut edits: Vec<super::generations::Edit> = Vec::new();
    for (entry, stanza) in sorted.into_iter().zip(body.split_terminator("\n\n")) {
        let key = (entry.cpv(), entry.build_id());
        // After every stanza that sorts before or equal to the new one.
        let at = super::sorted::partition(old, body_at, |k| k <= key)?;
        let text = format!("{stanza}\n\n");
        match edits.last_mut() {
            Some(last) if last.start == at => last.text.push_str(&text),
            _ => edits.push(super::generations::Edit { start: at, end: at, text }),
        }
    }
    Some(edits)
}

/// TIMESTAMP from an index's header, without parsing the rest.
fn header_timestamp(text: &str) -> Option<u64> {
    let header = text.split_once("\n\n").map_or(text, |(h, _)| h);
    header.lines().find_map(|l| l.strip_prefix("TIMESTAMP: ")?.parse().ok()).filter(|t| *t <= binpkg::MAX_TIME)
}

/// The largest BUILD_ID the index text has for `cpv` (0 if none): by bisection when the text
/// is a `published` generation (sorted), else by searching the whole text.
fn max_build_id(text: &str, cpv: &str, published: bool) -> u64 {
    if published
        && let Some(body_at) = text.find("\n\n").map(|i| i + 2)
        && let Some(max) = super::sorted::max_build_id(text, body_at, cpv)
    {
        return max;
    }
    let needle = format!("\nCPV: {cpv}\n");
    let mut max = 0;
    for at in memchr::memmem::find_iter(text.as_bytes(), needle.as_bytes()) {
        // `at` is the newline before `CPV:`; a stanza that starts with its CPV line has the
        // blank line's first newline just before it, so search up to and including `at`.
        let start = text[..at + 1].rfind("\n\n").map_or(0, |i| i + 2);
        let end = text[at..].find("\n\n").map_or(text.len(), |i| at + i);
        let stanza = &text[start..end];
        if let Some(id) = stanza.lines().find_map(|l| {
            let v = l.strip_prefix("BUILD_ID: ")?;
            // Digits only; a value beyond u64 is as large as it gets.
            (!v.is_empty() && v.bytes().all(|b| b.is_ascii_digit())).then(|| v.parse::<u64>().unwrap_or(u64::MAX))
        }) {
            max = max.max(id);
        }
    }
    max
}

fn read_journal(dir: &Path) -> Result<Vec<String>, BinhostError> {
    match fs_err::read_to_string(dir.join(JOURNAL)) {
        Ok(text) => Ok(text.lines().filter(|l| !l.is_empty()).map(str::to_owned).collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e.into()),
    }
}

/// Records the paths about to be placed (plus those of an interrupted run), durably.
fn write_journal(dir: &Path, pending: &[String], rels: &[String]) -> Result<(), BinhostError> {
    let mut tmp = TempFile::new(dir, "pending")?;
    let mut text = String::new();
    for rel in pending.iter().chain(rels) {
        text.push_str(rel);
        text.push('\n');
    }
    tmp.file().write_all(text.as_bytes()).map_err(|e| super::io_at(tmp.path(), "cannot write", e))?;
    tmp.persist(&dir.join(JOURNAL), None)?;
    super::sync_dir(dir)
}

/// Undoes the placements of a failed run; what an earlier interrupted run left stays journaled.
fn rollback(dir: &Path, placed: &[PathBuf], pending: &[String]) {
    for p in placed {
        let _ = std::fs::remove_file(p);
        if let Some(parent) = p.parent() {
            let _ = super::sync_dir(parent);
        }
    }
    if pending.is_empty() {
        let _ = std::fs::remove_file(dir.join(JOURNAL));
    } else {
        let _ = write_journal(dir, pending, &[]);
    }
    let _ = super::sync_dir(dir);
}

/// Creates `parent` (under `root`) and fsyncs every directory that got a new entry.
fn create_dirs_synced(root: &Path, parent: &Path) -> Result<(), BinhostError> {
    let mut missing = Vec::new();
    let mut p = parent;
    while !p.exists() && p != root {
        missing.push(p.to_owned());
        p = p.parent().unwrap_or(root);
    }
    for d in missing.iter().rev() {
        match fs_err::create_dir(d) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e.into()),
        }
        super::sync_dir(d.parent().unwrap_or(root))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_build_id_by_bisection_equals_the_whole_text_search() {
        let mut rng = crate::testutil::Rng(11);
        for round in 0..200 {
            let (text, _, keys) = super::super::sorted::tests::sorted_text(&mut rng, round % 30);
            for (cpv, _) in keys.iter().chain([&("zzz/none-1".to_owned(), None)]) {
                let want = keys.iter().filter(|(c, _)| c == cpv).filter_map(|(_, i)| *i).max().unwrap_or(0);
                assert_eq!(max_build_id(&text, cpv, true), want, "{cpv} by bisection in\n{text}");
                assert_eq!(max_build_id(&text, cpv, false), want, "{cpv} by search in\n{text}");
            }
        }
    }

    #[test]
    fn a_stanza_that_starts_with_its_cpv_line_keeps_its_own_build_id() {
        // Not sorted and CPV first: the search must not take the previous stanza's BUILD_ID.
        let text = "TIMESTAMP: 1\n\nBUILD_ID: 9\nCPV: a/x-1\n\nCPV: a/b-1\nBUILD_ID: 2\n\n";
        assert_eq!(max_build_id(text, "a/b-1", false), 2);
        assert_eq!(max_build_id(text, "a/x-1", false), 9);
    }
}
