//! Errors of model assembly.

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model spec: {0}")]
    Spec(String),
    #[error(transparent)]
    Graph(#[from] capt_graph::Error),
    #[error(transparent)]
    Head(#[from] capt_method::head::HeadError),
}

pub type Result<T> = std::result::Result<T, ModelError>;
