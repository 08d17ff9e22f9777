//! `capt-backend`: what every capt edge inference engine shares. The [`Backend`] trait (one
//! loaded `classifier.onnx`, shared by all requests), the exported model directory with its
//! [`Manifest`] (`capt.json`) and validation, and small helpers (top-k, warm-up checks).
//! No engine lives here: see `capt-backend-tract` and `capt-backend-ort`.

pub mod backend;
pub mod manifest;

pub use backend::{
    check_batch, check_input_dims, check_io_names, load_error, max_abs_diff, synthetic_batch,
    top_k, warm_up, Backend, BackendError, ClassifierOutput, INPUT_NAME, INT8_COMPUTE_OPS,
    LOGITS_NAME, PROBS_NAME,
};
pub use capt_core::{ImageBatch, PreprocessConfig};
pub use manifest::{
    sha256_file, FileEntry, Manifest, ModelDir, ModelDirError, ModelFiles, Precision,
    FORMAT_VERSION, MANIFEST_FILE,
};
