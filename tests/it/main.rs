//! dbh's integration tests: one binary, one module per area. Tests drive the real `dbh` binary
//! and real programs (Portage from PyPI, QEMU, HTTP clients); slow fixtures are cached under
//! `~/.cache/dbh-tests` keyed by a hash of their recipe.

mod binhost;
mod binpkg;
mod cli;
mod cross;
mod distcc;
mod image;
mod portage;
mod publish;
mod rootfs;
mod serve;
mod vm;
mod vm_build;
