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
//! - [`error`]: the top-level error, its `hint:` lines and exit codes; [`hint`]: the `Hint` trait module errors implement.

pub mod binhost;
pub mod binpkg;
pub mod build;
pub mod cli;
pub mod client;
pub mod commands;
pub mod error;
pub mod hint;
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
#[cfg(test)]
mod testutil;
pub mod uki;
pub mod util;
pub mod vm;

use std::process::ExitCode;

pub use error::Error;

/// Runs the command line; the exit status is decided in [`error`]: 0 success, 1 user/config
/// error or failed build, 2 usage error, 101 a bug (panic), or a passed-through guest status.
pub fn main() -> ExitCode {
    // The hook only reports. Whether a panic ends the program is up to where it happens: on the
    // main thread it unwinds to the `catch_unwind` below (exit 101); `dbh serve` catches a panic
    // in one connection's task, closes that connection and keeps serving everyone else.
    std::panic::set_hook(Box::new(|info| {
        eprintln!("error: dbh hit a bug: {info}");
        eprintln!("hint: this is not your fault; please report it with the command line and `-v` output");
    }));
    let cli = match cli::parse() {
        Ok(cli) => cli,
        Err(cli::Printed::Info) => return ExitCode::from(error::EXIT_OK),
        Err(cli::Printed::UsageError) => return ExitCode::from(error::EXIT_USAGE),
    };
    let color = progress::use_color(match cli.global.color {
        cli::ColorWhen::Auto => None,
        cli::ColorWhen::Always => Some(true),
        cli::ColorWhen::Never => Some(false),
    });
    let timestamps = matches!(cli.command, cli::Command::Serve(_));
    progress::init_tracing(cli.global.verbose, cli.global.quiet, color, timestamps);
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| commands::run(cli))) {
        Ok(Ok(())) => ExitCode::from(error::EXIT_OK),
        Ok(Err(err)) => {
            error::report(&err);
            ExitCode::from(err.exit_code())
        }
        Err(_) => ExitCode::from(error::EXIT_BUG),
    }
}
