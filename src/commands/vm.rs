//! `dbh vm …`: guest images (`image create`); the runner commands land with the VM runner.

use super::Context;
use crate::cli::{ImageCommand, ImageCreateArgs, VmCommand};
use crate::image::{self, CreateOptions};
use crate::target::Targets;
use crate::Error;

pub fn run(ctx: &Context, cmd: VmCommand) -> Result<(), Error> {
    match cmd {
        VmCommand::Image(ImageCommand::Create(args)) => image_create(ctx, args),
        _ => Err(Error::NotImplemented { command: "vm" }),
    }
}

fn image_create(ctx: &Context, args: ImageCreateArgs) -> Result<(), Error> {
    let targets = Targets::load()?;
    let target = targets.get(&args.target)?;
    let mut opts = CreateOptions::new(args.stage);
    opts.digests = args.digests;
    opts.keyring = args.keyring;
    opts.kernel = args.kernel;
    opts.modules = args.modules;
    let info = image::create(&ctx.settings.home(), target, &opts, &ctx.reporter)?;
    super::out(&format!(
        "{}: kernel {}, {} init, disk {} MiB\n",
        ctx.settings.home().images(&target.name).display(),
        info.kernel_version,
        toml::to_string(&info.init_system).unwrap_or_default().trim().trim_matches('"'),
        info.disk_size >> 20
    ))
}
