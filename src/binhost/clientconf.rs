//! A target's build configuration as Portage files a client can adopt (`GET /<target>/portage/`):
//! what decides whether a client's emerge takes a binpkg or builds from source.
//!
//! Sources: the host's per-target configuration `$DBH_HOME/targets/<t>/portage/` (what dbh syncs
//! into the builder), the target definition (CHOST, keyword, profile) and the served index
//! (`Packages`): its header (CHOST, USE, ACCEPT_KEYWORDS, FEATURES, REPO_REVISIONS as the builder's
//! Portage wrote them) and each package's USE and IUSE. Portage takes a binpkg only if its USE
//! matches the client's for that package (`--binpkg-respect-use`, default on), its keywords are
//! accepted, and its CHOST matches; the generated `package.use` therefore has one line per package
//! with the flags exactly as built.

use std::collections::BTreeMap;
use std::path::Path;

use super::Index;

/// The file names under `/<target>/portage/`, in the order the listing shows them.
pub const FILES: &[&str] = &["make.conf", "package.use", "package.accept_keywords", "profile", "repos.conf", "REPO_REVISIONS"];

/// What the files are made from.
#[derive(Debug, Clone, Default)]
pub struct Sources<'a> {
    pub target: &'a str,
    /// `$DBH_HOME/targets/<t>/portage`, if it exists.
    pub config_dir: Option<&'a Path>,
    pub chost: Option<&'a str>,
    pub keyword: Option<&'a str>,
    /// `REPO:PATH` as `eselect profile` names it.
    pub profile: Option<&'a str>,
    pub index: Option<&'a Index>,
}

/// make.conf variables that change what a binpkg contains or whether Portage takes it.
const MAKE_CONF_VARS: &[&str] = &[
    "CHOST", "COMMON_FLAGS", "CFLAGS", "CXXFLAGS", "FCFLAGS", "FFLAGS", "LDFLAGS", "RUSTFLAGS", "USE", "ACCEPT_KEYWORDS",
    "ACCEPT_LICENSE", "INSTALL_MASK", "PKG_INSTALL_MASK", "L10N", "LINGUAS", "VIDEO_CARDS", "INPUT_DEVICES",
    "PYTHON_TARGETS", "PYTHON_SINGLE_TARGET", "LUA_TARGETS", "LUA_SINGLE_TARGET", "RUBY_TARGETS",
];

/// FEATURES that change the files inside a binpkg.
fn binpkg_feature(f: &str) -> bool {
    let f = f.trim_start_matches('-');
    f.starts_with("binpkg-") || ["splitdebug", "compressdebug", "nodoc", "noman", "noinfo", "installsources", "strip", "nostrip"].contains(&f)
}

fn read(dir: Option<&Path>, name: &str) -> Option<String> {
    let path = dir?.join(name);
    if path.is_dir() {
        let mut names: Vec<_> = std::fs::read_dir(&path).ok()?.flatten().map(|e| e.path()).collect();
        names.sort();
        let mut all = String::new();
        for f in names.iter().filter(|f| f.is_file()) {
            all.push_str(&std::fs::read_to_string(f).ok()?);
            all.push('\n');
        }
        return Some(all);
    }
    std::fs::read_to_string(path).ok()
}

/// The assignments in a make.conf whose variable is in `MAKE_CONF_VARS` or is `CPU_FLAGS_*`,
/// continuation lines kept.
fn relevant_assignments(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let t = line.trim_start().trim_start_matches("export ");
        let Some((var, rest)) = t.split_once('=') else { continue };
        let var = var.trim();
        if !(MAKE_CONF_VARS.contains(&var) || var.starts_with("CPU_FLAGS_")) {
            continue;
        }
        let mut stmt = line.to_string();
        // A quoted value may span lines.
        let quote = rest.trim_start().chars().next().filter(|c| *c == '"' || *c == '\'');
        if let Some(q) = quote {
            let mut open = rest.trim_start()[1..].matches(q).count() % 2 == 0;
            while open {
                let Some(next) = lines.next() else { break };
                stmt.push('\n');
                stmt.push_str(next);
                open = next.matches(q).count() % 2 == 0;
            }
        }
        out.push(stmt);
    }
    out
}

/// The enabled and known flags of an index entry: (USE ∩ IUSE, IUSE without +/- defaults).
pub fn entry_flags(e: &super::Entry) -> (Vec<String>, Vec<String>) {
    let iuse: Vec<String> = e.get("IUSE").unwrap_or("").split_whitespace().map(|f| f.trim_start_matches(['+', '-']).to_owned()).collect();
    let used: std::collections::BTreeSet<&str> = e.get("USE").unwrap_or("").split_whitespace().collect();
    let on = iuse.iter().filter(|f| used.contains(f.as_str())).cloned().collect();
    (on, iuse)
}

/// The files, name → text.
pub fn files(s: &Sources<'_>) -> BTreeMap<&'static str, String> {
    let header = |k: &str| s.index.and_then(|i| i.header(k)).filter(|v| !v.is_empty());
    let t = s.target;
    let mut m = BTreeMap::new();

    let mut mc = format!(
        "# The build configuration of dbh target `{t}` that decides whether your emerge can use its\n\
         # binpkgs. Compare with your /etc/portage/make.conf; adopt what you need.\n"
    );
    if let Some(chost) = header("CHOST").or(s.chost) {
        mc.push_str(&format!("CHOST=\"{chost}\"\n"));
    }
    let target_make_conf = read(s.config_dir, "make.conf").unwrap_or_default();
    let assignments = relevant_assignments(&target_make_conf);
    if !assignments.is_empty() {
        mc.push_str("\n# From the target's make.conf on the binhost:\n");
        for a in assignments {
            mc.push_str(&a);
            mc.push('\n');
        }
    }
    if let Some(kw) = header("ACCEPT_KEYWORDS").or(s.keyword) {
        mc.push_str(&format!("\n# ACCEPT_KEYWORDS of the builder: {kw}\n"));
    }
    if let Some(features) = header("FEATURES") {
        let f: Vec<&str> = features.split_whitespace().filter(|f| binpkg_feature(f)).collect();
        mc.push_str(&format!("# FEATURES of the builder that change binpkgs' contents: {}\n", f.join(" ")));
    }
    if let Some(use_) = header("USE") {
        mc.push_str(&format!(
            "# The builder's effective global USE (profile + make.conf), for comparison with\n\
             # `portageq envvar USE`:\n# USE=\"{use_}\"\n"
        ));
    }
    m.insert("make.conf", mc);

    let mut pu = String::from("# package.use of the binhost's builds.\n");
    if let Some(text) = read(s.config_dir, "package.use").filter(|t| t.lines().any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))) {
        pu.push_str("\n# The target's package.use on the binhost:\n");
        pu.push_str(&text);
        if !text.ends_with('\n') {
            pu.push('\n');
        }
    }
    if let Some(index) = s.index {
        pu.push_str("\n# Every package as built (its IUSE, on or off): with these lines your emerge's USE\n# matches the binpkg's, so --getbinpkg takes it.\n");
        for e in index.packages_sorted() {
            let (on, iuse) = entry_flags(e);
            if iuse.is_empty() {
                continue;
            }
            let flags: Vec<String> =
                iuse.iter().map(|f| if on.contains(f) { f.clone() } else { format!("-{f}") }).collect();
            pu.push_str(&format!("={} {}\n", e.cpv(), flags.join(" ")));
        }
    }
    m.insert("package.use", pu);

    let mut kw = String::from("# package.accept_keywords of the binhost's builds.\n");
    if let Some(text) = read(s.config_dir, "package.accept_keywords") {
        kw.push_str(&text);
        if !text.ends_with('\n') {
            kw.push('\n');
        }
    }
    m.insert("package.accept_keywords", kw);

    m.insert(
        "profile",
        match s.profile {
            Some(p) => format!("{p}\n"),
            None => "# unknown: the target definition names no profile\n".into(),
        },
    );

    let mut rc = String::from("# repos.conf of the binhost's builds (besides the profile's main repository).\n");
    if let Some(text) = read(s.config_dir, "repos.conf") {
        rc.push_str(&text);
        if !text.ends_with('\n') {
            rc.push('\n');
        }
    }
    m.insert("repos.conf", rc);

    let mut rr = String::from("# The revision of each repository the packages were built from (index header REPO_REVISIONS).\n");
    match header("REPO_REVISIONS").and_then(|v| serde_json::from_str::<BTreeMap<String, String>>(v).ok()) {
        Some(revs) => {
            for (repo, rev) in revs {
                rr.push_str(&format!("{repo} {rev}\n"));
            }
        }
        None => rr.push_str("# none recorded\n"),
    }
    m.insert("REPO_REVISIONS", rr);
    m
}

/// The plain-text listing served as `/<target>/portage/`.
pub fn listing(target: &str) -> String {
    let mut out = format!(
        "# dbh target `{target}`: the build configuration of its binpkgs, as Portage files.\n\
         # Fetch each as <this URL><name> and compare it with your /etc/portage;\n\
         # `dbh client explain --binhost <the target's URL>` on the client names each package its Portage\n\
         # would build from source although this binhost has it, why, and the line that fixes it.\n"
    );
    for f in FILES {
        out.push_str(f);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_from_config_and_index() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("make.conf"),
            "# c\nCOMMON_FLAGS=\"-O2\n -pipe\"\nMAKEOPTS=-j9\nUSE=\"-X\"\nCPU_FLAGS_ARM=\"neon\"\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("package.use"), "dbh-test/hello -nls\n").unwrap();
        let index = Index::parse(
            b"CHOST: aarch64-unknown-linux-gnu\nFEATURES: binpkg-docompress buildpkg sandbox nodoc\nREPO_REVISIONS: {\"gentoo\": \"abc\"}\nTIMESTAMP: 1\nVERSION: 0\n\n\
CPV: dbh-test/hello-1.0\nIUSE: +nls debug\nUSE: arm64 nls\n\nCPV: dbh-test/plain-1\n\n",
        )
        .unwrap();
        let f = files(&Sources {
            target: "arm64",
            config_dir: Some(dir.path()),
            chost: Some("ignored-when-the-index-has-one"),
            keyword: Some("arm64"),
            profile: Some("gentoo:default/linux/arm64/23.0"),
            index: Some(&index),
        });
        let mc = &f["make.conf"];
        assert!(mc.contains("CHOST=\"aarch64-unknown-linux-gnu\"\n"), "{mc}");
        assert!(mc.contains("COMMON_FLAGS=\"-O2\n -pipe\"\n") && mc.contains("USE=\"-X\"\n") && mc.contains("CPU_FLAGS_ARM"), "{mc}");
        assert!(!mc.contains("MAKEOPTS"), "{mc}");
        assert!(mc.contains("change binpkgs' contents: binpkg-docompress nodoc\n"), "{mc}");
        let pu = &f["package.use"];
        assert!(pu.contains("dbh-test/hello -nls\n") && pu.contains("=dbh-test/hello-1.0 nls -debug\n"), "{pu}");
        assert!(!pu.contains("plain"), "{pu}");
        assert_eq!(f["profile"], "gentoo:default/linux/arm64/23.0\n");
        assert!(f["REPO_REVISIONS"].ends_with("gentoo abc\n"));
        assert_eq!(f.len(), FILES.len());
    }
}
