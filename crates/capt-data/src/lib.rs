//! `capt-data` owns datasets: readers for the CoOp/Dassl `$DATA` layout and custom folders,
//! the few-shot and base-to-novel protocol, the training loader with augmentation, and the
//! frozen-encoder feature cache.
