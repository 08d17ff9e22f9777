//! `capt-core` owns the small pieces every capt binary shares and that must stay free of
//! candle so the edge runtime can use them: CLIP's image preprocessing (decode, resize
//! shorter side bicubic, centre crop, normalise) and the CLIP BPE tokenizer (bundled, works
//! offline), plus the manifest types that travel between trainer, exporter and runtime.

pub mod preprocess;

pub use preprocess::{decode_image, load_image, ImageBatch, PreprocessConfig, PreprocessError};
