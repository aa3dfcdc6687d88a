//! The chroot backend (in progress).

use super::{Outcome, Request};
use crate::Error;
use crate::events::Reporter;
use crate::settings::Home;
use crate::target::Target;

#[derive(Debug, Clone, Default)]
pub struct ChrootOptions {
    pub echo_output: bool,
}

pub fn build(_home: &Home, _target: &Target, _req: &Request, _opts: &ChrootOptions, _reporter: &dyn Reporter) -> Result<Outcome, Error> {
    Err(Error::NotImplemented { command: "build --backend chroot" })
}
