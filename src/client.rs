//! `dbh client explain`: why a Gentoo client would build a package from source although the
//! binhost has it (docs/client-trust.md, "Why a binpkg is not used").
//!
//! Owns the comparison of a client's own Portage plan with a binhost's index. The client's Portage
//! (the setting `portage.emerge`, its sibling `portageq`, and Portage's own environment —
//! `PORTAGE_CONFIGROOT`, `PORTAGE_OVERRIDE_EPREFIX`, `ROOT`, … — passed through, so it works on
//! `/`, in a prefix, or against a copy of a client's `/etc/portage` with `--config-root`) runs
//! `emerge --pretend --verbose --getbinpkg`; dbh fetches the binhost's `Packages` itself and, for
//! every `[ebuild …]` entry of the plan, finds the reason in the two:
//! - the binhost has the same CPV: its CHOST differs, or its USE differs on flags of its IUSE
//!   (both sides named, and the `package.use` line that takes the binpkg), or else its
//!   dependencies differ from the ebuild's now (`--binpkg-changed-deps`);
//! - the binhost has another version: the client does not accept its keywords (the
//!   `package.accept_keywords` line), or the client picked another version (mask, repository);
//! - the client's cached copy of the index (`EROOT/var/cache/edb/binhost/<host>/<path>/Packages`,
//!   Portage's `CACHE_PATH`) is still older than the binhost's after the run — Portage did not
//!   refresh it (`frozen`, a TTL, a server answering 304) — and lacks the package: stale cache.

use std::collections::BTreeSet;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use crate::binhost::{Entry, Index};
use crate::build::parse_merge_list_line;
use crate::hint::Hint;
use crate::process::Cmd;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot fetch the binhost index {url}")]
    Fetch {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("cannot fetch the binhost index {url}: the server answered {status}")]
    Status { url: String, status: u16 },
    #[error("the binhost index {url} is not a Packages index: {reason}")]
    BadIndex { url: String, reason: String },
    #[error("`{url}` is not an http:// or https:// binhost URL")]
    BadUrl { url: String },
    #[error("the client's Portage failed")]
    Portage(#[source] crate::process::ProcessError),
}

impl Hint for ClientError {
    fn hint(&self) -> Option<String> {
        match self {
            ClientError::Fetch { .. } | ClientError::Status { .. } => {
                Some("give the target's URL as clients use it, e.g. --binhost http://HOST:8080/arm64 (see `dbh binhost conf`)".into())
            }
            ClientError::BadUrl { .. } => Some("e.g. --binhost http://HOST:8080/arm64".into()),
            ClientError::BadIndex { .. } => Some("the URL must be a target's directory, the one holding Packages".into()),
            ClientError::Portage(e) => e
                .hint()
                .or_else(|| Some("run the same `emerge --pretend --verbose --getbinpkg …` yourself to see Portage's full message".into())),
        }
    }
}

/// What to explain.
#[derive(Debug, Clone)]
pub struct Request {
    /// The target's binhost URL (`http://host:8080/arm64`).
    pub binhost: String,
    /// Portage's configuration root (`PORTAGE_CONFIGROOT`); `None`: the environment's, else `/`.
    pub config_root: Option<PathBuf>,
    /// Atoms or sets; empty: `@world`.
    pub atoms: Vec<String>,
    /// The client's emerge (setting `portage.emerge`).
    pub emerge: PathBuf,
    pub emerge_args: Vec<String>,
}

/// Why one package would be built from source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// The binhost has no instance of this package at all.
    NotInBinhost,
    /// The client's cached index is older than the binhost's and lacks this package.
    StaleCache { cache: PathBuf },
    Chost { client: String, binhost: String },
    /// `on`/`off`: flags the binhost built with on/off that the client wants the other way.
    Use { binhost_on: Vec<String>, binhost_off: Vec<String>, line: String },
    /// The binhost's version needs keywords the client does not accept.
    Keyword { binhost_cpv: String, keywords: String, line: String },
    /// The binhost has other versions and the client picked this one.
    OtherVersion { binhost: Vec<String> },
    /// Same CPV, USE and CHOST: the binpkg's dependencies differ from the ebuild's now.
    Deps,
}

/// One `[ebuild …]` entry of the client's plan, with why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FromSource {
    pub cpv: String,
    pub reason: Reason,
}

#[derive(Debug, Clone, Default)]
pub struct Report {
    /// CPVs the client would take from a binhost.
    pub binary: Vec<String>,
    pub from_source: Vec<FromSource>,
    /// `(path, cached TIMESTAMP, binhost TIMESTAMP)` when the cache is behind after the run.
    pub stale_cache: Option<(PathBuf, u64, u64)>,
    /// The client's binrepos.conf / PORTAGE_BINHOST does not name the URL.
    pub not_configured: bool,
    /// The emerge command that was run.
    pub command: String,
}

impl Report {
    /// Everything would come from the binhost.
    pub fn all_binary(&self) -> bool {
        self.from_source.is_empty()
    }
}

/// `http://h:p/path` → (host, path without slashes at either end).
fn host_and_path(url: &str) -> Result<(String, String), ClientError> {
    let bad = || ClientError::BadUrl { url: url.to_owned() };
    let rest = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://")).ok_or_else(bad)?;
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split_once(']').map(|(h, _)| h).ok_or_else(bad)?
    } else {
        authority.split_once(':').map_or(authority, |(h, _)| h)
    };
    if host.is_empty() {
        return Err(bad());
    }
    Ok((host.to_owned(), path.trim_matches('/').to_owned()))
}

/// Largest index `explain` reads (decompressed): a 100 000-package binhost's is about 50 MiB.
pub const MAX_INDEX: u64 = 1 << 30;

/// The binhost's index, as Portage fetches it: `Packages.gz`, else `Packages`.
pub fn fetch_index(url: &str) -> Result<Index, ClientError> {
    let client = reqwest::blocking::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(15))
        .timeout(std::time::Duration::from_secs(120))
        .build()
        .map_err(|source| ClientError::Fetch { url: url.to_owned(), source })?;
    let base = url.trim_end_matches('/');
    let mut last = None;
    for (name, gz) in [("Packages.gz", true), ("Packages", false)] {
        let u = format!("{base}/{name}");
        let resp = client.get(&u).send().map_err(|source| ClientError::Fetch { url: u.clone(), source })?;
        let status = resp.status().as_u16();
        if status != 200 {
            last = Some(ClientError::Status { url: u, status });
            continue;
        }
        // Streamed and capped on the decompressed side: the URL is the user's, the bytes are not.
        let mut text = Vec::new();
        let read = if gz {
            flate2::read::MultiGzDecoder::new(resp).take(MAX_INDEX + 1).read_to_end(&mut text)
        } else {
            resp.take(MAX_INDEX + 1).read_to_end(&mut text)
        };
        read.map_err(|e| ClientError::BadIndex { url: u.clone(), reason: e.to_string() })?;
        if text.len() as u64 > MAX_INDEX {
            return Err(ClientError::BadIndex { url: u, reason: format!("it is larger than {} MiB", MAX_INDEX >> 20) });
        }
        return Index::parse(&text).map_err(|e| ClientError::BadIndex { url: u, reason: e.to_string() });
    }
    Err(last.unwrap_or(ClientError::BadUrl { url: url.to_owned() }))
}

/// `emerge`'s sibling `name` (portageq), else `name` on PATH.
fn sibling(emerge: &Path, name: &str) -> PathBuf {
    emerge.parent().map(|d| d.join(name)).filter(|p| p.is_file()).unwrap_or_else(|| PathBuf::from(name))
}

fn with_root(cmd: Cmd, req: &Request) -> Cmd {
    match &req.config_root {
        Some(root) => cmd.env("PORTAGE_CONFIGROOT", root),
        None => cmd,
    }
}

/// `portageq envvar -v` of the variables the comparison needs.
fn client_vars(req: &Request) -> Result<std::collections::BTreeMap<String, String>, ClientError> {
    let cmd = with_root(Cmd::new(sibling(&req.emerge, "portageq")), req)
        .args(["envvar", "-v", "EROOT", "PORTAGE_CONFIGROOT", "CHOST", "ARCH", "ACCEPT_KEYWORDS", "PORTAGE_BINHOST"])
        .install_hint("Portage's portageq (beside emerge; the setting portage.emerge names emerge)");
    // portageq exits 1 when a variable is empty: the values it printed still count.
    let mut text = String::new();
    match cmd.run_lines(|stream, line| {
        if stream == crate::process::Stream::Stdout {
            text.push_str(line);
            text.push('\n');
        }
    }) {
        Ok(()) | Err(crate::process::ProcessError::Failed { .. }) => {}
        Err(e) => return Err(ClientError::Portage(e)),
    }
    Ok(text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
        .collect())
}

/// The `sync-uri`s of the client's binrepos.conf (a file or a directory of files).
fn configured_uris(config_root: &Path) -> Vec<String> {
    let base = config_root.join("etc/portage/binrepos.conf");
    let mut files = vec![base.clone()];
    if let Ok(dir) = std::fs::read_dir(&base) {
        let mut more: Vec<PathBuf> = dir.flatten().map(|e| e.path()).collect();
        more.sort();
        files = more;
    }
    let mut out = Vec::new();
    for f in files {
        for line in std::fs::read_to_string(&f).unwrap_or_default().lines() {
            if let Some((k, v)) = line.split_once('=')
                && k.trim() == "sync-uri"
            {
                out.push(v.trim().trim_end_matches('/').to_owned());
            }
        }
    }
    out
}

fn timestamp_of(path: &Path) -> Option<(u64, BTreeSet<String>)> {
    let bytes = std::fs::read(path).ok()?;
    let index = Index::parse(&bytes).ok()?;
    Some((index.timestamp()?, index.packages.iter().map(|e| e.cpv().to_owned()).collect()))
}

/// `cat/pn` of a CPV.
fn cp_of(cpv: &str) -> Option<String> {
    let (cat, pf) = cpv.split_once('/')?;
    let (pn, _, _) = crate::binhost::deps::pkgsplit(pf)?;
    Some(format!("{cat}/{pn}"))
}

/// The flag names of an IUSE value (`+foo -bar baz`).
fn iuse_names(iuse: &str) -> BTreeSet<String> {
    iuse.split_whitespace().map(|f| f.trim_start_matches(['+', '-']).to_owned()).collect()
}

/// Whether `accept` (the global ACCEPT_KEYWORDS; package.accept_keywords is not seen here, but
/// then emerge would have picked that version) accepts an ebuild with `keywords`.
fn accepted(keywords: &str, accept: &str) -> bool {
    let accept: BTreeSet<&str> = accept.split_whitespace().collect();
    keywords.split_whitespace().any(|k| {
        k == "*" || accept.contains(k) || accept.contains("**") || (k.starts_with('~') && accept.contains("~*"))
    })
}

/// The reason for one `[ebuild]` entry: see the module docs.
fn reason_for(cpv: &str, client_use: &[String], index: &Index, vars: &std::collections::BTreeMap<String, String>, cache: Option<&(PathBuf, BTreeSet<String>)>) -> Reason {
    let cp = cp_of(cpv);
    let same: Vec<&Entry> = index.packages.iter().filter(|e| e.cpv() == cpv).collect();
    let others: Vec<&Entry> = index.packages.iter().filter(|e| e.cpv() != cpv && cp.is_some() && cp_of(e.cpv()) == cp).collect();
    if same.is_empty() && others.is_empty() {
        return Reason::NotInBinhost;
    }
    if let Some((path, cached)) = cache
        && !same.is_empty()
        && !cached.contains(cpv)
    {
        return Reason::StaleCache { cache: path.clone() };
    }
    let client_chost = vars.get("CHOST").cloned().unwrap_or_default();
    if let Some(e) = same.iter().max_by_key(|e| e.build_id().unwrap_or(0)) {
        let chost = e.get("CHOST").or_else(|| index.header("CHOST")).unwrap_or_default().to_owned();
        if !chost.is_empty() && !client_chost.is_empty() && chost != client_chost {
            return Reason::Chost { client: client_chost, binhost: chost };
        }
        let iuse = iuse_names(e.get("IUSE").unwrap_or_default());
        let bin_on: BTreeSet<String> = e.get("USE").unwrap_or_default().split_whitespace().filter(|f| iuse.contains(*f)).map(str::to_owned).collect();
        let client_on: BTreeSet<String> = client_use.iter().filter(|f| iuse.contains(*f)).cloned().collect();
        let binhost_on: Vec<String> = bin_on.difference(&client_on).cloned().collect();
        let binhost_off: Vec<String> = client_on.difference(&bin_on).cloned().collect();
        if !binhost_on.is_empty() || !binhost_off.is_empty() {
            let flags: Vec<String> = binhost_on.iter().cloned().chain(binhost_off.iter().map(|f| format!("-{f}"))).collect();
            let line = format!("{} {}", cp.clone().unwrap_or_else(|| cpv.to_owned()), flags.join(" "));
            return Reason::Use { binhost_on, binhost_off, line };
        }
        return Reason::Deps;
    }
    let arch = vars.get("ARCH").cloned().unwrap_or_default();
    let accept = vars.get("ACCEPT_KEYWORDS").cloned().unwrap_or_default();
    // The most recently built other version whose keywords the client does not accept.
    if let Some(e) = others
        .iter()
        .filter(|e| !accepted(e.get("KEYWORDS").unwrap_or_default(), &accept))
        .max_by_key(|e| e.get("BUILD_TIME").and_then(|t| t.parse::<u64>().ok()).unwrap_or(0))
    {
        let keywords = e.get("KEYWORDS").unwrap_or_default().to_owned();
        let want = keywords.split_whitespace().find(|k| k.trim_start_matches('~') == arch).map_or_else(|| format!("~{arch}"), str::to_owned);
        return Reason::Keyword { binhost_cpv: e.cpv().to_owned(), line: format!("={} {want}", e.cpv()), keywords };
    }
    let mut versions: Vec<String> = others.iter().map(|e| e.cpv().to_owned()).collect();
    versions.sort();
    versions.dedup();
    Reason::OtherVersion { binhost: versions }
}

/// Runs the client's Portage and compares its plan with the binhost's index.
pub fn explain(req: &Request) -> Result<Report, ClientError> {
    let (host, path) = host_and_path(&req.binhost)?;
    let index = fetch_index(&req.binhost)?;
    let remote_ts = index.timestamp().unwrap_or(0);
    let vars = client_vars(req)?;
    let config_root = req
        .config_root
        .clone()
        .or_else(|| vars.get("PORTAGE_CONFIGROOT").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/"));
    let want = req.binhost.trim_end_matches('/');
    let not_configured = !configured_uris(&config_root).iter().any(|u| u == want)
        && !vars.get("PORTAGE_BINHOST").is_some_and(|b| b.split_whitespace().any(|u| u.trim_end_matches('/') == want));

    let atoms = if req.atoms.is_empty() { vec!["@world".to_owned()] } else { req.atoms.clone() };
    let cmd = with_root(Cmd::new(&req.emerge), req)
        .args(["--pretend", "--verbose", "--getbinpkg", "--color=n", "--nospinner", "--ask=n"])
        .args(&atoms)
        .args(&req.emerge_args)
        .env("NOCOLOR", "true")
        .install_hint("Portage's emerge; name it with the setting portage.emerge (DBH_PORTAGE_EMERGE)");
    let command = cmd.display();
    let out = cmd.output().map_err(ClientError::Portage)?;
    let text = out.stdout_str();

    let eroot = vars.get("EROOT").map_or_else(|| PathBuf::from("/"), PathBuf::from);
    let cache_path = eroot.join("var/cache/edb/binhost").join(&host).join(&path).join("Packages");
    let cache = timestamp_of(&cache_path);
    let stale = cache.as_ref().filter(|(ts, _)| *ts < remote_ts).map(|(ts, cpvs)| ((cache_path.clone(), *ts, remote_ts), cpvs.clone()));

    let mut report = Report { not_configured, command, ..Default::default() };
    let stale_set = stale.as_ref().map(|((p, _, _), cpvs)| (p.clone(), cpvs.clone()));
    for line in text.lines() {
        let Some(p) = parse_merge_list_line(line) else { continue };
        if p.binary {
            report.binary.push(p.cpv);
        } else {
            let reason = reason_for(&p.cpv, &p.use_enabled, &index, &vars, stale_set.as_ref());
            report.from_source.push(FromSource { cpv: p.cpv, reason });
        }
    }
    report.stale_cache = stale.map(|(s, _)| s);
    Ok(report)
}

/// The report as the user reads it: one block per package built from source, with the fix.
pub fn render(report: &Report, binhost: &str) -> String {
    let mut s = String::new();
    if report.not_configured {
        s.push_str(&format!(
            "note: this client's binrepos.conf (and PORTAGE_BINHOST) does not name {binhost}: its Portage does not use that binhost at all\n  fix: `dbh binhost conf --target T --url URL` prints the binrepos.conf stanza\n"
        ));
    }
    if let Some((path, cached, remote)) = &report.stale_cache {
        s.push_str(&format!(
            "stale cache: {} has TIMESTAMP {cached}, the binhost's index {remote}: Portage kept its cached copy (binrepos.conf `frozen`, a TTL, or a server that answered 304)\n  fix: rm -f {}   (the next --getbinpkg fetches the index anew)\n",
            path.display(),
            path.display()
        ));
    }
    for f in &report.from_source {
        let why = match &f.reason {
            Reason::NotInBinhost => "not in the binhost (build it there: dbh vm build --target T ATOM)".to_owned(),
            Reason::StaleCache { cache } => format!("the binhost has it, but the client's cached index {} does not (see \"stale cache\" above)", cache.display()),
            Reason::Chost { client, binhost } => format!("CHOST differs: the binhost built for {binhost}, this client is {client}; binpkgs of another CHOST are never used"),
            Reason::Use { binhost_on, binhost_off, line } => {
                let on = if binhost_on.is_empty() { String::new() } else { format!("the binhost built it with {} on, this client wants it off", binhost_on.join(" ")) };
                let off = if binhost_off.is_empty() { String::new() } else { format!("the binhost built it with {} off, this client wants it on", binhost_off.join(" ")) };
                let both = [on, off].into_iter().filter(|x| !x.is_empty()).collect::<Vec<_>>().join("; ");
                format!("USE differs: {both}\n  fix: add to /etc/portage/package.use:  {line}\n  or:  emerge --binpkg-respect-use=n (takes the binpkg whatever its USE)")
            }
            Reason::Keyword { binhost_cpv, keywords, line } => format!(
                "keyword: the binhost has {binhost_cpv} (KEYWORDS=\"{keywords}\"), which this client does not accept\n  fix: add to /etc/portage/package.accept_keywords:  {line}"
            ),
            Reason::OtherVersion { binhost } => {
                format!("the binhost has {} instead; this client picked another version (a mask, or another repository)", binhost.join(" "))
            }
            Reason::Deps => "same version, USE and CHOST: the binpkg's dependencies differ from the ebuild's now (--binpkg-changed-deps)\n  fix: rebuild it on the binhost (dbh vm build --target T --update), or emerge --binpkg-changed-deps=n".to_owned(),
        };
        s.push_str(&format!("{}: built from source: {why}\n", f.cpv));
    }
    s.push_str(&format!(
        "{} package(s) from a binhost, {} from source{}\n",
        report.binary.len(),
        report.from_source.len(),
        if report.all_binary() { "" } else { " (exit status 1)" }
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(text: &str) -> Index {
        Index::parse(text.as_bytes()).unwrap()
    }

    const INDEX: &str = "CHOST: aarch64-unknown-linux-gnu\nPACKAGES: 3\nTIMESTAMP: 100\nVERSION: 0\n\n\
        BUILD_ID: 1\nCPV: a/b-1.0\nIUSE: +debug nls\nKEYWORDS: arm64\nUSE: arm64 debug elibc_glibc\n\n\
        BUILD_ID: 1\nCPV: a/c-2.0\nIUSE: \nKEYWORDS: ~arm64\nUSE: arm64\n\n\
        BUILD_ID: 1\nCPV: a/d-1.0\nCHOST: x86_64-pc-linux-gnu\nIUSE: \nKEYWORDS: arm64\nUSE: \n\n";

    fn vars() -> std::collections::BTreeMap<String, String> {
        [("CHOST", "aarch64-unknown-linux-gnu"), ("ARCH", "arm64"), ("ACCEPT_KEYWORDS", "arm64")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    #[test]
    fn each_reason_is_found_with_its_fix() {
        let idx = index(INDEX);
        // USE: only IUSE flags count (arm64, elibc_glibc are not the package's).
        let r = reason_for("a/b-1.0", &["nls".into()], &idx, &vars(), None);
        assert_eq!(r, Reason::Use { binhost_on: vec!["debug".into()], binhost_off: vec!["nls".into()], line: "a/b debug -nls".into() });
        assert_eq!(reason_for("a/b-1.0", &["debug".into()], &idx, &vars(), None), Reason::Deps);
        // A version only the binhost has, needing ~arm64.
        let r = reason_for("a/c-1.9", &[], &idx, &vars(), None);
        assert_eq!(r, Reason::Keyword { binhost_cpv: "a/c-2.0".into(), keywords: "~arm64".into(), line: "=a/c-2.0 ~arm64".into() });
        let mut tilde = vars();
        tilde.insert("ACCEPT_KEYWORDS".into(), "arm64 ~arm64".into());
        assert_eq!(reason_for("a/c-1.9", &[], &idx, &tilde, None), Reason::OtherVersion { binhost: vec!["a/c-2.0".into()] });
        assert!(matches!(reason_for("a/d-1.0", &[], &idx, &vars(), None), Reason::Chost { .. }));
        assert_eq!(reason_for("x/y-1", &[], &idx, &vars(), None), Reason::NotInBinhost);
        // A stale cache without the package explains it before anything else.
        let cache = (PathBuf::from("/c/Packages"), BTreeSet::from(["a/c-2.0".to_owned()]));
        assert_eq!(reason_for("a/b-1.0", &[], &idx, &vars(), Some(&cache)), Reason::StaleCache { cache: "/c/Packages".into() });
    }

    #[test]
    fn urls_give_portages_cache_path() {
        assert_eq!(host_and_path("http://h:8080/arm64/").unwrap(), ("h".into(), "arm64".into()));
        assert_eq!(host_and_path("https://u@[::1]:1/a/b").unwrap(), ("::1".into(), "a/b".into()));
        assert!(host_and_path("ftp://h/x").is_err());
        assert!(host_and_path("http:///x").is_err());
    }

    #[test]
    fn the_report_says_the_fix() {
        let report = Report {
            binary: vec!["a/c-2.0".into()],
            from_source: vec![FromSource { cpv: "a/b-1.0".into(), reason: Reason::Use { binhost_on: vec!["debug".into()], binhost_off: vec![], line: "a/b debug".into() } }],
            ..Default::default()
        };
        let text = render(&report, "http://h/arm64");
        assert!(text.contains("a/b-1.0: built from source: USE differs: the binhost built it with debug on, this client wants it off"), "{text}");
        assert!(text.contains("package.use:  a/b debug\n"), "{text}");
        assert!(text.ends_with("1 package(s) from a binhost, 1 from source (exit status 1)\n"), "{text}");
    }
}
