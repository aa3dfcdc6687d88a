//! `dbh binhost index|check|add|conf`.

use super::{out, Context};
use crate::binhost::{check, scan};
use crate::cli::BinhostCommand;
use crate::Error;

pub fn run(ctx: &Context, cmd: BinhostCommand) -> Result<(), Error> {
    match cmd {
        BinhostCommand::Index { dir, full } => {
            let outcome = scan::index_dir(&dir, scan::Options { full, target: None }, &ctx.reporter)?;
            if !ctx.quiet {
                eprintln!(
                    "{}: {} packages ({} read, {} unchanged, {} dropped{}){}",
                    dir.display(),
                    outcome.packages,
                    outcome.read,
                    outcome.reused,
                    outcome.dropped,
                    if outcome.skipped.is_empty() { String::new() } else { format!(", {} skipped", outcome.skipped.len()) },
                    if outcome.written { "" } else { "; index already up to date" }
                );
            }
            Ok(())
        }
        BinhostCommand::Check { dir } => {
            let problems = check::check(&dir, &ctx.reporter)?;
            if problems.is_empty() {
                return Ok(());
            }
            let mut text = String::new();
            for p in &problems {
                text.push_str(&p.to_string());
                text.push('\n');
            }
            out(&text)?;
            Err(Error::Failed(format!("{} has {} inconsistencies", dir.display(), problems.len())))
        }
        // Wait for crate::binpkg (rewrite/sign) and crate::sign (KeyStore).
        BinhostCommand::Add { .. } | BinhostCommand::Conf { .. } => {
            Err(Error::NotImplemented { command: "binhost add/conf" })
        }
    }
}
