//! `capt-export`: turns a CAPT training checkpoint (or a bare CLIP, for zero-shot) into
//! deployable ONNX.
//!
//! It owns one boundary: reading a checkpoint (as host tensors, `capt-checkpoint`) and its
//! backbone (hash-checked, `capt-clip`'s loaders) into a `capt_package::Package`
//! ([`source`]). Everything after that — the graphs, int8 / f16, the manifest, the atomic
//! write, the Triton layout, classes beyond the trained ones — is `capt-package`'s, the code
//! `capt-edge` edits exports with. It does not depend on `capt-train`.

pub mod error;
pub mod source;

pub use capt_package::{
    build_graphs, classifier_graph, export, export_steps, export_with_progress,
    image_encoder_graph, text_encoder_graph, BuildReport, ExportOptions, ExportReport, Format,
    Graph, Package, Precision,
};
pub use error::{ExportError, Result};
pub use source::{from_checkpoint, read_class_file, zero_shot, Classes};

/// The old name of [`Package`] (what an export is made from).
pub type ExportSource = Package;
