//! Readers for each on-disk layout. They return the splits plus every entry-level problem
//! found, so `data check` can list them all; `Dataset::load` turns problems into one error.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::catalog::{DatasetKind, Layout, EUROSAT_CLASSNAMES};
use crate::datum::{Datum, Problem, Split, Splits};
use crate::error::{DataError, Result};
use crate::fsutil::{list_dirs, list_images};
use crate::pyrandom::PyRandom;
use crate::split_file::{read_split_entries, read_split_file};

/// Where a dataset lives and how to read it.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub kind: DatasetKind,
    /// CoOp's `$DATA` folder (the parent of `oxford_pets/`, `dtd/`, ...); for `Custom`, the
    /// dataset folder itself.
    pub root: PathBuf,
    /// Overrides the split file (e.g. `split_mini_OxfordPets.json`); relative paths are
    /// looked up in the dataset folder.
    pub split_file: Option<PathBuf>,
    /// Seed of the 50/20/30 split of a custom folder-per-class dataset.
    pub custom_split_seed: i64,
}

impl LoadOptions {
    pub fn new(kind: DatasetKind, root: impl Into<PathBuf>) -> Self {
        Self {
            kind,
            root: root.into(),
            split_file: None,
            custom_split_seed: 1,
        }
    }

    pub fn with_split_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.split_file = Some(path.into());
        self
    }
}

/// What a reader found.
#[derive(Debug)]
pub(crate) struct RawDataset {
    pub dataset_dir: PathBuf,
    pub image_dir: PathBuf,
    /// The file or folder that defines the splits (named in messages).
    pub source: PathBuf,
    pub splits: Splits,
    /// Class names by label when the layout defines them independently of the entries
    /// (ImageNet's `classnames.txt`, Aircraft's `variants.txt`).
    pub classnames: Option<Vec<String>>,
    pub problems: Vec<Problem>,
}

pub(crate) fn read(opts: &LoadOptions) -> Result<RawDataset> {
    let kind = opts.kind;
    if kind == DatasetKind::Custom {
        return read_custom(opts);
    }
    if opts.split_file.is_some() && !matches!(kind.layout(), Layout::SplitFile { .. }) {
        return Err(DataError::Config(format!(
            "{} has no split file (its splits come from its folders); drop --split-file",
            kind.name()
        )));
    }
    let dataset_dir = opts.root.join(kind.dataset_dir());
    if !dataset_dir.is_dir() && opts.split_file.is_none() {
        let hint = if opts.root.file_name().and_then(|n| n.to_str()) == Some(kind.dataset_dir()) {
            format!(
                "--root must be CoOp's $DATA folder (the parent of {}/), not the dataset folder itself",
                kind.dataset_dir()
            )
        } else {
            format!(
                "--root must be CoOp's $DATA folder holding {}/ (see CoOp's DATASETS.md)",
                kind.dataset_dir()
            )
        };
        return Err(DataError::Missing {
            what: format!("{} folder", kind.name()),
            path: dataset_dir,
            fix: hint,
        });
    }
    let image_dir = dataset_dir.join(kind.image_dir());
    match kind.layout() {
        Layout::SplitFile { split_file } => {
            let path = resolve_split_file(opts, &dataset_dir, split_file);
            if !path.is_file() {
                return Err(DataError::Missing {
                    what: format!("{} split file", kind.name()),
                    path,
                    fix: kind.split_fix(),
                });
            }
            let (mut splits, mut problems) = read_split_entries(&path)?;
            if kind == DatasetKind::EuroSat {
                rename_eurosat(&mut splits);
            }
            problems.extend(splits.check_labels(&path.display().to_string()));
            Ok(RawDataset {
                dataset_dir,
                image_dir,
                source: path,
                splits,
                classnames: None,
                problems,
            })
        }
        Layout::Aircraft => read_aircraft(dataset_dir, image_dir),
        Layout::ImageNet => read_imagenet(dataset_dir, image_dir),
        Layout::ImageNetV2 => read_imagenet_v2(dataset_dir, image_dir),
        Layout::ImageNetFolders => read_imagenet_folders(dataset_dir, image_dir),
        Layout::Custom => unreachable!("handled above"),
    }
}

fn resolve_split_file(opts: &LoadOptions, dataset_dir: &Path, default: &str) -> PathBuf {
    match &opts.split_file {
        Some(p) if p.is_absolute() || p.is_file() => p.clone(),
        Some(p) => dataset_dir.join(p),
        None => dataset_dir.join(default),
    }
}

/// CoOp's EuroSAT uses readable names; split files written from raw folder names get them too.
fn rename_eurosat(splits: &mut Splits) {
    let map: HashMap<&str, &str> = EUROSAT_CLASSNAMES.iter().copied().collect();
    for split in Split::ALL {
        for d in splits.get_mut(split) {
            if let Some(new) = map.get(d.classname.as_str()) {
                d.classname = (*new).to_string();
            }
        }
    }
}

fn read_lines(path: &Path, what: &str, fix: &str) -> Result<Vec<String>> {
    if !path.is_file() {
        return Err(DataError::Missing {
            what: what.to_string(),
            path: path.to_path_buf(),
            fix: fix.to_string(),
        });
    }
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    Ok(text.lines().map(|l| l.trim().to_string()).collect())
}

/// FGVCAircraft: `variants.txt` gives the classes in label order; each
/// `images_variant_<split>.txt` line is `<image id> <variant name with spaces>`.
fn read_aircraft(dataset_dir: PathBuf, image_dir: PathBuf) -> Result<RawDataset> {
    let fix = "FGVCAircraft needs fgvc-aircraft-2013b's data/ files (variants.txt, images_variant_*.txt, images/) \
               copied into fgvc_aircraft/, as in CoOp's DATASETS.md";
    let variants_path = dataset_dir.join("variants.txt");
    let classnames: Vec<String> = read_lines(&variants_path, "FGVCAircraft variants.txt", fix)?
        .into_iter()
        .filter(|l| !l.is_empty())
        .collect();
    let cname2lab: HashMap<&str, usize> = classnames
        .iter()
        .enumerate()
        .map(|(i, c)| (c.as_str(), i))
        .collect();
    let mut splits = Splits::default();
    let mut problems = Vec::new();
    for split in Split::ALL {
        let file = format!("images_variant_{}.txt", split.as_str());
        let path = dataset_dir.join(&file);
        for (lineno, line) in read_lines(&path, &format!("FGVCAircraft {file}"), fix)?
            .iter()
            .enumerate()
        {
            if line.is_empty() {
                continue;
            }
            let (id, name) = line.split_once(' ').unwrap_or((line.as_str(), ""));
            match cname2lab.get(name) {
                Some(&label) => {
                    splits
                        .get_mut(split)
                        .push(Datum::new(format!("{id}.jpg"), label, name))
                }
                None => problems.push(Problem::error(format!(
                    "{}:{}: variant {name:?} is not in {}; fix the line or add the variant",
                    path.display(),
                    lineno + 1,
                    variants_path.display()
                ))),
            }
        }
    }
    Ok(RawDataset {
        dataset_dir,
        image_dir,
        source: variants_path,
        splits,
        classnames: Some(classnames),
        problems,
    })
}

/// `classnames.txt`: lines `<wnid> <class name with spaces>`, in label order.
pub fn read_imagenet_classnames(path: &Path) -> Result<Vec<(String, String)>> {
    let fix =
        "classnames.txt (one `<wnid> <class name>` line per class) comes with CoOp's ImageNet \
               instructions (DATASETS.md); copy it into this folder";
    Ok(read_lines(path, "ImageNet classnames.txt", fix)?
        .into_iter()
        .filter(|l| !l.is_empty())
        .map(|l| match l.split_once(' ') {
            Some((w, n)) => (w.to_string(), n.to_string()),
            None => (l.clone(), String::new()),
        })
        .collect())
}

fn missing_dir(what: &str, path: &Path, fix: &str) -> DataError {
    DataError::Missing {
        what: what.to_string(),
        path: path.to_path_buf(),
        fix: fix.to_string(),
    }
}

/// Reads `<dir>/<folder>/<image>` with labels by sorted folder order, as CoOp's
/// `read_data`. CoOp lists each folder's images unsorted (file-system order); they are
/// sorted here so runs agree across machines.
fn read_wnid_folders(
    dir: &Path,
    rel_prefix: &str,
    names: &HashMap<String, String>,
    classnames_path: &Path,
    problems: &mut Vec<Problem>,
) -> Result<(Vec<Datum>, Vec<String>)> {
    let folders = list_dirs(dir)?;
    let mut items = Vec::new();
    for (label, folder) in folders.iter().enumerate() {
        let classname = match names.get(folder) {
            Some(n) => n.clone(),
            None => {
                problems.push(Problem::error(format!(
                    "{}: class folder {folder:?} is not listed in {}; remove the folder or add a line `{folder} <class name>`",
                    dir.display(),
                    classnames_path.display()
                )));
                folder.clone()
            }
        };
        for im in list_images(&dir.join(folder))? {
            items.push(Datum::new(
                format!("{rel_prefix}{folder}/{im}"),
                label,
                classname.clone(),
            ));
        }
    }
    Ok((items, folders))
}

fn read_imagenet(dataset_dir: PathBuf, image_dir: PathBuf) -> Result<RawDataset> {
    let cn_path = dataset_dir.join("classnames.txt");
    let pairs = read_imagenet_classnames(&cn_path)?;
    let names: HashMap<String, String> = pairs.iter().cloned().collect();
    let mut problems = Vec::new();
    let fix = "ImageNet needs images/train/<wnid>/ and images/val/<wnid>/ (val sorted into class folders)";
    let mut lists = Vec::new();
    for sub in ["train", "val"] {
        let dir = image_dir.join(sub);
        if !dir.is_dir() {
            return Err(missing_dir(&format!("ImageNet {sub} folder"), &dir, fix));
        }
        lists.push(read_wnid_folders(
            &dir,
            &format!("{sub}/"),
            &names,
            &cn_path,
            &mut problems,
        )?);
    }
    let (test, test_folders) = lists.pop().expect("two lists");
    let (train, train_folders) = lists.pop().expect("two lists");
    if train_folders != test_folders {
        problems.push(Problem::error(format!(
            "{}: images/train has {} class folders and images/val has {}; labels come from each folder's \
             sorted position, so both must hold the same wnids",
            dataset_dir.display(),
            train_folders.len(),
            test_folders.len()
        )));
    }
    let classnames = train_folders
        .iter()
        .map(|w| names.get(w).cloned().unwrap_or_else(|| w.clone()))
        .collect();
    Ok(RawDataset {
        dataset_dir,
        image_dir,
        source: cn_path,
        // CoOp evaluates on ImageNet's val set and also uses it as the val split.
        splits: Splits {
            train,
            val: test.clone(),
            test,
        },
        classnames: Some(classnames),
        problems,
    })
}

fn read_imagenet_v2(dataset_dir: PathBuf, image_dir: PathBuf) -> Result<RawDataset> {
    let cn_path = dataset_dir.join("classnames.txt");
    let pairs = read_imagenet_classnames(&cn_path)?;
    if !image_dir.is_dir() {
        return Err(missing_dir(
            "ImageNet-V2 image folder",
            &image_dir,
            "extract imagenetv2-matched-frequency.tar.gz into imagenetv2/ (folders 0..999)",
        ));
    }
    let mut items = Vec::new();
    let mut problems = Vec::new();
    for (label, (_, classname)) in pairs.iter().enumerate() {
        let dir = image_dir.join(label.to_string());
        if !dir.is_dir() {
            problems.push(Problem::error(format!(
                "{}: class folder for label {label} is missing",
                dir.display()
            )));
            continue;
        }
        for im in list_images(&dir)? {
            items.push(Datum::new(
                format!("{label}/{im}"),
                label,
                classname.clone(),
            ));
        }
    }
    Ok(RawDataset {
        dataset_dir,
        image_dir,
        source: cn_path,
        splits: Splits {
            train: items.clone(),
            val: Vec::new(),
            test: items,
        },
        classnames: Some(pairs.into_iter().map(|(_, n)| n).collect()),
        problems,
    })
}

fn read_imagenet_folders(dataset_dir: PathBuf, image_dir: PathBuf) -> Result<RawDataset> {
    let cn_path = dataset_dir.join("classnames.txt");
    let names: HashMap<String, String> = read_imagenet_classnames(&cn_path)?.into_iter().collect();
    if !image_dir.is_dir() {
        return Err(missing_dir(
            "image folder",
            &image_dir,
            "extract the dataset archive here (one folder per wnid), as in CoOp's DATASETS.md",
        ));
    }
    let mut problems = Vec::new();
    let (items, folders) = read_wnid_folders(&image_dir, "", &names, &cn_path, &mut problems)?;
    let classnames = folders
        .iter()
        .map(|w| names.get(w).cloned().unwrap_or_else(|| w.clone()))
        .collect();
    Ok(RawDataset {
        dataset_dir,
        image_dir,
        source: cn_path,
        splits: Splits {
            train: items.clone(),
            val: Vec::new(),
            test: items,
        },
        classnames: Some(classnames),
        problems,
    })
}

/// Python's `round()` (half to even) for the split sizes of `read_and_split_data`.
fn py_round(x: f64) -> usize {
    let r = x.round();
    let v = if (x - x.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - 1.0
    } else {
        r
    };
    v.max(0.0) as usize
}

/// A user dataset, in this order of precedence:
/// 1. a split file (`--split-file`, or `split.json` in the folder) in CoOp's format, paths
///    relative to `images/` when that folder exists, else to the folder itself;
/// 2. `train/<class>/`, optional `val/<class>/` and `test/<class>/`; labels by sorted
///    train class folders;
/// 3. a folder per class, split 50/20/30 per class after a seeded shuffle, as CoOp's
///    `DTD.read_and_split_data` does for datasets without a split file.
fn read_custom(opts: &LoadOptions) -> Result<RawDataset> {
    let root = opts.root.clone();
    if !root.is_dir() {
        return Err(missing_dir(
            "custom dataset folder",
            &root,
            "--root must be a folder holding split.json, train/<class>/..., or one folder per class",
        ));
    }
    let images = root.join("images");
    let image_dir = if images.is_dir() {
        images
    } else {
        root.clone()
    };
    let split_path = match &opts.split_file {
        Some(p) if p.is_absolute() || p.is_file() => Some(p.clone()),
        Some(p) => Some(root.join(p)),
        None => Some(root.join("split.json")).filter(|p| p.is_file()),
    };
    if let Some(path) = split_path {
        if !path.is_file() {
            return Err(missing_dir(
                "split file",
                &path,
                "pass an existing file to --split-file (format {\"train\": [[path, label, classname], ...], ...})",
            ));
        }
        let (splits, problems) = read_split_file(&path)?;
        return Ok(RawDataset {
            dataset_dir: root,
            image_dir,
            source: path,
            splits,
            classnames: None,
            problems,
        });
    }
    if root.join("train").is_dir() {
        return read_custom_split_folders(root);
    }
    read_custom_class_folders(root, opts.custom_split_seed)
}

fn read_custom_split_folders(root: PathBuf) -> Result<RawDataset> {
    let classes = list_dirs(&root.join("train"))?;
    let label_of: BTreeMap<&str, usize> = classes
        .iter()
        .enumerate()
        .map(|(i, c)| (c.as_str(), i))
        .collect();
    let mut splits = Splits::default();
    let mut problems = Vec::new();
    for split in Split::ALL {
        let dir = root.join(split.as_str());
        if !dir.is_dir() {
            if split == Split::Test {
                problems.push(Problem::warning(format!(
                    "{}: no test/ folder; evaluation needs test/<class>/ images",
                    root.display()
                )));
            }
            continue;
        }
        for class in list_dirs(&dir)? {
            let Some(&label) = label_of.get(class.as_str()) else {
                problems.push(Problem::error(format!(
                    "{}: class folder {class:?} has no train/{class}/ folder; labels come from train/, add it there or remove it",
                    dir.join(&class).display()
                )));
                continue;
            };
            let ims = list_images(&dir.join(&class))?;
            if split == Split::Train && ims.is_empty() {
                problems.push(Problem::error(format!(
                    "{}: no images (extensions: jpg, jpeg, png, webp, bmp)",
                    dir.join(&class).display()
                )));
            }
            for im in ims {
                splits.get_mut(split).push(Datum::new(
                    format!("{}/{class}/{im}", split.as_str()),
                    label,
                    class.clone(),
                ));
            }
        }
    }
    Ok(RawDataset {
        image_dir: root.clone(),
        source: root.join("train"),
        dataset_dir: root,
        splits,
        classnames: Some(classes),
        problems,
    })
}

fn read_custom_class_folders(root: PathBuf, seed: i64) -> Result<RawDataset> {
    let classes = list_dirs(&root)?;
    let classes: Vec<String> = classes
        .into_iter()
        .filter(|c| c != "split_fewshot")
        .collect();
    if classes.is_empty() {
        return Err(missing_dir(
            "class folders",
            &root,
            "a custom dataset needs split.json, train/<class>/ folders, or one folder per class holding images",
        ));
    }
    let (p_trn, p_val) = (0.5, 0.2);
    let mut rng = PyRandom::seed(seed);
    let mut splits = Splits::default();
    let mut problems = Vec::new();
    for (label, class) in classes.iter().enumerate() {
        let dir = root.join(class);
        let mut ims = list_images(&dir)?;
        rng.shuffle(&mut ims);
        let n = ims.len();
        let n_train = py_round(n as f64 * p_trn);
        let n_val = py_round(n as f64 * p_val);
        if n_train == 0 || n_val == 0 || n_train + n_val >= n {
            problems.push(Problem::error(format!(
                "{}: {n} image(s) cannot be split 50/20/30 into non-empty train/val/test; \
                 add images (at least 4) or provide split.json",
                dir.display()
            )));
            continue;
        }
        for (i, im) in ims.iter().enumerate() {
            let split = if i < n_train {
                Split::Train
            } else if i < n_train + n_val {
                Split::Val
            } else {
                Split::Test
            };
            splits
                .get_mut(split)
                .push(Datum::new(format!("{class}/{im}"), label, class.clone()));
        }
    }
    Ok(RawDataset {
        image_dir: root.clone(),
        source: root.clone(),
        dataset_dir: root,
        splits,
        classnames: Some(classes),
        problems,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn py_round_is_half_even() {
        assert_eq!(py_round(1.5), 2);
        assert_eq!(py_round(2.5), 2);
        assert_eq!(py_round(0.6), 1);
        assert_eq!(py_round(0.4), 0);
    }

    fn touch(p: &Path) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"x").unwrap();
    }

    #[test]
    fn custom_class_folders_split_50_20_30() {
        let dir = tempfile::tempdir().unwrap();
        for c in ["cat", "dog"] {
            for i in 0..10 {
                touch(&dir.path().join(c).join(format!("{i}.jpg")));
            }
        }
        touch(&dir.path().join("tiny/0.jpg"));
        let raw = read_custom(&LoadOptions::new(DatasetKind::Custom, dir.path())).unwrap();
        assert_eq!(raw.splits.train.len(), 10);
        assert_eq!(raw.splits.val.len(), 4);
        assert_eq!(raw.splits.test.len(), 6);
        assert_eq!(raw.problems.len(), 1);
        assert!(
            raw.problems[0].message.contains("tiny"),
            "{:?}",
            raw.problems
        );
        assert_eq!(raw.classnames.unwrap(), ["cat", "dog", "tiny"]);
    }

    #[test]
    fn custom_split_folders_use_train_labels() {
        let dir = tempfile::tempdir().unwrap();
        touch(&dir.path().join("train/b/1.png"));
        touch(&dir.path().join("train/a/1.png"));
        touch(&dir.path().join("test/b/2.png"));
        touch(&dir.path().join("test/zzz/2.png"));
        let raw = read_custom(&LoadOptions::new(DatasetKind::Custom, dir.path())).unwrap();
        assert_eq!(raw.splits.test, vec![Datum::new("test/b/2.png", 1, "b")]);
        assert_eq!(raw.problems.len(), 1);
        assert!(raw.problems[0].message.contains("zzz"));
    }

    #[test]
    fn aircraft_reads_variants_and_flags_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("fgvc_aircraft");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("variants.txt"), "707-320\nA300B4\n").unwrap();
        std::fs::write(
            d.join("images_variant_train.txt"),
            "1025794 707-320\n1340192 A300B4\n",
        )
        .unwrap();
        std::fs::write(d.join("images_variant_val.txt"), "0001 Boeing 747\n").unwrap();
        std::fs::write(d.join("images_variant_test.txt"), "").unwrap();
        let raw = read(&LoadOptions::new(DatasetKind::FgvcAircraft, dir.path())).unwrap();
        assert_eq!(raw.splits.train[1], Datum::new("1340192.jpg", 1, "A300B4"));
        assert_eq!(raw.problems.len(), 1);
        assert!(raw.problems[0].message.contains("images_variant_val.txt:1"));
    }

    #[test]
    fn imagenet_folders_label_by_sorted_wnid() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("imagenet-rendition");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join("classnames.txt"),
            "n01 goldfish\nn02 great white shark\nn03 hen\n",
        )
        .unwrap();
        touch(&d.join("imagenet-r/n03/a.jpg"));
        touch(&d.join("imagenet-r/n01/b.jpg"));
        let raw = read(&LoadOptions::new(DatasetKind::ImageNetR, dir.path())).unwrap();
        assert_eq!(
            raw.splits.test,
            vec![
                Datum::new("n01/b.jpg", 0, "goldfish"),
                Datum::new("n03/a.jpg", 1, "hen")
            ]
        );
        assert_eq!(raw.classnames.unwrap(), ["goldfish", "hen"]);
    }

    #[test]
    fn missing_dataset_folder_and_split_file_say_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let e = read(&LoadOptions::new(DatasetKind::Dtd, dir.path()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("dtd") && e.contains("$DATA"), "{e}");
        std::fs::create_dir_all(dir.path().join("dtd")).unwrap();
        let e = read(&LoadOptions::new(DatasetKind::Dtd, dir.path()))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("split_zhou_DescribableTextures.json") && e.contains("DATASETS.md"),
            "{e}"
        );
    }
}
