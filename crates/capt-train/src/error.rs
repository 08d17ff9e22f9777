//! Errors of the trainer. Each names the file, tensor or setting at fault and the fix.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A bad command line or config value.
    #[error("{0}")]
    Config(String),

    #[error(transparent)]
    MethodConfig(#[from] capt_method::ConfigError),

    #[error(transparent)]
    Data(#[from] capt_data::DataError),

    #[error(transparent)]
    Clip(#[from] capt_clip::ClipError),

    #[error(transparent)]
    Tokenizer(#[from] capt_core::TokenizerError),

    #[error(transparent)]
    Bank(#[from] capt_method::BankError),

    #[error(transparent)]
    Descriptions(#[from] capt_method::descriptions::DescriptionsError),

    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),

    #[error("CAPT head: {0}")]
    Graph(#[from] capt_graph::Error),

    #[error(transparent)]
    Head(#[from] capt_method::head::HeadError),

    #[error(transparent)]
    Stored(#[from] capt_checkpoint::CheckpointError),

    #[error("cannot {what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("checkpoint {}: {reason}", path.display())]
    Checkpoint { path: PathBuf, reason: String },

    #[error(
        "checkpoint {} was trained on backbone {trained_path} (sha256 {trained_sha}) but the backbone given \
         is {given_path} (sha256 {given_sha}); pass the checkpoint's backbone with --backbone, or retrain"
    , checkpoint.display())]
    BackboneMismatch {
        checkpoint: PathBuf,
        trained_path: String,
        trained_sha: String,
        given_path: String,
        given_sha: String,
    },

    #[error(
        "loss is {loss} at epoch {epoch} step {step} (method {method}); training stopped. {kept}. \
         Lower optim.lr or set optim.grad_clip"
    )]
    NonFiniteLoss {
        loss: f64,
        epoch: usize,
        step: usize,
        method: String,
        kept: String,
    },
}

pub type Result<T> = std::result::Result<T, TrainError>;

impl TrainError {
    pub fn io(what: &'static str, path: &Path, source: std::io::Error) -> Self {
        TrainError::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    }

    pub fn checkpoint(path: &Path, reason: impl Into<String>) -> Self {
        TrainError::Checkpoint {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}
