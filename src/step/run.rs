//! `run`: a shell script executed with `/bin/sh -e` inside the step's root.

use serde::{Deserialize, Serialize};

use crate::digest::KeyEncoder;
use crate::sandbox::Action;

/// A script run in the root (the recipe value is the script text).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Run {
    pub script: String,
}

impl Run {
    pub(super) fn encode(&self, enc: &mut KeyEncoder) {
        enc.str(&self.script);
    }

    pub(super) fn action(&self) -> Action {
        Action::Chroot {
            argv: vec![
                "/bin/sh".into(),
                "-e".into(),
                "-c".into(),
                self.script.clone(),
            ],
        }
    }
}
