//! Errors of the exporter. Each names the file or option at fault and the fix.

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// Bad user input: options, class lists, checkpoints, backbones.
    #[error("{0}")]
    Input(String),
    /// The checkpoint's content could not be turned into export parameters.
    #[error("export source: {0}")]
    Source(String),
    #[error(transparent)]
    Checkpoint(#[from] capt_checkpoint::CheckpointError),
    #[error(transparent)]
    Data(#[from] capt_data::DataError),
    #[error(transparent)]
    Package(#[from] capt_package::PackageError),
    #[error(transparent)]
    Clip(#[from] capt_clip::ClipError),
    #[error(transparent)]
    Model(#[from] capt_model::ModelError),
    #[error(transparent)]
    Graph(#[from] capt_graph::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, ExportError>;
