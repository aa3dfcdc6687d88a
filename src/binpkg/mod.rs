//! (in progress)

use crate::error::Hint;

#[derive(Debug, thiserror::Error)]
pub enum BinpkgError {}

impl Hint for BinpkgError {}
