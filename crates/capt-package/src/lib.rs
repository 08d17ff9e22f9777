//! `capt-package`: the exported model directory as a type. No candle.
//!
//! One owner for everything an export is made of, so the exporter and the edge runtime write
//! and edit it through the same code:
//! - [`Package`]: a [`capt_model::ModelSpec`], its class names and every parameter its graphs
//!   read, by name (from a checkpoint in `capt-export`, or from an exported classifier in
//!   [`classes`]);
//! - the graph emitters, one per graph ([`classifier_graph`], [`text_encoder_graph`],
//!   [`image_encoder_graph`]), each the `capt-model` code recorded by `capt_onnx::OnnxBuilder`,
//!   with int8 weight storage or f16 compute applied ([`build_graphs`]);
//! - the manifest (`capt.json`, [`capt_backend::Manifest`]) and the atomic commit of the
//!   directory ([`export`]) or of a Triton repository ([`triton`]);
//! - the graphs' input and output names ([`io_names`]);
//! - the class set ([`classes`]): `capt-export --classes all|FILE` exports the trained
//!   classes and retargets them, `capt-edge add-class` / `remove-class` retarget an exported
//!   directory; both go through [`classes::retarget`].

pub mod classes;
mod error;
pub mod triton;
mod write;

pub use capt_backend::Precision;
pub use error::{PackageError, Result};
pub use write::{
    build_graphs, classifier_graph, export, export_steps, export_with_progress,
    image_encoder_graph, text_encoder_graph, write_manifest, BuildReport, ExportOptions,
    ExportReport, Format, Graph, Package,
};

/// Names of the graphs' inputs and outputs, and of the graph roles (file stems).
pub mod io_names {
    /// The classifier's contract with the runtimes is `capt_backend`'s.
    pub use capt_backend::{
        INPUT_NAME as PIXEL_VALUES, LOGITS_NAME as LOGITS, PROBS_NAME as PROBS,
    };
    pub const INPUT_IDS: &str = "input_ids";
    pub const IMAGE_EMBEDS: &str = "image_embeds";
    pub const GLOBAL: &str = "global";
    pub const LOCAL: &str = "local";
    pub const CLASSIFIER: &str = "classifier";
    pub const TEXT_ENCODER: &str = "text_encoder";
    pub const IMAGE_ENCODER: &str = "image_encoder";
}
