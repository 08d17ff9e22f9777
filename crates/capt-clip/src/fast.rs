//! Fused in-place f32 CPU kernels for the inference (`Mode::Fast`) path.
//!
//! candle runs `x * sigmoid(1.702 x)` as three scalar single-threaded passes with libm `exp`
//! (about as long as a GEMM of the same layer on ViT-B/16) and adds biases and residuals as
//! separate passes. These kernels do bias + activation, bias + residual, and masked softmax in
//! one parallel, auto-vectorisable pass over a freshly computed GEMM output. They have no
//! backward, so callers use them only for untracked f32 CPU tensors and fall back otherwise.

use candle_core::{CpuStorage, DType, Layout, Result, Shape, Tensor};
use candle_core::{CustomOp3, InplaceOp1, InplaceOp2, InplaceOp3};
use rayon::prelude::*;

use crate::config::Activation;

/// Batches run in the fast path are split so the largest activation (MLP hidden) stays under
/// this many floats (24 MB): glibc serves such blocks from the heap after the first use instead of
/// mmap-ing and page-faulting fresh memory for every op (measured 8% of the text tower at 100 x 77).
#[cfg(not(test))]
pub(crate) const CHUNK_FLOATS: usize = 6 << 20;
/// Small enough that the unit tests' tiny batches are split.
#[cfg(test)]
pub(crate) const CHUNK_FLOATS: usize = 1500;

/// Rows per rayon task: enough work (~16k floats) to amortise scheduling.
fn rows_per_task(n: usize) -> usize {
    (16_384 / n.max(1)).max(1)
}

/// Whether `t` can be updated in place by these kernels.
pub(crate) fn fusable(t: &Tensor) -> bool {
    t.dtype() == DType::F32 && t.device().is_cpu() && !t.track_op()
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("{what}: fused kernel needs a contiguous f32 tensor"),
    }
}

fn f32_slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout, what: &str) -> Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("{what}: fused kernel needs a contiguous f32 tensor"),
    }
}

const LOG2E: f32 = std::f32::consts::LOG2_E;

/// `exp(x)` in f32 to ~1 ulp (Cephes polynomial, Cody-Waite reduction), branch-free so loops
/// vectorise; exactly 0 below -87.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    let xc = x.clamp(-87.0, 88.0);
    // Round to nearest through the 1.5 * 2^23 trick (|x log2 e| < 2^22).
    let n = (xc * LOG2E + 12_582_912.0) - 12_582_912.0;
    let r = xc - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x < -87.0 {
        0.0
    } else {
        e * scale
    }
}

#[inline(always)]
fn quick_gelu(x: f32) -> f32 {
    x / (1.0 + exp_f32(-1.702 * x))
}

/// Exact-erf GELU with erf from Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7).
#[inline(always)]
fn gelu(x: f32) -> f32 {
    let z = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let t = 1.0 / (1.0 + 0.327_591_1 * z);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let erf_abs = 1.0 - poly * exp_f32(-z * z);
    let erf = if x < 0.0 { -erf_abs } else { erf_abs };
    0.5 * x * (1.0 + erf)
}

/// Defines `fn $name` that runs `$body` compiled for AVX2+FMA when the CPU has them (the crate
/// is built for baseline x86-64, i.e. SSE2), else as is. Results are identical: no FMA
/// contraction happens without fast-math. Bodies use plain `for` loops: `for_each` / `sum`
/// go through generic `fold` functions that may not be inlined, i.e. not get the features.
macro_rules! multiversion {
    (fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn imp($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) {
                    imp($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the running CPU has the features `avx2` is compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}

/// Max over 8 lanes so the reduction vectorises (f32 reductions are not reassociated).
#[inline(always)]
fn max8(row: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for i in 0..8 {
            m[i] = if c[i] > m[i] { c[i] } else { m[i] };
        }
    }
    let mut max = f32::NEG_INFINITY;
    for &v in m.iter().chain(chunks.remainder()) {
        max = if v > max { v } else { max };
    }
    max
}

/// Sum of `f(x)` over 8 lanes.
#[inline(always)]
fn sum8(row: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut s = [0f32; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for i in 0..8 {
            s[i] += f(c[i]);
        }
    }
    let mut total = 0f32;
    for &v in chunks.remainder() {
        total += f(v);
    }
    for v in s {
        total += v;
    }
    total
}

#[inline(always)]
fn softmax_row(row: &mut [f32]) {
    let max = max8(row);
    if max == f32::NEG_INFINITY {
        // Fully masked row: keep it finite rather than NaN (never happens with a causal mask).
        row.fill(0.0);
        return;
    }
    for v in row.iter_mut() {
        *v = exp_f32(*v - max);
    }
    let inv = 1.0 / sum8(row, |v| v);
    for v in row.iter_mut() {
        *v *= inv;
    }
}

multiversion! {
    fn bias_act_rows(y: &mut [f32], b: &[f32], act: Option<Activation>) {
        for row in y.chunks_exact_mut(b.len()) {
            match act {
                None => {
                    for (v, b) in row.iter_mut().zip(b) {
                        *v += b;
                    }
                }
                Some(Activation::QuickGelu) => {
                    for (v, b) in row.iter_mut().zip(b) {
                        *v = quick_gelu(*v + b);
                    }
                }
                Some(Activation::Gelu) => {
                    for (v, b) in row.iter_mut().zip(b) {
                        *v = gelu(*v + b);
                    }
                }
            }
        }
    }
}

multiversion! {
    fn bias_residual_rows(y: &mut [f32], r: &[f32], b: &[f32]) {
        for (yr, rr) in y.chunks_exact_mut(b.len()).zip(r.chunks_exact(b.len())) {
            for ((v, b), r) in yr.iter_mut().zip(b).zip(rr) {
                *v += b + r;
            }
        }
    }
}

multiversion! {
    fn softmax_rows(y: &mut [f32], n: usize) {
        for row in y.chunks_exact_mut(n) {
            softmax_row(row);
        }
    }
}

multiversion! {
    fn masked_softmax_block(block: &mut [f32], mask: &[f32], n: usize) {
        for (row, mrow) in block.chunks_exact_mut(n).zip(mask.chunks_exact(n)) {
            for (v, m) in row.iter_mut().zip(mrow) {
                *v += m;
            }
            softmax_row(row);
        }
    }
}

multiversion! {
    fn layer_norm_rows(x: &[f32], y: &mut [f32], w: &[f32], b: &[f32], eps: f32) {
        let n = w.len();
        for (xr, yr) in x.chunks_exact(n).zip(y.chunks_exact_mut(n)) {
            // Two-pass mean / variance (candle's fused kernel uses E[x^2] - E[x]^2).
            let mean = sum8(xr, |v| v) / n as f32;
            let var = sum8(xr, |v| (v - mean) * (v - mean)) / n as f32;
            let inv = 1.0 / (var + eps).sqrt();
            for (((o, &v), w), b) in yr.iter_mut().zip(xr).zip(w).zip(b) {
                *o = (v - mean) * inv * w + b;
            }
        }
    }
}

/// `y = act(y + bias)` over the rows of `y [.., n]`, bias `[n]`.
pub(crate) struct BiasAct(pub Option<Activation>);

impl InplaceOp2 for BiasAct {
    fn name(&self) -> &'static str {
        "capt-bias-act"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        bias: &CpuStorage,
        bias_l: &Layout,
    ) -> Result<()> {
        let y = f32_slice_mut(dst, dst_l, self.name())?;
        let b = f32_slice(bias, bias_l, self.name())?;
        let n = b.len();
        if n == 0 || y.len() % n != 0 {
            candle_core::bail!(
                "{}: bias of {n} does not divide {} values",
                self.name(),
                y.len()
            );
        }
        let act = self.0;
        y.par_chunks_mut(n * rows_per_task(n))
            .for_each(|chunk| bias_act_rows(chunk, b, act));
        Ok(())
    }
}

/// `y = y + bias + residual`, residual shaped like `y`.
pub(crate) struct BiasResidual;

impl InplaceOp3 for BiasResidual {
    fn name(&self) -> &'static str {
        "capt-bias-residual"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        bias: &CpuStorage,
        bias_l: &Layout,
        res: &CpuStorage,
        res_l: &Layout,
    ) -> Result<()> {
        let y = f32_slice_mut(dst, dst_l, self.name())?;
        let b = f32_slice(bias, bias_l, self.name())?;
        let r = f32_slice(res, res_l, self.name())?;
        let n = b.len();
        if n == 0 || y.len() % n != 0 || r.len() != y.len() {
            candle_core::bail!("{}: shapes do not match", self.name());
        }
        let step = n * rows_per_task(n);
        y.par_chunks_mut(step)
            .zip(r.par_chunks(step))
            .for_each(|(yc, rc)| bias_residual_rows(yc, rc, b));
        Ok(())
    }
}

/// Softmax over the last dim in place.
pub(crate) struct Softmax;

/// Softmax over the last dim in place after adding a `[N, N]` mask to every `[.., N, N]` block.
pub(crate) struct MaskedSoftmax;

fn last_dim(l: &Layout) -> usize {
    l.dims().last().copied().unwrap_or(1)
}

impl InplaceOp1 for Softmax {
    fn name(&self) -> &'static str {
        "capt-softmax"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let n = last_dim(layout);
        let y = f32_slice_mut(storage, layout, self.name())?;
        y.par_chunks_mut(n * rows_per_task(n))
            .for_each(|c| softmax_rows(c, n));
        Ok(())
    }
}

impl InplaceOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "capt-masked-softmax"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        mask: &CpuStorage,
        mask_l: &Layout,
    ) -> Result<()> {
        let n = last_dim(dst_l);
        let y = f32_slice_mut(dst, dst_l, self.name())?;
        let mask = f32_slice(mask, mask_l, self.name())?;
        if mask.len() != n * n || y.len() % (n * n) != 0 {
            candle_core::bail!("{}: mask must be [{n}, {n}]", self.name());
        }
        // One task per [N, N] block (batch x head): the mask row is the row index in the block.
        y.par_chunks_mut(n * n)
            .for_each(|block| masked_softmax_block(block, mask, n));
        Ok(())
    }
}

/// LayerNorm over the last dim (`x`, weight, bias), a new tensor.
pub(crate) struct LayerNorm(pub f32);

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "capt-layer-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(xs, xl, self.name())?;
        let w = f32_slice(ws, wl, self.name())?;
        let b = f32_slice(bs, bl, self.name())?;
        let n = w.len();
        if n == 0 || b.len() != n || last_dim(xl) != n {
            candle_core::bail!("{}: weight/bias do not match the last dim", self.name());
        }
        let mut y = vec![0f32; x.len()];
        let step = n * rows_per_task(n);
        y.par_chunks_mut(step)
            .zip(x.par_chunks(step))
            .for_each(|(yc, xc)| layer_norm_rows(xc, yc, w, b, self.0));
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    #[test]
    fn exp_is_accurate() {
        let mut worst = 0f64;
        for i in -8700..=8800 {
            let x = i as f32 * 0.01;
            let want = (x as f64).exp();
            let rel = ((exp_f32(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
        }
        assert!(worst < 3e-7, "worst relative error {worst:e}");
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-100.0), 0.0);
    }

    #[test]
    fn activations_match_reference_formulas() {
        for i in -800..=800 {
            let x = i as f32 * 0.01;
            let xd = x as f64;
            let qg = xd / (1.0 + (-1.702 * xd).exp());
            assert!(
                (quick_gelu(x) as f64 - qg).abs() < 1e-6 * (1.0 + qg.abs()),
                "quick_gelu({x})"
            );
            let g = candle_core::Tensor::new(&[xd], &Device::Cpu)
                .unwrap()
                .gelu_erf()
                .unwrap();
            let g = g.to_vec1::<f64>().unwrap()[0];
            assert!(
                (gelu(x) as f64 - g).abs() < 1e-6 * (1.0 + g.abs()),
                "gelu({x})"
            );
        }
    }

    #[test]
    fn kernels_match_candle_ops() {
        let dev = Device::Cpu;
        let y = Tensor::randn(0f32, 2.0, (5, 7, 11), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 11, &dev).unwrap();
        let r = Tensor::randn(0f32, 1.0, (5, 7, 11), &dev).unwrap();
        let max_diff = |a: &Tensor, b: &Tensor| {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };

        let got = y.copy().unwrap();
        got.inplace_op2(&b, &BiasAct(Some(Activation::QuickGelu)))
            .unwrap();
        let z = y.broadcast_add(&b).unwrap();
        let want = (&z * candle_nn::ops::sigmoid(&(&z * 1.702).unwrap()).unwrap()).unwrap();
        assert!(max_diff(&got, &want) < 1e-5);

        let got = y.copy().unwrap();
        got.inplace_op3(&b, &r, &BiasResidual).unwrap();
        let want = (y.broadcast_add(&b).unwrap() + &r).unwrap();
        assert!(max_diff(&got, &want) < 1e-6);

        let got = y.copy().unwrap();
        got.inplace_op1(&Softmax).unwrap();
        let want = candle_nn::ops::softmax(&y, D::Minus1).unwrap();
        assert!(max_diff(&got, &want) < 1e-6);

        let w = Tensor::randn(0f32, 1.0, 11, &dev).unwrap();
        let got = y.apply_op3_no_bwd(&w, &b, &LayerNorm(1e-5)).unwrap();
        let want = candle_nn::ops::layer_norm_slow(&y, &w, &b, 1e-5).unwrap();
        assert!(max_diff(&got, &want) < 1e-5);

        let sq = Tensor::randn(0f32, 3.0, (2, 3, 9, 9), &dev).unwrap();
        let mask = crate::text::causal_mask(9, DType::F32, &dev).unwrap();
        let got = sq.copy().unwrap();
        got.inplace_op2(&mask, &MaskedSoftmax).unwrap();
        let want = candle_nn::ops::softmax(&sq.broadcast_add(&mask).unwrap(), D::Minus1).unwrap();
        assert!(max_diff(&got, &want) < 1e-6);
    }
}
