//! Sample Confusion Miner and Diff-Manner Adapter (§3).

use capt_graph::{HostTensor, Ops};

use super::params::{ALPHA, SAM_GLOBAL, SAM_LOCAL};
use super::{HeadConfig, HeadTables, Pairs, Result, MASK_FILL};

/// The Representative Confusion Samples of each image.
#[derive(Debug, Clone)]
pub struct Retrieval<T> {
    /// I64 `[N, K_s]`: pool slots, best cosine first (0 where the pick is padding).
    pub slots: T,
    /// F `[N, K_s]`: `softmax(s / temperature)` over the valid picks, 0 on padding.
    pub weights: T,
    /// F `[N, 1]`: 1 when the image has at least one valid slot, else 0.
    pub any: T,
}

/// Candidates are the slots of cells (c, j_k) and (j_k, c); `s_r = cos(f, g_r)` on valid
/// slots, top `K_s`, `w = softmax(s / temperature)` over the valid picks. `f` is normalised.
pub fn retrieve<O: Ops>(
    ops: &O,
    cfg: &HeadConfig,
    f: &O::T,
    pairs: &Pairs<O::T>,
    t: &HeadTables<O::T>,
) -> Result<Retrieval<O::T>> {
    let fdt = ops.dtype(f);
    let m2 = 2 * cfg.cell_size;
    let cells = ops.reshape(
        &t.cells,
        &[(cfg.num_classes * cfg.k_cand) as i64, m2 as i64],
    )?;
    let slots = ops.gather(&cells, &pairs.flat, 0)?; // [N, K_p, 2M]
    let slots = ops.reshape(&slots, &[0, cfg.retrieval_slots() as i64])?; // [N, R]
    let minus_one = ops.constant(&HostTensor::i64(vec![], vec![-1])?)?;
    let zero_i = ops.constant(&HostTensor::i64(vec![], vec![0])?)?;
    let valid = ops.greater(&slots, &minus_one)?; // Bool [N, R]
    let safe = ops.where_(&valid, &slots, &zero_i)?;
    let valid_f = ops.cast(&valid, fdt)?;

    let g = ops.l2_normalize(&ops.gather(&t.pool_global, &safe, 0)?, -1)?; // [N, R, D]
    let s = ops.reduce_sum(&ops.mul(&ops.unsqueeze(f, 1)?, &g)?, -1, false)?; // [N, R]
    let fill = ops.constant(&HostTensor::scalar_f32(MASK_FILL as f32))?;
    let s = ops.where_(&valid, &s, &fill)?;
    let (top, pick) = ops.topk(&s, cfg.k_samples)?; // [N, K_s]
    let picked_valid = ops.gather_elements(&valid_f, &pick, 1)?;
    let slots = ops.gather_elements(&safe, &pick, 1)?;
    let inv_t = 1.0 / cfg.sam_temperature as f64;
    let weights = ops.mul(
        &ops.softmax(&ops.mul_scalar(&top, inv_t)?, -1)?,
        &picked_valid,
    )?;
    let any = ops.reduce_max(&picked_valid, -1, true)?;
    Ok(Retrieval {
        slots,
        weights,
        any,
    })
}

/// `f_sam = norm(f + h)`, `h = alpha h_l + (1 - alpha) h_g`, with
/// `h_g = MLP_g(sum_r w_r (f - g_r))` and
/// `h_l = MLP_l(sum_r w_r mean_tokens(L - softmax(L L_r^T / sqrt D) L_r))`; `h = 0` for
/// images without a valid slot. `g_r` are normalised like `f`; local tokens are used as given.
pub fn sample_feature<O: Ops>(
    ops: &O,
    cfg: &HeadConfig,
    f: &O::T,
    local: &O::T,
    r: &Retrieval<O::T>,
    t: &HeadTables<O::T>,
) -> Result<O::T> {
    let w = ops.unsqueeze(&r.weights, -1)?; // [N, K_s, 1]

    let g = ops.l2_normalize(&ops.gather(&t.pool_global, &r.slots, 0)?, -1)?; // [N, K_s, D]
    let diff_g = ops.sub(&ops.unsqueeze(f, 1)?, &g)?;
    let agg_g = ops.reduce_sum(&ops.mul(&diff_g, &w)?, 1, false)?; // [N, D]

    let l_r = ops.gather(&t.pool_local, &r.slots, 0)?; // [N, K_s, G, D]
    let l_x = ops.unsqueeze(local, 1)?; // [N, 1, G, D]
    let att = ops.matmul(&l_x, &ops.transpose(&l_r, -1, -2)?)?; // [N, K_s, G, G]
    let att = ops.softmax(&ops.mul_scalar(&att, 1.0 / (cfg.dim as f64).sqrt())?, -1)?;
    let diff_l = ops.reduce_mean(&ops.sub(&l_x, &ops.matmul(&att, &l_r)?)?, 2, false)?;
    let agg_l = ops.reduce_sum(&ops.mul(&diff_l, &w)?, 1, false)?; // [N, D]

    // An MLP of a zero input is its bias path, not 0: mask after it.
    let h_g = ops.mul(&mlp(ops, &agg_g, SAM_GLOBAL)?, &r.any)?;
    let h_l = ops.mul(&mlp(ops, &agg_l, SAM_LOCAL)?, &r.any)?;
    let alpha = ops.sigmoid(&ops.param(ALPHA)?)?;
    let h = ops.add(&h_g, &ops.mul(&alpha, &ops.sub(&h_l, &h_g)?)?)?;
    Ok(ops.l2_normalize(&ops.add(f, &h)?, -1)?)
}

/// `Linear(D, hidden) - GELU(erf) - Linear(hidden, D)` under `prefix.fc1` / `prefix.fc2`.
fn mlp<O: Ops>(ops: &O, x: &O::T, prefix: &str) -> Result<O::T> {
    let p = |n: &str| ops.param(&format!("{prefix}.{n}"));
    let h = ops.linear(x, &p("fc1.weight")?, Some(&p("fc1.bias")?))?;
    Ok(ops.linear(&ops.gelu_erf(&h)?, &p("fc2.weight")?, Some(&p("fc2.bias")?))?)
}
