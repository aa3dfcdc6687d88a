//! Generated scale data for `dbh vm build`, shared by `tests/it/vm_build_scale.rs` and
//! `bench/vm-build-scale` (included there by path): an ebuild repository `dbh-scale` of E
//! trivial ebuilds (EAPI 8, no dependencies, the fixture repository's profiles) and an arm64
//! binhost of the first N of them as GPKGs of `size` bytes each (incompressible image data, so
//! that the binhost really is that large), indexed by `dbh binhost index`. Everything is cached
//! under `~/.cache/dbh-tests/scale/` keyed by the sizes and this generator's version: a 1 GB
//! binhost is written once per machine, in seconds.
#![allow(dead_code)]

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use blake2::Digest as _;

/// Bump when the generated data changes.
const VERSION: u32 = 1;
pub const CHOST: &str = "aarch64-unknown-linux-gnu";
/// The packages every generated world lists (always in the binhost).
pub const WORLD: usize = 3;

pub fn cache_dir() -> PathBuf {
    std::env::var_os("DBH_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/dbh-tests"))
        .join("scale")
}

/// `(category, pn, pf)` of package `i`.
pub fn names(i: usize) -> (String, String, String) {
    let cat = format!("scale-cat{:03}", i / 200);
    let pn = format!("pkg{i:05}");
    let pf = format!("{pn}-1.0");
    (cat, pn, pf)
}

/// The world file's atoms: the first [`WORLD`] packages.
pub fn world() -> String {
    (0..WORLD).map(|i| {
        let (cat, pn, _) = names(i);
        format!("{cat}/{pn}\n")
    }).collect()
}

/// The repository of `ebuilds` ebuilds (at least [`WORLD`]), made once.
pub fn repo(fixture_repo: &Path, ebuilds: usize) -> PathBuf {
    // -md5: with the metadata cache a synced ::gentoo carries (egencache on 20 000 ebuilds takes
    // about 20 minutes under CI; it is tested on the small fixture repository instead).
    let dir = cache_dir().join(format!("repo-v{VERSION}-{ebuilds}-md5"));
    if dir.join(".done").exists() {
        return dir;
    }
    let tmp = dir.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(tmp.join("metadata")).unwrap();
    copy_dir(&fixture_repo.join("profiles"), &tmp.join("profiles"));
    std::fs::write(tmp.join("profiles/repo_name"), "dbh-scale\n").unwrap();
    std::fs::write(tmp.join("metadata/layout.conf"), "repo-name = dbh-scale\nmasters =\nthin-manifests = true\nsign-manifests = false\ncache-formats = md5-dict\n").unwrap();
    copy_dir(&fixture_repo.join("licenses"), &tmp.join("licenses"));
    let mut cats = std::collections::BTreeSet::new();
    for i in 0..ebuilds.max(WORLD) {
        let (cat, pn, pf) = names(i);
        cats.insert(cat.clone());
        let d = tmp.join(&cat).join(&pn);
        std::fs::create_dir_all(&d).unwrap();
        let ebuild = format!("EAPI=8\nDESCRIPTION=\"generated package {i}\"\nHOMEPAGE=\"https://example.invalid\"\nS=\"${{WORKDIR}}\"\nLICENSE=\"MIT\"\nSLOT=\"0\"\nKEYWORDS=\"amd64 arm64\"\nsrc_install() {{ newbin - {pn} <<<'#!/bin/sh'; }}\n");
        std::fs::write(d.join(format!("{pf}.ebuild")), &ebuild).unwrap();
        // The entry as egencache writes it; Portage checks `_md5_` against the ebuild.
        let entry = tmp.join("metadata/md5-cache").join(&cat).join(&pf);
        std::fs::create_dir_all(entry.parent().unwrap()).unwrap();
        let md5 = hex::encode(md5::Md5::digest(ebuild.as_bytes()));
        std::fs::write(
            entry,
            format!("DEFINED_PHASES=install\nDESCRIPTION=generated package {i}\nEAPI=8\nHOMEPAGE=https://example.invalid\nKEYWORDS=amd64 arm64\nLICENSE=MIT\nSLOT=0\n_md5_={md5}\n"),
        )
        .unwrap();
    }
    let mut f = std::fs::File::create(tmp.join("profiles/categories")).unwrap();
    for c in cats {
        writeln!(f, "{c}").unwrap();
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir).unwrap();
    std::fs::write(dir.join(".done"), "").unwrap();
    dir
}

/// The binhost of `packages` GPKGs (plus the [`WORLD`] ones) of about `size` bytes each, indexed
/// by `dbh` (`dbh binhost index`), made once. The packages are unsigned: nothing here installs
/// them; the host's plan reads only the index.
pub fn binhost(dbh: &Path, packages: usize, size: usize) -> PathBuf {
    let dir = cache_dir().join(format!("binhost-v{VERSION}-{packages}-{size}"));
    if dir.join(".done").exists() {
        return dir;
    }
    let tmp = dir.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    let mut noise = vec![0u8; size];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in 0..packages.max(WORLD) {
        // xorshift: fast, incompressible enough for zstd.
        for chunk in noise.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let b = x.to_le_bytes();
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
        let (cat, pn, pf) = names(i);
        let path = tmp.join(&cat).join(&pn).join(format!("{pf}-1.gpkg.tar"));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, gpkg(&cat, &pf, i, &noise)).unwrap();
    }
    let out = Command::new(dbh).args(["-q", "binhost", "index"]).arg(&tmp).output().unwrap();
    assert!(out.status.success(), "dbh binhost index: {}", String::from_utf8_lossy(&out.stderr));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir).unwrap();
    std::fs::write(dir.join(".done"), "").unwrap();
    dir
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let t = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &t);
        } else {
            std::fs::copy(e.path(), t).unwrap();
        }
    }
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

/// One GPKG as Portage writes it (unsigned), its metadata matching the generated ebuild.
fn gpkg(cat: &str, pf: &str, i: usize, noise: &[u8]) -> Vec<u8> {
    let mut meta = tar::Builder::new(Vec::new());
    let fields: Vec<(&str, String)> = vec![
        ("BUILD_ID", "1\n".into()),
        ("BUILD_TIME", format!("{}\n", 1_790_000_000 + i)),
        ("CATEGORY", format!("{cat}\n")),
        ("CHOST", format!("{CHOST}\n")),
        ("DEFINED_PHASES", "install\n".into()),
        ("DESCRIPTION", format!("generated package {i}\n")),
        ("EAPI", "8\n".into()),
        ("IUSE", "\n".into()),
        ("KEYWORDS", "amd64 arm64\n".into()),
        ("LICENSE", "MIT\n".into()),
        ("PF", format!("{pf}\n")),
        ("SLOT", "0\n".into()),
        ("USE", "arm64 elibc_glibc kernel_linux userland_GNU\n".into()),
        ("repository", "dbh-scale\n".into()),
    ];
    for (k, v) in &fields {
        tar_append(&mut meta, &format!("metadata/{k}"), v.as_bytes());
    }
    let meta = zstd::encode_all(&meta.into_inner().unwrap()[..], 3).unwrap();
    let mut image = tar::Builder::new(Vec::new());
    tar_append(&mut image, "image/usr/share/scale/data", noise);
    let image = zstd::encode_all(&image.into_inner().unwrap()[..], 1).unwrap();
    let top = format!("{pf}-1");
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

/// Runs `cmd` and samples its VmHWM (peak RSS, kB) from /proc every 10 ms until it exits; returns
/// its output and the last peak seen.
pub fn run_measured(cmd: &mut Command) -> (std::process::Output, u64) {
    let (out, peak, _) = run_measured_tree(cmd);
    (out, peak)
}

/// [`run_measured`], and the peak RSS (kB) of the whole process tree from `wait4`: the largest of
/// dbh and every child it waited for. A run of a few milliseconds ends before the sampler sees
/// it; when dbh started no big child (no emerge), the tree's peak is dbh's own.
pub fn run_measured_tree(cmd: &mut Command) -> (std::process::Output, u64, u64) {
    use std::process::Stdio;
    #[allow(clippy::zombie_processes, reason = "reaped by the wait4 loop below, which std's Child does not see")]
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let status_path = format!("/proc/{}/status", child.id());
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        std::io::Read::read_to_end(&mut stdout, &mut b).unwrap();
        b
    });
    let err_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        std::io::Read::read_to_end(&mut stderr, &mut b).unwrap();
        b
    });
    let mut peak = 0;
    let (status, tree_peak) = loop {
        if let Ok(text) = std::fs::read_to_string(&status_path)
            && let Some(kb) = text.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        {
            peak = peak.max(kb);
        }
        let mut raw = 0;
        // SAFETY: rusage is plain old data; all zeroes is a valid value.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: wait4 on our own child with pointers to locals; WNOHANG returns at once.
        let pid = unsafe { libc::wait4(child.id() as i32, &mut raw, libc::WNOHANG, &mut ru) };
        assert!(pid >= 0, "wait4: {}", std::io::Error::last_os_error());
        if pid > 0 {
            use std::os::unix::process::ExitStatusExt as _;
            break (std::process::ExitStatus::from_raw(raw), ru.ru_maxrss as u64);
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    (std::process::Output { status, stdout: out_t.join().unwrap(), stderr: err_t.join().unwrap() }, peak, tree_peak)
}
