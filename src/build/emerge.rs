//! Following emerge, whichever backend runs it: the lines dbh parses (`Emerging`, `Completed`,
//! phases), the [`Follower`] that writes emerge.log and turns them into progress events, and
//! running an emerge on the host and collecting the failed packages' logs.

use std::collections::{BTreeSet, VecDeque};
use std::io::Write as _;
use std::path::{Path, PathBuf};

use super::{BuildError, FailedPackage, io};
use crate::events::{Event, Reporter, Unit};
use crate::process::Cmd;

/// The lines emerge prints that dbh follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmergeLine {
    /// `>>> Emerging (N of M) cat/pf::repo` (also `Emerging binary`): the build of `cpv` started.
    Emerging { n: u64, m: u64, cpv: String, binary: bool },
    /// `>>> Completed (N of M) cat/pf::repo`.
    Completed { n: u64, m: u64, cpv: String },
    /// The current package entered a phase, named for the progress bar (`>>> Compiling source in
    /// …` → "compiling", `>>> Installing (N of M) …` → "merging").
    Phase(&'static str),
}

/// emerge's phase lines (after `>>> `) and how the bar names them; first match wins.
const PHASES: &[(&str, &str)] = &[
    ("Unpacking source", "unpacking"),
    ("Preparing source", "preparing"),
    ("Configuring source", "configuring"),
    ("Compiling source", "compiling"),
    ("Test phase", "testing"),
    ("Install ", "installing into the image"),
    ("Completed installing", "checking the image"),
    ("Creating binpkg", "creating the binpkg"),
    ("Extracting ", "extracting the binpkg"),
];

/// Parses one line of emerge's output.
pub fn parse_line(line: &str) -> Option<EmergeLine> {
    let rest = line.trim_start().strip_prefix(">>> ")?;
    if let Some(counted) = parse_counted(rest) {
        return Some(counted);
    }
    PHASES.iter().find(|(prefix, _)| rest.starts_with(prefix)).map(|(_, name)| EmergeLine::Phase(name))
}

/// `KIND (N of M) cat/pf::repo`.
fn parse_counted(rest: &str) -> Option<EmergeLine> {
    let (kind, rest) = rest.split_once('(')?;
    let (count, rest) = rest.split_once(')')?;
    let (n, m) = count.split_once(" of ")?;
    let (n, m) = (n.trim().parse().ok()?, m.trim().parse().ok()?);
    let cpv = rest.split_whitespace().next()?;
    let cpv = cpv.split_once("::").map_or(cpv, |(c, _)| c).to_owned();
    if !cpv.contains('/') {
        return None;
    }
    match kind.trim() {
        "Emerging" => Some(EmergeLine::Emerging { n, m, cpv, binary: false }),
        "Emerging binary" => Some(EmergeLine::Emerging { n, m, cpv, binary: true }),
        "Completed" => Some(EmergeLine::Completed { n, m, cpv }),
        "Installing" => Some(EmergeLine::Phase("merging")),
        _ => None,
    }
}

/// One entry of emerge's merge list (`[ebuild  N    ] cat/pf::repo  USE="a -b* (c)" 0 KiB`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    /// `ebuild` or `binary`.
    pub binary: bool,
    pub cpv: String,
    /// The flags shown enabled (marks `*`, `%` and parentheses removed), sorted.
    pub use_enabled: Vec<String>,
}

/// Parses a merge-list line of `emerge --verbose`.
pub fn parse_merge_list_line(line: &str) -> Option<Planned> {
    let rest = line.trim_start().strip_prefix('[')?;
    let (kind, rest) = rest.split_once(']')?;
    let binary = match kind.split_whitespace().next()? {
        "ebuild" => false,
        "binary" => true,
        _ => return None,
    };
    let mut words = rest.split_whitespace();
    let cpv = words.next()?;
    let cpv = cpv.split_once("::").map_or(cpv, |(c, _)| c).to_owned();
    if !cpv.contains('/') {
        return None;
    }
    let mut use_enabled = Vec::new();
    if let Some((_, after)) = rest.split_once(" USE=\"") {
        let flags = after.split('"').next().unwrap_or_default();
        for f in flags.split_whitespace() {
            let f = f.trim_matches(|c| c == '(' || c == ')').trim_end_matches(['*', '%']);
            let f = f.trim_matches(|c| c == '(' || c == ')');
            if !f.is_empty() && !f.starts_with('-') {
                use_enabled.push(f.to_owned());
            }
        }
    }
    use_enabled.sort();
    Some(Planned { binary, cpv, use_enabled })
}

/// Follows one emerge run line by line, whichever backend runs it: writes emerge.log, turns
/// `Emerging`/`Completed` lines into progress events, keeps a tail for errors, and knows which
/// packages started but never completed (the failed ones).
pub struct Follower {
    task: String,
    label: String,
    log: Option<std::fs::File>,
    echo: bool,
    total: Option<u64>,
    /// The package being built now (its position), for phase messages.
    current: Option<(u64, String)>,
    started: Vec<String>,
    completed: BTreeSet<String>,
    /// Started from source (not `Emerging binary`).
    from_source: BTreeSet<String>,
    /// The enabled USE flags of each package in emerge's merge list (`--verbose`).
    planned_use: std::collections::BTreeMap<String, Vec<String>>,
    tail: VecDeque<String>,
}

impl Follower {
    /// Creates `log_path` with `command` as its first line.
    pub fn new(task: String, label: String, log_path: &Path, command: &str, echo: bool) -> Result<Follower, BuildError> {
        let mut log = std::fs::File::create(log_path).map_err(io("create", log_path))?;
        let _ = writeln!(log, "# {command}");
        Ok(Follower { task, label, log: Some(log), echo, total: None, current: None, started: Vec::new(), completed: BTreeSet::new(), from_source: BTreeSet::new(), planned_use: Default::default(), tail: VecDeque::new() })
    }

    /// A line for emerge.log only (e.g. which revision each repository is at).
    pub fn log_only(&mut self, line: &str) {
        if let Some(log) = &mut self.log {
            let _ = writeln!(log, "{line}");
        }
    }

    pub fn line(&mut self, line: &str, reporter: &dyn Reporter) {
        if let Some(log) = &mut self.log {
            let _ = writeln!(log, "{line}");
        }
        if self.echo {
            reporter.event(Event::Note { message: line.to_owned() });
        }
        if self.tail.len() == 30 {
            self.tail.pop_front();
        }
        self.tail.push_back(line.to_owned());
        match parse_line(line) {
            Some(EmergeLine::Emerging { n, m, cpv, binary }) => {
                if self.total != Some(m) {
                    reporter.event(Event::Start { task: self.task.clone(), label: self.label.clone(), total: Some(m), unit: Unit::Items });
                    self.total = Some(m);
                }
                let what = if binary { "installing binary" } else { "building" };
                if !binary {
                    self.from_source.insert(cpv.clone());
                }
                reporter.event(Event::Progress { task: self.task.clone(), position: n - 1, message: Some(format!("{what} {cpv}")) });
                self.current = Some((n, cpv.clone()));
                self.started.push(cpv);
            }
            Some(EmergeLine::Completed { n, cpv, .. }) => {
                reporter.event(Event::Progress { task: self.task.clone(), position: n, message: Some(format!("completed {cpv}")) });
                self.current = None;
                self.completed.insert(cpv);
            }
            Some(EmergeLine::Phase(phase)) => {
                if let Some((n, cpv)) = &self.current {
                    reporter.event(Event::Progress { task: self.task.clone(), position: n - 1, message: Some(format!("{cpv}: {phase}")) });
                }
            }
            None => {
                if let Some(p) = parse_merge_list_line(line) {
                    self.planned_use.insert(p.cpv, p.use_enabled);
                }
            }
        }
    }

    /// The packages built from source that completed, each with its enabled USE flags when the
    /// merge list showed them.
    pub fn built(&self) -> Vec<(String, Option<Vec<String>>)> {
        self.from_source
            .iter()
            .filter(|c| self.completed.contains(*c))
            .map(|c| (c.clone(), self.planned_use.get(c).cloned()))
            .collect()
    }

    /// Closes the log and ends the progress task; returns the packages that started but did not
    /// complete, and the last lines of output.
    pub fn finish(mut self, status: i64, reporter: &dyn Reporter) -> (Vec<String>, String) {
        self.log = None;
        if self.total.is_some() {
            reporter.event(Event::Finish { task: self.task.clone(), message: format!("emerge exited with status {status}") });
        }
        let unfinished = self.started.iter().filter(|c| !self.completed.contains(*c)).cloned().collect();
        (unfinished, Vec::from(self.tail).join("\n"))
    }
}

/// Copies a failed package's build log into the log directory and reports it.
pub fn failed_package(cpv: &str, build_log: Option<&Path>, log_dir: &Path, reporter: &dyn Reporter) -> FailedPackage {
    let local = cpv.split_once('/').map(|(cat, pf)| log_dir.join(format!("{cat}:{pf}.log")));
    let log = match (build_log, local) {
        (Some(src), Some(dst)) if std::fs::copy(src, &dst).is_ok() => Some(dst),
        _ => None,
    };
    let tail = log.as_deref().map(|p| crate::vm::tail_lines(p, 20)).unwrap_or_default();
    reporter.event(Event::Note {
        message: format!(
            "{cpv} failed to build; log: {}\n{tail}",
            log.as_deref().map_or_else(|| "(not found)".into(), |p| p.display().to_string())
        ),
    });
    FailedPackage { cpv: cpv.to_owned(), log, tail }
}

/// Runs an emerge command on the host, following it; returns the failed packages (with their
/// logs copied into `log_dir`), the exit status and the output's tail.
pub fn run_emerge(
    cmd: &Cmd,
    target: &str,
    log_dir: &Path,
    echo: bool,
    reporter: &dyn Reporter,
    build_log: impl Fn(&str) -> Option<PathBuf>,
) -> Result<(Vec<FailedPackage>, i32, String), BuildError> {
    let command = cmd.display();
    let mut follower = Follower::new(format!("build:{target}"), format!("emerge for {target}"), &log_dir.join("emerge.log"), &command, echo)?;
    reporter.event(Event::Note { message: format!("{target}: {command}") });
    let status = match cmd.run_lines(|_: crate::process::Stream, line| follower.line(line, reporter)) {
        Ok(()) => 0,
        Err(crate::process::ProcessError::Failed { termination: crate::process::Termination::Code(code), .. }) => code,
        Err(e) => return Err(e.into()),
    };
    let (unfinished, tail) = follower.finish(i64::from(status), reporter);
    let failed = unfinished
        .iter()
        .map(|cpv| {
            let src = build_log(cpv).filter(|p| p.is_file());
            failed_package(cpv, src.as_deref(), log_dir, reporter)
        })
        .collect();
    Ok((failed, status, tail))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_list_lines_name_the_package_and_its_use() {
        let p = parse_merge_list_line("[ebuild  N     ] dbh-test/hello-1.1::dbh-test  USE=\"-debug* nls% (static)\" 0 KiB").unwrap();
        assert_eq!(p, Planned { binary: false, cpv: "dbh-test/hello-1.1".into(), use_enabled: vec!["nls".into(), "static".into()] });
        let p = parse_merge_list_line("[binary   R    ] dbh-test/greeter-1.0-1::dbh-test  0 KiB").unwrap();
        assert!(p.binary && p.use_enabled.is_empty());
        assert_eq!(parse_merge_list_line(">>> Emerging (1 of 2) a/b-1"), None);
        assert_eq!(parse_merge_list_line("[blocks B      ] a/b"), None);
    }

    #[test]
    fn emerge_progress_lines_are_parsed() {
        assert_eq!(
            parse_line(">>> Emerging (1 of 2) dbh-test/hello-1.0::dbh-test"),
            Some(EmergeLine::Emerging { n: 1, m: 2, cpv: "dbh-test/hello-1.0".into(), binary: false })
        );
        assert_eq!(
            parse_line(">>> Emerging binary (2 of 3) dbh-test/greeter-1.0-r1::dbh-test"),
            Some(EmergeLine::Emerging { n: 2, m: 3, cpv: "dbh-test/greeter-1.0-r1".into(), binary: true })
        );
        assert_eq!(
            parse_line(">>> Completed (2 of 2) dbh-test/greeter-1.0::dbh-test"),
            Some(EmergeLine::Completed { n: 2, m: 2, cpv: "dbh-test/greeter-1.0".into() })
        );
        assert_eq!(parse_line(">>> Emerging (1 of 2) to /"), None);
        assert_eq!(parse_line(" * Emerging (1 of 2) x/y"), None);
        assert_eq!(parse_line(">>> Jobs: 1 of 2 complete"), None);
    }

    /// emerge's output as captured from the arm64 test guest building greeter and hello.
    #[test]
    fn a_real_emerge_run_gives_packages_and_phases_in_order() {
        let log = include_str!("../../tests/fixtures/emerge/build-hello-greeter.log");
        let mut seen = Vec::new();
        let mut current = String::new();
        for line in log.lines() {
            match parse_line(line) {
                Some(EmergeLine::Emerging { n, m, cpv, binary }) => {
                    assert!(!binary);
                    seen.push(format!("{n}/{m} {cpv}"));
                    current = cpv;
                }
                Some(EmergeLine::Phase(p)) => seen.push(format!("{current}: {p}")),
                Some(EmergeLine::Completed { n, cpv, .. }) => seen.push(format!("done {n} {cpv}")),
                None => {}
            }
        }
        let h = "dbh-test/hello-1.0";
        let g = "dbh-test/greeter-1.0";
        let expected = [
            format!("1/2 {h}"),
            format!("{h}: unpacking"),
            format!("{h}: preparing"),
            format!("{h}: configuring"),
            format!("{h}: compiling"),
            format!("{h}: testing"),
            format!("{h}: installing into the image"),
            format!("{h}: checking the image"),
            format!("{h}: creating the binpkg"),
            format!("{h}: merging"),
            format!("done 1 {h}"),
            format!("2/2 {g}"),
            format!("{g}: installing into the image"),
            format!("{g}: checking the image"),
            format!("{g}: creating the binpkg"),
            format!("{g}: merging"),
            format!("done 2 {g}"),
        ];
        assert_eq!(seen, expected);
    }

    /// The same packages installed from the seeded binhost (`@dbh-world`, nothing to build).
    #[test]
    fn a_real_binary_emerge_run_is_followed_too() {
        let log = include_str!("../../tests/fixtures/emerge/binary-hello-greeter.log");
        let seen: Vec<EmergeLine> = log.lines().filter_map(parse_line).collect();
        let cpv = |s: &str| s.to_owned();
        assert_eq!(
            seen,
            [
                EmergeLine::Emerging { n: 1, m: 2, cpv: cpv("dbh-test/hello-1.0"), binary: true },
                EmergeLine::Phase("extracting the binpkg"),
                EmergeLine::Phase("extracting the binpkg"),
                EmergeLine::Phase("merging"),
                EmergeLine::Completed { n: 1, m: 2, cpv: cpv("dbh-test/hello-1.0") },
                EmergeLine::Emerging { n: 2, m: 2, cpv: cpv("dbh-test/greeter-1.0"), binary: true },
                EmergeLine::Phase("extracting the binpkg"),
                EmergeLine::Phase("extracting the binpkg"),
                EmergeLine::Phase("merging"),
                EmergeLine::Completed { n: 2, m: 2, cpv: cpv("dbh-test/greeter-1.0") },
            ]
        );
    }

    #[test]
    fn follower_knows_what_did_not_complete() {
        let dir = tempfile::tempdir().unwrap();
        let events = crate::events::Collector::default();
        let mut f = Follower::new("t".into(), "emerge".into(), &dir.path().join("emerge.log"), "emerge x", false).unwrap();
        for l in [">>> Emerging (1 of 2) a/b-1::r", ">>> Completed (1 of 2) a/b-1::r", ">>> Emerging (2 of 2) a/c-1::r", "boom"] {
            f.line(l, &events);
        }
        let (failed, tail) = f.finish(1, &events);
        assert_eq!(failed, ["a/c-1"]);
        assert!(tail.ends_with("boom"));
        let log = std::fs::read_to_string(dir.path().join("emerge.log")).unwrap();
        assert!(log.starts_with("# emerge x\n>>> Emerging"), "{log}");
    }
}
