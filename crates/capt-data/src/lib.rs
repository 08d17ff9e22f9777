//! `capt-data` owns datasets: readers for the CoOp/Dassl `$DATA` layout and custom folders,
//! the few-shot and base-to-novel protocol, the training loader with augmentation, and the
//! frozen-encoder feature cache.
//!
//! - [`Dataset::load`] reads one of the 15 benchmark datasets ([`DatasetKind`]) from CoOp's
//!   folders and split files, or a custom folder; [`check_dataset`] lists every problem.
//! - [`Dataset::with_protocol`] applies CoOp's protocol bit-exactly: few-shot sampling with
//!   CPython's `random` ([`PyRandom`]), cached in `split_fewshot/shot_K-seed_S.json`, then the
//!   base/new class split.
//! - [`DataLoader`] decodes in parallel and applies [`TrainAugment`] or the test transform.
//! - [`FeatureCache`] stores N augmented views per image encoded by a [`FrozenImageEncoder`].
//!
//! ```no_run
//! use capt_data::{Dataset, DatasetKind, Protocol, Subsample};
//! let ds = Dataset::load(DatasetKind::OxfordPets, "/data")?;
//! let (base, _) = ds.with_protocol(&Protocol::new(16, 1, Subsample::Base))?;
//! assert_eq!(base.num_classes(), 19);
//! # Ok::<(), capt_data::DataError>(())
//! ```

pub mod augment;
pub mod catalog;
pub mod check;
pub mod dataset;
pub mod datum;
pub mod error;
pub mod feature_cache;
pub mod fsutil;
pub mod loader;
pub mod protocol;
pub mod pyrandom;
pub mod readers;
pub mod split_file;

pub use augment::{view_rng, CropBox, TrainAugment};
pub use catalog::{prompt_classname, DatasetKind, Layout, EUROSAT_CLASSNAMES};
pub use check::{check_dataset, CheckReport, ClassCount, SplitReport};
pub use dataset::Dataset;
pub use datum::{Datum, Problem, Severity, Split, Splits};
pub use error::{DataError, Result};
pub use feature_cache::{
    CacheStats, EncodedViews, FeatureCache, FeatureCacheConfig, FrozenImageEncoder, ImageFeatures,
};
pub use loader::{Batch, Batches, DataLoader, LoaderConfig, Transform};
pub use protocol::{
    base_new_labels, fewshot_cache_file, generate_fewshot, load_or_sample_fewshot, sample_fewshot,
    split_by_label, subsample_classes, CacheOutcome, FewShot, FewShotCache, Protocol, Subsample,
};
pub use pyrandom::PyRandom;
pub use readers::{read_imagenet_classnames, LoadOptions};
pub use split_file::{read_split_file, write_split_file};
