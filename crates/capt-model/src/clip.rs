//! CLIP towers over [`Ops`], reading HF-named parameters (`vision_model.*`, `text_model.*`,
//! `visual_projection.weight`, `text_projection.weight`, `logit_scale`). The math is
//! `capt_clip`'s (pre-LN blocks, QuickGELU/GELU, causal text mask, EOT pooling, prompt slots);
//! parity tests compare the two.

use capt_graph::{HostTensor, Ops};

use crate::error::Result;
use crate::spec::{Act, ClipSpec, TowerSpec};

/// `ln(x)` with `{prefix}.weight` / `{prefix}.bias`.
fn layer_norm<O: Ops>(ops: &O, x: &O::T, prefix: &str, eps: f64) -> Result<O::T> {
    let w = ops.param(&format!("{prefix}.weight"))?;
    let b = ops.param(&format!("{prefix}.bias"))?;
    Ok(ops.layer_norm(x, &w, &b, eps)?)
}

fn linear<O: Ops>(ops: &O, x: &O::T, prefix: &str, bias: bool) -> Result<O::T> {
    let w = ops.param(&format!("{prefix}.weight"))?;
    let b = if bias {
        Some(ops.param(&format!("{prefix}.bias"))?)
    } else {
        None
    };
    Ok(ops.linear(x, &w, b.as_ref())?)
}

/// One pre-LN block on `x [B, L, W]` (`B` may be symbolic): `x + attn(ln1 x)`, `x + mlp(ln2 x)`.
fn encoder_layer<O: Ops>(
    ops: &O,
    t: &TowerSpec,
    prefix: &str,
    x: &O::T,
    len: usize,
    mask: Option<&O::T>,
) -> Result<O::T> {
    let (w, h) = (t.hidden_size, t.num_attention_heads);
    let dh = w / h;
    let a = format!("{prefix}.self_attn");
    let hx = layer_norm(ops, x, &format!("{prefix}.layer_norm1"), t.layer_norm_eps)?;
    let heads = |y: O::T| -> Result<O::T> {
        let y = ops.reshape(&y, &[0, len as i64, h as i64, dh as i64])?;
        Ok(ops.permute(&y, &[0, 2, 1, 3])?) // [B, H, L, dh]
    };
    let q = ops.mul_scalar(
        &linear(ops, &hx, &format!("{a}.q_proj"), true)?,
        (dh as f64).powf(-0.5),
    )?;
    let q = heads(q)?;
    let k = heads(linear(ops, &hx, &format!("{a}.k_proj"), true)?)?;
    let v = heads(linear(ops, &hx, &format!("{a}.v_proj"), true)?)?;
    let mut att = ops.matmul(&q, &ops.transpose(&k, 2, 3)?)?; // [B, H, L, L]
    if let Some(m) = mask {
        att = ops.add(&att, m)?;
    }
    let att = ops.softmax(&att, -1)?;
    let out = ops.permute(&ops.matmul(&att, &v)?, &[0, 2, 1, 3])?;
    let out = ops.reshape(&out, &[0, len as i64, w as i64])?;
    let x = ops.add(x, &linear(ops, &out, &format!("{a}.out_proj"), true)?)?;
    let hx = layer_norm(ops, &x, &format!("{prefix}.layer_norm2"), t.layer_norm_eps)?;
    let hx = linear(ops, &hx, &format!("{prefix}.mlp.fc1"), true)?;
    let hx = match t.hidden_act {
        Act::QuickGelu => ops.quick_gelu(&hx)?,
        Act::Gelu => ops.gelu_erf(&hx)?,
    };
    Ok(ops.add(&x, &linear(ops, &hx, &format!("{prefix}.mlp.fc2"), true)?)?)
}

/// `p [n, W]` broadcast to `[B, n, W]` with the (possibly symbolic) batch of `like [B, *, W]`.
fn batch_prompt<O: Ops>(ops: &O, like: &O::T, p: &O::T) -> Result<O::T> {
    let zero = ops.mul_scalar(&ops.narrow(like, 1, 0, 1)?, 0.0)?; // [B, 1, W]
    Ok(ops.add(&zero, &ops.unsqueeze(p, 0)?)?)
}

/// Image features: `pixels [N, C, H, W]` -> (`global [N, D]` un-normalised projected CLS,
/// `local [N, P, D]` projected patch tokens, row-major). `visual_prompt_layers` deep visual
/// prompts `prompt.visual.k` are used as in `capt_clip::VisualPrompts`.
pub fn vision<O: Ops>(
    ops: &O,
    spec: &ClipSpec,
    pixels: &O::T,
    visual_prompt_layers: usize,
) -> Result<(O::T, O::T)> {
    let v = &spec.vision;
    let t = &v.tower;
    let (w, p, g) = (t.hidden_size, v.patch_size, v.grid_size());
    let n_patch = g * g;
    let n_tok = n_patch + 1;
    let emb = "vision_model.embeddings";
    let conv = ops.param(&format!("{emb}.patch_embedding.weight"))?;
    let x = ops.conv2d(pixels, &conv, None, p, 0)?; // [N, W, g, g]
    let x = ops.transpose(&ops.reshape(&x, &[0, w as i64, n_patch as i64])?, 1, 2)?; // [N, P, W]
                                                                                     // A free slot for CLS (batch stays symbolic), filled by class_embedding + positions.
    let x = ops.pad(&x, 1, 1, 0)?;
    let cls = ops.reshape(
        &ops.param(&format!("{emb}.class_embedding"))?,
        &[1, w as i64],
    )?;
    let cls = ops.pad(&cls, 0, 0, n_patch)?; // [P+1, W], zeros below row 0
    let pos = ops.param(&format!("{emb}.position_embedding.weight"))?;
    let mut x = ops.add(&x, &ops.add(&pos, &cls)?)?;
    let prompt = |k: usize| ops.param(&crate::names::visual(k));
    let mut n_prompt = 0;
    if visual_prompt_layers > 0 {
        let p0 = prompt(0)?;
        n_prompt = ops.dims(&p0)[0].unwrap_or(0);
        x = ops.concat(&[&x, &batch_prompt(ops, &x, &p0)?], 1)?;
    }
    let len = n_tok + n_prompt;
    x = layer_norm(ops, &x, "vision_model.pre_layrnorm", t.layer_norm_eps)?;
    for i in 0..t.num_hidden_layers {
        if i >= 1 && i < visual_prompt_layers {
            let pi = batch_prompt(ops, &x, &prompt(i)?)?;
            x = ops.concat(&[&ops.narrow(&x, 1, 0, n_tok)?, &pi], 1)?;
        }
        x = encoder_layer(
            ops,
            t,
            &format!("vision_model.encoder.layers.{i}"),
            &x,
            len,
            None,
        )?;
    }
    if n_prompt > 0 {
        x = ops.narrow(&x, 1, 0, n_tok)?;
    }
    let x = layer_norm(ops, &x, "vision_model.post_layernorm", t.layer_norm_eps)?;
    let y = linear(ops, &x, "visual_projection", false)?; // [N, P+1, D]
    let global = ops.squeeze(&ops.narrow(&y, 1, 0, 1)?, 1)?;
    let local = ops.narrow(&y, 1, 1, n_patch)?;
    Ok((global, local))
}

/// Text features `[M, D]` (un-normalised) of token ids `ids [M, L]` (I64, model vocabulary,
/// `SOT text EOT pad`, EOT the row maximum as in CLIP). With `ctx = Some(name)` the `[n, W]`
/// context parameter is spliced after SOT (the last `n` positions drop out, so every row's
/// EOT must sit before `L - n`), and `deep` deep prompts `prompt.deep.k` replace those slots
/// before layers `1..=deep`.
pub fn text<O: Ops>(
    ops: &O,
    spec: &ClipSpec,
    ids: &O::T,
    len: usize,
    ctx: Option<&str>,
    deep: usize,
) -> Result<O::T> {
    let t = &spec.text.tower;
    let table = ops.param("text_model.embeddings.token_embedding.weight")?;
    let tok = ops.gather(&table, ids, 0)?; // [M, L, W]
                                           // EOT position = first argmax of the ids (float compare: ids < 2^24 are exact).
    let mut eot = ops.argmax(&ops.cast(ids, capt_graph::DType::F32)?, 1, false)?; // [M]
    let (mut x, n) = match ctx {
        Some(name) => {
            let c = ops.param(name)?;
            let n = ops.dims(&c)[0].unwrap_or(0);
            let c = batch_prompt(ops, &tok, &c)?;
            let x = ops.concat(
                &[
                    &ops.narrow(&tok, 1, 0, 1)?,
                    &c,
                    &ops.narrow(&tok, 1, 1, len - 1 - n)?,
                ],
                1,
            )?;
            let shift = ops.constant(&HostTensor::i64(vec![1], vec![n as i64])?)?;
            eot = ops.add(&eot, &shift)?;
            (x, n)
        }
        None => (tok, 0),
    };
    let pos = ops.narrow(
        &ops.param("text_model.embeddings.position_embedding.weight")?,
        0,
        0,
        len,
    )?;
    x = ops.add(&x, &pos)?;
    let mask: Vec<f32> = (0..len)
        .flat_map(|i| (0..len).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    let mask = ops.constant(&HostTensor::f32(vec![len, len], mask)?)?;
    for i in 0..t.num_hidden_layers {
        if i >= 1 && i <= deep && n > 0 {
            let p = batch_prompt(ops, &x, &ops.param(&crate::names::deep_text(i))?)?;
            x = ops.concat(
                &[
                    &ops.narrow(&x, 1, 0, 1)?,
                    &p,
                    &ops.narrow(&x, 1, 1 + n, len - 1 - n)?,
                ],
                1,
            )?;
        }
        x = encoder_layer(
            ops,
            t,
            &format!("text_model.encoder.layers.{i}"),
            &x,
            len,
            Some(&mask),
        )?;
    }
    // Pool at EOT (LayerNorm is per token, so pool first): one_hot [M, L] @ x.
    let sel = ops.unsqueeze(&ops.one_hot(&eot, len, capt_graph::DType::F32)?, 1)?; // [M, 1, L]
    let pooled = ops.squeeze(&ops.matmul(&sel, &x)?, 1)?; // [M, W]
    let pooled = layer_norm(
        ops,
        &pooled,
        "text_model.final_layer_norm",
        t.layer_norm_eps,
    )?;
    linear(ops, &pooled, "text_projection", false)
}
