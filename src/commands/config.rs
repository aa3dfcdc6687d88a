//! `dbh config show`.

use super::{out, Context};
use crate::cli::ConfigCommand;
use crate::Error;

pub fn run(ctx: &Context, cmd: ConfigCommand) -> Result<(), Error> {
    match cmd {
        ConfigCommand::Show => {
            let mut text = String::new();
            for (key, value, origin, doc) in ctx.settings.describe() {
                text.push_str(&format!("# {doc}\n# from: {origin}\n{key} = {value}\n\n"));
            }
            out(&text)
        }
    }
}
