//! An I/O error at a path: the one shape every layer's error enum carries for
//! a failed file-system call (`Io(#[from] IoAt)`), so that each message names
//! the file and reads `PATH: ERROR`.
//!
//! ```ignore
//! std::fs::read(&path).map_err(io_at(&path))?;
//! ```

use std::io;
use std::path::{Path, PathBuf};

/// A failed I/O call and the path it was about.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct IoAt {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// Attaches `path` to an I/O error: `.map_err(io_at(&path))?` in a function
/// whose error type has `From<IoAt>`.
pub fn io_at(path: &Path) -> impl FnOnce(io::Error) -> IoAt + '_ {
    move |source| IoAt {
        path: path.to_path_buf(),
        source,
    }
}
