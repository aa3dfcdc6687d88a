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
