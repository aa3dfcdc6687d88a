//! `dbh binhost index|check|add|conf`.

use super::{out, Context};
use crate::binhost::{add, check, conf, scan, trust, BinhostError};
use crate::sign::KeyStore;
use crate::target::Targets;
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
        BinhostCommand::Check { dir, json } => {
            let problems = check::check(&dir, &ctx.reporter)?;
            if json {
                let list: Vec<_> = problems
                    .iter()
                    .map(|p| serde_json::json!({ "path": p.path.display().to_string(), "message": p.message }))
                    .collect();
                let v = serde_json::json!({ "dir": dir.display().to_string(), "consistent": problems.is_empty(), "problems": list });
                out(&format!("{v:#}\n"))?;
            }
            if problems.is_empty() {
                return Ok(());
            }
            if json {
                return Err(Error::Failed(format!("{} has {} inconsistencies", dir.display(), problems.len())));
            }
            let mut text = String::new();
            for p in &problems {
                text.push_str(&p.to_string());
                text.push('\n');
            }
            out(&text)?;
            Err(Error::Failed(format!("{} has {} inconsistencies", dir.display(), problems.len())))
        }
        BinhostCommand::Add { target, unsigned, files } => {
            let targets = Targets::load()?;
            let target = targets.get(&target)?;
            let home = ctx.settings.home();
            let signer = if unsigned {
                None
            } else {
                let keys = KeyStore::new(home.keys());
                if !keys.exists() {
                    return Err(BinhostError::NoKey { path: home.keys() }.into());
                }
                Some(keys.signer()?)
            };
            let dir = home.binhost(&target.name);
            let added = add::add(&dir, target, &files, signer.as_ref(), &ctx.reporter)?;
            let mut text = String::new();
            for a in &added {
                text.push_str(&format!("{}\n", dir.join(&a.path).display()));
            }
            out(&text)
        }
        BinhostCommand::Conf { target, url, unsigned, trust_script } => {
            let targets = Targets::load()?;
            let target = targets.get(&target)?;
            let home = ctx.settings.home();
            let fingerprint = if unsigned {
                None
            } else {
                let keys = KeyStore::new(home.keys());
                if !keys.exists() {
                    return Err(BinhostError::NoKey { path: home.keys() }.into());
                }
                Some(keys.fingerprint()?)
            };
            if trust_script {
                let keys = KeyStore::new(home.keys());
                let public = keys.public_armored()?;
                let uri = conf::sync_uri(&url, &target.name)?;
                let script = trust::script(&trust::TrustInput {
                    target: &target.name,
                    sync_uri: Some(&uri),
                    public_key: &public,
                })
                .map_err(BinhostError::from)?;
                return out(&script);
            }
            let priority = ctx.settings.int("binhost.priority").unwrap_or(10);
            let text = conf::render(&conf::ConfInput {
                target: &target.name,
                url: &url,
                priority,
                fingerprint: fingerprint.as_deref(),
            })?;
            out(&text)
        }
    }
}
