//! A loaded dataset: its splits, class names, image folder and prompt template, and the
//! protocol applied to it.

use std::path::{Path, PathBuf};

use crate::catalog::{prompt_classname, DatasetKind, Layout};
use crate::datum::{Datum, Problem, Split, Splits};
use crate::error::{DataError, Result};
use crate::fsutil::join_rel;
use crate::protocol::{
    load_or_sample_fewshot, subsample_classes, CacheOutcome, FewShotCache, Protocol, Subsample,
};
use crate::readers::{self, LoadOptions};

#[derive(Debug, Clone)]
pub struct Dataset {
    pub kind: DatasetKind,
    /// Display name: CoOp's dataset name, or the folder name of a custom dataset.
    pub name: String,
    pub dataset_dir: PathBuf,
    /// `Datum::impath` is relative to this folder.
    pub image_dir: PathBuf,
    /// The split file or folder the splits came from.
    pub source: PathBuf,
    /// Default few-shot cache folder.
    pub fewshot_dir: PathBuf,
    pub splits: Splits,
    /// Class name per label (`0..num_classes`).
    pub classnames: Vec<String>,
    /// For each current label, the label it had in the full dataset (identity unless a
    /// base/new subset was taken).
    pub original_labels: Vec<usize>,
}

impl Dataset {
    /// Loads a dataset under the few-shot protocol (`shots` per class drawn with `seed`,
    /// `subsample` of the classes; nothing is written into the data folder). A label that no
    /// split row names is refused: it would become a class without a single image (named
    /// `class_<i>`) that a model could still predict.
    pub fn for_protocol(
        kind: DatasetKind,
        root: &Path,
        split_file: Option<&Path>,
        shots: usize,
        seed: u64,
        subsample: Subsample,
    ) -> Result<Self> {
        let opts = LoadOptions {
            split_file: split_file.map(Path::to_path_buf),
            ..LoadOptions::new(kind, root)
        };
        let ds = Self::load_with(&opts)?;
        let mut seen = vec![false; ds.classnames.len()];
        for d in ds.train().iter().chain(ds.val()).chain(ds.test()) {
            if let Some(s) = seen.get_mut(d.label) {
                *s = true;
            }
        }
        let empty: Vec<String> = seen
            .iter()
            .enumerate()
            .filter(|(_, s)| !**s)
            .map(|(l, _)| l.to_string())
            .collect();
        if !empty.is_empty() {
            return Err(DataError::ImagelessLabels(format!(
                    "{}: labels {} have no images in any split ({} classes); add their images or renumber \
                     the labels of the split file so every class has some (`capt-train data check` lists them)",
                    ds.name,
                    empty.join(", "),
                ds.classnames.len()
            )));
        }
        let mut p = Protocol::new(shots, seed as i64, subsample);
        p.cache = FewShotCache::Off;
        let (ds, _) = ds.with_protocol(&p)?;
        Ok(ds)
    }

    /// Reads a dataset, failing with every problem listed if any entry is bad.
    pub fn load(kind: DatasetKind, root: impl Into<PathBuf>) -> Result<Self> {
        Self::load_with(&LoadOptions::new(kind, root))
    }

    pub fn load_with(opts: &LoadOptions) -> Result<Self> {
        let (ds, problems) = Self::scan(opts)?;
        for p in problems.iter().filter(|p| !p.is_error()) {
            tracing::warn!("{}", p.message);
        }
        let errors: Vec<String> = problems
            .into_iter()
            .filter(Problem::is_error)
            .map(|p| p.message)
            .collect();
        if !errors.is_empty() {
            return Err(DataError::Invalid {
                source_path: ds.source,
                problems: errors,
            });
        }
        Ok(ds)
    }

    /// Reads what can be read and returns the problems instead of failing on them (for
    /// `data check`). Only unreadable structure (missing folder, split file, bad JSON) fails.
    /// Images are not opened here.
    pub fn scan(opts: &LoadOptions) -> Result<(Self, Vec<Problem>)> {
        let raw = readers::read(opts)?;
        let name = match opts.kind {
            DatasetKind::Custom => raw
                .dataset_dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "custom".into()),
            k => k.name().to_string(),
        };
        // A non-default split file gets its own few-shot folder so subsets never mix.
        let default_split = match opts.kind.layout() {
            Layout::SplitFile { split_file } => raw.dataset_dir.join(split_file) == raw.source,
            Layout::Custom => opts.split_file.is_none(),
            _ => true,
        };
        let fewshot_dir = if default_split {
            raw.dataset_dir.join("split_fewshot")
        } else {
            let stem = raw
                .source
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "custom".into());
            raw.dataset_dir.join(format!("split_fewshot_{stem}"))
        };
        let classnames = classnames_by_label(&raw.splits, raw.classnames);
        let original_labels = (0..classnames.len()).collect();
        Ok((
            Dataset {
                kind: opts.kind,
                name,
                dataset_dir: raw.dataset_dir,
                image_dir: raw.image_dir,
                source: raw.source,
                fewshot_dir,
                splits: raw.splits,
                classnames,
                original_labels,
            },
            raw.problems,
        ))
    }

    pub fn train(&self) -> &[Datum] {
        &self.splits.train
    }

    pub fn val(&self) -> &[Datum] {
        &self.splits.val
    }

    pub fn test(&self) -> &[Datum] {
        &self.splits.test
    }

    pub fn split(&self, split: Split) -> &[Datum] {
        self.splits.get(split)
    }

    pub fn num_classes(&self) -> usize {
        self.classnames.len()
    }

    pub fn image_path(&self, d: &Datum) -> PathBuf {
        join_rel(&self.image_dir, &d.impath)
    }

    pub fn template(&self) -> &'static str {
        self.kind.template()
    }

    /// Zero-shot prompts per label: the dataset template around the class name (with `_`
    /// replaced by spaces, as CoOp's prompt learners do).
    pub fn prompts(&self) -> Vec<String> {
        self.classnames
            .iter()
            .map(|c| self.template().replace("{}", &prompt_classname(c)))
            .collect()
    }

    /// Applies few-shot sampling (cached) then the base/new class subset, as CoOp's dataset
    /// constructors do. Returns the new dataset and whether the few-shot split was cached.
    pub fn with_protocol(&self, p: &Protocol) -> Result<(Self, CacheOutcome)> {
        let mut splits = self.splits.clone();
        let mut outcome = CacheOutcome::Disabled;
        if p.shots > 0 {
            let cache_dir = match &p.cache {
                FewShotCache::DatasetDir => Some(self.fewshot_dir.as_path()),
                FewShotCache::Dir(d) => Some(d.as_path()),
                FewShotCache::Off => None,
            };
            let val = self
                .kind
                .fewshot_val()
                .then_some(self.splits.val.as_slice());
            let (fs, o) = load_or_sample_fewshot(
                cache_dir,
                &self.splits.train,
                val,
                p.shots,
                p.seed,
                p.repeat,
            )?;
            splits.train = fs.train;
            if let Some(v) = fs.val {
                splits.val = v;
            }
            outcome = o;
        }
        let (mut sets, selected) =
            subsample_classes(p.subsample, &[&splits.train, &splits.val, &splits.test]);
        let test = sets.pop().expect("three sets");
        let val = sets.pop().expect("three sets");
        let train = sets.pop().expect("three sets");
        let (classnames, original_labels) = match p.subsample {
            crate::protocol::Subsample::All => {
                (self.classnames.clone(), self.original_labels.clone())
            }
            _ => (
                selected
                    .iter()
                    .map(|&l| self.classnames[l].clone())
                    .collect(),
                selected.iter().map(|&l| self.original_labels[l]).collect(),
            ),
        };
        Ok((
            Dataset {
                splits: Splits { train, val, test },
                classnames,
                original_labels,
                ..self.clone()
            },
            outcome,
        ))
    }

    /// Builds a dataset from lists already in memory (tests, programmatic use).
    pub fn from_splits(kind: DatasetKind, image_dir: impl Into<PathBuf>, splits: Splits) -> Self {
        let image_dir = image_dir.into();
        let classnames = classnames_by_label(&splits, None);
        Dataset {
            kind,
            name: kind.name().to_string(),
            dataset_dir: image_dir.clone(),
            source: image_dir.clone(),
            fewshot_dir: image_dir.join("split_fewshot"),
            image_dir,
            original_labels: (0..classnames.len()).collect(),
            splits,
            classnames,
        }
    }
}

/// Class names `0..=max label`: from the layout's own list when it has one, else from the
/// entries; labels without entries get `class_<label>` (reported as a warning by the reader).
fn classnames_by_label(splits: &Splits, declared: Option<Vec<String>>) -> Vec<String> {
    let from_entries = splits.label_names();
    let n_entries = from_entries.keys().next_back().map_or(0, |m| m + 1);
    let mut names = declared.unwrap_or_default();
    if names.len() < n_entries {
        names.resize(n_entries, String::new());
    }
    for (i, n) in names.iter_mut().enumerate() {
        if n.is_empty() {
            *n = from_entries
                .get(&i)
                .cloned()
                .unwrap_or_else(|| format!("class_{i}"));
        }
    }
    names
}
