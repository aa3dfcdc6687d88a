//! `dbh rootfs build`: the CLI shell around [`crate::rootfs`]. The package list (dry run) and
//! the written files go to stdout; progress to stderr.


use super::{Context, out};
use crate::cli::{RootfsBuildArgs, RootfsCommand, RootfsFormat};
use crate::rootfs::{self, Binhost, Boot, Format, RootfsError};
use crate::sign::KeyStore;
use crate::Error;

pub fn run(ctx: &Context, cmd: RootfsCommand) -> Result<(), Error> {
    match cmd {
        RootfsCommand::Build(args) => build(ctx, args),
    }
}

fn format_of(f: RootfsFormat) -> Format {
    match f {
        RootfsFormat::TarZst => Format::TarZst,
        RootfsFormat::TarXz => Format::TarXz,
        RootfsFormat::Squashfs => Format::Squashfs,
        RootfsFormat::Qcow2 => Format::Qcow2,
        RootfsFormat::Img => Format::Img,
        RootfsFormat::Oci => Format::Oci,
    }
}

fn build(ctx: &Context, args: RootfsBuildArgs) -> Result<(), Error> {
    let target = ctx.target(&args.target)?;
    let home = ctx.settings.home();
    let format = match args.format {
        Some(f) => format_of(f),
        None => Format::from_path(&args.out).ok_or_else(|| RootfsError::UnknownFormat { out: args.out.clone() })?,
    };
    let binhost = match &args.binhost {
        Some(b) => Binhost::parse(b),
        None => Binhost::Dir(home.binhost(&target.name)),
    };
    let sde = match args.source_date_epoch {
        Some(s) => Some(s),
        None => std::env::var("SOURCE_DATE_EPOCH").ok().and_then(|v| v.trim().parse().ok()),
    };
    let config = crate::build::PortageConfig::load_or_create(&home, &target.name)?;
    let req = rootfs::Request {
        binhost,
        repos: args.repos.clone(),
        profile: args.profile.clone(),
        out: std::path::absolute(&args.out).unwrap_or_else(|_| args.out.clone()),
        format,
        boot: args.bootable.then(|| Boot {
            kernel: args.kernel.clone(),
            initrd: args.initrd.clone(),
            modules: args.modules.clone(),
            cmdline: args.cmdline.clone(),
            stub: args.stub.clone(),
        }),
        atoms: args.atoms.clone(),
        emerge: ctx.settings.portage.emerge.clone(),
        keys: KeyStore::new(home.keys()),
        source_date_epoch: sde,
        make_conf: config.make_conf,
        package_use: config.package_use,
        package_accept_keywords: config.package_accept_keywords,
        log_dir: home.logs(&target.name).join(crate::util::time::log_stamp()),
    };
    if args.dry_run {
        let list = rootfs::dry_run(target, &req, &ctx.reporter)?;
        let mut text = String::new();
        for p in &list {
            text.push_str(p);
            text.push('\n');
        }
        return out(&text);
    }
    let outcome = rootfs::build(target, &req, &ctx.reporter)?;
    let mut text = format!(
        "wrote {} ({} package(s), SOURCE_DATE_EPOCH={})\n",
        outcome.out.display(),
        outcome.packages.len(),
        outcome.source_date_epoch
    );
    for f in &outcome.beside {
        text.push_str(&format!("wrote {}\n", f.display()));
    }
    for w in &outcome.warnings {
        text.push_str(&format!("warning: {w}\n"));
    }
    out(&text)
}
