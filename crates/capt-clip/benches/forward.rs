//! ViT-B/16 forward timings on random weights (no file needed): `cargo bench -p capt-clip`.
//!
//! Image encoder batch 1 and 8 (global + local features), text encoder 100 prompts x 77 tokens,
//! median wall-clock ms, compared with the anchors measured on the same kind of 2-core machine
//! (docs: shared/design/RUST-STACK-NOTES.md section 6). Env: `CAPT_BENCH_RUNS` scales the run
//! counts (default 1.0), `CAPT_BENCH_ONLY=image1,image8,text,text77` picks cases,
//! `CAPT_BENCH_AUTOGRAD=1` also times the autograd-safe kernels. The text anchors ran all 77
//! positions with EOT at 20; `text77` puts EOT at 76 so nothing can be skipped.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use capt_clip::{ClipConfig, ClipModel, Mode};

/// (name, PyTorch eager, onnxruntime, candle-transformers stock CLIP), ms.
type Anchor = (&'static str, f64, f64, f64);
const ANCHORS: [Anchor; 3] = [
    ("image b1", 215.6, 91.8, 289.5),
    ("image b8", 1524.2, 680.2, 2039.4),
    ("text 100x77", 4222.0, 1703.3, 5164.7),
];

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Process CPU time (all threads) in ms, from /proc/self/stat (10 ms ticks); None off Linux.
fn cpu_ms() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks * 10.0)
}

/// Median wall ms, and mean CPU ms per run (a load-robust view when the machine is shared).
fn time(runs: usize, warmup: usize, mut f: impl FnMut()) -> (f64, Option<f64>) {
    for _ in 0..warmup {
        f();
    }
    let cpu0 = cpu_ms();
    let wall = median(
        (0..runs)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect(),
    );
    let cpu = cpu0.zip(cpu_ms()).map(|(a, b)| (b - a) / runs as f64);
    (wall, cpu)
}

/// Random-init ViT-B/16 with plain (untracked) weights, as a loaded checkpoint would have.
fn model() -> candle_core::Result<ClipModel> {
    let cfg = ClipConfig::vit_b16();
    let vm = VarMap::new();
    ClipModel::new(VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu), &cfg)?;
    let tensors: HashMap<String, Tensor> = vm
        .data()
        .lock()
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect();
    ClipModel::new(
        VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu),
        &cfg,
    )
}

fn main() -> candle_core::Result<()> {
    let scale: f64 = std::env::var("CAPT_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    let runs = |n: usize| ((n as f64 * scale).round() as usize).max(1);
    let dev = Device::Cpu;
    let mut m = model()?;
    println!(
        "capt-clip forward, ViT-B/16 random weights, f32, {} threads (candle)",
        candle_core::utils::get_num_threads()
    );

    let px1 = Tensor::randn(0f32, 1.0, (1, 3, 224, 224), &dev)?;
    let px8 = Tensor::randn(0f32, 1.0, (8, 3, 224, 224), &dev)?;
    // 100 prompts: SOT, 19 pseudo-random tokens, EOT at 20, zero padding (as the anchors). The
    // text tower stops at the last EOT (exact under the causal mask); `full` moves EOT to 76 so
    // all 77 positions are computed.
    let prompts = |eot: u32| -> candle_core::Result<Tensor> {
        let ids: Vec<u32> = (0..100u32)
            .flat_map(|r| {
                (0..77u32).map(move |j| match j {
                    0 => 49406,
                    j if j == eot => 49407,
                    j if j < 20 || j < eot => 1 + (r * 7919 + j * 104_729) % 49_000,
                    _ => 0,
                })
            })
            .collect();
        Tensor::from_vec(ids, (100, 77), &dev)
    };
    let ids = prompts(20)?;
    let full = prompts(76)?;

    let only = std::env::var("CAPT_BENCH_ONLY").unwrap_or_default();
    let want = |case: &str| only.is_empty() || only.split(',').any(|c| c == case);
    let mut results = Vec::new();
    if want("image1") {
        let r = time(runs(15), 2, || {
            m.vision.forward(&px1, None).expect("image b1");
        });
        results.push((ANCHORS[0], r));
    }
    if want("image8") {
        let r = time(runs(5), 1, || {
            m.vision.forward(&px8, None).expect("image b8");
        });
        results.push((ANCHORS[1], r));
    }
    if want("text") {
        let r = time(runs(5), 1, || {
            m.text.forward_ids(&ids).expect("text");
        });
        results.push((ANCHORS[2], r));
    }
    if want("text77") {
        let r = time(runs(3), 1, || {
            m.text.forward_ids(&full).expect("text, EOT at 76");
        });
        let (_, torch, ort, stock) = ANCHORS[2];
        results.push((("text, EOT@76", torch, ort, stock), r));
    }

    println!(
        "{:<13} {:>10} {:>10} {:>14} {:>14} {:>14}",
        "case", "median ms", "cpu ms", "vs torch", "vs ort", "vs candle"
    );
    for ((name, torch, ort, stock), (ms, cpu)) in &results {
        let cpu = cpu.map_or("-".to_string(), |c| format!("{c:.0}"));
        println!(
            "{name:<13} {ms:>10.1} {cpu:>10} {:>13.2}x {:>13.2}x {:>13.2}x",
            ms / torch,
            ms / ort,
            ms / stock
        );
    }
    println!(
        "(ratio = capt-clip median wall time / anchor; below 1 is faster. cpu ms = process CPU \
         time per run over all threads; wall ~ cpu / threads when the cores are not shared)"
    );

    if std::env::var("CAPT_BENCH_AUTOGRAD").is_ok_and(|v| v == "1") {
        m.set_mode(Mode::Autograd);
        let ag = time(runs(5), 1, || {
            m.vision.forward(&px1, None).expect("image b1 autograd");
        });
        let agt = time(runs(3), 1, || {
            m.text.forward_ids(&ids).expect("text autograd");
        });
        println!(
            "autograd-safe kernels: image b1 {:.1} ms, text 100x77 {:.1} ms (median wall)",
            ag.0, agt.0
        );
    }
    Ok(())
}
