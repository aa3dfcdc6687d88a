//! Ebuild repositories and profiles as builds name them: a repository's name, `REPO:PATH`
//! profiles, the revision a repository is at (`REPO_REVISIONS`), the sections of a repos.conf.

use std::path::Path;

use super::BuildError;

/// The name of the ebuild repository at `path` (profiles/repo_name, else layout.conf repo-name).
pub fn repo_name(path: &Path) -> Result<String, BuildError> {
    let bad = |reason: &str| BuildError::BadRepo { path: path.to_owned(), reason: reason.into() };
    if !path.is_dir() {
        return Err(bad("it is not a directory"));
    }
    if let Ok(text) = fs_err::read_to_string(path.join("profiles/repo_name")) {
        let name = text.trim();
        if !name.is_empty() {
            return Ok(name.to_owned());
        }
    }
    if let Ok(text) = fs_err::read_to_string(path.join("metadata/layout.conf")) {
        for line in text.lines() {
            if let Some((k, v)) = line.split_once('=')
                && k.trim() == "repo-name"
            {
                return Ok(v.trim().to_owned());
            }
        }
    }
    Err(bad("it has no profiles/repo_name"))
}

/// Splits `REPO:PATH`.
pub fn split_profile(profile: &str) -> Result<(String, String), BuildError> {
    match profile.split_once(':') {
        Some((repo, path)) if !repo.is_empty() && !path.is_empty() => Ok((repo.to_owned(), path.to_owned())),
        _ => Err(BuildError::BadProfile { profile: profile.to_owned() }),
    }
}

/// The revision `path` is at, for REPO_REVISIONS: its git commit (`<commit>-dirty` when files under
/// `path` differ from it, with a note), `None` when it is not in a git checkout or git is missing.
pub fn repo_revision(path: &Path, reporter: &dyn crate::events::Reporter) -> Option<String> {
    let git = |args: &[&str]| crate::process::Cmd::new("git").arg("-C").arg(path).args(args).output().ok();
    let head = git(&["rev-parse", "--verify", "HEAD"])?.stdout_str().trim().to_owned();
    if head.is_empty() {
        return None;
    }
    let status = git(&["status", "--porcelain", "--", "."])?.stdout_str();
    if status.trim().is_empty() {
        return Some(head);
    }
    reporter.event(crate::events::Event::Note {
        message: format!(
            "warning: {} has changes not committed to {head}; its revision is recorded as {head}-dirty",
            path.display()
        ),
    });
    Some(format!("{head}-dirty"))
}

/// Merges `revisions` (repository name → revision) into the index header's `REPO_REVISIONS`, a
/// JSON object written as Portage's `json.dumps(..., sort_keys=True)` does; other repositories'
/// entries stay. An unreadable old value is replaced.
pub fn merge_repo_revisions(header: &mut std::collections::BTreeMap<String, String>, revisions: &std::collections::BTreeMap<String, String>) {
    if revisions.is_empty() {
        return;
    }
    let mut all: std::collections::BTreeMap<String, String> = header
        .get("REPO_REVISIONS")
        .and_then(|v| serde_json::from_str(v).ok())
        .unwrap_or_default();
    all.extend(revisions.iter().map(|(k, v)| (k.clone(), v.clone())));
    let json = |s: &str| serde_json::to_string(s).expect("a string serializes");
    let body: Vec<String> = all.iter().map(|(k, v)| format!("{}: {}", json(k), json(v))).collect();
    header.insert("REPO_REVISIONS".into(), format!("{{{}}}", body.join(", ")));
}

/// The `[name]` sections of a repos.conf text with their lines (comments and blank lines dropped).
pub fn repos_conf_sections(text: &str) -> Vec<(String, String)> {
    let mut sections: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') || t.starts_with(';') {
            continue;
        }
        if let Some(name) = t.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            sections.push((name.trim().to_owned(), format!("{t}\n")));
        } else if let Some((_, body)) = sections.last_mut() {
            body.push_str(t);
            body.push('\n');
        }
    }
    sections
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn profile_is_split_at_the_first_colon() {
        assert_eq!(split_profile("dbh-test:dbh/arm64").unwrap(), ("dbh-test".into(), "dbh/arm64".into()));
        assert!(split_profile("dbh/arm64").is_err());
        assert!(split_profile(":x").is_err());
    }

    #[test]
    fn repo_name_comes_from_the_repository() {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/repo");
        assert_eq!(repo_name(&root).unwrap(), "dbh-test");
        let e = repo_name(&root.join("licenses")).unwrap_err();
        assert!(e.to_string().contains("profiles/repo_name"), "{e}");
    }

    #[test]
    fn repo_revisions_merge_like_portage_writes_them() {
        let mut header = std::collections::BTreeMap::new();
        let revs = |pairs: &[(&str, &str)]| pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        merge_repo_revisions(&mut header, &revs(&[("gentoo", "abc")]));
        assert_eq!(header["REPO_REVISIONS"], r#"{"gentoo": "abc"}"#);
        merge_repo_revisions(&mut header, &revs(&[("dbh-test", "d\"1"), ("gentoo", "def")]));
        assert_eq!(header["REPO_REVISIONS"], r#"{"dbh-test": "d\"1", "gentoo": "def"}"#);
        merge_repo_revisions(&mut header, &revs(&[]));
        assert_eq!(header["REPO_REVISIONS"], r#"{"dbh-test": "d\"1", "gentoo": "def"}"#);
    }

    #[test]
    fn repo_revision_is_the_git_commit() {
        let dir = tempfile::tempdir().unwrap();
        let silent = crate::events::Silent;
        assert_eq!(repo_revision(dir.path(), &silent), None, "not a git checkout");
        let git = |args: &[&str]| {
            let ok = std::process::Command::new("git")
                .arg("-C")
                .arg(dir.path())
                .args(["-c", "user.name=t", "-c", "user.email=t@t"])
                .args(args)
                .status()
                .unwrap()
                .success();
            assert!(ok, "git {args:?}");
        };
        git(&["init", "-q"]);
        std::fs::write(dir.path().join("a"), "1").unwrap();
        git(&["add", "a"]);
        git(&["commit", "-q", "-m", "a"]);
        let head = repo_revision(dir.path(), &silent).unwrap();
        assert_eq!(head.len(), 40, "{head}");
        std::fs::write(dir.path().join("a"), "2").unwrap();
        assert_eq!(repo_revision(dir.path(), &silent).unwrap(), format!("{head}-dirty"));
    }
}
