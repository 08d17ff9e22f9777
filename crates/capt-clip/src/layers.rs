//! Transformer building blocks shared by both towers, with HF tensor names.
//!
//! Every op here has a backward pass in candle unless `fast` is set: LayerNorm goes through
//! `layer_norm_slow` math and attention through `ops::softmax`. The fused kernels (ours in
//! `crate::fast` for f32 on CPU, else candle's `ops::layer_norm` / `softmax_last_dim`) have no
//! backward and silently cut gradients, so they are only used when nothing needs a gradient
//! (see [`Mode`]).

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{init, Init, VarBuilder};

use crate::config::Activation;
use crate::fast;

/// Which kernels a forward pass uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// `Fast` when neither the weights nor any input (embeddings, prompts, pixels) track
    /// gradients, `Autograd` otherwise. Always correct; the default.
    #[default]
    Auto,
    /// Autograd-safe ops only (`layer_norm_slow` math, `ops::softmax`).
    Autograd,
    /// Fused inference kernels (in-place bias + activation / residual, LayerNorm and softmax;
    /// candle's `ops::layer_norm` / `softmax_last_dim` off f32 CPU): gradients do not flow
    /// through LayerNorm or attention. Batches are run in chunks that keep activations < 24 MB.
    Fast,
}

impl Mode {
    /// Resolves `Auto` for one call: `weights_track` says whether the weights are variables.
    pub(crate) fn is_fast(self, weights_track: bool, inputs: &[&Tensor]) -> bool {
        match self {
            Mode::Fast => true,
            Mode::Autograd => false,
            Mode::Auto => !weights_track && inputs.iter().all(|t| !t.track_op()),
        }
    }
}

/// LayerNorm over the last dim.
#[derive(Debug, Clone)]
pub(crate) struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(dim, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(dim, "bias", init::ZERO)?,
            eps,
        })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn forward(&self, x: &Tensor, fast: bool) -> Result<Tensor> {
        // candle's fused kernel has no F64 path; F64 is only used for gradient checks anyway.
        let ours = [x, &self.weight, &self.bias].into_iter().all(fast::fusable);
        if fast && ours && x.is_contiguous() {
            x.apply_op3_no_bwd(&self.weight, &self.bias, &fast::LayerNorm(self.eps as f32))
        } else if fast && x.dtype() != DType::F64 && x.is_contiguous() {
            candle_nn::ops::layer_norm(x, &self.weight, &self.bias, self.eps as f32)
        } else {
            layer_norm(x, &self.weight, &self.bias, self.eps)
        }
    }
}

/// `candle_nn::ops::layer_norm_slow` math, with the epsilon kept in f64 (that function takes it
/// as f32) so F64 runs use exactly PyTorch's 1e-5.
pub(crate) fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let internal = match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    };
    let n = x.dim(D::Minus1)? as f64;
    let x = x.to_dtype(internal)?;
    let x = x.broadcast_sub(&(x.sum_keepdim(D::Minus1)? / n)?)?;
    let var = (x.sqr()?.sum_keepdim(D::Minus1)? / n)?;
    x.broadcast_div(&(var + eps)?.sqrt()?)?
        .to_dtype(dtype)?
        .broadcast_mul(weight)?
        .broadcast_add(bias)
}

/// `y = x W^T + b` over the last dim, W stored `[out, in]` as in HF / PyTorch.
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn from_parts(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    pub fn new(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = vb.get_with_hints((out_dim, in_dim), "weight", kaiming())?;
        let bias = if bias {
            Some(vb.get_with_hints(out_dim, "bias", init::ZERO)?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }
}

impl Linear {
    /// `act(x W^T + b) + residual`. With `fast` and untracked f32 CPU tensors, bias, activation
    /// and residual are applied in one in-place pass over the GEMM output (`crate::fast`).
    pub fn forward_with(
        &self,
        x: &Tensor,
        act: Option<Activation>,
        residual: Option<&Tensor>,
        fast: bool,
    ) -> Result<Tensor> {
        let in_dim = x.dim(D::Minus1)?;
        let out_dim = self.weight.dim(0)?;
        let dims = x.dims();
        let rows = x.elem_count() / in_dim.max(1);
        let mut out_dims = dims[..dims.len() - 1].to_vec();
        out_dims.push(out_dim);
        // One 2-D GEMM over all rows: the weight is shared, so batch dims fold into M.
        let y = x.reshape((rows, in_dim))?.matmul(&self.weight.t()?)?;
        let fused = fast
            && fast::fusable(x)
            && fast::fusable(&self.weight)
            && residual.is_none_or(fast::fusable)
            && (act.is_none() || residual.is_none());
        match &self.bias {
            Some(b) if fused && fast::fusable(b) => {
                match residual {
                    None => y.inplace_op2(b, &fast::BiasAct(act))?,
                    Some(r) => {
                        let r = r.reshape((rows, out_dim))?.contiguous()?;
                        y.inplace_op3(b, &r, &fast::BiasResidual)?
                    }
                }
                y.reshape(out_dims)
            }
            _ => {
                let mut y = match &self.bias {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                };
                if let Some(act) = act {
                    y = activation(&y, act, fast)?;
                }
                let y = y.reshape(out_dims)?;
                match residual {
                    Some(r) => r + y,
                    None => Ok(y),
                }
            }
        }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, None, None, false)
    }
}

/// Kaiming-uniform fan-in init, for models built on a `VarMap` (tests, benchmarks).
pub(crate) fn kaiming() -> Init {
    init::DEFAULT_KAIMING_UNIFORM
}

fn activation(x: &Tensor, act: Activation, fast: bool) -> Result<Tensor> {
    match act {
        Activation::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
        Activation::Gelu if fast => x.gelu_erf(),
        // candle's `gelu_erf` backward uses 0.398942 for 1/sqrt(2 pi) (7e-7 relative error,
        // visible in F64 gradient checks); erf's backward is exact.
        Activation::Gelu => {
            ((x * 0.5)? * (x / std::f64::consts::SQRT_2)?.erf()?.affine(1.0, 1.0)?)?.contiguous()
        }
    }
}

/// Multi-head self-attention with q/k/v fused into one `[3W, W]` projection (one GEMM instead
/// of three) and the `1/sqrt(head_dim)` scale folded into the q rows.
#[derive(Debug, Clone)]
pub(crate) struct Attention {
    qkv: Linear,
    out_proj: Linear,
    num_heads: usize,
    head_dim: usize,
}

impl Attention {
    pub fn new(vb: VarBuilder, dim: usize, num_heads: usize) -> Result<Self> {
        let head_dim = dim / num_heads;
        let scale = (head_dim as f64).powf(-0.5);
        let part = |name: &str| -> Result<(Tensor, Tensor)> {
            let vb = vb.pp(name);
            let w = vb.get_with_hints((dim, dim), "weight", kaiming())?;
            Ok((w, vb.get_with_hints(dim, "bias", init::ZERO)?))
        };
        let (qw, qb) = part("q_proj")?;
        let (kw, kb) = part("k_proj")?;
        let (vw, vb_) = part("v_proj")?;
        let weight = Tensor::cat(&[&(qw * scale)?, &kw, &vw], 0)?;
        let b = Tensor::cat(&[&(qb * scale)?, &kb, &vb_], 0)?;
        Ok(Self {
            qkv: Linear::from_parts(weight, Some(b)),
            out_proj: Linear::new(vb.pp("out_proj"), dim, dim, true)?,
            num_heads,
            head_dim,
        })
    }

    /// `residual + attn(x)`: `x: [B, N, W]`; `mask`: additive `[N, N]` (e.g. causal), broadcast
    /// over batch and heads.
    pub fn forward(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        residual: &Tensor,
        fast: bool,
    ) -> Result<Tensor> {
        let (b, n, w) = x.dims3()?;
        let (h, dh) = (self.num_heads, self.head_dim);
        let qkv = self
            .qkv
            .forward_with(x, None, None, fast)?
            .reshape((b, n, 3, h, dh))?
            .permute((2, 0, 3, 1, 4))?
            .contiguous()?; // [3, B, H, N, dh]
        let q = qkv.get(0)?;
        let k = qkv.get(1)?;
        let v = qkv.get(2)?;
        let att = q.matmul(&k.t()?)?; // [B, H, N, N]; k^T is a strided view the GEMM reads directly
        let att = if fast && fast::fusable(&att) && mask.is_none_or(fast::fusable) {
            match mask {
                Some(m) => att.inplace_op2(&m.contiguous()?, &fast::MaskedSoftmax)?,
                None => att.inplace_op1(&fast::Softmax)?,
            }
            att
        } else {
            let att = match mask {
                Some(m) => att.broadcast_add(m)?,
                None => att,
            };
            if fast {
                candle_nn::ops::softmax_last_dim(&att)?
            } else {
                candle_nn::ops::softmax(&att, D::Minus1)?
            }
        };
        let out = att.matmul(&v)?.transpose(1, 2)?.reshape((b, n, w))?;
        self.out_proj.forward_with(&out, None, Some(residual), fast)
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Mlp {
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl Mlp {
    pub fn new(vb: VarBuilder, dim: usize, hidden: usize, act: Activation) -> Result<Self> {
        Ok(Self {
            fc1: Linear::new(vb.pp("fc1"), dim, hidden, true)?,
            fc2: Linear::new(vb.pp("fc2"), hidden, dim, true)?,
            act,
        })
    }

    /// `residual + mlp(x)`.
    pub fn forward(&self, x: &Tensor, residual: &Tensor, fast: bool) -> Result<Tensor> {
        let h = self.fc1.forward_with(x, Some(self.act), None, fast)?;
        self.fc2.forward_with(&h, None, Some(residual), fast)
    }
}

/// Pre-LN transformer block: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`.
#[derive(Debug, Clone)]
pub(crate) struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: Attention,
    layer_norm2: LayerNorm,
    mlp: Mlp,
}

/// Sizes of one tower's transformer.
pub(crate) struct EncoderDims {
    pub width: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub layers: usize,
    pub act: Activation,
    pub eps: f64,
}

impl EncoderLayer {
    pub fn new(vb: VarBuilder, d: &EncoderDims) -> Result<Self> {
        Ok(Self {
            layer_norm1: LayerNorm::new(vb.pp("layer_norm1"), d.width, d.eps)?,
            self_attn: Attention::new(vb.pp("self_attn"), d.width, d.heads)?,
            layer_norm2: LayerNorm::new(vb.pp("layer_norm2"), d.width, d.eps)?,
            mlp: Mlp::new(vb.pp("mlp"), d.width, d.intermediate, d.act)?,
        })
    }

    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>, fast: bool) -> Result<Tensor> {
        let h = self.layer_norm1.forward(x, fast)?;
        let x = self.self_attn.forward(&h, mask, x, fast)?;
        let h = self.layer_norm2.forward(&x, fast)?;
        self.mlp.forward(&h, &x, fast)
    }
}

/// The `encoder.layers.N` stack of a tower.
pub(crate) fn encoder_layers(vb: VarBuilder, d: &EncoderDims) -> Result<Vec<EncoderLayer>> {
    let vb = vb.pp("layers");
    (0..d.layers)
        .map(|i| EncoderLayer::new(vb.pp(i), d))
        .collect()
}

/// Broadcasts prompt tokens `[n, W]` (shared) or `[B, n, W]` to `[B, n, W]`, contiguous so the
/// following `cat` stays on candle's contiguous path.
pub(crate) fn expand_prompt(p: &Tensor, batch: usize, width: usize, what: &str) -> Result<Tensor> {
    match p.dims() {
        &[n, w] if w == width => p.unsqueeze(0)?.broadcast_as((batch, n, w))?.contiguous(),
        &[b, _, w] if b == batch && w == width => Ok(p.clone()),
        dims => candle_core::bail!(
            "{what}: prompt tokens have shape {dims:?}, expected [n, {width}] or [{batch}, n, {width}]"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn x() -> Tensor {
        let v: Vec<f32> = (0..24).map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.3).collect();
        Tensor::from_vec(v, (2, 3, 4), &Device::Cpu).unwrap()
    }

    #[test]
    fn autograd_layer_norm_matches_fused_kernel() {
        let dev = Device::Cpu;
        let w = Tensor::new(&[1.0f32, 0.5, -2.0, 1.5], &dev).unwrap();
        let b = Tensor::new(&[0.1f32, -0.2, 0.0, 0.3], &dev).unwrap();
        let ln = LayerNorm {
            weight: w,
            bias: b,
            eps: 1e-5,
        };
        let slow = ln.forward(&x(), false).unwrap();
        let fast = ln.forward(&x(), true).unwrap();
        let d = (slow - fast).unwrap().abs().unwrap().max_all().unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-5);
    }

    #[test]
    fn auto_mode_is_fast_only_without_tracked_tensors() {
        let plain = x();
        let var = Var::from_tensor(&plain).unwrap();
        assert!(Mode::Auto.is_fast(false, &[&plain]));
        assert!(!Mode::Auto.is_fast(false, &[&plain, var.as_tensor()]));
        assert!(!Mode::Auto.is_fast(true, &[&plain]));
        assert!(Mode::Fast.is_fast(true, &[var.as_tensor()]));
        assert!(!Mode::Autograd.is_fast(false, &[&plain]));
    }

    #[test]
    fn prompt_shapes_are_checked() {
        let p = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(expand_prompt(&p, 3, 4, "p").unwrap().dims(), &[3, 2, 4]);
        assert!(expand_prompt(&p, 3, 5, "p").is_err());
        let pb = Tensor::zeros((3, 2, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(expand_prompt(&pb, 2, 4, "p").is_err());
    }
}
