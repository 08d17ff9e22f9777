//! The frozen CLIP backbone of a run: loading (a checkpoint path, or `tiny` = seeded random
//! weights of `ClipConfig::tiny()`), its identity (sha256), the tokenizer and the id map into
//! the model's vocabulary, and the frozen image encoder behind capt-data's feature cache.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use capt_clip::{expected_tensors, ClipConfig, ClipModel, ClipTextTower, ClipVisionTower, Mode};
use capt_core::tokenizer::CONTEXT_LENGTH;
use capt_core::{ClipTokenizer, ImageBatch};
use capt_data::{EncodedViews, FrozenImageEncoder};
use sha2::{Digest, Sha256};

use crate::error::{Result, TrainError};
use crate::rng;

pub use capt_clip::BackboneSpec;

/// Seed of the `tiny` backbone's weights (fixed, so every run shares one tiny backbone).
pub const TINY_SEED: u64 = 0x7157;

pub use capt_checkpoint::BackboneRecord;

/// Maps tokenizer ids into the model's vocabulary. Real CLIP checkpoints have the
/// tokenizer's 49,408 entries (identity). Small test models (`tiny`, vocab 600) fold ids:
/// SOT -> V-2, EOT -> V-1 (still the row maximum, where CLIP pools), others -> id mod (V-2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenMap {
    vocab: usize,
    fold: bool,
}

impl TokenMap {
    pub fn new(tokenizer: &ClipTokenizer, model_vocab: usize) -> Result<Self> {
        let fold = model_vocab < tokenizer.vocab_size();
        if fold && model_vocab < 3 {
            return Err(TrainError::Config(format!(
                "text vocabulary of {model_vocab} tokens cannot hold SOT, EOT and text"
            )));
        }
        if fold {
            tracing::warn!(
                model_vocab,
                tokenizer_vocab = tokenizer.vocab_size(),
                "model vocabulary is smaller than the CLIP tokenizer's: token ids are folded (test models only)"
            );
        }
        Ok(Self {
            vocab: model_vocab,
            fold,
        })
    }

    /// The folding rule is `capt_model::tokens::map_token`'s (the exported text encoder's).
    pub fn map(&self, id: u32) -> u32 {
        if self.fold {
            capt_model::tokens::map_token(id, self.vocab)
        } else {
            id
        }
    }
}

/// Tokenized texts, truncated to the longest EOT position + 1 + `room` (room for context
/// tokens spliced after SOT). Under CLIP's causal mask positions after EOT never reach the
/// pooled token, so the result equals the 77-token computation while costing far less.
#[derive(Debug, Clone)]
pub struct TokenRows {
    /// U32 `[n, L]`, model-vocabulary ids.
    pub ids: Tensor,
    pub eot: Vec<usize>,
}

/// The frozen backbone.
#[derive(Debug, Clone)]
pub struct Backbone {
    pub text: ClipTextTower,
    /// `None` for text-only models (benchmarks).
    pub vision: Option<ClipVisionTower>,
    /// `logit_scale` (0-dim) in the working dtype.
    pub logit_scale: Tensor,
    /// Working float dtype of everything the trainer computes: F64 for F64 weights (gradient
    /// checks), else F32 (f16/bf16 weights compute the towers in their dtype, the rest in F32).
    pub work: DType,
    pub config: ClipConfig,
    pub record: BackboneRecord,
    pub tokenizer: ClipTokenizer,
    pub tokens: TokenMap,
    pub device: Device,
}

impl Backbone {
    pub fn load(spec: &BackboneSpec, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_with_config(spec, None, dtype, device)
    }

    /// [`Self::load`] with the architecture known already (a checkpoint's recorded
    /// `backbone.config`: a run reloads its backbone as it trained on it, `--arch` included).
    pub fn load_with_config(
        spec: &BackboneSpec,
        config: Option<&ClipConfig>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let Some(r) = spec.resolve()? else {
            return Self::random(&ClipConfig::tiny(), TINY_SEED, true, dtype, device);
        };
        let (p, recorded) = (r.path, r.recorded);
        let opts = capt_clip::LoadOptions {
            config,
            arch: r.arch.as_deref(),
        };
        let model = ClipModel::load_with(&p, &opts, dtype, device)?;
        let sha256 = capt_clip::backbone_hash(&p)?;
        let config = model.config().clone();
        Self::from_model(model, recorded, sha256, config, device)
    }

    fn from_model(
        model: ClipModel,
        path: String,
        sha256: String,
        config: ClipConfig,
        device: &Device,
    ) -> Result<Self> {
        let tokenizer = ClipTokenizer::bundled()?;
        let tokens = TokenMap::new(&tokenizer, config.text.vocab_size)?;
        let work = work_dtype(model.text.dtype());
        let logit_scale = model.logit_scale().to_dtype(work)?;
        Ok(Self {
            work,
            text: model.text.clone(),
            vision: Some(model.vision.clone()),
            logit_scale,
            record: BackboneRecord {
                path,
                sha256,
                config: config.clone(),
            },
            config,
            tokenizer,
            tokens,
            device: device.clone(),
        })
    }

    /// Random weights for `cfg` from `seed` (each tensor its own stream): LayerNorm weights 1,
    /// biases 0, embeddings N(0, 0.02), class embedding N(0, 1/W), other weights
    /// N(0, 1/fan_in), `logit_scale` = `cfg.logit_scale_init`. `with_vision = false` builds
    /// the text tower only (benchmarks).
    pub fn random(
        cfg: &ClipConfig,
        seed: u64,
        with_vision: bool,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let mut hasher = Sha256::new();
        hasher.update(b"capt-random-clip-v1\n");
        hasher.update(
            serde_json::to_string(cfg)
                .expect("config serialises")
                .as_bytes(),
        );
        hasher.update(seed.to_le_bytes());
        let mut tensors = HashMap::new();
        for (name, shape) in expected_tensors(cfg) {
            if !with_vision
                && (name.starts_with("vision_model.") || name == "visual_projection.weight")
            {
                continue;
            }
            let data = random_tensor(&name, &shape, cfg, seed);
            let t = Tensor::from_vec(data, shape.as_slice(), device)?.to_dtype(dtype)?;
            tensors.insert(name, t);
        }
        let sha256 = hex::encode(hasher.finalize());
        let vb = VarBuilder::from_tensors(tensors, dtype, device);
        let path = if *cfg == ClipConfig::tiny() && seed == TINY_SEED {
            "tiny".to_string()
        } else {
            format!("random:{seed}")
        };
        if with_vision {
            let model = ClipModel::new(vb, cfg)?;
            return Self::from_model(model, path, sha256, cfg.clone(), device);
        }
        let text = ClipTextTower::new(vb.clone(), cfg)?;
        let work = work_dtype(dtype);
        let logit_scale = vb.get((), "logit_scale")?.to_dtype(work)?;
        let tokenizer = ClipTokenizer::bundled()?;
        let tokens = TokenMap::new(&tokenizer, cfg.text.vocab_size)?;
        Ok(Self {
            work,
            text,
            vision: None,
            logit_scale,
            record: BackboneRecord {
                path,
                sha256,
                config: cfg.clone(),
            },
            config: cfg.clone(),
            tokenizer,
            tokens,
            device: device.clone(),
        })
    }

    pub fn dim(&self) -> usize {
        self.config.projection_dim
    }

    pub fn text_width(&self) -> usize {
        self.config.text.hidden_size
    }

    pub fn vision(&self) -> Result<&ClipVisionTower> {
        self.vision
            .as_ref()
            .ok_or_else(|| TrainError::Config("this backbone has no vision tower".into()))
    }

    /// Refuses a checkpoint trained on another backbone.
    pub fn check_matches(&self, trained: &BackboneRecord, checkpoint: &Path) -> Result<()> {
        if trained.sha256 != self.record.sha256 {
            return Err(TrainError::BackboneMismatch {
                checkpoint: checkpoint.to_path_buf(),
                trained_path: trained.path.clone(),
                trained_sha: trained.sha256.clone(),
                given_path: self.record.path.clone(),
                given_sha: self.record.sha256.clone(),
            });
        }
        Ok(())
    }

    /// Token embeddings of a phrase without SOT/EOT (context initialisation).
    pub fn phrase_embeddings(&self, phrase: &str) -> Result<Tensor> {
        let ids: Vec<u32> = self
            .tokenizer
            .token_ids_of_phrase(phrase)?
            .into_iter()
            .map(|i| self.tokens.map(i))
            .collect();
        let n = ids.len();
        let ids = Tensor::from_vec(ids, (1, n), &self.device)?;
        Ok(self
            .text
            .token_embedding(&ids)?
            .squeeze(0)?
            .to_dtype(self.work)?)
    }

    /// Tokenizes `texts` (`SOT text EOT`), truncated to the longest EOT + 1 + `room`.
    pub fn tokenize(&self, texts: &[String], room: usize) -> Result<TokenRows> {
        let ids = texts
            .iter()
            .map(|t| self.tokenizer.encode(t))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        self.rows_from_ids(&ids, room)
    }

    /// Rows from `SOT .. EOT` id lists (tokenizer ids): over-long lists are cut to the context
    /// length with EOT last (as `open_clip.tokenize`), then every row is padded with 0 to the
    /// longest EOT + 1 + `room` (capped at the context length) and mapped into the model vocab.
    pub fn rows_from_ids(&self, lists: &[Vec<u32>], room: usize) -> Result<TokenRows> {
        let ctx = self.text.context_length().min(CONTEXT_LENGTH);
        let eot: Vec<usize> = lists.iter().map(|r| r.len().min(ctx).max(1) - 1).collect();
        let longest = eot.iter().copied().max().unwrap_or(0);
        let l = (longest + 1 + room).min(ctx);
        let mut ids = Vec::with_capacity(lists.len() * l);
        for (row, &e) in lists.iter().zip(&eot) {
            // Tokens before EOT, EOT (kept when the row was cut), then padding.
            ids.extend(row[..e].iter().map(|&t| self.tokens.map(t)));
            ids.push(self.tokens.map(self.tokenizer.eot()));
            ids.extend(std::iter::repeat_n(0, l - e - 1));
        }
        Ok(TokenRows {
            ids: Tensor::from_vec(ids, (lists.len(), l), &self.device)?,
            eot,
        })
    }

    /// Plain (no learned context) text features `[n, D]` (working dtype), without gradients, in
    /// chunks of `chunk` texts.
    pub fn encode_texts(&self, texts: &[String], chunk: usize) -> Result<Tensor> {
        let mut out = Vec::new();
        for part in texts.chunks(chunk.max(1)) {
            let rows = self.tokenize(part, 0)?;
            out.push(self.text.forward_ids(&rows.ids)?.to_dtype(self.work)?);
        }
        Ok(Tensor::cat(&out, 0)?)
    }
}

/// F64 weights compute in F64 (gradient checks); everything else in F32.
pub fn work_dtype(weights: DType) -> DType {
    if weights == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

fn random_tensor(name: &str, shape: &[usize], cfg: &ClipConfig, seed: u64) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let is_norm =
        name.contains("layer_norm") || name.contains("layrnorm") || name.contains("layernorm");
    if name == "logit_scale" {
        return vec![cfg.logit_scale_init as f32];
    }
    if name.ends_with(".bias") {
        return vec![0.0; n];
    }
    if is_norm {
        return vec![1.0; n];
    }
    let std = if name.contains("embedding") && !name.contains("patch_embedding") {
        if name.ends_with("class_embedding") {
            (shape[0] as f64).powf(-0.5)
        } else {
            0.02
        }
    } else {
        let fan_in: usize = shape[1..].iter().product::<usize>().max(1);
        (fan_in as f64).powf(-0.5)
    };
    rng::normal(
        &mut rng::rng(seed, rng::stream::BACKBONE, rng::name_id(name)),
        n,
        std,
    )
}

/// The frozen vision tower as capt-data's [`FrozenImageEncoder`]: global features and local
/// tokens average-pooled to `grid x grid` (torch `adaptive_avg_pool2d` bins).
pub struct ImageEncoder {
    vision: ClipVisionTower,
    pool: Tensor,
    grid: usize,
    id: String,
    /// Images per forward pass (bounds memory).
    pub chunk: usize,
}

impl ImageEncoder {
    pub fn new(backbone: &Backbone, grid: usize) -> Result<Self> {
        let mut vision = backbone.vision()?.clone();
        vision.set_mode(Mode::Fast);
        let g = backbone.config.vision.grid_size();
        let pool = capt_graph::adaptive_pool_matrix((g, g), (grid, grid)).map_err(|e| {
            TrainError::Config(format!(
                "bank.local_grid = {grid}: {e}; the backbone has a {g}x{g} patch grid"
            ))
        })?;
        let pool = pool.to_candle(&backbone.device, backbone.work)?;
        Ok(Self {
            vision,
            pool,
            grid,
            id: format!(
                "{}@sha256:{}|local_grid={grid}",
                backbone.record.path, backbone.record.sha256
            ),
            chunk: 32,
        })
    }

    pub fn local_tokens(&self) -> usize {
        self.grid * self.grid
    }

    /// `pixels [B, 3, H, W]` to `(global [B, D], pooled local [B, G, D])` in `pool`'s dtype. With visual
    /// prompts given, gradients flow to them.
    pub fn forward(
        vision: &ClipVisionTower,
        pool: &Tensor,
        pixels: &Tensor,
        prompts: Option<&capt_clip::VisualPrompts>,
    ) -> Result<(Tensor, Tensor)> {
        let out = vision.forward(pixels, prompts)?;
        let global = out.global.to_dtype(pool.dtype())?;
        let local = pool.broadcast_matmul(&out.local.to_dtype(pool.dtype())?)?;
        Ok((global, local))
    }

    pub fn pool(&self) -> &Tensor {
        &self.pool
    }

    /// Encodes a batch of images in chunks: `(global [n, D], local [n, G, D])`.
    pub fn encode_pixels(&self, pixels: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = pixels.dim(0)?;
        let (mut gs, mut ls) = (Vec::new(), Vec::new());
        let mut start = 0;
        while start < n {
            let len = self.chunk.min(n - start);
            let (g, l) = Self::forward(
                &self.vision,
                &self.pool,
                &pixels.narrow(0, start, len)?,
                None,
            )?;
            gs.push(g);
            ls.push(l);
            start += len;
        }
        Ok((Tensor::cat(&gs, 0)?, Tensor::cat(&ls, 0)?))
    }
}

/// `ImageBatch` (NCHW floats) to a tensor on `device`.
pub fn batch_tensor(batch: &ImageBatch, device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_slice(
        &batch.data,
        (batch.n, 3, batch.height, batch.width),
        device,
    )?)
}

impl FrozenImageEncoder for ImageEncoder {
    fn backbone_id(&self) -> String {
        self.id.clone()
    }

    fn encode(
        &self,
        batch: &ImageBatch,
    ) -> std::result::Result<EncodedViews, Box<dyn std::error::Error + Send + Sync>> {
        let pixels = batch_tensor(batch, self.pool.device())?;
        let (g, l) = self.encode_pixels(&pixels)?;
        let (n, dim) = g.dims2()?;
        Ok(EncodedViews {
            n,
            dim,
            local_tokens: self.local_tokens(),
            global: g.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?,
            local: l.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?,
        })
    }
}

/// Parses `--device`: `cpu`, `cuda` or `cuda:N` (CUDA needs the `cuda` cargo feature).
pub fn parse_device(s: &str) -> Result<Device> {
    if s == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match s.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| {
                TrainError::Config(format!("--device {s:?}: expected cpu, cuda or cuda:N"))
            })?,
        None => {
            return Err(TrainError::Config(format!(
                "--device {s:?}: expected cpu, cuda or cuda:N"
            )))
        }
    };
    cuda_device(ordinal, s)
}

/// CUDA version of the toolkit this binary was built with (`CUDARC_CUDA_VERSION`, e.g.
/// `13000`, as tools/cuda-env.sh sets it), as `(major, minor)`.
#[cfg(feature = "cuda")]
fn built_cuda_version() -> Option<(i32, i32)> {
    let v: i32 = option_env!("CUDARC_CUDA_VERSION")?.parse().ok()?;
    Some((v / 1000, (v % 1000) / 10))
}

#[cfg(feature = "cuda")]
fn cuda_device(ordinal: usize, s: &str) -> Result<Device> {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    // The driver is asked first so that a stub library, a machine without a GPU or a driver
    // older than the toolkit gets one line naming the library and the versions, not the first
    // kernel launch's error. (The `DriverError` code is printed by name: its Display asks the
    // driver for a string, which a stub cannot give.)
    if let Err(e) = result::init() {
        let why = match e.0 {
            sys::CUresult::CUDA_ERROR_STUB_LIBRARY => {
                "the libcuda.so.1 found is NVIDIA's link stub, not a driver: put the driver's \
                 library first on LD_LIBRARY_PATH (or run on a machine with the NVIDIA driver)"
                    .to_string()
            }
            sys::CUresult::CUDA_ERROR_NO_DEVICE => "no CUDA GPU is visible (nvidia-smi lists \
                 none, or CUDA_VISIBLE_DEVICES hides them)"
                .to_string(),
            code => format!("cuInit failed with {code:?}"),
        };
        return Err(TrainError::Config(format!(
            "--device {s}: NVIDIA driver (libcuda.so.1): {why}"
        )));
    }
    let mut v = 0i32;
    // SAFETY: cuDriverGetVersion writes one int through the pointer it is given.
    let code = unsafe { sys::cuDriverGetVersion(&mut v) };
    if code != sys::CUresult::CUDA_SUCCESS {
        return Err(TrainError::Config(format!(
            "--device {s}: NVIDIA driver (libcuda.so.1): cuDriverGetVersion failed with {code:?}"
        )));
    }
    let driver = (v / 1000, (v % 1000) / 10);
    if let Some(built) = built_cuda_version() {
        if driver < built {
            return Err(TrainError::Config(format!(
                "--device {s}: NVIDIA driver (libcuda.so.1) supports CUDA {}.{}, but this \
                 capt-train was built with CUDA {}.{} and the driver cannot load its kernels: \
                 update the driver, or rebuild with an older toolkit (CAPT_CUDA=12.8 bash \
                 tools/build-cuda.sh; see tools/cuda-env.sh)",
                driver.0, driver.1, built.0, built.1
            )));
        }
    }
    Device::new_cuda(ordinal).map_err(|e| {
        TrainError::Config(format!(
            "--device {s}: cannot open GPU {ordinal} (driver CUDA {}.{}): {e}",
            driver.0, driver.1
        ))
    })
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(_ordinal: usize, s: &str) -> Result<Device> {
    Err(TrainError::Config(format!(
        "--device {s}: this capt-train was built without CUDA; build the CUDA one with \
         `bash tools/build-cuda.sh` (toolkit from PyPI, no GPU needed to build) or \
         `cargo build --release -p capt-train --features cuda` where a CUDA toolkit is installed"
    )))
}

/// Parses `--dtype` (backbone weights; the learned tensors stay F32): f32, f16, bf16.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        other => Err(TrainError::Config(format!(
            "--dtype {other:?}: expected f32, f16 or bf16"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_flags_parse_or_say_how_to_fix() {
        assert!(matches!(parse_device("cpu"), Ok(Device::Cpu)));
        for bad in ["gpu", "cuda:", "cuda:x", "cuda0"] {
            let e = parse_device(bad).unwrap_err().to_string();
            assert!(e.contains("expected cpu, cuda or cuda:N"), "{bad}: {e}");
        }
        // Without the `cuda` feature a well-formed CUDA device names the feature to build.
        #[cfg(not(feature = "cuda"))]
        for ok in ["cuda", "cuda:1"] {
            let e = parse_device(ok).unwrap_err().to_string();
            assert!(
                e.contains("--features cuda") && e.contains("tools/build-cuda.sh"),
                "{ok}: {e}"
            );
        }
        assert_eq!(parse_dtype("bf16").unwrap(), DType::BF16);
        assert!(parse_dtype("f64").is_err());
    }
}
