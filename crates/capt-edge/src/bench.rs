//! `capt-edge bench`: cold start (process start to a warmed-up model), then latency
//! percentiles and throughput per batch size on the deterministic synthetic input, and peak RSS.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use capt_backend::synthetic_batch;
use serde::Serialize;

use crate::engine::{BackendKind, Engine, EngineArgs};

static PROCESS_START: OnceLock<Instant> = OnceLock::new();

/// Call first thing in `main` so cold start includes argument parsing and library loading.
pub fn mark_process_start() {
    let _ = PROCESS_START.set(Instant::now());
}

fn since_start() -> f64 {
    PROCESS_START
        .get_or_init(Instant::now)
        .elapsed()
        .as_secs_f64()
}

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Exported model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Batch sizes to time, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    pub batch: Vec<usize>,
    /// Timed runs per batch size.
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
    /// Untimed runs first.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Stop a batch size early after this many seconds of timed runs.
    #[arg(long, default_value_t = 60.0)]
    pub max_seconds: f64,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// A second export to time in the same run (e.g. int8 against f32): runs alternate
    /// between the two (ABBA order) so drifts of this machine's speed hit both alike, and the
    /// p50 ratio is printed.
    #[arg(long, value_name = "DIR")]
    pub compare: Option<PathBuf>,
    /// The engine of the --compare model (default: --backend), e.g. `--model X --compare X
    /// --compare-backend ort` times tract against onnxruntime on one export.
    #[arg(long, value_enum, value_name = "ENGINE")]
    pub compare_backend: Option<BackendKind>,
    #[command(flatten)]
    pub engine: EngineArgs,
}

#[derive(Debug, Clone, Serialize)]
pub struct BatchStats {
    pub batch: usize,
    pub runs: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub mean_ms: f64,
    pub images_per_second: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub backend: String,
    /// Process start to model loaded and warmed up.
    pub cold_start_ms: f64,
    /// Manifest check + hash + session creation + warm-up.
    pub load_ms: f64,
    pub batches: Vec<BatchStats>,
    /// Peak resident set size (VmHWM), MiB; None where /proc is unavailable.
    pub peak_rss_mib: Option<f64>,
    /// b1 p50 against the project's CPU anchors, when the model is ViT-B/16 at 224 px.
    pub anchors: Vec<AnchorRatio>,
    /// The `--compare` model, timed interleaved with this one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compare: Option<Comparison>,
}

/// The second model of `bench --compare` and the ratios of the two.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub model: String,
    pub dir: String,
    pub backend: String,
    pub load_ms: f64,
    pub batches: Vec<BatchStats>,
    /// Per batch size: this (A) p50 / the compared (B) p50 (< 1: A is faster).
    pub p50_ratio: Vec<(usize, f64)>,
}

/// The project's CPU anchors: CLIP ViT-B/16 image encoder, batch 1, 2 threads, on the 2-core
/// reference machine (ms). The classifier adds the CAPT head to that encoder.
pub const ANCHORS_B16_B1_MS: [(&str, f64); 4] = [
    ("onnxruntime", 85.0),
    ("tract", 190.0),
    ("PyTorch eager", 215.0),
    ("candle", 290.0),
];

#[derive(Debug, Clone, Serialize)]
pub struct AnchorRatio {
    pub anchor: String,
    pub anchor_ms: f64,
    /// This run's b1 p50 divided by the anchor (< 1: faster than the anchor).
    pub ratio: f64,
}

/// Whether a manifest's `model_spec` describes a ViT-B/16 vision tower at 224 px.
fn is_vit_b16(spec: Option<&serde_json::Value>) -> bool {
    let Some(v) = spec.and_then(|s| s.pointer("/clip/vision")) else {
        return false;
    };
    let is = |k: &str, want: u64| v.get(k).and_then(|x| x.as_u64()) == Some(want);
    is("hidden_size", 768)
        && is("num_hidden_layers", 12)
        && is("patch_size", 16)
        && is("image_size", 224)
}

/// Ratios of the b1 p50 against [`ANCHORS_B16_B1_MS`] (empty unless ViT-B/16 and b1 was timed).
pub fn anchor_ratios(spec: Option<&serde_json::Value>, batches: &[BatchStats]) -> Vec<AnchorRatio> {
    let Some(b1) = batches.iter().find(|b| b.batch == 1) else {
        return Vec::new();
    };
    if !is_vit_b16(spec) {
        return Vec::new();
    }
    ANCHORS_B16_B1_MS
        .iter()
        .map(|(name, ms)| AnchorRatio {
            anchor: name.to_string(),
            anchor_ms: *ms,
            ratio: b1.p50_ms / ms,
        })
        .collect()
}

/// Nearest-rank percentile of sorted samples.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Builds stats from per-run latencies in seconds.
pub fn stats(batch: usize, mut secs: Vec<f64>) -> BatchStats {
    secs.sort_by(f64::total_cmp);
    let ms: Vec<f64> = secs.iter().map(|s| s * 1e3).collect();
    let total: f64 = secs.iter().sum();
    BatchStats {
        batch,
        runs: ms.len(),
        p50_ms: percentile(&ms, 50.0),
        p90_ms: percentile(&ms, 90.0),
        p99_ms: percentile(&ms, 99.0),
        mean_ms: ms.iter().sum::<f64>() / ms.len().max(1) as f64,
        images_per_second: if total > 0.0 {
            (batch * secs.len()) as f64 / total
        } else {
            0.0
        },
    }
}

/// Peak RSS of this process in MiB (Linux `VmHWM`).
pub fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

pub fn run(args: &BenchArgs) -> anyhow::Result<BenchReport> {
    anyhow::ensure!(args.iters >= 1, "--iters must be at least 1");
    anyhow::ensure!(
        args.batch.iter().all(|b| (1..=1024).contains(b)),
        "--batch sizes must be between 1 and 1024"
    );
    let mut mine = args.engine.clone();
    let other_backend = args.compare_backend.unwrap_or(mine.backend);
    if args.compare.is_some()
        && mine.ort_spinning.is_none()
        && (mine.backend == BackendKind::Ort || other_backend == BackendKind::Ort)
    {
        // Spinning intra-op threads of the idle session would take the cores of the one being
        // timed (measured: b1 0.70x with spinning vs 0.41x without, same exports).
        tracing::info!("--compare: ONNX Runtime spinning off (two sessions share the cores)");
        mine.ort_spinning = Some(false);
    }
    let engine = Engine::load(&args.model, &mine)?;
    let cold_start_ms = since_start() * 1e3;
    let other = match &args.compare {
        Some(dir) => {
            let mut e = mine.clone();
            if let Some(b) = args.compare_backend {
                e.backend = b;
            }
            Some((dir, Engine::load(dir, &e)?))
        }
        None => None,
    };
    if let Some((dir, b)) = &other {
        let (ca, cb) = (
            engine.model.manifest.preprocess.crop,
            b.model.manifest.preprocess.crop,
        );
        anyhow::ensure!(
            ca == cb,
            "--compare {} takes {cb} px images, --model {ca} px; compare exports of one backbone",
            dir.display()
        );
    }
    let crop = engine.model.manifest.preprocess.crop as usize;
    let limit = Duration::from_secs_f64(args.max_seconds.max(0.0));
    let engines: Vec<&Engine> = std::iter::once(&engine)
        .chain(other.as_ref().map(|(_, e)| e))
        .collect();
    let mut batches: Vec<Vec<BatchStats>> = vec![Vec::new(); engines.len()];
    for &n in &args.batch {
        let input = synthetic_batch(n, crop);
        for e in &engines {
            for _ in 0..args.warmup {
                e.backend.classify(&input)?;
            }
        }
        let mut secs = vec![Vec::with_capacity(args.iters); engines.len()];
        let began = Instant::now();
        for i in 0..args.iters {
            // ABBA: A first on even runs, B first on odd ones.
            let order: Vec<usize> = if i % 2 == 0 {
                (0..engines.len()).collect()
            } else {
                (0..engines.len()).rev().collect()
            };
            for k in order {
                let t = Instant::now();
                engines[k].backend.classify(&input)?;
                secs[k].push(t.elapsed().as_secs_f64());
            }
            if began.elapsed() > limit {
                break;
            }
        }
        for (k, s) in secs.into_iter().enumerate() {
            batches[k].push(stats(n, s));
        }
    }
    let mut batches = batches.into_iter();
    let mine = batches.next().unwrap_or_default();
    let compare = other.map(|(dir, e)| {
        let theirs = batches.next().unwrap_or_default();
        let p50_ratio = mine
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a.batch, a.p50_ms / b.p50_ms))
            .collect();
        Comparison {
            model: e.model.manifest.model_name.clone(),
            dir: dir.display().to_string(),
            backend: e.backend.describe(),
            load_ms: e.load_seconds * 1e3,
            batches: theirs,
            p50_ratio,
        }
    });
    let anchors = anchor_ratios(engine.model.manifest.model_spec.as_ref(), &mine);
    Ok(BenchReport {
        model: engine.model.manifest.model_name.clone(),
        backend: engine.backend.describe(),
        cold_start_ms,
        load_ms: engine.load_seconds * 1e3,
        batches: mine,
        peak_rss_mib: peak_rss_mib(),
        anchors,
        compare,
    })
}

pub fn print_table(r: &BenchReport, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    writeln!(out, "model {}  backend {}", r.model, r.backend)?;
    writeln!(
        out,
        "cold start {:.1} ms (load + warm-up {:.1} ms)",
        r.cold_start_ms, r.load_ms
    )?;
    writeln!(
        out,
        "{:>6} {:>6} {:>10} {:>10} {:>10} {:>10} {:>12}",
        "batch", "runs", "p50 ms", "p90 ms", "p99 ms", "mean ms", "images/s"
    )?;
    for b in &r.batches {
        writeln!(
            out,
            "{:>6} {:>6} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>12.1}",
            b.batch, b.runs, b.p50_ms, b.p90_ms, b.p99_ms, b.mean_ms, b.images_per_second
        )?;
    }
    match r.peak_rss_mib {
        Some(m) => writeln!(out, "peak RSS {m:.1} MiB")?,
        None => writeln!(out, "peak RSS unavailable")?,
    }
    if let Some(c) = &r.compare {
        writeln!(
            out,
            "compared, interleaved: B = {} ({})  backend {}  load + warm-up {:.1} ms",
            c.model, c.dir, c.backend, c.load_ms
        )?;
        writeln!(
            out,
            "{:>6} {:>10} {:>10} {:>10}",
            "batch", "A p50 ms", "B p50 ms", "A / B"
        )?;
        for ((n, ratio), (a, b)) in c.p50_ratio.iter().zip(r.batches.iter().zip(&c.batches)) {
            writeln!(
                out,
                "{n:>6} {:>10.2} {:>10.2} {ratio:>9.2}x",
                a.p50_ms, b.p50_ms
            )?;
        }
    }
    if !r.anchors.is_empty() {
        writeln!(
            out,
            "b1 p50 vs the CPU anchors (ViT-B/16 image encoder, b1, 2 threads; < 1 is faster):"
        )?;
        for a in &r.anchors {
            writeln!(
                out,
                "  {:<14} {:>6.0} ms  {:.2}x",
                a.anchor, a.anchor_ms, a.ratio
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&[3.0], 90.0), 3.0);
        let s = stats(4, vec![0.002, 0.001, 0.003]);
        assert_eq!(s.p50_ms, 2.0);
        assert!((s.images_per_second - 2000.0).abs() < 1e-6);
    }

    #[test]
    fn anchor_ratios_only_for_vit_b16() {
        let b16 = serde_json::json!({"clip": {"vision": {
            "hidden_size": 768, "num_hidden_layers": 12, "patch_size": 16, "image_size": 224}}});
        let tiny = serde_json::json!({"clip": {"vision": {
            "hidden_size": 64, "num_hidden_layers": 2, "patch_size": 16, "image_size": 32}}});
        let b = [stats(1, vec![0.095]), stats(8, vec![0.8])];
        let r = anchor_ratios(Some(&b16), &b);
        assert_eq!(r.len(), ANCHORS_B16_B1_MS.len());
        let tract = r.iter().find(|a| a.anchor == "tract").unwrap();
        assert!((tract.ratio - 95.0 / 190.0).abs() < 1e-9);
        assert!(anchor_ratios(Some(&tiny), &b).is_empty());
        assert!(anchor_ratios(None, &b).is_empty());
        assert!(anchor_ratios(Some(&b16), &b[1..]).is_empty());
    }

    #[test]
    fn reads_peak_rss() {
        if cfg!(target_os = "linux") {
            assert!(peak_rss_mib().unwrap() > 0.0);
        }
    }
}
