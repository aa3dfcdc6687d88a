//! (in progress)

use crate::error::Hint;

#[derive(Debug, thiserror::Error)]
pub enum BinhostError {}

impl Hint for BinhostError {}
