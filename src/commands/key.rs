//! `dbh key generate [--uid U] [--force]` and `dbh key export`: the binhost signing key.

use super::{out, Context};
use crate::cli::KeyCommand;
use crate::sign::KeyStore;
use crate::Error;

pub fn run(ctx: &Context, cmd: KeyCommand) -> Result<(), Error> {
    let store = KeyStore::new(ctx.settings.home().keys());
    match cmd {
        // --uid went into the settings (commands::cli_values); the resolved value is used.
        KeyCommand::Generate { force, .. } => {
            let uid = ctx.settings.key.uid.clone();
            let fingerprint = store.generate(&uid, force)?;
            if !ctx.quiet {
                eprintln!(
                    "created signing key {fingerprint} ({uid}): secret key {} (mode 0600), public key {}",
                    store.secret_path().display(),
                    store.public_path().display()
                );
            }
            out(&format!("{fingerprint}\n"))
        }
        KeyCommand::Export => out(&store.public_armored()?),
    }
}
