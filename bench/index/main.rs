//! Benchmark of the binhost index: `cargo bench --bench index` (env `DBH_BENCH_N`, default 10 000).
//!
//! Generates N small but valid GPKGs (GLEP 78: `gpkg-1`, zstd metadata and image, a Manifest with
//! BLAKE2B + SHA512; varied CATEGORY/PF/BUILD_ID) in the multi-instance layout, then times in one
//! run:
//! 1. `dbh binhost index` cold (no Packages yet),
//! 2. real Portage's `emaint binhost --fix` on the same directory with the index removed (Portage
//!    from the test venv, PKGDIR = that directory) — and checks that every one of its entries
//!    equals ours,
//! 3. `dbh binhost index` again with nothing changed (incremental no-op),
//! 4. `dbh binhost add --unsigned` of one more package into the N-package binhost,
//! 5. `dbh binhost rm` of that package again (both record a generation and re-compress only the
//!    changed gzip member of Packages.gz).
//!
//! Steps 1, 4 and 5 run `DBH_BENCH_ROUNDS` times (default 5; the cold index at most 3, each
//! from scratch) and the medians count. Prints the times and the ratios against the targets
//! (full index ≥ 20× faster than emaint, incremental add and rm each ≤ 1 % of a full index's
//! CPU time; wall time is printed too, it moves with the machine's load). `DBH_BENCH_SKIP_EMAINT=1` skips step 2,
//! `DBH_BENCH_KEEP=1` keeps the generated binhost.
#![allow(clippy::unwrap_used, reason = "a benchmark program: a failed step aborts the run")]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use blake2::Digest as _;

const CHOST: &str = "x86_64-pc-linux-gnu";

fn main() {
    let n: usize = std::env::var("DBH_BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let dbh = PathBuf::from(env!("CARGO_BIN_EXE_dbh"));
    let work = tempfile::Builder::new().prefix("dbh-bench-index-").tempdir().expect("tempdir");
    let home = work.path().join("home");
    let dir = home.join("binhost/amd64");
    std::fs::create_dir_all(&dir).unwrap();

    let t = Instant::now();
    for i in 0..n {
        let (cat, pn, pf) = names(i);
        let rel = format!("{cat}/{pn}/{pf}-1.gpkg.tar");
        let path = dir.join(&rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, gpkg(&cat, &pf, 1, i)).unwrap();
    }
    let extra = work.path().join("extra-9.9-1.gpkg.tar");
    std::fs::write(&extra, gpkg("bench-extra", "extra-9.9", 1, n)).unwrap();
    println!("generated {n} GPKGs in {:.1} s under {}", t.elapsed().as_secs_f64(), dir.display());

    let rounds: usize = std::env::var("DBH_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(5).max(1);
    // The full index, cold each time: what add and rm are measured against.
    let mut colds = Vec::new();
    for _ in 0..rounds.min(3) {
        for f in ["Packages", "Packages.gz"] {
            let _ = std::fs::remove_file(dir.join(f));
        }
        let _ = std::fs::remove_dir_all(dir.join(".dbh-generations"));
        colds.push(time("dbh binhost index (cold)", || run(Command::new(&dbh).args(["-q", "binhost", "index"]).arg(&dir))));
    }
    let cold = median(&colds);
    let ours = std::fs::read_to_string(dir.join("Packages")).unwrap();

    let emaint = if std::env::var_os("DBH_BENCH_SKIP_EMAINT").is_some() { None } else { emaint_fix(work.path(), &dir) };
    if emaint.is_some() {
        let theirs = std::fs::read_to_string(dir.join("Packages")).unwrap();
        let (a, b) = (entries(&ours), entries(&theirs));
        assert_eq!(a.len(), n, "dbh indexed {} of {n} packages", a.len());
        assert_eq!(a, b, "dbh's entries differ from emaint's");
        println!("all {n} entries are identical to emaint's");
    }
    let noop = time("dbh binhost index (nothing changed)", || run(Command::new(&dbh).args(["-q", "binhost", "index"]).arg(&dir)));
    // add and rm of one package, `rounds` times each, interleaved; medians count (the machine
    // may be shared: one slow run must not decide).
    let (mut adds, mut rms) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        adds.push(time("dbh binhost add --unsigned (1 package)", || {
            run(Command::new(&dbh)
                .arg("--home")
                .arg(&home)
                .args(["-q", "binhost", "add", "--target", "amd64", "--unsigned"])
                .arg(&extra))
        }));
        let check = std::fs::read_to_string(dir.join("Packages")).unwrap();
        assert!(check.contains("CPV: bench-extra/extra-9.9\n"), "the added package is not indexed");
        rms.push(time("dbh binhost rm (1 package)", || {
            run(Command::new(&dbh)
                .arg("--home")
                .arg(&home)
                .args(["-q", "binhost", "rm", "--target", "amd64", "bench-extra/extra-9.9"]))
        }));
        let check = std::fs::read_to_string(dir.join("Packages")).unwrap();
        assert!(!check.contains("CPV: bench-extra/extra-9.9\n"), "the removed package is still indexed");
    }
    let (add, rm) = (median(&adds), median(&rms));
    let check = std::fs::read_to_string(dir.join("Packages")).unwrap();
    let gz = {
        use std::io::Read;
        let mut s = String::new();
        flate2::read::MultiGzDecoder::new(std::fs::File::open(dir.join("Packages.gz")).unwrap()).read_to_string(&mut s).unwrap();
        s
    };
    assert_eq!(gz, check, "Packages.gz does not decompress to Packages");

    if std::env::var_os("DBH_BENCH_KEEP").is_some() {
        println!("keeping {}", work.keep().display());
    }
    println!();
    println!("results for {n} packages (medians of {} full index runs and {rounds} add/rm runs):", colds.len());
    println!("  (load average now: {})", std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim());
    println!("                            wall        CPU");
    println!("  dbh index, cold:        {:>7.3} s  {:>7.3} s", cold.wall, cold.cpu);
    if let Some(e) = emaint {
        let (rw, rc) = (e.wall / cold.wall, e.cpu / cold.cpu);
        println!(
            "  emaint binhost --fix:   {:>7.3} s  {:>7.3} s   dbh is {rw:.1}x (wall) / {rc:.1}x (CPU) faster (target >= 20x: {})",
            e.wall, e.cpu, verdict(rw >= 20.0 && rc >= 20.0)
        );
    }
    println!("  dbh index, no change:   {:>7.3} s  {:>7.3} s", noop.wall, noop.cpu);
    let (pw, pc) = (100.0 * add.wall / cold.wall, 100.0 * add.cpu / cold.cpu);
    println!(
        "  dbh add, 1 package:     {:>7.3} s  {:>7.3} s   {pw:.2} % (wall) / {pc:.2} % (CPU) of a full index (target: CPU <= 1 %: {})",
        add.wall, add.cpu, verdict(pc <= 1.0)
    );
    let (rw, rc) = (100.0 * rm.wall / cold.wall, 100.0 * rm.cpu / cold.cpu);
    println!(
        "  dbh rm, 1 package:      {:>7.3} s  {:>7.3} s   {rw:.2} % (wall) / {rc:.2} % (CPU) of a full index (target: CPU <= 1 %: {})",
        rm.wall, rm.cpu, verdict(rc <= 1.0)
    );
}

/// The median of wall and of CPU time, each on its own.
fn median(runs: &[Took]) -> Took {
    let mid = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Took { wall: mid(runs.iter().map(|t| t.wall).collect()), cpu: mid(runs.iter().map(|t| t.cpu).collect()) }
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

/// Wall time and CPU time (user + system of the children), so that results on a loaded machine
/// can still be compared.
#[derive(Clone, Copy)]
struct Took {
    wall: f64,
    cpu: f64,
}

fn children_cpu() -> f64 {
    // SAFETY: rusage is plain old data (integers and timevals); all zeroes is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct we own.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn time(label: &str, f: impl FnOnce()) -> Took {
    let (t, c) = (Instant::now(), children_cpu());
    f();
    let took = Took { wall: t.elapsed().as_secs_f64(), cpu: children_cpu() - c };
    println!("{label}: {:.3} s wall, {:.3} s CPU", took.wall, took.cpu);
    took
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("spawn");
    assert!(out.status.success(), "{cmd:?} failed:\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

/// Package i: 100 packages per category.
fn names(i: usize) -> (String, String, String) {
    let cat = format!("bench-cat{:03}", i / 100);
    let pn = format!("pkg{:05}", i);
    let pf = format!("{pn}-1.{}", i % 7);
    (cat, pn, pf)
}

/// Package stanzas of an index without the header, for comparing indexes.
fn entries(index: &str) -> Vec<String> {
    index.split("\n\n").skip(1).filter(|s| !s.trim().is_empty()).map(str::to_owned).collect()
}

fn tar_append(builder: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) {
    let mut h = tar::Header::new_ustar();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_mtime(1_700_000_000);
    h.set_uid(0);
    h.set_gid(0);
    h.set_entry_type(tar::EntryType::Regular);
    builder.append_data(&mut h, name, data).unwrap();
}

/// One GPKG as Portage writes it (unsigned).
fn gpkg(cat: &str, pf: &str, build_id: u64, i: usize) -> Vec<u8> {
    let mut meta = tar::Builder::new(Vec::new());
    let fields: Vec<(&str, String)> = vec![
        ("BUILD_ID", format!("{build_id}\n")),
        ("BUILD_TIME", format!("{}\n", 1_790_000_000 + i)),
        ("CATEGORY", format!("{cat}\n")),
        ("CHOST", format!("{CHOST}\n")),
        ("DEFINED_PHASES", "compile install\n".into()),
        ("DESCRIPTION", format!("benchmark package number {i}\n")),
        ("EAPI", "8\n".into()),
        ("IUSE", "debug +static\n".into()),
        ("KEYWORDS", "amd64 arm64\n".into()),
        ("LICENSE", "MIT\n".into()),
        ("PF", format!("{pf}\n")),
        ("RDEPEND", format!("dev-libs/libfoo{} >=sys-libs/glibc-2.38\n", i % 13)),
        ("SLOT", "0\n".into()),
        ("USE", "amd64 elibc_glibc kernel_linux static\n".into()),
        ("repository", "dbh-bench\n".into()),
    ];
    for (k, v) in &fields {
        tar_append(&mut meta, &format!("metadata/{k}"), v.as_bytes());
    }
    let meta = zstd::encode_all(&meta.into_inner().unwrap()[..], 3).unwrap();
    let mut image = tar::Builder::new(Vec::new());
    tar_append(&mut image, "image/usr/bin/bench", format!("#!/bin/sh\necho {pf}\n").as_bytes());
    let image = zstd::encode_all(&image.into_inner().unwrap()[..], 3).unwrap();
    let top = format!("{pf}-{build_id}");
    let mut manifest = String::new();
    let members: [(&str, &[u8]); 3] = [("gpkg-1", b""), ("metadata.tar.zst", &meta), ("image.tar.zst", &image)];
    for (name, data) in members {
        let b2 = hex::encode(blake2::Blake2b512::digest(data));
        let s5 = hex::encode(sha2::Sha512::digest(data));
        manifest.push_str(&format!("DATA {name} {} BLAKE2B {b2} SHA512 {s5}\n", data.len()));
    }
    let mut outer = tar::Builder::new(Vec::new());
    for (name, data) in members {
        tar_append(&mut outer, &format!("{top}/{name}"), data);
    }
    tar_append(&mut outer, &format!("{top}/Manifest"), manifest.as_bytes());
    outer.into_inner().unwrap()
}

/// Runs `emaint binhost --fix` from the Portage test venv with the index removed; `None` when
/// there is no venv.
fn emaint_fix(work: &Path, dir: &Path) -> Option<Took> {
    let cache = std::env::var_os("DBH_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/dbh-tests"));
    let venv = std::env::var_os("DBH_TEST_PORTAGE_VENV")
        .map(PathBuf::from)
        .or_else(|| ["venv-portage-3.0.83", "venv-host"].iter().map(|v| cache.join(v)).find(|v| v.join("bin/emaint").exists()));
    let Some(venv) = venv.filter(|v| v.join("bin/emaint").exists()) else {
        println!("emaint: skipped (no Portage venv; run tests/setup-host.sh)");
        return None;
    };
    let prefix = work.join("prefix");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/repo");
    for d in ["etc/portage/repos.conf", "share/portage/config", "var/db/pkg", "var/tmp", "home"] {
        std::fs::create_dir_all(prefix.join(d)).unwrap();
    }
    for f in ["make.globals", "sets", "binrepos.conf"] {
        let _ = std::os::unix::fs::symlink(venv.join("share/portage/config").join(f), prefix.join("share/portage/config").join(f));
    }
    let _ = std::os::unix::fs::symlink(repo.join("profiles/dbh/amd64"), prefix.join("etc/portage/make.profile"));
    std::fs::write(
        prefix.join("etc/portage/repos.conf/dbh.conf"),
        format!("[DEFAULT]\nmain-repo = dbh-test\n[dbh-test]\nlocation = {}\n", repo.display()),
    )
    .unwrap();
    let mut mc = std::fs::File::create(prefix.join("etc/portage/make.conf")).unwrap();
    writeln!(mc, "PORTAGE_USERNAME=root\nPORTAGE_GRPNAME=root\nFEATURES=\"-sandbox -usersandbox -userpriv\"").unwrap();
    std::fs::remove_file(dir.join("Packages")).unwrap();
    std::fs::remove_file(dir.join("Packages.gz")).unwrap();
    let d = time("emaint binhost --fix (real Portage, cold)", || {
        run(Command::new(venv.join("bin/emaint"))
            .args(["binhost", "--fix"])
            .env_clear()
            .env("HOME", prefix.join("home"))
            .env("PATH", format!("{}:/usr/bin:/bin", venv.join("bin").display()))
            .env("LC_ALL", "C.UTF-8")
            .env("PORTAGE_OVERRIDE_EPREFIX", &prefix)
            .env("PORTAGE_CONFIGROOT", &prefix)
            .env("PKGDIR", dir))
    });
    Some(d)
}
