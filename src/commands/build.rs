//! `dbh build …`: picks a backend (`auto` asks [`crate::build::choice`] and says why), runs it
//! through [`crate::build::backend`], and prints what was published.

use super::Context;
use crate::Error;
use crate::build::backend::{Flags, Kind};
use crate::build::{self, choice::Picked};
use crate::cli::{Backend, BuildArgs};
use crate::events::{Event, Reporter as _};

pub fn run(ctx: &Context, args: BuildArgs) -> Result<(), Error> {
    let target = ctx.target(&args.common.target)?;
    let kind = match args.backend {
        Backend::Vm => Kind::Vm,
        Backend::Cross => Kind::Cross,
        Backend::Chroot => Kind::Chroot,
        Backend::Auto => {
            let portage = build::cross::HostPortage::find(&ctx.settings.portage.emerge);
            let choice = build::choice::choose(target, &args.common.atoms, build::toolchain::find(target), portage);
            ctx.reporter.event(Event::Note { message: format!("backend: {} ({})", choice.backend_name(), choice.reason) });
            match choice.picked {
                Picked::Cross(_) => Kind::Cross,
                Picked::Vm => Kind::Vm,
            }
        }
    };
    let flags = Flags { keep_vm: false, echo_output: ctx.verbose > 0 };
    super::build_with(ctx, target, &super::request(ctx, &args.common), kind, flags)
}
