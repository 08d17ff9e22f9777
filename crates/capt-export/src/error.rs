//! Errors of the exporter. Each names the file or option at fault and the fix.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// Bad user input: options, class lists, checkpoints, backbones.
    #[error("{0}")]
    Input(String),
    /// The checkpoint's content could not be turned into export parameters.
    #[error("export source: {0}")]
    Source(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Boxed: the trainer's error is large and exports fail rarely.
    #[error(transparent)]
    Train(Box<capt_train::TrainError>),
    #[error(transparent)]
    Clip(#[from] capt_clip::ClipError),
    #[error(transparent)]
    Model(#[from] capt_model::ModelError),
    #[error(transparent)]
    Onnx(#[from] capt_onnx::Error),
    #[error(transparent)]
    Graph(#[from] capt_graph::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, ExportError>;

impl From<capt_train::TrainError> for ExportError {
    fn from(e: capt_train::TrainError) -> Self {
        ExportError::Train(Box::new(e))
    }
}

pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> ExportError + '_ {
    move |source| ExportError::Io {
        path: path.to_path_buf(),
        source,
    }
}
