//! The full CLIP model: both towers and `logit_scale`.

use std::path::{Path, PathBuf};

use candle_core::{Result, Tensor, D};
use candle_nn::{Init, VarBuilder};

use crate::config::ClipConfig;
use crate::layers::Mode;
use crate::text::ClipTextTower;
use crate::vision::ClipVisionTower;

#[derive(Debug, Clone)]
pub struct ClipModel {
    pub text: ClipTextTower,
    pub vision: ClipVisionTower,
    logit_scale: Tensor,
    config: ClipConfig,
    pub(crate) weights_file: Option<PathBuf>,
}

impl ClipModel {
    /// Builds the model from HF-named tensors under `vb` (a `VarMap` initialises them).
    pub fn new(vb: VarBuilder, cfg: &ClipConfig) -> Result<Self> {
        Ok(Self {
            text: ClipTextTower::new(vb.clone(), cfg)?,
            vision: ClipVisionTower::new(vb.clone(), cfg)?,
            logit_scale: vb.get_with_hints((), "logit_scale", Init::Const(cfg.logit_scale_init))?,
            config: cfg.clone(),
            weights_file: None,
        })
    }

    pub fn config(&self) -> &ClipConfig {
        &self.config
    }

    /// The learned log temperature (0-dim); `tau = exp(logit_scale)`.
    pub fn logit_scale(&self) -> &Tensor {
        &self.logit_scale
    }

    /// The weights file this model was loaded from, if any.
    pub fn weights_file(&self) -> Option<&Path> {
        self.weights_file.as_deref()
    }

    /// Sets the kernel mode of both towers.
    pub fn set_mode(&mut self, mode: Mode) {
        self.text.set_mode(mode);
        self.vision.set_mode(mode);
    }

    /// CLIP logits `exp(logit_scale) * norm(image) norm(text)^T`: `[Bi, D] x [Bt, D] -> [Bi, Bt]`
    /// (HF's `logits_per_image`).
    pub fn logits(&self, image_features: &Tensor, text_features: &Tensor) -> Result<Tensor> {
        let sim = l2_normalize(image_features)?.matmul(&l2_normalize(text_features)?.t()?)?;
        self.logit_scale
            .exp()?
            .to_dtype(sim.dtype())?
            .broadcast_mul(&sim)
    }
}

/// `x / ||x||_2` over the last dim (autograd-safe).
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    x.broadcast_div(&x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?)
}
