//! `capt-clip` owns the CLIP backbone used by the trainer: text and vision towers written on
//! autograd-safe candle ops (so prompt gradients flow), with slots for learned prompt
//! embeddings, deep prompts and visual prompts, and loading of HF-format / OpenAI checkpoints.
//!
//! - [`ClipModel::load`] reads HF directories, OpenAI / open_clip state dicts (safetensors or
//!   `torch.save`) and OpenAI's TorchScript `.pt` files ([`torch_file`]);
//!   [`ClipModel::load_with`] takes an `--arch` for files that do not say their activation;
//!   [`ClipModel::new`] builds from any `VarBuilder` with HF tensor names.
//! - [`hub`]: Hugging Face hub ids resolved into the standard hub cache; [`BackboneSpec`]:
//!   what `--backbone` names (tiny, a path with an optional `--arch`, a hub id), resolved.
//! - [`ClipTextTower`]: `forward_ids`, `forward_embeds` (learned prompts, deep prompts),
//!   `build_prompts` (context spliced after SOT).
//! - [`ClipVisionTower`]: global + local projected features, deep visual prompts.
//! - [`Mode`]: autograd-safe kernels, or fused ones when no gradient is needed (`Auto` decides).

pub mod backbone;
pub mod config;
pub mod error;
mod fast;
pub mod hub;
mod layers;
pub mod load;
pub mod model;
pub mod text;
pub mod torch_file;
pub mod vision;

pub use backbone::{BackboneSpec, ResolvedBackbone};
pub use config::{Activation, ClipConfig, ClipTextConfig, ClipVisionConfig};
pub use error::{ClipError, Result};
pub use layers::Mode;
pub use load::{
    arch_hint, backbone_hash, expected_tensors, load_hf_tensors, load_hf_tensors_with,
    resolve_checkpoint, ArchHint, CheckpointFiles, CheckpointFormat, LoadOptions,
};
pub use model::{l2_normalize, ClipModel};
pub use text::{ClipTextTower, DeepTextPrompts, TextPrompts};
pub use vision::{ClipVisionTower, VisionOutput, VisualPrompts};
