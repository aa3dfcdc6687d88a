//! `dbh uki build`: assemble a UKI from a systemd-stub, a kernel, an initramfs and a command line.
//! Without `--initrd` but with `--modules ROOT/lib/modules/<version>`, the initramfs is generated
//! from ROOT (its busybox or shell/kmod/util-linux, and those modules): its tools must run on the
//! target's CPU, so they never come from the host.

use std::path::Path;

use super::Context;
use crate::cli::{UkiBuildArgs, UkiCommand};
use crate::events::{Event, Reporter};
use crate::uki::{self, initramfs, UkiError};
use crate::Error;

pub fn run(ctx: &Context, cmd: UkiCommand) -> Result<(), Error> {
    match cmd {
        UkiCommand::Build(args) => build(ctx, args),
    }
}

/// `<root>/lib/modules/<version>` -> `<root>`.
fn root_of_modules(modules: &Path) -> Option<&Path> {
    let lib_modules = modules.parent()?;
    let lib = lib_modules.parent()?;
    let root = lib.parent()?;
    // usr/lib/modules/<v> -> go one more up
    if lib.file_name().is_some_and(|n| n == "lib") && root.file_name().is_some_and(|n| n == "usr") {
        root.parent()
    } else {
        Some(root)
    }
}

fn build(ctx: &Context, args: UkiBuildArgs) -> Result<(), Error> {
    let target = ctx.target(&args.target)?;
    let read = |p: &Path| fs_err::read(p).map_err(|source| UkiError::File(crate::util::fs::FileError::Read { path: p.to_owned(), source }));
    let kernel = read(&args.kernel)?;
    let stage_root = args.modules.as_deref().and_then(root_of_modules).map(Path::to_owned);
    let initrd = match (&args.initrd, &args.modules) {
        (Some(p), _) => read(p)?,
        (None, Some(modules)) => {
            let root = stage_root.clone().unwrap_or_else(|| Path::new("/").to_owned());
            let built = initramfs::build(&initramfs::Spec {
                root: &root,
                modules_dir: Some(modules),
                modules: &target.initramfs.modules,
                tools: initramfs::Tools::Auto,
                compression: initramfs::Compression::Gzip,
            })
            .map_err(UkiError::from)?;
            ctx.reporter.event(Event::Note {
                message: format!("generated initramfs from {}: modules {}", root.display(), built.load_order.join(" ")),
            });
            built.data
        }
        (None, None) => Vec::new(),
    };
    let stub = uki::find_stub(target, args.stub.as_deref(), stage_root.as_deref())?;
    let bytes = uki::assemble(&uki::UkiParts {
        stub,
        kernel,
        initrd,
        cmdline: args.cmdline.clone().unwrap_or_else(|| uki::default_cmdline(target)),
        osrel: uki::os_release(stage_root.as_deref()),
        uname: args.modules.as_deref().and_then(uki::modules_version),
    })?;
    uki::write_atomic(&args.out, &bytes)?;
    ctx.reporter.note(format!("wrote {} ({} bytes)", args.out.display(), bytes.len()));
    Ok(())
}
