//! `dbh repo sync NAME [--url URL]`, `dbh repo list` and `dbh repo snapshot REPO`: glue over
//! [`crate::repo`].

use std::path::{Path, PathBuf};

use super::{Context, out};
use crate::Error;
use crate::cli::RepoCommand;
use crate::repo::{self, Origin, Source, snapshot::Tools, sync};

pub fn run(ctx: &Context, cmd: RepoCommand) -> Result<(), Error> {
    let home = ctx.settings.home();
    match cmd {
        RepoCommand::Sync { name, url } => {
            let s = sync::sync(&home, &name, url.as_deref(), &ctx.reporter)?;
            out(&format!(
                "{}: {} {} ({})\n",
                s.name,
                if s.changed { "now at" } else { "unchanged at" },
                s.revision,
                s.tree.display()
            ))
        }
        RepoCommand::List => {
            let mut text = String::new();
            for l in sync::list(&home) {
                text.push_str(&format!("{}\n", l.name));
                if let Some(src) = &l.source {
                    text.push_str(&format!("  synced from: {} ({:?})\n", src.url, src.method));
                }
                if let Some(rev) = &l.current {
                    text.push_str(&format!("  current: {rev}\n"));
                }
                for (rev, image, size) in &l.snapshots {
                    text.push_str(&format!("  snapshot: {rev} {} ({size} bytes)\n", image.display()));
                }
            }
            out(&text)
        }
        RepoCommand::Snapshot { repo: which } => {
            let src = if Path::new(&which).is_dir() {
                let path = std::path::absolute(&which).unwrap_or_else(|_| PathBuf::from(&which));
                Source { name: repo::repo_name(&path)?, path, origin: Origin::Cli, revision: None }
            } else {
                let (path, rev) = sync::current(&home, &which).ok_or_else(|| repo::RepoError::NeverSynced {
                    name: which.clone(),
                    dir: repo::dir(&home, &which),
                })?;
                Source { name: which.clone(), path, origin: Origin::Managed, revision: Some(rev) }
            };
            let tools = Tools::find(&ctx.settings.portage.emerge);
            let snap = repo::snapshot(&home, &src, std::slice::from_ref(&src), &tools, &ctx.reporter)?;
            out(&format!("{} {} {}\n", snap.name, snap.revision.recorded, snap.image.display()))
        }
    }
}
