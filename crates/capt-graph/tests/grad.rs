//! Gradients through `CandleOps` (the same generic code that is exported) equal central
//! finite differences, in F64.

use candle_core::{Device, Tensor, Var};
use capt_graph::{CandleOps, DType, HostTensor, Ops};

/// Deterministic values in [-1, 1) (splitmix64; exact arithmetic, no libm).
fn values(seed: u64, n: usize) -> Vec<f64> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 11) as f64 / (1u64 << 52) as f64 - 1.0
        })
        .collect()
}

fn param(o: &CandleOps, seed: u64, dims: &[usize]) -> Tensor {
    let n = dims.iter().product();
    o.constant(&HostTensor::f64(dims.to_vec(), values(seed, n)).unwrap())
        .unwrap()
}

/// A scalar loss through layer_norm -> attention-style softmax -> top-k -> gather ->
/// l2_normalize -> one-hot scatter, with `w` as the parameter under test.
fn loss<O: Ops>(o: &O, x: &O::T, w: &O::T) -> capt_graph::Result<O::T> {
    let ln_w = o.param("ln.w")?;
    let ln_b = o.param("ln.b")?;
    let h = o.layer_norm(x, &ln_w, &ln_b, 1e-5)?; // [B, S, D]
    let q = o.matmul(&h, w)?; // [B, S, D]
    let att = o.softmax(
        &o.mul_scalar(&o.matmul(&q, &o.transpose(&h, -1, -2)?)?, 0.5)?,
        -1,
    )?;
    let ctx = o.matmul(&att, &h)?; // [B, S, D]
    let pooled = o.reduce_mean(&ctx, 1, false)?; // [B, D]
    let f = o.l2_normalize(&pooled, -1)?;
    let table = o.l2_normalize(&o.param("classes")?, -1)?; // [C, D]
    let logits = o.mul_scalar(&o.matmul(&f, &o.transpose(&table, 0, 1)?)?, 5.0)?; // [B, C]
    let (top, idx) = o.topk(&logits, 2)?; // [B, 2]
    let picked = o.gather(&table, &idx, 0)?; // [B, 2, D]
    let agree = o.reduce_sum(&o.mul(&o.unsqueeze(&f, 1)?, &picked)?, -1, false)?; // [B, 2]
    let scatter = o.reduce_sum(
        &o.mul(
            &o.one_hot(&idx, 4, o.dtype(&logits))?,
            &o.unsqueeze(&agree, -1)?,
        )?,
        1,
        false,
    )?; // [B, C]
    let z = o.add(&logits, &scatter)?;
    let p = o.softmax(&z, -1)?;
    let target = o.gather_elements(
        &p,
        &o.constant(&HostTensor::i64(vec![2, 1], vec![1, 3])?)?,
        1,
    )?;
    let l = o.add(
        &o.reduce_sum(&top, -1, false)?,
        &o.reduce_sum(&target, -1, false)?,
    )?;
    o.reduce_sum(&o.mul(&l, &l)?, 0, false)
}

#[test]
fn autograd_matches_finite_differences() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let base = CandleOps::new(&dev, DType::F64)?;
    let ops = base.clone().with_params([
        ("ln.w".to_string(), param(&base, 1, &[3]).affine(0.3, 1.0)?),
        ("ln.b".to_string(), param(&base, 2, &[3])),
        ("classes".to_string(), param(&base, 3, &[4, 3])),
    ]);
    let x = param(&ops, 4, &[2, 5, 3]);
    let w0 = param(&ops, 5, &[3, 3]);
    let w = Var::from_tensor(&w0)?;
    let l = loss(&ops, &x, w.as_tensor())?;
    let grads = l.backward()?;
    let g = grads.get(w.as_tensor()).expect("gradient reaches w");
    let g: Vec<f64> = g.flatten_all()?.to_vec1()?;
    assert!(
        g.iter().any(|v| v.abs() > 1e-3),
        "gradient is degenerate: {g:?}"
    );

    let w_host: Vec<f64> = w0.flatten_all()?.to_vec1()?;
    let eps = 1e-6;
    let eval = |v: Vec<f64>| -> anyhow::Result<f64> {
        let t = Tensor::from_vec(v, (3, 3), &dev)?;
        Ok(loss(&ops, &x, &t)?.to_scalar::<f64>()?)
    };
    let mut worst = 0f64;
    for i in 0..w_host.len() {
        let mut plus = w_host.clone();
        plus[i] += eps;
        let mut minus = w_host.clone();
        minus[i] -= eps;
        let fd = (eval(plus)? - eval(minus)?) / (2.0 * eps);
        let err = (fd - g[i]).abs() / fd.abs().max(1.0);
        worst = worst.max(err);
        assert!(
            err < 1e-6,
            "w[{i}]: autograd {} vs finite difference {fd}",
            g[i]
        );
    }
    eprintln!("grad check: worst relative error {worst:.2e}");
    Ok(())
}

#[test]
fn gradients_reach_params_through_layer_norm_and_gather() -> anyhow::Result<()> {
    // The fused candle LayerNorm cuts the graph silently; ours must not.
    let dev = Device::Cpu;
    let base = CandleOps::new(&dev, DType::F32)?;
    let lw = Var::from_tensor(&param(&base, 7, &[3]).to_dtype(candle_core::DType::F32)?)?;
    let table = Var::from_tensor(&param(&base, 8, &[4, 3]).to_dtype(candle_core::DType::F32)?)?;
    let ops = base.with_params([
        ("ln.w".to_string(), lw.as_tensor().clone()),
        (
            "ln.b".to_string(),
            Tensor::zeros(3, candle_core::DType::F32, &dev)?,
        ),
        ("classes".to_string(), table.as_tensor().clone()),
    ]);
    let x = param(&ops, 9, &[2, 5, 3]);
    let w = param(&ops, 10, &[3, 3]);
    let grads = loss(&ops, &x, &w)?.backward()?;
    for (name, v) in [("ln.w", &lw), ("classes", &table)] {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let s: f32 = g.abs()?.sum_all()?.to_scalar()?;
        assert!(s > 1e-4, "{name}: gradient is zero");
    }
    Ok(())
}
