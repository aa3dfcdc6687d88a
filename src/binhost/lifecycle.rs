//! A binhost's lifecycle after `add`: `rm` (take packages out of the index), `prune` (keep the
//! newest BUILD_IDs, the last generations' files, optionally only what the repositories still
//! have) and `rollback` (republish an older generation's index). docs/binhost-lifecycle.md.
//!
//! Every change is a new generation through [`super::write_index_as`], under the same exclusive
//! lock as `add`, with TIMESTAMP = max(now, old + 1): Portage reads a remote index only when its
//! TIMESTAMP is greater than its cached one (`bintree._populate_remote`), so even a rollback to
//! an older index must look newer. Binpkg files are never rewritten; a file is deleted only by
//! `prune`, and only when neither the published index nor any kept generation lists it.
//!
//! Prune's crash safety: the new index is published first; the files to delete are then written
//! to the journal `.dbh-prune` before any record or file is deleted, so a kill leaves files that
//! `check` knows are being pruned (and the next prune finishes). Records go before their files.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::generations::{self, Generation};
use super::index::{Entry, Index};
use super::{BinhostError, DirLock, TempFile};
use crate::events::Reporter;

/// Files a prune is deleting (relative paths), one per line.
pub const PRUNE_JOURNAL: &str = ".dbh-prune";

/// Dependency keys whose atoms name what a package needs at build or run time.
const DEP_KEYS: &[&str] = &["RDEPEND", "DEPEND", "BDEPEND", "PDEPEND", "IDEPEND"];

fn read_current(dir: &Path) -> Result<Index, BinhostError> {
    super::read_index(dir)?.ok_or_else(|| BinhostError::NoMatch { dir: dir.to_owned(), pattern: "Packages".into() })
}

/// `CPV-BUILD_ID` of an entry (the CPV alone without BUILD_ID).
pub fn instance(e: &Entry) -> String {
    match e.build_id() {
        Some(id) => format!("{}-{id}", e.cpv()),
        None => e.cpv().to_owned(),
    }
}

/// `cat/pn` of a CPV.
fn cp_of(cpv: &str) -> Option<String> {
    let (cat, pf) = cpv.split_once('/')?;
    let (pn, _, _) = super::deps::pkgsplit(pf)?;
    Some(format!("{cat}/{pn}"))
}

/// `cat/pn` an atom token names (`>=cat/pn-1:2[use]`, `!cat/pn`…); `None` for operators.
fn atom_cp(token: &str) -> Option<String> {
    let t = token.trim_start_matches('!');
    if t.is_empty() || t.ends_with('?') || matches!(t, "||" | "^^" | "??" | "(" | ")") {
        return None;
    }
    let versioned = t.starts_with(['>', '<', '=', '~']);
    let t = t.trim_start_matches(['>', '<', '=', '~']);
    let t = t.split(['[', ':']).next()?.trim_end_matches('*');
    if !t.contains('/') {
        return None;
    }
    if versioned { cp_of(t) } else { Some(t.to_owned()) }
}

/// New TIMESTAMP and PACKAGES for `index`, rendered and published as generation `op`.
fn republish(dir: &Path, mut index: Index, old_ts: Option<u64>, op: &str) -> Result<Generation, BinhostError> {
    let ts = super::next_timestamp(old_ts);
    index.header.insert("TIMESTAMP".into(), ts.to_string());
    index.header.insert("PACKAGES".into(), index.packages.len().to_string());
    super::write_index_as(dir, &index.render(), Some(ts), op)
}

/// What `rm` took out (or would).
#[derive(Debug, Default)]
pub struct RmOutcome {
    /// `(CPV-BUILD_ID, PATH)`.
    pub removed: Vec<(String, String)>,
    /// Published packages whose dependencies name a package no longer published.
    pub warnings: Vec<String>,
    pub generation: Option<Generation>,
}

/// Which index entries `pattern` selects: `cat/pn` (every version), a CPV (every BUILD_ID) or
/// `CPV-BUILD_ID`; a leading `=` is allowed.
fn matches(e: &Entry, pattern: &str) -> bool {
    let p = pattern.trim_start_matches('=');
    let cpv = e.cpv();
    cpv == p || instance(e) == p || cp_of(cpv).is_some_and(|cp| cp == p)
}

/// `dbh binhost rm`: takes the matching entries out of the index as a new generation. Files stay
/// (kept generations list them; `prune` deletes them later).
///
/// Works on the index text at O(change): the stanzas of the named packages are found by
/// bisecting the sorted text of the published generation ([`super::sorted`]; a text dbh did not
/// write is searched for their `CPV: ` lines instead), every other byte is copied (by
/// [`generations::publish_edit`], in the kernel); dependants are found by
/// searching for the removed `cat/pn`s, so only stanzas that mention one are parsed.
pub fn rm(dir: &Path, patterns: &[String], dry_run: bool, reporter: &dyn Reporter) -> Result<RmOutcome, BinhostError> {
    let _lock = DirLock::exclusive(dir, reporter)?;
    let seen = generations::recover(dir)?;
    let path = dir.join("Packages");
    let text = match super::IndexText::open(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(BinhostError::NoMatch { dir: dir.to_owned(), pattern: patterns.join(" ") });
        }
        Err(e) => return Err(e.into()),
    };
    let header_end = text.find("\n\n").map(|i| i + 2).unwrap_or(text.len());
    let header = Index::parse(&text.as_bytes()[..header_end]).map_err(|source| BinhostError::Parse { path: path.clone(), source })?;
    // (start, end) of every stanza to remove, and its entry.
    let mut gone: BTreeMap<usize, (usize, Entry)> = BTreeMap::new();
    // The stanzas whose CPV starts with `prefix`: by bisection in a published (sorted)
    // generation, else by searching the whole text.
    let sorted = matches!(seen.state, generations::State::Published(_));
    let candidates = |prefix: &str| -> Vec<(usize, usize)> {
        if sorted && let Some(found) = super::sorted::with_cpv_prefix(&text, header_end, prefix) {
            return found;
        }
        let needle = format!("\nCPV: {prefix}");
        memchr::memmem::find_iter(text.as_bytes(), needle.as_bytes()).map(|at| stanza_at(&text, at + 1, header_end)).collect()
    };
    for p in patterns {
        let p = p.trim_start_matches('=');
        let prefix = match cp_of(p) {
            Some(_) => p.to_owned(),
            None => format!("{p}-"),
        };
        let mut any = false;
        for (start, end) in candidates(&prefix) {
            let entry = parse_stanza(&text[start..end], &path)?;
            if matches(&entry, p) {
                any = true;
                gone.insert(start, (end, entry));
            }
        }
        // A CPV-BUILD_ID pattern: its CPV prefix is what the text has.
        if !any && let Some((cpv, id)) = p.rsplit_once('-') && id.parse::<u64>().is_ok() {
            for (start, end) in candidates(cpv) {
                let entry = parse_stanza(&text[start..end], &path)?;
                if entry.cpv() == cpv && matches(&entry, p) {
                    any = true;
                    gone.insert(start, (end, entry));
                }
            }
        }
        if !any {
            return Err(BinhostError::NoMatch { dir: dir.to_owned(), pattern: p.to_owned() });
        }
    }
    let gone_entries: Vec<Entry> = gone.values().map(|(_, e)| e.clone()).collect();
    let mut out = RmOutcome {
        removed: gone_entries.iter().map(|e| (instance(e), e.effective_path())).collect(),
        warnings: dependants_in_text(&text, header_end, &gone, &path)?,
        generation: None,
    };
    if dry_run {
        return Ok(out);
    }
    let count = header.header("PACKAGES").and_then(|v| v.parse::<usize>().ok()).map(|n| n.saturating_sub(gone.len()));
    let count = count.unwrap_or_else(|| {
        let body = &text.as_bytes()[header_end..];
        memchr::memmem::find_iter(body, b"\nCPV: ").count() + usize::from(body.starts_with(b"CPV: ")) - gone.len()
    });
    let old_ts = header.timestamp();
    let ts = super::next_timestamp(old_ts);
    let mut h = header.header.clone();
    h.insert("TIMESTAMP".into(), ts.to_string());
    h.insert("PACKAGES".into(), count.to_string());
    let new_header = Index { header: h, packages: Vec::new() }.render();
    let edits: Vec<generations::Edit> =
        gone.iter().map(|(start, (end, _))| generations::Edit { start: *start, end: *end, text: String::new() }).collect();
    out.generation = Some(generations::publish_edit(dir, &seen, &text, &new_header, &edits, ts, "rm")?);
    Ok(out)
}

/// The stanza of `text` that contains byte `at` (past the header).
fn stanza_at(text: &str, at: usize, header_end: usize) -> (usize, usize) {
    let start = text[..at].rfind("\n\n").map_or(header_end, |i| i + 2).max(header_end);
    let end = text[at..].find("\n\n").map_or(text.len(), |i| at + i + 2);
    (start, end)
}

fn parse_stanza(stanza: &str, path: &Path) -> Result<Entry, BinhostError> {
    let mut one = String::from("VERSION: 0\n\n");
    one.push_str(stanza);
    let mut index = Index::parse(one.as_bytes()).map_err(|source| BinhostError::Parse { path: path.to_owned(), source })?;
    index.packages.pop().ok_or_else(|| BinhostError::Parse {
        path: path.to_owned(),
        source: super::index::ParseError { line: 0, message: "empty stanza".into() },
    })
}

/// [`dependants`], parsing only the stanzas of `text`'s body (from `body_at`) that mention a
/// removed `cat/pn` and are not themselves removed (`gone`, by start offset).
fn dependants_in_text(
    text: &str,
    body_at: usize,
    gone: &BTreeMap<usize, (usize, Entry)>,
    path: &Path,
) -> Result<Vec<String>, BinhostError> {
    let gone_entries: Vec<&Entry> = gone.values().map(|(_, e)| e).collect();
    let mut cps: BTreeSet<String> = gone_entries.iter().filter_map(|e| cp_of(e.cpv())).collect();
    let mut mentioning: BTreeMap<usize, Entry> = BTreeMap::new();
    let mut still = Vec::new();
    let body = &text.as_bytes()[body_at..];
    for cp in &cps {
        for at in memchr::memmem::find_iter(body, cp.as_bytes()) {
            let (start, end) = stanza_at(text, body_at + at, body_at);
            if gone.contains_key(&start) {
                continue;
            }
            if let std::collections::btree_map::Entry::Vacant(v) = mentioning.entry(start) {
                v.insert(parse_stanza(&text[start..end], path)?);
            }
        }
    }
    for e in mentioning.values() {
        if let Some(cp) = cp_of(e.cpv()) && cps.contains(&cp) {
            still.push(cp);
        }
    }
    for cp in still {
        cps.remove(&cp);
    }
    let gone: Vec<Entry> =
        gone_entries.into_iter().filter(|e| cp_of(e.cpv()).is_some_and(|cp| cps.contains(&cp))).cloned().collect();
    let kept: Vec<Entry> = mentioning.into_values().collect();
    Ok(dependants(&gone, &kept))
}

/// Warnings for every kept package whose dependencies name a `cat/pn` that `gone` removes and no
/// kept package provides.
fn dependants(gone: &[Entry], kept: &[Entry]) -> Vec<String> {
    let kept_cps: BTreeSet<String> = kept.iter().filter_map(|e| cp_of(e.cpv())).collect();
    let gone_cps: BTreeSet<String> =
        gone.iter().filter_map(|e| cp_of(e.cpv())).filter(|cp| !kept_cps.contains(cp)).collect();
    let mut out = Vec::new();
    for e in kept {
        for key in DEP_KEYS {
            let Some(deps) = e.get(key) else { continue };
            let named: BTreeSet<String> = deps.split_whitespace().filter_map(atom_cp).collect();
            for cp in named.intersection(&gone_cps) {
                out.push(format!(
                    "{} (still published) has {key} on {cp}, which is no longer published: clients installing it need {cp} from elsewhere",
                    instance(e)
                ));
            }
        }
    }
    out
}

/// `dbh binhost rollback`: republishes generation `to` (default: the one before the current) as
/// a new generation with a newer TIMESTAMP.
pub fn rollback(dir: &Path, to: Option<u64>, reporter: &dyn Reporter) -> Result<Generation, BinhostError> {
    let _lock = DirLock::exclusive(dir, reporter)?;
    generations::recover(dir)?;
    let gens = generations::list(dir)?;
    let known = || {
        gens.iter().map(|g| g.generation.to_string()).collect::<Vec<_>>().join(", ")
    };
    let to = match to {
        Some(n) => n,
        None => gens.iter().rev().nth(1).map(|g| g.generation).unwrap_or(0),
    };
    if !gens.iter().any(|g| g.generation == to) {
        return Err(BinhostError::NoGeneration { dir: dir.to_owned(), generation: to, known: known() });
    }
    let text = generations::read_text(dir, to)?;
    for path in generations::paths_of(&text) {
        if !dir.join(&path).is_file() {
            return Err(BinhostError::GenerationIncomplete { dir: dir.to_owned(), generation: to, path });
        }
    }
    let index = Index::parse(text.as_bytes())
        .map_err(|source| BinhostError::Parse { path: generations::gz_path(dir, to), source })?;
    let old_ts = super::read_index(dir)?.and_then(|i| i.timestamp());
    let old_ts = old_ts.max(gens.iter().map(|g| g.timestamp).max());
    republish(dir, index, old_ts, &format!("rollback to {to}"))
}

/// A repository `prune --unreferenced` consults: its name (profiles/repo_name), where it is, and
/// the revision the binhost's builds used (REPO_REVISIONS), when known.
#[derive(Debug, Clone)]
pub struct Repo {
    pub name: String,
    pub path: PathBuf,
}

#[derive(Debug, Clone)]
pub struct PruneOptions {
    /// BUILD_IDs kept per CPV (newest first); at least 1.
    pub keep: usize,
    /// Generations whose files are kept, counting the one this prune makes; at least 1.
    pub keep_generations: usize,
    /// With `Some`, also drop packages whose ebuild these repositories no longer have.
    pub unreferenced: Option<Vec<Repo>>,
    pub dry_run: bool,
    /// `logs/<target>/` and the age beyond which its files go.
    pub logs: Option<(PathBuf, Duration)>,
}

/// What `prune` did (or would do).
#[derive(Debug, Default)]
pub struct PruneOutcome {
    /// `(CPV-BUILD_ID, why)` taken out of the index.
    pub dropped: Vec<(String, String)>,
    /// `(PATH, bytes)` deleted from disk.
    pub deleted: Vec<(String, u64)>,
    pub bytes_freed: u64,
    pub generations_dropped: Vec<u64>,
    pub logs_deleted: Vec<(PathBuf, u64)>,
    pub generation: Option<Generation>,
}

/// What `prune --unreferenced` knows of one repository: its ebuilds at the revision the binhost's
/// builds used (REPO_REVISIONS; one `git ls-tree` for the whole repository, not one git per
/// package — ::gentoo has 30 000 ebuilds), or `None` to look at its working tree (no revision
/// recorded, a dirty one, git missing, or the commit unknown to that checkout).
struct RepoFiles<'a> {
    repo: &'a Repo,
    at: Option<(String, HashSet<String>)>,
}

fn repo_files<'a>(repos: &'a [Repo], revisions: &BTreeMap<String, String>) -> Vec<RepoFiles<'a>> {
    repos
        .iter()
        .map(|repo| {
            let at = revisions.get(&repo.name).filter(|r| !r.ends_with("-dirty")).and_then(|rev| {
                let out = crate::process::Cmd::new("git")
                    .arg("-C")
                    .arg(&repo.path)
                    .args(["ls-tree", "-r", "--name-only", "-z", &format!("{rev}^{{commit}}")])
                    .output()
                    .ok()?;
                let files = out.stdout.split(|b| *b == 0).filter(|f| f.ends_with(b".ebuild")).map(|f| String::from_utf8_lossy(f).into_owned()).collect();
                Some((rev.clone(), files))
            });
            RepoFiles { repo, at }
        })
        .collect()
}

/// Why `e` is no longer in the repositories, if it is not: the repository that decided. An entry
/// whose repository was not given is kept.
fn unreferenced(e: &Entry, repos: &[RepoFiles<'_>]) -> Option<String> {
    let cpv = e.cpv();
    let (cat, pf) = cpv.split_once('/')?;
    let (pn, _, _) = super::deps::pkgsplit(pf)?;
    let rel = format!("{cat}/{pn}/{pf}.ebuild");
    let name = e.get("REPO")?;
    let RepoFiles { repo, at } = repos.iter().find(|r| r.repo.name == name)?;
    match at {
        Some((rev, files)) => (!files.contains(&rel)).then(|| format!("repository {name} ({}) at {rev} has no {rel}", repo.path.display())),
        None => (!repo.path.join(&rel).is_file()).then(|| format!("repository {name} ({}) has no {rel}", repo.path.display())),
    }
}

/// `dbh binhost prune`.
pub fn prune(dir: &Path, opts: &PruneOptions, reporter: &dyn Reporter) -> Result<PruneOutcome, BinhostError> {
    let _lock = DirLock::exclusive(dir, reporter)?;
    super::clean_stale_temps(dir)?;
    generations::recover(dir)?;
    finish_journal(dir)?;
    let mut out = PruneOutcome::default();
    let index = read_current(dir)?;
    let revisions: BTreeMap<String, String> = index
        .header("REPO_REVISIONS")
        .and_then(|v| serde_json::from_str(v).ok())
        .unwrap_or_default();

    // Newest `keep` BUILD_IDs per CPV.
    let mut by_cpv: HashMap<&str, Vec<&Entry>> = HashMap::new();
    for e in &index.packages {
        by_cpv.entry(e.cpv()).or_default().push(e);
    }
    let mut drop: BTreeMap<String, String> = BTreeMap::new();
    for (cpv, mut list) in by_cpv {
        list.sort_by_key(|e| std::cmp::Reverse(e.build_id().unwrap_or(0)));
        let newest = list[0].build_id().unwrap_or(0);
        for e in list.iter().skip(opts.keep.max(1)) {
            drop.insert(e.effective_path(), format!("{}: older than the newest {} of {cpv} (newest BUILD_ID {newest})", instance(e), opts.keep.max(1)));
        }
    }
    if let Some(repos) = &opts.unreferenced {
        let repos = repo_files(repos, &revisions);
        for e in &index.packages {
            if let Some(why) = unreferenced(e, &repos) {
                drop.entry(e.effective_path()).or_insert(format!("{}: {why}", instance(e)));
            }
        }
    }
    let kept: Vec<Entry> = index.packages.iter().filter(|e| !drop.contains_key(&e.effective_path())).cloned().collect();
    out.dropped = index
        .packages
        .iter()
        .filter_map(|e| drop.get(&e.effective_path()).map(|why| (instance(e), why.clone())))
        .collect();

    // Files the kept generations list: the new index (kept) and the newest M-1 records.
    let gens = generations::list(dir)?;
    let keep_records = opts.keep_generations.max(1) - 1;
    let mut referenced: BTreeSet<String> = kept.iter().map(Entry::effective_path).collect();
    if drop.is_empty() {
        // No new generation: the current one counts as the first kept.
        referenced.extend(index.packages.iter().map(Entry::effective_path));
    }
    let kept_gens: Vec<&Generation> = if drop.is_empty() {
        gens.iter().rev().take(opts.keep_generations.max(1)).collect()
    } else {
        gens.iter().rev().take(keep_records).collect()
    };
    for g in &kept_gens {
        referenced.extend(generations::paths_of(&generations::read_text(dir, g.generation)?));
    }
    let pending: BTreeSet<String> = match fs_err::read_to_string(dir.join(super::JOURNAL)) {
        Ok(t) => t.lines().map(str::to_owned).collect(),
        Err(_) => BTreeSet::new(),
    };
    let mut doomed = Vec::new();
    for f in super::scan::walk(dir)? {
        if !referenced.contains(&f.rel) && !pending.contains(&f.rel) {
            doomed.push((f.rel, f.size));
        }
    }
    let kept_numbers: BTreeSet<u64> = kept_gens.iter().map(|g| g.generation).collect();
    let old_records: Vec<u64> = gens.iter().map(|g| g.generation).filter(|n| !kept_numbers.contains(n)).collect();

    if let Some((logs, age)) = &opts.logs {
        out.logs_deleted = old_logs(logs, *age)?;
    }
    out.bytes_freed = doomed.iter().map(|(_, s)| *s).sum();
    if opts.dry_run {
        out.deleted = doomed;
        out.generations_dropped = old_records;
        return Ok(out);
    }
    if !drop.is_empty() {
        let new = Index { header: index.header.clone(), packages: kept };
        out.generation = Some(republish(dir, new, index.timestamp(), "prune")?);
    }
    let keep_n = kept_numbers.len() + usize::from(out.generation.is_some());
    // The journal before the records go: from then on every doomed file is either listed by a
    // record or journaled.
    write_journal(dir, &doomed)?;
    out.generations_dropped = generations::drop_older(dir, keep_n)?;
    delete_files(dir, &doomed)?;
    fs_err::remove_file(dir.join(PRUNE_JOURNAL))?;
    super::sync_dir(dir)?;
    out.deleted = doomed;
    for (path, _) in &out.logs_deleted {
        let _ = fs_err::remove_file(path);
    }
    Ok(out)
}

fn write_journal(dir: &Path, doomed: &[(String, u64)]) -> Result<(), BinhostError> {
    let mut tmp = TempFile::new(dir, "prune")?;
    let text: String = doomed.iter().map(|(p, _)| format!("{p}\n")).collect();
    tmp.file().write_all(text.as_bytes()).map_err(|e| super::io_at(tmp.path(), "cannot write", e))?;
    tmp.persist(&dir.join(PRUNE_JOURNAL), None)?;
    super::sync_dir(dir)
}

/// Deletes files (relative paths) and their then-empty directories.
fn delete_files(dir: &Path, files: &[(String, u64)]) -> Result<(), BinhostError> {
    let mut parents = BTreeSet::new();
    for (rel, _) in files {
        match fs_err::remove_file(dir.join(rel)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        if let Some(p) = dir.join(rel).parent() {
            parents.insert(p.to_owned());
        }
    }
    for p in parents.iter().rev() {
        super::sync_dir(p)?;
        // Empty package and category directories go too (the category after its packages).
        if std::fs::remove_dir(p).is_ok()
            && let Some(cat) = p.parent()
            && cat != dir
        {
            let _ = std::fs::remove_dir(cat);
        }
    }
    Ok(())
}

/// The files a prune journal lists that nothing references any more are deleted (an
/// interrupted prune finished); the journal goes.
fn finish_journal(dir: &Path) -> Result<(), BinhostError> {
    let text = match fs_err::read_to_string(dir.join(PRUNE_JOURNAL)) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let mut referenced = generations::retained_paths(dir)?;
    if let Some(index) = super::read_index(dir)? {
        referenced.extend(index.packages.iter().map(Entry::effective_path));
    }
    let files: Vec<(String, u64)> =
        text.lines().filter(|l| !l.is_empty() && !referenced.contains(*l)).map(|l| (l.to_owned(), 0)).collect();
    delete_files(dir, &files)?;
    fs_err::remove_file(dir.join(PRUNE_JOURNAL))?;
    super::sync_dir(dir)
}

/// Paths a prune journal lists (for `check`).
pub fn pruning(dir: &Path) -> BTreeSet<String> {
    std::fs::read_to_string(dir.join(PRUNE_JOURNAL))
        .map(|t| t.lines().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// Regular files under `logs` last modified more than `age` ago, with their sizes.
fn old_logs(logs: &Path, age: Duration) -> Result<Vec<(PathBuf, u64)>, BinhostError> {
    let mut out = Vec::new();
    let cutoff = std::time::SystemTime::now().checked_sub(age).unwrap_or(std::time::UNIX_EPOCH);
    let mut stack = vec![logs.to_owned()];
    while let Some(d) = stack.pop() {
        let entries = match fs_err::read_dir(&d) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e.into()),
        };
        for e in entries {
            let e = e?;
            let meta = fs_err::symlink_metadata(e.path())?;
            if meta.is_dir() {
                stack.push(e.path());
            } else if meta.is_file() && meta.modified().is_ok_and(|m| m < cutoff) {
                out.push((e.path(), meta.len()));
            }
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atoms_name_their_package() {
        for (tok, cp) in [
            ("dbh-test/hello", Some("dbh-test/hello")),
            (">=dbh-test/hello-1.0:0[debug]", Some("dbh-test/hello")),
            ("!dev-libs/foo", Some("dev-libs/foo")),
            ("=dev-libs/foo-bar-1.2*", Some("dev-libs/foo-bar")),
            ("dev-libs/foo:=", Some("dev-libs/foo")),
            ("||", None),
            ("(", None),
            ("debug?", None),
        ] {
            assert_eq!(atom_cp(tok).as_deref(), cp, "{tok}");
        }
    }

    /// eclean-pkg's rule with real git: at the recorded revision (one `git ls-tree`), else the
    /// working tree; a package of a repository that was not given stays.
    #[test]
    fn unreferenced_asks_the_repository_at_the_recorded_revision() {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path();
        let git = |args: &[&str]| {
            let out = std::process::Command::new("git")
                .arg("-C")
                .arg(repo)
                .args(["-c", "user.name=t", "-c", "user.email=t@dbh.invalid"])
                .args(args)
                .output()
                .unwrap();
            assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        };
        git(&["init", "-q"]);
        std::fs::create_dir_all(repo.join("a/b")).unwrap();
        std::fs::write(repo.join("a/b/b-1.0.ebuild"), "EAPI=8\n").unwrap();
        git(&["add", "-A"]);
        git(&["commit", "-q", "-m", "one"]);
        let with = git(&["rev-parse", "HEAD"]);
        git(&["rm", "-q", "a/b/b-1.0.ebuild"]);
        git(&["commit", "-q", "-m", "two"]);
        let without = git(&["rev-parse", "HEAD"]);
        // The working tree still has it: only the revision can tell.
        std::fs::create_dir_all(repo.join("a/b")).unwrap();
        std::fs::write(repo.join("a/b/b-1.0.ebuild"), "EAPI=8\n").unwrap();

        let repos = [Repo { name: "r".into(), path: repo.to_owned() }];
        let mut e = Entry::default();
        e.set("CPV", "a/b-1.0");
        e.set("REPO", "r");
        let files_at = |rev: &str| repo_files(&repos, &BTreeMap::from([("r".to_owned(), rev.to_owned())]));
        let at = |rev: &str| unreferenced(&e, &files_at(rev));
        assert_eq!(at(&with), None);
        let why = at(&without).expect("gone at the recorded revision");
        assert!(why.contains(&format!("repository r ({}) at {without} has no a/b/b-1.0.ebuild", repo.display())), "{why}");
        // No revision recorded, or one that is dirty or unknown: the working tree decides.
        assert_eq!(unreferenced(&e, &repo_files(&repos, &BTreeMap::new())), None);
        assert_eq!(at(&format!("{without}-dirty")), None);
        assert_eq!(at("0123456789abcdef0123456789abcdef01234567"), None);
        std::fs::remove_file(repo.join("a/b/b-1.0.ebuild")).unwrap();
        assert!(unreferenced(&e, &repo_files(&repos, &BTreeMap::new())).unwrap().ends_with("has no a/b/b-1.0.ebuild"));
        // Another repository's package is not this prune's business.
        let mut other = e.clone();
        other.set("REPO", "other");
        assert_eq!(unreferenced(&other, &files_at(&without)), None);
    }

    #[test]
    fn patterns_select_by_cp_cpv_and_instance() {
        let mut e = Entry::default();
        e.set("CPV", "a/b-1.0");
        e.set("BUILD_ID", "3");
        for p in ["a/b", "a/b-1.0", "a/b-1.0-3", "=a/b-1.0"] {
            assert!(matches(&e, p), "{p}");
        }
        for p in ["a/b-1.0-2", "a/bb", "a/b-1"] {
            assert!(!matches(&e, p), "{p}");
        }
    }
}
