//! SGD as `torch.optim.SGD(momentum, weight_decay)` with `clip_grad_norm_` before it:
//! `g <- g * min(1, clip / (||g||_2 + 1e-6))` over all gradients together, then
//! `d = g + wd * p`, `v = mu * v + d` (v starts at 0, i.e. `v = d` on the first step, as torch),
//! `p <- p - lr * v`. Parameters without a gradient are skipped (torch's `p.grad is None`).

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor};

use crate::error::{Result, TrainError};
use crate::params::{read_safetensors, tensors_to_safetensors, ParamStore};

/// Parameter-name prefix of the CAPT head (its own lr group).
const HEAD_PREFIX: &str = "capt.";

#[derive(Debug, Clone)]
pub struct Sgd {
    pub momentum: f64,
    pub weight_decay: f64,
    pub grad_clip: Option<f64>,
    /// Learning-rate multiplier of the CAPT head's parameters (`capt.*`: adapter, router,
    /// gains), `optim.head_lr / optim.lr`; 1 = one group.
    pub head_lr_scale: f64,
    /// Momentum buffers by parameter name.
    buffers: BTreeMap<String, Tensor>,
}

/// What one step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Global L2 norm of the raw gradients (before clipping).
    pub grad_norm: f64,
    /// Parameters that received a gradient.
    pub updated: usize,
}

impl Sgd {
    pub fn new(momentum: f64, weight_decay: f64, grad_clip: Option<f64>) -> Self {
        Self {
            momentum,
            weight_decay,
            grad_clip,
            head_lr_scale: 1.0,
            buffers: BTreeMap::new(),
        }
    }

    /// The head's parameters (`capt.*`) train at `scale` times the schedule's lr.
    pub fn with_head_lr_scale(mut self, scale: f64) -> Self {
        self.head_lr_scale = scale;
        self
    }

    /// One update of every parameter of `params` that has a gradient in `grads`.
    pub fn step(&mut self, params: &ParamStore, grads: &GradStore, lr: f64) -> Result<StepStats> {
        let mut with_grad: Vec<(&String, &candle_core::Var, Tensor)> = Vec::new();
        for (name, var) in params.iter() {
            if let Some(g) = grads.get(var.as_tensor()) {
                with_grad.push((name, var, g.to_dtype(var.dtype())?));
            }
        }
        let mut sq = 0f64;
        for (_, _, g) in &with_grad {
            sq += g
                .sqr()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
        }
        let grad_norm = sq.sqrt();
        let scale = match self.grad_clip {
            Some(c) if c > 0.0 => (c / (grad_norm + 1e-6)).min(1.0),
            _ => 1.0,
        };
        for (name, var, g) in &with_grad {
            let g = if scale < 1.0 { (g * scale)? } else { g.clone() };
            let p = var.as_tensor();
            let d = if self.weight_decay != 0.0 {
                (g + (p * self.weight_decay)?)?
            } else {
                g
            };
            let v = match self.buffers.get(*name) {
                Some(buf) if self.momentum != 0.0 => ((buf * self.momentum)? + d)?,
                _ => d,
            };
            let lr = if name.starts_with(HEAD_PREFIX) {
                lr * self.head_lr_scale
            } else {
                lr
            };
            var.set(&(p - (&v * lr)?)?)?;
            if self.momentum != 0.0 {
                self.buffers.insert((*name).clone(), v.detach());
            }
        }
        Ok(StepStats {
            grad_norm,
            updated: with_grad.len(),
        })
    }

    pub fn buffers(&self) -> &BTreeMap<String, Tensor> {
        &self.buffers
    }

    /// Momentum buffers as `momentum.<param>` tensors, plus `extra` tensors (RNG state).
    pub fn to_safetensors(&self, extra: &[(String, Tensor)]) -> Result<Vec<u8>> {
        let mut all: Vec<(String, Tensor)> = self
            .buffers
            .iter()
            .map(|(k, v)| (format!("momentum.{k}"), v.clone()))
            .collect();
        all.extend(extra.iter().cloned());
        tensors_to_safetensors(&all, None)
    }

    /// Restores the buffers from [`Self::to_safetensors`]'s bytes (checked against `params`);
    /// returns the other tensors.
    pub fn load_safetensors(
        &mut self,
        bytes: &[u8],
        source: &Path,
        params: &ParamStore,
    ) -> Result<BTreeMap<String, Tensor>> {
        let device = params
            .iter()
            .next()
            .map(|(_, v)| v.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        let mut rest = BTreeMap::new();
        self.buffers.clear();
        for (name, t) in read_safetensors(bytes, source, &device)? {
            match name.strip_prefix("momentum.") {
                Some(p) => {
                    let var = params.var(p).map_err(|_| {
                        TrainError::checkpoint(
                            source,
                            format!("momentum buffer for unknown tensor `{p}`"),
                        )
                    })?;
                    if var.dims() != t.dims() {
                        return Err(TrainError::checkpoint(
                            source,
                            format!(
                                "momentum of `{p}` has shape {:?}, expected {:?}",
                                t.dims(),
                                var.dims()
                            ),
                        ));
                    }
                    self.buffers.insert(p.to_string(), t);
                }
                None => {
                    rest.insert(name, t);
                }
            }
        }
        Ok(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Two steps by hand: p = [1, -2], loss = sum(p^2) -> g = 2p.
    #[test]
    fn matches_torch_sgd_by_hand() {
        let mut ps = ParamStore::new(DType::F32);
        ps.insert_data("w", &[2], vec![1.0, -2.0], &Device::Cpu)
            .unwrap();
        let mut opt = Sgd::new(0.9, 0.1, None);
        let mut p = [1.0f64, -2.0];
        let mut v = [0.0f64; 2];
        for step in 0..2 {
            let w = ps.get("w").unwrap();
            let loss = w.sqr().unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            opt.step(&ps, &grads, 0.5).unwrap();
            for i in 0..2 {
                let d = 2.0 * p[i] + 0.1 * p[i];
                v[i] = if step == 0 { d } else { 0.9 * v[i] + d };
                p[i] -= 0.5 * v[i];
            }
            let got = ps.get("w").unwrap().to_vec1::<f32>().unwrap();
            for i in 0..2 {
                assert!(
                    (got[i] as f64 - p[i]).abs() < 1e-5,
                    "step {step}: {got:?} vs {p:?}"
                );
            }
        }
    }

    #[test]
    fn clipping_scales_to_the_global_norm() {
        let mut ps = ParamStore::new(DType::F32);
        ps.insert_data("a", &[1], vec![3.0], &Device::Cpu).unwrap();
        ps.insert_data("b", &[1], vec![4.0], &Device::Cpu).unwrap();
        // loss = a*1 + b*1 after scaling the values: grads 3 and 4 via loss = (a^2 + b^2) / 2.
        let loss = ((ps.get("a").unwrap().sqr().unwrap() + ps.get("b").unwrap().sqr().unwrap())
            .unwrap()
            * 0.5)
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        let mut opt = Sgd::new(0.0, 0.0, Some(1.0));
        let s = opt.step(&ps, &grads, 1.0).unwrap();
        assert!((s.grad_norm - 5.0).abs() < 1e-6);
        // clipped gradient = (3, 4) / 5 (up to the 1e-6 guard)
        let a = ps.get("a").unwrap().to_vec1::<f32>().unwrap()[0];
        let b = ps.get("b").unwrap().to_vec1::<f32>().unwrap()[0];
        assert!(
            (a - (3.0 - 0.6)).abs() < 1e-5 && (b - (4.0 - 0.8)).abs() < 1e-5,
            "{a} {b}"
        );
    }
}
