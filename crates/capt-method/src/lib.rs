//! `capt-method` owns the CAPT method itself, independent of any tensor engine where it can
//! be, and without file I/O of its own: the method configuration with every default of
//! `docs/METHOD.md`, the Confusion Bank (counts, near misses, ring-buffer cells over a capped
//! feature pool, the text-similarity prior), the CAPT head written once over
//! `capt_graph::Ops` ([`head`]), the rule for changing a tuned model's class set
//! ([`classes`]), and the confusion metrics (top-1, macro-F1, base/novel/HM, Correction
//! Rate). Heatmaps and report files are the trainer's.

pub mod bank;
pub mod classes;
pub mod config;
pub mod descriptions;
pub mod head;
pub mod metrics;

pub use bank::{BankError, ConfusionBank, Observation};
pub use config::{CaptConfig, ConfigError, Method};
