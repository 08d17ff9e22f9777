//! The few-shot and base/new protocol against Python's `random` (reference written by
//! tools/ref_fewshot.py), on the shipped DTD fixture and, when present, on the real CoOp
//! split files.

mod common;

use std::collections::{BTreeMap, HashSet};

use capt_data::{
    base_new_labels, sample_fewshot, Dataset, DatasetKind, Datum, FewShotCache, LoadOptions,
    Protocol, Split, Subsample,
};
use serde_json::Value;
use sha2::{Digest, Sha256};

fn reference() -> Value {
    let p = common::fixture_root().join("fewshot_reference.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn rows(v: &Value) -> Vec<Datum> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            Datum::new(
                r[0].as_str().unwrap(),
                r[1].as_u64().unwrap() as usize,
                r[2].as_str().unwrap(),
            )
        })
        .collect()
}

fn digest(items: &[Datum]) -> String {
    let mut h = Sha256::new();
    for d in items {
        h.update(format!("{}\t{}\t{}\n", d.impath, d.label, d.classname).as_bytes());
    }
    hex::encode(h.finalize())
}

#[test]
fn fixture_fewshot_and_base_split_equal_python() {
    let ds = Dataset::load(DatasetKind::Dtd, common::fixture_root()).unwrap();
    assert_eq!(
        (ds.train().len(), ds.val().len(), ds.test().len()),
        (20, 10, 20)
    );
    let cases = reference()["fixture"].as_array().unwrap().clone();
    assert_eq!(cases.len(), 6);
    let cache = tempfile::tempdir().unwrap();
    for case in cases {
        let shots = case["shots"].as_u64().unwrap() as usize;
        let seed = case["seed"].as_i64().unwrap();
        let fs = sample_fewshot(ds.train(), Some(ds.val()), shots, seed, false);
        assert_eq!(
            fs.train,
            rows(&case["train"]),
            "train shots={shots} seed={seed}"
        );
        assert_eq!(
            fs.val.unwrap(),
            rows(&case["val"]),
            "val shots={shots} seed={seed}"
        );
        let mut p = Protocol::new(shots, seed, Subsample::Base);
        p.cache = FewShotCache::Dir(cache.path().to_path_buf());
        let (base, _) = ds.with_protocol(&p).unwrap();
        assert_eq!(base.train(), rows(&case["base_train"]).as_slice());
        assert_eq!(base.test(), rows(&case["base_test"]).as_slice());
        assert_eq!(base.num_classes(), 5);
        assert_eq!(base.original_labels, vec![0, 1, 2, 3, 4]);
    }
}

fn kind_of(name: &str) -> DatasetKind {
    name.parse().unwrap()
}

#[test]
fn real_split_files_fewshot_equal_python_bit_for_bit() {
    let Some(root) = common::real_root() else {
        return;
    };
    let cases = reference()["real"].as_array().unwrap().clone();
    assert!(!cases.is_empty());
    let mut loaded: BTreeMap<String, Dataset> = BTreeMap::new();
    for case in &cases {
        let name = case["dataset"].as_str().unwrap().to_string();
        let ds = loaded
            .entry(name.clone())
            .or_insert_with(|| Dataset::load(kind_of(&name), &root).unwrap());
        let shots = case["shots"].as_u64().unwrap() as usize;
        let seed = case["seed"].as_i64().unwrap();
        let what = format!("{name} shots={shots} seed={seed}");
        let fs = sample_fewshot(ds.train(), Some(ds.val()), shots, seed, false);
        let val = fs.val.clone().unwrap();
        assert_eq!(
            fs.train.len() as u64,
            case["train_len"].as_u64().unwrap(),
            "{what}"
        );
        assert_eq!(
            val.len() as u64,
            case["val_len"].as_u64().unwrap(),
            "{what}"
        );
        assert_eq!(fs.train[..3], rows(&case["train_first"])[..], "{what}");
        assert_eq!(val[..3], rows(&case["val_first"])[..], "{what}");
        assert_eq!(
            digest(&fs.train),
            case["train_sha256"].as_str().unwrap(),
            "{what}"
        );
        assert_eq!(digest(&val), case["val_sha256"].as_str().unwrap(), "{what}");
        // Never a duplicate, and exactly `shots` per class (every real class has enough).
        assert_eq!(
            fs.train.iter().collect::<HashSet<_>>().len(),
            fs.train.len(),
            "{what}"
        );
        let mut per: BTreeMap<usize, usize> = BTreeMap::new();
        for d in &fs.train {
            *per.entry(d.label).or_default() += 1;
        }
        assert!(per.values().all(|&n| n == shots), "{what}: {per:?}");
        for which in ["base", "new"] {
            let sub: Subsample = which.parse().unwrap();
            let mut p = Protocol::new(shots, seed, sub);
            p.cache = FewShotCache::Off;
            let (s, _) = ds.with_protocol(&p).unwrap();
            let r = &case[which];
            assert_eq!(
                s.num_classes() as u64,
                r["classes"].as_u64().unwrap(),
                "{what} {which}"
            );
            assert_eq!(
                s.train().len() as u64,
                r["train"].as_u64().unwrap(),
                "{what} {which}"
            );
            assert_eq!(
                s.val().len() as u64,
                r["val"].as_u64().unwrap(),
                "{what} {which}"
            );
            assert_eq!(
                s.test().len() as u64,
                r["test"].as_u64().unwrap(),
                "{what} {which}"
            );
            assert_eq!(
                digest(s.test()),
                r["test_sha256"].as_str().unwrap(),
                "{what} {which}"
            );
        }
    }
}

#[test]
fn real_base_new_class_counts() {
    let Some(root) = common::real_root() else {
        return;
    };
    for (kind, base, new) in [
        (DatasetKind::OxfordPets, 19, 18),
        (DatasetKind::Dtd, 24, 23),
        (DatasetKind::EuroSat, 5, 5),
        (DatasetKind::Caltech101, 50, 50),
        (DatasetKind::Ucf101, 51, 50),
    ] {
        let ds = Dataset::load(kind, &root).unwrap();
        let (b, n) = base_new_labels(ds.train());
        assert_eq!((b.len(), n.len()), (base, new), "{kind}");
        let mut p = Protocol::new(16, 1, Subsample::New);
        p.cache = FewShotCache::Off;
        let (novel, _) = ds.with_protocol(&p).unwrap();
        assert_eq!(novel.num_classes(), new);
        assert_eq!(novel.classnames[0], ds.classnames[base], "{kind}");
        assert_eq!(novel.original_labels[0], base);
    }
}

/// Counts per split and class, class names and first entries straight from the JSON.
#[test]
fn real_split_files_read_as_written() {
    let Some(root) = common::real_root() else {
        return;
    };
    for (kind, folder, file, classes) in [
        (
            DatasetKind::OxfordPets,
            "oxford_pets",
            "split_zhou_OxfordPets.json",
            37,
        ),
        (
            DatasetKind::Dtd,
            "dtd",
            "split_zhou_DescribableTextures.json",
            47,
        ),
        (
            DatasetKind::EuroSat,
            "eurosat",
            "split_zhou_EuroSAT.json",
            10,
        ),
        (
            DatasetKind::Caltech101,
            "caltech-101",
            "split_zhou_Caltech101.json",
            100,
        ),
        (DatasetKind::Ucf101, "ucf101", "split_zhou_UCF101.json", 101),
    ] {
        let json: Value =
            serde_json::from_str(&std::fs::read_to_string(root.join(folder).join(file)).unwrap())
                .unwrap();
        let ds = Dataset::load(kind, &root).unwrap();
        assert_eq!(ds.num_classes(), classes, "{kind}");
        for split in Split::ALL {
            let expect = rows(&json[split.as_str()]);
            assert_eq!(ds.split(split), expect.as_slice(), "{kind} {split}");
            let mut per: BTreeMap<usize, usize> = BTreeMap::new();
            for d in &expect {
                *per.entry(d.label).or_default() += 1;
            }
            assert_eq!(per.len(), classes, "{kind} {split}");
        }
        let first = &json["train"][0];
        assert_eq!(ds.train()[0].impath, first[0].as_str().unwrap());
        assert_eq!(ds.classnames[0], first[2].as_str().unwrap());
        assert_eq!(
            ds.image_path(&ds.train()[0]),
            root.join(folder)
                .join(kind.image_dir())
                .join(first[0].as_str().unwrap())
        );
    }
    let eu = Dataset::load(DatasetKind::EuroSat, &root).unwrap();
    assert_eq!(eu.classnames[0], "Annual Crop Land");
    assert_eq!(
        eu.prompts()[0],
        "a centered satellite photo of Annual Crop Land."
    );
}

/// The shipped real images (split_mini files) all exist and decode.
#[test]
fn real_mini_splits_check_clean() {
    let Some(root) = common::real_root() else {
        return;
    };
    for (kind, file, n_images) in [
        (DatasetKind::OxfordPets, "split_mini_OxfordPets.json", 205),
        (DatasetKind::Dtd, "split_mini_DescribableTextures.json", 400),
        (DatasetKind::Caltech101, "split_mini_Caltech101.json", 900),
        (DatasetKind::EuroSat, "split_mini_EuroSAT.json", 4),
    ] {
        let opts = LoadOptions::new(kind, &root).with_split_file(file);
        let report = capt_data::check_dataset(&opts, true);
        assert_eq!(report.errors(), 0, "{}", report.render());
        assert_eq!(report.images_checked, n_images, "{kind}");
    }
}
