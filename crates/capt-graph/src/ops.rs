//! The tensor-ops trait the CAPT inference path is written against.

use crate::{DType, Error, HostTensor, Result};

/// The small set of tensor ops that the CLIP encoder and the CAPT head (SEM, SAM,
/// Diff-Manner Adapter, MGDE; docs/METHOD.md §2-§4, §6) are written with.
///
/// One generic forward pass over `Ops` is executed by candle ([`crate::CandleOps`], training and
/// parity) and emitted as an ONNX graph (`capt_onnx::OnnxBuilder`, export), so the two cannot
/// drift. Backends must give identical semantics; each method documents them.
///
/// Conventions shared by all methods:
/// - `axis: isize` counts from the end when negative (`-1` = last axis), as in ONNX.
/// - "broadcast" means numpy / ONNX multidirectional broadcasting.
/// - Float values are the backend's float dtype (F32 for export, F32 or F64 in candle);
///   indices are always [`DType::I64`] and must lie in `[0, dim)` (no negative indices);
///   masks are [`DType::Bool`]. Bool values only feed `where_`, `equal`, `cast` and the
///   shape/indexing ops; arithmetic, ordering, matmul and reductions reject them (ONNX opset
///   17 does not define those on bool), so cast a mask first.
/// - Ops take `&self` so generic code can nest calls (`ops.add(&x, &ops.param("b")?)`); a
///   recording backend keeps its graph behind interior mutability.
/// - Every method is fallible and never panics on bad input.
pub trait Ops {
    /// A value: a concrete tensor (candle) or a symbolic one (ONNX graph builder).
    type T: Clone;

    // ---- introspection ---------------------------------------------------------------

    /// Dims of `x`. `None` marks a size only known at run time (the symbolic batch `N` of an
    /// exported graph); candle always returns `Some`.
    fn dims(&self, x: &Self::T) -> Vec<Option<usize>>;
    /// Element type of `x`.
    fn dtype(&self, x: &Self::T) -> DType;
    /// Rank of `x`.
    fn rank(&self, x: &Self::T) -> usize {
        self.dims(x).len()
    }

    // ---- values ----------------------------------------------------------------------

    /// The named trained/frozen parameter (e.g. `"visual.proj"`). Float parameters come back
    /// in the backend's float dtype; the ONNX backend stores each one once as an initializer
    /// under exactly this name. Missing name -> [`Error::MissingParam`].
    fn param(&self, name: &str) -> Result<Self::T>;
    /// Whether [`Ops::param`] would find `name` (for optional parameters).
    fn has_param(&self, name: &str) -> bool;
    /// A constant. Float data is converted to the backend's float dtype; I64 and Bool keep
    /// their type.
    fn constant(&self, value: &HostTensor) -> Result<Self::T>;

    // ---- linear algebra --------------------------------------------------------------

    /// Batched matrix product, ONNX `MatMul` / `numpy.matmul` for ranks >= 2:
    /// `a [..., m, k] @ b [..., k, n] -> [..., m, n]`; the leading (batch) dims broadcast.
    fn matmul(&self, a: &Self::T, b: &Self::T) -> Result<Self::T>;
    /// 2-D convolution, NCHW: `x [n, c, h, w]`, `w [o, c, kh, kw]`, optional `bias [o]`;
    /// square `stride` and symmetric zero `padding`, dilation 1, groups 1.
    /// Output `[n, o, (h + 2p - kh) / s + 1, (w + 2p - kw) / s + 1]`.
    fn conv2d(
        &self,
        x: &Self::T,
        w: &Self::T,
        bias: Option<&Self::T>,
        stride: usize,
        padding: usize,
    ) -> Result<Self::T>;

    // ---- element-wise ----------------------------------------------------------------

    /// `a + b`, broadcast. Operands must share a dtype (float or I64).
    fn add(&self, a: &Self::T, b: &Self::T) -> Result<Self::T>;
    /// `a - b`, broadcast.
    fn sub(&self, a: &Self::T, b: &Self::T) -> Result<Self::T>;
    /// `a * b`, broadcast.
    fn mul(&self, a: &Self::T, b: &Self::T) -> Result<Self::T>;
    /// `a / b`, broadcast (float only).
    fn div(&self, a: &Self::T, b: &Self::T) -> Result<Self::T>;
    /// `x * s` for a float `x`.
    fn mul_scalar(&self, x: &Self::T, s: f64) -> Result<Self::T>;
    /// `x + s` for a float `x`.
    fn add_scalar(&self, x: &Self::T, s: f64) -> Result<Self::T>;
    /// `-x` (float).
    fn neg(&self, x: &Self::T) -> Result<Self::T>;
    /// `e^x` (float).
    fn exp(&self, x: &Self::T) -> Result<Self::T>;
    /// `sqrt(x)` (float).
    fn sqrt(&self, x: &Self::T) -> Result<Self::T>;
    /// `1 / (1 + e^-x)` (float).
    fn sigmoid(&self, x: &Self::T) -> Result<Self::T>;
    /// Exact GELU, `0.5 x (1 + erf(x / sqrt 2))` (float).
    fn gelu_erf(&self, x: &Self::T) -> Result<Self::T>;
    /// CLIP's QuickGELU, `x * sigmoid(1.702 x)` (float).
    fn quick_gelu(&self, x: &Self::T) -> Result<Self::T> {
        let s = self.sigmoid(&self.mul_scalar(x, 1.702)?)?;
        self.mul(x, &s)
    }

    // ---- comparison and selection ----------------------------------------------------

    /// `a == b` element-wise, broadcast -> Bool. Operands share a dtype (float or I64).
    fn equal(&self, a: &Self::T, b: &Self::T) -> Result<Self::T>;
    /// `a < b` element-wise, broadcast -> Bool.
    fn less(&self, a: &Self::T, b: &Self::T) -> Result<Self::T>;
    /// `a > b` element-wise, broadcast -> Bool.
    fn greater(&self, a: &Self::T, b: &Self::T) -> Result<Self::T>;
    /// `cond ? a : b`, all three broadcast; `cond` is Bool, `a` and `b` share a dtype.
    /// Gradients flow to `a` and `b`.
    fn where_(&self, cond: &Self::T, a: &Self::T, b: &Self::T) -> Result<Self::T>;
    /// Element-type conversion. Float -> I64 truncates toward zero; Bool -> number gives 0/1;
    /// number -> Bool is `x != 0`.
    fn cast(&self, x: &Self::T, dtype: DType) -> Result<Self::T>;

    // ---- normalisation ---------------------------------------------------------------

    /// Softmax along `axis` (max-subtracted; differentiable in candle).
    fn softmax(&self, x: &Self::T, axis: isize) -> Result<Self::T>;
    /// LayerNorm over the last axis: `(x - mean) / sqrt(var + eps) * w + b`, biased variance,
    /// `w`, `b` of shape `[x.dims[-1]]`. ONNX `LayerNormalization(axis=-1)`.
    fn layer_norm(&self, x: &Self::T, w: &Self::T, b: &Self::T, eps: f64) -> Result<Self::T>;
    /// `x / max(||x||_2, 1e-12)` along `axis` (torch `F.normalize`; equals CLIP's
    /// `x / x.norm()` for non-zero rows, and maps an all-zero row to zeros instead of NaN).
    fn l2_normalize(&self, x: &Self::T, axis: isize) -> Result<Self::T>;

    // ---- reductions ------------------------------------------------------------------

    /// Sum along `axis`; `keepdim` keeps it with size 1.
    fn reduce_sum(&self, x: &Self::T, axis: isize, keepdim: bool) -> Result<Self::T>;
    /// Mean along `axis` (float).
    fn reduce_mean(&self, x: &Self::T, axis: isize, keepdim: bool) -> Result<Self::T>;
    /// Max along `axis`.
    fn reduce_max(&self, x: &Self::T, axis: isize, keepdim: bool) -> Result<Self::T>;
    /// Index of the max along `axis` -> I64. Ties: the first (lowest) index.
    fn argmax(&self, x: &Self::T, axis: isize, keepdim: bool) -> Result<Self::T>;
    /// The `k` largest entries along the last axis, sorted descending: `(values, indices)`,
    /// both `[..., k]`, indices I64. `values` is differentiable (a gather of `x`).
    /// Ties: lower index first (ONNX rule; candle's CPU sort is stable) - do not rely on ties.
    fn topk(&self, x: &Self::T, k: usize) -> Result<(Self::T, Self::T)>;

    // ---- indexing --------------------------------------------------------------------

    /// ONNX `Gather` (index_select generalised to any index rank): with `x [d0..d(r-1)]`
    /// and `indices` of shape `I` (rank 0 allowed), the result has shape
    /// `x.dims[..axis] ++ I ++ x.dims[axis+1..]` and
    /// `out[.., i.., ..] = x[.., indices[i..], ..]`. Differentiable w.r.t. `x`.
    fn gather(&self, x: &Self::T, indices: &Self::T, axis: isize) -> Result<Self::T>;
    /// ONNX `GatherElements` / `torch.gather`: `indices` has the rank of `x`, dims no larger
    /// than `x`'s on the other axes; `out[i][j][k] = x[i][indices[i][j][k]][k]` (axis 1).
    /// Output shape = `indices` shape. Differentiable w.r.t. `x`.
    fn gather_elements(&self, x: &Self::T, indices: &Self::T, axis: isize) -> Result<Self::T>;
    /// `one_hot(idx)[.., c] = (idx[..] == c)` as `dtype`, shape `idx.dims ++ [depth]`.
    /// Built as a broadcast comparison with `range(depth)`, so a correction `dz [N, K]` on a
    /// candidate set `idx [N, K]` scatters onto `C` classes as
    /// `sum_k dz[.., k, None] * one_hot(idx, C)` without a Scatter op.
    fn one_hot(&self, indices: &Self::T, depth: usize, dtype: DType) -> Result<Self::T> {
        let range = self.constant(&HostTensor::range_i64(depth))?;
        let idx = self.unsqueeze(indices, -1)?;
        let mask = self.equal(&idx, &range)?;
        self.cast(&mask, dtype)
    }

    // ---- shape -----------------------------------------------------------------------

    /// ONNX `Reshape` (allowzero = 0): `0` copies the input dim at the same position, one `-1`
    /// is inferred. E.g. `[N, S, W] -> [0, 0, H, W/H]` keeps a symbolic batch.
    fn reshape(&self, x: &Self::T, shape: &[i64]) -> Result<Self::T>;
    /// Axis permutation: `out.dims[i] = x.dims[perm[i]]`.
    fn permute(&self, x: &Self::T, perm: &[usize]) -> Result<Self::T>;
    /// Swaps two axes.
    fn transpose(&self, x: &Self::T, a: isize, b: isize) -> Result<Self::T> {
        let rank = self.rank(x);
        let (a, b) = (
            norm_axis("transpose", a, rank)?,
            norm_axis("transpose", b, rank)?,
        );
        let mut perm: Vec<usize> = (0..rank).collect();
        perm.swap(a, b);
        self.permute(x, &perm)
    }
    /// Concatenation along `axis`; all other dims equal, same dtype.
    fn concat(&self, xs: &[&Self::T], axis: isize) -> Result<Self::T>;
    /// `x[.., start..start+len, ..]` along `axis`.
    fn narrow(&self, x: &Self::T, axis: isize, start: usize, len: usize) -> Result<Self::T>;
    /// Inserts a size-1 axis; a negative `axis` counts in the *output* rank (ONNX).
    fn unsqueeze(&self, x: &Self::T, axis: isize) -> Result<Self::T>;
    /// Removes a size-1 axis.
    fn squeeze(&self, x: &Self::T, axis: isize) -> Result<Self::T>;
    /// ONNX `Expand`: the result shape is `broadcast(x.dims, shape)`, so a `1` in `shape`
    /// keeps `x`'s dim (`[N, K, 1] -> expand [1, 1, D] -> [N, K, D]` with symbolic `N`).
    fn expand(&self, x: &Self::T, shape: &[usize]) -> Result<Self::T>;
    /// Zero padding along one axis: `before` zeros in front, `after` behind (e.g. a free slot
    /// for CLIP's class token that a broadcast add fills, with a symbolic batch).
    fn pad(&self, x: &Self::T, axis: isize, before: usize, after: usize) -> Result<Self::T>;

    // ---- composites (written once here, so every backend shares them) -----------------

    /// torch `Linear`: `x [..., in] @ w[out, in]^T + b [out]`.
    fn linear(&self, x: &Self::T, w: &Self::T, b: Option<&Self::T>) -> Result<Self::T> {
        let wt = self.transpose(w, 0, 1)?;
        let y = self.matmul(x, &wt)?;
        match b {
            Some(b) => self.add(&y, b),
            None => Ok(y),
        }
    }

    /// Adaptive average pooling of a token grid: `x [..., h*w, D]` (row-major grid) ->
    /// `[..., oh*ow, D]`, bins as torch `adaptive_avg_pool2d` (bin `i` covers
    /// `floor(i*h/oh) .. ceil((i+1)*h/oh)`, so 14 -> 4 uses overlapping bins of 4). Done as a
    /// constant pooling matrix `[oh*ow, h*w]` times `x`, i.e. one MatMul in ONNX.
    fn avg_pool_tokens(
        &self,
        x: &Self::T,
        from: (usize, usize),
        to: (usize, usize),
    ) -> Result<Self::T> {
        let pool = adaptive_pool_matrix(from, to)?;
        let p = self.constant(&pool)?;
        self.matmul(&p, x)
    }
}

/// Resolves a possibly negative axis against `rank`.
pub fn norm_axis(op: &'static str, axis: isize, rank: usize) -> Result<usize> {
    let r = rank as isize;
    let a = if axis < 0 { axis + r } else { axis };
    if a < 0 || a >= r {
        return Err(Error::op(
            op,
            format!("axis {axis} out of range for rank {rank}"),
        ));
    }
    Ok(a as usize)
}

/// The `[oh*ow, h*w]` F32 matrix of torch `adaptive_avg_pool2d` on a row-major `h x w` grid.
pub fn adaptive_pool_matrix(from: (usize, usize), to: (usize, usize)) -> Result<HostTensor> {
    let ((h, w), (oh, ow)) = (from, to);
    if h == 0 || w == 0 || oh == 0 || ow == 0 || oh > h || ow > w {
        return Err(Error::op(
            "avg_pool_tokens",
            format!("cannot pool a {h}x{w} grid to {oh}x{ow}"),
        ));
    }
    let bins = |i: usize, n: usize, o: usize| (i * n / o, ((i + 1) * n).div_ceil(o));
    let mut m = vec![0f32; oh * ow * h * w];
    for oi in 0..oh {
        let (r0, r1) = bins(oi, h, oh);
        for oj in 0..ow {
            let (c0, c1) = bins(oj, w, ow);
            let inv = 1.0 / ((r1 - r0) * (c1 - c0)) as f32;
            let row = (oi * ow + oj) * h * w;
            for r in r0..r1 {
                for c in c0..c1 {
                    m[row + r * w + c] = inv;
                }
            }
        }
    }
    HostTensor::f32(vec![oh * ow, h * w], m)
}

/// numpy broadcasting of two static shapes.
pub fn broadcast_shape(op: &'static str, a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    let rank = a.len().max(b.len());
    let mut out = vec![0; rank];
    for (i, o) in out.iter_mut().enumerate() {
        let da = if i + a.len() >= rank {
            a[i + a.len() - rank]
        } else {
            1
        };
        let db = if i + b.len() >= rank {
            b[i + b.len() - rank]
        } else {
            1
        };
        *o = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => {
                return Err(Error::op(
                    op,
                    format!("shapes {a:?} and {b:?} do not broadcast"),
                ))
            }
        };
    }
    Ok(out)
}

/// ONNX `Reshape` (allowzero = 0) on a static input shape.
pub fn resolve_reshape(op: &'static str, input: &[usize], spec: &[i64]) -> Result<Vec<usize>> {
    let total: usize = input.iter().product();
    let mut out = Vec::with_capacity(spec.len());
    let mut infer = None;
    for (i, &s) in spec.iter().enumerate() {
        match s {
            0 => out.push(*input.get(i).ok_or_else(|| {
                Error::op(
                    op,
                    format!("0 at position {i} but the input {input:?} has no such dim"),
                )
            })?),
            -1 if infer.is_none() => {
                infer = Some(i);
                out.push(1);
            }
            s if s > 0 => out.push(s as usize),
            _ => return Err(Error::op(op, format!("invalid target shape {spec:?}"))),
        }
    }
    let known: usize = out.iter().product();
    if let Some(i) = infer {
        if known == 0 || !total.is_multiple_of(known) {
            return Err(Error::op(
                op,
                format!("cannot reshape {input:?} to {spec:?}"),
            ));
        }
        out[i] = total / known;
    } else if known != total {
        return Err(Error::op(
            op,
            format!("cannot reshape {input:?} to {spec:?}"),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_matrix_matches_torch_bins() {
        // 14 -> 4: bins [0,4) [3,7) [7,11) [10,14), each of 4 rows/cols -> weight 1/16.
        let m = adaptive_pool_matrix((14, 14), (4, 4)).unwrap();
        assert_eq!(m.dims(), &[16, 196]);
        let crate::HostData::F32(v) = m.data() else {
            panic!("f32 expected")
        };
        for row in v.chunks(196) {
            let s: f32 = row.iter().sum();
            assert!((s - 1.0).abs() < 1e-6);
            assert_eq!(row.iter().filter(|&&x| x > 0.0).count(), 16);
        }
        // token (3, 3) is in bins (0,0), (0,1), (1,0), (1,1).
        let t = 3 * 14 + 3;
        let hits: Vec<usize> = (0..16).filter(|&o| v[o * 196 + t] > 0.0).collect();
        assert_eq!(hits, vec![0, 1, 4, 5]);
        assert!(adaptive_pool_matrix((2, 2), (4, 4)).is_err());
    }

    #[test]
    fn reshape_and_broadcast_rules() {
        assert_eq!(
            resolve_reshape("t", &[2, 6, 8], &[0, 0, 2, 4]).unwrap(),
            [2, 6, 2, 4]
        );
        assert_eq!(resolve_reshape("t", &[2, 6, 8], &[-1, 8]).unwrap(), [12, 8]);
        assert!(resolve_reshape("t", &[2, 6, 8], &[5, -1]).is_err());
        assert!(resolve_reshape("t", &[2, 6], &[-1, -1]).is_err());
        assert_eq!(
            broadcast_shape("t", &[3, 1, 5], &[4, 1]).unwrap(),
            [3, 4, 5]
        );
        assert!(broadcast_shape("t", &[3], &[4]).is_err());
        assert_eq!(norm_axis("t", -1, 3).unwrap(), 2);
        assert!(norm_axis("t", 3, 3).is_err());
    }
}
