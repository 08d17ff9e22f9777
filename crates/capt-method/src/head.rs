//! The CAPT inference head (docs/METHOD.md §2-§4, §6): base logits, the Semantic Confusion
//! Miner's pair selection, the Sample Confusion Miner's retrieval with the Diff-Manner
//! Adapter, and the Multi-Granularity Discrepancy Expert.
//!
//! Written once, generic over [`capt_graph::Ops`]: candle executes it in training (gradients
//! reach every `capt.*` parameter and the class / `t_com` / `t_dif` tables) and the ONNX
//! builder records the same calls for export. So nothing here branches on tensor values, only
//! on the config and static shapes; discrete choices (argmax, top-k) produce I64 index tensors;
//! `-1` padding is clamped to 0 before gathering and masked afterwards; masked softmaxes use a
//! large negative fill and a validity factor, so empty rows give zeros instead of NaN. The
//! batch `N` may be symbolic (ONNX), so reshapes only use `0` / `-1` for it.
//!
//! Shapes: `N` images, `C` classes, `D` joint dim, `G` local tokens, `K` candidates per class,
//! `K_p` pairs per image, `M` cell size, `R = 2 K_p M` retrieval slots, `K_s` retrieved samples.

mod params;
mod sam;
mod sem;

#[cfg(test)]
mod tests;

use capt_graph::{DType, HostTensor, Ops};

use crate::config::CaptConfig;

pub use params::{
    head_params, init_head_params, ParamInit, ParamSpec, ALPHA, GAINS, ROUTER, SAM_GLOBAL,
    SAM_LOCAL,
};
pub use sam::{retrieve, sample_feature, Retrieval};
pub use sem::{select_pairs, Pairs, PAIR_TIE_BREAK};

/// Number of MGDE experts. Order everywhere: 0 = semantic-difference,
/// 1 = semantic-commonality, 2 = sample.
pub const NUM_EXPERTS: usize = 3;

/// Fill for masked scores before a softmax / top-k: far below any cosine / temperature, and
/// finite, so `exp` underflows to exactly 0 and all-masked rows stay NaN-free.
const MASK_FILL: f64 = -1.0e4;

#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    #[error("CAPT head config: {0}")]
    Config(String),
    #[error("CAPT head input `{tensor}`: {msg}")]
    Input { tensor: &'static str, msg: String },
    #[error("CAPT head: {0}")]
    Graph(#[from] capt_graph::Error),
}

pub type Result<T> = std::result::Result<T, HeadError>;

/// Static configuration of the head (effective values: caps already applied).
#[derive(Debug, Clone, PartialEq)]
pub struct HeadConfig {
    pub num_classes: usize,
    pub dim: usize,
    /// `G`, local tokens per image (16 for the 4x4 pooled grid).
    pub local_tokens: usize,
    /// `K`: `min(sem.k_cand, C - 1)`.
    pub k_cand: usize,
    /// `K_p`: `min(sem.k_pairs, K)`.
    pub k_pairs: usize,
    /// `K_s`: `min(sam.k_samples, 2 K_p M)` (top-k needs that many slots).
    pub k_samples: usize,
    /// `M`: bank cell size.
    pub cell_size: usize,
    /// Temperature of the retrieval weights (0.07).
    pub sam_temperature: f32,
    /// Semantic experts (0, 1) on; off = `Method::CaptNoSem`.
    pub use_sem: bool,
    /// Sample expert (2) and the adapter on; off = `Method::CaptNoSam`.
    pub use_sam: bool,
    /// Learned router; off = uniform gates (`Method::CaptNoRouting`).
    pub learned_router: bool,
    /// Adapter bottleneck `D / sam.reduction`.
    pub hidden: usize,
    /// Norm of the router's initial random rows (`mgde.router_init_scale`).
    pub router_init_scale: f32,
}

impl HeadConfig {
    /// The head of `cfg.method` for `num_classes` classes, joint dim `dim` and `local_tokens`
    /// local tokens per image.
    pub fn from_config(
        cfg: &CaptConfig,
        num_classes: usize,
        dim: usize,
        local_tokens: usize,
    ) -> Result<Self> {
        if !cfg.method.uses_bank() {
            return Err(HeadError::Config(format!(
                "method `{}` has no CAPT head; use capt, capt-no-sem, capt-no-sam or capt-no-routing",
                cfg.method
            )));
        }
        if num_classes < 2 {
            return Err(HeadError::Config(format!(
                "{num_classes} class(es): confusion pairs need at least 2 classes"
            )));
        }
        let k_cand = cfg.sem.k_cand.min(num_classes - 1);
        let k_pairs = cfg.sem.k_pairs.min(k_cand);
        let cell_size = cfg.bank.cell_size;
        let head = Self {
            num_classes,
            dim,
            local_tokens,
            k_cand,
            k_pairs,
            k_samples: cfg.sam.k_samples.min(2 * k_pairs * cell_size),
            cell_size,
            sam_temperature: cfg.sam.temperature,
            use_sem: cfg.method.uses_sem(),
            use_sam: cfg.method.uses_sam(),
            learned_router: cfg.method.learned_router(),
            hidden: dim / cfg.sam.reduction.max(1),
            router_init_scale: cfg.mgde.router_init_scale,
        };
        head.validate()?;
        Ok(head)
    }

    /// `R = 2 K_p M`: retrieval slots per image (cells (c, j_k) and (j_k, c)).
    pub fn retrieval_slots(&self) -> usize {
        2 * self.k_pairs * self.cell_size
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(HeadError::Config(m));
        if self.num_classes < 2 || self.dim == 0 || self.local_tokens == 0 {
            return bad(format!(
                "num_classes ({}) must be >= 2, dim ({}) and local_tokens ({}) >= 1",
                self.num_classes, self.dim, self.local_tokens
            ));
        }
        if self.k_cand == 0 || self.k_cand > self.num_classes - 1 {
            return bad(format!(
                "k_cand ({}) must lie in 1..={} (C - 1)",
                self.k_cand,
                self.num_classes - 1
            ));
        }
        if self.k_pairs == 0 || self.k_pairs > self.k_cand {
            return bad(format!(
                "k_pairs ({}) must lie in 1..={} (k_cand)",
                self.k_pairs, self.k_cand
            ));
        }
        if self.cell_size == 0 || self.k_samples == 0 || self.k_samples > self.retrieval_slots() {
            return bad(format!(
                "k_samples ({}) must lie in 1..={} (2 * k_pairs * cell_size), cell_size >= 1",
                self.k_samples,
                self.retrieval_slots()
            ));
        }
        if self.sam_temperature.is_nan() || self.sam_temperature <= 0.0 {
            return bad(format!(
                "sam_temperature ({}) must be > 0",
                self.sam_temperature
            ));
        }
        if self.hidden == 0 {
            return bad(format!(
                "adapter hidden width is 0 (dim {} / sam.reduction); lower sam.reduction",
                self.dim
            ));
        }
        Ok(())
    }
}

/// Per-image inputs of the head.
#[derive(Debug, Clone)]
pub struct HeadInputs<T> {
    /// F `[N, D]`: projected CLS feature, not normalised (the head normalises).
    pub image_global: T,
    /// F `[N, G, D]`: pooled local tokens `proj(ln_post(patches))`, 14x14 -> 4x4.
    pub image_local: T,
    /// F `[C, D]`: class text embeddings `t_c`, not normalised.
    pub class_emb: T,
    /// F `[]` or `[1]`: CLIP's `logit_scale`; the head uses `tau = exp(logit_scale)`.
    pub logit_scale: T,
}

/// Tables of the head: static at inference (baked into the ONNX graph), rebuilt per step in
/// training. When `!use_sem`, `t_com` / `t_dif` / `t_dif_rev` are never read (pass any
/// placeholder); when `!use_sam`, `pool_global` / `pool_local` / `cells` are never read.
#[derive(Debug, Clone)]
pub struct HeadTables<T> {
    /// I64 `[C, K]`: candidate partners of class c, strongest first (never c itself).
    pub cand_index: T,
    /// F `[C, K]`: their `Nhat[c, j]`.
    pub cand_weight: T,
    /// F `[C, K, D]`: `t_com(c, j)`.
    pub t_com: T,
    /// F `[C, K, D]`: `t_dif(c, j)`.
    pub t_dif: T,
    /// F `[C, K, D]`: `t_dif(j, c)`.
    pub t_dif_rev: T,
    /// F `[P, D]`: bank pool global features (`P >= 1`; one zero row for an empty bank).
    pub pool_global: T,
    /// F `[P, G, D]`: bank pool local tokens.
    pub pool_local: T,
    /// I64 `[C, K, 2, M]`: pool slots of cells (c, j) [dir 0] and (j, c) [dir 1], -1 padded
    /// (`ConfusionBank::cell_table`).
    pub cells: T,
}

impl<T> HeadTables<T> {
    /// The one list of the tables' names, in field order. Checkpoints store the tables under
    /// these names; exported classifiers under `capt_model::names::table(name)`.
    pub const NAMES: [&'static str; 8] = [
        "cand_index",
        "cand_weight",
        "t_com",
        "t_dif",
        "t_dif_rev",
        "pool_global",
        "pool_local",
        "cells",
    ];

    /// The tables made by `f(name)` for each of [`Self::NAMES`].
    pub fn try_named<E>(
        mut f: impl FnMut(&'static str) -> std::result::Result<T, E>,
    ) -> std::result::Result<Self, E> {
        let [a, b, c, d, e, g, h, i] = Self::NAMES;
        Ok(Self {
            cand_index: f(a)?,
            cand_weight: f(b)?,
            t_com: f(c)?,
            t_dif: f(d)?,
            t_dif_rev: f(e)?,
            pool_global: f(g)?,
            pool_local: f(h)?,
            cells: f(i)?,
        })
    }

    /// [`Self::try_named`] for an infallible `f` (e.g. the names themselves).
    pub fn named(mut f: impl FnMut(&'static str) -> T) -> Self {
        Self::try_named(|n| Ok::<T, std::convert::Infallible>(f(n))).unwrap_or_else(|e| match e {})
    }

    /// The tables with their names, in [`Self::NAMES`] order.
    pub fn into_named(self) -> [(&'static str, T); 8] {
        let [a, b, c, d, e, g, h, i] = Self::NAMES;
        [
            (a, self.cand_index),
            (b, self.cand_weight),
            (c, self.t_com),
            (d, self.t_dif),
            (e, self.t_dif_rev),
            (g, self.pool_global),
            (h, self.pool_local),
            (i, self.cells),
        ]
    }
}

/// What the head computes.
#[derive(Debug, Clone)]
pub struct HeadOutput<T> {
    /// F `[N, C]`: `z = z_base + sum_e g_e * gain_e * dz_e`.
    pub logits: T,
    /// F `[N, C]`: `z_base = tau * norm(f) . norm(T)^T`.
    pub base_logits: T,
    /// F `[N, 3]`: router output (1/3 each when `!learned_router`).
    pub gates: T,
    /// I64 `[N, K_p]`: partner classes `j_k` of the Semantic Confusion Pairs (c, j_k),
    /// `c = argmax z_base` (diagnostics; not needed by the losses).
    pub pairs: T,
}

/// The full CAPT head. Parameters are read with `ops.param` under the names of
/// [`head_params`].
pub fn capt_head<O: Ops>(
    ops: &O,
    cfg: &HeadConfig,
    x: &HeadInputs<O::T>,
    t: &HeadTables<O::T>,
) -> Result<HeadOutput<O::T>> {
    cfg.validate()?;
    check_shapes(ops, cfg, x, t)?;
    let f = ops.l2_normalize(&x.image_global, -1)?; // [N, D]
    let tn_t = ops.transpose(&ops.l2_normalize(&x.class_emb, -1)?, 0, 1)?; // [D, C]
    let tau = ops.exp(&ops.reshape(&x.logit_scale, &[1, 1])?)?; // [1, 1]
    let z_base = ops.mul(&ops.matmul(&f, &tn_t)?, &tau)?; // [N, C]

    let pairs = select_pairs(ops, cfg, &z_base, t)?;
    let f_sam = if cfg.use_sam {
        let r = retrieve(ops, cfg, &f, &pairs, t)?;
        sample_feature(ops, cfg, &f, &x.image_local, &r, t)?
    } else {
        f.clone()
    };
    // Normalised t_dif of the pairs, read only when the semantic experts exist.
    let dif = if cfg.use_sem {
        Some((
            pair_rows(ops, cfg, &t.t_dif, &pairs.flat)?,
            pair_rows(ops, cfg, &t.t_dif_rev, &pairs.flat)?,
        ))
    } else {
        None
    };

    let gates = if cfg.learned_router {
        let third = match &dif {
            Some((d, _)) => ops.reduce_mean(d, 1, false)?,
            None => ops.mul_scalar(&f, 0.0)?,
        };
        let r_in = ops.concat(&[&f, &f_sam, &third], -1)?; // [N, 3D]
        ops.softmax(&ops.linear(&r_in, &ops.param(ROUTER)?, None)?, -1)?
    } else {
        // [N, 1] zeros from f keeps a symbolic batch; + [1, 3] thirds.
        let zero = ops.mul_scalar(&ops.narrow(&f, 1, 0, 1)?, 0.0)?;
        let third = HostTensor::f64(vec![1, NUM_EXPERTS], vec![1.0 / 3.0; NUM_EXPERTS])?;
        ops.add(&zero, &ops.constant(&third)?)?
    };
    let coef = ops.mul(&gates, &ops.param(GAINS)?)?; // [N, 3]

    let mut logits = z_base.clone();
    let mut add_expert = |e: usize, dz: &O::T| -> Result<()> {
        let term = ops.mul(&ops.narrow(&coef, 1, e, 1)?, dz)?;
        logits = ops.add(&logits, &term)?;
        Ok(())
    };
    if let Some((d, d_rev)) = &dif {
        add_expert(0, &sem::difference_expert(ops, &f, d, d_rev, &tau, &pairs)?)?;
        let u = pair_rows(ops, cfg, &t.t_com, &pairs.flat)?;
        let f_com = sem::commonality_feature(ops, &f, &u)?;
        add_expert(1, &restricted_shift(ops, &f_com, &f, &tn_t, &tau, &pairs)?)?;
    }
    if cfg.use_sam {
        add_expert(2, &restricted_shift(ops, &f_sam, &f, &tn_t, &tau, &pairs)?)?;
    }
    Ok(HeadOutput {
        logits,
        base_logits: z_base,
        gates,
        pairs: pairs.partners,
    })
}

/// MGDE load-balance term `E * sum_e mean_n(g_e)^2` of gates `[N, E]` (scalar, rank 0); 1 when
/// the batch spreads evenly over the experts, E when it uses one.
pub fn load_balance_loss<O: Ops>(ops: &O, gates: &O::T) -> Result<O::T> {
    let e = match ops.dims(gates).as_slice() {
        [_, Some(e)] => *e,
        other => {
            return Err(HeadError::Input {
                tensor: "gates",
                msg: format!("must be [N, E] with a known E, got {other:?}"),
            })
        }
    };
    let m = ops.reduce_mean(gates, 0, false)?; // [E]
    let s = ops.reduce_sum(&ops.mul(&m, &m)?, 0, false)?;
    Ok(ops.mul_scalar(&s, e as f64)?)
}

/// `norm(table[c, k_j])` for the pairs: `[C, K, D]` rows at flat indices `[N, K_p]` ->
/// `[N, K_p, D]`.
fn pair_rows<O: Ops>(ops: &O, cfg: &HeadConfig, table: &O::T, flat: &O::T) -> Result<O::T> {
    let rows = ops.reshape(
        table,
        &[(cfg.num_classes * cfg.k_cand) as i64, cfg.dim as i64],
    )?;
    Ok(ops.l2_normalize(&ops.gather(&rows, flat, 0)?, -1)?)
}

/// `tau * (f_new - f) . norm(T)^T`, kept on the candidate set `S = {c} U {j_k}` only.
fn restricted_shift<O: Ops>(
    ops: &O,
    f_new: &O::T,
    f: &O::T,
    tn_t: &O::T,
    tau: &O::T,
    pairs: &Pairs<O::T>,
) -> Result<O::T> {
    let dz = ops.mul(&ops.matmul(&ops.sub(f_new, f)?, tn_t)?, tau)?;
    Ok(ops.mul(&dz, &pairs.support)?)
}

/// Checks every shape that is known at build time against the config.
fn check_shapes<O: Ops>(
    ops: &O,
    cfg: &HeadConfig,
    x: &HeadInputs<O::T>,
    t: &HeadTables<O::T>,
) -> Result<()> {
    let (c, d, g, k, m) = (
        Some(cfg.num_classes),
        Some(cfg.dim),
        Some(cfg.local_tokens),
        Some(cfg.k_cand),
        Some(cfg.cell_size),
    );
    let float = |tensor, v: &O::T| expect(ops, tensor, v, None, true);
    let index = |tensor, v: &O::T| expect(ops, tensor, v, None, false);
    let shaped = |tensor, v: &O::T, dims: &[Option<usize>], is_float: bool| {
        expect(ops, tensor, v, Some(dims), is_float)
    };
    let n = ops.dims(&x.image_global).first().copied().flatten();
    shaped("image_global", &x.image_global, &[None, d], true)?;
    shaped("image_local", &x.image_local, &[n, g, d], true)?;
    shaped("class_emb", &x.class_emb, &[c, d], true)?;
    float("logit_scale", &x.logit_scale)?;
    let ls = ops.dims(&x.logit_scale);
    if !(ls.is_empty() || ls == [Some(1)]) {
        return Err(HeadError::Input {
            tensor: "logit_scale",
            msg: format!("must be a scalar or [1], got {ls:?}"),
        });
    }
    shaped("cand_index", &t.cand_index, &[c, k], false)?;
    index("cand_index", &t.cand_index)?;
    shaped("cand_weight", &t.cand_weight, &[c, k], true)?;
    if cfg.use_sem {
        shaped("t_com", &t.t_com, &[c, k, d], true)?;
        shaped("t_dif", &t.t_dif, &[c, k, d], true)?;
        shaped("t_dif_rev", &t.t_dif_rev, &[c, k, d], true)?;
    }
    if cfg.use_sam {
        let p = ops.dims(&t.pool_global).first().copied().flatten();
        if p == Some(0) {
            return Err(HeadError::Input {
                tensor: "pool_global",
                msg: "has no rows; pass one zero row for an empty bank".into(),
            });
        }
        shaped("pool_global", &t.pool_global, &[None, d], true)?;
        shaped("pool_local", &t.pool_local, &[p, g, d], true)?;
        shaped("cells", &t.cells, &[c, k, Some(2), m], false)?;
    }
    Ok(())
}

/// `v` has rank `dims.len()` with every known dim equal, and a float (or I64) type.
fn expect<O: Ops>(
    ops: &O,
    tensor: &'static str,
    v: &O::T,
    dims: Option<&[Option<usize>]>,
    is_float: bool,
) -> Result<()> {
    let dt = ops.dtype(v);
    if is_float != dt.is_float() || (!is_float && dt != DType::I64) {
        let want = if is_float { "a float type" } else { "I64" };
        return Err(HeadError::Input {
            tensor,
            msg: format!("has dtype {dt:?}, expected {want}"),
        });
    }
    if let Some(dims) = dims {
        let got = ops.dims(v);
        let ok = got.len() == dims.len()
            && got
                .iter()
                .zip(dims)
                .all(|(a, b)| !matches!((a, b), (Some(a), Some(b)) if a != b));
        if !ok {
            let fmt = |ds: &[Option<usize>]| {
                let s: Vec<String> = ds
                    .iter()
                    .map(|d| d.map_or("?".to_string(), |d| d.to_string()))
                    .collect();
                format!("[{}]", s.join(", "))
            };
            return Err(HeadError::Input {
                tensor,
                msg: format!(
                    "has shape {}, expected {} (from the head config)",
                    fmt(&got),
                    fmt(dims)
                ),
            });
        }
    }
    Ok(())
}
