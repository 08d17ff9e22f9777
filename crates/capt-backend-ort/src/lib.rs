//! ONNX Runtime engine. The runtime library is loaded at run time (`load-dynamic`): from
//! `--ort-lib`, else `ORT_DYLIB_PATH`, else the loader's usual paths; a missing or too old
//! library is an error naming what was tried and the fix, never a panic. The execution
//! provider (CPU, CUDA, TensorRT) is chosen at run time; a provider that cannot be used falls
//! back to CPU only when the caller allows it, and the provider actually used is logged.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use capt_backend::{
    check_batch, check_input_dims, check_io_names, Backend, BackendError, ClassifierOutput,
    ImageBatch, ModelDir, INPUT_NAME, LOGITS_NAME, PROBS_NAME,
};
use ort::ep::{ExecutionProvider, ExecutionProviderDispatch, TensorRT, CUDA};
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::session::Session;
use ort::value::{TensorElementType, TensorRef, ValueType};

const ENGINE: &str = "ort";
/// Environment variable naming the ONNX Runtime shared library (the same one `ort` reads).
pub const DYLIB_ENV: &str = "ORT_DYLIB_PATH";
/// Names tried through the dynamic loader's search path when nothing is configured.
const DEFAULT_NAMES: [&str; 2] = ["libonnxruntime.so", "libonnxruntime.so.1"];
const INSTALL_HINT: &str = "install it (`pip install onnxruntime==1.32.0`, or onnxruntime-gpu for CUDA/TensorRT) and pass --ort-lib or set ORT_DYLIB_PATH to .../onnxruntime/capi/libonnxruntime.so.*, or use --backend tract";

/// Where inference runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
    Cuda,
    TensorRt,
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda),
            "tensorrt" | "trt" => Ok(Self::TensorRt),
            other => Err(format!(
                "unknown device {other:?}; use cpu, cuda or tensorrt"
            )),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Cpu => "cpu",
            Self::Cuda => "cuda",
            Self::TensorRt => "tensorrt",
        })
    }
}

#[derive(Debug, Clone, Default)]
pub struct OrtOptions {
    /// Explicit path of libonnxruntime (`--ort-lib`); overrides `ORT_DYLIB_PATH`.
    pub lib: Option<PathBuf>,
    pub device: Device,
    /// GPU ordinal for CUDA/TensorRT.
    pub device_id: i32,
    /// Run on CPU when the requested provider cannot be used, instead of failing.
    pub allow_fallback: bool,
    /// Intra-op threads; 0 lets ONNX Runtime decide (one per physical core).
    pub threads: usize,
    /// Graph optimisation level of the session.
    pub optimization: OptLevel,
    /// Intra-op threads spin while waiting for work (ONNX Runtime's default: on). Off saves
    /// CPU on a box that serves little; on cuts latency.
    pub spinning: Option<bool>,
    /// `session.intra_op_thread_affinities`: logical processors per intra-op thread other
    /// than the caller, e.g. `"1;2"` for two extra threads on CPUs 1 and 2 (1-based, as
    /// ONNX Runtime numbers them).
    pub affinity: Option<String>,
    /// Keep ONNX Runtime's optimised graph in `<export>/.ort-cache/` (CPU sessions, when the
    /// directory is writable) and load it on the next start instead of optimising again.
    pub cache: bool,
}

/// Graph optimisation level (ONNX Runtime's `GraphOptimizationLevel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OptLevel {
    Disable,
    Basic,
    Extended,
    /// Everything, layout optimisations included (the default).
    #[default]
    All,
}

impl OptLevel {
    fn ort(self) -> GraphOptimizationLevel {
        match self {
            OptLevel::Disable => GraphOptimizationLevel::Disable,
            OptLevel::Basic => GraphOptimizationLevel::Level1,
            OptLevel::Extended => GraphOptimizationLevel::Level2,
            OptLevel::All => GraphOptimizationLevel::Level3,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            OptLevel::Disable => "disable",
            OptLevel::Basic => "basic",
            OptLevel::Extended => "extended",
            OptLevel::All => "all",
        }
    }
}

/// The loaded ONNX Runtime library (process-wide: a process holds one runtime and one environment).
#[derive(Debug, Clone)]
pub struct Runtime {
    pub lib: PathBuf,
    pub version: String,
    env: ort::environment::Environment,
}

static RUNTIME: OnceLock<Runtime> = OnceLock::new();
static RUNTIME_INIT: Mutex<()> = Mutex::new(());

/// The library path that would be tried first: `explicit`, else `ORT_DYLIB_PATH`.
pub fn configured_library(explicit: Option<&Path>) -> Option<PathBuf> {
    explicit.map(Path::to_path_buf).or_else(|| {
        std::env::var_os(DYLIB_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    })
}

/// Loads ONNX Runtime once per process and returns it; later calls return the same runtime
/// (a different `explicit` path is then ignored with a warning, as a process cannot hold two).
pub fn runtime(explicit: Option<&Path>) -> Result<Runtime, BackendError> {
    let _guard = RUNTIME_INIT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(rt) = RUNTIME.get() {
        if let Some(p) = explicit.filter(|p| *p != rt.lib) {
            tracing::warn!(requested = %p.display(), loaded = %rt.lib.display(), "ONNX Runtime already loaded in this process; keeping the loaded one");
        }
        return Ok(rt.clone());
    }
    let unavailable = |reason: String| BackendError::Unavailable {
        engine: ENGINE,
        reason,
    };
    let candidates: Vec<PathBuf> = match configured_library(explicit) {
        Some(p) => {
            if !p.is_file() {
                let source = if explicit.is_some() {
                    "--ort-lib"
                } else {
                    DYLIB_ENV
                };
                return Err(unavailable(format!(
                    "ONNX Runtime library {} (from {source}) does not exist; {INSTALL_HINT}",
                    p.display()
                )));
            }
            vec![p]
        }
        None => DEFAULT_NAMES.iter().map(PathBuf::from).collect(),
    };
    let mut tried = Vec::new();
    for cand in &candidates {
        match ort::init_from(cand) {
            Ok(builder) => {
                let env = builder.with_name("capt-edge").build().map_err(|e| {
                    unavailable(format!("cannot create the ONNX Runtime environment: {e}"))
                })?;
                let version = library_version(cand);
                let rt = Runtime {
                    lib: cand.clone(),
                    version,
                    env,
                };
                tracing::info!(lib = %rt.lib.display(), version = %rt.version, "loaded ONNX Runtime");
                let _ = RUNTIME.set(rt.clone());
                return Ok(rt);
            }
            Err(e @ ort::LoadDynamicError::BadVersion { .. }) => {
                return Err(unavailable(format!(
                    "{e}; capt-edge needs ONNX Runtime >= 1.31 ({INSTALL_HINT})"
                )))
            }
            Err(e) => tried.push(e.to_string()),
        }
    }
    Err(unavailable(format!(
        "no ONNX Runtime library found ({}); {INSTALL_HINT}",
        tried.join("; ")
    )))
}

/// The loaded library's own version string ("1.32.0"), from `OrtGetApiBase()->GetVersionString`.
fn library_version(lib: &Path) -> String {
    // SAFETY: `lib` was just loaded by `ort::init_from`, which checked that it exports
    // `OrtGetApiBase`; opening it again only bumps the loader's reference count. The version
    // string is a static NUL-terminated buffer owned by the library, which stays loaded.
    let version = unsafe {
        libloading::Library::new(lib).ok().and_then(|l| {
            let get: libloading::Symbol<unsafe extern "C" fn() -> *const ort::sys::OrtApiBase> =
                l.get(b"OrtGetApiBase").ok()?;
            let base = get();
            if base.is_null() {
                return None;
            }
            let s = ((*base).GetVersionString)();
            (!s.is_null()).then(|| std::ffi::CStr::from_ptr(s).to_string_lossy().into_owned())
        })
    };
    version.unwrap_or_else(|| "unknown version".into())
}

/// A loaded classifier session; created once, shared (ONNX Runtime sessions run one call at a
/// time through `&mut`, so concurrent callers queue on the mutex; the server batches anyway).
pub struct OrtBackend {
    session: Mutex<Session>,
    crop: usize,
    provider: &'static str,
    runtime: Runtime,
    threads: usize,
    cached: Option<Cached>,
}

impl OrtBackend {
    pub fn load(model: &ModelDir, opts: &OrtOptions) -> Result<Self, BackendError> {
        let runtime = runtime(opts.lib.as_deref())?;
        let path = model.classifier_path();
        let crop = model.manifest.preprocess.crop as usize;
        let cache =
            (opts.cache && opts.device == Device::Cpu && opts.optimization != OptLevel::Disable)
                .then(|| cache_path(model, &runtime, opts.optimization));
        let (session, provider, cached) = create_session(&runtime, &path, opts, cache.as_deref())?;
        check_contract(&session, &path, crop)?;
        tracing::info!(
            requested = %opts.device,
            provider,
            lib = %runtime.lib.display(),
            version = %runtime.version,
            optimization = opts.optimization.as_str(),
            spinning = ?opts.spinning,
            affinity = ?opts.affinity,
            cache = ?cached,
            "ort session ready; execution provider in use: {provider}"
        );
        Ok(Self {
            session: Mutex::new(session),
            crop,
            provider,
            runtime,
            threads: opts.threads,
            cached,
        })
    }

    /// How the optimised-graph cache served this load (`None`: cache off or not a CPU session).
    pub fn cache(&self) -> Option<Cached> {
        self.cached
    }

    /// The execution provider the session was created with, e.g. "CUDAExecutionProvider".
    pub fn provider(&self) -> &'static str {
        self.provider
    }

    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }
}

fn ep_list(device: Device, device_id: i32) -> Vec<ExecutionProviderDispatch> {
    match device {
        Device::Cpu => vec![],
        Device::Cuda => vec![CUDA::default()
            .with_device_id(device_id)
            .build()
            .error_on_failure()],
        Device::TensorRt => vec![
            TensorRT::default()
                .with_device_id(device_id)
                .build()
                .error_on_failure(),
            // Nodes TensorRT does not take run on CUDA, as ONNX Runtime recommends.
            CUDA::default().with_device_id(device_id).build(),
        ],
    }
}

fn provider_name(device: Device) -> &'static str {
    match device {
        Device::Cpu => "CPUExecutionProvider",
        Device::Cuda => CUDA::NAME,
        Device::TensorRt => TensorRT::NAME,
    }
}

/// Why `device` cannot be used with this library, if it cannot.
fn unavailable_reason(device: Device, rt: &Runtime) -> Option<String> {
    let available = match device {
        Device::Cpu => return None,
        Device::Cuda => CUDA::is_available(),
        Device::TensorRt => TensorRT::is_available(),
    };
    match available {
        Ok(true) => None,
        Ok(false) => Some(format!(
            "{} is not built into the ONNX Runtime at {} (a CPU-only build?); use the onnxruntime-gpu library",
            provider_name(device),
            rt.lib.display()
        )),
        Err(e) => Some(format!("cannot query execution providers: {e}")),
    }
}

/// Where the optimised graph of this export's classifier is kept: named by the classifier's
/// sha256, the runtime's version and the level, so a new export or runtime never reads a
/// stale one.
fn cache_path(model: &ModelDir, rt: &Runtime, level: OptLevel) -> PathBuf {
    let sha = &model.manifest.files.classifier.sha256;
    let version: String = rt
        .version
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '.')
        .collect();
    model.root.join(CACHE_DIR).join(format!(
        "classifier-{}-ort{version}-{}.onnx",
        &sha[..sha.len().min(16)],
        level.as_str()
    ))
}

/// The folder of an export that holds ONNX Runtime's optimised graphs.
pub const CACHE_DIR: &str = ".ort-cache";

/// How the session's graph was obtained with the cache on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cached {
    /// Loaded from the cache: no optimisation pass at this start.
    Hit,
    /// Optimised now and saved for the next start.
    Written,
    /// Optimised now; the cache could not be written (read-only directory, ...).
    NotWritten,
}

fn create_session(
    rt: &Runtime,
    path: &Path,
    opts: &OrtOptions,
    cache: Option<&Path>,
) -> Result<(Session, &'static str, Option<Cached>), BackendError> {
    let mut device = opts.device;
    if let Some(reason) = unavailable_reason(device, rt) {
        device = fall_back(opts, device, &reason)?;
    }
    // A cached graph is already optimised: load it with optimisation off. A cache that does
    // not load (truncated, from another machine's layout) is rebuilt.
    if let (Some(c), Device::Cpu) = (cache, device) {
        if c.is_file() {
            let plain = OrtOptions {
                optimization: OptLevel::Disable,
                ..opts.clone()
            };
            match try_session(rt, c, &plain, device, None) {
                Ok(s) => return Ok((s, provider_name(device), Some(Cached::Hit))),
                Err(e) => {
                    tracing::warn!(cache = %c.display(), "cached ONNX Runtime graph not usable ({e}); optimising again")
                }
            }
        }
    }
    let cache = cache.filter(|_| device == Device::Cpu);
    let tmp = cache.map(capt_core::fs::temp_sibling);
    match try_session(rt, path, opts, device, tmp.as_deref()) {
        Ok(s) => {
            let cached = match (cache, tmp) {
                (Some(c), Some(t)) => Some(commit_cache(&t, c)),
                _ => None,
            };
            Ok((s, provider_name(device), cached))
        }
        Err(reason) if device != Device::Cpu => {
            let device = fall_back(opts, device, &reason)?;
            try_session(rt, path, opts, device, None)
                .map(|s| (s, provider_name(device), None))
                .map_err(|reason| load_error(path, reason))
        }
        Err(reason) => Err(load_error(path, reason)),
    }
}

/// Moves the graph ONNX Runtime wrote at `tmp` into place (a reader sees the old cache or the
/// whole new one).
fn commit_cache(tmp: &Path, cache: &Path) -> Cached {
    if tmp.is_file() && std::fs::rename(tmp, cache).is_ok() {
        Cached::Written
    } else {
        let _ = std::fs::remove_file(tmp);
        tracing::info!(cache = %cache.display(), "ONNX Runtime's optimised graph not cached (folder not writable?)");
        Cached::NotWritten
    }
}

/// CPU when falling back is allowed, else the error that says how to proceed.
fn fall_back(opts: &OrtOptions, device: Device, reason: &str) -> Result<Device, BackendError> {
    if opts.allow_fallback {
        tracing::warn!(requested = %device, "{reason}; falling back to CPUExecutionProvider (--allow-fallback)");
        Ok(Device::Cpu)
    } else {
        Err(BackendError::Unavailable {
            engine: ENGINE,
            reason: format!(
                "--device {device} requested but {reason}; pass --allow-fallback to run on CPU instead, or --device cpu"
            ),
        })
    }
}

fn load_error(path: &Path, reason: String) -> BackendError {
    capt_backend::load_error(ENGINE, path, reason)
}

fn try_session(
    rt: &Runtime,
    path: &Path,
    opts: &OrtOptions,
    device: Device,
    save_optimized: Option<&Path>,
) -> Result<Session, String> {
    // SessionBuilder errors carry the builder and are !Send; keep only their message.
    let s = |e: ort::Error<SessionBuilder>| e.to_string();
    let mut builder = Session::builder(&rt.env)
        .map_err(|e| e.to_string())?
        .with_optimization_level(opts.optimization.ort())
        .map_err(s)?
        .with_inter_threads(1)
        .map_err(s)?;
    if opts.threads > 0 {
        builder = builder.with_intra_threads(opts.threads).map_err(s)?;
    }
    if let Some(spin) = opts.spinning {
        builder = builder.with_intra_op_spinning(spin).map_err(s)?;
    }
    if let Some(a) = &opts.affinity {
        builder = builder
            .with_config_entry("session.intra_op_thread_affinities", a)
            .map_err(s)?;
    }
    if let Some(p) = save_optimized {
        if let Some(dir) = p.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        builder = builder.with_optimized_model_path(p).map_err(s)?;
    }
    let eps = ep_list(device, opts.device_id);
    if !eps.is_empty() {
        builder = builder
            .with_execution_providers(eps)
            .map_err(|e| format!("cannot register {}: {e}", provider_name(device)))?;
    }
    builder.commit_from_file(path).map_err(|e| e.to_string())
}

fn check_contract(session: &Session, path: &Path, crop: usize) -> Result<(), BackendError> {
    let names =
        |v: &[ort::value::Outlet]| v.iter().map(|o| o.name().to_string()).collect::<Vec<_>>();
    check_io_names(path, &names(session.inputs()), &names(session.outputs()))?;
    let contract = |detail: String| BackendError::Contract {
        path: path.to_path_buf(),
        detail,
    };
    match session.inputs()[0].dtype() {
        ValueType::Tensor { ty, shape, .. } => {
            if *ty != TensorElementType::Float32 {
                return Err(contract(format!(
                    "input `{INPUT_NAME}` has element type {ty}, expected float32"
                )));
            }
            let dims: Vec<Option<i64>> = shape.iter().map(|&d| (d >= 0).then_some(d)).collect();
            check_input_dims(path, &dims, crop)?;
        }
        other => {
            return Err(contract(format!(
                "input `{INPUT_NAME}` is {other:?}, not a tensor"
            )))
        }
    }
    Ok(())
}

impl Backend for OrtBackend {
    fn name(&self) -> &'static str {
        ENGINE
    }

    fn describe(&self) -> String {
        let threads = match self.threads {
            0 => "default threads".to_string(),
            t => format!("{t} threads"),
        };
        format!(
            "onnxruntime {} ({}, {threads})",
            self.runtime.version, self.provider
        )
    }

    fn classify(&self, batch: &ImageBatch) -> Result<ClassifierOutput, BackendError> {
        check_batch(batch, self.crop)?;
        let run_err = |e: ort::Error| BackendError::Run {
            engine: ENGINE,
            reason: e.to_string(),
        };
        let input =
            TensorRef::from_array_view((batch.shape(), batch.data.as_slice())).map_err(run_err)?;
        let mut session = self.session.lock().unwrap_or_else(|e| e.into_inner());
        let outputs = session
            .run(ort::inputs![INPUT_NAME => input])
            .map_err(run_err)?;
        let take = |name: &str| -> Result<(Vec<usize>, Vec<f32>), BackendError> {
            let (shape, data) = outputs[name].try_extract_tensor::<f32>().map_err(run_err)?;
            Ok((
                shape.iter().map(|d| (*d).max(0) as usize).collect(),
                data.to_vec(),
            ))
        };
        ClassifierOutput::from_parts(ENGINE, batch.n, take(LOGITS_NAME)?, take(PROBS_NAME)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_parses() {
        assert_eq!("CUDA".parse::<Device>().unwrap(), Device::Cuda);
        assert_eq!("tensorrt".parse::<Device>().unwrap(), Device::TensorRt);
        assert!("tpu"
            .parse::<Device>()
            .unwrap_err()
            .contains("cpu, cuda or tensorrt"));
        assert_eq!(Device::TensorRt.to_string(), "tensorrt");
    }

    #[test]
    fn explicit_path_wins_over_env() {
        let p = configured_library(Some(Path::new("/x/libonnxruntime.so")));
        assert_eq!(p.unwrap(), PathBuf::from("/x/libonnxruntime.so"));
    }
}
