//! `capt-export`: turns a CAPT training checkpoint (or a bare CLIP, for zero-shot) into
//! deployable ONNX.
//!
//! It owns the export boundary: reading a checkpoint and its backbone (hash-checked) into a
//! `capt_model::ModelSpec` plus named parameters ([`source`]), emitting the model's graphs —
//! written once over `capt_graph::Ops` in `capt-model` — through `capt_onnx::OnnxBuilder`
//! (`classifier.onnx`, `text_encoder.onnx`, `image_encoder.onnx`), optional f16 compute
//! (`capt_onnx::to_f16_compute`) or int8 weight storage, and writing the model directory (`capt.json` manifest) or a Triton repository
//! atomically ([`write`], [`triton`]).

pub mod error;
pub mod source;
pub mod triton;
pub mod write;

pub use error::{ExportError, Result};
pub use source::{from_checkpoint, read_class_file, zero_shot, Classes, ExportSource};
pub use write::{
    build_graphs, classifier_graph, export, export_steps, export_with_progress,
    image_encoder_graph, text_encoder_graph, BuildReport, ExportOptions, ExportReport, Format,
    Graph, Precision,
};
