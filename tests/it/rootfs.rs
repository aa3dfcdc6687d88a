//! `dbh rootfs build` against a real arm64 binhost: the packages were built by `dbh vm build` in
//! the arm64 test guest (once, cached under ~/.cache/dbh-tests keyed by the fixture repository
//! and this recipe), installed by the host's real Portage (PyPI venv) into an empty root, packed.
//! - tar.zst: the AArch64 hello and its vdb entry are inside, two builds are byte-identical, the
//!   DIGESTS verify, the signatures verify with the exported key; `--dry-run` writes nothing;
//! - OCI: the layout checks against the image-spec (every digest, size, media type), its layer is
//!   the very tar of the tar.zst, two builds are identical, `skopeo inspect` reads it;
//!   tar.xz, squashfs, ext4 .img and .qcow2: identical twice, the ext4 clean under e2fsck;
//! - the binhost served over HTTP by `dbh serve` gives the very same tar.zst as the directory;
//! - a missing binpkg: a clear error naming the fix, nothing left in the output directory;
//! - a pkg_postinst that only works on the target CPU: installed, and a warning names it;
//! - the library call reports progress as `rootfs.install` events over the packages, and a
//!   fixed SOURCE_DATE_EPOCH is every file's time;
//! - `--bootable --out r.qcow2`: identical twice; boots under QEMU (TCG) through the UKI on its ESP, the initramfs
//!   mounts the ext4 root and runs `/usr/bin/hello` from it as init.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use sha2::Digest;

use super::cli::dbh;
use super::portage::{cache_dir, combined, copy_tree, fixture_repo, portage};
use super::vm::product_home;

/// What the images hold; the fixture binhost also has `dbh-test/postinst`.
const ATOMS: &[&str] = &["dbh-test/greeter", "dbh-test/runtime"];
const BUILT: &[&str] = &["dbh-test/greeter", "dbh-test/runtime", "dbh-test/postinst"];
const RECIPE: &str = "dbh vm build --target arm64 --profile dbh-test:dbh/arm64 dbh-test/greeter dbh-test/runtime dbh-test/postinst";

fn clean_dbh(home: &Path) -> Command {
    let mut cmd = dbh();
    cmd.arg("--home").arg(home).env("XDG_CONFIG_HOME", home);
    for (k, _) in std::env::vars() {
        if k.starts_with("DBH_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("DBH_PORTAGE_EMERGE", portage().venv.join("bin/emerge"));
    cmd
}

/// A hash of every file of the fixture repository plus the recipe.
fn fixture_hash() -> String {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() { walk(&p, out) } else { out.push(p) }
        }
    }
    let repo = fixture_repo();
    let mut files = Vec::new();
    walk(&repo, &mut files);
    files.sort();
    let mut h = sha2::Sha256::new();
    h.update(RECIPE);
    for f in files {
        h.update(f.strip_prefix(&repo).unwrap().to_string_lossy().as_bytes());
        h.update(std::fs::read(&f).unwrap());
    }
    hex::encode(&h.finalize()[..8])
}

/// The cached `binhost/arm64` + `keys` made by `dbh vm build`; `None` where no arm64 test stage
/// can be built.
fn binhost_fixture() -> Option<PathBuf> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    DIR.get_or_init(|| {
        let dir = cache_dir().join(format!("rootfs-arm64-binhost-{}", fixture_hash()));
        std::fs::create_dir_all(&dir).unwrap();
        // Parallel test processes build it once.
        let lock = std::fs::File::create(dir.join("lock")).unwrap();
        super::vm::lock_file(&lock);
        if !dir.join(".done").exists() {
            super::image::image_home("arm64")?;
            let home = product_home(None);
            let out = clean_dbh(home.path()).args(["key", "generate"]).output().unwrap();
            assert!(out.status.success(), "{}", combined(&out));
            let repo = fixture_repo();
            let out = clean_dbh(home.path())
                .args(["vm", "build", "--target", "arm64", "--repo", repo.to_str().unwrap(), "--profile", "dbh-test:dbh/arm64"])
                .args(BUILT)
                .output()
                .unwrap();
            assert!(out.status.success(), "building the rootfs test binhost failed:\n{}", combined(&out));
            for sub in ["binhost", "keys"] {
                let _ = std::fs::remove_dir_all(dir.join(sub));
                copy_tree(&home.path().join(sub), &dir.join(sub));
            }
            std::fs::write(dir.join(".done"), "").unwrap();
        }
        Some(dir)
    })
    .clone()
}

/// A fresh $DBH_HOME holding a copy of the fixture binhost and its key.
fn home() -> Option<tempfile::TempDir> {
    let fixture = binhost_fixture()?;
    let home = tempfile::Builder::new().prefix("dbh-rootfs-").tempdir().unwrap();
    copy_tree(&fixture.join("binhost"), &home.path().join("binhost"));
    copy_tree(&fixture.join("keys"), &home.path().join("keys"));
    Some(home)
}

fn rootfs(home: &Path, out: &Path, extra: &[&str], atoms: &[&str]) -> Output {
    let repo = fixture_repo();
    let t0 = Instant::now();
    let o = clean_dbh(home)
        .args(["rootfs", "build", "--target", "arm64", "--repo", repo.to_str().unwrap(), "--profile", "dbh-test:dbh/arm64", "--out"])
        .arg(out)
        .args(extra)
        .args(atoms)
        .output()
        .unwrap();
    eprintln!("rootfs build {} ({:?}): {}\n{}", out.display(), t0.elapsed(), o.status, combined(&o));
    o
}

fn ok(home: &Path, out: &Path, extra: &[&str], atoms: &[&str]) {
    let o = rootfs(home, out, extra, atoms);
    assert!(o.status.success(), "{}", combined(&o));
}

/// Every entry of a tar stream: path → (entry type, uid, mtime, data).
fn tar_entries(data: &[u8]) -> BTreeMap<String, (tar::EntryType, u64, u64, Vec<u8>)> {
    let mut ar = tar::Archive::new(data);
    let mut m = BTreeMap::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let path = e.path().unwrap().display().to_string();
        let h = e.header().clone();
        let mut buf = Vec::new();
        e.read_to_end(&mut buf).unwrap();
        m.insert(path, (h.entry_type(), h.uid().unwrap(), h.mtime().unwrap(), buf));
    }
    m
}

/// Recomputes every line of a Gentoo DIGESTS file. dbh's reader (like Gentoo's) names files by
/// their base name; the files of an OCI layout are found in `dirs`.
fn check_digests(dirs: &[PathBuf], digests: &Path) {
    let text = std::fs::read_to_string(digests).unwrap();
    let lines = dbh::image::stage::parse_digests(&text);
    assert!(lines.iter().any(|l| l.algorithm == "SHA512") && lines.iter().any(|l| l.algorithm == "BLAKE2B"), "{text}");
    for l in &lines {
        let path = dirs.iter().map(|d| d.join(&l.file)).find(|p| p.is_file()).unwrap_or_else(|| panic!("{} not found", l.file));
        let data = std::fs::read(path).unwrap();
        let hex = match l.algorithm.as_str() {
            "SHA512" => hex::encode(sha2::Sha512::digest(&data)),
            "BLAKE2B" => hex::encode(<blake2::Blake2b512 as Digest>::digest(&data)),
            other => panic!("unexpected algorithm {other}"),
        };
        assert_eq!(hex, l.hex, "{} {}", l.algorithm, l.file);
    }
}

#[test]
fn tarball_holds_the_arm64_root_is_reproducible_and_signed() {
    let Some(home) = home() else { return };
    let home = home.path();
    let tmp = tempfile::tempdir().unwrap();

    // --dry-run: the package list, nothing written.
    let dry = tmp.path().join("dry/r.tar.zst");
    let o = rootfs(home, &dry, &["--dry-run"], &["dbh-test/hello"]);
    assert!(o.status.success(), "{}", combined(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "dbh-test/hello-1.0-1\n");
    assert!(!dry.parent().unwrap().exists() || std::fs::read_dir(dry.parent().unwrap()).unwrap().next().is_none());

    let one = tmp.path().join("one/r.tar.zst");
    let two = tmp.path().join("two/r.tar.zst");
    ok(home, &one, &[], &["dbh-test/hello"]);
    std::thread::sleep(Duration::from_secs(1));
    ok(home, &two, &[], &["dbh-test/hello"]);
    assert!(std::fs::read(&one).unwrap() == std::fs::read(&two).unwrap(), "two builds differ");
    assert_eq!(std::fs::read(format!("{}.packages", one.display())).unwrap(), b"dbh-test/hello-1.0 1\n");

    let tar = zstd::decode_all(&std::fs::read(&one).unwrap()[..]).unwrap();
    let entries = tar_entries(&tar);
    let (_, uid, _, hello) = &entries["usr/bin/hello"];
    assert_eq!(*uid, 0);
    assert_eq!(&hello[..4], b"\x7fELF");
    assert_eq!(u16::from_le_bytes([hello[18], hello[19]]), 183, "hello must be an AArch64 ELF");
    let contents = String::from_utf8_lossy(&entries["var/db/pkg/dbh-test/hello-1.0/CONTENTS"].3).into_owned();
    assert!(contents.contains("obj /usr/bin/hello "), "{contents}");
    assert!(entries.contains_key("var/db/pkg/dbh-test/hello-1.0/BUILD_ID"));
    assert!(!entries.contains_key("var/cache/edb/mtimedb"), "run-time state must not be packed");
    let build_time: u64 = String::from_utf8_lossy(&entries["var/db/pkg/dbh-test/hello-1.0/BUILD_TIME"].3).trim().parse().unwrap();
    let names: Vec<&String> = entries.keys().collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);
    for (path, (_, _, mtime, data)) in &entries {
        assert!(*mtime <= build_time, "{path} has mtime {mtime} after SOURCE_DATE_EPOCH {build_time}");
        let text = String::from_utf8_lossy(data);
        assert!(!text.contains(".dbh-rootfs-") && !text.contains(&*tmp.path().to_string_lossy()), "{path} names a host path");
    }

    // DIGESTS and signatures.
    let dir = one.parent().unwrap();
    check_digests(&[dir.to_owned()], &dir.join("r.tar.zst.DIGESTS"));
    let keys = dbh::sign::KeyStore::new(home.join("keys"));
    let verifier = dbh::sign::Verifier::from_armored(keys.public_armored().unwrap().as_bytes()).unwrap();
    let digests = std::fs::read(dir.join("r.tar.zst.DIGESTS")).unwrap();
    verifier.verify_detached(&digests, &std::fs::read(dir.join("r.tar.zst.DIGESTS.asc")).unwrap()).unwrap();
    verifier.verify_detached(&std::fs::read(&one).unwrap(), &std::fs::read(dir.join("r.tar.zst.asc")).unwrap()).unwrap();
    // The same binhost over HTTP (`dbh serve`, fetched and verified by Portage): the same bytes.
    let srv = super::serve::Serve::start(home, None, &[], &[]);
    let via_http = tmp.path().join("http/r.tar.zst");
    let url = format!("http://{}/arm64", srv.addr);
    ok(home, &via_http, &["--binhost", &url], &["dbh-test/hello"]);
    drop(srv);
    assert!(std::fs::read(&one).unwrap() == std::fs::read(&via_http).unwrap(), "a build from the served binhost differs");

    let mut tampered = digests.clone();
    tampered[20] ^= 1;
    assert!(verifier.verify_detached(&tampered, &std::fs::read(dir.join("r.tar.zst.DIGESTS.asc")).unwrap()).is_err());
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(data))
}

/// Reads a blob named by a descriptor, checking digest and size.
fn blob(layout: &Path, desc: &serde_json::Value) -> Vec<u8> {
    let digest = desc["digest"].as_str().unwrap();
    let hex = digest.strip_prefix("sha256:").expect("sha256 digests");
    let data = std::fs::read(layout.join("blobs/sha256").join(hex)).unwrap();
    assert_eq!(sha256_hex(&data), hex, "blob content matches its digest");
    assert_eq!(desc["size"].as_u64().unwrap(), data.len() as u64, "descriptor size of {digest}");
    data
}

#[test]
fn oci_layout_follows_the_spec_and_squashfs_is_reproducible() {
    let Some(home) = home() else { return };
    let home = home.path();
    let tmp = tempfile::tempdir().unwrap();
    let atoms = ATOMS;
    let oci = tmp.path().join("a/r.oci");
    ok(home, &oci, &[], atoms);
    std::thread::sleep(Duration::from_secs(1));
    let oci2 = tmp.path().join("b/r.oci");
    ok(home, &oci2, &[], atoms);
    let tarball = tmp.path().join("c/r.tar.zst");
    ok(home, &tarball, &[], atoms);

    let layout: serde_json::Value = serde_json::from_slice(&std::fs::read(oci.join("oci-layout")).unwrap()).unwrap();
    assert_eq!(layout["imageLayoutVersion"], "1.0.0");
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(oci.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["schemaVersion"], 2);
    let mdesc = &index["manifests"][0];
    assert_eq!(mdesc["mediaType"], "application/vnd.oci.image.manifest.v1+json");
    assert_eq!(mdesc["platform"]["architecture"], "arm64");
    assert_eq!(mdesc["platform"]["os"], "linux");
    assert_eq!(mdesc["annotations"]["org.opencontainers.image.ref.name"], "latest");
    let manifest: serde_json::Value = serde_json::from_slice(&blob(&oci, mdesc)).unwrap();
    assert_eq!(manifest["schemaVersion"], 2);
    assert_eq!(manifest["config"]["mediaType"], "application/vnd.oci.image.config.v1+json");
    let config: serde_json::Value = serde_json::from_slice(&blob(&oci, &manifest["config"])).unwrap();
    assert_eq!(config["architecture"], "arm64");
    assert_eq!(config["os"], "linux");
    assert_eq!(config["rootfs"]["type"], "layers");
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1);
    assert_eq!(layers[0]["mediaType"], "application/vnd.oci.image.layer.v1.tar+gzip");
    let gz = blob(&oci, &layers[0]);
    let mut layer_tar = Vec::new();
    flate2::read::GzDecoder::new(&gz[..]).read_to_end(&mut layer_tar).unwrap();
    assert_eq!(config["rootfs"]["diff_ids"][0].as_str().unwrap(), format!("sha256:{}", sha256_hex(&layer_tar)));
    let zst_tar = zstd::decode_all(&std::fs::read(&tarball).unwrap()[..]).unwrap();
    assert!(layer_tar == zst_tar, "the layer is the same tree, byte for byte, as the tarball");
    let entries = tar_entries(&layer_tar);
    assert!(entries.contains_key("usr/bin/hello") && entries.contains_key("usr/bin/greeter"));
    assert!(entries.contains_key("var/db/pkg/dbh-test/runtime-1.0/CONTENTS"));

    let same = Command::new("diff").arg("-r").arg(&oci).arg(&oci2).status().unwrap();
    assert!(same.success(), "two OCI builds differ");
    let digests = oci.parent().unwrap().join("r.oci.DIGESTS");
    let listed = dbh::image::stage::parse_digests(&std::fs::read_to_string(&digests).unwrap()).len();
    assert_eq!(listed, 2 * 6, "index.json, oci-layout, 3 blobs and the package list, twice");
    check_digests(&[oci.parent().unwrap().to_owned(), oci.clone(), oci.join("blobs/sha256")], &digests);

    if Command::new("skopeo").arg("--version").output().is_ok() {
        let o = Command::new("skopeo").arg("inspect").arg(format!("oci:{}:latest", oci.display())).output().unwrap();
        assert!(o.status.success(), "skopeo inspect: {}", combined(&o));
        let info: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(info["Architecture"], "arm64");
        assert_eq!(info["Layers"][0], layers[0]["digest"]);
    } else {
        super::skip("skopeo is not installed: no `skopeo inspect`");
    }

    // tar.xz and ext4 (bare .img, and qcow2 of it): identical twice as well.
    for name in ["r.tar.xz", "r.qcow2"] {
        let a = tmp.path().join("a").join(name);
        let b = tmp.path().join("b").join(name);
        ok(home, &a, &[], atoms);
        std::thread::sleep(Duration::from_secs(1));
        ok(home, &b, &[], atoms);
        assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(), "two {name} builds differ");
    }
    let raw = tmp.path().join("a/r.img");
    ok(home, &raw, &[], atoms);
    let o = Command::new("debugfs").arg("-R").arg("stat /usr/bin/hello").arg(&raw).output().unwrap();
    let stat = String::from_utf8_lossy(&o.stdout);
    assert!(stat.contains("User:     0   Group:     0"), "{stat}");
    let fsck = Command::new("e2fsck").arg("-fn").arg(&raw).output().unwrap();
    assert!(fsck.status.success(), "e2fsck: {}", combined(&fsck));

    if Command::new("mksquashfs").arg("-version").stdout(Stdio::null()).status().is_ok() {
        let s1 = tmp.path().join("a/r.squashfs");
        let s2 = tmp.path().join("b/r.squashfs");
        ok(home, &s1, &[], atoms);
        std::thread::sleep(Duration::from_secs(1));
        ok(home, &s2, &[], atoms);
        assert!(std::fs::read(&s1).unwrap() == std::fs::read(&s2).unwrap(), "two squashfs builds differ");
        let o = Command::new("unsquashfs").arg("-lls").arg(&s1).output().unwrap();
        let list = String::from_utf8_lossy(&o.stdout);
        assert!(list.contains("/usr/bin/hello"), "{list}");
    } else {
        super::skip("mksquashfs is not installed: no squashfs check");
    }
}

#[test]
fn a_missing_binpkg_names_the_fix_and_leaves_nothing() {
    let Some(home) = home() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("r.tar.zst");
    let o = rootfs(home.path(), &out, &[], &["dbh-test/hello", "dbh-test/broken"]);
    let text = combined(&o);
    assert_eq!(o.status.code(), Some(1), "{text}");
    assert!(text.contains("has no binary package for dbh-test/broken"), "{text}");
    assert!(text.contains("hint: build it first: dbh build --target arm64 dbh-test/broken"), "{text}");
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "nothing may be left behind: {left:?}");

    // A binhost URL nobody answers is not mistaken for a missing package.
    let port = super::publish::free_port();
    let url = format!("http://127.0.0.1:{port}/arm64");
    let o = rootfs(home.path(), &out, &["--binhost", &url], &["dbh-test/hello"]);
    let text = combined(&o);
    assert_eq!(o.status.code(), Some(1), "{text}");
    assert!(text.contains(&format!("cannot fetch the package index of the binhost {url}")), "{text}");
    assert!(std::fs::read_dir(tmp.path()).unwrap().next().is_none(), "nothing may be left behind");
}

#[test]
fn a_failing_pkg_postinst_is_a_warning_and_the_package_is_installed() {
    let Some(home) = home() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("r.tar.zst");
    let o = rootfs(home.path(), &out, &[], &["dbh-test/postinst"]);
    let text = combined(&o);
    assert!(o.status.success(), "{text}");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("warning: dbh-test/postinst-1.0: pkg_postinst failed (status 1); its work is missing from the root"),
        "{text}"
    );
    let entries = tar_entries(&zstd::decode_all(&std::fs::read(&out).unwrap()[..]).unwrap());
    assert!(entries.contains_key("usr/share/dbh-test/postinst.txt"));
    assert!(entries.contains_key("var/db/pkg/dbh-test/postinst-1.0/CONTENTS"));
}

/// Kills QEMU's process group when dropped.
struct Qemu(std::process::Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        // SAFETY: signalling the process group QEMU leads.
        unsafe { libc::kill(-(self.0.id() as i32), libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

#[test]
fn bootable_qcow2_boots_and_runs_hello_from_its_root() {
    let Some(home) = home() else { return };
    let Some((stage, modules)) = super::image::unpacked_stage("arm64") else { return };
    let version = modules.file_name().unwrap().to_string_lossy().into_owned();
    let kernel = stage.path().join(format!("boot/vmlinuz-{version}"));
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("r.qcow2");
    // The stage is shaped like a stage3: it has no systemd-stub, so the UKI takes the target's
    // stub from beside the stage (`--stub`, as the error's hint says).
    let stub = super::image::test_stub("arm64").expect("the test stage's stub/ directory");
    let args = [
        "--bootable",
        "--stub",
        stub.to_str().unwrap(),
        "--kernel",
        kernel.to_str().unwrap(),
        "--modules",
        modules.to_str().unwrap(),
        "--cmdline",
        "root=LABEL=dbh-root rw console=ttyAMA0,115200 panic=-1 init=/usr/bin/hello",
    ];
    ok(home.path(), &disk, &args, &["dbh-test/hello", "dbh-test/runtime"]);
    // The bootable disk (GPT, FAT ESP with the UKI, ext4) is reproducible too.
    let again = tmp.path().join("again/r.qcow2");
    std::thread::sleep(Duration::from_secs(1));
    ok(home.path(), &again, &args, &["dbh-test/hello", "dbh-test/runtime"]);
    assert!(std::fs::read(&disk).unwrap() == std::fs::read(&again).unwrap(), "two bootable builds differ");

    let target = dbh::target::Targets::builtin().get("arm64").unwrap().clone();
    let fw = dbh::vm::firmware::find(&target).unwrap();
    let vars = tmp.path().join("vars.fd");
    std::fs::copy(&fw.vars, &vars).unwrap();
    let console = tmp.path().join("console.log");
    let q = &target.qemu;
    let mut cmd = Command::new(&q.binary);
    cmd.args(["-machine", &q.machine, "-accel", "tcg,thread=multi", "-cpu", &q.cpu_tcg, "-smp", "2", "-m", "1024"])
        .arg("-drive")
        .arg(format!("if=pflash,format=raw,unit=0,readonly=on,file={}", fw.code.display()))
        .arg("-drive")
        .arg(format!("if=pflash,format=raw,unit=1,file={}", vars.display()))
        .arg("-drive")
        .arg(format!("if=none,id=root,format=qcow2,snapshot=on,file={}", disk.display()))
        .args(["-device", &format!("{},drive=root,bootindex=0", q.disk_device)])
        .args(["-display", "none", "-monitor", "none", "-no-reboot", "-audio", "none", "-net", "none"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .args(&q.extra_args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    use std::os::unix::process::CommandExt;
    cmd.process_group(0);
    let mut qemu = Qemu(cmd.spawn().unwrap());
    // Boot deadline: firmware + kernel + initramfs under TCG take about a minute here.
    let deadline = Instant::now() + Duration::from_secs(300);
    let text = loop {
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        if text.contains("hello from dbh-test") {
            break text;
        }
        if let Ok(Some(status)) = qemu.0.try_wait() {
            panic!("QEMU exited ({status}) before hello ran; console:\n{text}");
        }
        assert!(Instant::now() < deadline, "timed out after 300 s waiting for hello on the console:\n{text}");
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(text.contains("dbh-initramfs: switching to"), "{text}");
    drop(qemu);
}

#[test]
fn progress_leaves_the_core_as_events_over_packages() {
    use dbh::events::{Collector, Event};
    let Some(home) = home() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let target = dbh::target::Targets::builtin().get("arm64").unwrap().clone();
    let req = dbh::rootfs::Request {
        binhost: dbh::rootfs::Binhost::Dir(home.path().join("binhost/arm64")),
        repos: vec![fixture_repo()],
        profile: Some("dbh-test:dbh/arm64".into()),
        out: tmp.path().join("r.tar.xz"),
        format: dbh::rootfs::Format::TarXz,
        boot: None,
        atoms: vec!["dbh-test/greeter".into()],
        emerge: portage().venv.join("bin/emerge"),
        keys: dbh::sign::KeyStore::new(home.path().join("keys")),
        source_date_epoch: Some(1_000_000_000),
        make_conf: String::new(),
        package_use: String::new(),
        package_accept_keywords: String::new(),
        log_dir: tmp.path().join("logs"),
    };
    let events = Collector::default();
    let outcome = dbh::rootfs::build(&target, &req, &events).unwrap();
    assert_eq!(outcome.source_date_epoch, 1_000_000_000);
    let cpvs: Vec<_> = outcome.packages.iter().map(|p| p.cpv.as_str()).collect();
    assert_eq!(cpvs, ["dbh-test/greeter-1.0", "dbh-test/hello-1.0"]);
    let events = events.events.lock().unwrap();
    let install: Vec<&Event> = events
        .iter()
        .filter(|e| matches!(e, Event::Start { task, .. } | Event::Progress { task, .. } | Event::Finish { task, .. } if task == "rootfs.install"))
        .collect();
    assert!(matches!(install[0], Event::Start { total: Some(2), .. }), "{install:?}");
    let positions: Vec<u64> = install.iter().filter_map(|e| if let Event::Progress { position, .. } = e { Some(*position) } else { None }).collect();
    assert_eq!(positions, [1, 2], "{install:?}");
    assert!(matches!(install.last().unwrap(), Event::Finish { .. }), "{install:?}");
    // A fixed SOURCE_DATE_EPOCH is every file's time.
    let xz = std::fs::read(&req.out).unwrap();
    let mut tar = Vec::new();
    xz2::read::XzDecoder::new(&xz[..]).read_to_end(&mut tar).unwrap();
    assert!(tar_entries(&tar).values().all(|(_, _, mtime, _)| *mtime == 1_000_000_000));
}
