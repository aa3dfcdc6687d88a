//! What the server generates instead of reading from disk: the HTML overview pages for browsers,
//! the per-target `binrepos.conf`, and the tiny `Packages` reader those need.

use std::fmt::Write as _;
use std::io::Read;

/// One package line of the per-target page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PackageRow {
    pub cpv: String,
    pub build_id: String,
    pub size: u64,
    pub build_time: u64,
    pub path: String,
    /// The package's flags as built: every IUSE flag, `-` when off.
    pub use_flags: String,
}

/// What the pages show of an index.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IndexSummary {
    pub timestamp: Option<u64>,
    pub header_count: Option<u64>,
    pub packages: Vec<PackageRow>,
    /// The index's generation/revision as its header records it (`GENERATION` once binhost
    /// generations exist, else `REPO_REVISIONS`): [`generation_text`].
    pub generation: Option<String>,
}

/// What the page shows as the binhost's generation/revision: the header's `GENERATION` (written
/// by binhost generations) and the repositories' revisions the packages were built from.
pub fn generation_text(index: &crate::binhost::Index) -> Option<String> {
    let mut parts = Vec::new();
    if let Some(g) = index.header("GENERATION").filter(|v| !v.is_empty()) {
        parts.push(format!("generation {g}"));
    }
    if let Some(revs) = index
        .header("REPO_REVISIONS")
        .and_then(|v| serde_json::from_str::<std::collections::BTreeMap<String, String>>(v).ok())
    {
        for (repo, rev) in revs {
            parts.push(format!("{repo} at {rev}"));
        }
    }
    (!parts.is_empty()).then(|| parts.join(", "))
}

/// The page's view of an index parsed by the binhost module's parser.
pub fn summarize(index: &crate::binhost::Index) -> IndexSummary {
    IndexSummary {
        timestamp: index.timestamp(),
        header_count: index.header("PACKAGES").and_then(|v| v.parse().ok()),
        packages: index
            .packages
            .iter()
            .map(|e| PackageRow {
                cpv: e.cpv().to_string(),
                build_id: e.build_id().map(|b| b.to_string()).unwrap_or_default(),
                size: e.size().unwrap_or(0),
                build_time: e.get("BUILD_TIME").and_then(|v| v.parse().ok()).unwrap_or(0),
                path: e.effective_path(),
                use_flags: {
                    let (on, iuse) = crate::binhost::clientconf::entry_flags(e);
                    iuse.iter().map(|f| if on.contains(f) { f.clone() } else { format!("-{f}") }).collect::<Vec<_>>().join(" ")
                },
            })
            .collect(),
        generation: generation_text(index),
    }
}

/// Reads `<target>/Packages` through an open descriptor (so a concurrent rename cannot tear
/// it); `None` when it does not parse.
pub fn load_index(file: std::fs::File) -> Option<IndexSummary> {
    let mut bytes = Vec::new();
    std::io::BufReader::new(file).read_to_end(&mut bytes).ok()?;
    crate::binhost::Index::parse(&bytes).ok().map(|i| summarize(&i))
}

/// Splits `cat/name-1.2.3-r1` into (`cat/name`, `1.2.3-r1`) with Portage's own rule
/// ([`crate::binhost::deps::pkgsplit`]): `font-adobe-100dpi-1.0.4` is `font-adobe-100dpi` at
/// version `1.0.4`, as a name may hold `-<digit>` but not end in `-<version>`. Something that is
/// no CPV stays whole, with no version.
pub fn split_cpv(cpv: &str) -> (&str, &str) {
    let (cat_len, pf) = match cpv.split_once('/') {
        Some((cat, pf)) => (cat.len() + 1, pf),
        None => (0, cpv),
    };
    match crate::binhost::deps::pkgsplit(pf) {
        Some((pn, _, _)) => (&cpv[..cat_len + pn.len()], &cpv[cat_len + pn.len() + 1..]),
        None => (cpv, ""),
    }
}

pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn human_size(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

fn time_text(secs: u64) -> String {
    if secs == 0 {
        return "—".into();
    }
    // RFC 3339-ish in UTC, derived from the HTTP date to avoid a date dependency; clamped, so a
    // package's BUILD_TIME after year 9999 cannot panic the formatter.
    let d = super::http::http_date(super::http::time_from_secs(secs));
    d.trim_end_matches(" GMT").to_string() + " UTC"
}

const STYLE: &str = "body{font:15px/1.45 system-ui,sans-serif;margin:2em auto;max-width:70em;padding:0 1em;color:#222}\
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em}table{border-collapse:collapse;width:100%}\
th,td{text-align:left;padding:.3em .6em;border-bottom:1px solid #ddd}th{background:#f3f3f3}\
td.n{text-align:right;font-variant-numeric:tabular-nums}pre{background:#f6f6f6;padding:.8em;overflow-x:auto}\
code{font-family:ui-monospace,monospace}.muted{color:#777}";

fn page(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
<title>{}</title><style>{STYLE}</style></head><body>\n{body}\n</body></html>\n",
        escape(title)
    )
}

/// One row of the overview page.
pub struct TargetRow {
    pub name: String,
    pub summary: Option<IndexSummary>,
}

/// `/`: every target with its package count and last update.
pub fn root_page(targets: &[TargetRow]) -> String {
    let mut b = String::new();
    b.push_str("<h1>dbh binhosts</h1>\n");
    if targets.is_empty() {
        b.push_str("<p>No targets are served yet: <code>dbh binhost add --target T FILE…</code> publishes packages.</p>\n");
        return page("dbh binhosts", &b);
    }
    b.push_str("<table><tr><th>Target</th><th>Packages</th><th>Last update</th></tr>\n");
    for t in targets {
        let name = escape(&t.name);
        let (count, updated) = match &t.summary {
            Some(s) => (s.packages.len().to_string(), time_text(s.timestamp.unwrap_or(0))),
            None => ("<span class=\"muted\">no index</span>".to_string(), "—".to_string()),
        };
        let _ = writeln!(
            b,
            "<tr><td><a href=\"/{name}/\">{name}</a></td><td class=\"n\">{count}</td><td>{updated}</td></tr>"
        );
    }
    b.push_str("</table>\n");
    page("dbh binhosts", &b)
}

/// `/<target>/`: the packages and how to use the binhost.
pub fn target_page(target: &str, summary: Option<&IndexSummary>, conf: &str, base: &str, fingerprint: Option<&str>) -> String {
    let t = escape(target);
    let mut b = String::new();
    let _ = writeln!(b, "<p><a href=\"/\">all targets</a></p><h1>Binhost {t}</h1>");
    match summary {
        None => b.push_str("<p>This target has no <code>Packages</code> index yet.</p>\n"),
        Some(s) => {
            let _ = writeln!(
                b,
                "<p>{} packages, index updated {}. <a href=\"Packages\">Packages</a> · <a href=\"Packages.gz\">Packages.gz</a></p>",
                s.packages.len(),
                time_text(s.timestamp.unwrap_or(0))
            );
            if let Some(g) = &s.generation {
                let _ = writeln!(b, "<p>Built from: {}.</p>", escape(g));
            }
            b.push_str("<p>The <a href=\"portage/\">build configuration</a> (make.conf, package.use, keywords, profile, repositories): \
a package's binpkg is used only where your USE, keywords and CHOST match it; <code>dbh client explain --binhost URL</code> on the client \
names each package its Portage would build from source instead, why, and the line that fixes it.</p>\n");
            b.push_str("<table><tr><th>Package</th><th>Version</th><th>Build id</th><th>USE</th><th>Size</th><th>Built</th></tr>\n");
            for p in &s.packages {
                let (name, version) = split_cpv(&p.cpv);
                let _ = writeln!(
                    b,
                    "<tr><td><a href=\"{}\">{}</a></td><td>{}</td><td class=\"n\">{}</td><td><code>{}</code></td><td class=\"n\">{}</td><td>{}</td></tr>",
                    escape(&p.path),
                    escape(name),
                    escape(version),
                    escape(&p.build_id),
                    escape(&p.use_flags),
                    human_size(p.size),
                    time_text(p.build_time)
                );
            }
            b.push_str("</table>\n");
        }
    }
    let url = format!("{base}/{target}");
    let _ = writeln!(b, "<h2>Use this binhost</h2>\n<p>1. Add the repository (<a href=\"binrepos.conf\">binrepos.conf</a>):</p>");
    let _ = writeln!(
        b,
        "<pre><code>wget -O /etc/portage/binrepos.conf/dbh-{t}.conf {}/binrepos.conf\n\n# it contains:\n{}</code></pre>",
        escape(&url),
        escape(&conf.lines().filter(|l| !l.starts_with('#')).collect::<Vec<_>>().join("\n"))
    );
    let fpr = fingerprint.unwrap_or("FINGERPRINT");
    let _ = writeln!(
        b,
        "<p>2. Trust the signing key (<a href=\"key.asc\">key.asc</a>{}) with the <a href=\"trust.sh\">trust script</a>, as root. \
Do not create <code>/etc/portage/gnupg</code> by hand: getuto, Portage's trust helper, sets it up with Gentoo's release keys \
only when it does not exist.</p>\n<pre><code>wget -O /tmp/dbh-{t}-trust.sh {}/trust.sh\nless /tmp/dbh-{t}-trust.sh\n\
DBH_FINGERPRINT={} sh /tmp/dbh-{t}-trust.sh</code></pre>\n<p>What it does:</p>\n<ul>",
        fingerprint.map(|f| format!(", fingerprint <code>{}</code>", escape(f))).unwrap_or_else(|| ", <span class=\"muted\">not published yet</span>".into()),
        escape(&url),
        escape(fpr)
    );
    for line in crate::binhost::trust::summary(fpr) {
        let _ = writeln!(b, "<li>{}</li>", escape(line.trim_start()));
    }
    b.push_str("</ul>\n");
    b.push_str("<p>3. Install from it: <code>emerge --getbinpkg …</code> (or <code>--getbinpkgonly</code>).</p>\n");
    page(&format!("dbh binhost {target}"), &b)
}

/// The generations section of a target's page: which generation is published and the recent
/// history (newest first), from the binhost's generation records.
pub fn generations_section(gens: &[crate::binhost::generations::Generation], current: Option<u64>) -> String {
    let mut b = String::from("<h2>Generations</h2>\n");
    let Some(last) = gens.last() else {
        b.push_str("<p class=\"muted\">No generation recorded yet.</p>\n");
        return b;
    };
    match current {
        Some(n) => {
            let _ = writeln!(b, "<p>Published: generation <strong>{n}</strong> of {}. <code>dbh binhost rollback --target T [--to N]</code> republishes an earlier one.</p>", last.generation);
        }
        None => b.push_str("<p>The published index is not one of the recorded generations.</p>\n"),
    }
    b.push_str("<table><tr><th>Generation</th><th>Published</th><th>Change</th><th>Packages</th><th>Added</th><th>Removed</th></tr>\n");
    let list = |l: &[String]| {
        let shown: Vec<String> = l.iter().take(5).map(|x| escape(x)).collect();
        let more = if l.len() > 5 { format!(" … ({} in all)", l.len()) } else { String::new() };
        format!("{}{more}", shown.join("<br>"))
    };
    for g in gens.iter().rev().take(10) {
        let mark = if Some(g.generation) == current { " (current)" } else { "" };
        let _ = writeln!(
            b,
            "<tr><td class=\"n\">{}{mark}</td><td>{}</td><td>{}</td><td class=\"n\">{}</td><td>{}</td><td>{}</td></tr>",
            g.generation,
            time_text(g.time),
            escape(&g.op),
            g.packages,
            list(&g.added),
            list(&g.removed)
        );
    }
    b.push_str("</table>\n");
    b
}

/// Puts `section` into a target page before its "Use this binhost" part.
pub fn insert_section(html: String, section: &str) -> String {
    match html.find("<h2>Use this binhost</h2>") {
        Some(at) => format!("{}{section}{}", &html[..at], &html[at..]),
        None => html,
    }
}

/// The generated `binrepos.conf` for one target: `dbh binhost conf`'s stanza (with the key
/// import steps as comments) when the public key is published. Without a key it still says
/// `verify-signature = true`: a binhost is meant to be signed, and a client must not silently
/// stop verifying because the server's key file is missing.
pub fn binrepos_conf(target: &str, base: &str, priority: i64, fingerprint: Option<&str>) -> String {
    if let Some(fpr) = fingerprint {
        let input = crate::binhost::conf::ConfInput { target, url: base, priority, fingerprint: Some(fpr) };
        if let Ok(text) = crate::binhost::conf::render(&input) {
            return text;
        }
    }
    format!(
        "# dbh binhost for target `{target}`: save as /etc/portage/binrepos.conf/dbh-{target}.conf\n\
         # The server has no public signing key yet ({base}/{target}/key.asc is missing).\n\
         [dbh-{target}]\nsync-uri = {base}/{target}/\npriority = {priority}\nverify-signature = true\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_stanzas() {
        let index = crate::binhost::Index::parse(
            b"PACKAGES: 2\nTIMESTAMP: 17\nVERSION: 0\n\nBUILD_ID: 1\nCPV: a/b-1.0\nPATH: a/b/b-1.0-1.gpkg.tar\nSIZE: 20480\n\nCPV: a/c-2_rc1-r3\nSIZE: 5\n\n",
        )
        .unwrap();
        let s = summarize(&index);
        assert_eq!(s.timestamp, Some(17));
        assert_eq!(s.header_count, Some(2));
        assert_eq!(s.packages.len(), 2);
        assert_eq!(s.packages[0].path, "a/b/b-1.0-1.gpkg.tar");
        assert_eq!(s.packages[1].size, 5);
        assert_eq!(split_cpv("a/c-2_rc1-r3"), ("a/c", "2_rc1-r3"));
        assert_eq!(split_cpv("dev-libs/libfoo-bar-1.0"), ("dev-libs/libfoo-bar", "1.0"));
        assert_eq!(split_cpv("media-fonts/font-adobe-100dpi-1.0.4"), ("media-fonts/font-adobe-100dpi", "1.0.4"));
        assert_eq!(split_cpv("x11-libs/gtk+-3.24.41-r1"), ("x11-libs/gtk+", "3.24.41-r1"));
        assert_eq!(split_cpv("media-libs/libsdl2-2.30.0"), ("media-libs/libsdl2", "2.30.0"));
        assert_eq!(split_cpv("not-a-cpv"), ("not-a-cpv", ""));
    }

    #[test]
    fn conf_and_escaping() {
        let conf = binrepos_conf("arm64", "http://h:8080", 10, None);
        assert!(conf.ends_with("[dbh-arm64]\nsync-uri = http://h:8080/arm64/\npriority = 10\nverify-signature = true\n"), "{conf}");
        let fpr = "0123456789ABCDEF0123456789ABCDEF01234567";
        let conf = binrepos_conf("arm64", "http://h:8080", 10, Some(fpr));
        assert!(conf.contains(fpr) && conf.ends_with("verify-signature = true\n"), "{conf}");
        assert!(target_page("<x>", None, "", "http://h", None).contains("&lt;x&gt;"));
    }
}
