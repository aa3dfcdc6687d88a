//! `dbh build …`: not implemented yet.

use super::Context;
use crate::Error;

pub fn run<T>(_ctx: &Context, _args: T) -> Result<(), Error> {
    Err(Error::NotImplemented { command: "build" })
}
