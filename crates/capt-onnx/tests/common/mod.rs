//! A miniature CAPT inference path written once over `Ops` (CLIP-style patch embedding and
//! transformer block, base logits, SEM candidate mining with top-k, SAM bank lookup with -1
//! padding, a Diff-Manner-Adapter-like MLP, MGDE-like corrections scattered with one-hot,
//! a router), with deterministic tiny parameters.

#![allow(dead_code)]

use capt_graph::{HostTensor, Ops, Result};

pub const C: usize = 7; // classes
pub const W: usize = 8; // width
pub const D: usize = 6; // joint dim
pub const HEADS: usize = 2;
pub const KC: usize = 4; // candidates per class
pub const KP: usize = 2; // pairs per image
pub const POOL: usize = 10; // bank entries
pub const CELLS: usize = 3; // bank candidates per image
pub const IMG: usize = 16;
pub const PATCH: usize = 4;

/// Output names, in graph order.
pub const OUTPUTS: [&str; 5] = ["logits", "probs", "pred", "pairs", "below_mean"];

/// Deterministic values in [-1, 1) (splitmix64, exact arithmetic: identical on every platform).
pub fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn rand(seed: u64, dims: &[usize], scale: f32, shift: f32) -> HostTensor {
    let n = dims.iter().product();
    let v = values(seed, n)
        .into_iter()
        .map(|x| x * scale + shift)
        .collect();
    HostTensor::f32(dims.to_vec(), v).unwrap()
}

pub fn params() -> Vec<(String, HostTensor)> {
    let mut p: Vec<(String, HostTensor)> = vec![];
    let mut seed = 100;
    let mut add = |name: &str, dims: &[usize], scale: f32, shift: f32| {
        seed += 1;
        p.push((name.to_string(), rand(seed, dims, scale, shift)));
    };
    add("conv.w", &[W, 3, PATCH, PATCH], 0.6, 0.0);
    add("conv.b", &[W], 0.1, 0.0);
    add("pos", &[1 + (IMG / PATCH).pow(2), W], 0.2, 0.0);
    for ln in ["ln_pre", "blk.ln1", "blk.ln2", "ln_post"] {
        add(&format!("{ln}.w"), &[W], 0.2, 1.0);
        add(&format!("{ln}.b"), &[W], 0.1, 0.0);
    }
    for (lin, scale) in [("q", 0.4), ("k", 0.4), ("v", 1.5), ("o", 1.5)] {
        add(&format!("blk.{lin}.w"), &[W, W], scale, 0.0);
        add(&format!("blk.{lin}.b"), &[W], 0.1, 0.0);
    }
    add("blk.fc1.w", &[2 * W, W], 0.4, 0.0);
    add("blk.fc1.b", &[2 * W], 0.1, 0.0);
    add("blk.fc2.w", &[W, 2 * W], 0.3, 0.0);
    add("blk.fc2.b", &[W], 0.1, 0.0);
    add("proj", &[W, D], 0.4, 0.0);
    add("text", &[C, D], 1.0, 0.0);
    add("nhat", &[C, KC], 0.4, 0.6);
    add("pool.g", &[POOL, D], 0.3, 0.0);
    add("pool.l", &[POOL, 4, D], 0.5, 0.0);
    for mlp in ["mlp_g", "mlp_l"] {
        add(&format!("{mlp}.0.w"), &[4, D], 0.5, 0.0);
        add(&format!("{mlp}.0.b"), &[4], 0.1, 0.0);
        add(&format!("{mlp}.2.w"), &[D, 4], 0.5, 0.0);
        add(&format!("{mlp}.2.b"), &[D], 0.1, 0.0);
    }
    add("alpha", &[1], 0.5, 0.0);
    add("tdif", &[C, KC, D], 0.5, 0.0);
    add("router", &[2, 2 * D], 1.0, 0.0);
    // cls = -pos[0]: the class token enters the block as exactly zero, so ln_pre maps it to
    // its bias and the image embedding is dominated by what attention gathers from the
    // patches (otherwise the constant token makes every image the same class).
    let pos0 = match p.iter().find(|(n, _)| n == "pos").unwrap().1.data() {
        capt_graph::HostData::F32(v) => v[..W].iter().map(|x| -x).collect(),
        _ => unreachable!(),
    };
    p.push(("cls".into(), HostTensor::f32(vec![W], pos0).unwrap()));
    p.push((
        "logit_scale".into(),
        HostTensor::f32(vec![], vec![std::f32::consts::LN_10]).unwrap(),
    ));
    p.push((
        "gains".into(),
        HostTensor::f32(vec![2], vec![0.6, -0.8]).unwrap(),
    ));
    // Candidates of class c: the next KC classes (never c itself).
    let cand = (0..C)
        .flat_map(|c| (1..=KC).map(move |k| ((c + k) % C) as i64))
        .collect();
    p.push(("cand".into(), HostTensor::i64(vec![C, KC], cand).unwrap()));
    // Bank cell -> pool index table, -1 padded; class 0 has no entries at all.
    let cells = (0..C)
        .flat_map(|c| {
            (0..CELLS).map(move |r| match (c, r) {
                (0, _) => -1,
                (_, 2) if c % 2 == 1 => -1,
                _ => ((3 * c + r) % POOL) as i64,
            })
        })
        .collect();
    p.push((
        "cells".into(),
        HostTensor::i64(vec![C, CELLS], cells).unwrap(),
    ));
    p
}

/// Noise plus a per-image, per-channel offset, so images differ enough to be classified
/// differently by the tiny random encoder.
pub fn pixels(n: usize) -> HostTensor {
    let plane = IMG * IMG;
    let shift = values(99, n * 3);
    let v = values(7, n * 3 * plane)
        .into_iter()
        .enumerate()
        .map(|(i, x)| x + 5.0 * shift[i / plane])
        .collect();
    HostTensor::f32(vec![n, 3, IMG, IMG], v).unwrap()
}

fn linear<O: Ops>(o: &O, x: &O::T, name: &str) -> Result<O::T> {
    let w = o.param(&format!("{name}.w"))?;
    let b = o.param(&format!("{name}.b"))?;
    o.linear(x, &w, Some(&b))
}

fn ln<O: Ops>(o: &O, x: &O::T, name: &str) -> Result<O::T> {
    let w = o.param(&format!("{name}.w"))?;
    let b = o.param(&format!("{name}.b"))?;
    o.layer_norm(x, &w, &b, 1e-5)
}

fn heads<O: Ops>(o: &O, x: &O::T) -> Result<O::T> {
    let x = o.reshape(x, &[0, 0, HEADS as i64, (W / HEADS) as i64])?;
    o.permute(&x, &[0, 2, 1, 3])
}

/// CLIP residual attention block (pre-LN, QuickGELU MLP).
fn block<O: Ops>(o: &O, x: &O::T) -> Result<O::T> {
    let h = ln(o, x, "blk.ln1")?;
    let q = heads(o, &linear(o, &h, "blk.q")?)?;
    let k = heads(o, &linear(o, &h, "blk.k")?)?;
    let v = heads(o, &linear(o, &h, "blk.v")?)?;
    let scale = 1.0 / ((W / HEADS) as f64).sqrt();
    let att = o.softmax(
        &o.mul_scalar(&o.matmul(&q, &o.transpose(&k, -1, -2)?)?, scale)?,
        -1,
    )?;
    let ctx = o.permute(&o.matmul(&att, &v)?, &[0, 2, 1, 3])?;
    let ctx = o.reshape(&ctx, &[0, 0, W as i64])?;
    let x = o.add(x, &linear(o, &ctx, "blk.o")?)?;
    let h = ln(o, &x, "blk.ln2")?;
    let m = linear(o, &o.quick_gelu(&linear(o, &h, "blk.fc1")?)?, "blk.fc2")?;
    o.add(&x, &m)
}

fn mlp<O: Ops>(o: &O, x: &O::T, name: &str) -> Result<O::T> {
    let h = o.gelu_erf(&linear(o, x, &format!("{name}.0"))?)?;
    linear(o, &h, &format!("{name}.2"))
}

/// `pixels [N, 3, 16, 16]` -> `[logits [N, C], probs [N, C], pred [N] (I64),
/// pairs [N, KP] (I64), below_mean [N]]`.
pub fn mini_capt<O: Ops>(o: &O, pixels: &O::T) -> Result<Vec<O::T>> {
    let g = IMG / PATCH;
    let tokens = g * g;
    // ---- image encoder: patch conv, class slot via zero pad, one block, projection.
    let x = o.conv2d(
        pixels,
        &o.param("conv.w")?,
        Some(&o.param("conv.b")?),
        PATCH,
        0,
    )?;
    let x = o.permute(&o.reshape(&x, &[0, 0, -1])?, &[0, 2, 1])?; // [N, 16, W]
    let x = o.pad(&x, 1, 1, 0)?; // [N, 17, W]
    let cls_row = o.pad(&o.unsqueeze(&o.param("cls")?, 0)?, 0, 0, tokens)?;
    let x = o.add(&x, &o.add(&o.param("pos")?, &cls_row)?)?;
    let x = block(o, &ln(o, &x, "ln_pre")?)?;
    let post = ln(o, &x, "ln_post")?;
    let proj = o.param("proj")?;
    let cls = o.squeeze(&o.narrow(&post, 1, 0, 1)?, 1)?;
    let f = o.l2_normalize(&o.matmul(&cls, &proj)?, -1)?; // [N, D]
    let local = o.matmul(&o.narrow(&post, 1, 1, tokens)?, &proj)?;
    let l = o.avg_pool_tokens(&local, (g, g), (2, 2))?; // [N, 4, D]
    let fdt = o.dtype(&f);

    // ---- base logits and SEM.
    let tn = o.l2_normalize(&o.param("text")?, -1)?;
    let tnt = o.transpose(&tn, 0, 1)?;
    let tau = o.exp(&o.param("logit_scale")?)?;
    let z_base = o.mul(&o.matmul(&f, &tnt)?, &tau)?;
    let p = o.softmax(&z_base, -1)?;
    let c = o.argmax(&p, -1, false)?; // [N]
    let cand = o.gather(&o.param("cand")?, &c, 0)?; // [N, KC]
    let nh = o.gather(&o.param("nhat")?, &c, 0)?;
    let score = o.mul(&nh, &o.gather_elements(&p, &cand, 1)?)?;
    let (_, k) = o.topk(&score, KP)?; // [N, KP]
    let j = o.gather_elements(&cand, &k, 1)?; // [N, KP] class ids

    // ---- SAM over bank cells (-1 = empty).
    let cells = o.gather(&o.param("cells")?, &c, 0)?; // [N, CELLS]
    let minus1 = o.constant(&HostTensor::i64(vec![], vec![-1])?)?;
    let zero = o.constant(&HostTensor::i64(vec![], vec![0])?)?;
    let valid = o.greater(&cells, &minus1)?;
    let safe = o.where_(&valid, &cells, &zero)?;
    let gr = o.gather(&o.param("pool.g")?, &safe, 0)?; // [N, CELLS, D]
    let fx = o.unsqueeze(&f, 1)?;
    let s = o.reduce_sum(&o.mul(&fx, &gr)?, -1, false)?;
    let big_neg = o.constant(&HostTensor::scalar_f32(-1e4))?;
    let s = o.where_(&valid, &o.mul_scalar(&s, 1.0 / 0.07)?, &big_neg)?;
    let any = o.reduce_max(&o.cast(&valid, fdt)?, -1, true)?; // 0 when no entry
    let w = o.mul(&o.softmax(&s, -1)?, &any)?;
    let wx = o.unsqueeze(&w, -1)?;
    let hg = o.reduce_sum(&o.mul(&wx, &o.sub(&fx, &gr)?)?, 1, false)?;
    let h_g = mlp(o, &hg, "mlp_g")?;
    let lr = o.gather(&o.param("pool.l")?, &safe, 0)?; // [N, CELLS, 4, D]
    let lx = o.unsqueeze(&l, 1)?;
    let sqrt_d = o.sqrt(&o.constant(&HostTensor::scalar_f32(D as f32))?)?;
    let a = o.softmax(
        &o.div(&o.matmul(&lx, &o.transpose(&lr, -1, -2)?)?, &sqrt_d)?,
        -1,
    )?;
    let dl = o.reduce_mean(&o.sub(&lx, &o.matmul(&a, &lr)?)?, 2, false)?; // [N, CELLS, D]
    let h_l = mlp(o, &o.reduce_sum(&o.mul(&wx, &dl)?, 1, false)?, "mlp_l")?;
    let alpha = o.sigmoid(&o.param("alpha")?)?;
    let one_minus = o.add_scalar(&o.neg(&alpha)?, 1.0)?;
    let h = o.add(&o.mul(&h_l, &alpha)?, &o.mul(&h_g, &one_minus)?)?;
    let f_sam = o.l2_normalize(&o.add(&f, &h)?, -1)?;

    // ---- MGDE-like experts, scattered onto the candidate set with one-hot.
    let td = o.gather(&o.param("tdif")?, &c, 0)?; // [N, KC, D]
    let kx = o.expand(&o.unsqueeze(&k, -1)?, &[1, 1, D])?;
    let tsel = o.gather_elements(&td, &kx, 1)?; // [N, KP, D]
    let e = o.mul(&o.reduce_sum(&o.mul(&fx, &tsel)?, -1, false)?, &tau)?;
    let half = o.mul_scalar(&e, 0.5)?;
    let oh_c = o.one_hot(&c, C, fdt)?; // [N, C]
    let oh_j = o.one_hot(&j, C, fdt)?; // [N, KP, C]
    let to_c = o.mul(&oh_c, &o.reduce_sum(&half, -1, true)?)?;
    let to_j = o.reduce_sum(&o.mul(&oh_j, &o.unsqueeze(&half, -1)?)?, 1, false)?;
    let dz1 = o.sub(&to_c, &to_j)?;
    let in_s = o.reduce_max(&o.concat(&[&o.unsqueeze(&oh_c, 1)?, &oh_j], 1)?, 1, false)?;
    let dz2 = o.mul(&o.mul(&o.matmul(&o.sub(&f_sam, &f)?, &tnt)?, &tau)?, &in_s)?;
    let router = o.param("router")?;
    let gate = o.softmax(&o.linear(&o.concat(&[&f, &f_sam], -1)?, &router, None)?, -1)?;
    let gg = o.mul(&gate, &o.param("gains")?)?;
    let z = o.add(&z_base, &o.mul(&o.narrow(&gg, 1, 0, 1)?, &dz1)?)?;
    let z = o.add(&z, &o.mul(&o.narrow(&gg, 1, 1, 1)?, &dz2)?)?;
    let probs = o.softmax(&z, -1)?;
    let below = o.less(&z, &o.reduce_mean(&z, -1, true)?)?;
    let below = o.reduce_sum(&o.cast(&below, fdt)?, -1, false)?;
    Ok(vec![z, probs, c, j, below])
}
