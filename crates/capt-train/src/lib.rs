//! `capt-train`: CAPT prompt tuning of a frozen CLIP on candle (CPU, or CUDA with the `cuda`
//! feature), its evaluation and the base-to-novel protocol.
//!
//! - [`fit`]: the trainer (prompt learner, Confusion Bank, SEM pair prompts, CAPT head,
//!   SGD, resumable checkpoints).
//! - [`evaluate`]: top-1, macro-F1, confusion matrix, base/novel/HM, Correction Rate against a
//!   baseline; `report.json`, `report.md`, heatmaps. Zero-shot CLIP evaluation.
//! - [`b2n`]: the base-to-novel table over datasets, seeds and methods.
//! - [`bench`](mod@bench): training-step cost of CoOp vs CAPT.

// The public surface: what the binary, the exporter's parity tests and the benchmarks use.
pub mod b2n;
pub mod backbone;
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod evaluate;
pub mod fit;
pub mod model;
pub mod progress;

mod desc;
mod error;
mod features;
mod heatmap;
mod optim;
mod params;
mod prompts;
mod rng;
mod tables;

#[cfg(test)]
mod grad_tests;

pub use error::{Result, TrainError};
