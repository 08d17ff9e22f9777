//! `capt-train`: the command line around capt's trainer crates (data checks, tuning,
//! evaluation, benchmarks). Thin: argument parsing and reporting only.

use std::path::PathBuf;
use std::process::ExitCode;

use capt_data::{DatasetKind, Split, Subsample};
use capt_method::Method;
use capt_train::backbone::{parse_device, parse_dtype, BackboneSpec};
use capt_train::config::RunConfig;
use capt_train::evaluate::EvalSubsample;
use capt_train::{b2n, bench, evaluate, fit, progress};
use clap::{Args, Parser, Subcommand};

mod data_cmd;

use data_cmd::DatasetArgs;

#[derive(Parser)]
#[command(
    name = "capt-train",
    version,
    about = "Confusion-Aware Prompt Tuning for CLIP"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Dataset tools (validate a CoOp-layout dataset folder).
    Data(data_cmd::DataArgs),
    /// Train prompts (CoOp) or CAPT on a few-shot dataset; resumable checkpoints per epoch.
    Fit(FitCli),
    /// Evaluate a checkpoint: top-1, macro-F1, confusion matrix, base/novel/HM, Correction Rate.
    Eval(EvalCli),
    /// Evaluate zero-shot CLIP (hand-crafted prompts); writes the same report as `eval`.
    Zeroshot(ZeroshotCli),
    /// Base-to-novel benchmark over datasets, seeds and methods (Markdown + CSV table).
    B2n(B2nCli),
    /// Benchmarks.
    Bench(BenchCli),
}

fn parse_method(s: &str) -> Result<Method, String> {
    Method::parse(s).map_err(|e| e.to_string())
}

/// Config file + the overrides every training command shares.
#[derive(Args, Clone)]
struct ConfigArgs {
    /// TOML config: CaptConfig keys (method, [prompt], [bank], [sem], [sam], [mgde], [optim],
    /// [data]) plus [trainer]; every key optional (spec defaults).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// zero-shot, coop-plain (CoOp: 16 random context tokens, no KgCoOp term), coop
    /// (KgCoOp-style), capt, capt-no-sem, capt-no-sam, capt-no-routing.
    #[arg(long, value_parser = parse_method)]
    method: Option<Method>,
    /// Training images per class (data.shots; default 16).
    #[arg(long)]
    shots: Option<usize>,
    /// Training epochs (optim.epochs; default 20).
    #[arg(long)]
    epochs: Option<usize>,
    /// Learning rate (optim.lr) of the prompts; cosine schedule after the warm-up epoch.
    #[arg(long)]
    lr: Option<f64>,
    /// Learning rate of the CAPT head: adapter, router, expert gains (optim.head_lr).
    #[arg(long)]
    head_lr: Option<f64>,
    /// Images per training step (optim.batch_size).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Pairs re-encoded with gradient per step (trainer.grad_pairs; 0 = all the batch uses).
    #[arg(long)]
    grad_pairs: Option<usize>,
}

impl ConfigArgs {
    fn load(&self) -> anyhow::Result<RunConfig> {
        let mut cfg = match &self.config {
            Some(p) => RunConfig::from_toml_file(p)?,
            None => RunConfig::default(),
        };
        if let Some(m) = self.method {
            cfg.capt.method = m;
        }
        if let Some(v) = self.shots {
            cfg.capt.data.shots = v;
        }
        if let Some(v) = self.epochs {
            cfg.capt.optim.epochs = v;
            // One epoch cannot hold a warm-up epoch too.
            if v <= cfg.capt.optim.warmup_epochs {
                cfg.capt.optim.warmup_epochs = v.saturating_sub(1);
            }
        }
        if let Some(v) = self.lr {
            cfg.capt.optim.lr = v;
        }
        if let Some(v) = self.head_lr {
            cfg.capt.optim.head_lr = Some(v);
        }
        if let Some(v) = self.batch_size {
            cfg.capt.optim.batch_size = v;
        }
        if let Some(v) = self.grad_pairs {
            cfg.trainer.grad_pairs = v;
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// The overrides as arguments (forwarded to child processes).
    fn forward(&self) -> Vec<String> {
        let mut v = Vec::new();
        let mut push = |k: &str, val: Option<String>| {
            if let Some(val) = val {
                v.push(k.to_string());
                v.push(val);
            }
        };
        push(
            "--config",
            self.config.as_ref().map(|p| p.display().to_string()),
        );
        push("--batch-size", self.batch_size.map(|x| x.to_string()));
        push("--grad-pairs", self.grad_pairs.map(|x| x.to_string()));
        v
    }
}

/// The frozen CLIP a command loads (fit, zeroshot, b2n).
#[derive(Args, Clone)]
struct BackboneArgs {
    /// CLIP checkpoint: HF folder, .safetensors, or PyTorch .pt/.bin (e.g. OpenAI's ViT-B-16.pt); or `tiny` (random test model).
    #[arg(long, value_name = "DIR|tiny")]
    backbone: String,
    /// For a checkpoint without a config (an open_clip or OpenAI state dict): the open_clip
    /// model name (ViT-B-16 = GELU, ViT-B-16-quickgelu = QuickGELU) or `openai`.
    #[arg(long, value_name = "NAME")]
    arch: Option<String>,
}

impl BackboneArgs {
    fn spec(&self) -> anyhow::Result<BackboneSpec> {
        Ok(BackboneSpec::parse(&self.backbone).with_arch(self.arch.as_deref())?)
    }
}

#[derive(Args, Clone)]
struct DeviceArgs {
    /// cpu, cuda or cuda:N (CUDA needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Backbone weight dtype: f32, f16 or bf16 (learned tensors stay f32).
    #[arg(long, default_value = "f32")]
    dtype: String,
}

#[derive(Args)]
struct FitCli {
    #[command(flatten)]
    data: DatasetArgs,
    #[command(flatten)]
    backbone: BackboneArgs,
    #[command(flatten)]
    cfg: ConfigArgs,
    /// Run seed (few-shot sampling, initialisation, batch order); default: first of data.seeds.
    #[arg(long)]
    seed: Option<u64>,
    /// Classes to train on: all, base (base-to-novel protocol) or new.
    #[arg(long, default_value = "all")]
    subsample: Subsample,
    /// Output folder (default runs/<dataset>/<method>/<subsample>-shots<K>-seed<S>).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Continue the checkpoint in --out (bit-exact with an uninterrupted run on CPU).
    #[arg(long)]
    resume: bool,
    /// Stop after this many epochs (resumable later with --resume).
    #[arg(long, value_name = "N")]
    stop_after: Option<usize>,
    /// Feature cache folder (default <out>/feature-cache); share it between runs.
    #[arg(long, value_name = "DIR")]
    feature_cache: Option<PathBuf>,
    /// Hide progress bars (also hidden when stderr is not a terminal).
    #[arg(long)]
    no_progress: bool,
    #[command(flatten)]
    device: DeviceArgs,
}

#[derive(Args)]
struct EvalCli {
    /// Checkpoint folder, or a run's --out folder (its LATEST checkpoint).
    #[arg(long, value_name = "DIR")]
    checkpoint: PathBuf,
    #[command(flatten)]
    data: DatasetArgs,
    /// train, val or test.
    #[arg(long, default_value = "test", value_parser = parse_split)]
    split: Split,
    /// all, base, new or b2n (both halves + HM); default b2n for a base-trained checkpoint.
    #[arg(long)]
    subsample: Option<EvalSubsample>,
    /// A report.json to compare with (confusable pairs, Correction Rate).
    #[arg(long, value_name = "REPORT.json")]
    baseline: Option<PathBuf>,
    /// Override the checkpoint's backbone path (must be the same weights).
    #[arg(long, value_name = "DIR|tiny")]
    backbone: Option<String>,
    /// Output folder (default <checkpoint>/../eval-<split>).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Hide progress bars (also hidden when stderr is not a terminal).
    #[arg(long)]
    no_progress: bool,
    #[command(flatten)]
    device: DeviceArgs,
}

#[derive(Args)]
struct ZeroshotCli {
    #[command(flatten)]
    data: DatasetArgs,
    #[command(flatten)]
    backbone: BackboneArgs,
    /// train, val or test.
    #[arg(long, default_value = "test", value_parser = parse_split)]
    split: Split,
    /// all, base, new or b2n (both halves + HM).
    #[arg(long, default_value = "all")]
    subsample: EvalSubsample,
    /// A report.json to compare with (confusable pairs, Correction Rate).
    #[arg(long, value_name = "REPORT.json")]
    baseline: Option<PathBuf>,
    /// Config (prompt.template, bank.local_grid, trainer.eval_batch).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Output folder (default eval-zeroshot-<split>).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Hide progress bars (also hidden when stderr is not a terminal).
    #[arg(long)]
    no_progress: bool,
    #[command(flatten)]
    device: DeviceArgs,
}

#[derive(Args)]
struct B2nCli {
    /// Comma-separated dataset names.
    #[arg(long, value_delimiter = ',', required = true)]
    datasets: Vec<DatasetKind>,
    /// Comma-separated run seeds.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    seeds: Vec<u64>,
    /// Comma-separated methods (see --method).
    #[arg(long, value_delimiter = ',', default_value = "zero-shot,coop,capt", value_parser = parse_method)]
    methods: Vec<Method>,
    /// CoOp's $DATA folder.
    #[arg(long, value_name = "DIR")]
    root: PathBuf,
    /// Split-file name for datasets with a split file, `{name}` = the part of CoOp's name
    /// after `split_zhou_` (e.g. `split_mini_{name}.json`); relative to each dataset folder.
    #[arg(long, value_name = "TEMPLATE")]
    split_file: Option<String>,
    #[command(flatten)]
    backbone: BackboneArgs,
    #[command(flatten)]
    cfg: ConfigArgs,
    /// Output folder: one run folder per dataset/method/seed, b2n.md and b2n.csv.
    #[arg(long, value_name = "DIR", default_value = "runs/b2n")]
    out: PathBuf,
    /// Hide progress bars (also hidden when stderr is not a terminal).
    #[arg(long)]
    no_progress: bool,
    #[command(flatten)]
    device: DeviceArgs,
}

#[derive(Args)]
struct BenchCli {
    #[command(subcommand)]
    what: BenchWhat,
}

#[derive(Subcommand)]
enum BenchWhat {
    /// ms/step and peak RSS of CoOp vs CAPT (random ViT-B/16 text tower, cached features).
    TrainStep(Box<TrainStepCli>),
    /// CLIP towers on --device/--dtype vs the CPU f32 reference (max deviation of the
    /// normalised features), and images/s of the image encoder there; one JSON line.
    Forward(ForwardCli),
}

#[derive(Args)]
struct ForwardCli {
    /// CLIP checkpoint (HF folder or .safetensors), `tiny`, or `b16` (random ViT-B/16 weights).
    #[arg(long, value_name = "DIR|tiny|b16")]
    backbone: String,
    /// Images (and prompts) per timed pass.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Timed passes after one warm-up pass.
    #[arg(long, default_value_t = 5)]
    iters: usize,
    #[command(flatten)]
    device: DeviceArgs,
}

#[derive(Args)]
struct TrainStepCli {
    #[arg(long, value_delimiter = ',', default_value = "10,100")]
    classes: Vec<usize>,
    /// Timed steps per configuration (after one warm-up step).
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// b16 (ViT-B/16 text tower) or tiny.
    #[arg(long, default_value = "b16")]
    size: String,
    #[command(flatten)]
    cfg: ConfigArgs,
    /// Also run tools/ref_train_step.py with this Python (torch) for the CoOp reference.
    #[arg(long, value_name = "PYTHON")]
    torch: Option<String>,
    #[arg(long, default_value = "tools/ref_train_step.py")]
    torch_script: String,
    /// Internal: measure CoOp and CAPT for this class count in this process.
    #[arg(long, hide = true)]
    child: Option<usize>,
    #[command(flatten)]
    device: DeviceArgs,
}

fn parse_split(s: &str) -> Result<Split, String> {
    match s {
        "train" => Ok(Split::Train),
        "val" => Ok(Split::Val),
        "test" => Ok(Split::Test),
        other => Err(format!("{other:?}: expected train, val or test")),
    }
}

fn main() -> ExitCode {
    {
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        tracing_subscriber::registry()
            .with(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
            )
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(progress::MakeStderr)
                    // No colour escapes in logs redirected to a file (demo, b2n runs).
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
            )
            // The same lines into each run folder's log.txt (progress::attach).
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(progress::RunLog::default()),
            )
            .init();
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Data(args) => data_cmd::run(args),
        Command::Fit(a) => run_fit(a),
        Command::Eval(a) => run_eval(a),
        Command::Zeroshot(a) => run_zeroshot(a),
        Command::B2n(a) => run_b2n(a),
        Command::Bench(BenchCli {
            what: BenchWhat::TrainStep(a),
        }) => run_bench(a),
        Command::Bench(BenchCli {
            what: BenchWhat::Forward(a),
        }) => run_bench_forward(a),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            if let Some(dir) = progress::last_dir() {
                progress::append_line(&dir, &format!("error: {err:#}"));
            }
            ExitCode::FAILURE
        }
    }
}

fn run_fit(a: FitCli) -> anyhow::Result<ExitCode> {
    progress::set_enabled(!a.no_progress);
    let config = a.cfg.load()?;
    let seed = a
        .seed
        .unwrap_or_else(|| config.capt.data.seeds.first().copied().unwrap_or(1));
    let out = a.out.unwrap_or_else(|| {
        PathBuf::from("runs")
            .join(a.data.dataset.name())
            .join(config.capt.method.name())
            .join(format!(
                "{}-shots{}-seed{seed}",
                a.subsample, config.capt.data.shots
            ))
    });
    let summary = fit::fit(&fit::FitArgs {
        dataset: a.data.dataset,
        root: a.data.root,
        split_file: a.data.split_file,
        config,
        backbone: a.backbone.spec()?,
        device: parse_device(&a.device.device)?,
        dtype: parse_dtype(&a.device.dtype)?,
        seed,
        subsample: a.subsample,
        out,
        resume: a.resume,
        stop_after: a.stop_after,
        feature_cache: a.feature_cache,
        progress: !a.no_progress,
    })?;
    let last = summary.logs.last();
    say(format!(
        "{} after {} epoch(s): checkpoint {}{}",
        if summary.finished {
            "finished"
        } else {
            "stopped"
        },
        summary.epochs_done,
        summary.checkpoint.display(),
        last.map_or(String::new(), |l| format!(
            " (train loss {:.4}, acc {:.1}%)",
            l.loss, l.acc
        ))
    ));
    Ok(ExitCode::SUCCESS)
}

fn print_report(r: &evaluate::Report, out: &std::path::Path) {
    for p in &r.parts {
        let cr = p
            .baseline
            .as_ref()
            .and_then(|b| b.correction_rate)
            .map_or(String::new(), |v| format!(", Correction Rate {v:.2}%"));
        say(format!(
            "{} {} classes: top-1 {:.2}%, macro-F1 {:.2}% on {} images{cr}",
            r.method, p.part, p.top1, p.macro_f1, p.images
        ));
    }
    if let (Some(b), Some(n), Some(h)) = (r.base, r.novel, r.hm) {
        say(format!("base {b:.2} / novel {n:.2} / HM {h:.2}"));
    }
    say(format!("report: {}", out.join("report.json").display()));
}

/// Prints a result line and keeps it in the run folder's log.txt.
fn say(line: String) {
    println!("{line}");
    if let Some(dir) = progress::last_dir() {
        progress::append_line(&dir, &line);
    }
}

fn run_eval(a: EvalCli) -> anyhow::Result<ExitCode> {
    progress::set_enabled(!a.no_progress);
    let (report, out) = evaluate::evaluate(&evaluate::EvalArgs {
        checkpoint: Some(a.checkpoint),
        dataset: a.data.dataset,
        root: a.data.root,
        split_file: a.data.split_file,
        split: a.split,
        subsample: a.subsample,
        baseline: a.baseline,
        backbone: a.backbone.as_deref().map(BackboneSpec::parse),
        device: parse_device(&a.device.device)?,
        dtype: parse_dtype(&a.device.dtype)?,
        out: a.out,
        config: RunConfig::default(),
    })?;
    print_report(&report, &out);
    Ok(ExitCode::SUCCESS)
}

fn run_zeroshot(a: ZeroshotCli) -> anyhow::Result<ExitCode> {
    progress::set_enabled(!a.no_progress);
    let config = match &a.config {
        Some(p) => RunConfig::from_toml_file(p)?,
        None => RunConfig::default(),
    };
    let (report, out) = evaluate::evaluate(&evaluate::EvalArgs {
        checkpoint: None,
        dataset: a.data.dataset,
        root: a.data.root,
        split_file: a.data.split_file,
        split: a.split,
        subsample: Some(a.subsample),
        baseline: a.baseline,
        backbone: Some(a.backbone.spec()?),
        device: parse_device(&a.device.device)?,
        dtype: parse_dtype(&a.device.dtype)?,
        out: a.out,
        config,
    })?;
    print_report(&report, &out);
    Ok(ExitCode::SUCCESS)
}

fn run_b2n(a: B2nCli) -> anyhow::Result<ExitCode> {
    progress::set_enabled(!a.no_progress);
    let config = a.cfg.load()?;
    b2n::run(&b2n::B2nArgs {
        datasets: a.datasets,
        seeds: a.seeds,
        methods: a.methods,
        root: a.root,
        split_file: a.split_file,
        config,
        backbone: a.backbone.spec()?,
        device: parse_device(&a.device.device)?,
        dtype: parse_dtype(&a.device.dtype)?,
        out: a.out,
        progress: !a.no_progress,
    })?;
    Ok(ExitCode::SUCCESS)
}

fn run_bench(a: Box<TrainStepCli>) -> anyhow::Result<ExitCode> {
    let config = a.cfg.load()?;
    let mut forward = a.cfg.forward();
    forward.extend(["--device".into(), a.device.device.clone()]);
    forward.extend(["--dtype".into(), a.device.dtype.clone()]);
    bench::run(&bench::BenchArgs {
        classes: a.classes,
        steps: a.steps.max(1),
        size: a.size,
        config,
        child: a.child,
        torch_python: a.torch,
        torch_script: a.torch_script,
        forward,
        device: parse_device(&a.device.device)?,
        dtype: parse_dtype(&a.device.dtype)?,
    })?;
    Ok(ExitCode::SUCCESS)
}

fn run_bench_forward(a: ForwardCli) -> anyhow::Result<ExitCode> {
    let report = bench::forward(&bench::ForwardArgs {
        backbone: a.backbone,
        device: parse_device(&a.device.device)?,
        dtype: parse_dtype(&a.device.dtype)?,
        batch: a.batch,
        iters: a.iters,
    })?;
    eprintln!(
        "{} on {} ({}): normalised features vs CPU f32 on {} inputs: image max |diff| {:.2e}, text {:.2e}; {:.1} images/s, {:.1} prompts/s at batch {}",
        report.backbone,
        report.device,
        report.dtype,
        report.compared,
        report.image_max_abs_diff,
        report.text_max_abs_diff,
        report.images_per_s,
        report.texts_per_s,
        report.batch
    );
    println!("{}", serde_json::to_string(&report)?);
    Ok(ExitCode::SUCCESS)
}
