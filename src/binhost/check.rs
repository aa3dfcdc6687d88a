//! `dbh binhost check`: every inconsistency between a binhost's index and its files.
//!
//! What `emaint binhost --check` reports (files not in Packages, entries whose file is gone,
//! SIZE/MTIME mismatches, missing or out-of-date index files) plus what it misses: wrong MD5/SHA1
//! (clients fail on those after a full download), any other entry value that differs from the
//! package's metadata, Packages.gz not matching Packages, packages that cannot be read or whose
//! Manifest does not match, a wrong PACKAGES count, duplicate BUILD_IDs and duplicate PATHs.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::index::{Entry, Index};
use super::scan::{self, Found};
use super::BinhostError;
use crate::events::{Event, Reporter};

/// One inconsistency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: PathBuf,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.message)
    }
}

/// Checks `dir`; an empty list means consistent. Holds a shared lock while it looks, when it can,
/// so that it never sees an `add` half-way.
pub fn check(dir: &Path, reporter: &dyn Reporter) -> Result<Vec<Problem>, BinhostError> {
    if !dir.is_dir() {
        return Err(BinhostError::NotADir { path: dir.to_owned() });
    }
    let _lock = super::DirLock::shared(dir, reporter)?;
    let mut problems = Vec::new();
    let mut problem = |path: &Path, message: String| problems.push(Problem { path: path.to_owned(), message });
    let packages_path = dir.join("Packages");
    let gz_path = dir.join("Packages.gz");
    let files = scan::walk(dir)?;
    // With the shared lock held no writer is running, so any temp entry is one a killed run left.
    for entry in fs_err::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with(super::TMP_PREFIX) {
            let what = if entry.file_type()?.is_dir() { "directory" } else { "file" };
            // Reported, but not an inconsistency: clients never see dot names, and a SIGKILLed
            // add is allowed to leave one (the kill -9 tests require `check` to pass then).
            reporter.event(Event::Note {
                message: format!(
                    "{}: leftover temporary {what} of an interrupted write (the next `dbh binhost add` or `dbh binhost index` removes it)",
                    entry.path().display()
                ),
            });
        }
    }
    let pending: Vec<String> = match fs_err::read_to_string(dir.join(super::JOURNAL)) {
        Ok(text) => text.lines().map(str::to_owned).collect(),
        Err(_) => Vec::new(),
    };

    let bytes = match fs_err::read(&packages_path) {
        Ok(b) => Some(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            problem(&packages_path, "missing index file".into());
            None
        }
        Err(e) => return Err(e.into()),
    };
    let index = match &bytes {
        Some(b) => match Index::parse(b) {
            Ok(i) => Some(i),
            Err(e) => {
                problem(&packages_path, format!("unreadable index: {e}"));
                None
            }
        },
        None => None,
    };
    // With the journal of an interrupted add present, a Packages.gz one step ahead of Packages is
    // the state between their two renames: both are complete indexes whose files exist, and the
    // next add or index rewrites both. Anything else is a problem.
    let mut gz_ahead = false;
    match (scan::gunzip(&gz_path), &bytes) {
        (Err(e), _) if e.kind() == std::io::ErrorKind::NotFound => problem(&gz_path, "missing index file".into()),
        (Err(e), _) => problem(&gz_path, format!("cannot be decompressed: {e}")),
        (Ok(gz), Some(plain)) if gz != *plain => {
            let interrupted = !pending.is_empty() && interrupted_commit_is_sound(dir, &gz_path, &gz);
            if let Ok(super::generations::State::GzAhead(n)) = super::generations::state(dir) {
                gz_ahead = true;
                reporter.event(Event::Note {
                    message: format!(
                        "{}: generation {n}, Packages still the one before: a publish was interrupted between the two renames (both are whole generations; the next writer finishes it)",
                        gz_path.display()
                    ),
                });
            } else if interrupted {
                gz_ahead = true;
                reporter.event(Event::Note {
                    message: format!(
                        "{}: newer than Packages, an add was interrupted between writing the two (both are complete; the next `dbh binhost add` or `dbh binhost index` rewrites them)",
                        gz_path.display()
                    ),
                });
            } else {
                problem(&gz_path, "does not match Packages".into());
            }
        }
        _ => {}
    }
    let Some(index) = index else {
        for f in files.iter().filter(|f| !pending.contains(&f.rel)) {
            problem(&dir.join(&f.rel), "not in Packages".into());
        }
        return Ok(problems);
    };

    match index.timestamp() {
        None => problem(&packages_path, "the header has no valid TIMESTAMP".into()),
        Some(ts) => {
            let paths: &[&PathBuf] = if gz_ahead { &[&packages_path] } else { &[&packages_path, &gz_path] };
            for p in paths {
                if let Ok(m) = std::fs::metadata(p)
                    && m.mtime() != ts as i64
                {
                    problem(p, format!("mtime {} is not the index TIMESTAMP {ts}", m.mtime()));
                }
            }
        }
    }
    let count = index.packages.len().to_string();
    if index.header("PACKAGES") != Some(count.as_str()) {
        problem(
            &packages_path,
            format!("header says PACKAGES: {}, but there are {count} entries", index.header("PACKAGES").unwrap_or("")),
        );
    }

    // Entry by PATH; duplicates.
    let mut by_path: HashMap<String, &Entry> = HashMap::new();
    let mut ids: BTreeMap<(&str, u64), Vec<&Entry>> = BTreeMap::new();
    for e in &index.packages {
        let path = e.effective_path();
        if by_path.insert(path.clone(), e).is_some() {
            problem(&packages_path, format!("line {}: PATH {path} is indexed twice", e.line));
        }
        if let Some(id) = e.build_id() {
            ids.entry((e.cpv(), id)).or_default().push(e);
        }
    }
    for ((cpv, id), entries) in &ids {
        if entries.len() > 1 {
            let lines: Vec<String> = entries.iter().map(|e| e.line.to_string()).collect();
            problem(&packages_path, format!("{cpv} has BUILD_ID {id} {} times (lines {})", entries.len(), lines.join(", ")));
        }
    }
    let present: HashMap<&str, &Found> = files.iter().map(|f| (f.rel.as_str(), f)).collect();
    for e in &index.packages {
        let path = e.effective_path();
        if !present.contains_key(path.as_str()) {
            problem(&dir.join(&path), format!("indexed as {} (line {}) but the file is missing", e.cpv(), e.line));
        }
        for key in ["SIZE", "MTIME", "MD5", "SHA1", "PATH"] {
            if e.get(key).is_none() {
                problem(&packages_path, format!("line {}: {} has no {key}", e.line, e.cpv()));
            }
        }
    }

    // Files a kept generation lists, or an interrupted prune is deleting, may be unindexed.
    let retained = super::generations::retained_paths(dir)?;
    let pruning = super::lifecycle::pruning(dir);
    // Every file: readable, verified, indexed, and indexed with the values its metadata gives.
    let all: Vec<&Found> = files.iter().collect();
    let fresh = scan::read_entries(dir, &all, reporter, "check");
    for (found, result) in files.iter().zip(fresh) {
        let path = dir.join(&found.rel);
        let fresh = match result {
            Ok(e) => e,
            Err(skip) => {
                problem(&path, format!("unusable binary package: {skip}"));
                continue;
            }
        };
        // The whole file against its Manifest (what emaint catches only for flipped bytes it
        // happens to read), signatures aside: `check` does not know which key to trust.
        if let Err(e) = crate::binpkg::verify(&path, None) {
            problem(&path, format!("fails verification: {}", crate::hint::chain(&e)));
        }
        let Some(indexed) = by_path.get(&found.rel) else {
            if pending.contains(&found.rel) {
                reporter.event(Event::Note {
                    message: format!(
                        "{}: not indexed yet, an add was interrupted (clients cannot see it); the next `dbh binhost add` or `dbh binhost index` indexes it",
                        path.display()
                    ),
                });
            } else if retained.contains(&found.rel) || pruning.contains(&found.rel) {
                // Kept for rollback (binhost lifecycle): clients of the current index never ask.
                reporter.event(Event::Note {
                    message: format!(
                        "{}: not in the current index, kept because a kept generation lists it (or a prune is deleting it)",
                        path.display()
                    ),
                });
            } else {
                problem(&path, format!("{} is not in Packages", fresh.cpv()));
            }
            continue;
        };
        let diffs = differences(&index, indexed, &fresh);
        if !diffs.is_empty() {
            problem(&path, format!("index entry (line {}) differs from the file: {}", indexed.line, diffs.join("; ")));
        }
    }
    Ok(problems)
}

/// Keys whose value in the index differs from the value the file gives, as Portage would
/// write them (inherited and default values compared the way they are rendered).
fn differences(index: &Index, indexed: &Entry, fresh: &Entry) -> Vec<String> {
    let render = |e: &Entry| -> BTreeMap<String, String> {
        let one = Index { header: index.header.clone(), packages: vec![e.clone()] };
        let text = one.render();
        let stanza = text.split("\n\n").nth(1).unwrap_or_default();
        stanza
            .lines()
            .filter_map(|l| l.split_once(": ").map(|(k, v)| (k.to_owned(), v.to_owned())))
            .collect()
    };
    let mut a = indexed.clone();
    a.retain_allowed();
    let (a, b) = (render(&a), render(fresh));
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| {
            let show = |v: Option<&String>| v.map_or("(none)".to_owned(), |v| v.clone());
            format!("{k} is {} in the index, {} in the file", show(a.get(k)), show(b.get(k)))
        })
        .collect()
}

/// Is `gz` (the decompressed Packages.gz) a complete index whose every entry's file is there
/// with its SIZE, and does the file's mtime equal its TIMESTAMP?
fn interrupted_commit_is_sound(dir: &Path, gz_path: &Path, gz: &[u8]) -> bool {
    let Ok(index) = Index::parse(gz) else { return false };
    let mtime_ok = std::fs::metadata(gz_path).is_ok_and(|m| Some(m.mtime()) == index.timestamp().map(|t| t as i64));
    mtime_ok
        && index.packages.iter().all(|e| {
            std::fs::symlink_metadata(dir.join(e.effective_path())).is_ok_and(|m| Some(m.len()) == e.size())
        })
}


