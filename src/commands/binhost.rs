//! `dbh binhost index|check|add|generations|rollback|rm|prune|conf`.

use super::{out, Context};
use crate::binhost::{add, check, conf, generations, lifecycle, scan, trust, BinhostError};
use crate::sign::KeyStore;
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
            let target = ctx.target(&target)?;
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
        BinhostCommand::Generations { target, json } => {
            let dir = target_dir(ctx, &target)?;
            let gens = generations::list(&dir)?;
            if json {
                let list: Vec<serde_json::Value> = gens
                    .iter()
                    .map(|g| {
                        serde_json::json!({
                            "generation": g.generation, "time": g.time, "timestamp": g.timestamp, "op": g.op,
                            "packages": g.packages, "added": g.added, "removed": g.removed,
                        })
                    })
                    .collect();
                let mut text = serde_json::to_string_pretty(&list).expect("json serializes");
                text.push('\n');
                return out(&text);
            }
            let current = match generations::state(&dir)? {
                generations::State::Published(n) | generations::State::GzAhead(n) => Some(n),
                _ => None,
            };
            let mut text = String::new();
            for g in &gens {
                let mark = if Some(g.generation) == current { "*" } else { " " };
                text.push_str(&format!(
                    "{mark}{:>5}  {}  {:<14} {:>6} packages  +{} -{}{}\n",
                    g.generation,
                    g.time,
                    g.op,
                    g.packages,
                    g.added.len(),
                    g.removed.len(),
                    summary(&g.added, &g.removed)
                ));
            }
            out(&text)
        }
        BinhostCommand::Rollback { target, to } => {
            let dir = target_dir(ctx, &target)?;
            let g = lifecycle::rollback(&dir, to, &ctx.reporter)?;
            out(&format!(
                "generation {}: {} ({} packages, TIMESTAMP {}){}\n",
                g.generation, g.op, g.packages, g.timestamp, summary(&g.added, &g.removed)
            ))
        }
        BinhostCommand::Rm { target, dry_run, packages } => {
            let dir = target_dir(ctx, &target)?;
            let r = lifecycle::rm(&dir, &packages, dry_run, &ctx.reporter)?;
            for w in &r.warnings {
                eprintln!("warning: {w}");
            }
            let mut text = String::new();
            let verb = if dry_run { "would remove" } else { "removed" };
            for (id, path) in &r.removed {
                text.push_str(&format!("{verb} {id} ({path})\n"));
            }
            if let Some(g) = &r.generation {
                text.push_str(&format!("generation {}: {} packages; the files stay until `dbh binhost prune`\n", g.generation, g.packages));
            }
            out(&text)
        }
        BinhostCommand::Prune { target, keep, keep_generations, unreferenced, repo, dry_run } => {
            let dir = target_dir(ctx, &target)?;
            let home = ctx.settings.home();
            let repos = if unreferenced { Some(prune_repos(ctx, &target, &repo)?) } else { None };
            let log_max_age = ctx.settings.binhost.log_max_age;
            let days = log_max_age.as_secs() / 86_400;
            let opts = lifecycle::PruneOptions {
                keep,
                keep_generations,
                unreferenced: repos,
                dry_run,
                logs: Some((home.logs(&target), log_max_age)),
            };
            let r = lifecycle::prune(&dir, &opts, &ctx.reporter)?;
            let (would, verb) = if dry_run { ("would ", "would delete") } else { ("", "deleted") };
            let mut text = String::new();
            for (_, why) in &r.dropped {
                text.push_str(&format!("{would}drop {why}\n"));
            }
            for (path, size) in &r.deleted {
                text.push_str(&format!("{verb} {path} ({size} bytes)\n"));
            }
            for n in &r.generations_dropped {
                text.push_str(&format!("{verb} generation {n}\n"));
            }
            let log_bytes: u64 = r.logs_deleted.iter().map(|(_, s)| s).sum();
            for (path, size) in &r.logs_deleted {
                text.push_str(&format!("{verb} log {} ({size} bytes, older than {days} days)\n", path.display()));
            }
            if let Some(g) = &r.generation {
                text.push_str(&format!("generation {}: {} packages\n", g.generation, g.packages));
            }
            text.push_str(&format!(
                "{} {} package(s) from the index, {} file(s); {}freed {} bytes ({} in logs)\n",
                if dry_run { "would drop" } else { "dropped" },
                r.dropped.len(),
                r.deleted.len(),
                would,
                r.bytes_freed + log_bytes,
                log_bytes
            ));
            out(&text)
        }
        BinhostCommand::Conf { target, url, unsigned, trust_script } => {
            let target = ctx.target(&target)?;
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
            let priority = ctx.settings.binhost.priority;
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

/// The target's binhost directory, the target checked to exist.
fn target_dir(ctx: &Context, target: &str) -> Result<std::path::PathBuf, Error> {
    let target = ctx.target(target)?;
    Ok(ctx.settings.home().binhost(&target.name))
}

/// ` (+a b, -c)` for a short change list, empty otherwise.
fn summary(added: &[String], removed: &[String]) -> String {
    let show = |l: &[String]| if l.len() <= 3 { l.join(" ") } else { format!("{} …", l[..3].join(" ")) };
    match (added.is_empty(), removed.is_empty()) {
        (true, true) => String::new(),
        (false, true) => format!("  (+ {})", show(added)),
        (true, false) => format!("  (- {})", show(removed)),
        (false, false) => format!("  (+ {}; - {})", show(added), show(removed)),
    }
}

/// Repositories for `prune --unreferenced`: every --repo, else the `location`s of the target's
/// repos.conf.
fn prune_repos(ctx: &Context, target: &str, given: &[std::path::PathBuf]) -> Result<Vec<lifecycle::Repo>, Error> {
    let mut paths: Vec<std::path::PathBuf> = given.to_vec();
    if paths.is_empty() {
        let home = ctx.settings.home();
        let config = crate::build::PortageConfig::load_or_create(&home, target)?;
        for (_, body) in crate::build::repos_conf_sections(&config.repos_conf) {
            for line in body.lines() {
                if let Some((k, v)) = line.split_once('=')
                    && k.trim() == "location"
                {
                    paths.push(v.trim().into());
                }
            }
        }
    }
    if paths.is_empty() {
        return Err(Error::Failed(format!(
            "--unreferenced needs the repositories to consult: the target `{target}` has none in its repos.conf; pass --repo PATH"
        )));
    }
    let mut repos = Vec::new();
    for p in paths {
        let name = crate::build::repo_name(&p)?;
        repos.push(lifecycle::Repo { name, path: p });
    }
    Ok(repos)
}
