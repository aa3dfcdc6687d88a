//! `dbh vm …`: start, stop, status, ssh and exec drive the runner in [`crate::vm`]; `image create`
//! and `build` belong to the image and build modules.

use super::{Context, out};
use crate::Error;
use crate::build;
use crate::build::backend::{Flags, Kind};
use crate::cli::{BuildCommon, ImageCommand, ImageCreateArgs, ImageUpdateArgs, VmCommand};
use crate::events::{Event, Reporter as _};
use crate::image::{self, CreateOptions};
use crate::util::runtime;
use crate::vm::{self, Shutdown, StartOptions, Status, Vm, with_signals};

pub fn run(ctx: &Context, cmd: VmCommand) -> Result<(), Error> {
    match cmd {
        VmCommand::Image(ImageCommand::Create(args)) => image_create(ctx, args),
        VmCommand::Image(ImageCommand::Update(args)) => image_update(ctx, args),
        VmCommand::Build(args) => vm_build(ctx, &args.common, args.keep_vm, args.update),
        VmCommand::Start(t) => start(ctx, &t.target),
        VmCommand::Stop(t) => block_on(async {
            let home = ctx.settings.home();
            let deadline = ctx.settings.vm.powerdown_timeout;
            vm::stop_running(&home, &t.target, Shutdown::Powerdown(deadline), &ctx.reporter).await?;
            ctx.reporter.event(Event::Note { message: format!("the {} guest is stopped", t.target) });
            Ok(())
        }),
        VmCommand::Status(t) => status(ctx, &t.target, t.json),
        VmCommand::Ssh(t) => ssh(ctx, &t.target),
        VmCommand::Exec { target, command } => exec(ctx, &target, &command),
    }
}

/// Runs a command's async part on this thread (see [`crate::util::runtime`]).
fn block_on<T, F: std::future::Future<Output = Result<T, Error>>>(fut: F) -> Result<T, Error> {
    runtime::block_on(fut).map_err(build::BuildError::Runtime)?
}

fn start_options(ctx: &Context, detached: bool, target: &str) -> Result<StartOptions, Error> {
    let sizing = ctx.settings.vm_sizing(target)?;
    Ok(StartOptions {
        boot_deadline: ctx.settings.vm.boot_timeout,
        detached,
        cpus: Some(sizing.cpus.0),
        memory_mib: Some(sizing.memory_mib.0),
        ..Default::default()
    })
}

fn start(ctx: &Context, target: &str) -> Result<(), Error> {
    let target = ctx.target(target)?;
    block_on(async {
        let home = ctx.settings.home();
        let vm = with_signals(Vm::start(&home, target, &start_options(ctx, true, &target.name)?, &ctx.reporter)).await??;
        let state = vm.state().clone();
        let paths = vm.paths().clone();
        vm.release().await;
        out(&format!(
            "the {name} guest runs (pid {pid}, {accel}); SSH on 127.0.0.1:{port}\n  \
             shell:  dbh vm ssh --target {name}\n  \
             run:    dbh vm exec --target {name} -- CMD...\n  \
             direct: ssh -i {key} -p {port} -o UserKnownHostsFile={kh} root@127.0.0.1\n  \
             stop:   dbh vm stop --target {name}\n",
            name = target.name,
            pid = state.pid,
            accel = state.accel,
            port = state.ssh_port,
            key = paths.image.join("ssh/id_ed25519").display(),
            kh = write_known_hosts(&paths, state.ssh_port)?.display(),
        ))
    })
}

fn write_known_hosts(paths: &vm::Paths, port: u16) -> Result<std::path::PathBuf, Error> {
    let keys = crate::guest::Keys::in_image(&paths.image);
    let kh = paths.known_hosts();
    crate::guest::interactive_command(port, &keys, &kh)?;
    Ok(kh)
}

fn status(ctx: &Context, target: &str, json: bool) -> Result<(), Error> {
    ctx.target(target)?;
    let home = ctx.settings.home();
    match vm::status(&home, target)? {
        Status::Stopped if json => out(&format!("{}\n", serde_json::json!({ "target": target, "running": false }))),
        Status::Stopped => out(&format!("{target}: not running\n")),
        Status::Running(s) => {
            let now = crate::util::time::now_secs();
            let up = now.saturating_sub(s.started);
            if json {
                let v = serde_json::json!({
                    "target": target,
                    "running": true,
                    "pid": s.pid,
                    "ssh": format!("127.0.0.1:{}", s.ssh_port),
                    "ssh_port": s.ssh_port,
                    "uptime_seconds": up,
                    "accelerator": s.accel.to_string(),
                    "detached": s.detached,
                });
                return out(&format!("{v:#}\n"));
            }
            out(&format!(
                "{target}: running\n  pid: {}\n  ssh: 127.0.0.1:{}\n  uptime: {}s\n  accelerator: {}\n  detached: {}\n",
                s.pid, s.ssh_port, up, s.accel, s.detached
            ))
        }
    }
}

fn ssh(ctx: &Context, target: &str) -> Result<(), Error> {
    ctx.target(target)?;
    let home = ctx.settings.home();
    let paths = vm::Paths::new(&home, target);
    let state = match vm::status(&home, target)? {
        Status::Running(s) if s.ssh_port != 0 => s,
        _ => return Err(vm::VmError::NotRunning { target: target.to_owned() }.into()),
    };
    let keys = crate::guest::Keys::in_image(&paths.image);
    let cmd = crate::guest::interactive_command(state.ssh_port, &keys, &paths.known_hosts())?;
    let status = cmd.std_command().status().map_err(|source| {
        crate::process::ProcessError::Spawn { command: cmd.display(), source }
    })?;
    if status.success() {
        Ok(())
    } else {
        // The remote shell's status is the user's business, not a dbh error.
        Err(Error::Exit(status.code().and_then(|c| u8::try_from(c).ok()).unwrap_or(1)))
    }
}

fn exec(ctx: &Context, target: &str, command: &[String]) -> Result<(), Error> {
    let target = ctx.target(target)?;
    let line = crate::guest::shell_join(command);
    let code = block_on(async {
        let home = ctx.settings.home();
        let pass = |stream: crate::process::Stream, data: &[u8]| {
            use std::io::Write;
            let _ = match stream {
                crate::process::Stream::Stdout => std::io::stdout().write_all(data).and_then(|_| std::io::stdout().flush()),
                crate::process::Stream::Stderr => std::io::stderr().write_all(data),
            };
        };
        // A running guest (from `dbh vm start` or another dbh) is used; failing to reach it is an
        // error, not a reason to boot a second one.
        if matches!(vm::status(&home, &target.name)?, Status::Running(_)) {
            let (_, guest) = vm::connect_running(&home, &target.name).await?;
            let code = with_signals(guest.exec_raw(&line, None, pass)).await??;
            guest.disconnect().await;
            return Ok(code);
        }
        // No VM runs: a throw-away one for this command.
        let vm = with_signals(Vm::start(&home, target, &start_options(ctx, false, &target.name)?, &ctx.reporter)).await??;
        let result = with_signals(vm.guest().exec_raw(&line, None, pass)).await;
        let stopped = vm.stop(Shutdown::Quit, &ctx.reporter).await;
        let code = result??;
        stopped?;
        Ok(code)
    })?;
    if code != 0 {
        return Err(Error::Exit(u8::try_from(code).unwrap_or(255)));
    }
    Ok(())
}

/// `dbh vm build`: the vm backend with this command's flags.
fn vm_build(ctx: &Context, common: &BuildCommon, keep_vm: bool, update: bool) -> Result<(), Error> {
    let target = ctx.target(&common.target)?;
    let mut req = super::request(ctx, common);
    req.update = update;
    super::build_with(ctx, target, &req, Kind::Vm, Flags { keep_vm, echo_output: ctx.verbose > 0 })
}

fn image_create(ctx: &Context, args: ImageCreateArgs) -> Result<(), Error> {
    let target = ctx.target(&args.target)?;
    let mut opts = CreateOptions::new(args.stage);
    opts.digests = args.digests;
    opts.keyring = args.keyring;
    opts.insecure_no_signature = args.insecure_no_signature;
    opts.kernel = args.kernel;
    opts.modules = args.modules;
    opts.stub = args.stub;
    opts.disk_bytes = ctx.settings.vm_sizing(&target.name)?.disk_bytes.0;
    let info = image::create(&ctx.settings.home(), target, &opts, &ctx.reporter)?;
    out(&format!(
        "{}: kernel {}, {} init, disk {} MiB, boot {}\n",
        ctx.settings.home().images(&target.name).display(),
        info.kernel_version,
        info.init_system,
        info.disk_size >> 20,
        info.boot
    ))
}

/// `dbh vm image update`: a thin shell over [`crate::build::vm::update_image`].
fn image_update(ctx: &Context, args: ImageUpdateArgs) -> Result<(), Error> {
    let target = ctx.target(&args.target)?;
    let start = start_options(ctx, false, &target.name)?;
    let req = build::Request {
        repos: args.repos.clone(),
        profile: args.profile.clone(),
        jobs: ctx.settings.build.jobs,
        ..Default::default()
    };
    let mut report = None;
    block_on(async {
        let home = ctx.settings.home();
        report = Some(with_signals(build::vm::update_image(&home, target, &req, &args.atoms, &start, &crate::repo::snapshot::Tools::find(&ctx.settings.portage.emerge), &ctx.reporter)).await??);
        Ok(())
    })?;
    let report = report.expect("set by the update");
    if report.installed.is_empty() {
        out(&format!("{}: nothing to install; the image is unchanged\n", target.name))
    } else {
        out(&format!("{}: installed {} into the base image\n", target.name, report.installed.join(" ")))
    }
}
