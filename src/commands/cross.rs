//! `dbh cross build`: the cross backend, as `dbh build --backend cross`.

use super::Context;
use crate::Error;
use crate::build::backend::{Flags, Kind};
use crate::cli::CrossCommand;

pub fn run(ctx: &Context, cmd: CrossCommand) -> Result<(), Error> {
    match cmd {
        CrossCommand::Build(args) => {
            let target = ctx.target(&args.common.target)?;
            let flags = Flags { keep_vm: false, echo_output: ctx.verbose > 0 };
            super::build_with(ctx, target, &super::request(ctx, &args.common), Kind::Cross, flags)
        }
    }
}
