//! The deployable CAPT model, written once over [`capt_graph::Ops`].
//!
//! This crate owns what an exported model computes: the CLIP towers ([`clip`]), the
//! classifier (image encoder, base logits against the baked class embeddings and the CAPT
//! head of `capt_method::head`), the image-encoder and text-encoder graphs ([`graphs`]), and
//! the serialisable [`ModelSpec`] that describes them. `capt-export` emits these functions as
//! ONNX through `capt_onnx::OnnxBuilder`; the edge runtime re-emits the classifier with more
//! classes (add-class) from the parameters stored in the exported file; candle executes the
//! same code in parity tests. It does not depend on candle.

pub mod clip;
mod error;
pub mod graphs;
pub mod spec;
pub mod tokens;

pub use error::{ModelError, Result};
pub use spec::{
    Act, ClipSpec, ModelSpec, TextFamily, TextSpec, TextTowerSpec, TowerSpec, VisionSpec,
};

/// Parameter names of the baked per-class state (classifier initializers).
pub mod names {
    pub const LOGIT_SCALE: &str = "logit_scale";
    pub const CLASS_EMB: &str = "table.class_emb";
    /// Learned contexts (as in the training checkpoint).
    pub const CTX: &str = "prompt.ctx";
    pub const COM_CTX: &str = "sem.com_ctx";
    pub const DIF_CTX: &str = "sem.dif_ctx";

    pub fn deep_text(k: usize) -> String {
        format!("prompt.deep.{k}")
    }

    pub fn visual(k: usize) -> String {
        format!("prompt.visual.{k}")
    }

    /// The exported name of a CAPT head table (`capt_method::head::HeadTables::NAMES`).
    pub fn table(name: &str) -> String {
        format!("table.{name}")
    }
}
