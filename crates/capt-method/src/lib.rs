//! `capt-method` owns the CAPT method itself, independent of any tensor engine where it can
//! be: the method configuration with every default of `docs/METHOD.md`, the Confusion Bank
//! (counts, near misses, ring-buffer cells over a capped feature pool, the text-similarity
//! prior), and the confusion metrics (top-1, macro-F1, base/novel/HM, Correction Rate,
//! heatmaps) that judge it.

pub mod bank;
pub mod config;
pub mod descriptions;
pub mod head;
pub mod metrics;

pub use bank::{BankError, ConfusionBank, Observation};
pub use config::{CaptConfig, ConfigError, Method};
