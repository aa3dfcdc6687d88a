//! `dbh config show`: the layered settings, and the per-target build configuration
//! (`$DBH_HOME/targets/<target>/portage/`, see [`crate::build::PortageConfig`]).

use super::{Context, out};
use crate::Error;
use crate::build::{BuildError, CONFIG_FILES, PortageConfig};
use crate::cli::ConfigCommand;
use crate::settings::Home;
use crate::target::Targets;

pub fn run(ctx: &Context, cmd: ConfigCommand) -> Result<(), Error> {
    match cmd {
        ConfigCommand::Show(args) => {
            let home = ctx.settings.home();
            let mut text = String::new();
            match args.target {
                Some(target) => {
                    let targets = Targets::load()?;
                    let target = targets.get(&target)?;
                    // Showing it is a first use: the defaults get written, as a build would.
                    PortageConfig::load_or_create(&home, &target.name)?;
                    target_config(&home, &target.name, &mut text)?;
                }
                None => {
                    for (key, value, origin, doc) in ctx.settings.describe() {
                        text.push_str(&format!("# {doc}\n# from: {origin}\n{key} = {value}\n\n"));
                    }
                    let mut names: Vec<String> = std::fs::read_dir(home.root().join("targets"))
                        .into_iter()
                        .flatten()
                        .flatten()
                        .filter(|e| e.path().join("portage").is_dir())
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect();
                    names.sort();
                    for name in names {
                        target_config(&home, &name, &mut text)?;
                    }
                }
            }
            out(&text)
        }
    }
}

/// Appends the directory and every file of one target's build configuration.
fn target_config(home: &Home, target: &str, text: &mut String) -> Result<(), Error> {
    let dir = PortageConfig::dir(home, target);
    text.push_str(&format!("# build configuration of {target}: {}\n", dir.display()));
    for name in CONFIG_FILES {
        let path = dir.join(name);
        text.push_str(&format!("\n## {name}\n"));
        if path.is_dir() {
            let entries = std::fs::read_dir(&path).map_err(|source| BuildError::Io { doing: "read", path: path.clone(), source })?;
            let mut files: Vec<_> = entries.flatten().map(|e| e.path()).filter(|p| p.is_file()).collect();
            files.sort();
            for f in files {
                text.push_str(&format!("### {}\n", f.display()));
                push_content(text, &read(&f)?);
            }
        } else if path.is_file() {
            push_content(text, &read(&path)?);
        } else {
            text.push_str("(missing: the defaults are written by the next build)\n");
        }
    }
    text.push('\n');
    Ok(())
}

fn read(path: &std::path::Path) -> Result<String, BuildError> {
    std::fs::read_to_string(path).map_err(|source| BuildError::Io { doing: "read", path: path.to_owned(), source })
}

fn push_content(text: &mut String, content: &str) {
    text.push_str(content);
    if !content.ends_with('\n') {
        text.push('\n');
    }
}
