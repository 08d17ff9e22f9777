//! CoOp's evaluation protocol: seeded few-shot sampling (Dassl's
//! `generate_fewshot_dataset`), its `split_fewshot/shot_K-seed_S.json` cache, and the
//! base-to-novel class split (`subsample_classes`).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::datum::Datum;
use crate::error::{DataError, Result};
use crate::pyrandom::PyRandom;
use crate::split_file::{parse_rows, read_json_object, to_pretty_json};

/// Which classes to keep (`DATASET.SUBSAMPLE_CLASSES`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Subsample {
    All,
    /// The first `ceil(C / 2)` labels of the sorted training labels.
    Base,
    /// The remaining labels ("new" in CoOp).
    New,
}

impl FromStr for Subsample {
    type Err = DataError;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "all" => Ok(Subsample::All),
            "base" => Ok(Subsample::Base),
            "new" | "novel" => Ok(Subsample::New),
            _ => Err(DataError::Config(format!(
                "subsample {s:?} is not one of all, base, new"
            ))),
        }
    }
}

impl fmt::Display for Subsample {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Subsample::All => "all",
            Subsample::Base => "base",
            Subsample::New => "new",
        })
    }
}

/// Where the few-shot subsets are cached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FewShotCache {
    /// `<dataset>/split_fewshot/` as CoOp (a non-default split file gets
    /// `split_fewshot_<file stem>/` so the two never mix).
    DatasetDir,
    Dir(PathBuf),
    Off,
}

/// Few-shot + class-subset settings of one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Protocol {
    /// Shots per class; 0 keeps every training image (CoOp: `NUM_SHOTS < 1`).
    pub shots: usize,
    pub seed: i64,
    pub subsample: Subsample,
    pub cache: FewShotCache,
    /// Dassl's `repeat`: classes with fewer than `shots` images are filled by sampling with
    /// replacement. Off by default, as in current Dassl: such classes keep all their images.
    pub repeat: bool,
}

impl Protocol {
    pub fn new(shots: usize, seed: i64, subsample: Subsample) -> Self {
        Self {
            shots,
            seed,
            subsample,
            cache: FewShotCache::DatasetDir,
            repeat: false,
        }
    }
}

/// Groups items by label in first-appearance order (Dassl's `split_dataset_by_label`, a
/// `defaultdict` whose iteration order is insertion order).
pub fn split_by_label(items: &[Datum]) -> Vec<(usize, Vec<Datum>)> {
    let mut order: Vec<(usize, Vec<Datum>)> = Vec::new();
    let mut pos: BTreeMap<usize, usize> = BTreeMap::new();
    for d in items {
        let i = *pos.entry(d.label).or_insert_with(|| {
            order.push((d.label, Vec::new()));
            order.len() - 1
        });
        order[i].1.push(d.clone());
    }
    order
}

/// Dassl's `generate_fewshot_dataset` on one list, consuming `rng` exactly as
/// `random.sample` / `random.choices` do. `shots == 0` returns the items unchanged.
pub fn generate_fewshot(
    items: &[Datum],
    shots: usize,
    repeat: bool,
    rng: &mut PyRandom,
) -> Vec<Datum> {
    if shots == 0 {
        return items.to_vec();
    }
    let mut out = Vec::new();
    for (_, group) in split_by_label(items) {
        if group.len() >= shots {
            out.extend(rng.sample(&group, shots).expect("k <= n checked"));
        } else if repeat {
            out.extend(rng.choices(&group, shots));
        } else {
            out.extend(group);
        }
    }
    out
}

/// The few-shot train and val lists of one (shots, seed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FewShot {
    pub train: Vec<Datum>,
    /// `None` when the dataset does not sample val (ImageNet).
    pub val: Option<Vec<Datum>>,
}

/// CoOp's order: `random.seed(seed)`, then train with `shots`, then val with `min(shots, 4)`
/// from the same stream.
pub fn sample_fewshot(
    train: &[Datum],
    val: Option<&[Datum]>,
    shots: usize,
    seed: i64,
    repeat: bool,
) -> FewShot {
    let mut rng = PyRandom::seed(seed);
    let train = generate_fewshot(train, shots, repeat, &mut rng);
    let val = val.map(|v| generate_fewshot(v, shots.min(4), repeat, &mut rng));
    FewShot { train, val }
}

pub fn fewshot_cache_file(dir: &Path, shots: usize, seed: i64) -> PathBuf {
    dir.join(format!("shot_{shots}-seed_{seed}.json"))
}

/// Whether a few-shot subset came from the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    Loaded,
    Sampled,
    /// Sampled, but the cache could not be written (read-only data folder); logged.
    SampledNotSaved,
    Disabled,
}

/// Loads `shot_K-seed_S.json` from `cache_dir` if present (checking that every entry belongs
/// to the given lists), else samples and writes it.
pub fn load_or_sample_fewshot(
    cache_dir: Option<&Path>,
    train: &[Datum],
    val: Option<&[Datum]>,
    shots: usize,
    seed: i64,
    repeat: bool,
) -> Result<(FewShot, CacheOutcome)> {
    if train.is_empty() {
        return Err(DataError::Empty {
            what: "the train split".into(),
        });
    }
    let Some(dir) = cache_dir else {
        return Ok((
            sample_fewshot(train, val, shots, seed, repeat),
            CacheOutcome::Disabled,
        ));
    };
    let path = fewshot_cache_file(dir, shots, seed);
    if path.is_file() {
        let fs = read_fewshot_cache(&path, train, val, shots)?;
        tracing::info!(path = %path.display(), "loaded few-shot split");
        return Ok((fs, CacheOutcome::Loaded));
    }
    let fs = sample_fewshot(train, val, shots, seed, repeat);
    let mut lists: Vec<(&str, &[Datum])> = vec![("train", &fs.train)];
    if let Some(v) = &fs.val {
        lists.push(("val", v));
    }
    match capt_core::fs::write_atomic(&path, &to_pretty_json(&lists)) {
        Ok(()) => {
            tracing::info!(path = %path.display(), "saved few-shot split");
            Ok((fs, CacheOutcome::Sampled))
        }
        Err(e) => {
            tracing::warn!("few-shot split not cached: {e}");
            Ok((fs, CacheOutcome::SampledNotSaved))
        }
    }
}

fn read_fewshot_cache(
    path: &Path,
    train: &[Datum],
    val: Option<&[Datum]>,
    shots: usize,
) -> Result<FewShot> {
    let obj = read_json_object(path)?;
    let name = path.display().to_string();
    let stale = |reason: String| DataError::StaleFewShot {
        path: path.to_path_buf(),
        reason,
    };
    let read_list = |key: &str, full: &[Datum], k: usize| -> Result<Vec<Datum>> {
        let value = obj
            .get(key)
            .ok_or_else(|| stale(format!("it has no {key:?} list")))?;
        let (rows, problems) = parse_rows(value, &name, key);
        if let Some(p) = problems.first() {
            return Err(stale(p.message.clone()));
        }
        let known: HashSet<&Datum> = full.iter().collect();
        if let Some((i, d)) = rows.iter().enumerate().find(|(_, d)| !known.contains(d)) {
            return Err(stale(format!(
                "{key}[{i}] {:?} (label {}, {:?}) is not in the {key} split",
                d.impath, d.label, d.classname
            )));
        }
        let mut per_label: BTreeMap<usize, usize> = BTreeMap::new();
        for d in &rows {
            *per_label.entry(d.label).or_default() += 1;
        }
        if let Some((label, n)) = per_label.iter().find(|(_, &n)| n > k) {
            return Err(stale(format!(
                "{key} has {n} images of label {label}, more than {k} shots"
            )));
        }
        Ok(rows)
    };
    let train = read_list("train", train, shots)?;
    let val = match val {
        Some(v) => Some(read_list("val", v, shots.min(4))?),
        None => None,
    };
    Ok(FewShot { train, val })
}

/// The sorted training labels split CoOp's way: the first `ceil(C / 2)` are base.
pub fn base_new_labels(train: &[Datum]) -> (Vec<usize>, Vec<usize>) {
    let labels: Vec<usize> = train
        .iter()
        .map(|d| d.label)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let m = labels.len().div_ceil(2);
    (labels[..m].to_vec(), labels[m..].to_vec())
}

/// CoOp's `subsample_classes`: the classes are decided on `sets[0]` (the few-shot train
/// set); every set keeps the selected labels, relabelled `0..` in sorted order. Returns the
/// new sets and the selected original labels (new label `i` was `selected[i]`).
pub fn subsample_classes(subsample: Subsample, sets: &[&[Datum]]) -> (Vec<Vec<Datum>>, Vec<usize>) {
    let Some(first) = sets.first() else {
        return (Vec::new(), Vec::new());
    };
    let selected = match subsample {
        Subsample::All => {
            let all: BTreeSet<usize> = sets
                .iter()
                .flat_map(|s| s.iter().map(|d| d.label))
                .collect();
            return (
                sets.iter().map(|s| s.to_vec()).collect(),
                all.into_iter().collect(),
            );
        }
        Subsample::Base => base_new_labels(first).0,
        Subsample::New => base_new_labels(first).1,
    };
    let relabel: BTreeMap<usize, usize> = selected
        .iter()
        .enumerate()
        .map(|(new, &old)| (old, new))
        .collect();
    let out = sets
        .iter()
        .map(|s| {
            s.iter()
                .filter_map(|d| {
                    relabel.get(&d.label).map(|&label| Datum {
                        impath: d.impath.clone(),
                        label,
                        classname: d.classname.clone(),
                    })
                })
                .collect()
        })
        .collect();
    (out, selected)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(per_class: &[usize]) -> Vec<Datum> {
        let mut v = Vec::new();
        // Interleave classes so first-appearance order differs from label order.
        let max = per_class.iter().copied().max().unwrap_or(0);
        for i in 0..max {
            for (c, &n) in per_class.iter().enumerate().rev() {
                if i < n {
                    v.push(Datum::new(format!("c{c}/{i}.jpg"), c, format!("class{c}")));
                }
            }
        }
        v
    }

    #[test]
    fn fewshot_counts_no_duplicates_and_deterministic() {
        let data = items(&[30, 3, 200, 16]);
        let a = sample_fewshot(&data, Some(&data), 16, 1, false);
        let b = sample_fewshot(&data, Some(&data), 16, 1, false);
        let c = sample_fewshot(&data, Some(&data), 16, 2, false);
        assert_eq!(a, b);
        assert_ne!(a.train, c.train);
        let mut per: BTreeMap<usize, usize> = BTreeMap::new();
        for d in &a.train {
            *per.entry(d.label).or_default() += 1;
        }
        assert_eq!(per, BTreeMap::from([(0, 16), (1, 3), (2, 16), (3, 16)]));
        let uniq: HashSet<&Datum> = a.train.iter().collect();
        assert_eq!(uniq.len(), a.train.len());
        assert_eq!(a.val.as_ref().unwrap().len(), 4 + 3 + 4 + 4);
        // Groups follow first appearance: class 3 appears first in `items`.
        assert_eq!(a.train[0].label, 3);
    }

    #[test]
    fn repeat_fills_small_classes_with_replacement() {
        let data = items(&[2]);
        let mut rng = PyRandom::seed(1);
        let out = generate_fewshot(&data, 5, true, &mut rng);
        assert_eq!(out.len(), 5);
    }

    #[test]
    fn base_new_split_sizes_and_relabel() {
        let data = items(&[1; 37]);
        let (b, n) = base_new_labels(&data);
        assert_eq!((b.len(), n.len()), (19, 18));
        let test = items(&[2; 37]);
        let (sets, sel) = subsample_classes(Subsample::New, &[&data, &test]);
        assert_eq!(sel, (19..37).collect::<Vec<_>>());
        assert_eq!(sets[1].len(), 36);
        assert!(sets[1].iter().all(|d| d.label < 18));
        let d = sets[1].iter().find(|d| d.classname == "class19").unwrap();
        assert_eq!(d.label, 0);
    }

    #[test]
    fn cache_roundtrip_and_stale_detection() {
        let dir = tempfile::tempdir().unwrap();
        let data = items(&[10, 10]);
        let (a, o1) =
            load_or_sample_fewshot(Some(dir.path()), &data, Some(&data), 4, 3, false).unwrap();
        let (b, o2) =
            load_or_sample_fewshot(Some(dir.path()), &data, Some(&data), 4, 3, false).unwrap();
        assert_eq!((o1, o2), (CacheOutcome::Sampled, CacheOutcome::Loaded));
        assert_eq!(a, b);
        assert!(dir.path().join("shot_4-seed_3.json").is_file());
        let other = items(&[10, 10, 10])
            .into_iter()
            .map(|mut d| {
                d.impath = format!("x/{}", d.impath);
                d
            })
            .collect::<Vec<_>>();
        let e = load_or_sample_fewshot(Some(dir.path()), &other, Some(&other), 4, 3, false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("shot_4-seed_3.json") && e.contains("delete it"),
            "{e}"
        );
    }
}
