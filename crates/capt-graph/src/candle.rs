//! [`Ops`] executed eagerly by candle. Every op used on a float path has a backward pass, so
//! training backpropagates through the same generic code that is exported.

use std::collections::HashMap;

use candle_core::{DType as CDType, Device, Tensor, D};

use crate::error::CandleCtx;
use crate::ops::{broadcast_shape, norm_axis, resolve_reshape};
use crate::{DType, Error, HostTensor, Ops, Result};

/// Candle backend: `T = candle_core::Tensor`.
///
/// Autograd-safe by construction: softmax is `candle_nn::ops::softmax` (max / exp / sum / div),
/// LayerNorm is spelled out as in `candle_nn::ops::layer_norm_slow` (the fused candle LayerNorm
/// and `softmax_last_dim` have no backward), top-k is `arg_sort` + `narrow` + `gather`.
/// Parameters may be `Var`-backed tensors; gradients reach them.
#[derive(Debug, Clone)]
pub struct CandleOps {
    device: Device,
    float_dtype: CDType,
    params: HashMap<String, Tensor>,
}

impl CandleOps {
    /// `float_dtype` must be F32 or F64 (F64 for gradient checks).
    pub fn new(device: &Device, float_dtype: DType) -> Result<Self> {
        let float_dtype = match float_dtype {
            DType::F32 => CDType::F32,
            DType::F64 => CDType::F64,
            other => {
                return Err(Error::op(
                    "CandleOps::new",
                    format!("float dtype must be F32 or F64, got {other:?}"),
                ))
            }
        };
        Ok(Self {
            device: device.clone(),
            float_dtype,
            params: HashMap::new(),
        })
    }

    /// Adds parameters (e.g. `varmap.data()` tensors or a safetensors load).
    pub fn with_params(mut self, params: impl IntoIterator<Item = (String, Tensor)>) -> Self {
        self.params.extend(params);
        self
    }

    /// Adds or replaces one parameter.
    pub fn insert(&mut self, name: impl Into<String>, t: Tensor) {
        self.params.insert(name.into(), t);
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The float dtype (F32 or F64) constants and float params are converted to.
    pub fn float_dtype(&self) -> DType {
        if self.float_dtype == CDType::F64 {
            DType::F64
        } else {
            DType::F32
        }
    }

    fn cdtype(&self, d: DType) -> CDType {
        match d {
            DType::F32 | DType::F64 => {
                if d == DType::F64 {
                    CDType::F64
                } else {
                    CDType::F32
                }
            }
            DType::I64 => CDType::I64,
            DType::Bool => CDType::U8,
        }
    }

    /// Broadcasts `xs` to their common shape.
    fn broadcast_all(&self, op: &'static str, xs: &[&Tensor]) -> Result<Vec<Tensor>> {
        let mut shape: Vec<usize> = vec![];
        for x in xs {
            shape = broadcast_shape(op, &shape, x.dims())?;
        }
        xs.iter()
            .map(|x| x.broadcast_as(shape.as_slice()).ctx(op))
            .collect()
    }

    fn same_dtype(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
        if a.dtype() != b.dtype() {
            return Err(Error::op(
                op,
                format!("dtype mismatch {:?} vs {:?}", a.dtype(), b.dtype()),
            ));
        }
        Ok(())
    }

    /// Arithmetic, ordering and reductions are not defined on Bool in ONNX opset 17.
    fn numeric(op: &'static str, x: &Tensor) -> Result<()> {
        if x.dtype() == CDType::U8 {
            return Err(Error::op(op, "not defined on Bool; cast the mask first"));
        }
        Ok(())
    }

    fn float_only(op: &'static str, x: &Tensor) -> Result<()> {
        if !x.dtype().is_float() {
            return Err(Error::op(
                op,
                format!("needs a float input, got {:?}", x.dtype()),
            ));
        }
        Ok(())
    }

    fn index_i64(op: &'static str, idx: &Tensor) -> Result<Tensor> {
        match idx.dtype() {
            CDType::I64 => idx.contiguous().ctx(op),
            CDType::U32 | CDType::U8 => idx.to_dtype(CDType::I64).ctx(op),
            other => Err(Error::op(op, format!("indices must be I64, got {other:?}"))),
        }
    }
}

impl Ops for CandleOps {
    type T = Tensor;

    fn dims(&self, x: &Tensor) -> Vec<Option<usize>> {
        x.dims().iter().map(|&d| Some(d)).collect()
    }

    fn dtype(&self, x: &Tensor) -> DType {
        match x.dtype() {
            CDType::F64 => DType::F64,
            CDType::I64 | CDType::U32 => DType::I64,
            CDType::U8 => DType::Bool,
            _ => DType::F32,
        }
    }

    fn rank(&self, x: &Tensor) -> usize {
        x.rank()
    }

    fn param(&self, name: &str) -> Result<Tensor> {
        let t = self.params.get(name).ok_or_else(|| Error::MissingParam {
            name: name.to_string(),
            available: self.params.len(),
        })?;
        if t.dtype().is_float() && t.dtype() != self.float_dtype {
            return t.to_dtype(self.float_dtype).ctx("param");
        }
        Ok(t.clone())
    }

    fn has_param(&self, name: &str) -> bool {
        self.params.contains_key(name)
    }

    fn constant(&self, value: &HostTensor) -> Result<Tensor> {
        value.to_candle(&self.device, self.float_dtype)
    }

    fn matmul(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        if a.rank() < 2 || b.rank() < 2 {
            return Err(Error::op(
                "matmul",
                format!("needs rank >= 2, got {:?} @ {:?}", a.dims(), b.dims()),
            ));
        }
        Self::same_dtype("matmul", a, b)?;
        Self::numeric("matmul", a)?;
        a.contiguous()
            .and_then(|a| a.broadcast_matmul(&b.contiguous()?))
            .ctx("matmul")
    }

    fn conv2d(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        stride: usize,
        padding: usize,
    ) -> Result<Tensor> {
        if x.rank() != 4 || w.rank() != 4 {
            return Err(Error::op(
                "conv2d",
                format!(
                    "needs x [n,c,h,w] and w [o,c,kh,kw], got {:?} and {:?}",
                    x.dims(),
                    w.dims()
                ),
            ));
        }
        let y = x
            .contiguous()
            .and_then(|x| x.conv2d(w, padding, stride, 1, 1))
            .ctx("conv2d")?;
        match bias {
            Some(b) => y
                .broadcast_add(&b.reshape((1, b.elem_count(), 1, 1)).ctx("conv2d")?)
                .ctx("conv2d"),
            None => Ok(y),
        }
    }

    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        Self::same_dtype("add", a, b)?;
        Self::numeric("add", a)?;
        a.broadcast_add(b).ctx("add")
    }

    fn sub(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        Self::same_dtype("sub", a, b)?;
        Self::numeric("sub", a)?;
        a.broadcast_sub(b).ctx("sub")
    }

    fn mul(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        Self::same_dtype("mul", a, b)?;
        Self::numeric("mul", a)?;
        a.broadcast_mul(b).ctx("mul")
    }

    fn div(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        Self::same_dtype("div", a, b)?;
        Self::float_only("div", a)?;
        a.broadcast_div(b).ctx("div")
    }

    fn mul_scalar(&self, x: &Tensor, s: f64) -> Result<Tensor> {
        Self::float_only("mul_scalar", x)?;
        x.affine(s, 0.0).ctx("mul_scalar")
    }

    fn add_scalar(&self, x: &Tensor, s: f64) -> Result<Tensor> {
        Self::float_only("add_scalar", x)?;
        x.affine(1.0, s).ctx("add_scalar")
    }

    fn neg(&self, x: &Tensor) -> Result<Tensor> {
        Self::float_only("neg", x)?;
        x.neg().ctx("neg")
    }

    fn exp(&self, x: &Tensor) -> Result<Tensor> {
        Self::float_only("exp", x)?;
        x.exp().ctx("exp")
    }

    fn sqrt(&self, x: &Tensor) -> Result<Tensor> {
        Self::float_only("sqrt", x)?;
        x.sqrt().ctx("sqrt")
    }

    fn sigmoid(&self, x: &Tensor) -> Result<Tensor> {
        Self::float_only("sigmoid", x)?;
        candle_nn::ops::sigmoid(x).ctx("sigmoid")
    }

    fn gelu_erf(&self, x: &Tensor) -> Result<Tensor> {
        Self::float_only("gelu_erf", x)?;
        x.gelu_erf().ctx("gelu_erf")
    }

    fn equal(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        Self::same_dtype("equal", a, b)?;
        a.broadcast_eq(b).ctx("equal")
    }

    fn less(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        Self::same_dtype("less", a, b)?;
        Self::numeric("less", a)?;
        a.broadcast_lt(b).ctx("less")
    }

    fn greater(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        Self::same_dtype("greater", a, b)?;
        Self::numeric("greater", a)?;
        a.broadcast_gt(b).ctx("greater")
    }

    fn where_(&self, cond: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        if cond.dtype() != CDType::U8 {
            return Err(Error::op(
                "where",
                format!("condition must be Bool, got {:?}", cond.dtype()),
            ));
        }
        Self::same_dtype("where", a, b)?;
        let v = self.broadcast_all("where", &[cond, a, b])?;
        v[0].where_cond(&v[1], &v[2]).ctx("where")
    }

    fn cast(&self, x: &Tensor, dtype: DType) -> Result<Tensor> {
        let target = self.cdtype(dtype);
        if x.dtype() == target {
            return Ok(x.clone());
        }
        match dtype {
            // `x != 0`, not a numeric conversion (candle would wrap 256 -> 0).
            DType::Bool => x.ne(&x.zeros_like().ctx("cast")?).ctx("cast"),
            // Truncation toward zero, as ONNX Cast.
            DType::I64 if x.dtype().is_float() => {
                let t = x.to_dtype(CDType::F64).ctx("cast")?;
                let trunc = t
                    .abs()
                    .and_then(|a| a.floor())
                    .and_then(|f| f.mul(&t.sign()?))
                    .ctx("cast")?;
                trunc.to_dtype(CDType::I64).ctx("cast")
            }
            _ => x.to_dtype(target).ctx("cast"),
        }
    }

    fn softmax(&self, x: &Tensor, axis: isize) -> Result<Tensor> {
        Self::float_only("softmax", x)?;
        let a = norm_axis("softmax", axis, x.rank())?;
        candle_nn::ops::softmax(x, a).ctx("softmax")
    }

    fn layer_norm(&self, x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
        Self::float_only("layer_norm", x)?;
        let n = x.dim(D::Minus1).ctx("layer_norm")?;
        if w.dims() != [n] || b.dims() != [n] {
            return Err(Error::op(
                "layer_norm",
                format!(
                    "weight {:?} / bias {:?} must be [{n}] for input {:?}",
                    w.dims(),
                    b.dims(),
                    x.dims()
                ),
            ));
        }
        // layer_norm_slow's math, in the input dtype (it has a backward; the fused op does not).
        let f = || -> candle_core::Result<Tensor> {
            let mean = (x.sum_keepdim(D::Minus1)? / n as f64)?;
            let xc = x.broadcast_sub(&mean)?;
            let var = (xc.sqr()?.sum_keepdim(D::Minus1)? / n as f64)?;
            let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
            xn.broadcast_mul(w)?.broadcast_add(b)
        };
        f().ctx("layer_norm")
    }

    fn l2_normalize(&self, x: &Tensor, axis: isize) -> Result<Tensor> {
        Self::float_only("l2_normalize", x)?;
        let a = norm_axis("l2_normalize", axis, x.rank())?;
        let norm = x
            .sqr()
            .and_then(|s| s.sum_keepdim(a))
            .and_then(|s| s.sqrt())
            .and_then(|n| n.maximum(1e-12))
            .ctx("l2_normalize")?;
        x.broadcast_div(&norm).ctx("l2_normalize")
    }

    fn reduce_sum(&self, x: &Tensor, axis: isize, keepdim: bool) -> Result<Tensor> {
        Self::numeric("reduce_sum", x)?;
        let a = norm_axis("reduce_sum", axis, x.rank())?;
        if keepdim { x.sum_keepdim(a) } else { x.sum(a) }.ctx("reduce_sum")
    }

    fn reduce_mean(&self, x: &Tensor, axis: isize, keepdim: bool) -> Result<Tensor> {
        Self::float_only("reduce_mean", x)?;
        let a = norm_axis("reduce_mean", axis, x.rank())?;
        if keepdim {
            x.mean_keepdim(a)
        } else {
            x.mean(a)
        }
        .ctx("reduce_mean")
    }

    fn reduce_max(&self, x: &Tensor, axis: isize, keepdim: bool) -> Result<Tensor> {
        Self::numeric("reduce_max", x)?;
        let a = norm_axis("reduce_max", axis, x.rank())?;
        if keepdim { x.max_keepdim(a) } else { x.max(a) }.ctx("reduce_max")
    }

    fn argmax(&self, x: &Tensor, axis: isize, keepdim: bool) -> Result<Tensor> {
        Self::numeric("argmax", x)?;
        let a = norm_axis("argmax", axis, x.rank())?;
        if keepdim {
            x.argmax_keepdim(a)
        } else {
            x.argmax(a)
        }
        .and_then(|i| i.to_dtype(CDType::I64))
        .ctx("argmax")
    }

    fn topk(&self, x: &Tensor, k: usize) -> Result<(Tensor, Tensor)> {
        Self::numeric("topk", x)?;
        let n = x.dims().last().copied().unwrap_or(0);
        if x.rank() == 0 || k == 0 || k > n {
            return Err(Error::op(
                "topk",
                format!("k = {k} must be in 1..={n} (last dim of {:?})", x.dims()),
            ));
        }
        let idx = x
            .contiguous()
            .and_then(|c| c.arg_sort_last_dim(false))
            .and_then(|i| i.narrow(D::Minus1, 0, k))
            .and_then(|i| i.contiguous())
            .and_then(|i| i.to_dtype(CDType::I64))
            .ctx("topk")?;
        let vals = x
            .contiguous()
            .and_then(|c| c.gather(&idx, D::Minus1))
            .ctx("topk")?;
        Ok((vals, idx))
    }

    fn gather(&self, x: &Tensor, indices: &Tensor, axis: isize) -> Result<Tensor> {
        let a = norm_axis("gather", axis, x.rank())?;
        let idx = Self::index_i64("gather", indices)?;
        let flat = idx.flatten_all().ctx("gather")?;
        let picked = x
            .contiguous()
            .and_then(|c| c.index_select(&flat, a))
            .ctx("gather")?;
        let mut dims = x.dims()[..a].to_vec();
        dims.extend_from_slice(idx.dims());
        dims.extend_from_slice(&x.dims()[a + 1..]);
        picked.reshape(dims).ctx("gather")
    }

    fn gather_elements(&self, x: &Tensor, indices: &Tensor, axis: isize) -> Result<Tensor> {
        let a = norm_axis("gather_elements", axis, x.rank())?;
        let idx = Self::index_i64("gather_elements", indices)?;
        x.contiguous()
            .and_then(|c| c.gather(&idx, a))
            .ctx("gather_elements")
    }

    fn reshape(&self, x: &Tensor, shape: &[i64]) -> Result<Tensor> {
        let dims = resolve_reshape("reshape", x.dims(), shape)?;
        x.reshape(dims).ctx("reshape")
    }

    fn permute(&self, x: &Tensor, perm: &[usize]) -> Result<Tensor> {
        let mut seen = vec![false; x.rank()];
        for &p in perm {
            if p >= x.rank() || std::mem::replace(&mut seen[p], true) {
                return Err(Error::op(
                    "permute",
                    format!("{perm:?} is not a permutation of 0..{}", x.rank()),
                ));
            }
        }
        if perm.len() != x.rank() {
            return Err(Error::op(
                "permute",
                format!("{perm:?} for rank {}", x.rank()),
            ));
        }
        x.permute(perm).ctx("permute")
    }

    fn concat(&self, xs: &[&Tensor], axis: isize) -> Result<Tensor> {
        let first = xs.first().ok_or_else(|| Error::op("concat", "no inputs"))?;
        let a = norm_axis("concat", axis, first.rank())?;
        Tensor::cat(xs, a).ctx("concat")
    }

    fn narrow(&self, x: &Tensor, axis: isize, start: usize, len: usize) -> Result<Tensor> {
        let a = norm_axis("narrow", axis, x.rank())?;
        x.narrow(a, start, len).ctx("narrow")
    }

    fn unsqueeze(&self, x: &Tensor, axis: isize) -> Result<Tensor> {
        let a = norm_axis("unsqueeze", axis, x.rank() + 1)?;
        x.unsqueeze(a).ctx("unsqueeze")
    }

    fn squeeze(&self, x: &Tensor, axis: isize) -> Result<Tensor> {
        let a = norm_axis("squeeze", axis, x.rank())?;
        if x.dims()[a] != 1 {
            return Err(Error::op(
                "squeeze",
                format!("axis {axis} of {:?} is not 1", x.dims()),
            ));
        }
        x.squeeze(a).ctx("squeeze")
    }

    fn expand(&self, x: &Tensor, shape: &[usize]) -> Result<Tensor> {
        let target = broadcast_shape("expand", x.dims(), shape)?;
        x.broadcast_as(target).ctx("expand")
    }

    fn pad(&self, x: &Tensor, axis: isize, before: usize, after: usize) -> Result<Tensor> {
        let a = norm_axis("pad", axis, x.rank())?;
        x.pad_with_zeros(a, before, after).ctx("pad")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops() -> CandleOps {
        CandleOps::new(&Device::Cpu, DType::F32).unwrap()
    }

    fn f32s(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    fn i64s(t: &Tensor) -> Vec<i64> {
        t.flatten_all().unwrap().to_vec1::<i64>().unwrap()
    }

    fn c(o: &CandleOps, dims: Vec<usize>, v: Vec<f32>) -> Tensor {
        o.constant(&HostTensor::f32(dims, v).unwrap()).unwrap()
    }

    #[test]
    fn topk_gather_onehot_semantics() {
        let o = ops();
        let x = c(&o, vec![2, 4], vec![0.1, 0.9, 0.5, 0.7, 3.0, 1.0, 2.0, 0.0]);
        let (v, i) = o.topk(&x, 2).unwrap();
        assert_eq!(i64s(&i), vec![1, 3, 0, 2]);
        assert_eq!(f32s(&v), vec![0.9, 0.7, 3.0, 2.0]);
        assert_eq!(o.dtype(&i), DType::I64);
        // ONNX Gather with a rank-2 index on axis 0.
        let table = c(&o, vec![3, 2], vec![0., 1., 10., 11., 20., 21.]);
        let idx = o
            .constant(&HostTensor::i64(vec![2, 2], vec![2, 0, 1, 1]).unwrap())
            .unwrap();
        let g = o.gather(&table, &idx, 0).unwrap();
        assert_eq!(g.dims(), &[2, 2, 2]);
        assert_eq!(f32s(&g), vec![20., 21., 0., 1., 10., 11., 10., 11.]);
        // Rank-0 index drops the axis.
        let s = o
            .constant(&HostTensor::i64(vec![], vec![1]).unwrap())
            .unwrap();
        assert_eq!(o.gather(&table, &s, 0).unwrap().dims(), &[2]);
        let ge = o.gather_elements(&x, &i, 1).unwrap();
        assert_eq!(f32s(&ge), f32s(&v));
        let oh = o.one_hot(&i, 4, DType::F32).unwrap();
        assert_eq!(oh.dims(), &[2, 2, 4]);
        assert_eq!(
            f32s(&oh),
            vec![0., 1., 0., 0., 0., 0., 0., 1., 1., 0., 0., 0., 0., 0., 1., 0.]
        );
        let am = o.argmax(&x, -1, false).unwrap();
        assert_eq!(i64s(&am), vec![1, 0]);
        assert!(o.topk(&x, 5).is_err());
    }

    #[test]
    fn masks_casts_and_shapes() {
        let o = ops();
        let x = c(&o, vec![2, 3], vec![-1.5, 2.7, 0.0, 4.0, -0.2, 9.0]);
        let zero = c(&o, vec![], vec![0.0]);
        let pos = o.greater(&x, &zero).unwrap();
        assert_eq!(o.dtype(&pos), DType::Bool);
        assert!(
            o.reduce_sum(&pos, -1, false).is_err(),
            "sum of a Bool mask accepted"
        );
        let w = o.where_(&pos, &x, &zero).unwrap();
        assert_eq!(f32s(&w), vec![0.0, 2.7, 0.0, 4.0, 0.0, 9.0]);
        let neg = o.cast(&o.less(&x, &zero).unwrap(), DType::F32).unwrap();
        assert_eq!(f32s(&neg), vec![1., 0., 0., 0., 1., 0.]);
        assert_eq!(
            i64s(&o.cast(&x, DType::I64).unwrap()),
            vec![-1, 2, 0, 4, 0, 9]
        );
        let nz = o
            .cast(&o.cast(&x, DType::Bool).unwrap(), DType::I64)
            .unwrap();
        assert_eq!(i64s(&nz), vec![1, 1, 0, 1, 1, 1]);
        let r = o
            .reshape(&o.unsqueeze(&x, 0).unwrap(), &[0, -1, 1])
            .unwrap();
        assert_eq!(r.dims(), &[1, 6, 1]);
        assert_eq!(o.expand(&r, &[1, 1, 4]).unwrap().dims(), &[1, 6, 4]);
        assert_eq!(o.pad(&x, 1, 1, 2).unwrap().dims(), &[2, 6]);
        assert_eq!(f32s(&o.pad(&x, 0, 1, 0).unwrap())[..3], [0., 0., 0.]);
        assert_eq!(o.squeeze(&r, -1).unwrap().dims(), &[1, 6]);
        assert!(o.squeeze(&r, 1).is_err());
        assert!(o.add(&x, &o.cast(&x, DType::I64).unwrap()).is_err());
        let err = o.param("visual.proj").unwrap_err().to_string();
        assert!(err.contains("visual.proj"), "{err}");
    }

    #[test]
    fn norms_and_pool_match_direct_math() {
        let o = ops();
        let x = c(&o, vec![1, 2, 3], vec![3., 0., 4., 1., 2., 2.]);
        let n = f32s(&o.l2_normalize(&x, -1).unwrap());
        let want = [0.6, 0.0, 0.8, 1. / 3., 2. / 3., 2. / 3.];
        assert!(n.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6));
        let zeros = c(&o, vec![1, 3], vec![0.; 3]);
        assert_eq!(f32s(&o.l2_normalize(&zeros, -1).unwrap()), vec![0.; 3]);
        let w = c(&o, vec![3], vec![1., 1., 1.]);
        let b = c(&o, vec![3], vec![0., 0., 0.]);
        let ln = f32s(&o.layer_norm(&x, &w, &b, 0.0).unwrap());
        // Row [3, 0, 4]: mean 7/3, var 26/9.
        let (m, s) = (7. / 3., (26f32 / 9.).sqrt());
        assert!((ln[0] - (3. - m) / s).abs() < 1e-5);
        // 4x4 grid of token ids -> 2x2: bin (0,0) averages tokens 0,1,4,5.
        let toks = c(&o, vec![1, 16, 1], (0..16).map(|v| v as f32).collect());
        let p = f32s(&o.avg_pool_tokens(&toks, (4, 4), (2, 2)).unwrap());
        assert_eq!(p, vec![2.5, 4.5, 10.5, 12.5]);
        let sm = f32s(&o.softmax(&x, 1).unwrap());
        assert!((sm[0] + sm[3] - 1.0).abs() < 1e-6);
    }
}
