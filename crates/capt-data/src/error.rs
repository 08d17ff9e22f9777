//! Errors of the data crate. Every variant names the file or entry at fault and, where
//! there is one, the fix.

use std::path::{Path, PathBuf};

use capt_core::PreprocessError;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("unknown dataset {name:?}; known datasets: {known}")]
    UnknownDataset { name: String, known: String },

    #[error("{what} not found at {}; {fix}", path.display())]
    Missing {
        what: String,
        path: PathBuf,
        fix: String,
    },

    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{} is not valid JSON ({reason}); expected {expected}", path.display())]
    Json {
        path: PathBuf,
        reason: String,
        expected: String,
    },

    /// Entry-level problems of a split file or folder, all of them at once.
    #[error("{} has {} problem(s):\n{}", source_path.display(), problems.len(), list_problems(problems))]
    Invalid {
        source_path: PathBuf,
        problems: Vec<String>,
    },

    #[error("image of {entry}: {source}")]
    Image {
        entry: String,
        #[source]
        source: PreprocessError,
    },

    #[error("few-shot cache {} does not match the dataset ({reason}); delete it to resample", path.display())]
    StaleFewShot { path: PathBuf, reason: String },

    #[error("few-shot sampling needs at least one class in {what}")]
    Empty { what: String },

    #[error("feature cache file {}: {reason}", path.display())]
    Cache { path: PathBuf, reason: String },

    #[error("image encoder {backbone:?} failed: {reason}")]
    Encoder { backbone: String, reason: String },

    #[error("invalid configuration: {0}")]
    Config(String),

    /// Labels of the class list that no split row names (each listed).
    #[error("{0}")]
    ImagelessLabels(String),
}

const MAX_LISTED: usize = 20;

fn list_problems(problems: &[String]) -> String {
    let mut out: Vec<String> = problems
        .iter()
        .take(MAX_LISTED)
        .map(|p| format!("  - {p}"))
        .collect();
    if problems.len() > MAX_LISTED {
        out.push(format!(
            "  ... and {} more (run `capt-train data check` for the full list)",
            problems.len() - MAX_LISTED
        ));
    }
    out.join("\n")
}

impl DataError {
    pub(crate) fn write(path: &Path) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |source| DataError::Write {
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

pub type Result<T, E = DataError> = std::result::Result<T, E>;
