//! `dbh config show`: the layered settings, and the per-target build configuration
//! (`$DBH_HOME/targets/<target>/portage/`, see [`crate::build::PortageConfig`]).

use super::{Context, out};
use crate::Error;
use crate::build::{BuildError, CONFIG_FILES, PortageConfig};
use crate::cli::ConfigCommand;
use crate::settings::Home;

pub fn run(ctx: &Context, cmd: ConfigCommand) -> Result<(), Error> {
    match cmd {
        ConfigCommand::Show(args) => {
            let home = ctx.settings.home();
            if args.json {
                return out(&format!("{:#}\n", json(ctx, &home, args.target.as_deref())?));
            }
            let mut text = String::new();
            match args.target {
                Some(target) => {
                    let target = ctx.target(&target)?;
                    // Showing it is a first use: the defaults get written, as a build would.
                    PortageConfig::load_or_create(&home, &target.name)?;
                    target_config(&home, &target.name, &mut text)?;
                }
                None => {
                    for (key, value, origin, doc) in ctx.settings.describe() {
                        text.push_str(&format!("# {doc}\n# from: {origin}\n{key} = {value}\n\n"));
                    }
                    for name in configured_targets(&home) {
                        target_config(&home, &name, &mut text)?;
                    }
                }
            }
            out(&text)
        }
    }
}

/// The targets that have a build configuration under `$DBH_HOME/targets/`, sorted.
fn configured_targets(home: &Home) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(home.root().join("targets"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join("portage").is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// `config show --json`: the same facts as the text, as
/// `{"settings": [{"key", "value", "from", "doc"}], "targets": [{"target", "dir", "files": [{"name", "path", "content"}]}]}`
/// (`content` null for a file the next build writes).
fn json(ctx: &Context, home: &Home, target: Option<&str>) -> Result<serde_json::Value, Error> {
    use serde_json::{Value, json};
    let names = match target {
        Some(t) => {
            let t = ctx.target(t)?;
            PortageConfig::load_or_create(home, &t.name)?;
            vec![t.name.clone()]
        }
        None => configured_targets(home),
    };
    let mut configs = Vec::new();
    for name in names {
        let dir = PortageConfig::dir(home, &name);
        let mut files = Vec::new();
        for file in CONFIG_FILES {
            let path = dir.join(file);
            if path.is_dir() {
                let entries = std::fs::read_dir(&path).map_err(|source| BuildError::Io(crate::util::fs::PathError { doing: "read", path: path.clone(), source }))?;
                let mut inner: Vec<_> = entries.flatten().map(|e| e.path()).filter(|p| p.is_file()).collect();
                inner.sort();
                for f in inner {
                    files.push(json!({ "name": file, "path": f.display().to_string(), "content": read(&f)? }));
                }
            } else if path.is_file() {
                files.push(json!({ "name": file, "path": path.display().to_string(), "content": read(&path)? }));
            } else {
                files.push(json!({ "name": file, "path": path.display().to_string(), "content": Value::Null }));
            }
        }
        configs.push(json!({ "target": name, "dir": dir.display().to_string(), "files": files }));
    }
    let settings: Vec<Value> = if target.is_some() {
        Vec::new()
    } else {
        ctx.settings
            .describe()
            .into_iter()
            .map(|(key, value, origin, doc)| {
                // `value` is TOML text; as JSON it keeps its type (string, integer, list, ...).
                let parsed = toml::from_str::<toml::Table>(&format!("v = {value}"))
                    .ok()
                    .and_then(|mut t| t.remove("v"))
                    .and_then(|v| serde_json::to_value(v).ok())
                    .unwrap_or(Value::String(value));
                json!({ "key": key, "value": parsed, "from": origin.to_string(), "doc": doc })
            })
            .collect()
    };
    Ok(json!({ "settings": settings, "targets": configs }))
}

/// Appends the directory and every file of one target's build configuration.
fn target_config(home: &Home, target: &str, text: &mut String) -> Result<(), Error> {
    let dir = PortageConfig::dir(home, target);
    text.push_str(&format!("# build configuration of {target}: {}\n", dir.display()));
    for name in CONFIG_FILES {
        let path = dir.join(name);
        text.push_str(&format!("\n## {name}\n"));
        if path.is_dir() {
            let entries = std::fs::read_dir(&path).map_err(|source| BuildError::Io(crate::util::fs::PathError { doing: "read", path: path.clone(), source }))?;
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
    std::fs::read_to_string(path).map_err(|source| BuildError::Io(crate::util::fs::PathError { doing: "read", path: path.to_owned(), source }))
}

fn push_content(text: &mut String, content: &str) {
    text.push_str(content);
    if !content.ends_with('\n') {
        text.push('\n');
    }
}
