//! Binary packages against real Portage: dbh reads what Portage builds, Portage's own GnuPG
//! verification (`portage.gpkg`, `emaint binhost`, `emerge --getbinpkgonly` with
//! `verify-signature = true`) accepts what dbh signs and refuses it once tampered, dbh verifies
//! what Portage's `gpkg-sign` writes, and both lay the signed package out the same way.

use std::path::{Path, PathBuf};
use std::process::Command;

use dbh::binpkg::{self, Rewrite};
use dbh::sign::{KeyStore, Signer};

use crate::portage::{built_pkgdir, combined, Prefix, PrefixOptions};
use crate::publish::StaticServer;

/// Verification as root without dropping to `nobody`, whose access to a 0700 temp dir fails
/// (docs/lab.md, "GPKG signing and verification"); the checks themselves are Portage's.
const VERIFY_AS_ROOT: &str = "GPG_VERIFY_USER_DROP=\"\"\nGPG_VERIFY_GROUP_DROP=\"\"\n";

/// Portage's own GPKG verification (`gpkg._verify_binpkg`, the code `emerge` runs before it
/// installs a binpkg) with signatures required; prints `VERIFIED <BUILD_ID>`.
const PORTAGE_VERIFY: &str = r#"
import sys
import portage
from portage.gpkg import gpkg
settings = portage.config(clone=portage.settings)
pkg = gpkg(settings, None, sys.argv[1], verify_signature=True)
pkg._verify_binpkg()
assert pkg.signature_exist, "no signature found"
build_id = pkg.get_metadata("BUILD_ID").decode().strip()
print("VERIFIED", build_id)
"#;

struct Lab {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    keys: KeyStore,
    signer: Signer,
    /// A prefix whose verification keyring trusts the key.
    prefix: Prefix,
    script: PathBuf,
}

fn lab() -> Lab {
    let tmp = tempfile::Builder::new().prefix("dbh-binpkg-").tempdir().unwrap();
    let dir = tmp.path().to_owned();
    let keys = KeyStore::new(dir.join("keys"));
    let fpr = keys.generate("dbh binpkg test <binpkg@dbh.invalid>", false).unwrap();
    let signer = keys.signer().unwrap();
    assert_eq!(signer.fingerprint(), fpr);
    let prefix = Prefix::new(&dir.join("pfx"), PrefixOptions { make_conf: VERIFY_AS_ROOT, ..Default::default() });
    prefix.trust_key(keys.public_armored().unwrap().as_bytes(), &fpr);
    let script = dir.join("verify.py");
    std::fs::write(&script, PORTAGE_VERIFY).unwrap();
    Lab { _tmp: tmp, dir, keys, signer, prefix, script }
}

impl Lab {
    /// Runs Portage's verification; `Ok(stdout)` or `Err(all output)`.
    fn portage_verify(&self, gpkg: &Path) -> Result<String, String> {
        let out = self.prefix.run("python", &[self.script.to_str().unwrap(), gpkg.to_str().unwrap()], &[]);
        if out.status.success() { Ok(String::from_utf8_lossy(&out.stdout).into_owned()) } else { Err(combined(&out)) }
    }
}

fn hello_src() -> PathBuf {
    built_pkgdir().join("dbh-test/hello/hello-1.0-1.gpkg.tar")
}

/// Byte range of a member's data inside a GPKG.
fn member_range(path: &Path, name: &str) -> std::ops::Range<usize> {
    let p = binpkg::read(path).unwrap();
    let m = p.gpkg.as_ref().unwrap().member(name).unwrap_or_else(|| panic!("{} has no {name}", path.display()));
    m.offset as usize..(m.offset + m.size) as usize
}

fn tampered(src: &Path, dst: &Path, edit: impl FnOnce(&mut Vec<u8>)) {
    let mut bytes = std::fs::read(src).unwrap();
    edit(&mut bytes);
    std::fs::write(dst, bytes).unwrap();
}

#[test]
fn dbh_reads_what_portage_builds() {
    let pkgdir = built_pkgdir();
    let index = std::fs::read_to_string(pkgdir.join("Packages")).unwrap();
    for (rel, cpv) in [
        ("dbh-test/hello/hello-1.0-1.gpkg.tar", "dbh-test/hello-1.0"),
        ("dbh-test/greeter/greeter-1.0-1.gpkg.tar", "dbh-test/greeter-1.0"),
    ] {
        let p = binpkg::read(&pkgdir.join(rel)).unwrap();
        assert_eq!(p.cpv().unwrap(), cpv);
        assert_eq!(p.format, binpkg::Format::Gpkg);
        assert!(!p.signed);
        assert_eq!(p.size, std::fs::metadata(pkgdir.join(rel)).unwrap().len());
        // The values Portage put into its own index for this package.
        let stanza = index.split("\n\n").find(|s| s.lines().any(|l| l == format!("CPV: {cpv}"))).unwrap();
        for key in ["BUILD_ID", "EAPI", "KEYWORDS", "LICENSE", "USE", "DEFINED_PHASES"] {
            let want = stanza.lines().find_map(|l| l.strip_prefix(&format!("{key}: "))).unwrap();
            let got = p.metadata.get(key).unwrap_or_else(|| panic!("{cpv} lacks {key}"));
            assert_eq!(got.split_whitespace().collect::<Vec<_>>().join(" "), want, "{cpv} {key}");
        }
        binpkg::verify(&pkgdir.join(rel), None).unwrap();
    }
}

#[test]
fn portage_accepts_what_dbh_signs_and_refuses_tampering() {
    let lab = lab();
    let signed = lab.dir.join("hello-1.0-5.gpkg.tar");
    binpkg::rewrite_gpkg(&hello_src(), &signed, &Rewrite { build_id: Some(5), signer: Some(&lab.signer) }).unwrap();
    let out = lab.portage_verify(&signed).unwrap_or_else(|e| panic!("Portage refused a GPKG signed by dbh:\n{e}"));
    assert!(out.contains("VERIFIED 5"), "{out}");
    binpkg::verify(&signed, Some(&lab.signer.verifier())).unwrap();

    // One character inside the armored signature of the image.
    let bad_sig = lab.dir.join("bad-sig/hello-1.0-5.gpkg.tar");
    std::fs::create_dir_all(bad_sig.parent().unwrap()).unwrap();
    let r = member_range(&signed, "image.tar.zst.sig");
    tampered(&signed, &bad_sig, |b| {
        let text = String::from_utf8_lossy(&b[r.clone()]).into_owned();
        let at = r.start + text.find("\n\n").unwrap() + 12;
        b[at] = if b[at] == b'A' { b'B' } else { b'A' };
    });
    // One hex digit of a DATA line inside the clear-signed Manifest.
    let bad_manifest = lab.dir.join("bad-manifest/hello-1.0-5.gpkg.tar");
    std::fs::create_dir_all(bad_manifest.parent().unwrap()).unwrap();
    let r = member_range(&signed, "Manifest");
    tampered(&signed, &bad_manifest, |b| {
        let text = String::from_utf8_lossy(&b[r.clone()]).into_owned();
        let line = text.find("DATA image.tar.zst ").unwrap();
        let at = r.start + line + text[line..].find(" SHA512 ").unwrap() + 9;
        b[at] = if b[at] == b'0' { b'1' } else { b'0' };
    });
    // One bit of the image itself (signature and Manifest untouched).
    let bad_image = lab.dir.join("bad-image/hello-1.0-5.gpkg.tar");
    std::fs::create_dir_all(bad_image.parent().unwrap()).unwrap();
    let r = member_range(&signed, "image.tar.zst");
    tampered(&signed, &bad_image, |b| b[r.start + r.len() / 2] ^= 0x01);
    // Signed by a key the client does not trust.
    let stranger = Signer::generate_ephemeral("stranger <s@dbh.invalid>").unwrap();
    let foreign = lab.dir.join("foreign/hello-1.0-5.gpkg.tar");
    std::fs::create_dir_all(foreign.parent().unwrap()).unwrap();
    binpkg::rewrite_gpkg(&hello_src(), &foreign, &Rewrite { build_id: Some(5), signer: Some(&stranger) }).unwrap();

    for (case, path) in [("signature", &bad_sig), ("manifest", &bad_manifest), ("image", &bad_image), ("foreign key", &foreign)] {
        let result = lab.portage_verify(path);
        assert!(result.is_err(), "Portage accepted a GPKG with a tampered {case}: {result:?}");
        let dbh = binpkg::verify(path, Some(&lab.signer.verifier()));
        assert!(dbh.is_err(), "dbh accepted a GPKG with a tampered {case}");
    }
    // What each refusal looked like, for the log.
    let text = lab.portage_verify(&bad_manifest).unwrap_err();
    assert!(text.contains("GnuPG verification failed") || text.contains("InvalidSignature"), "{text}");
}

#[test]
fn emerge_installs_from_a_binhost_dbh_signed() {
    let lab = lab();
    // Portage's own indexer (which checks signatures) over a PKGDIR holding dbh-signed packages.
    let pkgdir = lab.prefix.pkgdir();
    for (rel, dst, id) in [
        ("dbh-test/hello/hello-1.0-1.gpkg.tar", "dbh-test/hello/hello-1.0-5.gpkg.tar", Some(5)),
        ("dbh-test/greeter/greeter-1.0-1.gpkg.tar", "dbh-test/greeter/greeter-1.0-1.gpkg.tar", None),
    ] {
        std::fs::create_dir_all(pkgdir.join(dst).parent().unwrap()).unwrap();
        binpkg::rewrite_gpkg(&built_pkgdir().join(rel), &pkgdir.join(dst), &Rewrite { build_id: id, signer: Some(&lab.signer) })
            .unwrap();
    }
    lab.prefix.ok("emaint", &["binhost", "--fix"], &[]);
    let index = std::fs::read_to_string(pkgdir.join("Packages")).unwrap();
    assert!(index.contains("PATH: dbh-test/hello/hello-1.0-5.gpkg.tar"), "emaint dropped the signed hello:\n{index}");
    assert!(index.contains("CPV: dbh-test/greeter-1.0"), "{index}");

    let server = StaticServer::start(&pkgdir);
    let client = Prefix::new(&lab.dir.join("client"), PrefixOptions { make_conf: VERIFY_AS_ROOT, ..Default::default() });
    client.add_binrepo(
        "dbh",
        &format!("[dbh]\nsync-uri = {}\npriority = 10\nverify-signature = true\n", server.url()),
    );
    client.trust_key(lab.keys.public_armored().unwrap().as_bytes(), &lab.signer.fingerprint());
    let out = client.ok("emerge", &["--getbinpkgonly", "dbh-test/greeter"], &[]);
    assert!(!out.contains("verification failed"), "{out}");
    let run = Command::new(client.root.join("usr/bin/hello")).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&run.stdout), "hello from dbh-test\n");
    let build_id = std::fs::read_to_string(client.root.join("var/db/pkg/dbh-test/hello-1.0/BUILD_ID")).unwrap();
    assert_eq!(build_id.trim(), "5");
}

#[test]
fn dbh_signs_in_the_same_layout_as_gpkg_sign_and_verifies_it() {
    let lab = lab();
    // Portage's gpkg-sign with the same key, through GnuPG.
    let home = lab.dir.join("signing-gnupg");
    std::fs::create_dir_all(&home).unwrap();
    let import = Command::new("gpg")
        .arg("--homedir")
        .arg(&home)
        .args(["--batch", "--import"])
        .arg(lab.keys.secret_path())
        .output()
        .unwrap();
    assert!(import.status.success(), "{}", combined(&import));
    let by_portage = lab.dir.join("portage/hello-1.0-1.gpkg.tar");
    std::fs::create_dir_all(by_portage.parent().unwrap()).unwrap();
    std::fs::copy(hello_src(), &by_portage).unwrap();
    let key = format!("0x{}", lab.signer.fingerprint());
    lab.prefix.ok(
        "gpkg-sign",
        &[by_portage.to_str().unwrap()],
        &[
            ("FEATURES", "binpkg-signing"),
            ("BINPKG_GPG_SIGNING_GPG_HOME", home.to_str().unwrap()),
            ("BINPKG_GPG_SIGNING_KEY", &key),
        ],
    );
    let by_dbh = lab.dir.join("dbh/hello-1.0-1.gpkg.tar");
    std::fs::create_dir_all(by_dbh.parent().unwrap()).unwrap();
    binpkg::rewrite_gpkg(&hello_src(), &by_dbh, &Rewrite { build_id: None, signer: Some(&lab.signer) }).unwrap();

    // dbh's verifier accepts GnuPG's signatures.
    let v = binpkg::verify(&by_portage, Some(&lab.signer.verifier())).unwrap();
    assert!(v.signatures_checked);
    // Same members in the same order, same Manifest lines for the unchanged members.
    let (p, d) = (binpkg::read(&by_portage).unwrap(), binpkg::read(&by_dbh).unwrap());
    let (pl, dl) = (p.gpkg.unwrap(), d.gpkg.unwrap());
    let names = |l: &binpkg::gpkg::Layout| l.members.iter().map(|m| m.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(&pl), names(&dl));
    let lines = |l: &binpkg::gpkg::Layout| l.manifest.iter().map(|m| m.name.clone()).collect::<Vec<_>>();
    assert_eq!(lines(&pl), lines(&dl));
    // Portage iterates a frozenset of hash names, so their order varies between runs.
    let sorted = |l: &binpkg::manifest::Line| {
        let mut h = l.hashes.clone();
        h.sort();
        (l.name.clone(), l.size, h)
    };
    for member in ["gpkg-1", "metadata.tar.zst", "image.tar.zst"] {
        assert_eq!(sorted(pl.manifest_line(member).unwrap()), sorted(dl.manifest_line(member).unwrap()), "{member}");
    }
    assert!(pl.manifest_raw.starts_with(b"-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA512\n"));
    assert!(dl.manifest_raw.starts_with(b"-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA512\n"));
    lab.portage_verify(&by_portage).unwrap();
    lab.portage_verify(&by_dbh).unwrap();
}

#[test]
fn xpak_built_by_portage_converts_to_a_gpkg_portage_verifies_and_unpacks() {
    let lab = lab();
    let bld = Prefix::new(&lab.dir.join("xbld"), PrefixOptions { make_conf: "BINPKG_FORMAT=\"xpak\"\n", ..Default::default() });
    bld.ok("emerge", &["--oneshot", "--buildpkg", "--quiet-build=y", "dbh-test/hello"], &[]);
    let xpak = bld.pkgdir().join("dbh-test/hello/hello-1.0-1.xpak");
    let p = binpkg::read(&xpak).unwrap();
    assert_eq!(p.format, binpkg::Format::Xpak);
    assert_eq!(p.cpv().unwrap(), "dbh-test/hello-1.0");
    assert_eq!(p.metadata.build_id(), Some(1));
    assert!(p.metadata.binary("environment.bz2").is_some());
    assert!(binpkg::verify(&xpak, Some(&lab.signer.verifier())).is_err(), "XPAK cannot be signed");

    let gpkg = lab.dir.join("hello-1.0-3.gpkg.tar");
    binpkg::xpak_to_gpkg(&xpak, &gpkg, &Rewrite { build_id: Some(3), signer: Some(&lab.signer) }).unwrap();
    let out = lab.portage_verify(&gpkg).unwrap_or_else(|e| panic!("Portage refused a converted XPAK:\n{e}"));
    assert!(out.contains("VERIFIED 3"), "{out}");
    // Portage unpacks the image the way it installs it.
    let unpack = lab.dir.join("unpacked");
    let script = lab.dir.join("unpack.py");
    std::fs::write(
        &script,
        "import sys, portage\nfrom portage.gpkg import gpkg\ns = portage.config(clone=portage.settings)\ngpkg(s, None, sys.argv[1], verify_signature=True).decompress(sys.argv[2])\n",
    )
    .unwrap();
    lab.prefix.ok("python", &[script.to_str().unwrap(), gpkg.to_str().unwrap(), unpack.to_str().unwrap()], &[]);
    let hello = std::fs::read(unpack.join(bld.root.strip_prefix("/").unwrap()).join("usr/bin/hello"))
        .or_else(|_| std::fs::read(unpack.join("usr/bin/hello")))
        .unwrap_or_else(|_| panic!("no usr/bin/hello under {}", unpack.display()));
    assert!(hello.starts_with(b"\x7fELF"));
}

/// Reading metadata must stay cheap (the index is rebuilt from thousands of packages): 10 000
/// reads of a real GPKG. Run with `cargo test --release -- --ignored read_speed --nocapture`.
#[test]
#[ignore]
fn read_speed() {
    let tmp = tempfile::tempdir().unwrap();
    let src = hello_src();
    let n = 10_000;
    let paths: Vec<PathBuf> = (0..n)
        .map(|i| {
            let p = tmp.path().join(format!("hello-1.0-{i}.gpkg.tar"));
            std::fs::hard_link(&src, &p).unwrap();
            p
        })
        .collect();
    let start = std::time::Instant::now();
    for p in &paths {
        binpkg::read(p).unwrap();
    }
    let took = start.elapsed();
    println!("read {n} GPKGs in {took:?} ({:?} each)", took / n);
}

#[test]
fn key_generate_and_export_through_the_cli() {
    use std::os::unix::fs::PermissionsExt;
    let home = tempfile::tempdir().unwrap();
    let dbh = |args: &[&str]| {
        crate::cli::dbh().arg("--home").arg(home.path()).args(args).env_remove("DBH_HOME").output().unwrap()
    };
    let out = dbh(&["key", "export"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(combined(&out).contains("hint: run `dbh key generate`"), "{}", combined(&out));

    let out = dbh(&["key", "generate", "--uid", "CLI test <cli@dbh.invalid>"]);
    assert!(out.status.success(), "{}", combined(&out));
    let fpr = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(fpr.len(), 40, "stdout is the fingerprint: {fpr:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let keys = home.path().join("keys");
    assert!(stderr.contains(&keys.join("secret.asc").display().to_string()), "{stderr}");
    let mode = std::fs::metadata(keys.join("secret.asc")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    let again = dbh(&["key", "generate"]);
    assert_eq!(again.status.code(), Some(1));
    assert!(combined(&again).contains("--force"), "{}", combined(&again));

    // GnuPG reads the exported key: ed25519, signing-capable, no expiry, our user id.
    let export = dbh(&["key", "export"]);
    assert!(export.status.success());
    assert!(export.stdout.starts_with(b"-----BEGIN PGP PUBLIC KEY BLOCK-----"));
    let gnupg = home.path().join("gnupg");
    std::fs::create_dir_all(&gnupg).unwrap();
    let mut child = Command::new("gpg")
        .arg("--homedir")
        .arg(&gnupg)
        .args(["--batch", "--with-colons", "--show-keys"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), &export.stdout).unwrap();
    let shown = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&shown.stdout);
    let publine = text.lines().find(|l| l.starts_with("pub:")).unwrap_or_else(|| panic!("{}", combined(&shown)));
    let f: Vec<&str> = publine.split(':').collect();
    assert_eq!(f[3], "22", "EdDSA: {publine}");
    assert_eq!(f[6], "", "no expiry: {publine}");
    assert!(f[11].contains('s') || f[11].contains('S'), "can sign: {publine}");
    assert!(text.contains(&format!("fpr:::::::::{fpr}:")), "{text}");
    assert!(text.contains("CLI test <cli@dbh.invalid>"), "{text}");

    // The revocation certificate is kept, 0600, and real GnuPG revokes the key with it.
    let rev = keys.join("revocation.asc");
    assert_eq!(std::fs::metadata(&rev).unwrap().permissions().mode() & 0o777, 0o600);
    let gpg = |args: &[&str], input: &[u8]| {
        let mut child = Command::new("gpg")
            .arg("--homedir")
            .arg(&gnupg)
            .args(["--batch"])
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), input).unwrap();
        child.wait_with_output().unwrap()
    };
    let imported = gpg(&["--import"], &export.stdout);
    assert!(imported.status.success(), "{}", combined(&imported));
    let listed = gpg(&["--with-colons", "--list-keys", &fpr], b"");
    assert!(String::from_utf8_lossy(&listed.stdout).lines().any(|l| l.starts_with("pub:-:") || l.starts_with("pub:u:") || l.starts_with("pub:f:")), "{}", combined(&listed));
    let revoked = gpg(&["--import"], &std::fs::read(&rev).unwrap());
    assert!(revoked.status.success(), "{}", combined(&revoked));
    let listed = gpg(&["--with-colons", "--list-keys", &fpr], b"");
    assert!(String::from_utf8_lossy(&listed.stdout).lines().any(|l| l.starts_with("pub:r:")), "not revoked: {}", combined(&listed));

    let forced = dbh(&["key", "generate", "--force"]);
    assert!(forced.status.success(), "{}", combined(&forced));
    assert_ne!(String::from_utf8_lossy(&forced.stdout).trim(), fpr);
}
