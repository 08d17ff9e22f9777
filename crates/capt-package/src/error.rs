//! Errors of building, writing and editing an exported model. Each names the file, class or
//! option at fault and the fix.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    /// Bad user input: options, class lists, model directories.
    #[error("{0}")]
    Input(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Creating, filling or renaming the temporary output folder failed.
    #[error("cannot write the output folder: {0}")]
    Commit(#[from] std::io::Error),
    #[error(transparent)]
    ModelDir(#[from] capt_backend::ModelDirError),
    #[error(transparent)]
    Model(#[from] capt_model::ModelError),
    #[error(transparent)]
    Onnx(#[from] capt_onnx::Error),
    #[error(transparent)]
    Graph(#[from] capt_graph::Error),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

pub type Result<T> = std::result::Result<T, PackageError>;

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PackageError + '_ {
    move |source| PackageError::Io {
        path: path.to_path_buf(),
        source,
    }
}
