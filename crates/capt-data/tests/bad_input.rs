//! Bad input gives errors that name the file or entry and the fix; `check_dataset` lists
//! every problem at once.

mod common;

use std::path::Path;

use capt_data::{
    check_dataset, DataLoader, Dataset, DatasetKind, LoadOptions, Split, TrainAugment,
};

/// A writable copy of the DTD fixture under `<tmp>/data/dtd`.
fn dtd_copy(tmp: &Path) -> std::path::PathBuf {
    let data = tmp.join("data");
    common::copy_tree(&common::fixture_root().join("dtd"), &data.join("dtd"));
    data
}

#[test]
fn unknown_dataset_name() {
    let e = "imagenet-xl"
        .parse::<DatasetKind>()
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("imagenet-xl") && e.contains("known datasets"),
        "{e}"
    );
}

#[test]
fn missing_split_file_names_path_and_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dtd_copy(tmp.path());
    std::fs::remove_file(data.join("dtd/split_zhou_DescribableTextures.json")).unwrap();
    let e = Dataset::load(DatasetKind::Dtd, &data)
        .unwrap_err()
        .to_string();
    assert!(e.contains("dtd/split_zhou_DescribableTextures.json"), "{e}");
    assert!(
        e.contains("DATASETS.md") && e.contains("--split-file"),
        "{e}"
    );
    let report = check_dataset(&LoadOptions::new(DatasetKind::Dtd, &data), true);
    assert_eq!(report.errors(), 1);
    assert!(!report.is_ok());
}

#[test]
fn root_pointing_at_dataset_folder_is_explained() {
    let e = Dataset::load(DatasetKind::Dtd, common::fixture_root().join("dtd"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not the dataset folder itself"), "{e}");
}

#[test]
fn check_lists_every_problem_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dtd_copy(tmp.path());
    let ds = Dataset::load(DatasetKind::Dtd, &data).unwrap();
    // Two missing images, one corrupt JPEG (truncated), one garbage file.
    std::fs::remove_file(ds.image_path(&ds.train()[0])).unwrap();
    std::fs::remove_file(ds.image_path(&ds.test()[5])).unwrap();
    let p = ds.image_path(&ds.val()[3]);
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 3]).unwrap();
    std::fs::write(ds.image_path(&ds.train()[7]), b"not a jpeg").unwrap();
    // A label/classname mismatch and a malformed row in the split file.
    let split = data.join("dtd/split_zhou_DescribableTextures.json");
    let text = std::fs::read_to_string(&split)
        .unwrap()
        .replacen("\"blotchy\"", "\"blotched\"", 1)
        .replacen(
            "\"test\": [",
            "\"test\": [[\"x.jpg\", \"zero\", \"banded\"],",
            1,
        );
    std::fs::write(&split, text).unwrap();

    let report = check_dataset(&LoadOptions::new(DatasetKind::Dtd, &data), true);
    let text = report.render();
    assert_eq!(report.errors(), 6, "{text}");
    for needle in [
        &ds.train()[0].impath,
        &ds.test()[5].impath,
        &ds.val()[3].impath,
        &ds.train()[7].impath,
    ] {
        assert!(text.contains(needle.as_str()), "{needle} not in\n{text}");
    }
    assert!(
        text.contains("missing image") && text.contains("undecodable image"),
        "{text}"
    );
    assert!(
        text.contains("\"blotched\"") && text.contains("test[0]"),
        "{text}"
    );
    assert!(text.contains("train: 20 images, 10 classes"), "{text}");
    assert!(text.contains("FAILED: 6 error(s)"), "{text}");

    // The strict loader refuses the same split file, listing both split-file problems.
    let e = Dataset::load(DatasetKind::Dtd, &data)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("2 problem(s)") && e.contains("blotched") && e.contains("zero"),
        "{e}"
    );
}

#[test]
fn loader_errors_name_the_entry_and_file() {
    let tmp = tempfile::tempdir().unwrap();
    let data = dtd_copy(tmp.path());
    let ds = Dataset::load(DatasetKind::Dtd, &data).unwrap();
    let bad = ds.train()[4].clone();
    std::fs::write(ds.image_path(&bad), [0xff, 0xd8, 0xff, 0xe0, 0, 0x10]).unwrap();
    let loader = DataLoader::train(&ds, 32, 0, TrainAugment::clip(32)).unwrap();
    let e = loader.epoch(0).next().unwrap().unwrap_err().to_string();
    assert!(
        e.contains(&bad.impath) && e.contains("not a decodable image"),
        "{e}"
    );
    std::fs::remove_file(ds.image_path(&bad)).unwrap();
    let e = DataLoader::eval(&ds, Split::Train, 32, capt_core::PreprocessConfig::clip(32))
        .unwrap()
        .epoch(0)
        .next()
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&bad.impath) && e.contains("cannot read image file"),
        "{e}"
    );
}

#[test]
fn custom_dataset_without_code() {
    let tmp = tempfile::tempdir().unwrap();
    // A folder per class: copy the fixture's DTD class folders as they are.
    let root = tmp.path().join("mytextures");
    common::copy_tree(&common::fixture_root().join("dtd/images"), &root);
    let ds = Dataset::load(DatasetKind::Custom, &root).unwrap();
    assert_eq!(ds.name, "mytextures");
    assert_eq!(ds.num_classes(), 10);
    assert_eq!(ds.classnames[0], "banded");
    // 5 images per class -> round(2.5)=2 train, round(1.0)=1 val, 2 test.
    assert_eq!(
        (ds.train().len(), ds.val().len(), ds.test().len()),
        (20, 10, 20)
    );
    assert!(check_dataset(&LoadOptions::new(DatasetKind::Custom, &root), true).is_ok());

    // A split file in CoOp's format works too.
    let split_root = tmp.path().join("withsplit");
    common::copy_tree(&common::fixture_root().join("dtd"), &split_root);
    std::fs::rename(
        split_root.join("split_zhou_DescribableTextures.json"),
        split_root.join("split.json"),
    )
    .unwrap();
    let ds2 = Dataset::load(DatasetKind::Custom, &split_root).unwrap();
    let fixture = Dataset::load(DatasetKind::Dtd, common::fixture_root()).unwrap();
    assert_eq!(ds2.splits, fixture.splits);
    assert_eq!(
        ds2.image_path(&ds2.train()[0]),
        split_root.join("images").join(&ds2.train()[0].impath)
    );
}
