//! `dbh client explain`: glue over [`crate::client`].

use super::{Context, out};
use crate::Error;
use crate::cli::ClientCommand;

pub fn run(ctx: &Context, cmd: ClientCommand) -> Result<(), Error> {
    match cmd {
        ClientCommand::Explain { binhost, config_root, atoms, emerge_args } => {
            let req = crate::client::Request {
                binhost: binhost.clone(),
                config_root,
                atoms,
                emerge: ctx.settings.portage.emerge.clone(),
                emerge_args,
            };
            let report = crate::client::explain(&req)?;
            if ctx.verbose > 0 {
                out(&format!("ran: {}\n", report.command))?;
            }
            out(&crate::client::render(&report, &binhost))?;
            if report.all_binary() { Ok(()) } else { Err(Error::Exit(1)) }
        }
    }
}
