//! `capt-export`: a trained CAPT checkpoint (or zero-shot CLIP) to ONNX for capt-edge,
//! onnxruntime, TensorRT or Triton.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use capt_export::{Classes, ExportOptions, Format, Precision};
use clap::{Parser, ValueEnum};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum FormatArg {
    Onnx,
    Triton,
}

#[derive(Debug, Clone, Copy, PartialEq, ValueEnum)]
enum Int8Arg {
    /// Integer compute: int8 weights, activations quantised per call (DynamicQuantizeLinear +
    /// MatMulInteger) in the CLIP towers' linear layers of classifier.onnx and
    /// image_encoder.onnx; the rest stays f32.
    Dynamic,
    /// Weight-only int8 storage (per-row scales), widened to f32 at load: ~4x smaller files,
    /// f32 speed.
    Weights,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum PrecisionArg {
    F32,
    F16,
}

/// Export a CAPT checkpoint (or zero-shot CLIP) as ONNX graphs with a capt.json manifest.
///
/// From a checkpoint:  capt-export --checkpoint runs/capt --out exported/capt
/// Zero-shot CLIP:     capt-export --backbone models/clip --classes classes.txt --template "a photo of a {}." --out exported/zs
#[derive(Debug, Parser)]
#[command(name = "capt-export", version)]
struct Args {
    /// Checkpoint folder, or a training run's --out folder (its LATEST checkpoint).
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// CLIP weights (HF folder, .safetensors, or a PyTorch .pt/.bin such as OpenAI's
    /// ViT-B-16.pt). With --checkpoint: overrides the recorded path (must have the recorded
    /// sha256). Without: a zero-shot export.
    #[arg(long)]
    backbone: Option<PathBuf>,
    /// For --backbone files without a config: the open_clip model name (ViT-B-16 = GELU,
    /// ViT-B-16-quickgelu = QuickGELU) or `openai` (OpenAI's weights).
    #[arg(long, value_name = "NAME")]
    arch: Option<String>,
    /// Output directory (written atomically).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, value_enum, default_value = "onnx")]
    format: FormatArg,
    /// Classes of the classifier: `base` (the trained classes), `all` (every class of the
    /// checkpoint's dataset; needs --root) or a file with one class name per line.
    /// Required for zero-shot exports.
    #[arg(long)]
    classes: Option<String>,
    /// Dataset root for `--classes all`.
    #[arg(long)]
    root: Option<PathBuf>,
    /// Zero-shot template (`{}` = class name).
    #[arg(long, default_value = "a photo of a {}.")]
    template: String,
    /// Zero-shot: side of the pooled local-token grid of image_encoder.onnx.
    #[arg(long, default_value_t = 4)]
    local_grid: usize,
    /// Precision: f32, or f16 (float16 weights and compute for GPU/TensorRT, half-size files;
    /// norms and the SEM pair top-k stay f32, inputs and outputs stay f32).
    #[arg(long, value_enum, default_value = "f32")]
    precision: PrecisionArg,
    /// int8 for CPU edge devices: `dynamic` (the default of a bare --int8) computes the
    /// linear layers in int8; `weights` only stores them as int8 (smaller files, f32 compute).
    #[arg(long, value_enum, value_name = "MODE", num_args = 0..=1, default_missing_value = "dynamic")]
    int8: Option<Int8Arg>,
    #[arg(long, default_value_t = 17)]
    opset: i64,
    /// Skip text_encoder.onnx (no adding classes at the edge).
    #[arg(long)]
    no_text_encoder: bool,
    /// Hide the progress bar (also hidden when stderr is not a terminal).
    #[arg(long)]
    no_progress: bool,
    /// Skip image_encoder.onnx.
    #[arg(long)]
    no_image_encoder: bool,
    /// Replace --out if it exists.
    #[arg(long)]
    force: bool,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "capt_export=info,warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// A step bar on stderr (hidden when stderr is not a terminal or with `--no-progress`).
fn progress_bar(show: bool, steps: usize) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !show || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(steps as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("export [{bar:30}] {pos}/{len} {msg} ({elapsed})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar
}

fn run(a: Args) -> Result<()> {
    let t0 = std::time::Instant::now();
    let src = match (&a.checkpoint, &a.backbone) {
        (Some(ck), bb) => {
            let classes = match a.classes.as_deref() {
                None | Some("base") | Some("trained") => Classes::Trained,
                Some("all") => Classes::All {
                    root: a
                        .root
                        .clone()
                        .context("--classes all reads the dataset's class list: pass --root DIR")?,
                },
                Some(file) => Classes::File(file.into()),
            };
            capt_export::from_checkpoint(ck, bb.as_deref(), &classes)?
        }
        (None, Some(bb)) => {
            let Some(file) = a.classes.as_deref() else {
                bail!("a zero-shot export (--backbone without --checkpoint) needs --classes FILE with one class name per line");
            };
            if matches!(file, "base" | "all" | "trained") {
                bail!("--classes {file} needs a checkpoint; for zero-shot pass a file with one class name per line");
            }
            let names = capt_export::read_class_file(file.as_ref())?;
            capt_export::zero_shot(bb, a.arch.as_deref(), names, &a.template, a.local_grid)?
        }
        (None, None) => bail!(
            "nothing to export: pass --checkpoint DIR (a trained run) or --backbone DIR --classes FILE (zero-shot CLIP)"
        ),
    };
    let load_s = t0.elapsed().as_secs_f64();
    let opts = ExportOptions {
        precision: match (a.precision, a.int8) {
            (PrecisionArg::F16, Some(_)) => {
                bail!("--int8 and --precision f16 are exclusive: int8 is for CPU edge devices, f16 for GPUs; pick one")
            }
            (PrecisionArg::F16, None) => Precision::F16,
            (PrecisionArg::F32, Some(Int8Arg::Dynamic)) => Precision::Int8,
            (PrecisionArg::F32, _) => Precision::F32,
        },
        int8_weights: a.int8 == Some(Int8Arg::Weights),
        opset: a.opset,
        text_encoder: !a.no_text_encoder,
        image_encoder: !a.no_image_encoder,
        format: match a.format {
            FormatArg::Onnx => Format::Onnx,
            FormatArg::Triton => Format::Triton,
        },
        force: a.force,
    };
    let bar = progress_bar(!a.no_progress, capt_export::export_steps(&opts));
    let r = capt_export::export_with_progress(&src, &opts, &a.out, &mut |what| {
        bar.set_message(what.to_string());
        bar.inc(1);
    })?;
    bar.finish_and_clear();
    println!(
        "exported {} ({} classes, method {}) to {}",
        src.model_name,
        src.class_names.len(),
        src.spec.method.name(),
        r.out.display()
    );
    for (f, n) in &r.files {
        println!("  {f:<36} {:>10.2} MB", *n as f64 / 1e6);
    }
    if let Some(q) = &r.quant {
        println!(
            "  int8 ({}): {} weight tensors, {:.1} MB -> {:.1} MB, max |w - dequant(q)| = {:.2e}",
            if opts.int8_weights {
                "weights"
            } else {
                "compute"
            },
            q.tensors,
            q.bytes_before as f64 / 1e6,
            q.bytes_after as f64 / 1e6,
            q.max_abs_error
        );
    }
    for (role, f) in &r.f16 {
        println!(
            "  f16 {role}: {} nodes in f16, {} kept in f32, {} casts added, {} removed",
            f.f16_nodes,
            f.f32_nodes.len(),
            f.casts_added,
            f.casts_removed
        );
    }
    println!(
        "time: load {load_s:.2} s, build graphs {:.2} s, write {:.2} s",
        r.build_seconds, r.write_seconds
    );
    Ok(())
}
