//! What the host-side backends (`cross`, `chroot`) share: one build per directory (a lock), a
//! fresh staging PKGDIR checked against its index, small file helpers, and the emerge-then-publish
//! end of every host-side build.

use std::path::{Path, PathBuf};

use super::{BuildError, Outcome, Prepared, io, run_emerge};
use crate::binhost::index::Index;
use crate::events::Reporter;
use crate::process::Cmd;
use crate::target::Target;

/// Whether a builder's binpkg at `path` (relative to its PKGDIR) matches its entry in that
/// PKGDIR's `Packages`; the reason when not.
pub fn check_indexed(index: &Index, path: &str, size: u64, md5: &str) -> Result<(), String> {
    let entry = index.packages.iter().find(|e| e.effective_path() == path).ok_or_else(|| "it has no entry".to_string())?;
    if entry.size() != Some(size) {
        return Err(format!("SIZE {:?} in the index, {size} on disk", entry.get("SIZE")));
    }
    if let Some(m) = entry.get("MD5")
        && !m.eq_ignore_ascii_case(md5)
    {
        return Err(format!("MD5 {m} in the index, {md5} on disk"));
    }
    Ok(())
}

/// Every binpkg a host-side builder wrote into its (fresh) staging PKGDIR, each checked against
/// that PKGDIR's `Packages` like the VM backend checks the guest's.
pub fn staged_binpkgs(pkgdir: &Path) -> Result<Vec<PathBuf>, BuildError> {
    use md5::Digest as _;
    let mut files = Vec::new();
    let mut stack = vec![pkgdir.to_owned()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).map_err(io("read", &dir))?.flatten() {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(path);
            } else if !name.starts_with('.') && (name.ends_with(".gpkg.tar") || name.ends_with(".tbz2") || name.ends_with(".xpak")) {
                files.push(path);
            }
        }
    }
    files.sort();
    if files.is_empty() {
        return Ok(files);
    }
    let index_path = pkgdir.join("Packages");
    let text = std::fs::read(&index_path).map_err(io("read", &index_path))?;
    let index = Index::parse(&text).map_err(|e| BuildError::StagedIndex { path: pkgdir.to_owned(), reason: e.to_string() })?;
    for f in &files {
        let bytes = std::fs::read(f).map_err(io("read", f))?;
        let rel = f.strip_prefix(pkgdir).unwrap_or(f).to_string_lossy().into_owned();
        let md5 = hex::encode(md5::Md5::digest(&bytes));
        check_indexed(&index, &rel, bytes.len() as u64, &md5)
            .map_err(|reason| BuildError::StagedMismatch { path: pkgdir.to_owned(), file: rel.clone(), reason })?;
    }
    Ok(files)
}

/// emerge's options for the host-side backends. Their root (sysroot, unpacked stage) keeps what
/// was built before, so `--update --changed-use` builds a requested package again only when a newer
/// version or other USE flags call for it — the VM backend gets the same from `--usepkg` and its
/// served binhost; building the same thing twice publishes nothing the second time.
pub const HOST_EMERGE_ARGS: &[&str] = &["--buildpkg", "--update", "--changed-use", "--jobs=1", "--keep-going", "--color=n", "--quiet-build=n"];

/// An exclusive flock on `<dir>/.lock` for the duration of a host-side build (one sysroot or
/// chroot cannot take two emerges at once); released when the file is dropped.
pub(crate) fn lock_dir(dir: &Path, target: &str) -> Result<std::fs::File, BuildError> {
    std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    let path = dir.join(".lock");
    let file = crate::util::fs::open_lock_file(&path).map_err(io("create", &path))?;
    match crate::util::fs::try_lock(&file, crate::util::fs::Lock::Exclusive) {
        Ok(true) => Ok(file),
        Ok(false) => Err(BuildError::Busy { target: target.to_owned(), dir: dir.to_owned() }),
        Err(source) => Err(BuildError::Io(crate::util::fs::PathError { doing: "lock", path, source })),
    }
}

/// A fresh staging PKGDIR `<base>/pkgdir-*` for one host-side build. Call it holding
/// [`lock_dir`]: staging directories of builds that were killed (no destructor ran) are removed.
pub(crate) fn fresh_staging(base: &Path) -> Result<tempfile::TempDir, BuildError> {
    for e in std::fs::read_dir(base).map_err(io("read", base))?.flatten() {
        if e.file_name().to_string_lossy().starts_with("pkgdir-") {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    tempfile::Builder::new().prefix("pkgdir-").tempdir_in(base).map_err(io("create a staging PKGDIR in", base))
}

pub(crate) fn write(path: &Path, text: &str) -> Result<(), BuildError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    }
    std::fs::write(path, text).map_err(io("write", path))
}

pub(crate) fn symlink(to: &Path, link: &Path) -> Result<(), BuildError> {
    if let Some(dir) = link.parent() {
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    }
    if std::fs::symlink_metadata(link).is_ok() {
        std::fs::remove_file(link).map_err(io("replace", link))?;
    }
    std::os::unix::fs::symlink(to, link).map_err(io("create the symlink", link))
}

/// The end of every host-side build: runs `cmd` (an emerge writing binpkgs into `staging`, its
/// PORTAGE_TMPDIR/portage seen from the host at `build_dirs`), keeps failed packages' logs, then
/// checks and publishes what landed in `staging`.
#[allow(clippy::too_many_arguments)]
pub fn emerge_and_publish(
    backend: &'static str,
    cmd: &Cmd,
    target: &Target,
    prep: Prepared,
    staging: &Path,
    build_dirs: &Path,
    echo: bool,
    reporter: &dyn Reporter,
) -> Result<Outcome, BuildError> {
    let (failed, status, tail) = run_emerge(cmd, &target.name, &prep.log_dir, echo, reporter, |cpv| {
        let (cat, pf) = cpv.split_once('/')?;
        Some(build_dirs.join(cat).join(pf).join("temp/build.log"))
    })?;
    if status != 0 && failed.is_empty() {
        return Err(BuildError::HostEmergeFailed { backend, target: target.name.clone(), status, tail });
    }
    let files = staged_binpkgs(staging)?;
    let published = prep.publish(target, &files, reporter)?;
    Ok(Outcome { published, failed, log_dir: prep.log_dir, transferred: files.len() as u64, rebuilt: Vec::new() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_host_build_per_directory() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock_dir(dir.path(), "arm64").unwrap();
        let e = lock_dir(dir.path(), "arm64").unwrap_err();
        assert!(e.to_string().starts_with("another dbh build for arm64 is using"), "{e}");
        drop(held);
        lock_dir(dir.path(), "arm64").unwrap();
    }
}
