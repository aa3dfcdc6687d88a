//! `dbh build …`: picks a backend (`auto` asks [`crate::build::choice`] and says why), runs it,
//! and prints what was published. The printing and the request are shared by `dbh vm build` and
//! `dbh cross build`.

use super::{Context, out};
use crate::Error;
use crate::build::{self, BuildError, Outcome, Request};
use crate::cli::{Backend, BuildArgs, BuildCommon};
use crate::events::{Event, Reporter as _};
use crate::target::{Target, Targets};

pub fn run(ctx: &Context, args: BuildArgs) -> Result<(), Error> {
    match args.backend {
        Backend::Vm => super::vm::vm_build(ctx, &args.common, false, false, false),
        Backend::Cross => cross_build(ctx, &args.common),
        Backend::Chroot => chroot_build(ctx, &args.common),
        Backend::Auto => {
            let targets = Targets::load()?;
            let target = targets.get(&args.common.target)?;
            let portage = build::cross::HostPortage::find(std::path::Path::new(ctx.settings.str("portage.emerge").unwrap_or("emerge")));
            let choice = build::choice::choose(target, &args.common.atoms, build::toolchain::find(target), portage);
            ctx.reporter.event(Event::Note { message: format!("backend: {} ({})", choice.backend_name(), choice.reason) });
            match choice.picked {
                build::choice::Picked::Cross(_) => cross_build(ctx, &args.common),
                build::choice::Picked::Vm => super::vm::vm_build(ctx, &args.common, false, false, false),
            }
        }
    }
}

/// The backend-independent request from the command line and settings.
pub(super) fn request(ctx: &Context, common: &BuildCommon) -> Request {
    let jobs = common.jobs.or_else(|| ctx.settings.int("build.jobs").map(|j| j.clamp(1, 1024) as u32)).unwrap_or(1);
    Request {
        repos: common.repos.clone(),
        profile: common.profile.clone(),
        jobs,
        atoms: common.atoms.clone(),
        emerge_args: common.emerge_args.clone(),
        distcc: None,
        update: false,
        gentoo_binhost: false,
    }
}

/// Prints what a build published (stdout) and turns failed packages into the exit status: for
/// the host-side backends with a hint to build them in a guest instead.
pub(super) fn finish(target: &Target, outcome: &Outcome, backend: &'static str) -> Result<(), Error> {
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
    out(&text)?;
    if outcome.failed.is_empty() {
        return Ok(());
    }
    if backend != "vm" {
        return Err(BuildError::BackendFailed {
            backend,
            target: target.name.clone(),
            packages: outcome.failed.iter().map(|f| f.cpv.clone()).collect(),
            log_dir: outcome.log_dir.clone(),
        }
        .into());
    }
    let list: Vec<String> = outcome
        .failed
        .iter()
        .map(|f| format!("{} (log: {})", f.cpv, f.log.as_deref().map_or_else(|| "none".into(), |p| p.display().to_string())))
        .collect();
    Err(Error::Failed(format!("{} package(s) failed to build: {}", list.len(), list.join(", "))))
}

/// `dbh cross build` and `dbh build --backend cross`.
pub(super) fn cross_build(ctx: &Context, common: &BuildCommon) -> Result<(), Error> {
    let targets = Targets::load()?;
    let target = targets.get(&common.target)?;
    let opts = build::cross::CrossOptions {
        emerge: ctx.settings.str("portage.emerge").unwrap_or("emerge").into(),
        echo_output: ctx.verbose > 0,
    };
    let outcome = build::cross::build(&ctx.settings.home(), target, &request(ctx, common), &opts, &ctx.reporter)?;
    finish(target, &outcome, "cross")
}

/// `dbh build --backend chroot`.
fn chroot_build(ctx: &Context, common: &BuildCommon) -> Result<(), Error> {
    let targets = Targets::load()?;
    let target = targets.get(&common.target)?;
    let opts = build::chroot::ChrootOptions { echo_output: ctx.verbose > 0 };
    let outcome = build::chroot::build(&ctx.settings.home(), target, &request(ctx, common), &opts, &ctx.reporter)?;
    finish(target, &outcome, "chroot")
}
