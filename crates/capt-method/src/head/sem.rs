//! Semantic Confusion Miner (§2) and the two semantic MGDE experts (§4).

use capt_graph::{HostTensor, Ops};

use super::{HeadConfig, HeadTables, Result};

/// Scores `Nhat p_j` below about this value count as 0 when choosing pairs: they are ordered
/// by candidate position (strongest `Nhat` first) instead (f32 keeps 1e-30 as a normal number).
pub const PAIR_TIE_BREAK: f64 = 1e-30;

/// The Semantic Confusion Pairs `(c, j_k)` of each image and what the experts need to scatter
/// onto them.
#[derive(Debug, Clone)]
pub struct Pairs<T> {
    /// I64 `[N]`: `c = argmax p = argmax z_base`.
    pub class: T,
    /// I64 `[N, K_p]`: partners `j_k`, highest `Nhat[c, j] * p_j` first.
    pub partners: T,
    /// I64 `[N, K_p]`: `c * K + k` for the chosen candidate positions `k`: row index into
    /// the `[C * K, ..]` views of the per-(class, candidate) tables.
    pub flat: T,
    /// F `[N, C]`: one-hot of `c`.
    pub one_hot_class: T,
    /// F `[N, K_p, C]`: one-hot of each `j_k`.
    pub one_hot_partners: T,
    /// F `[N, C]`: 0/1 indicator of `S = {c} U {j_k}`.
    pub support: T,
}

/// `p = softmax(z_base)`, `c = argmax`, `score_k = Nhat[c, j_k] p_{j_k}` over c's candidates,
/// top `K_p`.
///
/// `c` is taken as the argmax of `z_base` (the same class as the argmax of `p`, without
/// softmax rounding creating ties). Scores get a tiny bias decreasing along c's candidate
/// list ([`PAIR_TIE_BREAK`]): with `tau = 100`, `p_j` underflows to exactly 0 for far classes,
/// and top-k tie order differs between backends (candle vs tract), so equal scores are broken
/// explicitly in favour of the stronger `Nhat` candidate.
pub fn select_pairs<O: Ops>(
    ops: &O,
    cfg: &HeadConfig,
    z_base: &O::T,
    t: &HeadTables<O::T>,
) -> Result<Pairs<O::T>> {
    let fdt = ops.dtype(z_base);
    let p = ops.softmax(z_base, -1)?;
    let class = ops.argmax(z_base, -1, false)?; // [N]
    let cand = ops.gather(&t.cand_index, &class, 0)?; // [N, K]
    let nhat = ops.gather(&t.cand_weight, &class, 0)?; // [N, K]
    let score = ops.mul(&nhat, &ops.gather_elements(&p, &cand, 1)?)?;
    let k = cfg.k_cand;
    let bias: Vec<f64> = (0..k)
        .map(|i| PAIR_TIE_BREAK * (k - i) as f64 / k as f64)
        .collect();
    let score = ops.add(&score, &ops.constant(&HostTensor::f64(vec![k], bias)?)?)?;
    let (_, k) = ops.topk(&score, cfg.k_pairs)?; // [N, K_p] positions in c's list
    let partners = ops.gather_elements(&cand, &k, 1)?;
    let k_const = ops.constant(&HostTensor::i64(vec![1], vec![cfg.k_cand as i64])?)?;
    let flat = ops.add(&ops.mul(&ops.unsqueeze(&class, 1)?, &k_const)?, &k)?;

    let one_hot_class = ops.one_hot(&class, cfg.num_classes, fdt)?;
    let one_hot_partners = ops.one_hot(&partners, cfg.num_classes, fdt)?;
    // Candidates are distinct and never c, so the sum is 0/1; the comparison keeps it so
    // even for a malformed table.
    let count = ops.add(
        &one_hot_class,
        &ops.reduce_sum(&one_hot_partners, 1, false)?,
    )?;
    let zero = ops.constant(&HostTensor::scalar_f32(0.0))?;
    let support = ops.cast(&ops.greater(&count, &zero)?, fdt)?;
    Ok(Pairs {
        class,
        partners,
        flat,
        one_hot_class,
        one_hot_partners,
        support,
    })
}

/// Semantic-difference expert: `e_k = tau (f . t_dif(c, j_k) - f . t_dif(j_k, c))` with
/// normalised `t_dif` rows `dif`, `dif_rev` `[N, K_p, D]`; `+e_k / 2` to c, `-e_k / 2` to
/// `j_k`. Returns `[N, C]`.
pub(super) fn difference_expert<O: Ops>(
    ops: &O,
    f: &O::T,
    dif: &O::T,
    dif_rev: &O::T,
    tau: &O::T,
    pairs: &Pairs<O::T>,
) -> Result<O::T> {
    let f1 = ops.unsqueeze(f, 1)?; // [N, 1, D]
    let fwd = ops.reduce_sum(&ops.mul(&f1, dif)?, -1, false)?; // [N, K_p]
    let rev = ops.reduce_sum(&ops.mul(&f1, dif_rev)?, -1, false)?;
    let half = ops.mul_scalar(&ops.mul(&ops.sub(&fwd, &rev)?, tau)?, 0.5)?; // e_k / 2
    let to_c = ops.mul(&pairs.one_hot_class, &ops.reduce_sum(&half, -1, true)?)?;
    let to_j = ops.squeeze(
        &ops.matmul(&ops.unsqueeze(&half, 1)?, &pairs.one_hot_partners)?,
        1,
    )?; // [N, 1, K_p] @ [N, K_p, C] -> [N, C]
    Ok(ops.sub(&to_c, &to_j)?)
}

/// Semantic-commonality expert's feature: `f' = norm(f - sum_k (f . u_k) u_k)` with the
/// normalised `t_com(c, j_k)` rows `u` `[N, K_p, D]`.
pub(super) fn commonality_feature<O: Ops>(ops: &O, f: &O::T, u: &O::T) -> Result<O::T> {
    let fu = ops.reduce_sum(&ops.mul(&ops.unsqueeze(f, 1)?, u)?, -1, true)?; // [N, K_p, 1]
    let shared = ops.reduce_sum(&ops.mul(&fu, u)?, 1, false)?; // [N, D]
    Ok(ops.l2_normalize(&ops.sub(f, &shared)?, -1)?)
}
