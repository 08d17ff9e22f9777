// TEMPORARY profiling of candle op costs at ViT-B/16 b1 shapes (not to be committed).
use candle_core::{DType, Device, Tensor, D};
use std::time::Instant;
fn cpu_ms() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let f: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) * 10.0
}
fn t(name: &str, n: usize, mut f: impl FnMut() -> Tensor) {
    for _ in 0..3 { f(); }
    let c0 = cpu_ms(); let w0 = Instant::now();
    for _ in 0..n { f(); }
    println!("{name:<28} cpu {:>8.3} ms  wall {:>8.3} ms", (cpu_ms() - c0) / n as f64, w0.elapsed().as_secs_f64() * 1e3 / n as f64);
}
fn main() -> candle_core::Result<()> {
    let d = Device::Cpu;
    let n = 197; let w = 768;
    let x = Tensor::randn(0f32, 1., (1, n, w), &d)?;
    let wq = Tensor::randn(0f32, 0.02, (3 * w, w), &d)?;
    let wqt = wq.t()?.contiguous()?;
    let b = Tensor::randn(0f32, 0.02, 3 * w, &d)?;
    let w1 = Tensor::randn(0f32, 0.02, (4 * w, w), &d)?;
    let w2 = Tensor::randn(0f32, 0.02, (w, 4 * w), &d)?;
    let x2 = x.reshape((n, w))?;
    let reps = 200;
    t("matmul qkv (w.t view)", reps, || x2.matmul(&wq.t().unwrap()).unwrap());
    t("matmul qkv (w^T contiguous)", reps, || x2.matmul(&wqt).unwrap());
    t("matmul fc1", reps, || x2.matmul(&w1.t().unwrap()).unwrap());
    let h = Tensor::randn(0f32, 1., (n, 4 * w), &d)?;
    t("matmul fc2", reps, || h.matmul(&w2.t().unwrap()).unwrap());
    let qkv = x2.matmul(&wq.t()?)?;
    t("bias add [197,2304]", reps, || qkv.broadcast_add(&b).unwrap());
    t("permute qkv contiguous", reps, || qkv.reshape((1, n, 3, 12, 64)).unwrap().permute((2, 0, 3, 1, 4)).unwrap().contiguous().unwrap());
    let p = qkv.reshape((1, n, 3, 12, 64))?.permute((2, 0, 3, 1, 4))?.contiguous()?;
    let q = p.get(0)?; let k = p.get(1)?; let v = p.get(2)?;
    t("q k^T", reps, || q.matmul(&k.t().unwrap()).unwrap());
    let att = q.matmul(&k.t()?)?;
    t("softmax_last_dim", reps, || candle_nn::ops::softmax_last_dim(&att).unwrap());
    t("softmax (autograd)", reps, || candle_nn::ops::softmax(&att, D::Minus1).unwrap());
    t("att v", reps, || att.matmul(&v).unwrap());
    let o = att.matmul(&v)?;
    t("transpose reshape", reps, || o.transpose(1, 2).unwrap().reshape((1, n, w)).unwrap());
    let lw = Tensor::ones(w, DType::F32, &d)?; let lb = Tensor::zeros(w, DType::F32, &d)?;
    t("layer_norm fused", reps, || candle_nn::ops::layer_norm(&x, &lw, &lb, 1e-5).unwrap());
    t("layer_norm slow", reps, || candle_nn::ops::layer_norm_slow(&x, &lw, &lb, 1e-5).unwrap());
    t("quick_gelu (3 ops)", reps, || (&h * candle_nn::ops::sigmoid(&(&h * 1.702).unwrap()).unwrap()).unwrap());
    t("gelu_erf", reps, || h.gelu_erf().unwrap());
    t("residual add [197,768]", reps, || (&x + &x).unwrap());
    let xv: Vec<f32> = x.flatten_all()?.to_vec1()?;
    t("plain vec add 151K", reps, || { let v: Vec<f32> = xv.iter().zip(&xv).map(|(a, b)| a + b).collect(); Tensor::from_vec(v, (1, n, w), &d).unwrap() });
    t("plain vec add 151K no tensor", reps, || { let v: Vec<f32> = xv.iter().zip(&xv).map(|(a, b)| a + b).collect(); std::hint::black_box(&v); x.clone() });
    t("x.clone only", reps, || x.clone());
    Ok(())
}
