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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;
    use std::collections::HashMap;

    /// Tiny random model with plain (untracked) weights, as a loaded checkpoint has.
    fn tiny() -> ClipModel {
        let cfg = ClipConfig::tiny();
        let vm = VarMap::new();
        ClipModel::new(VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu), &cfg).unwrap();
        let t: HashMap<String, Tensor> = vm
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
            .collect();
        ClipModel::new(VarBuilder::from_tensors(t, DType::F32, &Device::Cpu), &cfg).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn chunked_fast_batches_equal_row_by_row_autograd_results() {
        // `CHUNK_FLOATS` is tiny under cfg(test), so these batches run in several chunks.
        let mut m = tiny();
        let dev = Device::Cpu;
        let px = Tensor::randn(0f32, 1.0, (5, 3, 32, 32), &dev).unwrap();
        let ids: Vec<u32> = (0..5u32)
            .flat_map(|r| {
                (0..77u32).map(move |j| match j {
                    0 => 598,
                    j if j == 3 + r => 599,
                    j if j < 3 + r => 1 + (r * 31 + j * 17) % 590,
                    _ => 0,
                })
            })
            .collect();
        let ids = Tensor::from_vec(ids, (5, 77), &dev).unwrap();
        let vp = crate::vision::VisualPrompts {
            layers: vec![Tensor::randn(0f32, 1.0, (5, 2, 48), &dev).unwrap()],
        };
        let img = m.vision.forward(&px, Some(&vp)).unwrap();
        let txt = m.text.forward_ids(&ids).unwrap();
        m.set_mode(Mode::Autograd);
        for i in 0..5 {
            let vpi = crate::vision::VisualPrompts {
                layers: vec![vp.layers[0].narrow(0, i, 1).unwrap()],
            };
            let one = m
                .vision
                .forward(&px.narrow(0, i, 1).unwrap(), Some(&vpi))
                .unwrap();
            assert!(max_diff(&one.local, &img.local.narrow(0, i, 1).unwrap()) < 1e-5);
            assert!(max_diff(&one.global, &img.global.narrow(0, i, 1).unwrap()) < 1e-5);
            let t = m.text.forward_ids(&ids.narrow(0, i, 1).unwrap()).unwrap();
            assert!(max_diff(&t, &txt.narrow(0, i, 1).unwrap()) < 1e-5);
        }
    }
}
