//! Unit tests on synthetic packages: the layout rules, every refusal, rewriting and conversion,
//! and a deterministic mutation run that feeds the readers broken input (no panics allowed).

use std::io::Write;
use std::path::Path;

use super::manifest::Hasher;
use super::tarfmt::Writer;
use super::*;
use crate::sign::Signer;

/// A minimal tar with regular files (inner metadata/image tars).
fn inner_tar(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut w = Writer::new(Vec::new());
    for (name, data) in files {
        w.member(name, data, 1_700_000_000).unwrap();
    }
    w.finish().unwrap()
}

fn zst(data: &[u8]) -> Vec<u8> {
    zstd::stream::encode_all(data, 3).unwrap()
}

const META: &[(&str, &[u8])] = &[
    ("metadata/CATEGORY", b"dbh-test\n"),
    ("metadata/PF", b"hello-1.0\n"),
    ("metadata/BUILD_ID", b"3"),
    ("metadata/SLOT", b"0\n"),
    ("metadata/environment.bz2", b"BZh9\xff\xfe binary"),
];

/// A GPKG container from members (name relative to `top`, data) plus a Manifest covering them,
/// unless a member named `Manifest` is given.
fn container(top: &str, members: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut w = Writer::new(Vec::new());
    let mut manifest = String::new();
    for (name, data) in members {
        let full = if name.contains('/') { name.to_string() } else { format!("{top}/{name}") };
        w.member(&full, data, 1_700_000_000).unwrap();
        if *name != "Manifest" {
            manifest.push_str(&Hasher::of(name.rsplit('/').next().unwrap(), data).to_text());
        }
    }
    if !members.iter().any(|(n, _)| *n == "Manifest") {
        w.member(&format!("{top}/Manifest"), manifest.as_bytes(), 1_700_000_000).unwrap();
    }
    w.finish().unwrap()
}

fn standard_members(meta: &[(&str, &[u8])]) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("gpkg-1", Vec::new()),
        ("metadata.tar.zst", zst(&inner_tar(meta))),
        ("image.tar.zst", zst(&inner_tar(&[("image/usr/bin/hello", b"\x7fELF fake")]))),
    ]
}

fn good_gpkg() -> Vec<u8> {
    container("hello-1.0-3", &standard_members(META))
}

fn err_text(r: Result<BinPkg, BinpkgError>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn reads_a_valid_gpkg() {
    let p = read_gpkg_bytes(&good_gpkg()).unwrap();
    assert_eq!(p.format, Format::Gpkg);
    assert_eq!(p.cpv().unwrap(), "dbh-test/hello-1.0");
    assert_eq!(p.metadata.build_id(), Some(3));
    assert_eq!(p.metadata.get("SLOT"), Some("0\n"));
    assert_eq!(p.metadata.binary("environment.bz2"), Some(&b"BZh9\xff\xfe binary"[..]));
    assert!(!p.signed);
    let layout = p.gpkg.unwrap();
    assert_eq!(layout.top, "hello-1.0-3");
    let names: Vec<_> = layout.members.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["gpkg-1", "metadata.tar.zst", "image.tar.zst", "Manifest"]);
}

#[test]
fn refuses_an_empty_file() {
    assert!(err_text(read_gpkg_bytes(b"")).contains("the file is empty"));
    assert!(err_text(read_xpak_bytes(b"")).contains("the file is empty"));
}

#[test]
fn refuses_a_truncated_gpkg() {
    let bytes = good_gpkg();
    let layout = read_gpkg_bytes(&bytes).unwrap().gpkg.unwrap();
    let image = layout.image_member();
    let cut = &bytes[..(image.offset + image.size / 2) as usize];
    assert!(err_text(read_gpkg_bytes(cut)).contains("truncated"), "{}", err_text(read_gpkg_bytes(cut)));
    // Cut inside a header.
    assert!(err_text(read_gpkg_bytes(&bytes[..700])).contains("truncated"));
    // Only the end-of-archive padding cut: Portage accepts that, so do we.
    let end = layout.member("Manifest").unwrap();
    let padded = (end.offset + end.size).div_ceil(512) * 512;
    read_gpkg_bytes(&bytes[..padded as usize]).unwrap();
}

#[test]
fn refuses_manifest_mismatches() {
    let mut members = standard_members(META);
    let good = container("p-1", &members);
    // A Manifest that lists the metadata with other hashes.
    let mut manifest = String::new();
    for (n, d) in &members {
        let mut l = Hasher::of(n, d);
        if *n == "metadata.tar.zst" {
            l.hashes[0].1 = "00".repeat(64);
        }
        manifest.push_str(&l.to_text());
    }
    members.push(("Manifest", manifest.into_bytes()));
    let e = err_text(read_gpkg_bytes(&container("p-1", &members)));
    assert!(e.contains("does not match its Manifest: `metadata.tar.zst` BLAKE2B"), "{e}");
    // An image byte flipped after the Manifest was written: read() does not look, verify() does.
    let layout = read_gpkg_bytes(&good).unwrap().gpkg.unwrap();
    let mut flipped = good.clone();
    flipped[layout.image_member().offset as usize + 3] ^= 1;
    read_gpkg_bytes(&flipped).unwrap();
    let e = gpkg::verify_source(&flipped[..], Path::new("x.gpkg.tar"), Format::Gpkg, None).unwrap_err().at(Path::new("x.gpkg.tar"));
    assert!(e.to_string().contains("x.gpkg.tar does not match its Manifest: `image.tar.zst`"), "{e}");
    // A member the Manifest does not list, and a Manifest line without a member.
    let mut extra = standard_members(META);
    extra.push(("Manifest", Hasher::of("gpkg-1", b"").to_text().into_bytes()));
    let e = err_text(read_gpkg_bytes(&container("p-1", &extra)));
    assert!(e.contains("is not listed in the Manifest"), "{e}");
}

#[test]
fn refuses_names_leaving_the_directory() {
    let mut m = standard_members(META);
    m.push(("p-1/../x", b"x".to_vec()));
    assert!(err_text(read_gpkg_bytes(&container("p-1", &m))).contains("member `p-1/../x` points outside"));
    let mut m = standard_members(META);
    m.push(("../x", b"x".to_vec()));
    assert!(err_text(read_gpkg_bytes(&container("p-1", &m))).contains("member `../x` points outside"));
    let mut m = standard_members(META);
    m.push(("/etc/x", b"x".to_vec()));
    let e = err_text(read_gpkg_bytes(&container("p-1", &m)));
    assert!(e.contains("member `/etc/x` is an absolute path"), "{e}");
}

#[test]
fn refuses_members_outside_one_top_directory() {
    let mut m = standard_members(META);
    m.push(("q-1/image.tar.xz", b"x".to_vec()));
    let e = err_text(read_gpkg_bytes(&container("p-1", &m)));
    assert!(e.contains("not in one top directory: `p-1/gpkg-1` and `q-1/image.tar.xz`"), "{e}");
    let mut m = standard_members(META);
    m.push(("p-1/sub/x", b"x".to_vec()));
    assert!(err_text(read_gpkg_bytes(&container("p-1", &m))).contains("not a file directly inside"));
}

#[test]
fn refuses_duplicate_members() {
    let mut m = standard_members(META);
    m.push(("gpkg-1", Vec::new()));
    let e = err_text(read_gpkg_bytes(&container("p-1", &m)));
    assert!(e.contains("member `p-1/gpkg-1` is listed twice"), "{e}");
}

#[test]
fn refuses_metadata_that_is_not_utf8() {
    let mut meta = META.to_vec();
    meta.push(("metadata/DESCRIPTION", b"caf\xe9\n"));
    let e = err_text(read_gpkg_bytes(&container("p-1", &standard_members(&meta))));
    assert!(e.contains("metadata entry `DESCRIPTION` is not UTF-8 text"), "{e}");
    let meta = [("metadata/../PF", &b"x"[..])];
    let e = err_text(read_gpkg_bytes(&container("p-1", &standard_members(&meta))));
    assert!(e.contains("is not a plain file name"), "{e}");
    let meta = [("other/PF", &b"x"[..])];
    assert!(err_text(read_gpkg_bytes(&container("p-1", &standard_members(&meta)))).contains("not under `metadata/`"));
}

#[test]
fn refuses_unknown_and_unsupported_compression() {
    let mut m = standard_members(META);
    m[1].0 = "metadata.tar.foo";
    let e = read_gpkg_bytes(&container("p-1", &m)).unwrap_err();
    assert!(e.to_string().contains("an unknown compression (`.foo`)"), "{e}");
    let mut m = standard_members(META);
    m[1].0 = "metadata.tar.lz4";
    let e = read_gpkg_bytes(&container("p-1", &m)).unwrap_err();
    assert!(e.to_string().contains("`metadata.tar.lz4` is compressed with lz4, which dbh cannot decompress"), "{e}");
    assert!(e.hint().unwrap().contains("BINPKG_COMPRESS"));
}

#[test]
fn reads_every_supported_compression() {
    let tar = inner_tar(META);
    let cases: [(&str, Vec<u8>); 4] = [
        ("metadata.tar.gz", Compression::Gzip.compress(&tar, "").unwrap()),
        ("metadata.tar.bz2", Compression::Bzip2.compress(&tar, "").unwrap()),
        ("metadata.tar.xz", Compression::Xz.compress(&tar, "").unwrap()),
        ("metadata.tar", tar.clone()),
    ];
    for (name, data) in cases {
        let mut m = standard_members(META);
        m[1] = (name, data);
        let p = read_gpkg_bytes(&container("p-1", &m)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(p.metadata.build_id(), Some(3), "{name}");
    }
}

#[test]
fn refuses_missing_members_and_non_tar_input() {
    let m: Vec<_> = standard_members(META).into_iter().filter(|(n, _)| *n != "image.tar.zst").collect();
    assert!(err_text(read_gpkg_bytes(&container("p-1", &m))).contains("0 `image.tar.*` members"));
    let m: Vec<_> = standard_members(META).into_iter().filter(|(n, _)| *n != "gpkg-1").collect();
    assert!(err_text(read_gpkg_bytes(&container("p-1", &m))).contains("no `gpkg-1` member"));
    assert!(err_text(read_gpkg_bytes(&[7u8; 2048])).contains("wrong checksum"));
}

fn xpak_file(image: &[u8], entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut f = image.to_vec();
    f.extend_from_slice(&xpak::blob(entries));
    f
}

fn bz2(data: &[u8]) -> Vec<u8> {
    let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::best());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

const XMETA: &[(&str, &[u8])] = &[("CATEGORY", b"dbh-test\n"), ("PF", b"hello-1.0\n"), ("BUILD_ID", b"2\n")];

#[test]
fn reads_a_valid_xpak() {
    let image = bz2(&inner_tar(&[("./usr/bin/hello", b"x")]));
    let p = read_xpak_bytes(&xpak_file(&image, XMETA)).unwrap();
    assert_eq!(p.cpv().unwrap(), "dbh-test/hello-1.0");
    assert_eq!(p.metadata.build_id(), Some(2));
    let l = p.xpak.unwrap();
    assert_eq!(l.image_len, image.len() as u64);
    assert_eq!(l.image_compression, Some(Compression::Bzip2));
}

#[test]
fn refuses_xpak_with_wrong_offsets_or_lengths() {
    let good = xpak_file(b"BZh9image", XMETA);
    let n = good.len();
    // Trailer length larger than the file.
    let mut bad = good.clone();
    bad[n - 8..n - 4].copy_from_slice(&(n as u32).to_be_bytes());
    assert!(err_text(read_xpak_bytes(&bad)).contains("announces a"));
    // Trailer length that does not land on XPAKPACK.
    let mut bad = good.clone();
    let blob_len = u32::from_be_bytes(bad[n - 8..n - 4].try_into().unwrap());
    bad[n - 8..n - 4].copy_from_slice(&(blob_len + 1).to_be_bytes());
    assert!(err_text(read_xpak_bytes(&bad)).contains("no `XPAKPACK`"));
    // Index and data lengths that do not add up.
    let start = 9; // after the fake image
    let mut bad = good.clone();
    bad[start + 12..start + 16].copy_from_slice(&1000u32.to_be_bytes());
    assert!(err_text(read_xpak_bytes(&bad)).contains("do not add up"));
    // An index entry pointing past the data.
    let mut bad = good.clone();
    let first_offset = start + 16 + 4 + "CATEGORY".len();
    bad[first_offset..first_offset + 4].copy_from_slice(&500u32.to_be_bytes());
    let e = err_text(read_xpak_bytes(&bad));
    assert!(e.contains("`CATEGORY` at data offset 500") && e.contains("lies outside"), "{e}");
    // A name length running past the index.
    let mut bad = good.clone();
    bad[start + 16..start + 20].copy_from_slice(&9999u32.to_be_bytes());
    assert!(err_text(read_xpak_bytes(&bad)).contains("runs past the index"));
    // No trailer at all, and a file too short for one.
    assert!(err_text(read_xpak_bytes(&[1u8; 100])).contains("no XPAK trailer"));
    assert!(err_text(read_xpak_bytes(b"STOP")).contains("too short"));
    // Duplicate and non-UTF-8 values.
    let dup = xpak_file(b"BZh", &[("PF", b"a"), ("PF", b"b")]);
    assert!(err_text(read_xpak_bytes(&dup)).contains("listed twice"));
    let latin = xpak_file(b"BZh", &[("DESCRIPTION", b"caf\xe9")]);
    assert!(err_text(read_xpak_bytes(&latin)).contains("not UTF-8"));
}

#[test]
fn errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hello-1.0-1.gpkg.tar");
    std::fs::write(&path, b"").unwrap();
    let e = read(&path).unwrap_err().to_string();
    assert!(e.starts_with(&format!("{} is not a valid binary package: the file is empty", path.display())), "{e}");
    let e = read_bytes(Path::new("/b/hello-1.0.xpak"), b"").unwrap_err().to_string();
    assert!(e.starts_with("/b/hello-1.0.xpak is not a valid binary package"), "{e}");
    read_bytes(Path::new("/b/hello-1.0-3.gpkg.tar"), &good_gpkg()).unwrap();
    let e = read(&dir.path().join("x.rpm")).unwrap_err();
    assert!(matches!(e, BinpkgError::UnknownFormat { .. }));
    let e = read(&dir.path().join("missing.xpak")).unwrap_err();
    assert!(matches!(e, BinpkgError::Io { .. }));
}

#[test]
fn rewrite_signs_sets_build_id_and_keeps_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("hello-1.0-3.gpkg.tar");
    std::fs::write(&src, good_gpkg()).unwrap();
    let signer = Signer::generate_ephemeral("t <t@invalid>").unwrap();
    let dst = dir.path().join("hello-1.0-9.gpkg.tar");
    rewrite_gpkg(&src, &dst, &Rewrite { build_id: Some(9), signer: Some(&signer) }).unwrap();
    let p = read(&dst).unwrap();
    assert!(p.signed);
    assert_eq!(p.metadata.build_id(), Some(9));
    assert_eq!(p.metadata.get("BUILD_ID"), Some("9"));
    assert_eq!(p.metadata.binary("environment.bz2"), Some(&b"BZh9\xff\xfe binary"[..]));
    let layout = p.gpkg.as_ref().unwrap();
    assert_eq!(layout.top, "hello-1.0-9");
    let names: Vec<_> = layout.members.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(
        names,
        ["gpkg-1", "metadata.tar.zst", "metadata.tar.zst.sig", "image.tar.zst", "image.tar.zst.sig", "Manifest"]
    );
    let manifest_names: Vec<_> = layout.manifest.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(manifest_names, &names[..5]);
    // Image bytes unchanged.
    let old = read(&src).unwrap().gpkg.unwrap();
    let (a, b) = (std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
    let (oi, ni) = (old.image_member(), layout.image_member());
    assert_eq!(a[oi.offset as usize..][..oi.size as usize], b[ni.offset as usize..][..ni.size as usize]);
    // Signatures verify with the key, not with another.
    let v = verify(&dst, Some(&signer.verifier())).unwrap();
    assert!(v.signatures_checked && v.signed);
    let other = Signer::generate_ephemeral("o <o@invalid>").unwrap();
    let e = verify(&dst, Some(&other.verifier())).unwrap_err();
    assert!(matches!(e, BinpkgError::Signature { ref member, .. } if member == "Manifest"), "{e}");
    // The unsigned source is refused when signatures are required.
    let e = verify(&src, Some(&signer.verifier())).unwrap_err();
    assert!(matches!(e, BinpkgError::Unsigned { .. }), "{e}");
    verify(&src, None).unwrap();
}

#[test]
fn rewrite_without_signer_is_deterministic_and_unsigned() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("hello-1.0-3.gpkg.tar");
    std::fs::write(&src, good_gpkg()).unwrap();
    let (d1, d2) = (dir.path().join("a/hello-1.0-4.gpkg.tar"), dir.path().join("b/hello-1.0-4.gpkg.tar"));
    for d in [&d1, &d2] {
        std::fs::create_dir_all(d.parent().unwrap()).unwrap();
        rewrite_gpkg(&src, d, &Rewrite { build_id: Some(4), signer: None }).unwrap();
    }
    assert_eq!(std::fs::read(&d1).unwrap(), std::fs::read(&d2).unwrap());
    let p = read(&d1).unwrap();
    assert!(!p.signed);
    assert_eq!(p.metadata.build_id(), Some(4));
    verify(&d1, None).unwrap();
    // Signed input, unsigned output: old signatures are dropped, not left dangling.
    let signer = Signer::generate_ephemeral("t <t@invalid>").unwrap();
    let signed = dir.path().join("hello-1.0-5.gpkg.tar");
    rewrite_gpkg(&src, &signed, &Rewrite { build_id: None, signer: Some(&signer) }).unwrap();
    let plain = dir.path().join("hello-1.0-6.gpkg.tar");
    rewrite_gpkg(&signed, &plain, &Rewrite::default()).unwrap();
    assert!(!read(&plain).unwrap().signed);
    assert_eq!(read(&plain).unwrap().metadata.build_id(), Some(3));
}

#[test]
fn rewrite_to_a_temp_name_names_the_directory_after_pf_and_build_id() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("hello-1.0-3.gpkg.tar");
    std::fs::write(&src, good_gpkg()).unwrap();
    let tmp = dir.path().join(".hello-1.0-8.gpkg.tar.tmp42");
    rewrite_gpkg(&src, &tmp, &Rewrite { build_id: Some(8), signer: None }).unwrap();
    let p = read_gpkg_bytes(&std::fs::read(&tmp).unwrap()).unwrap();
    assert_eq!(p.gpkg.unwrap().top, "hello-1.0-8");
    let tmp = dir.path().join("same.tmp");
    rewrite_gpkg(&src, &tmp, &Rewrite::default()).unwrap();
    assert_eq!(read_gpkg_bytes(&std::fs::read(&tmp).unwrap()).unwrap().gpkg.unwrap().top, "hello-1.0-3");
}

#[test]
fn rewrite_refuses_a_damaged_image() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("hello-1.0-3.gpkg.tar");
    let mut bytes = good_gpkg();
    let layout = read_gpkg_bytes(&bytes).unwrap().gpkg.unwrap();
    bytes[layout.image_member().offset as usize + 5] ^= 0x20;
    std::fs::write(&src, bytes).unwrap();
    let signer = Signer::generate_ephemeral("t <t@invalid>").unwrap();
    let e = rewrite_gpkg(&src, &dir.path().join("o.gpkg.tar"), &Rewrite { build_id: None, signer: Some(&signer) })
        .unwrap_err();
    assert!(matches!(e, BinpkgError::Digest { ref member, .. } if member == "image.tar.zst"), "{e}");
}

#[test]
fn xpak_converts_to_a_signed_gpkg() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("hello-1.0-2.xpak");
    let image = bz2(&{
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_size(0);
        h.set_mode(0o755);
        b.append_data(&mut h, "./", &[][..]).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_size(5);
        h.set_mode(0o755);
        b.append_data(&mut h, "./usr/bin/hello", &b"hello"[..]).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Link);
        h.set_size(0);
        b.append_link(&mut h, "./usr/bin/hi", "./usr/bin/hello").unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "./usr/bin/hey", "hello").unwrap();
        b.into_inner().unwrap()
    });
    std::fs::write(&src, xpak_file(&image, XMETA)).unwrap();
    let signer = Signer::generate_ephemeral("t <t@invalid>").unwrap();
    let dst = dir.path().join("hello-1.0-7.gpkg.tar");
    xpak_to_gpkg(&src, &dst, &Rewrite { build_id: Some(7), signer: Some(&signer) }).unwrap();
    let p = read(&dst).unwrap();
    assert_eq!(p.cpv().unwrap(), "dbh-test/hello-1.0");
    assert_eq!(p.metadata.build_id(), Some(7));
    verify(&dst, Some(&signer.verifier())).unwrap();
    let layout = p.gpkg.unwrap();
    let img = layout.image_member();
    let bytes = std::fs::read(&dst).unwrap();
    let raw = zstd::stream::decode_all(&bytes[img.offset as usize..][..img.size as usize]).unwrap();
    let mut ar = tar::Archive::new(&raw[..]);
    let got: Vec<(String, Option<String>)> = ar
        .entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.path().unwrap().display().to_string(), e.link_name().unwrap().map(|l| l.display().to_string()))
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("image".to_string(), None),
            ("image/usr/bin/hello".to_string(), None),
            ("image/usr/bin/hi".to_string(), Some("image/usr/bin/hello".to_string())),
            ("image/usr/bin/hey".to_string(), Some("hello".to_string())),
        ]
    );
    // XPAK itself cannot satisfy a signature requirement.
    let e = verify(&src, Some(&signer.verifier())).unwrap_err();
    assert!(e.to_string().contains("XPAK cannot carry signatures"), "{e}");
}

use crate::testutil::Rng;

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..1 + rng.index(8) {
        match rng.index(6) {
            0 if !b.is_empty() => {
                let i = rng.index(b.len());
                b[i] ^= 1 << rng.index(8);
            }
            1 if !b.is_empty() => {
                let i = rng.index(b.len());
                b[i] = rng.next() as u8;
            }
            2 => b.truncate(rng.index(b.len() + 1)),
            3 if !b.is_empty() => {
                // Overwrite four bytes with a "length" that is likely to matter.
                let i = rng.index(b.len());
                let v = [0u32, 1, 511, 512, 0x7fff_ffff, 0xffff_ffff][rng.index(6)].to_be_bytes();
                for (k, byte) in v.iter().enumerate() {
                    if let Some(x) = b.get_mut(i + k) {
                        *x = *byte;
                    }
                }
            }
            4 if !b.is_empty() => {
                // Overwrite with octal digits (tar size/checksum fields).
                let i = rng.index(b.len());
                for k in 0..11 {
                    if let Some(x) = b.get_mut(i + k) {
                        *x = b'0' + rng.index(8) as u8;
                    }
                }
            }
            _ => {
                let i = rng.index(b.len() + 1);
                let extra: Vec<u8> = (0..rng.index(64)).map(|_| rng.next() as u8).collect();
                b.splice(i..i, extra);
            }
        }
    }
    b
}

#[test]
fn mutated_input_never_panics() {
    let gpkg = good_gpkg();
    let image = bz2(&inner_tar(&[("./usr/bin/hello", b"x")]));
    let xpak = xpak_file(&image, XMETA);
    let mut rng = Rng(0x5eed_0db0);
    for round in 0..3000 {
        let g = mutate(&mut rng, &gpkg);
        let _ = read_gpkg_bytes(&g);
        let _ = gpkg::verify_source(&g[..], Path::new("m.gpkg.tar"), Format::Gpkg, None);
        let x = mutate(&mut rng, &xpak);
        let _ = read_xpak_bytes(&x);
        if round % 100 == 0 {
            // Pure noise too.
            let noise: Vec<u8> = (0..rng.index(4096)).map(|_| rng.next() as u8).collect();
            let _ = read_gpkg_bytes(&noise);
            let _ = read_xpak_bytes(&noise);
        }
    }
}

/// Writes valid seed inputs for the cargo-fuzz targets (`fuzz/corpus/<target>/`).
#[test]
#[ignore]
fn write_fuzz_seeds() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let signer = Signer::generate_ephemeral("seed <seed@invalid>").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("hello-1.0-3.gpkg.tar");
    std::fs::write(&src, good_gpkg()).unwrap();
    let signed = dir.path().join("hello-1.0-4.gpkg.tar");
    rewrite_gpkg(&src, &signed, &Rewrite { build_id: Some(4), signer: Some(&signer) }).unwrap();
    std::fs::create_dir_all(root.join("gpkg")).unwrap();
    std::fs::create_dir_all(root.join("xpak")).unwrap();
    std::fs::write(root.join("gpkg/plain"), good_gpkg()).unwrap();
    std::fs::copy(&signed, root.join("gpkg/signed")).unwrap();
    let image = bz2(&inner_tar(&[("./usr/bin/hello", b"x")]));
    std::fs::write(root.join("xpak/plain"), xpak_file(&image, XMETA)).unwrap();
}

/// A tar written field by field, so that it can hold what the `tar` crate refuses to write
/// (`..`, absolute names, links pointing anywhere): the hostile images of a build guest.
fn raw_tar(entries: &[(&str, tar::EntryType, &str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, kind, link, data) in entries {
        let mut h = tar::Header::new_ustar();
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_entry_type(*kind);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

fn gpkg_with_image(image: &[u8]) -> Vec<u8> {
    let mut members = standard_members(META);
    members[2].1 = zst(image);
    container("hello-1.0-3", &members)
}

/// Issue 13, case 7: image paths and link targets are confined to the image root, as Portage's
/// extraction (and more) requires; these are the exact hostile members of the report.
#[test]
fn hostile_image_members_are_refused() {
    use tar::EntryType as E;
    let ok = raw_tar(&[
        ("image/", E::Directory, "", b""),
        ("image/usr/bin/hello", E::Regular, "", b"x"),
        ("image/usr/bin/hi", E::Symlink, "hello", b""),
        ("image/etc/localtime", E::Symlink, "/usr/share/zoneinfo/UTC", b""),
        ("image/usr/bin/hey", E::Link, "image/usr/bin/hello", b""),
    ]);
    check_image_bytes(&gpkg_with_image(&ok)).unwrap();
    for (image, rule) in [
        (raw_tar(&[("image/../../../../etc/cron.d/evil", E::Regular, "", b"* * * * * root sh")]), "`..`"),
        (raw_tar(&[("../../../../etc/cron.d/evil", E::Regular, "", b"x")]), "`..`"),
        (raw_tar(&[("/etc/abs-evil", E::Regular, "", b"x")]), "absolute path"),
        (raw_tar(&[("image/etc/shadow", E::Symlink, "../../../../../etc/shadow", b"")]), "leaves the image root"),
        (raw_tar(&[("image/etc", E::Symlink, "/etc", b""), ("image/etc/shadow", E::Regular, "", b"x")]), "below a symlink"),
        (raw_tar(&[("image/shadow", E::Link, "/etc/shadow", b"")]), "absolute path"),
        (raw_tar(&[("image/null", E::Char, "", b"")]), "device node"),
        (raw_tar(&[("image/fifo", E::Fifo, "", b"")]), "device node or FIFO"),
    ] {
        let e = check_image_bytes(&gpkg_with_image(&image)).unwrap_err().to_string();
        assert!(e.contains(rule) && e.contains("<memory>.gpkg.tar"), "{rule}: {e}");
    }
}

/// Issue 13, cases 1 and 6: out-of-range times and oversized values are refused when the
/// package is read, with the key and the cap in the error (so `add` never signs them).
#[test]
fn hostile_metadata_values_are_refused() {
    for (key, value, want) in [
        ("metadata/BUILD_TIME", b"253402300800\n".to_vec(), "BUILD_TIME"),
        ("metadata/BUILD_TIME", b"18446744073709551615\n".to_vec(), "MAX_TIME"),
        ("metadata/BUILD_ID", b"9223372036854775808".to_vec(), "MAX_BUILD_ID"),
        ("metadata/KEYWORDS", vec![b'~'; 200 << 20], "MAX_INDEX_VALUE"),
    ] {
        let mut meta: Vec<(&str, &[u8])> = META.iter().filter(|(k, _)| *k != key).copied().collect();
        meta.push((key, &value));
        let e = err_text(read_gpkg_bytes(&container("hello-1.0-3", &standard_members(&meta))));
        assert!(e.contains(want), "{key}: {e}");
    }
    let e = err_text(read_xpak_bytes(&xpak_file(&bz2(&inner_tar(&[("./x", b"x")])), &[
        ("CATEGORY", b"a\n"),
        ("PF", b"b-1\n"),
        ("BUILD_TIME", b"253402300800"),
    ])));
    assert!(e.contains("BUILD_TIME"), "{e}");
}

/// A GPKG with `n` `.sig` members that belong to no member (each listed in the Manifest).
fn many_sigs(n: usize) -> Vec<u8> {
    let members = standard_members(META);
    let mut w = Writer::new(Vec::new());
    let mut manifest = String::new();
    for (name, data) in &members {
        w.member(&format!("hello-1.0-3/{name}"), data, 1).unwrap();
        manifest.push_str(&Hasher::of(name, data).to_text());
    }
    for i in 0..n {
        w.member(&format!("hello-1.0-3/f{i}.sig"), b"", 1).unwrap();
    }
    w.member("hello-1.0-3/Manifest", manifest.as_bytes(), 1).unwrap();
    w.finish().unwrap()
}

/// CPU time of this thread (wall time means little on a shared, loaded machine).
fn thread_cpu() -> std::time::Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Issue 13, case 9: 100 000 `.sig` members cost 15.8 s of CPU (25 000: 0.64 s), quadratic.
/// Now 4x the members cost about 4x the time, not 16x.
#[test]
fn many_signature_members_are_checked_in_linear_time() {
    let mut cost = Vec::new();
    for n in [25_000, 100_000] {
        let bytes = many_sigs(n);
        let t = thread_cpu();
        let e = err_text(read_gpkg_bytes(&bytes));
        cost.push(thread_cpu() - t);
        assert!(e.contains("belongs to no member"), "{e}");
    }
    assert!(cost[1] < cost[0] * 8 + std::time::Duration::from_millis(50), "25 000: {:?}, 100 000: {:?}", cost[0], cost[1]);
}

/// Seeded mutations of images with links: the image walk never panics.
#[test]
fn mutated_images_never_panic() {
    use tar::EntryType as E;
    let image = raw_tar(&[
        ("image/a", E::Regular, "", b"x"),
        ("image/b", E::Symlink, "../a", b""),
        ("image/c", E::Link, "image/a", b""),
    ]);
    let mut rng = Rng(0x1a2b_3c4d);
    for _ in 0..300 {
        let m = mutate(&mut rng, &image);
        let _ = check_image_bytes(&gpkg_with_image(&m));
    }
}
