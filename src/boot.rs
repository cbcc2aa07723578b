//! `kiln boot`: boots an image the way Firecracker would (to be written).

use std::path::PathBuf;

use serde::Serialize;

/// How the test key reaches the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyVia {
    /// Written into a throwaway copy of the image (any image).
    Inject,
    /// Passed on the kernel command line as `kiln.authorized_key=` (images
    /// whose `user` step has `keys_from: [cmdline]`).
    Cmdline,
}

/// What to boot and how.
#[derive(Debug, Clone)]
pub struct BootOptions {
    pub image: PathBuf,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub key_via: KeyVia,
    /// The login user (default `agent`).
    pub user: String,
    /// Run only the first two stages (boot, SSH login).
    pub login_only: bool,
}

/// One stage's result.
#[derive(Debug, Clone, Serialize)]
pub struct Stage {
    pub name: String,
    pub passed: bool,
    pub seconds: f64,
    pub detail: String,
}

/// Why booting could not even be tried, or a stage failed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BootError(pub String);

/// Boots the image and runs the stages; calls `report` as each stage ends.
pub fn boot(
    _options: &BootOptions,
    _report: &mut dyn FnMut(&Stage),
) -> Result<Vec<Stage>, BootError> {
    Err(BootError("kiln boot is not written yet".into()))
}
