//! Errors of reading and writing checkpoints: each names the file and the fix.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot {what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("checkpoint {}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
}

pub type Result<T> = std::result::Result<T, CheckpointError>;

impl CheckpointError {
    pub fn io(what: &'static str, path: &Path, source: std::io::Error) -> Self {
        CheckpointError::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    }

    pub fn invalid(path: &Path, reason: impl Into<String>) -> Self {
        CheckpointError::Invalid {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}
