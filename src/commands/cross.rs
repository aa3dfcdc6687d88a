//! `dbh cross build`: the cross backend, as `dbh build --backend cross`.

use super::Context;
use crate::Error;
use crate::cli::CrossCommand;

pub fn run(ctx: &Context, cmd: CrossCommand) -> Result<(), Error> {
    match cmd {
        CrossCommand::Build(args) => super::build::cross_build(ctx, &args.common),
    }
}
