//! Picks and loads a backend for a model directory: validates the directory, creates the
//! session once, warms it up (which also checks the class count) and reports what runs.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use capt_backend::{warm_up, Backend, BackendError, ModelDir};
use capt_backend_tract::{TractBackend, TractOptions};

/// Which inference engine to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum BackendKind {
    /// tract: pure Rust, embedded, CPU.
    #[default]
    Tract,
    /// ONNX Runtime, loaded at run time (--ort-lib / ORT_DYLIB_PATH).
    Ort,
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Tract => "tract",
            Self::Ort => "ort",
        })
    }
}

/// Where to run (ONNX Runtime execution provider; tract is CPU only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum DeviceKind {
    #[default]
    Cpu,
    Cuda,
    Tensorrt,
}

/// Engine settings shared by every subcommand.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct EngineArgs {
    /// Inference engine.
    #[arg(long, env = "CAPT_EDGE_BACKEND", value_enum, default_value_t = BackendKind::Tract)]
    pub backend: BackendKind,
    /// Compute threads (0: all cores for tract, ONNX Runtime's default for ort).
    #[arg(long, env = "CAPT_EDGE_THREADS", default_value_t = 0)]
    pub threads: usize,
    /// Execution device (ort only): cpu, cuda or tensorrt.
    #[arg(long, env = "CAPT_EDGE_DEVICE", value_enum, default_value_t = DeviceKind::Cpu)]
    pub device: DeviceKind,
    /// GPU ordinal for cuda/tensorrt.
    #[arg(long, env = "CAPT_EDGE_DEVICE_ID", default_value_t = 0)]
    pub device_id: i32,
    /// Run on CPU if the requested device cannot be used, instead of failing.
    #[arg(long, env = "CAPT_EDGE_ALLOW_FALLBACK")]
    pub allow_fallback: bool,
    /// tract: batch sizes > 1 also compiled for their exact shape (each costs a copy of the
    /// packed weights); others run image by image, side by side across threads, on the batch-1
    /// plan, which measured faster on ViT-B/16 (b8: 1556 ms vs 1995 ms with a b8 plan).
    #[arg(long, env = "CAPT_EDGE_TRACT_FIXED_BATCH", value_delimiter = ',')]
    pub tract_fixed_batch: Vec<usize>,
    /// Path of libonnxruntime.so (>= 1.31); default: ORT_DYLIB_PATH, then the loader's paths.
    #[arg(long, env = "CAPT_EDGE_ORT_LIB", value_name = "PATH")]
    pub ort_lib: Option<PathBuf>,
    /// ort: graph optimisation level.
    #[arg(long, env = "CAPT_EDGE_ORT_OPT_LEVEL", value_enum, default_value_t = OrtOptLevel::All, value_name = "LEVEL")]
    pub ort_opt_level: OrtOptLevel,
    /// ort: intra-op threads spin while waiting for work (on: lower latency; off: less idle
    /// CPU). Default: ONNX Runtime's (on).
    #[arg(long, env = "CAPT_EDGE_ORT_SPINNING", value_name = "on|off", value_parser = parse_on_off)]
    pub ort_spinning: Option<bool>,
    /// ort: CPUs of the intra-op threads other than the caller, ONNX Runtime's
    /// `session.intra_op_thread_affinities` syntax (1-based), e.g. "2;3" with --threads 3.
    #[arg(long, env = "CAPT_EDGE_ORT_AFFINITY", value_name = "LIST")]
    pub ort_affinity: Option<String>,
    /// ort: do not keep ONNX Runtime's optimised graph in <model>/.ort-cache/ (by default it
    /// is written on the first CPU start when the folder is writable, and loaded after).
    #[arg(long, env = "CAPT_EDGE_NO_ORT_CACHE")]
    pub no_ort_cache: bool,
}

/// ONNX Runtime's graph optimisation levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum OrtOptLevel {
    Disable,
    Basic,
    Extended,
    #[default]
    All,
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" | "true" | "1" => Ok(true),
        "off" | "false" | "0" => Ok(false),
        _ => Err(format!("`{s}`: expected on or off")),
    }
}

/// A loaded model ready to classify.
pub struct Engine {
    pub model: ModelDir,
    pub backend: Arc<dyn Backend>,
    /// Seconds to open, validate, load and warm up.
    pub load_seconds: f64,
}

impl Engine {
    pub fn load(dir: &Path, args: &EngineArgs) -> Result<Self, BackendError> {
        let t = Instant::now();
        let model = ModelDir::open(dir)?;
        let backend: Arc<dyn Backend> = match args.backend {
            BackendKind::Tract => {
                if model.manifest.precision == capt_backend::Precision::Int8
                    && cfg!(target_arch = "x86_64")
                {
                    tracing::warn!(
                        "{} is an int8-compute export: tract runs it slower than the f32 export on \
                         x86 (docs/export.md); on x86 serve it with --backend ort",
                        dir.display()
                    );
                }
                if args.device != DeviceKind::Cpu {
                    return Err(BackendError::Unavailable {
                        engine: "tract",
                        reason: "tract runs on the CPU only; use --backend ort --device cuda|tensorrt for a GPU".into(),
                    });
                }
                Arc::new(TractBackend::load(
                    &model,
                    &TractOptions {
                        threads: args.threads,
                        fixed_batches: args.tract_fixed_batch.clone(),
                    },
                )?)
            }
            BackendKind::Ort => load_ort(&model, args)?,
        };
        warm_up(backend.as_ref(), &model)?;
        let load_seconds = t.elapsed().as_secs_f64();
        tracing::info!(
            model = %model.manifest.model_name,
            version = %model.version(),
            classes = model.manifest.class_names.len(),
            backend = %backend.describe(),
            load_seconds,
            "model loaded"
        );
        Ok(Self {
            model,
            backend,
            load_seconds,
        })
    }
}

#[cfg(feature = "ort")]
fn load_ort(model: &ModelDir, args: &EngineArgs) -> Result<Arc<dyn Backend>, BackendError> {
    use capt_backend_ort::{Device, OptLevel, OrtBackend, OrtOptions};
    let device = match args.device {
        DeviceKind::Cpu => Device::Cpu,
        DeviceKind::Cuda => Device::Cuda,
        DeviceKind::Tensorrt => Device::TensorRt,
    };
    let opts = OrtOptions {
        lib: args.ort_lib.clone(),
        device,
        device_id: args.device_id,
        allow_fallback: args.allow_fallback,
        threads: args.threads,
        optimization: match args.ort_opt_level {
            OrtOptLevel::Disable => OptLevel::Disable,
            OrtOptLevel::Basic => OptLevel::Basic,
            OrtOptLevel::Extended => OptLevel::Extended,
            OrtOptLevel::All => OptLevel::All,
        },
        spinning: args.ort_spinning,
        affinity: args.ort_affinity.clone(),
        cache: !args.no_ort_cache,
    };
    Ok(Arc::new(OrtBackend::load(model, &opts)?))
}

#[cfg(not(feature = "ort"))]
fn load_ort(_: &ModelDir, _: &EngineArgs) -> Result<Arc<dyn Backend>, BackendError> {
    Err(BackendError::Unavailable {
        engine: "ort",
        reason: "this capt-edge was built without the `ort` feature; rebuild with `--features ort` or use --backend tract".into(),
    })
}
