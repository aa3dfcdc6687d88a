//! (in progress)

use crate::error::Hint;

#[derive(Debug, thiserror::Error)]
pub enum SignError {}

impl Hint for SignError {}
