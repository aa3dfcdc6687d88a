//! The command line itself: help text, usage errors, settings display, targets.

use std::process::Command;

pub fn dbh() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dbh"))
}

fn run(args: &[&str]) -> (i32, String, String) {
    let home = tempfile::tempdir().unwrap();
    let out = dbh().arg("--home").arg(home.path()).args(args).env_remove("DBH_HOME").output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_lists_the_contract_commands() {
    let (code, stdout, _) = run(&["--help"]);
    assert_eq!(code, 0);
    for cmd in ["targets", "binhost", "key", "serve", "uki", "vm", "cross", "build", "rootfs", "config"] {
        assert!(stdout.contains(&format!("  {cmd} ")), "`{cmd}` missing from --help:\n{stdout}");
    }
}

#[test]
fn usage_error_exits_2_and_names_the_argument() {
    // 2 like clap and most Unix tools; 1 is for errors of a command that did run.
    let (code, _, stderr) = run(&["binhost", "index"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("<DIR>"), "{stderr}");
}

#[test]
fn targets_json_has_every_builtin_fact() {
    let (code, stdout, _) = run(&["targets", "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let arm = v.as_array().unwrap().iter().find(|t| t["name"] == "arm64").unwrap();
    assert_eq!(arm["chost"], "aarch64-unknown-linux-gnu");
    assert_eq!(arm["qemu"]["binary"], "qemu-system-aarch64");
    assert_eq!(arm["boot"]["kind"], "uefi");
}

#[test]
fn config_show_names_origins() {
    let home = tempfile::tempdir().unwrap();
    let out = dbh()
        .args(["--home"])
        .arg(home.path())
        .args(["config", "show"])
        .env("DBH_SERVE_PUBLIC_URL", "http://binhost.example:8080/")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("# from: command line (--home)"), "{text}");
    assert!(text.contains("# from: environment (DBH_SERVE_PUBLIC_URL)\nserve.public_url = \"http://binhost.example:8080/\""), "{text}");
}

/// A flag that is also a setting is checked where settings are, once, before anything runs: an
/// out-of-range `--jobs` (or `DBH_BUILD_JOBS`) is refused naming the flag or variable, not
/// clamped at one call site and passed through at another.
#[test]
fn out_of_range_settings_are_refused_naming_their_origin() {
    for backend in ["vm", "cross", "chroot", "auto"] {
        let (code, _, stderr) = run(&["build", "--backend", backend, "--target", "arm64", "--jobs", "0", "app-misc/hello"]);
        assert_eq!(code, 1, "{backend}: {stderr}");
        assert!(
            stderr.contains("error: setting `build.jobs` from command line (--jobs) is 0, out of range: expected an integer from 1 to 1024"),
            "{backend}: {stderr}"
        );
    }
    let (code, _, stderr) = run(&["vm", "build", "--target", "arm64", "--jobs", "5000"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("(--jobs) is 5000, out of range"), "{stderr}");
    let home = tempfile::tempdir().unwrap();
    let out = dbh()
        .arg("--home")
        .arg(home.path())
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("DBH_SERVE_HEADER_TIMEOUT", "0")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("`serve.header_timeout` from environment (DBH_SERVE_HEADER_TIMEOUT) is 0"), "{stderr}");
    // A flag that is a setting beats its environment variable: --uid over DBH_KEY_UID.
    let out = dbh()
        .arg("--home")
        .arg(home.path())
        .args(["key", "generate", "--uid", "Test binhost <t@example.org>"])
        .env("DBH_KEY_UID", "from the environment")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let key = std::fs::read_to_string(home.path().join("keys/public.asc")).unwrap_or_default();
    assert!(!key.is_empty(), "no public key written");
    let listed = std::process::Command::new("gpg")
        .args(["--show-keys", "--with-colons"])
        .arg(home.path().join("keys/public.asc"))
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.contains("Test binhost <t@example.org>"), "--uid wins over DBH_KEY_UID:\n{listed}");
}

/// `--help` of every command group is part of the user interface: changes show up in review.
#[test]
fn help_texts_snapshot() {
    for args in [
        &["--help"][..],
        &["binhost", "--help"],
        &["binhost", "add", "--help"],
        &["serve", "--help"],
        &["vm", "--help"],
        &["vm", "image", "create", "--help"],
        &["uki", "build", "--help"],
        &["rootfs", "build", "--help"],
    ] {
        let out = dbh().args(args).env("COLUMNS", "100").output().unwrap();
        assert!(out.status.success());
        let name = format!("help_{}", args[..args.len() - 1].join("_"));
        insta::assert_snapshot!(name, String::from_utf8_lossy(&out.stdout));
    }
}

/// Error output: the message names the thing, the hint says the fix.
#[test]
fn error_output_snapshot() {
    let (code, _, stderr) = run(&["binhost", "conf", "--target", "sparc", "--url", "http://h/"]);
    assert_eq!(code, 1);
    insta::assert_snapshot!("error_unknown_target", stderr);
    let home = tempfile::tempdir().unwrap();
    let out = dbh().arg("--home").arg(home.path()).args(["key", "export"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr).replace(&*home.path().to_string_lossy(), "$DBH_HOME");
    insta::assert_snapshot!("error_no_key", stderr);
}
