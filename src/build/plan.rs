//! Deciding on the host, before a guest boots, whether a build has anything to do, and saying
//! afterwards why each package was built rather than taken from the binhost.
//!
//! [`satisfied`] asks the host's Portage (the same throw-away client `dbh rootfs build` uses: the
//! target's CHOST, keywords and `$DBH_HOME/targets/<T>/portage` configuration, the `--repo`
//! repositories and the profile, the binhost as PKGDIR with its index trusted) for
//! `emerge --pretend --usepkg` of the request with the options the guest's emerge gets. The root is
//! empty: the host cannot see what the image has installed, so it plans at least as much as the
//! guest would. When that plan builds nothing (only `[binary …]` entries, or nothing at all), the
//! guest would build nothing either and the build stops there, in seconds, without booting.
//! Whenever the host cannot answer (no Portage, a repository only the guest has, emerge failing)
//! the guest boots and decides, as before.
//!
//! A "nothing to build" answer is remembered (`$DBH_HOME/cache/plan/<target>`) under a hash of
//! everything the host's emerge was given: the request, the target's facts and Portage
//! configuration, the profile, every repository's revision key (content, not only the commit),
//! the binhost's `Packages` file identity (dev, inode, size, mtime: every publish replaces it by
//! rename and stamps its TIMESTAMP) and the emerge program. The next identical check — a cron job
//! re-running `--update` before anything was synced or published — answers from it instead of
//! running Portage's resolver again, whose cost grows with the repository and the binhost. Any
//! change of an input is another hash, so the resolver runs; only "nothing to build" is stored.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{BuildError, Prepared, Request, parse_merge_list_line};
use crate::events::{Event, Reporter};
use crate::settings::Home;
use crate::target::Target;

/// The build's repositories for the host's plan.
pub struct Repos {
    /// `(name, host path)` of each.
    pub paths: Vec<(String, PathBuf)>,
    /// Name → revision key (content, not only the commit), for the memo.
    pub keys: BTreeMap<String, String>,
}

/// `Some(why)` when every requested package is satisfied by published binpkgs (or nothing is to
/// be merged); `None` when something must be built or the host cannot tell. `repos` are the
/// build's repositories as the host has them (`repo::plan`: every `--repo`, the host trees of the
/// target's repos.conf and the dbh-managed ones), the same trees the guest gets as snapshots.
pub fn satisfied(
    home: &Home,
    target: &Target,
    prep: &Prepared,
    req: &Request,
    emerge: Option<&Path>,
    repos: &Repos,
    reporter: &dyn Reporter,
) -> Result<Option<String>, BuildError> {
    let Repos { paths: repos, keys: repo_keys } = repos;
    // The plan's log goes beside the build's other logs.
    let log_dir = prep.log_dir.as_path();
    let boot = |why: String| {
        reporter.event(Event::Note { message: format!("{}: the host cannot tell whether anything is to be built ({why}); booting the guest", target.name) });
        Ok(None)
    };
    // A repository of the target's repos.conf lives in the guest only: it may hold what is built.
    let extra: Vec<String> = super::repos_conf_sections(&prep.config.repos_conf)
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| n != "DEFAULT" && !repos.iter().any(|(r, _)| r == n))
        .collect();
    if !extra.is_empty() {
        return boot(format!("repos.conf names {}, which only the guest has", extra.join(", ")));
    }
    let memo_path = home.cache().join("plan").join(&target.name);
    let memo = memo_key(target, prep, req, emerge, repos, repo_keys);
    if let Some(key) = &memo
        && let Ok(text) = std::fs::read_to_string(&memo_path)
        && let Some((stored, why)) = text.split_once('\n')
        && stored == key
    {
        let why = why.trim_end();
        reporter.event(Event::Note {
            message: format!("{}: the request, repositories, configuration and binhost are those of the last check ({})", target.name, memo_path.display()),
        });
        return Ok(Some(why.to_owned()));
    }
    let work = tempfile::Builder::new()
        .prefix("dbh-plan-")
        .tempdir()
        .map_err(|source| BuildError::Io(crate::util::fs::PathError { doing: "create a temporary directory in", path: std::env::temp_dir(), source }))?;
    let rreq = crate::rootfs::Request {
        binhost: crate::rootfs::Binhost::Dir(prep.binhost_dir.clone()),
        repos: repos.iter().map(|(_, p)| p.clone()).collect(),
        profile: Some(format!("{}:{}", prep.profile_repo, prep.profile_path)),
        out: work.path().join("unused"),
        format: crate::rootfs::Format::TarZst,
        boot: None,
        atoms: req.atoms.clone(),
        emerge: emerge.map_or_else(|| "emerge".into(), Path::to_owned),
        keys: crate::sign::KeyStore::new(home.keys()),
        source_date_epoch: None,
        make_conf: prep.config.make_conf.clone(),
        package_use: prep.config.package_use.clone(),
        package_accept_keywords: prep.config.package_accept_keywords.clone(),
        log_dir: log_dir.to_owned(),
    };
    let client = match crate::rootfs::portage::Client::new(target, &rreq, work.path(), reporter) {
        Ok(c) => c,
        Err(e) => return boot(e.to_string()),
    };
    let sets = client.config_root().join("etc/portage/sets");
    super::write(&sets.join(super::vm::WORLD_SET), &prep.config.world)?;
    let mut extra: Vec<&str> = Vec::new();
    if req.update {
        extra.extend_from_slice(super::vm::UPDATE_ARGS);
    }
    extra.extend(req.emerge_args.iter().map(String::as_str));
    let (ok, text) = client.plan(&extra).map_err(Box::new)?;
    // Keep what the host planned beside the build's other logs.
    let _ = std::fs::write(log_dir.join("plan.log"), &text);
    if !ok {
        return boot(format!("emerge --pretend failed; see {}", log_dir.join("plan.log").display()));
    }
    let planned: Vec<_> = text.lines().filter_map(parse_merge_list_line).collect();
    let to_build: Vec<&str> = planned.iter().filter(|p| !p.binary).map(|p| p.cpv.as_str()).collect();
    if !to_build.is_empty() {
        reporter.event(Event::Note { message: format!("{}: to build: {}", target.name, to_build.join(" ")) });
        return Ok(None);
    }
    let why = if planned.is_empty() {
        "emerge has nothing to merge".to_owned()
    } else {
        format!("all {} package(s) of the request are in the binhost", planned.len())
    };
    if let Some(key) = memo {
        // A cache: failing to write it costs the next run a resolver pass, nothing else.
        let _ = remember(&memo_path, &key, &why);
    }
    Ok(Some(why))
}

/// Bump when what the key covers changes meaning.
const MEMO_FORMAT: &str = "dbh-plan-1";

/// The hash of every input of the host's plan, or `None` when one cannot be identified (then
/// nothing is remembered or looked up).
fn memo_key(
    target: &Target,
    prep: &Prepared,
    req: &Request,
    emerge: Option<&Path>,
    repos: &[(String, PathBuf)],
    repo_keys: &BTreeMap<String, String>,
) -> Option<String> {
    use sha2::Digest as _;
    use std::os::unix::fs::MetadataExt as _;
    let stat = |p: &Path| {
        std::fs::metadata(p).ok().map(|m| format!("{}:{}:{}:{}.{}:{}.{}", m.dev(), m.ino(), m.len(), m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec()))
    };
    let packages = stat(&prep.binhost_dir.join("Packages"))?;
    // The emerge that answers: a Portage upgrade replaces the script.
    let emerge_path = match emerge {
        Some(p) => p.to_owned(),
        None => crate::util::path::which("emerge")?,
    };
    let emerge_id = stat(&emerge_path)?;
    let mut h = sha2::Sha256::new();
    let mut put = |label: &str, value: &str| {
        // Length-prefixed, so that no two different inputs hash alike.
        h.update(format!("{label} {} ", value.len()).as_bytes());
        h.update(value.as_bytes());
    };
    put("format", MEMO_FORMAT);
    put("dbh", env!("CARGO_PKG_VERSION"));
    put("target", &format!("{target:?}"));
    put("profile", &format!("{}:{}", prep.profile_repo, prep.profile_path));
    put("repos", &format!("{repos:?}"));
    put("repo-keys", &format!("{repo_keys:?}"));
    put("config", &format!("{:?}", prep.config));
    put("binhost", &prep.binhost_dir.display().to_string());
    put("packages", &packages);
    put("emerge", &format!("{} {emerge_id}", emerge_path.display()));
    put("atoms", &format!("{:?}", req.atoms));
    put("update", &req.update.to_string());
    put("emerge-args", &format!("{:?}", req.emerge_args));
    Some(hex::encode(h.finalize()))
}

/// Stores `why` under `key`, replacing the file by rename (a reader sees the old or the new).
fn remember(path: &Path, key: &str, why: &str) -> std::io::Result<()> {
    let dir = path.parent().expect("the memo has a directory");
    fs_err::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    std::io::Write::write_all(&mut tmp, format!("{key}\n{why}\n").as_bytes())?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Why each of `built` (cpv, enabled USE flags from the merge list) was built although the
/// binhost at `binhost_dir` was offered: no binpkg of that package, only other versions, other
/// USE flags, or (same version and USE) changed dependencies (`--binpkg-changed-deps`) or an
/// explicit request to build (`--usepkg=n`, `--usepkg-exclude`).
pub fn reasons(binhost_dir: &Path, built: &[(String, Option<Vec<String>>)]) -> Vec<(String, String)> {
    let index = std::fs::read(binhost_dir.join("Packages")).ok().and_then(|b| crate::binhost::index::Index::parse(&b).ok());
    let mut by_pn: BTreeMap<String, Vec<(String, Vec<String>)>> = BTreeMap::new();
    for e in index.iter().flat_map(|i| i.packages.iter()) {
        let cpv = e.cpv();
        let use_flags: Vec<String> = e.get("USE").unwrap_or_default().split_whitespace().map(str::to_owned).collect();
        by_pn.entry(cat_pn(cpv).to_owned()).or_default().push((cpv.to_owned(), use_flags));
    }
    built
        .iter()
        .map(|(cpv, use_enabled)| {
            let have = by_pn.get(cat_pn(cpv)).map(Vec::as_slice).unwrap_or_default();
            let why = if have.is_empty() {
                "new package (none in the binhost)".to_owned()
            } else if !have.iter().any(|(c, _)| c == cpv) {
                let mut versions: Vec<&str> = have.iter().map(|(c, _)| c.as_str()).collect();
                versions.dedup();
                format!("new version (the binhost has {})", versions.join(", "))
            } else {
                let same: Vec<&Vec<String>> = have.iter().filter(|(c, _)| c == cpv).map(|(_, u)| u).collect();
                match use_enabled {
                    Some(want) if !same.iter().any(|u| want.iter().all(|f| u.contains(f))) => {
                        format!("USE changed (now: {})", if want.is_empty() { "none".to_owned() } else { want.join(" ") })
                    }
                    _ => "dependencies changed, or building was requested (the binhost's binpkg of this version was not used)".to_owned(),
                }
            };
            (cpv.clone(), why)
        })
        .collect()
}

/// `cat/pn` of `cat/pn-ver[-rN]`: the version starts at the last `-` followed by a digit, once
/// a `-rN` revision is set aside.
fn cat_pn(cpv: &str) -> &str {
    let mut s = cpv;
    if let Some(i) = s.rfind("-r")
        && !s[i + 2..].is_empty()
        && s[i + 2..].chars().all(|c| c.is_ascii_digit())
    {
        s = &s[..i];
    }
    let slash = s.find('/').map_or(0, |i| i + 1);
    match s[slash..].rmatch_indices('-').find(|(i, _)| s[slash + i + 1..].starts_with(|c: char| c.is_ascii_digit())) {
        Some((i, _)) => &cpv[..slash + i],
        None => cpv,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cat_pn_strips_the_version() {
        assert_eq!(cat_pn("dbh-test/hello-1.0"), "dbh-test/hello");
        assert_eq!(cat_pn("dev-libs/libfoo-2-1.2.3-r1"), "dev-libs/libfoo-2");
        assert_eq!(cat_pn("x11-libs/gtk+-3.24.41"), "x11-libs/gtk+");
    }

    #[test]
    fn reasons_compare_against_the_binhost_index() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("Packages"),
            "VERSION: 0\n\nCPV: a/hello-1.0\nUSE: arm64 nls\n\nCPV: a/greeter-1.0\nUSE: arm64\n\n",
        )
        .unwrap();
        let built = vec![
            ("a/hello-1.1".to_owned(), Some(vec!["nls".to_owned()])),
            ("a/greeter-1.0".to_owned(), Some(vec![])),
            ("a/greeter2-1.0".to_owned(), None),
            ("a/hello-1.0".to_owned(), Some(vec!["debug".to_owned()])),
        ];
        let r = reasons(dir.path(), &built);
        assert_eq!(r[0].1, "new version (the binhost has a/hello-1.0)");
        assert!(r[1].1.starts_with("dependencies changed"), "{}", r[1].1);
        assert_eq!(r[2].1, "new package (none in the binhost)");
        assert_eq!(r[3].1, "USE changed (now: debug)");
    }
}
