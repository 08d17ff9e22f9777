//! The exported computations: classifier, image encoder, text encoder.

use capt_graph::Ops;
use capt_method::head::{capt_head, HeadInputs, HeadTables};

use crate::clip;
use crate::error::Result;
use crate::names;
use crate::spec::{ModelSpec, TextFamily};

/// Classifier outputs.
pub struct ClassifierOut<T> {
    /// `[N, C]` final logits (CAPT: `z_base + sum_e g_e gain_e dz_e`).
    pub logits: T,
    /// `[N, C]` `softmax(logits)`.
    pub probs: T,
}

/// Image features for the head: `global [N, D]` and `local [N, G, D]` pooled to the bank's
/// `local_grid x local_grid` (torch `adaptive_avg_pool2d` bins, as the trainer pools).
pub fn image_features<O: Ops>(ops: &O, spec: &ModelSpec, pixels: &O::T) -> Result<(O::T, O::T)> {
    let (global, local) = clip::vision(ops, &spec.clip, pixels, spec.visual_prompt_layers)?;
    let g = spec.clip.vision.grid_size();
    let local = ops.avg_pool_tokens(&local, (g, g), (spec.local_grid, spec.local_grid))?;
    Ok((global, local))
}

/// Logits from image features against the baked class embeddings `table.class_emb` and, for
/// CAPT methods, the CAPT head over the baked tables. Same ops and order as the trainer's
/// `Model::base_logits` / `capt_head`, so eval and export agree.
pub fn head_logits<O: Ops>(ops: &O, spec: &ModelSpec, global: &O::T, local: &O::T) -> Result<O::T> {
    let class_emb = ops.param(names::CLASS_EMB)?;
    let logit_scale = ops.param(names::LOGIT_SCALE)?;
    match spec.head()? {
        None => {
            let f = ops.l2_normalize(global, -1)?;
            let tn_t = ops.transpose(&ops.l2_normalize(&class_emb, -1)?, 0, 1)?;
            let tau = ops.exp(&ops.reshape(&logit_scale, &[1, 1])?)?;
            Ok(ops.mul(&ops.matmul(&f, &tn_t)?, &tau)?)
        }
        Some(hc) => {
            let inputs = HeadInputs {
                image_global: global.clone(),
                image_local: local.clone(),
                class_emb,
                logit_scale,
            };
            let tables = HeadTables::try_named(|n| ops.param(&names::table(n)))?;
            Ok(capt_head(ops, &hc, &inputs, &tables)?.logits)
        }
    }
}

/// `pixel_values [N, 3, H, W]` -> logits and probabilities over the baked classes.
pub fn classifier<O: Ops>(ops: &O, spec: &ModelSpec, pixels: &O::T) -> Result<ClassifierOut<O::T>> {
    let (global, local) = image_features(ops, spec, pixels)?;
    let logits = head_logits(ops, spec, &global, &local)?;
    let probs = ops.softmax(&logits, -1)?;
    Ok(ClassifierOut { logits, probs })
}

/// Image encoder outputs: `image_embeds [N, D]` (L2-normalised, for search), `global [N, D]`
/// (raw projected CLS) and `local [N, G, D]` (pooled local tokens).
pub struct ImageEncoderOut<T> {
    pub image_embeds: T,
    pub global: T,
    pub local: T,
}

pub fn image_encoder<O: Ops>(
    ops: &O,
    spec: &ModelSpec,
    pixels: &O::T,
) -> Result<ImageEncoderOut<O::T>> {
    let (global, local) = image_features(ops, spec, pixels)?;
    Ok(ImageEncoderOut {
        image_embeds: ops.l2_normalize(&global, -1)?,
        global,
        local,
    })
}

/// `input_ids [M, L]` -> one `[M, D]` embedding (un-normalised) per family of `spec.text`,
/// in that order. Rows must be tokenized with the family's text ([`crate::TextSpec::text`]).
pub fn text_encoder<O: Ops>(
    ops: &O,
    spec: &ModelSpec,
    ids: &O::T,
    len: usize,
) -> Result<Vec<O::T>> {
    spec.text
        .families
        .iter()
        .map(|&f| {
            let (ctx, deep) = match f {
                TextFamily::Class if spec.text.n_ctx > 0 => {
                    (Some(names::CTX), spec.text.deep_layers)
                }
                TextFamily::Class | TextFamily::ZeroShot => (None, 0),
                TextFamily::Com => (Some(names::COM_CTX), 0),
                TextFamily::Dif => (Some(names::DIF_CTX), 0),
            };
            clip::text(ops, &spec.clip, ids, len, ctx, deep)
        })
        .collect()
}
