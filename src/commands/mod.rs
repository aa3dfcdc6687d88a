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

use std::cell::OnceCell;

use crate::build::backend::{self, Backend};
use crate::build::{Outcome, Request};
use crate::cli::{BuildCommon, Cli, Command, ImageCommand, KeyCommand, VmCommand};
use crate::progress::Terminal;
use crate::settings::{CliValues, Settings};
use crate::target::{Target, Targets};
use crate::Error;

/// What every command gets: resolved settings, the targets, and somewhere to send progress.
pub struct Context {
    pub settings: Settings,
    pub reporter: Terminal,
    pub quiet: bool,
    /// `-v` count.
    pub verbose: u8,
    /// Loaded on first use, once per command.
    targets: OnceCell<Targets>,
}

impl Context {
    /// Every known target (built-in and overrides), loaded once.
    pub fn targets(&self) -> Result<&Targets, Error> {
        if let Some(t) = self.targets.get() {
            return Ok(t);
        }
        let loaded = Targets::load()?;
        Ok(self.targets.get_or_init(|| loaded))
    }

    /// The target called `name`, or an error listing the known ones.
    pub fn target(&self, name: &str) -> Result<&Target, Error> {
        Ok(self.targets()?.get(name)?)
    }
}

pub fn run(cli: Cli) -> Result<(), Error> {
    // Neither needs settings: they must work on a machine with a broken or missing config.
    match &cli.command {
        Command::Completions { shell } => return completions::completions(*shell),
        Command::Man { dir } => return completions::man(dir.as_deref()),
        _ => {}
    }
    let ctx = Context {
        settings: Settings::load(cli_values(&cli)?)?,
        reporter: Terminal::new(cli.global.quiet),
        quiet: cli.global.quiet,
        verbose: cli.global.verbose,
        targets: OnceCell::new(),
    };
    match cli.command {
        Command::Targets { json } => targets::run(&ctx, json),
        Command::Config(cmd) => config::run(&ctx, cmd),
        Command::Binhost(cmd) => binhost::run(&ctx, cmd),
        Command::Key(cmd) => key::run(&ctx, cmd),
        Command::Serve(_) => serve::run(&ctx),
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

/// Every command-line flag that is also a setting, as the highest settings layer: the one place
/// flags meet files and `DBH_*` variables, so `dbh config show` and every command see the same
/// value with the flag as its origin.
fn cli_values(cli: &Cli) -> Result<CliValues, Error> {
    let string = |s: &str| toml::Value::String(s.to_owned());
    let mut values: CliValues = Vec::new();
    if let Some(home) = &cli.global.home {
        let home = std::path::absolute(home).unwrap_or_else(|_| home.clone());
        values.push(("home", "--home", string(&home.display().to_string())));
    }
    if let Command::Serve(args) = &cli.command {
        if let Some(dir) = &args.dir {
            values.push(("serve.dir", "--dir", string(&dir.display().to_string())));
        }
        if !args.listen.is_empty() {
            let list = args.listen.iter().map(|l| string(l)).collect();
            values.push(("serve.listen", "--listen", toml::Value::Array(list)));
        }
        if let Some(url) = &args.public_url {
            values.push(("serve.public_url", "--public-url", string(url)));
        }
    }
    if let Command::Key(KeyCommand::Generate { uid: Some(uid), .. }) = &cli.command {
        values.push(("key.uid", "--uid", string(uid)));
    }
    let common: Option<&BuildCommon> = match &cli.command {
        Command::Build(args) => Some(&args.common),
        Command::Vm(VmCommand::Build(args)) => Some(&args.common),
        Command::Cross(crate::cli::CrossCommand::Build(args)) => Some(&args.common),
        _ => None,
    };
    if let Some(jobs) = common.and_then(|c| c.jobs) {
        values.push(("build.jobs", "--jobs", toml::Value::Integer(i64::from(jobs))));
    }
    if let Command::Vm(VmCommand::Build(args)) = &cli.command
        && args.distcc
    {
        values.push(("build.distcc", "--distcc", toml::Value::Boolean(true)));
    }
    let size = match &cli.command {
        Command::Vm(VmCommand::Build(args)) => Some(&args.size),
        Command::Vm(VmCommand::Image(ImageCommand::Update(args))) => Some(&args.size),
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
            values.push(("vm.memory", "--memory", string(m)));
        }
    }
    Ok(values)
}

/// The backend-independent request from the command line and the `build.*` and `distcc.*`
/// settings (the latter two only matter to the vm backend).
fn request(ctx: &Context, common: &BuildCommon) -> Request {
    let s = &ctx.settings;
    Request {
        repos: common.repos.clone(),
        profile: common.profile.clone(),
        jobs: s.build.jobs,
        atoms: common.atoms.clone(),
        emerge_args: common.emerge_args.clone(),
        distcc: s.build.distcc.then(|| crate::build::distcc::DistccOptions {
            distccd: s.distcc.distccd.clone(),
            jobs: None,
            hosts: s.distcc.hosts.clone(),
        }),
        update: false,
        gentoo_binhost: s.build.gentoo_binhost,
    }
}

/// Builds with `kind`, prints what was published (stdout) and turns failed packages into the
/// exit status.
fn build_with(ctx: &Context, target: &Target, req: &Request, kind: backend::Kind, flags: backend::Flags) -> Result<(), Error> {
    let backend = Backend::resolve(kind, &ctx.settings, target, flags)?;
    let outcome = backend::run(&ctx.settings.home(), target, req, &backend, &ctx.reporter)?;
    print_outcome(target, &outcome)?;
    Ok(outcome.failures(kind, &target.name)?)
}

fn print_outcome(target: &Target, outcome: &Outcome) -> Result<(), Error> {
    let mut text = String::new();
    for a in &outcome.published {
        text.push_str(&format!("published {} (BUILD_ID {}) as {}\n", a.cpv, a.build_id, a.path));
    }
    text.push_str(&format!(
        "{}: {} binpkg(s) transferred, {} published, {} failed; logs in {}\n",
        target.name,
        outcome.transferred,
        outcome.published.len(),
        outcome.failed.len(),
        outcome.log_dir.display()
    ));
    out(&text)
}

/// Writes command output (data) to stdout, turning a closed pipe into an error instead of a panic.
pub fn out(text: &str) -> Result<(), Error> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes()).and_then(|_| stdout.flush()).map_err(Error::Stdout)
}
