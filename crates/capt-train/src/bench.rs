//! `capt-train bench train-step`: milliseconds per training step and peak RSS of CoOp and CAPT
//! at ViT-B/16 size (random weights, text tower only; cached random image features) for a
//! few class counts, and the CAPT/CoOp ratio. Each configuration runs in its own child
//! process so its peak RSS (`VmHWM`) is its own. `tools/ref_train_step.py` measures the same
//! CoOp step in PyTorch eager for comparison, on the same device.
//!
//! `capt-train bench forward`: the CLIP towers on `--device`/`--dtype` against the CPU f32
//! reference on the same inputs (max deviation of the normalised features), and the image
//! encoder's throughput there (tools/gpu-check.sh runs both on a GPU).

use std::process::Command;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use capt_clip::ClipConfig;
use capt_method::{ConfusionBank, Method};
use serde::{Deserialize, Serialize};

use crate::backbone::Backbone;
use crate::config::RunConfig;
use crate::error::{Result, TrainError};
use crate::model::{Feats, Model};
use crate::optim::Sgd;
use crate::rng;
use crate::tables::TableCache;

#[derive(Debug, Clone)]
pub struct BenchArgs {
    pub classes: Vec<usize>,
    pub steps: usize,
    /// `b16` (ViT-B/16 text tower) or `tiny`.
    pub size: String,
    pub config: RunConfig,
    /// Measure this class count in this process and print JSON lines (used by the parent).
    pub child: Option<usize>,
    /// Python interpreter for `tools/ref_train_step.py` (PyTorch eager CoOp reference).
    pub torch_python: Option<String>,
    pub torch_script: String,
    /// Arguments forwarded to the child processes (config file, overrides, device).
    pub forward: Vec<String>,
    /// Where the steps run (GPU steps are timed after a device synchronisation).
    pub device: Device,
    /// Backbone weight dtype (learned tensors stay F32).
    pub dtype: DType,
}

/// One measured configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchResult {
    pub method: String,
    pub classes: usize,
    pub ms_per_step: f64,
    /// Median over the timed steps.
    pub ms_median: f64,
    /// CPU time (all threads, user + system) per step: steadier than wall time on a shared
    /// machine.
    pub cpu_ms_per_step: f64,
    pub peak_rss_mb: f64,
    /// Time to encode the pair tables once (CAPT; per epoch in training).
    pub table_ms: Option<f64>,
    /// Text sequences encoded with gradient per step (class prompts + SEM pair prompts).
    pub grad_sequences: f64,
}

fn bench_config(size: &str) -> Result<ClipConfig> {
    match size {
        "b16" => Ok(ClipConfig::vit_b16()),
        "tiny" => Ok(ClipConfig::tiny()),
        other => Err(TrainError::Config(format!(
            "--size {other:?}: expected b16 or tiny"
        ))),
    }
}

/// Class names like real ones: one to three word pieces.
fn class_names(n: usize) -> Vec<String> {
    const WORDS: [&str; 12] = [
        "striped",
        "golden",
        "retriever",
        "maple",
        "leaf",
        "sports",
        "car",
        "banded",
        "tabby",
        "cat",
        "red",
        "fox",
    ];
    (0..n)
        .map(|i| {
            let a = WORDS[i % WORDS.len()];
            let b = WORDS[(i / WORDS.len() + 3) % WORDS.len()];
            format!("{a} {b} {i}")
        })
        .collect()
}

/// One model under measurement.
struct Runner {
    device: Device,
    model: Model,
    cache: Option<TableCache>,
    sgd: Sgd,
    times: Vec<f64>,
    cpu: Vec<f64>,
    sequences: usize,
}

impl Runner {
    fn step(&mut self, feats: &Feats, labels: &Tensor, timed: bool) -> Result<()> {
        let (t0, c0) = (Instant::now(), cpu_ms());
        let out = self
            .model
            .train_forward(feats, labels, self.cache.as_ref())?;
        let grads = out.loss.backward()?;
        self.sgd.step(&self.model.params, &grads, 0.002)?;
        // GPU kernels run asynchronously: the step ends when the device is done.
        self.device.synchronize()?;
        if timed {
            self.times.push(t0.elapsed().as_secs_f64() * 1000.0);
            self.cpu.push(cpu_ms() - c0);
            self.sequences += self.model.num_classes() + out.grad_sequences;
        }
        Ok(())
    }

    fn result(&self, method: Method, peak_rss_mb: f64, table_ms: Option<f64>) -> BenchResult {
        let n = self.times.len().max(1) as f64;
        let mut sorted = self.times.clone();
        sorted.sort_by(f64::total_cmp);
        BenchResult {
            method: method.name().into(),
            classes: self.model.num_classes(),
            ms_per_step: self.times.iter().sum::<f64>() / n,
            ms_median: sorted.get(sorted.len() / 2).copied().unwrap_or(0.0),
            cpu_ms_per_step: self.cpu.iter().sum::<f64>() / n,
            peak_rss_mb,
            table_ms,
            grad_sequences: self.sequences as f64 / n,
        }
    }
}

/// Measures CoOp and CAPT for `classes` classes in this process. Their timed steps alternate
/// (CoOp, CAPT, CoOp, ...) so both see the same machine load; CoOp's peak RSS is read before
/// the CAPT model exists, CAPT's at the end (the shared frozen backbone counts in both).
pub fn measure_pair(
    size: &str,
    cfg: &RunConfig,
    classes: usize,
    steps: usize,
    dev: &Device,
    dtype: DType,
) -> Result<Vec<BenchResult>> {
    let clip = bench_config(size)?;
    let backbone = Backbone::random(&clip, 1, false, dtype, dev)?;
    let dev = dev.clone();
    let grid = cfg.capt.bank.local_grid;
    let g = grid * grid;
    let d = backbone.dim();
    let names = class_names(classes);
    let bs = cfg.capt.optim.batch_size;
    let mut r = rng::rng(7, rng::stream::INIT, 0);
    let mut feats_of = |n: usize| -> Result<Feats> {
        Ok(Feats {
            global: Tensor::from_vec(rng::normal(&mut r, n * d, 1.0), (n, d), &dev)?,
            local: Tensor::from_vec(rng::normal(&mut r, n * g * d, 1.0), (n, g, d), &dev)?,
        })
    };
    let labels_of = |s: usize| -> Result<Tensor> {
        let v: Vec<u32> = (0..bs).map(|i| ((s * bs + i) % classes) as u32).collect();
        Ok(Tensor::from_vec(v, bs, &dev)?)
    };
    let runner = |cache: Option<TableCache>, model: Model| Runner {
        device: dev.clone(),
        model,
        cache,
        sgd: Sgd::new(0.9, 5e-4, Some(1.0)),
        times: Vec::new(),
        cpu: Vec::new(),
        sequences: 0,
    };
    let mut coop_cfg = cfg.clone();
    coop_cfg.capt.method = Method::Coop;
    let mut coop = runner(
        None,
        Model::new(
            backbone.clone(),
            &coop_cfg,
            &names,
            "a photo of a {}.",
            g,
            1,
        )?,
    );
    // The first step of each model warms up allocators and caches (untimed).
    coop.step(&feats_of(bs)?, &labels_of(0)?, false)?;
    coop.step(&feats_of(bs)?, &labels_of(1)?, false)?;
    let coop_rss = peak_rss_mb();

    let mut capt_cfg = cfg.clone();
    capt_cfg.capt.method = Method::Capt;
    let model = Model::new(backbone, &capt_cfg, &names, "a photo of a {}.", g, 1)?;
    // A bank with entries, as after a real first pass: 4 samples per class observed with
    // random predictions.
    let mut bank = ConfusionBank::new(classes, d, g, &capt_cfg.capt.bank);
    let f = feats_of(4 * classes)?;
    let gl = f.global.to_vec2::<f32>()?;
    let lo = f.local.reshape((4 * classes, g * d))?.to_vec2::<f32>()?;
    let mut r2 = rng::rng(7, rng::stream::INIT, 1);
    for i in 0..4 * classes {
        let probs = rng::normal(&mut r2, classes, 1.0);
        bank.observe(i % classes, &probs, &gl[i], &lo[i])?;
    }
    let t0 = Instant::now();
    let cache = TableCache::build(&model, &bank)?;
    let table_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let mut capt = runner(Some(cache), model);
    capt.step(&feats_of(bs)?, &labels_of(0)?, false)?;
    for s in 0..steps {
        let (f, y) = (feats_of(bs)?, labels_of(s + 2)?);
        coop.step(&f, &y, true)?;
        capt.step(&f, &y, true)?;
    }
    Ok(vec![
        coop.result(Method::Coop, coop_rss, None),
        capt.result(Method::Capt, peak_rss_mb(), Some(table_ms)),
    ])
}

/// CPU time of this process so far (user + system, all threads), ms; 0 where unavailable.
pub fn cpu_ms() -> f64 {
    // /proc/self/stat fields 14 and 15 (utime, stime) in clock ticks (100 Hz on Linux).
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
            Some(ticks * 10.0)
        })
        .unwrap_or(0.0)
}

/// Peak resident set size of this process (`VmHWM`), MiB; 0 where unavailable.
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Runs each class count in a child process and prints the table.
pub fn run(args: &BenchArgs) -> Result<Vec<BenchResult>> {
    if let Some(classes) = args.child {
        let rs = measure_pair(
            &args.size,
            &args.config,
            classes,
            args.steps,
            &args.device,
            args.dtype,
        )?;
        for r in &rs {
            println!("{}", serde_json::to_string(r).expect("result serialises"));
        }
        return Ok(rs);
    }
    let exe = std::env::current_exe()
        .map_err(|e| TrainError::Config(format!("cannot find this executable: {e}")))?;
    let mut results = Vec::new();
    for &c in &args.classes {
        let out = Command::new(&exe)
            .args(["bench", "train-step", "--size", &args.size])
            .args([
                "--steps",
                &args.steps.to_string(),
                "--child",
                &c.to_string(),
            ])
            .args(&args.forward)
            .output()
            .map_err(|e| TrainError::Config(format!("cannot run {}: {e}", exe.display())))?;
        if !out.status.success() {
            return Err(TrainError::Config(format!(
                "bench child ({c} classes) failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        for line in text.lines().filter(|l| l.starts_with('{')) {
            let r: BenchResult = serde_json::from_str(line)
                .map_err(|e| TrainError::Config(format!("bench child printed {line:?}: {e}")))?;
            eprintln!(
                "{:>6} {:>4} classes: {:8.1} ms/step (median {:8.1}, CPU {:8.1}), {:5.1} text sequences/step, peak RSS {:7.1} MiB{}",
                r.method,
                r.classes,
                r.ms_per_step,
                r.ms_median,
                r.cpu_ms_per_step,
                r.grad_sequences,
                r.peak_rss_mb,
                r.table_ms
                    .map_or(String::new(), |t| format!(", pair tables {t:.0} ms/epoch"))
            );
            results.push(r);
        }
    }
    println!("| classes | CoOp ms/step (median) | CAPT ms/step (median) | CAPT/CoOp wall | CAPT/CoOp CPU time | CoOp peak RSS MiB | CAPT peak RSS MiB | CAPT tables ms/epoch |");
    println!("|---|---|---|---|---|---|---|---|");
    for &c in &args.classes {
        let get = |m: &str| results.iter().find(|r| r.classes == c && r.method == m);
        if let (Some(a), Some(b)) = (get("coop"), get("capt")) {
            println!(
                "| {c} | {:.1} | {:.1} | {:.2} | {:.2} | {:.0} | {:.0} | {:.0} |",
                a.ms_median,
                b.ms_median,
                b.ms_median / a.ms_median,
                b.cpu_ms_per_step / a.cpu_ms_per_step.max(1e-9),
                a.peak_rss_mb,
                b.peak_rss_mb,
                b.table_ms.unwrap_or(0.0)
            );
        }
    }
    let mut torch = Vec::new();
    if let Some(py) = &args.torch_python {
        for &c in &args.classes {
            let out = Command::new(py)
                .args([
                    &args.torch_script,
                    "--classes",
                    &c.to_string(),
                    "--steps",
                    &args.steps.to_string(),
                ])
                .args(["--size", &args.size])
                .args([
                    "--device",
                    if args.device.is_cuda() { "cuda" } else { "cpu" },
                ])
                .args(["--dtype", torch_dtype(args.dtype)])
                .output()
                .map_err(|e| TrainError::Config(format!("cannot run {py}: {e}")))?;
            if !out.status.success() {
                return Err(TrainError::Config(format!(
                    "{} failed: {}",
                    args.torch_script,
                    String::from_utf8_lossy(&out.stderr)
                )));
            }
            let text = String::from_utf8_lossy(&out.stdout);
            let v: serde_json::Value = serde_json::from_str(text.lines().last().unwrap_or(""))
                .map_err(|e| {
                    TrainError::Config(format!("{} printed {text:?}: {e}", args.torch_script))
                })?;
            let coop = results
                .iter()
                .find(|r| r.classes == c && r.method == "coop");
            for key in ["ms_per_step_77", "ms_per_step_truncated"] {
                if let (Some(t), Some(coop)) = (v[key].as_f64(), coop) {
                    println!(
                        "torch eager CoOp ({c} classes, {}): {t:.1} ms/step; candle CoOp / torch = {:.2}",
                        if key.ends_with("77") { "77 tokens as CoOp" } else { "truncated like capt-train" },
                        coop.ms_per_step / t
                    );
                }
            }
            torch.push(v);
        }
    }
    // One machine-readable line last (tools/gpu-check.sh reads it).
    println!(
        "{}",
        serde_json::json!({ "train_step": results, "torch": torch })
    );
    Ok(results)
}

/// `--dtype` of tools/ref_train_step.py for a backbone dtype.
fn torch_dtype(d: DType) -> &'static str {
    match d {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "f32",
    }
}

/// `capt-train bench forward`.
#[derive(Debug, Clone)]
pub struct ForwardArgs {
    /// A CLIP folder, `tiny`, or `b16` (random ViT-B/16 weights: throughput at full size).
    pub backbone: String,
    pub device: Device,
    pub dtype: DType,
    /// Images per timed forward pass.
    pub batch: usize,
    /// Timed passes (after one warm-up pass).
    pub iters: usize,
}

/// What `bench forward` measured. Deviations are of L2-normalised features (what the
/// classifier compares), on the same random pixels and prompts, against CPU f32.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ForwardReport {
    pub backbone: String,
    pub device: String,
    pub dtype: String,
    pub image_size: usize,
    /// Images (and prompts) compared with the CPU f32 reference.
    pub compared: usize,
    pub image_max_abs_diff: f64,
    pub text_max_abs_diff: f64,
    pub batch: usize,
    pub images_per_s: f64,
    pub texts_per_s: f64,
}

fn backbone_for(spec: &str, dtype: DType, dev: &Device) -> Result<Backbone> {
    match spec {
        "b16" => Backbone::random(&ClipConfig::vit_b16(), 1, true, dtype, dev),
        other => Backbone::load(&crate::backbone::BackboneSpec::parse(other), dtype, dev),
    }
}

/// Normalised image and text features of `pixels` / `texts` (host f32 rows).
fn features(bb: &Backbone, pixels: &Tensor, texts: &[String]) -> Result<(Tensor, Tensor)> {
    let enc = crate::backbone::ImageEncoder::new(bb, 1)?;
    let (g, _) = enc.encode_pixels(&pixels.to_device(&bb.device)?)?;
    let t = bb.encode_texts(texts, 64)?;
    let norm = |x: Tensor| -> Result<Tensor> {
        let x = x.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        Ok(x.broadcast_div(&x.sqr()?.sum_keepdim(1)?.sqrt()?)?)
    };
    Ok((norm(g)?, norm(t)?))
}

/// Runs `bench forward`: parity against CPU f32 on up to 8 images and prompts, then the
/// throughput of `iters` passes of `batch` images (and prompts) on the device.
pub fn forward(args: &ForwardArgs) -> Result<ForwardReport> {
    let bb = backbone_for(&args.backbone, args.dtype, &args.device)?;
    let size = bb.config.vision.image_size;
    let batch = args.batch.max(1);
    let mut r = rng::rng(11, rng::stream::INIT, 0);
    let pixels = Tensor::from_vec(
        rng::normal(&mut r, batch * capt_core::chw_len(size), 1.0),
        (batch, 3, size, size),
        &Device::Cpu,
    )?;
    let texts: Vec<String> = class_names(batch)
        .iter()
        .map(|n| format!("a photo of a {n}."))
        .collect();
    let n = batch.min(8);
    let (gi, gt) = features(&bb, &pixels.narrow(0, 0, n)?, &texts[..n])?;
    let (ri, rt) = if args.device.is_cpu() && args.dtype == DType::F32 {
        (gi.clone(), gt.clone())
    } else {
        let cpu = backbone_for(&args.backbone, DType::F32, &Device::Cpu)?;
        features(&cpu, &pixels.narrow(0, 0, n)?, &texts[..n])?
    };
    let max_diff = |a: &Tensor, b: &Tensor| -> Result<f64> {
        Ok(f64::from(
            (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?,
        ))
    };
    let image_max_abs_diff = max_diff(&gi, &ri)?;
    let text_max_abs_diff = max_diff(&gt, &rt)?;

    let enc = crate::backbone::ImageEncoder::new(&bb, 1)?;
    let on_dev = pixels.to_device(&args.device)?;
    let time = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        f()?;
        args.device.synchronize()?;
        let t0 = Instant::now();
        for _ in 0..args.iters.max(1) {
            f()?;
        }
        args.device.synchronize()?;
        Ok(t0.elapsed().as_secs_f64())
    };
    let image_s = time(&mut || {
        enc.encode_pixels(&on_dev)?;
        Ok(())
    })?;
    let text_s = time(&mut || {
        bb.encode_texts(&texts, batch)?;
        Ok(())
    })?;
    let done = (batch * args.iters.max(1)) as f64;
    Ok(ForwardReport {
        backbone: args.backbone.clone(),
        device: format!("{:?}", args.device.location()),
        dtype: torch_dtype(args.dtype).into(),
        image_size: size,
        compared: n,
        image_max_abs_diff,
        text_max_abs_diff,
        batch,
        images_per_s: done / image_s,
        texts_per_s: done / text_s,
    })
}
