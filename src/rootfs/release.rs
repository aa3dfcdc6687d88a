//! What goes beside a release, as Gentoo's own stage releases have it:
//! - `<out>.packages`: one `CATEGORY/PF BUILD_ID` line per installed package, sorted;
//! - `<out>.DIGESTS`: `# BLAKE2B HASH` then `# SHA512 HASH`, each followed by `<hex>  <file>`
//!   lines (two spaces), for the output and the package list — the layout `image::stage` and
//!   Gentoo's tooling read; for an OCI directory, one line per file of the layout;
//! - with a signing key: `<out>.DIGESTS.asc`, a detached armored signature of the DIGESTS file,
//!   and for file outputs `<out>.asc`, one of the output itself (Gentoo's `stage3-*.tar.xz.asc`).

use std::io::Read;
use std::path::{Path, PathBuf};

use blake2::Blake2b512;
use sha2::{Digest, Sha512};

use super::{Installed, RootfsError, io};
use crate::events::{Event, Reporter};
use crate::sign::KeyStore;

/// The package list text.
pub fn package_list(packages: &[Installed]) -> String {
    let mut text = String::new();
    for p in packages {
        let id = p.build_id.map_or_else(|| "-".to_owned(), |i| i.to_string());
        text.push_str(&format!("{} {id}\n", p.cpv));
    }
    text
}

/// BLAKE2B and SHA512 of a file, in one read.
pub fn hash_file(path: &Path) -> Result<(String, String), RootfsError> {
    let mut f = fs_err::File::open(path).map_err(io("read", path))?;
    let mut b2 = Blake2b512::new();
    let mut sha = Sha512::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io("read", path))?;
        if n == 0 {
            break;
        }
        b2.update(&buf[..n]);
        sha.update(&buf[..n]);
    }
    Ok((hex::encode(b2.finalize()), hex::encode(sha.finalize())))
}

/// `(name in the DIGESTS, file)` for the output: itself, or every file of an OCI directory.
fn listed_files(staged: &Path, name: &str) -> Result<Vec<(String, PathBuf)>, RootfsError> {
    if !staged.is_dir() {
        return Ok(vec![(name.to_owned(), staged.to_owned())]);
    }
    let mut files = Vec::new();
    for rel in super::pack::sorted_entries(staged)? {
        let full = staged.join(&rel);
        if full.is_file() {
            files.push((format!("{name}/{}", rel.display()), full));
        }
    }
    Ok(files)
}

/// The DIGESTS text for `files`.
pub fn digests_text(files: &[(String, PathBuf)]) -> Result<String, RootfsError> {
    let mut b2 = String::from("# BLAKE2B HASH\n");
    let mut sha = String::from("# SHA512 HASH\n");
    for (name, path) in files {
        let (b, s) = hash_file(path)?;
        b2.push_str(&format!("{b}  {name}\n"));
        sha.push_str(&format!("{s}  {name}\n"));
    }
    Ok(b2 + &sha)
}

/// Writes the package list, DIGESTS and (with a key) signatures next to `staged` (named `name`
/// in the end); returns the files written, for the caller to move into place.
pub fn write_beside(
    staged: &Path,
    name: &str,
    packages: &[Installed],
    keys: &KeyStore,
    reporter: &dyn Reporter,
) -> Result<Vec<PathBuf>, RootfsError> {
    let dir = staged.parent().expect("staged output has a parent");
    let mut written = Vec::new();
    let list = dir.join(format!("{name}.packages"));
    fs_err::write(&list, package_list(packages)).map_err(io("write", &list))?;
    written.push(list.clone());

    let mut files = listed_files(staged, name)?;
    files.push((format!("{name}.packages"), list));
    let digests = dir.join(format!("{name}.DIGESTS"));
    let text = digests_text(&files)?;
    fs_err::write(&digests, &text).map_err(io("write", &digests))?;
    written.push(digests);

    if keys.exists() {
        let signer = keys.signer()?;
        let asc = dir.join(format!("{name}.DIGESTS.asc"));
        let sig = signer.sign_detached_armored(text.as_bytes())?;
        fs_err::write(&asc, sig).map_err(io("write", &asc))?;
        written.push(asc);
        if staged.is_file() {
            let mut s = signer.detached()?;
            let mut f = fs_err::File::open(staged).map_err(io("read", staged))?;
            std::io::copy(&mut f, &mut s).map_err(io("sign", staged))?;
            let asc = dir.join(format!("{name}.asc"));
            fs_err::write(&asc, s.finish()?).map_err(io("write", &asc))?;
            written.push(asc);
        }
        reporter.event(Event::Note { message: format!("signed with key {}", signer.fingerprint()) });
    } else {
        reporter.event(Event::Note {
            message: format!("no signing key in {}: the release is not signed (dbh key generate)", keys.dir().display()),
        });
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_parse_back_with_the_stage_reader() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("r.tar.zst");
        std::fs::write(&f, b"data").unwrap();
        let text = digests_text(&[("r.tar.zst".into(), f.clone())]).unwrap();
        let lines = crate::image::stage::parse_digests(&text);
        assert_eq!(lines.len(), 2, "{text}");
        let v = crate::image::stage::verify(&f, "r.tar.zst", &text, "r.tar.zst.DIGESTS", &crate::events::Silent);
        assert!(v.is_ok(), "{v:?}");
    }

    #[test]
    fn package_list_lines() {
        let p = vec![Installed { cpv: "a/b-1".into(), build_id: Some(3), build_time: None }];
        assert_eq!(package_list(&p), "a/b-1 3\n");
    }
}
