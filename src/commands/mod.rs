//! One file per subcommand: each turns parsed arguments into calls to the core modules and prints
//! the results. No logic of its own beyond that.

mod binhost;
mod build;
mod completions;
mod config;
mod client;
mod cross;
mod key;
mod repo;
mod rootfs;
mod serve;
mod targets;
mod uki;
mod vm;

use crate::cli::{Cli, Command};
use crate::progress::Terminal;
use crate::settings::{CliValues, Settings};
use crate::Error;

/// What every command gets: resolved settings and somewhere to send progress.
pub struct Context {
    pub settings: Settings,
    pub reporter: Terminal,
    pub quiet: bool,
    /// `-v` count.
    pub verbose: u8,
}

pub fn run(cli: Cli) -> Result<(), Error> {
    // Neither needs settings: they must work on a machine with a broken or missing config.
    match &cli.command {
        Command::Completions { shell } => return completions::completions(*shell),
        Command::Man { dir } => return completions::man(dir.as_deref()),
        _ => {}
    }
    let mut values: CliValues = Vec::new();
    if let Some(home) = &cli.global.home {
        let home = std::path::absolute(home).unwrap_or_else(|_| home.clone());
        values.push(("home", "--home", toml::Value::String(home.display().to_string())));
    }
    if let Command::Serve(args) = &cli.command {
        if let Some(dir) = &args.dir {
            values.push(("serve.dir", "--dir", toml::Value::String(dir.display().to_string())));
        }
        if !args.listen.is_empty() {
            let list = args.listen.iter().map(|l| toml::Value::String(l.clone())).collect();
            values.push(("serve.listen", "--listen", toml::Value::Array(list)));
        }
        if let Some(url) = &args.public_url {
            values.push(("serve.public_url", "--public-url", toml::Value::String(url.clone())));
        }
    }
    let size = match &cli.command {
        Command::Vm(crate::cli::VmCommand::Build(args)) => Some(&args.size),
        Command::Vm(crate::cli::VmCommand::Image(crate::cli::ImageCommand::Update(args))) => Some(&args.size),
        _ => None,
    };
    if let Some(size) = size {
        if let Some(n) = size.cpus {
            values.push(("vm.cpus", "--cpus", toml::Value::Integer(i64::from(n))));
        }
        if let Some(m) = &size.memory {
            if crate::settings::parse_size(m).is_none() {
                return Err(Error::Failed(format!("--memory {m}: not a size (e.g. 8G or 4096M)")));
            }
            values.push(("vm.memory", "--memory", toml::Value::String(m.clone())));
        }
    }
    let ctx = Context {
        settings: Settings::load(values)?,
        reporter: Terminal::new(cli.global.quiet),
        quiet: cli.global.quiet,
        verbose: cli.global.verbose,
    };
    match cli.command {
        Command::Targets { json } => targets::run(&ctx, json),
        Command::Config(cmd) => config::run(&ctx, cmd),
        Command::Binhost(cmd) => binhost::run(&ctx, cmd),
        Command::Key(cmd) => key::run(&ctx, cmd),
        Command::Serve(args) => serve::run(&ctx, args),
        Command::Uki(cmd) => uki::run(&ctx, cmd),
        Command::Vm(cmd) => vm::run(&ctx, cmd),
        Command::Cross(cmd) => cross::run(&ctx, cmd),
        Command::Build(args) => build::run(&ctx, args),
        Command::Rootfs(cmd) => rootfs::run(&ctx, cmd),
        Command::Completions { .. } | Command::Man { .. } => unreachable!("handled before settings load"),
        Command::Repo(cmd) => repo::run(&ctx, cmd),
        Command::Client(cmd) => client::run(&ctx, cmd),
    }
}

/// Writes command output (data) to stdout, turning a closed pipe into an error instead of a panic.
pub fn out(text: &str) -> Result<(), Error> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes()).and_then(|_| stdout.flush()).map_err(Error::Stdout)
}
