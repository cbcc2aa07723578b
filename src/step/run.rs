//! `run`: a shell script executed with `/bin/sh -e` inside the step's root.

use serde::{Deserialize, Serialize};

use super::{Kind, StepContext, StepError};
use crate::digest::KeyEncoder;
use crate::sandbox::Action;

/// A script run in the root (the recipe value is the script text).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Run {
    pub script: String,
}

impl Kind for Run {
    fn encode(&self, enc: &mut KeyEncoder, _: &StepContext) -> Result<(), StepError> {
        enc.str(&self.script);
        Ok(())
    }

    fn action(&self, _: &StepContext) -> Result<Action, StepError> {
        Ok(Action::Chroot {
            argv: vec![
                "/bin/sh".into(),
                "-e".into(),
                "-c".into(),
                self.script.clone(),
            ],
        })
    }

    fn runs_in_root(&self) -> bool {
        true
    }

    /// The script is the step's one field.
    fn params(&self) -> serde_json::Value {
        serde_json::json!({ "script": self.script })
    }
}
