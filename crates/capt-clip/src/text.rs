//! CLIP text tower (`text_model.*` + `text_projection`) with prompt slots.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, Init, VarBuilder};

use crate::config::ClipConfig;
use crate::layers::{
    encoder_layers, expand_prompt, EncoderDims, EncoderLayer, LayerNorm, Linear, Mode,
};

/// Deep text prompts (IVLP / PromptSRC): `layers[k]` replaces the prompt slots (positions
/// `1..=n`, right after SOT) before text layer `k + 1`. Each entry is `[n, W]` (shared by the
/// batch) or `[B, n, W]`; `n` should equal the number of context tokens the prompts were built with.
#[derive(Debug, Clone, Default)]
pub struct DeepTextPrompts {
    pub layers: Vec<Tensor>,
}

/// Prompt input embeddings ready for [`ClipTextTower::forward_embeds`].
#[derive(Debug, Clone)]
pub struct TextPrompts {
    /// `[C, L, W]`: `[SOT] ctx_1..ctx_n tokens... [EOT] pad`.
    pub embeds: Tensor,
    /// EOT position of each row.
    pub eot_positions: Vec<usize>,
}

/// Text transformer plus `text_projection`: token ids or input embeddings to `[B, D]` features
/// (un-normalised, as HF's `get_text_features`).
#[derive(Debug, Clone)]
pub struct ClipTextTower {
    token_embedding: Embedding,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    projection: Linear,
    width: usize,
    intermediate: usize,
    mode: Mode,
    weights_track: bool,
}

impl ClipTextTower {
    /// `vb` is the model root (reads `text_model.*` and `text_projection.weight`).
    pub fn new(vb: VarBuilder, cfg: &ClipConfig) -> Result<Self> {
        let c = &cfg.text;
        let emb = vb.pp("text_model").pp("embeddings");
        let std = Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        let table = emb.pp("token_embedding").get_with_hints(
            (c.vocab_size, c.hidden_size),
            "weight",
            std,
        )?;
        let position_embedding = emb.pp("position_embedding").get_with_hints(
            (c.max_position_embeddings, c.hidden_size),
            "weight",
            std,
        )?;
        let dims = EncoderDims {
            width: c.hidden_size,
            intermediate: c.intermediate_size,
            heads: c.num_attention_heads,
            layers: c.num_hidden_layers,
            act: c.hidden_act,
            eps: c.layer_norm_eps,
        };
        let layers = encoder_layers(vb.pp("text_model").pp("encoder"), &dims)?;
        let final_layer_norm = LayerNorm::new(
            vb.pp("text_model").pp("final_layer_norm"),
            c.hidden_size,
            c.layer_norm_eps,
        )?;
        let projection = Linear::new(
            vb.pp("text_projection"),
            c.hidden_size,
            cfg.projection_dim,
            false,
        )?;
        let weights_track = final_layer_norm.weight().track_op();
        Ok(Self {
            token_embedding: Embedding::new(table, c.hidden_size),
            position_embedding,
            layers,
            final_layer_norm,
            projection,
            width: c.hidden_size,
            intermediate: c.intermediate_size,
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

    /// Text width `W`.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Context length (77).
    pub fn context_length(&self) -> usize {
        self.position_embedding.dims()[0]
    }

    pub fn dtype(&self) -> DType {
        self.position_embedding.dtype()
    }

    pub fn device(&self) -> &Device {
        self.position_embedding.device()
    }

    /// Token embeddings: `ids [B, L]` (any integer dtype) to `[B, L, W]`.
    pub fn token_embedding(&self, ids: &Tensor) -> Result<Tensor> {
        self.token_embedding.forward(&as_index(ids)?)
    }

    /// EOT position of each row, the argmax of the ids as in CLIP (the first maximum: EOT is
    /// the largest id of CLIP's vocabulary).
    pub fn eot_positions(ids: &Tensor) -> Result<Vec<usize>> {
        let rows = as_index(ids)?.to_dtype(DType::I64)?.to_vec2::<i64>()?;
        Ok(rows
            .iter()
            .map(|r| {
                r.iter()
                    .enumerate()
                    .fold(
                        (0, i64::MIN),
                        |best, (i, &v)| if v > best.1 { (i, v) } else { best },
                    )
                    .0
            })
            .collect())
    }

    /// `ids [B, L]` to projected features `[B, D]`, pooled at the EOT (argmax) position.
    pub fn forward_ids(&self, ids: &Tensor) -> Result<Tensor> {
        let eot = Self::eot_positions(ids)?;
        let embeds = self.token_embedding(ids)?;
        self.forward_embeds(&embeds, &eot, None)
    }

    /// Input embeddings `[B, L, W]` (position embeddings are added here) to projected features
    /// `[B, D]`, pooled at `eot_positions[b]`, causal mask as in CLIP. `deep` replaces the prompt
    /// slots before layers `1..=deep.layers.len()`. Positions after the last EOT are not computed
    /// (they cannot reach any EOT under the causal mask).
    pub fn forward_embeds(
        &self,
        embeds: &Tensor,
        eot_positions: &[usize],
        deep: Option<&DeepTextPrompts>,
    ) -> Result<Tensor> {
        let (b, l, w) = embeds.dims3()?;
        if w != self.width || l > self.context_length() {
            candle_core::bail!(
                "text embeds have shape {:?}, expected [B, L <= {}, {}]",
                embeds.dims(),
                self.context_length(),
                self.width
            );
        }
        if eot_positions.len() != b || eot_positions.iter().any(|&e| e >= l) {
            candle_core::bail!(
                "eot_positions {eot_positions:?} must hold one position < {l} per batch row ({b})"
            );
        }
        let deep_layers = deep.map(|d| d.layers.as_slice()).unwrap_or(&[]);
        if deep_layers.len() >= self.layers.len().max(1) {
            candle_core::bail!(
                "{} deep text prompts given; at most {} (layers 1..{}) can be replaced",
                deep_layers.len(),
                self.layers.len().saturating_sub(1),
                self.layers.len()
            );
        }
        let mut inputs = vec![embeds];
        inputs.extend(deep_layers.iter());
        let fast = self.mode.is_fast(self.weights_track, &inputs);
        let rows = (run_length(eot_positions, deep_layers, l)? * self.intermediate).max(1);
        let per_chunk = (crate::fast::CHUNK_FLOATS / rows).max(1);
        if !fast || b <= per_chunk {
            return self.run(embeds, eot_positions, deep_layers, fast);
        }
        let mut outs = Vec::new();
        for start in (0..b).step_by(per_chunk) {
            let len = per_chunk.min(b - start);
            let deep: Vec<Tensor> = deep_layers
                .iter()
                .map(|p| match p.rank() {
                    3 => p.narrow(0, start, len),
                    _ => Ok(p.clone()),
                })
                .collect::<Result<_>>()?;
            outs.push(self.run(
                &embeds.narrow(0, start, len)?,
                &eot_positions[start..start + len],
                &deep,
                fast,
            )?);
        }
        Tensor::cat(&outs, 0)
    }

    /// [`Self::forward_embeds`] on validated inputs.
    fn run(
        &self,
        embeds: &Tensor,
        eot_positions: &[usize],
        deep_layers: &[Tensor],
        fast: bool,
    ) -> Result<Tensor> {
        let (b, l, w) = embeds.dims3()?;
        let l_run = run_length(eot_positions, deep_layers, l)?;
        let embeds = embeds.narrow(1, 0, l_run)?.to_dtype(self.dtype())?;
        let mut x = embeds.broadcast_add(&self.position_embedding.narrow(0, 0, l_run)?)?;
        let mask = causal_mask(l_run, self.dtype(), self.device())?;
        for (i, layer) in self.layers.iter().enumerate() {
            if i >= 1 {
                if let Some(p) = deep_layers.get(i - 1) {
                    x = replace_slots(&x, p)?;
                }
            }
            x = layer.forward(&x, Some(&mask), fast)?;
        }
        let idx: Vec<u32> = eot_positions
            .iter()
            .enumerate()
            .map(|(i, &e)| (i * l_run + e) as u32)
            .collect();
        let idx = Tensor::from_vec(idx, b, x.device())?;
        // LayerNorm is per token, so pooling first is the same as HF's LN-then-pool.
        let pooled = x.reshape((b * l_run, w))?.index_select(&idx, 0)?;
        let pooled = self.final_layer_norm.forward(&pooled, fast)?;
        self.projection.forward(&pooled)
    }

    /// Splices learned context after SOT: for each row of `ids` (`[C, L]`, tokenized
    /// `SOT tokens... EOT pad`) builds `[SOT] ctx_1..ctx_n tokens... [EOT] pad` of the same length
    /// `L`, shifting the rest right by `n` and truncating at `L` while keeping EOT. `ctx` is
    /// `[n, W]` (shared) or `[C, n, W]` (class-specific); gradients flow to it.
    pub fn build_prompts(&self, ctx: &Tensor, ids: &Tensor) -> Result<TextPrompts> {
        let rows = as_index(ids)?.to_dtype(DType::I64)?.to_vec2::<i64>()?;
        let c = rows.len();
        let l = rows.first().map(Vec::len).unwrap_or(0);
        let n = match ctx.dims() {
            &[n, _] | &[_, n, _] => n,
            dims => candle_core::bail!("ctx has shape {dims:?}, expected [n, W] or [C, n, W]"),
        };
        if c == 0 || n + 2 > l {
            candle_core::bail!("cannot splice {n} context tokens into {c} rows of length {l}");
        }
        let eot = Self::eot_positions(ids)?;
        let mut suffix = Vec::with_capacity(c * (l - 1 - n));
        let mut eot_out = Vec::with_capacity(c);
        for (row, &e) in rows.iter().zip(&eot) {
            if e + n < l {
                suffix.extend(row[1..l - n].iter().map(|&t| t as u32));
                eot_out.push(e + n);
            } else {
                // Too long: drop the last tokens before EOT so EOT lands on the last position.
                suffix.extend(row[1..l - n - 1].iter().map(|&t| t as u32));
                suffix.push(row[e] as u32);
                eot_out.push(l - 1);
            }
        }
        let dev = self.device();
        let suffix = Tensor::from_vec(suffix, (c, l - 1 - n), dev)?;
        let sot: Vec<u32> = rows.iter().map(|r| r[0] as u32).collect();
        let sot = Tensor::from_vec(sot, (c, 1), dev)?;
        let ctx = expand_prompt(&ctx.to_dtype(self.dtype())?, c, self.width, "ctx")?;
        let embeds = Tensor::cat(
            &[
                &self.token_embedding(&sot)?,
                &ctx,
                &self.token_embedding(&suffix)?,
            ],
            1,
        )?;
        Ok(TextPrompts {
            embeds,
            eot_positions: eot_out,
        })
    }
}

/// Positions the text tower has to compute. Under the causal mask no position after the last
/// EOT can reach any EOT output, so the sequence is cut there (exact; 77 -> ~20 tokens for
/// typical prompts); deep prompt slots are always kept.
fn run_length(eot_positions: &[usize], deep_layers: &[Tensor], l: usize) -> Result<usize> {
    let mut run = eot_positions.iter().map(|e| e + 1).max().unwrap_or(l);
    for p in deep_layers {
        run = run.max(p.dim(p.rank().saturating_sub(2))? + 1);
    }
    Ok(run.min(l))
}

/// Ids in a dtype `index_select` accepts.
fn as_index(ids: &Tensor) -> Result<Tensor> {
    match ids.dtype() {
        DType::U8 | DType::U32 | DType::I64 => Ok(ids.clone()),
        d if d.is_int() => ids.to_dtype(DType::I64),
        d => candle_core::bail!("token ids must be an integer tensor, got {d:?}"),
    }
}

/// Additive causal mask `[L, L]`: `-inf` above the diagonal.
pub(crate) fn causal_mask(l: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..l)
        .flat_map(|i| (0..l).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (l, l), device)?.to_dtype(dtype)
}

/// Replaces positions `1..=n` of `x [B, L, W]` with the prompt tokens.
fn replace_slots(x: &Tensor, prompt: &Tensor) -> Result<Tensor> {
    let (b, l, w) = x.dims3()?;
    let p = expand_prompt(&prompt.to_dtype(x.dtype())?, b, w, "deep text prompt")?;
    let n = p.dim(1)?;
    if n + 1 > l {
        candle_core::bail!("{n} deep prompt tokens do not fit in a sequence of {l}");
    }
    Tensor::cat(
        &[&x.narrow(1, 0, 1)?, &p, &x.narrow(1, 1 + n, l - 1 - n)?],
        1,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eot_is_first_argmax() {
        let ids = Tensor::new(&[[5u32, 9, 3, 9, 0], [7, 1, 2, 8, 0]], &Device::Cpu).unwrap();
        assert_eq!(ClipTextTower::eot_positions(&ids).unwrap(), vec![1, 3]);
        let f = Tensor::new(&[[1.0f32, 2.0]], &Device::Cpu).unwrap();
        assert!(ClipTextTower::eot_positions(&f).is_err());
    }

    #[test]
    fn causal_mask_blocks_the_future() {
        let m = causal_mask(3, DType::F32, &Device::Cpu).unwrap();
        let m = m.to_vec2::<f32>().unwrap();
        assert_eq!(m[0][0], 0.0);
        assert_eq!(m[2][1], 0.0);
        assert!(m[0][1].is_infinite() && m[1][2] < 0.0);
    }
}
