//! `dbh build …`: picks a backend. Only the VM backend exists; `auto` takes it (no cross
//! toolchain is set up by dbh yet), `cross` and `chroot` are not implemented.

use super::Context;
use crate::Error;
use crate::cli::{Backend, BuildArgs};
use crate::events::{Event, Reporter as _};

pub fn run(ctx: &Context, args: BuildArgs) -> Result<(), Error> {
    match args.backend {
        Backend::Vm => super::vm::vm_build(ctx, &args.common, false, false),
        Backend::Auto => {
            ctx.reporter.event(Event::Note {
                message: format!("building for {} in its guest: no cross toolchain is set up for it", args.common.target),
            });
            super::vm::vm_build(ctx, &args.common, false, false)
        }
        Backend::Cross => Err(Error::NotImplemented { command: "build --backend cross" }),
        Backend::Chroot => Err(Error::NotImplemented { command: "build --backend chroot" }),
    }
}
