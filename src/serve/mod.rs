//! (in progress)

use crate::error::Hint;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {}

impl Hint for ServeError {}
