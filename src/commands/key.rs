//! `dbh key generate [--uid U] [--force]` and `dbh key export`: the binhost signing key.

use super::{out, Context};
use crate::cli::KeyCommand;
use crate::sign::KeyStore;
use crate::Error;

pub fn run(ctx: &Context, cmd: KeyCommand) -> Result<(), Error> {
    let store = KeyStore::new(ctx.settings.home().keys());
    match cmd {
        KeyCommand::Generate { uid, force } => {
            let uid = uid
                .or_else(|| ctx.settings.str("key.uid").map(str::to_owned))
                .unwrap_or_else(|| "dbh binhost signing key".to_owned());
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
