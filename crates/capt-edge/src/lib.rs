//! `capt-edge`: the edge runtime of capt. It serves an exported model directory (`capt.json` +
//! `classifier.onnx`) on tract (default, pure Rust) or ONNX Runtime, from the command line
//! (`classify`, `bench`) or over HTTP (`serve`) with dynamic batching, and edits its label set
//! (`add-class`, `remove-class`: `capt_package::classes`, the exporter's own class path and
//! classifier emitter). No candle.

pub mod batcher;
pub mod bench;
pub mod classify;
pub mod cli;
pub mod client;
pub mod engine;
pub mod input;
pub mod loadtest;
pub mod metrics;
pub mod openapi;
pub mod server;
