//! Feature cache for frozen image encoders. With the image tower frozen (the default:
//! no vision prompts), every training image's features depend only on the backbone, the
//! image bytes and the augmentation of each view, so N augmented views per image are
//! encoded once and stored, and CPU training never re-encodes an image.
//!
//! One safetensors file per (backbone, image content, views, augmentation):
//! `<dir>/<key[..2]>/<key>.safetensors` with `global` `[views, D]` and `local`
//! `[views, T, D]` (f32) and the key's parts in the metadata. Changing the backbone id or
//! the image bytes changes the key, so stale entries are never read. Writes are atomic.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use capt_core::{decode_image, ImageBatch};
use rayon::prelude::*;
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use sha2::{Digest, Sha256};

use crate::augment::{view_rng, TrainAugment};
use crate::datum::Datum;
use crate::error::{DataError, Result};
use crate::fsutil::join_rel;

const FORMAT: &str = "capt-feature-cache-v1";

/// Encoder output for a batch of `n` views: `global` `[n, dim]`, `local`
/// `[n, local_tokens, dim]`, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedViews {
    pub n: usize,
    pub dim: usize,
    pub local_tokens: usize,
    pub global: Vec<f32>,
    pub local: Vec<f32>,
}

/// A frozen image tower (the trainer implements it with candle; tests use a mock).
pub trait FrozenImageEncoder {
    /// Identifies the weights and preprocessing (e.g. `openai/ViT-B-16@sha256:<weights>`).
    /// Anything that changes the features must change this id.
    fn backbone_id(&self) -> String;
    fn encode(
        &self,
        batch: &ImageBatch,
    ) -> std::result::Result<EncodedViews, Box<dyn std::error::Error + Send + Sync>>;
}

#[derive(Debug, Clone)]
pub struct FeatureCacheConfig {
    pub dir: PathBuf,
    /// Augmented views per image.
    pub views: usize,
    pub aug_seed: u64,
    pub augment: TrainAugment,
    /// Images per encoder call (each contributes `views` rows).
    pub images_per_call: usize,
}

impl FeatureCacheConfig {
    pub fn new(
        dir: impl Into<PathBuf>,
        views: usize,
        aug_seed: u64,
        augment: TrainAugment,
    ) -> Self {
        Self {
            dir: dir.into(),
            views,
            aug_seed,
            augment,
            images_per_call: 8,
        }
    }
}

/// The cached views of one image.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageFeatures {
    pub views: usize,
    pub dim: usize,
    pub local_tokens: usize,
    /// `[views, dim]`
    pub global: Vec<f32>,
    /// `[views, local_tokens, dim]`
    pub local: Vec<f32>,
}

impl ImageFeatures {
    pub fn global_view(&self, v: usize) -> &[f32] {
        &self.global[v * self.dim..(v + 1) * self.dim]
    }

    pub fn local_view(&self, v: usize) -> &[f32] {
        let n = self.local_tokens * self.dim;
        &self.local[v * n..(v + 1) * n]
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Images served from disk.
    pub hits: usize,
    /// Distinct images encoded this run.
    pub encoded: usize,
    pub encode_calls: usize,
}

enum Lookup {
    Hit(String, ImageFeatures),
    Miss(Pending),
}

#[derive(Debug, Clone)]
pub struct FeatureCache {
    cfg: FeatureCacheConfig,
}

/// An image to encode; its bytes are re-read at encode time so memory stays bounded.
struct Pending {
    key: String,
    sha: String,
    path: PathBuf,
}

impl FeatureCache {
    pub fn new(cfg: FeatureCacheConfig) -> Result<Self> {
        if cfg.views == 0 || cfg.images_per_call == 0 {
            return Err(DataError::Config(
                "feature cache needs at least 1 view and 1 image per encoder call".into(),
            ));
        }
        Ok(Self { cfg })
    }

    pub fn config(&self) -> &FeatureCacheConfig {
        &self.cfg
    }

    /// Hex key of (format, backbone, image sha256, views, seed, augmentation parameters).
    pub fn key(&self, backbone: &str, image_sha256: &str) -> String {
        let a = &self.cfg.augment;
        let material = format!(
            "{FORMAT}\n{backbone}\n{image_sha256}\nviews={}\nseed={}\nsize={} scale={:?} ratio={:?} flip={} mean={:?} std={:?}",
            self.cfg.views, self.cfg.aug_seed, a.size, a.scale, a.ratio, a.flip_prob, a.normalize.mean, a.normalize.std
        );
        hex::encode(Sha256::digest(material.as_bytes()))
    }

    pub fn path_for(&self, key: &str) -> PathBuf {
        self.cfg
            .dir
            .join(&key[..2])
            .join(format!("{key}.safetensors"))
    }

    /// Features of every item (in order), encoding only images without a valid cache file.
    pub fn features(
        &self,
        encoder: &dyn FrozenImageEncoder,
        image_dir: &Path,
        items: &[Datum],
    ) -> Result<(Vec<ImageFeatures>, CacheStats)> {
        self.features_with_progress(encoder, image_dir, items, &mut |_, _| {})
    }

    /// [`Self::features`], calling `progress(done, to_encode)` after each encoded chunk (a cache
    /// hit costs nothing worth showing).
    pub fn features_with_progress(
        &self,
        encoder: &dyn FrozenImageEncoder,
        image_dir: &Path,
        items: &[Datum],
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<(Vec<ImageFeatures>, CacheStats)> {
        let backbone = encoder.backbone_id();
        // Hash every image (and load hits) in parallel.
        let looked_up: Vec<Result<Lookup>> = items
            .par_iter()
            .map(|d| {
                let path = join_rel(image_dir, &d.impath);
                let bytes = std::fs::read(&path).map_err(|e| DataError::Image {
                    entry: format!("{:?} (label {})", d.impath, d.label),
                    source: capt_core::PreprocessError::Io {
                        path: path.display().to_string(),
                        source: e,
                    },
                })?;
                let sha = hex::encode(Sha256::digest(&bytes));
                let key = self.key(&backbone, &sha);
                Ok(match self.load(&key, &backbone, &sha) {
                    Some(f) => Lookup::Hit(key, f),
                    None => Lookup::Miss(Pending { key, sha, path }),
                })
            })
            .collect();
        let mut keys = Vec::with_capacity(items.len());
        let mut found: HashMap<String, ImageFeatures> = HashMap::new();
        let mut pending: Vec<Pending> = Vec::new();
        let mut pending_keys: HashSet<String> = HashSet::new();
        let mut stats = CacheStats::default();
        for r in looked_up {
            match r? {
                Lookup::Hit(key, f) => {
                    stats.hits += 1;
                    keys.push(key.clone());
                    found.insert(key, f);
                }
                Lookup::Miss(p) => {
                    keys.push(p.key.clone());
                    // The same image listed twice is encoded once.
                    if pending_keys.insert(p.key.clone()) {
                        pending.push(p);
                    }
                }
            }
        }
        progress(0, pending.len());
        for chunk in pending.chunks(self.cfg.images_per_call) {
            let feats = self.encode_chunk(encoder, &backbone, chunk)?;
            stats.encode_calls += 1;
            stats.encoded += chunk.len();
            progress(stats.encoded, pending.len());
            for (p, f) in chunk.iter().zip(feats) {
                found.insert(p.key.clone(), f);
            }
        }
        let out = keys
            .iter()
            .map(|k| {
                found
                    .get(k)
                    .cloned()
                    .expect("every key was loaded or encoded")
            })
            .collect();
        Ok((out, stats))
    }

    fn encode_chunk(
        &self,
        encoder: &dyn FrozenImageEncoder,
        backbone: &str,
        chunk: &[Pending],
    ) -> Result<Vec<ImageFeatures>> {
        let views = self.cfg.views;
        let side = self.cfg.augment.size as usize;
        let per_image: Vec<Vec<f32>> = chunk
            .par_iter()
            .map(|p| {
                let entry = p.path.display().to_string();
                let bytes = std::fs::read(&p.path).map_err(|e| DataError::io(&p.path, e))?;
                if hex::encode(Sha256::digest(&bytes)) != p.sha {
                    return Err(DataError::Cache {
                        path: p.path.clone(),
                        reason: "the image changed while features were being cached; run again"
                            .into(),
                    });
                }
                let img = decode_image(&bytes, &entry)
                    .map_err(|source| DataError::Image { entry, source })?;
                // A view is a function of (seed, image content, view index) only.
                let stream = u64::from_str_radix(&p.sha[..16], 16).expect("hex digest");
                let mut data = Vec::with_capacity(views * capt_core::chw_len(side));
                for v in 0..views {
                    let mut rng = view_rng(self.cfg.aug_seed, stream, v as u64);
                    data.extend(self.cfg.augment.augment_chw(&img, &mut rng));
                }
                Ok(data)
            })
            .collect::<Result<_>>()?;
        let n = chunk.len() * views;
        let batch = ImageBatch {
            data: per_image.concat(),
            n,
            height: side,
            width: side,
        };
        let enc_err = |reason: String| DataError::Encoder {
            backbone: backbone.to_string(),
            reason,
        };
        let e = encoder.encode(&batch).map_err(|e| enc_err(e.to_string()))?;
        if e.n != n
            || e.global.len() != n * e.dim
            || e.local.len() != n * e.local_tokens * e.dim
            || e.dim == 0
        {
            return Err(enc_err(format!(
                "returned n={} dim={} tokens={} with {} global and {} local values for {n} views",
                e.n,
                e.dim,
                e.local_tokens,
                e.global.len(),
                e.local.len()
            )));
        }
        let (g_per, l_per) = (views * e.dim, views * e.local_tokens * e.dim);
        let mut out = Vec::with_capacity(chunk.len());
        for (i, p) in chunk.iter().enumerate() {
            let f = ImageFeatures {
                views,
                dim: e.dim,
                local_tokens: e.local_tokens,
                global: e.global[i * g_per..(i + 1) * g_per].to_vec(),
                local: e.local[i * l_per..(i + 1) * l_per].to_vec(),
            };
            self.store(&p.key, backbone, &p.sha, &f)?;
            out.push(f);
        }
        Ok(out)
    }

    fn store(&self, key: &str, backbone: &str, sha: &str, f: &ImageFeatures) -> Result<()> {
        let path = self.path_for(key);
        let bytes_of = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let (g, l) = (bytes_of(&f.global), bytes_of(&f.local));
        let cache_err = |reason: String| DataError::Cache {
            path: path.clone(),
            reason,
        };
        let tensors = vec![
            (
                "global",
                TensorView::new(Dtype::F32, vec![f.views, f.dim], &g)
                    .map_err(|e| cache_err(e.to_string()))?,
            ),
            (
                "local",
                TensorView::new(Dtype::F32, vec![f.views, f.local_tokens, f.dim], &l)
                    .map_err(|e| cache_err(e.to_string()))?,
            ),
        ];
        let meta = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("backbone".to_string(), backbone.to_string()),
            ("image_sha256".to_string(), sha.to_string()),
            ("views".to_string(), self.cfg.views.to_string()),
            ("aug_seed".to_string(), self.cfg.aug_seed.to_string()),
        ]);
        let bytes =
            safetensors::serialize(tensors, Some(meta)).map_err(|e| cache_err(e.to_string()))?;
        capt_core::fs::write_atomic(&path, &bytes).map_err(DataError::write(&path))
    }

    /// A valid cache entry, or `None` (absent, unreadable or not matching: re-encoded).
    fn load(&self, key: &str, backbone: &str, sha: &str) -> Option<ImageFeatures> {
        let path = self.path_for(key);
        let bytes = std::fs::read(&path).ok()?;
        match self.parse(&bytes, backbone, sha) {
            Ok(f) => Some(f),
            Err(why) => {
                tracing::warn!(path = %path.display(), "ignoring feature cache entry: {why}");
                None
            }
        }
    }

    fn parse(
        &self,
        bytes: &[u8],
        backbone: &str,
        sha: &str,
    ) -> std::result::Result<ImageFeatures, String> {
        let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| e.to_string())?;
        let m = meta.metadata().as_ref().ok_or("no metadata")?;
        let expect = [
            ("format", FORMAT.to_string()),
            ("backbone", backbone.to_string()),
            ("image_sha256", sha.to_string()),
            ("views", self.cfg.views.to_string()),
            ("aug_seed", self.cfg.aug_seed.to_string()),
        ];
        for (k, v) in expect {
            if m.get(k) != Some(&v) {
                return Err(format!("metadata {k} is {:?}, expected {v:?}", m.get(k)));
            }
        }
        let st = SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
        let read = |name: &str| -> std::result::Result<(Vec<usize>, Vec<f32>), String> {
            let t = st.tensor(name).map_err(|e| e.to_string())?;
            if t.dtype() != Dtype::F32 {
                return Err(format!("{name} is {:?}, expected F32", t.dtype()));
            }
            let v = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            Ok((t.shape().to_vec(), v))
        };
        let (gs, global) = read("global")?;
        let (ls, local) = read("local")?;
        if gs.len() != 2
            || ls.len() != 3
            || gs[0] != self.cfg.views
            || ls[0] != self.cfg.views
            || ls[2] != gs[1]
        {
            return Err(format!(
                "shapes global {gs:?} local {ls:?} do not match {} views",
                self.cfg.views
            ));
        }
        Ok(ImageFeatures {
            views: gs[0],
            dim: gs[1],
            local_tokens: ls[1],
            global,
            local,
        })
    }
}
