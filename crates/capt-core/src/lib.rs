//! `capt-core` owns the small pieces every capt binary shares and that must stay free of
//! candle so the edge runtime can use them:
//!
//! - [`tokenizer`]: CLIP's byte-level BPE tokenizer ([`ClipTokenizer`]), bundled so it works
//!   offline, equal to open_clip's `SimpleTokenizer` / `open_clip.tokenize` (text cleaning
//!   included) on the committed fixture; also loads a Hugging Face CLIP `tokenizer.json`.
//! - [`preprocess`]: CLIP's eval image transform (decode, resize shorter side bicubic, centre
//!   crop, normalise) with hostile-input checks; identical to open_clip + Pillow on the
//!   committed real images (Pillow's resampler reproduced bit for bit, JPEGs decoded by
//!   libjpeg-turbo as Pillow does).
//!
//! - [`fs`]: the one home of the file helpers (atomic file and folder writes, sha256).
//!
//! The manifest types that travel between trainer, exporter and runtime also belong here.
//! Parity fixtures come from `tools/ref_core.py` (see tests/fixtures/core/).

pub mod fs;
pub mod preprocess;
pub mod tokenizer;

pub use preprocess::{
    chw_len, decode_image, load_image, ImageBatch, PreprocessConfig, PreprocessError,
};
pub use tokenizer::{ClipTokenizer, TokenBatch, TokenizerError};
