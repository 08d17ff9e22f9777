//! `capt-train`: CAPT prompt tuning of a frozen CLIP on candle (CPU, or CUDA with the `cuda`
//! feature), its evaluation and the base-to-novel protocol.
//!
//! - [`fit`]: the trainer (prompt learner, Confusion Bank, SEM pair prompts, CAPT head,
//!   SGD, resumable checkpoints).
//! - [`evaluate`]: top-1, macro-F1, confusion matrix, base/novel/HM, Correction Rate against a
//!   baseline; `report.json`, `report.md`, heatmaps. Zero-shot CLIP evaluation.
//! - [`b2n`]: the base-to-novel table over datasets, seeds and methods.
//! - [`bench`](mod@bench): training-step cost of CoOp vs CAPT.

pub mod b2n;
pub mod backbone;
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod desc;
pub mod error;
pub mod evaluate;
pub mod features;
pub mod fit;
pub mod heatmap;
pub mod model;
pub mod optim;
pub mod params;
pub mod progress;
pub mod prompts;
pub mod rng;
pub mod tables;

pub use error::{Result, TrainError};
