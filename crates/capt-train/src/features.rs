//! Image features for training, bank passes and evaluation.
//!
//! With vision prompts off (the default) the image tower is frozen, so every training image
//! is encoded once in `V` augmented views through capt-data's [`FeatureCache`] (on disk, keyed
//! by backbone, image bytes and augmentation) and each epoch draws one view per image from the
//! run's seeded generator. With vision prompts on, images are decoded and augmented per step
//! and run through the prompted tower with gradients.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use capt_data::{
    DataLoader, Dataset, Datum, FeatureCache, FeatureCacheConfig, ImageFeatures, LoaderConfig,
    Split, TrainAugment, Transform,
};
use rand::Rng;

use crate::backbone::{batch_tensor, ImageEncoder};
use crate::error::Result;
use crate::model::{Feats, Model};
use crate::prompts::visual_name;
use crate::rng;

/// Loader "epochs" used for the bank's augmented views (far from real epochs).
const BANK_VIEW_EPOCH: u64 = 1 << 40;

pub enum TrainImages {
    Cached {
        feats: Vec<ImageFeatures>,
        labels: Vec<usize>,
        /// Views used for training (the cache may hold more for the bank).
        train_views: usize,
        /// `trainer.fresh_views`: epoch e uses view e of every image (a new random crop
        /// per image and epoch) instead of a draw from a small pool.
        fresh: bool,
    },
    Pixels {
        loader: DataLoader,
        labels: Vec<usize>,
    },
}

/// Training augmentation of a run.
pub fn train_augment(model: &Model) -> TrainAugment {
    let mut aug = TrainAugment::clip(model.backbone.config.vision.image_size as u32);
    let (lo, hi) = model.cfg.capt.data.crop_scale;
    aug.scale = (lo as f64, hi as f64);
    aug
}

impl TrainImages {
    /// Prepares the training images of `ds`: cached features (encoding what the cache lacks)
    /// or a pixel loader when vision prompts are learned.
    pub fn prepare(model: &Model, ds: &Dataset, cache_dir: &Path, seed: u64) -> Result<Self> {
        let items: Vec<Datum> = ds.train().to_vec();
        let labels: Vec<usize> = items.iter().map(|d| d.label).collect();
        let aug = train_augment(model);
        let aug_seed = rng::rng(seed, rng::stream::AUGMENT, 0).random::<u64>();
        if model.uses_vision_prompts() {
            let loader = DataLoader::new(
                &ds.image_dir,
                items,
                Transform::Train(aug),
                LoaderConfig {
                    batch_size: model.cfg.capt.optim.batch_size,
                    shuffle: false,
                    drop_last: false,
                    seed: aug_seed,
                },
            )?;
            return Ok(TrainImages::Pixels { loader, labels });
        }
        let fresh = model.cfg.trainer.fresh_views;
        let train_views = if fresh {
            model.cfg.capt.optim.epochs
        } else {
            model.cfg.train_views()
        };
        let views = train_views.max(if model.head.is_some() {
            model.cfg.capt.bank.views
        } else {
            1
        });
        let encoder = ImageEncoder::new(&model.backbone, model.cfg.capt.bank.local_grid)?;
        let cache = FeatureCache::new(FeatureCacheConfig::new(cache_dir, views, aug_seed, aug))?;
        let started = std::time::Instant::now();
        let bar = crate::progress::bar(true, items.len(), "caching image features");
        let (feats, stats) =
            cache.features_with_progress(&encoder, &ds.image_dir, &items, &mut |done, total| {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
            })?;
        bar.finish_and_clear();
        tracing::info!(
            images = items.len(),
            views,
            cached = stats.hits,
            encoded = stats.encoded,
            seconds = started.elapsed().as_secs_f32(),
            dir = %cache_dir.display(),
            "training image features ready"
        );
        Ok(TrainImages::Cached {
            feats,
            labels,
            train_views,
            fresh,
        })
    }

    pub fn len(&self) -> usize {
        self.labels().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn labels(&self) -> &[usize] {
        match self {
            TrainImages::Cached { labels, .. } | TrainImages::Pixels { labels, .. } => labels,
        }
    }

    /// Features of training images `indices` in `epoch` (one view each); with vision prompts
    /// and `grad`, gradients reach the prompts.
    pub fn batch(
        &self,
        model: &Model,
        indices: &[usize],
        epoch: usize,
        grad: bool,
    ) -> Result<Feats> {
        match self {
            TrainImages::Cached {
                feats,
                train_views,
                fresh,
                ..
            } => {
                if *fresh {
                    let v = epoch % *train_views;
                    let pick: Vec<(usize, usize)> = indices.iter().map(|&i| (i, v)).collect();
                    return gather(feats, &pick, &model.backbone.device, model.backbone.work);
                }
                let mut r = rng::rng(model_seed(model), rng::stream::VIEWS, epoch as u64);
                // One draw per image of the set (not per batch), so a view depends only on
                // (seed, epoch, image).
                let choice: Vec<usize> = (0..feats.len())
                    .map(|_| r.random_range(0..*train_views))
                    .collect();
                let pick: Vec<(usize, usize)> = indices.iter().map(|&i| (i, choice[i])).collect();
                gather(feats, &pick, &model.backbone.device, model.backbone.work)
            }
            TrainImages::Pixels { loader, .. } => {
                let b = loader.load_batch(indices, epoch as u64)?;
                encode_pixels(
                    model,
                    &batch_tensor(&b.images, &model.backbone.device)?,
                    grad,
                )
            }
        }
    }

    /// Every training image in each of the bank's `A` views, in chunks of about `chunk`
    /// rows: `(samples, labels, feats)` per chunk (image index and label of each row),
    /// images in order, views inner.
    pub fn bank_views(
        &self,
        model: &Model,
        chunk: usize,
        mut f: impl FnMut(&[usize], &[usize], &Feats) -> Result<()>,
    ) -> Result<()> {
        let a = model.cfg.capt.bank.views;
        let n = self.len();
        let per = (chunk / a).max(1);
        let labels = self.labels();
        let mut start = 0;
        while start < n {
            let end = (start + per).min(n);
            let mut rows = Vec::new();
            let mut lab = Vec::new();
            let mut samples = Vec::new();
            for (i, &y) in labels.iter().enumerate().take(end).skip(start) {
                for v in 0..a {
                    rows.push((i, v));
                    lab.push(y);
                    samples.push(i);
                }
            }
            let feats = match self {
                TrainImages::Cached { feats, .. } => {
                    gather(feats, &rows, &model.backbone.device, model.backbone.work)?
                }
                TrainImages::Pixels { loader, .. } => {
                    let mut parts = Vec::new();
                    for v in 0..a {
                        let idx: Vec<usize> = (start..end).collect();
                        let b = loader.load_batch(&idx, BANK_VIEW_EPOCH + v as u64)?;
                        parts.push(encode_pixels(
                            model,
                            &batch_tensor(&b.images, &model.backbone.device)?,
                            false,
                        )?);
                    }
                    // Reorder from view-major to image-major (images in order, views inner).
                    let g = Tensor::stack(
                        &parts.iter().map(|p| p.global.clone()).collect::<Vec<_>>(),
                        1,
                    )?;
                    let l = Tensor::stack(
                        &parts.iter().map(|p| p.local.clone()).collect::<Vec<_>>(),
                        1,
                    )?;
                    let (ni, nv, d) = g.dims3()?;
                    let (_, _, gt, _) = l.dims4()?;
                    Feats {
                        global: g.reshape((ni * nv, d))?,
                        local: l.reshape((ni * nv, gt, d))?,
                    }
                }
            };
            f(&samples, &lab, &feats)?;
            start = end;
        }
        Ok(())
    }
}

fn model_seed(model: &Model) -> u64 {
    model.seed
}

/// Rows `(image, view)` of cached features as tensors.
fn gather(
    feats: &[ImageFeatures],
    pick: &[(usize, usize)],
    dev: &Device,
    work: DType,
) -> Result<Feats> {
    let first = &feats[pick.first().map(|p| p.0).unwrap_or(0)];
    let (d, g) = (first.dim, first.local_tokens);
    let mut gl = Vec::with_capacity(pick.len() * d);
    let mut lo = Vec::with_capacity(pick.len() * g * d);
    for &(i, v) in pick {
        gl.extend_from_slice(feats[i].global_view(v));
        lo.extend_from_slice(feats[i].local_view(v));
    }
    Ok(Feats {
        global: Tensor::from_vec(gl, (pick.len(), d), dev)?.to_dtype(work)?,
        local: Tensor::from_vec(lo, (pick.len(), g, d), dev)?.to_dtype(work)?,
    })
}

/// Runs the (prompted) vision tower on pixels; gradients reach the visual prompts with `grad`.
pub fn encode_pixels(model: &Model, pixels: &Tensor, grad: bool) -> Result<Feats> {
    let vision = model.backbone.vision()?;
    let pool = model.image_pool()?;
    let prompts = if model.uses_vision_prompts() {
        let layers = (0..model.cfg.capt.prompt.vision_depth)
            .map(|k| model.params.get_grad(&visual_name(k), grad))
            .collect::<Result<Vec<_>>>()?;
        Some(capt_clip::VisualPrompts { layers })
    } else {
        None
    };
    let (global, local) = ImageEncoder::forward(vision, &pool, pixels, prompts.as_ref())?;
    Ok(Feats { global, local })
}

/// Streams a split through the model's image side with the test transform: `f(labels, feats)`
/// per batch of `batch` images.
pub fn for_each_eval_batch(
    model: &Model,
    ds: &Dataset,
    split: Split,
    batch: usize,
    mut f: impl FnMut(&[usize], &Feats) -> Result<()>,
) -> Result<()> {
    let size = model.backbone.config.vision.image_size as u32;
    let loader = DataLoader::eval(ds, split, batch, capt_core::PreprocessConfig::clip(size))?;
    let bar = crate::progress::bar(true, loader.len(), format!("encoding {} {split}", ds.name));
    for b in loader.epoch(0) {
        let b = b?;
        let pixels = batch_tensor(&b.images, &model.backbone.device)?;
        let feats = encode_pixels(model, &pixels, false)?;
        f(&b.labels, &feats)?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(())
}
