//! distcc offload (`dbh vm build --distcc`) on the arm64 TCG guest with the host's real distccd and
//! Debian's aarch64 cross gcc. One test, two guest boots, one $DBH_HOME:
//! 1. the daemon program is missing (setting `distcc.distccd` points nowhere): `dbh-test/hello`
//!    still builds, in the guest alone, and the warning is printed exactly once;
//! 2. `dbh-test/manyc` (40 generated units, built with make's bare `cc`): published; the host
//!    distccd's log shows the units compiled as `aarch64-unknown-linux-gnu-gcc` (the guest's `cc`
//!    wrapper sent the CHOST name, the private whitelist mapped it to the Debian cross gcc); the
//!    binpkg's `manyc` is AArch64, and it printed the right checksum when the guest ran it
//!    (FEATURES=test runs it in src_test); no distccd and no QEMU is left.

use std::io::Read as _;
use std::path::Path;
use std::process::Output;

use super::cli::dbh;
use super::portage::{combined, fixture_repo};
use super::vm::{assert_no_qemu, product_home};

/// What every correct compiler makes `manyc` print for 40 units (wrapping unsigned arithmetic).
const MANYC_40: &str = "manyc: 40 units, checksum 0ae52f00f457fe89";

fn run(home: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = dbh();
    cmd.arg("--home").arg(home).args(args).env("XDG_CONFIG_HOME", home);
    for (k, _) in std::env::vars() {
        if k.starts_with("DBH_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied());
    cmd.output().unwrap()
}

fn build(home: &Path, atom: &str, env: &[(&str, &str)]) -> Output {
    let repo = fixture_repo();
    let args = ["vm", "build", "--target", "arm64", "--distcc", "--repo", repo.to_str().unwrap(), "--profile", "dbh-test:dbh/arm64", atom];
    let out = run(home, &args, env);
    eprintln!("dbh vm build --distcc {atom}: {}\n{}", out.status, combined(&out));
    out
}

fn have(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
}

/// The newest `logs/arm64/<timestamp>` directory.
fn last_log_dir(home: &Path) -> std::path::PathBuf {
    let mut dirs: Vec<_> = std::fs::read_dir(home.join("logs/arm64")).unwrap().flatten().map(|e| e.path()).collect();
    dirs.sort();
    dirs.pop().expect("a build log directory")
}

/// Processes whose command line contains `needle`.
fn processes_with(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if entry.file_name().to_string_lossy().parse::<u32>().is_err() {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) {
            found.push(cmdline);
        }
    }
    found
}

/// The bytes of `member` (e.g. `usr/bin/manyc`) in a GPKG's image archive.
fn gpkg_file(gpkg: &Path, member: &str) -> Vec<u8> {
    let mut outer = tar::Archive::new(std::fs::File::open(gpkg).unwrap());
    for entry in outer.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = entry.path().unwrap().to_string_lossy().into_owned();
        let Some(ext) = name.split_once("/image.tar").map(|(_, e)| e.to_owned()) else { continue };
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        let plain: Box<dyn std::io::Read> = match ext.as_str() {
            ".zst" => Box::new(zstd::Decoder::new(&data[..]).unwrap()),
            ".xz" => Box::new(xz2::read::XzDecoder::new(&data[..])),
            ".bz2" => Box::new(bzip2::read::BzDecoder::new(&data[..])),
            ".gz" => Box::new(flate2::read::GzDecoder::new(&data[..])),
            "" => Box::new(&data[..]),
            other => panic!("unexpected image compression {other} in {}", gpkg.display()),
        };
        let mut inner = tar::Archive::new(plain);
        for e in inner.entries().unwrap() {
            let mut e = e.unwrap();
            if e.path().unwrap().to_string_lossy().ends_with(member) {
                let mut out = Vec::new();
                e.read_to_end(&mut out).unwrap();
                return out;
            }
        }
    }
    panic!("{member} not found in {}", gpkg.display());
}

#[test]
fn distcc_offload_compiles_on_the_host_and_falls_back_when_distccd_is_missing() {
    if super::image::image_home("arm64").is_none() {
        return;
    }
    if !have("distccd") || !have("aarch64-linux-gnu-gcc") {
        panic!("distcc and gcc-aarch64-linux-gnu must be installed (tests/setup-host.sh)");
    }
    let home = product_home(None);
    let home = home.path();
    let key = run(home, &["key", "generate"], &[]);
    assert!(key.status.success(), "{}", combined(&key));

    // 1. No distccd: the build goes on in the guest and says so once.
    let out = build(home, "dbh-test/hello", &[("DBH_DISTCC_DISTCCD", "/nonexistent/distccd")]);
    let text = combined(&out);
    assert!(out.status.success(), "{text}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("published dbh-test/hello-1.0"), "{text}");
    assert_eq!(text.matches("warning: distcc offload").count(), 1, "one warning:\n{text}");
    assert!(text.contains("`/nonexistent/distccd` is not installed on this host"), "{text}");
    assert!(text.contains("building in the guest alone"), "{text}");
    assert_no_qemu(home);

    // 2. The compile-heavy package, offloaded; src_test runs the AArch64 binary in the guest.
    let conf = home.join("targets/arm64/portage/make.conf");
    let mut make_conf = std::fs::read_to_string(&conf).unwrap();
    make_conf.push_str("FEATURES=\"test\"\n");
    std::fs::write(&conf, make_conf).unwrap();
    let started = std::time::Instant::now();
    let out = build(home, "dbh-test/manyc", &[]);
    eprintln!("the offloaded manyc build took {:?}", started.elapsed());
    let text = combined(&out);
    assert!(out.status.success(), "{text}");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(stdout.contains("published dbh-test/manyc-1.0"), "{text}");
    assert!(!text.contains("warning: distcc offload"), "{text}");

    let port = text
        .split("distccd on 127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("the daemon's port is reported")
        .to_owned();
    assert!(processes_with(&format!("--port {port}")).is_empty(), "distccd left running: {:?}", processes_with("distccd"));
    assert_no_qemu(home);

    let logs = last_log_dir(home);
    let log = std::fs::read_to_string(logs.join("distccd.log")).unwrap();
    let units: std::collections::BTreeSet<&str> = log
        .lines()
        .filter(|l| l.contains(" COMPILE_OK ") && l.contains("aarch64-unknown-linux-gnu-gcc"))
        .filter_map(|l| l.split_whitespace().last())
        .filter(|f| f.starts_with('u') && f.ends_with(".c"))
        .collect();
    assert!(units.len() >= 36, "most of the 40 units must compile on the host, got {}:\n{log}", units.len());
    assert!(text.contains("distccd ran ") && text.contains("compile job(s) for the guest"), "{text}");

    let emerge_log = std::fs::read_to_string(logs.join("emerge.log")).unwrap();
    assert!(emerge_log.contains(MANYC_40), "manyc ran in the guest with the right output:\n{}", emerge_log.lines().rev().take(40).collect::<Vec<_>>().join("\n"));

    let path = stdout
        .lines()
        .find(|l| l.starts_with("published dbh-test/manyc-1.0"))
        .and_then(|l| l.rsplit(" as ").next())
        .unwrap()
        .trim()
        .to_owned();
    let elf = gpkg_file(&home.join("binhost/arm64").join(path), "usr/bin/manyc");
    assert_eq!(&elf[..4], b"\x7fELF");
    assert_eq!(u16::from_le_bytes([elf[18], elf[19]]), 183, "manyc must be an AArch64 ELF");
}
