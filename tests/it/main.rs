//! dbh's integration tests: one binary, one module per area. Tests drive the real `dbh` binary
//! and real programs (Portage from PyPI, QEMU, HTTP clients); slow fixtures are cached under
//! `~/.cache/dbh-tests` keyed by a hash of their recipe.
#![allow(clippy::unwrap_used, reason = "test code: a failed unwrap is a failed test (clippy.toml covers #[test] fns, not the helpers)")]

mod binhost;
mod binpkg;
mod cli;
mod client;
mod conventions;
mod cross;
mod distcc;
mod distfiles;
mod harden;
mod image;
mod lifecycle;
mod portage;
mod publish;
mod repo;
mod rootfs;
mod serve;
mod trust;
mod vm;
mod vm_build;
mod vm_build_scale;
mod scale_gen;

/// Skips a test whose prerequisite this machine lacks — except under CI (`CI` set), where
/// tests/setup-host.sh has installed everything, so a skip would hide a broken set-up and let the
/// test pass without checking anything.
pub fn skip(reason: &str) {
    assert!(
        std::env::var_os("CI").is_none(),
        "{reason}, but CI must run every test: tests/setup-host.sh installs what this one needs"
    );
    eprintln!("SKIP: {reason}");
}
