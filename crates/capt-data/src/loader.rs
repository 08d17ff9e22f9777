//! Batches for training and evaluation: images decoded and transformed in parallel
//! (rayon), train views augmented with per-(seed, epoch, item) generators so a run is
//! reproducible whatever the thread count.

use std::path::PathBuf;

use capt_core::{load_image, ImageBatch, PreprocessConfig};
use rand::seq::SliceRandom;
use rayon::prelude::*;

use crate::augment::{view_rng, TrainAugment};
use crate::datum::{Datum, Split};
use crate::error::{DataError, Result};
use crate::fsutil::join_rel;
use crate::Dataset;

/// How an image becomes a model input.
#[derive(Debug, Clone, PartialEq)]
pub enum Transform {
    /// The foundation's test-time preprocessing (resize shorter side, centre crop, normalise).
    Test(PreprocessConfig),
    Train(TrainAugment),
}

impl Transform {
    pub fn side(&self) -> u32 {
        match self {
            Transform::Test(c) => c.crop,
            Transform::Train(a) => a.size,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoaderConfig {
    pub batch_size: usize,
    pub shuffle: bool,
    /// Drop the last incomplete batch (Dassl does for training when the set holds at least
    /// one full batch).
    pub drop_last: bool,
    pub seed: u64,
}

/// One batch: NCHW images, labels, and the indices of the items in the loader's list.
#[derive(Debug, Clone)]
pub struct Batch {
    pub images: ImageBatch,
    pub labels: Vec<usize>,
    pub indices: Vec<usize>,
}

#[derive(Debug, Clone)]
pub struct DataLoader {
    image_dir: PathBuf,
    items: Vec<Datum>,
    transform: Transform,
    cfg: LoaderConfig,
}

/// Stream ids for `view_rng`: augmentation uses the epoch, shuffling this one minus epoch.
const SHUFFLE_STREAM: u64 = u64::MAX;

impl DataLoader {
    pub fn new(
        image_dir: impl Into<PathBuf>,
        items: Vec<Datum>,
        transform: Transform,
        cfg: LoaderConfig,
    ) -> Result<Self> {
        if cfg.batch_size == 0 {
            return Err(DataError::Config("batch size must be at least 1".into()));
        }
        Ok(Self {
            image_dir: image_dir.into(),
            items,
            transform,
            cfg,
        })
    }

    /// Shuffled, augmented training batches over the dataset's train split.
    pub fn train(
        ds: &Dataset,
        batch_size: usize,
        seed: u64,
        augment: TrainAugment,
    ) -> Result<Self> {
        let items = ds.train().to_vec();
        let drop_last = items.len() >= batch_size;
        Self::new(
            &ds.image_dir,
            items,
            Transform::Train(augment),
            LoaderConfig {
                batch_size,
                shuffle: true,
                drop_last,
                seed,
            },
        )
    }

    /// Ordered evaluation batches with the test transform.
    pub fn eval(
        ds: &Dataset,
        split: Split,
        batch_size: usize,
        preprocess: PreprocessConfig,
    ) -> Result<Self> {
        Self::new(
            &ds.image_dir,
            ds.split(split).to_vec(),
            Transform::Test(preprocess),
            LoaderConfig {
                batch_size,
                shuffle: false,
                drop_last: false,
                seed: 0,
            },
        )
    }

    pub fn items(&self) -> &[Datum] {
        &self.items
    }

    /// Batches per epoch.
    pub fn len(&self) -> usize {
        let n = self.items.len();
        if self.cfg.drop_last {
            n / self.cfg.batch_size
        } else {
            n.div_ceil(self.cfg.batch_size)
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Item order of an epoch.
    pub fn order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.items.len()).collect();
        if self.cfg.shuffle {
            order.shuffle(&mut view_rng(self.cfg.seed, SHUFFLE_STREAM - epoch, 0));
        }
        order
    }

    pub fn epoch(&self, epoch: u64) -> Batches<'_> {
        Batches {
            loader: self,
            order: self.order(epoch),
            pos: 0,
            epoch,
            left: self.len(),
        }
    }

    /// Decodes and transforms the given items in parallel. Errors name the entry and file.
    pub fn load_batch(&self, indices: &[usize], epoch: u64) -> Result<Batch> {
        let side = self.transform.side() as usize;
        let tensors: Vec<Vec<f32>> = indices
            .par_iter()
            .map(|&i| self.load_one(i, epoch))
            .collect::<Result<_>>()?;
        let mut data = Vec::with_capacity(tensors.len() * capt_core::chw_len(side));
        for t in tensors {
            data.extend_from_slice(&t);
        }
        Ok(Batch {
            images: ImageBatch {
                data,
                n: indices.len(),
                height: side,
                width: side,
            },
            labels: indices.iter().map(|&i| self.items[i].label).collect(),
            indices: indices.to_vec(),
        })
    }

    fn load_one(&self, i: usize, epoch: u64) -> Result<Vec<f32>> {
        let d = &self.items[i];
        let path = join_rel(&self.image_dir, &d.impath);
        let img = load_image(&path).map_err(|source| DataError::Image {
            entry: format!("{:?} (label {}, {:?})", d.impath, d.label, d.classname),
            source,
        })?;
        Ok(match &self.transform {
            Transform::Test(cfg) => cfg.preprocess(&img),
            Transform::Train(aug) => {
                aug.augment_chw(&img, &mut view_rng(self.cfg.seed, epoch, i as u64))
            }
        })
    }
}

pub struct Batches<'a> {
    loader: &'a DataLoader,
    order: Vec<usize>,
    pos: usize,
    epoch: u64,
    left: usize,
}

impl Iterator for Batches<'_> {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let end = (self.pos + self.loader.cfg.batch_size).min(self.order.len());
        let idx = &self.order[self.pos..end];
        self.pos = end;
        Some(self.loader.load_batch(idx, self.epoch))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl ExactSizeIterator for Batches<'_> {}
