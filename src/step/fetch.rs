//! `fetch`: a fixed-output download (to be written).

use serde::Deserialize;

use super::{StepContext, StepError};
use crate::digest::KeyEncoder;
use crate::sandbox::Action;

/// The `fetch:` step fields.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Fetch {
    pub npm: String,
}

impl Fetch {
    pub(super) fn encode(&self, enc: &mut KeyEncoder) {
        enc.str(&self.npm);
    }

    pub(super) fn action(&self, _ctx: &StepContext) -> Result<Action, StepError> {
        Err(StepError::Other("fetch is not written yet".into()))
    }
}
