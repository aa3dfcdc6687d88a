//! dbh — build, sign and serve Gentoo binary packages for foreign CPU architectures.
//!
//! Module map (core modules never import clap or indicatif; progress leaves them as [`events`]):
//! - [`cli`]: the clap types, and nothing else; [`commands`]: one file per subcommand, glue only.
//! - [`settings`]: layered settings (CLI > `DBH_*` env > `./dbh.toml` > user config > `/etc/dbh/dbh.toml` >
//!   defaults) and the `$DBH_HOME` layout.
//! - [`target`]: every per-target fact, loaded from `vm-images/*.toml` (embedded) and user overrides.
//! - [`binpkg`]: GPKG (GLEP 78) and XPAK readers, the GPKG writer/re-signer.
//! - [`sign`]: the binhost's OpenPGP key, signatures in the form Portage verifies.
//! - [`binhost`]: the `Packages` index, `check`, and atomic, locked `add`.
//! - [`serve`]: the HTTP server for `$DBH_HOME/binhost/<target>/`.
//! - [`uki`]: UKI writer (PE sections after a systemd-stub), the guest initramfs, stub lookup.
//! - [`image`]: stage download + DIGESTS verification, `vm image create` (disk, ESP, keys, image.toml).
//! - [`rootfs`]: `dbh rootfs build`: binhost packages installed into an empty root, packed reproducibly.
//! - [`repo`]: ebuild repositories: revisions, cached squashfs snapshots, `dbh repo sync`.
//! - [`vm`]: QEMU guests (firmware, command line, QMP, lifecycle); [`guest`]: SSH into them.
//! - [`process`]: the one wrapper through which every external program runs.
//! - [`events`] / [`progress`]: progress events out of the core, bars drawn only in `progress`.
//! - [`error`]: the top-level error, its `hint:` lines and exit codes.

pub mod binhost;
pub mod binpkg;
pub mod build;
pub mod cli;
pub mod commands;
pub mod error;
pub mod events;
pub mod guest;
pub mod image;
pub mod process;
pub mod progress;
pub mod repo;
pub mod rootfs;
pub mod serve;
pub mod settings;
pub mod sign;
pub mod target;
pub mod uki;
pub mod vm;

use std::process::ExitCode;

pub use error::Error;

/// Runs the command line and maps the outcome to dbh's exit codes:
/// 0 success, 1 user/config error or failed build, 2 a bug (panic).
pub fn main() -> ExitCode {
    std::panic::set_hook(Box::new(|info| {
        eprintln!("error: dbh hit a bug: {info}");
        eprintln!("hint: this is not your fault; please report it with the command line and `-v` output");
        std::process::exit(2);
    }));
    let cli = cli::parse();
    progress::init_tracing(cli.global.verbose, cli.global.quiet);
    match commands::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            error::report(&err);
            ExitCode::from(err.exit_code())
        }
    }
}
