//! CLIP vision tower (`vision_model.*` + `visual_projection`) with deep visual prompts.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::config::{ClipConfig, ClipVisionConfig};
use crate::layers::{
    encoder_layers, expand_prompt, EncoderDims, EncoderLayer, LayerNorm, Linear, Mode,
};

/// Deep visual prompts (MaPLe / IVLP): `layers[0]` is appended after the patch tokens before
/// `pre_layrnorm` (so it enters layer 0), `layers[k]` (k >= 1) replaces those tokens before
/// layer `k`. Each entry is `[n, W]` (shared) or `[B, n, W]`, all with the same `n`. Prompt tokens
/// are not part of the local outputs.
#[derive(Debug, Clone, Default)]
pub struct VisualPrompts {
    pub layers: Vec<Tensor>,
}

/// Projected image features.
#[derive(Debug, Clone)]
pub struct VisionOutput {
    /// `[B, D]`: `visual_projection(post_layernorm(CLS))`, un-normalised.
    pub global: Tensor,
    /// `[B, P, D]`: `visual_projection(post_layernorm(patch tokens))`, row-major patch order.
    pub local: Tensor,
}

#[derive(Debug, Clone)]
pub struct ClipVisionTower {
    /// Conv weight flattened to `[W, C * p * p]`: the stride-p conv is a GEMM on unfolded patches.
    patch_embedding: Linear,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    layers: Vec<EncoderLayer>,
    post_layernorm: LayerNorm,
    projection: Linear,
    cfg: ClipVisionConfig,
    mode: Mode,
    weights_track: bool,
}

impl ClipVisionTower {
    /// `vb` is the model root (reads `vision_model.*` and `visual_projection.weight`).
    pub fn new(vb: VarBuilder, cfg: &ClipConfig) -> Result<Self> {
        let c = &cfg.vision;
        let (w, p, ch) = (c.hidden_size, c.patch_size, c.num_channels);
        let vm = vb.pp("vision_model");
        let emb = vm.pp("embeddings");
        let std = |s: f64| Init::Randn {
            mean: 0.0,
            stdev: s,
        };
        let conv = emb.pp("patch_embedding").get_with_hints(
            (w, ch, p, p),
            "weight",
            std(((ch * p * p) as f64).powf(-0.5)),
        )?;
        let patch_embedding = Linear::from_parts(conv.reshape((w, ch * p * p))?, None);
        let class_embedding =
            emb.get_with_hints(w, "class_embedding", std((w as f64).powf(-0.5)))?;
        let position_embedding = emb.pp("position_embedding").get_with_hints(
            (c.num_patches() + 1, w),
            "weight",
            std(0.02),
        )?;
        let dims = EncoderDims {
            width: w,
            intermediate: c.intermediate_size,
            heads: c.num_attention_heads,
            layers: c.num_hidden_layers,
            act: c.hidden_act,
            eps: c.layer_norm_eps,
        };
        let pre_layrnorm = LayerNorm::new(vm.pp("pre_layrnorm"), w, c.layer_norm_eps)?;
        let layers = encoder_layers(vm.pp("encoder"), &dims)?;
        let post_layernorm = LayerNorm::new(vm.pp("post_layernorm"), w, c.layer_norm_eps)?;
        let projection = Linear::new(vb.pp("visual_projection"), w, cfg.projection_dim, false)?;
        let weights_track = post_layernorm.weight().track_op();
        Ok(Self {
            patch_embedding,
            class_embedding,
            position_embedding,
            pre_layrnorm,
            layers,
            post_layernorm,
            projection,
            cfg: c.clone(),
            mode: Mode::Auto,
            weights_track,
        })
    }

    pub fn set_mode(&mut self, mode: Mode) {
        self.mode = mode;
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn config(&self) -> &ClipVisionConfig {
        &self.cfg
    }

    pub fn dtype(&self) -> DType {
        self.position_embedding.dtype()
    }

    pub fn device(&self) -> &Device {
        self.position_embedding.device()
    }

    /// `pixels [B, C, H, W]` (normalised, `H = W = image_size`; cast to the model dtype) to
    /// global and local projected features.
    pub fn forward(
        &self,
        pixels: &Tensor,
        prompts: Option<&VisualPrompts>,
    ) -> Result<VisionOutput> {
        let c = &self.cfg;
        let (b, ch, h, w) = pixels.dims4()?;
        if ch != c.num_channels || h != c.image_size || w != c.image_size {
            candle_core::bail!(
                "pixels have shape {:?}, expected [B, {}, {}, {}]",
                pixels.dims(),
                c.num_channels,
                c.image_size,
                c.image_size
            );
        }
        let prompt_layers = prompts.map(|p| p.layers.as_slice()).unwrap_or(&[]);
        if prompt_layers.len() > self.layers.len() {
            candle_core::bail!(
                "{} visual prompt layers given; the tower has {} layers",
                prompt_layers.len(),
                self.layers.len()
            );
        }
        let mut inputs = vec![pixels];
        inputs.extend(prompt_layers.iter());
        let fast = self.mode.is_fast(self.weights_track, &inputs);
        let rows = ((c.num_patches() + 1) * c.intermediate_size).max(1);
        let per_chunk = (crate::fast::CHUNK_FLOATS / rows).max(1);
        if !fast || b <= per_chunk {
            return self.run(pixels, prompt_layers, fast);
        }
        let (mut global, mut local) = (Vec::new(), Vec::new());
        for start in (0..b).step_by(per_chunk) {
            let len = per_chunk.min(b - start);
            let prompts: Vec<Tensor> = prompt_layers
                .iter()
                .map(|p| match p.rank() {
                    3 => p.narrow(0, start, len),
                    _ => Ok(p.clone()),
                })
                .collect::<Result<_>>()?;
            let out = self.run(&pixels.narrow(0, start, len)?, &prompts, fast)?;
            global.push(out.global);
            local.push(out.local);
        }
        Ok(VisionOutput {
            global: Tensor::cat(&global, 0)?,
            local: Tensor::cat(&local, 0)?,
        })
    }

    /// [`Self::forward`] on validated inputs.
    fn run(&self, pixels: &Tensor, prompt_layers: &[Tensor], fast: bool) -> Result<VisionOutput> {
        let c = &self.cfg;
        let (b, ch, _, _) = pixels.dims4()?;
        let (g, p, width) = (c.grid_size(), c.patch_size, c.hidden_size);
        let n_patch = g * g;
        // Unfold non-overlapping p x p patches to rows [B*P, C*p*p] in the conv weight's order.
        let patches = pixels
            .to_dtype(self.dtype())?
            .reshape((b, ch, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b, n_patch, ch * p * p))?;
        let patches = self.patch_embedding.forward(&patches)?;
        let cls = self
            .class_embedding
            .reshape((1, 1, width))?
            .broadcast_as((b, 1, width))?
            .contiguous()?;
        let mut x = Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&self.position_embedding)?;
        let n_tok = n_patch + 1;
        if let Some(p0) = prompt_layers.first() {
            let p0 = expand_prompt(&p0.to_dtype(x.dtype())?, b, width, "visual prompt 0")?;
            x = Tensor::cat(&[&x, &p0], 1)?;
        }
        x = self.pre_layrnorm.forward(&x, fast)?;
        for (i, layer) in self.layers.iter().enumerate() {
            if i >= 1 {
                if let Some(pi) = prompt_layers.get(i) {
                    let pi = expand_prompt(&pi.to_dtype(x.dtype())?, b, width, "visual prompt")?;
                    if n_tok + pi.dim(1)? != x.dim(1)? {
                        candle_core::bail!(
                            "visual prompt {i} has {} tokens, layer 0 had {}",
                            pi.dim(1)?,
                            x.dim(1)? - n_tok
                        );
                    }
                    x = Tensor::cat(&[&x.narrow(1, 0, n_tok)?, &pi], 1)?;
                }
            }
            x = layer.forward(&x, None, fast)?;
        }
        let x = if x.dim(1)? > n_tok {
            x.narrow(1, 0, n_tok)?.contiguous()?
        } else {
            x
        };
        let y = self
            .projection
            .forward(&self.post_layernorm.forward(&x, fast)?)?;
        Ok(VisionOutput {
            global: y.narrow(1, 0, 1)?.squeeze(1)?.contiguous()?,
            local: y.narrow(1, 1, n_patch)?.contiguous()?,
        })
    }
}
