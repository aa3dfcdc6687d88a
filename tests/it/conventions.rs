//! What Gentoo and CLI users expect of a command-line tool: shell completions and a man page
//! generated from the parser, `--json` carrying the same facts as the human output, colour only
//! where wanted (NO_COLOR, `--color`), and no `./dbh.toml` read as root.

use std::path::Path;
use std::process::{Command, Output};

use super::cli::dbh;

fn run_in(home: &Path, args: &[&str]) -> Output {
    dbh().arg("--home").arg(home).args(args).env_remove("DBH_HOME").env_remove("NO_COLOR").output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn bash_completion_offers_subcommands_and_zsh_fish_generate() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_in(dir.path(), &["completions", "bash"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let script = dir.path().join("dbh.bash");
    std::fs::write(&script, &out.stdout).unwrap();
    // What bash's programmable completion does for `dbh vm b<TAB>`: call the function the
    // script registered with `complete -F`, with COMP_WORDS/COMP_CWORD set.
    let complete = |line: &str| {
        let words: Vec<&str> = line.split(' ').collect();
        let prog = format!(
            "source {script}; fn=$(complete -p dbh | sed -n 's/.*-F \\([^ ]*\\).*/\\1/p'); [ -n \"$fn\" ] || exit 3; \
             COMP_WORDS=({words}); COMP_CWORD={cword}; COMP_LINE='{line}'; COMP_POINT=${{#COMP_LINE}}; \
             \"$fn\" dbh '{cur}' '{prev}'; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            script = script.display(),
            words = words.iter().map(|w| format!("'{w}'")).collect::<Vec<_>>().join(" "),
            cword = words.len() - 1,
            cur = words[words.len() - 1],
            prev = words[words.len() - 2],
        );
        let o = Command::new("bash").arg("--norc").arg("-c").arg(&prog).output().unwrap();
        assert!(o.status.success(), "bash completion failed: {}", text(&o.stderr));
        text(&o.stdout).lines().map(|l| l.trim().to_owned()).collect::<Vec<_>>()
    };
    let offered = complete("dbh vm b");
    assert_eq!(offered, ["build"], "dbh vm b<TAB>");
    let offered = complete("dbh vm image c");
    assert_eq!(offered, ["create"], "dbh vm image c<TAB>");
    let offered = complete("dbh vm image create --ins");
    assert!(offered.contains(&"--insecure-no-signature".to_owned()), "{offered:?}");

    // clap_complete's fish script stops at two levels of subcommands (no `vm image create` flags).
    for (shell, deep) in [("zsh", true), ("fish", false)] {
        let out = run_in(dir.path(), &["completions", shell]);
        assert!(out.status.success(), "{shell}: {}", text(&out.stderr));
        let s = text(&out.stdout);
        assert!(s.contains("build") && s.contains("completions") && (s.contains("--json") || s.contains("-l json")), "{shell}: {s}");
        assert!(!deep || s.contains("insecure-no-signature"), "{shell}: {s}");
    }
    let bad = run_in(dir.path(), &["completions", "tcsh"]);
    assert_eq!(bad.status.code(), Some(2), "an unknown shell is a usage error");
}

#[test]
fn man_page_renders_with_man() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_in(dir.path(), &["man"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(out.stdout.starts_with(b".ie"), "roff: {}", &text(&out.stdout)[..80.min(out.stdout.len())]);
    let page = dir.path().join("dbh.1");
    std::fs::write(&page, &out.stdout).unwrap();
    let man = Command::new("man").arg("-l").arg(&page).env("MANPAGER", "cat").env("MANWIDTH", "100").env("LC_ALL", "C.UTF-8").output();
    let Ok(man) = man else { return super::skip("man(1) is not installed (apt-get install man-db)") };
    let rendered = text(&man.stdout);
    assert!(man.status.success(), "man -l: {}", text(&man.stderr));
    assert!(rendered.contains("NAME") && rendered.contains("build, sign and serve Gentoo binary packages"), "{rendered}");
    assert!(rendered.contains("SUBCOMMANDS") && rendered.contains("completions") && rendered.contains("rootfs"), "{rendered}");
    assert!(!rendered.contains(".TH"), "roff was not interpreted: {rendered}");

    // One page per subcommand, for the ebuild's doman.
    let pages = dir.path().join("pages");
    let out = run_in(dir.path(), &["man", "--dir", &pages.to_string_lossy()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for p in ["dbh.1", "dbh-vm.1", "dbh-vm-build.1", "dbh-vm-image-create.1", "dbh-serve.1"] {
        assert!(pages.join(p).is_file(), "{p} missing");
    }
    let man = Command::new("man").arg("-l").arg(pages.join("dbh-vm-image-create.1")).env("MANPAGER", "cat").output().unwrap();
    assert!(text(&man.stdout).contains("insecure-no-signature"), "{}", text(&man.stdout));
}

#[test]
fn json_outputs_parse_and_match_the_text() {
    let home = tempfile::tempdir().unwrap();
    // vm status, no guest running.
    let human = run_in(home.path(), &["vm", "status", "--target", "arm64"]);
    let json = run_in(home.path(), &["vm", "status", "--target", "arm64", "--json"]);
    assert!(human.status.success() && json.status.success(), "{}{}", text(&human.stderr), text(&json.stderr));
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(text(&human.stdout), "arm64: not running\n");
    assert_eq!(v, serde_json::json!({ "target": "arm64", "running": false }));

    // binhost check: a consistent binhost, then one with a stray package and no index.
    let bh = home.path().join("bh");
    std::fs::create_dir_all(&bh).unwrap();
    assert!(run_in(home.path(), &["binhost", "index", &bh.to_string_lossy()]).status.success());
    let ok = run_in(home.path(), &["binhost", "check", &bh.to_string_lossy(), "--json"]);
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    let v: serde_json::Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(v["consistent"], true);
    assert_eq!(v["problems"], serde_json::json!([]));
    std::fs::remove_file(bh.join("Packages")).unwrap();
    std::fs::create_dir_all(bh.join("app-misc/stray")).unwrap();
    std::fs::write(bh.join("app-misc/stray/stray-1.0-1.gpkg.tar"), b"not a package").unwrap();
    let human = run_in(home.path(), &["binhost", "check", &bh.to_string_lossy()]);
    let json = run_in(home.path(), &["binhost", "check", &bh.to_string_lossy(), "--json"]);
    assert_eq!(human.status.code(), Some(1));
    assert_eq!(json.status.code(), Some(1), "--json keeps the exit status");
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["consistent"], false);
    let from_json: Vec<String> = v["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| format!("{}: {}", p["path"].as_str().unwrap(), p["message"].as_str().unwrap()))
        .collect();
    let from_text: Vec<String> = text(&human.stdout).lines().map(str::to_owned).collect();
    assert!(!from_text.is_empty());
    assert_eq!(from_json, from_text);

    // config show: every `key = value` of the text is a setting in the JSON, with its origin.
    let human = run_in(home.path(), &["config", "show"]);
    let json = run_in(home.path(), &["config", "show", "--json"]);
    assert!(human.status.success() && json.status.success());
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let settings = v["settings"].as_array().unwrap();
    let lines: Vec<&str> = text(&human.stdout).leak().lines().collect();
    let mut seen = 0;
    for (i, line) in lines.iter().enumerate() {
        // Comments (a setting's doc may show an example `key = value`) are not settings.
        if line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.split_once(" = ") else { continue };
        let s = settings.iter().find(|s| s["key"] == key).unwrap_or_else(|| panic!("{key} not in the JSON"));
        let toml_value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {value}")).unwrap().remove("v").unwrap();
        assert_eq!(s["value"], serde_json::to_value(toml_value).unwrap(), "{key}");
        assert_eq!(lines[i - 1], format!("# from: {}", s["from"].as_str().unwrap()), "{key}");
        seen += 1;
    }
    assert_eq!(seen, settings.len());
    let home_setting = settings.iter().find(|s| s["key"] == "home").unwrap();
    assert_eq!(home_setting["value"], home.path().to_string_lossy().as_ref());
    assert_eq!(home_setting["from"], "command line (--home)");
}

/// Runs `dbh ARGS` under a pseudo-terminal (script(1)), so stderr is a terminal; returns what the
/// terminal got.
fn under_pty(home: &Path, args: &str, env: &[(&str, &str)]) -> String {
    let cmd = format!("{} --home {} {args}", env!("CARGO_BIN_EXE_dbh"), home.display());
    let out = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .env_remove("NO_COLOR")
        .env_remove("RUST_LOG")
        .env_remove("DBH_HOME")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    text(&out.stdout)
}

#[test]
fn no_color_and_color_flag_under_a_terminal() {
    let home = tempfile::tempdir().unwrap();
    let bh = home.path().join("bh");
    std::fs::create_dir_all(&bh).unwrap();
    // -vv logs debug lines through tracing: coloured level names on a terminal by default.
    let args = format!("-vv binhost index {}", bh.display());
    let plain_check = |s: &str| !s.contains('\x1b');
    let coloured = under_pty(home.path(), &args, &[]);
    assert!(coloured.contains("DEBUG") || coloured.contains("INFO"), "no log lines to look at: {coloured:?}");
    assert!(!plain_check(&coloured), "a terminal gets colour by default: {coloured:?}");
    let no_color = under_pty(home.path(), &args, &[("NO_COLOR", "1")]);
    assert!(no_color.contains("DEBUG") || no_color.contains("INFO"), "{no_color:?}");
    assert!(plain_check(&no_color), "NO_COLOR=1 still coloured: {no_color:?}");
    // An empty NO_COLOR does not count (no-color.org).
    assert!(!plain_check(&under_pty(home.path(), &args, &[("NO_COLOR", "")])));
    // --color never / always beat the terminal and NO_COLOR.
    assert!(plain_check(&under_pty(home.path(), &format!("--color never {args}"), &[])));
    assert!(!plain_check(&under_pty(home.path(), &format!("--color always {args}"), &[("NO_COLOR", "1")])));
    // Not a terminal: plain, unless asked.
    let piped = dbh().args(["--home", &home.path().to_string_lossy(), "-vv", "binhost", "index", &bh.to_string_lossy()]).output().unwrap();
    assert!(plain_check(&text(&piped.stderr)), "{}", text(&piped.stderr));
    let forced = dbh().args(["--home", &home.path().to_string_lossy(), "--color", "always", "-vv", "binhost", "index", &bh.to_string_lossy()]).output().unwrap();
    assert!(!plain_check(&text(&forced.stderr)), "{}", text(&forced.stderr));
}

#[test]
fn working_directory_dbh_toml_is_ignored_as_root_only() {
    let cwd = tempfile::tempdir().unwrap();
    std::fs::write(cwd.path().join("dbh.toml"), "[build]\njobs = 77\n").unwrap();
    let home = tempfile::tempdir().unwrap();
    let out = dbh()
        .current_dir(cwd.path())
        .args(["--home", &home.path().to_string_lossy(), "config", "show", "--json"])
        .env("XDG_CONFIG_HOME", home.path().join("no-config"))
        .env_remove("DBH_BUILD_JOBS")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let jobs = v["settings"].as_array().unwrap().iter().find(|s| s["key"] == "build.jobs").cloned().unwrap_or_default();
    if nix_is_root() {
        assert_ne!(jobs["value"], 77, "root read ./dbh.toml: {jobs}");
        assert!(!jobs["from"].as_str().unwrap_or("").contains("dbh.toml"), "{jobs}");
    } else {
        assert_eq!(jobs["value"], 77, "a user's ./dbh.toml is a layer: {jobs}");
    }
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
