//! Errors of the ONNX writer / reader.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A graph-building error (bad op arguments, missing parameter, ...).
    #[error(transparent)]
    Graph(#[from] capt_graph::Error),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The bytes are not an ONNX ModelProto.
    #[error("{}: not a valid ONNX model ({source}); the file is truncated or corrupt - re-export it", path.display())]
    Decode {
        path: PathBuf,
        #[source]
        source: prost::DecodeError,
    },
    /// The protobuf decoded but the model is incomplete or inconsistent.
    #[error("{}: invalid ONNX model: {msg}; the file is truncated or corrupt - re-export it", path.display())]
    Invalid { path: PathBuf, msg: String },
    /// A model in memory is incomplete or holds data capt cannot read.
    #[error("invalid ONNX model: {0}")]
    Model(String),
    /// The model is too large for the chosen layout.
    #[error("{}: {msg}", path.display())]
    TooLarge { path: PathBuf, msg: String },
    /// tract could not load or run the model.
    #[error("tract ({}): {msg}", path.display())]
    Tract { path: PathBuf, msg: String },
}

pub type Result<T> = std::result::Result<T, Error>;
