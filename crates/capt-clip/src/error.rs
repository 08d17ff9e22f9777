//! Errors of loading and configuring CLIP. Forward passes return `candle_core::Result`.

use std::path::PathBuf;

/// Everything that can go wrong while reading a CLIP config or checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum ClipError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path} is not valid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    #[error("{file}: unsupported config `{field}` = {value} ({expected})")]
    UnsupportedConfig {
        file: PathBuf,
        field: String,
        value: String,
        expected: String,
    },

    #[error(
        "{file}: missing tensor `{name}` (expected shape {expected:?}); \
         the checkpoint must hold every CLIP weight under HF or OpenAI names"
    )]
    MissingTensor {
        file: PathBuf,
        name: String,
        expected: Vec<usize>,
    },

    #[error(
        "{file}: tensor `{name}` has shape {found:?}, expected {expected:?}; \
         the checkpoint does not match the config"
    )]
    ShapeMismatch {
        file: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    #[error("{file}: {reason}")]
    UnknownFormat { file: PathBuf, reason: String },

    /// A hub id that could not be resolved (`id` = `repo@revision`).
    #[error("hub model {id}: {reason}")]
    Hub { id: String, reason: String },

    /// An architecture fact (activation, head width) that neither the checkpoint nor `--arch`
    /// gives; `what` is the file or the `--arch` value.
    #[error("{what}: {reason}")]
    UnknownArch { what: String, reason: String },

    #[error("{file}: cannot read safetensors: {source}")]
    Safetensors {
        file: PathBuf,
        #[source]
        source: candle_core::Error,
    },

    #[error("unsupported dtype {0:?}: CLIP loads as f32, f16, bf16 or f64")]
    UnsupportedDType(candle_core::DType),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, ClipError>;
