//! The folder-based layouts (ImageNet and its variants, Stanford Cars' root-relative paths)
//! built in a temporary `$DATA` from fixture images.

mod common;

use std::path::Path;

use capt_data::{
    check_dataset, Dataset, DatasetKind, FewShotCache, LoadOptions, Protocol, Subsample,
};

const WNIDS: [(&str, &str); 4] = [
    ("n01440764", "tench"),
    ("n01443537", "goldfish"),
    ("n01484850", "great white shark"),
    ("n01491361", "tiger shark"),
];

fn fixture_images() -> Vec<std::path::PathBuf> {
    let ds = Dataset::load(DatasetKind::Dtd, common::fixture_root()).unwrap();
    ds.train().iter().map(|d| ds.image_path(d)).collect()
}

fn put(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
    std::fs::copy(src, dst).unwrap();
}

fn classnames(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let text: String = WNIDS.iter().map(|(w, n)| format!("{w} {n}\n")).collect();
    std::fs::write(dir.join("classnames.txt"), text).unwrap();
}

#[test]
fn imagenet_reads_wnid_folders_and_samples_train_only() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let imgs = fixture_images();
    let inet = root.join("imagenet");
    classnames(&inet);
    let mut k = 0;
    for (w, _) in WNIDS.iter().rev() {
        for i in 0..3 {
            put(
                &imgs[k % imgs.len()],
                &inet.join(format!("images/train/{w}/{w}_{i}.JPEG")),
            );
            k += 1;
        }
        put(
            &imgs[k % imgs.len()],
            &inet.join(format!("images/val/{w}/val_{w}.JPEG")),
        );
        k += 1;
    }
    let ds = Dataset::load(DatasetKind::ImageNet, root).unwrap();
    assert_eq!(
        ds.classnames,
        ["tench", "goldfish", "great white shark", "tiger shark"]
    );
    assert_eq!(
        (ds.train().len(), ds.val().len(), ds.test().len()),
        (12, 4, 4)
    );
    assert_eq!(ds.train()[0].impath, "train/n01440764/n01440764_0.JPEG");
    assert_eq!(ds.test()[3].label, 3);
    assert_eq!(
        ds.val(),
        ds.test(),
        "CoOp uses ImageNet's val set as val and test"
    );

    let mut p = Protocol::new(2, 1, Subsample::Base);
    p.cache = FewShotCache::Dir(tmp.path().join("fs"));
    let (base, _) = ds.with_protocol(&p).unwrap();
    assert_eq!(base.num_classes(), 2);
    assert_eq!(base.train().len(), 4);
    assert_eq!(base.test().len(), 2);
    assert_eq!(
        base.val(),
        base.test(),
        "val is not few-shot sampled for ImageNet"
    );
    let cached = std::fs::read_to_string(tmp.path().join("fs/shot_2-seed_1.json")).unwrap();
    assert!(cached.contains("\"train\"") && !cached.contains("\"val\""));
    assert!(check_dataset(&LoadOptions::new(DatasetKind::ImageNet, root), true).is_ok());

    // A wnid folder missing from classnames.txt is named.
    put(&imgs[0], &inet.join("images/train/n09999999/x.JPEG"));
    put(&imgs[0], &inet.join("images/val/n09999999/x.JPEG"));
    let e = Dataset::load(DatasetKind::ImageNet, root)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("n09999999") && e.contains("classnames.txt"),
        "{e}"
    );
}

#[test]
fn imagenet_variants_use_their_own_folders() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let imgs = fixture_images();
    // V2: numbered folders 0..C-1 in classnames.txt order.
    let v2 = root.join("imagenetv2");
    classnames(&v2);
    for (label, img) in imgs.iter().take(WNIDS.len()).enumerate() {
        put(
            img,
            &v2.join(format!(
                "imagenetv2-matched-frequency-format-val/{label}/a.jpeg"
            )),
        );
    }
    let ds = Dataset::load(DatasetKind::ImageNetV2, root).unwrap();
    assert_eq!(ds.test().len(), 4);
    assert_eq!(ds.test()[2].classname, "great white shark");
    assert_eq!(ds.train(), ds.test());
    // A (200-class subset in the real data): labels follow the wnid folders present.
    let a = root.join("imagenet-adversarial");
    classnames(&a);
    put(&imgs[0], &a.join("imagenet-a/n01491361/x.jpg"));
    put(&imgs[1], &a.join("imagenet-a/n01443537/y.jpg"));
    std::fs::write(a.join("imagenet-a/README.txt"), "not a class").unwrap();
    let ds = Dataset::load(DatasetKind::ImageNetA, root).unwrap();
    assert_eq!(ds.classnames, ["goldfish", "tiger shark"]);
    assert_eq!(ds.test()[1].label, 1);
    // Sketch: images/<wnid>/.
    let s = root.join("imagenet-sketch");
    classnames(&s);
    put(&imgs[0], &s.join("images/n01440764/sketch_1.JPEG"));
    let ds = Dataset::load(DatasetKind::ImageNetSketch, root).unwrap();
    assert_eq!(
        ds.image_path(&ds.test()[0]),
        s.join("images/n01440764/sketch_1.JPEG")
    );
}

#[test]
fn stanford_cars_paths_are_relative_to_the_dataset_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let cars = tmp.path().join("stanford_cars");
    let imgs = fixture_images();
    put(&imgs[0], &cars.join("cars_train/00001.jpg"));
    put(&imgs[1], &cars.join("cars_test/00001.jpg"));
    std::fs::write(
        cars.join("split_zhou_StanfordCars.json"),
        r#"{"train": [["cars_train/00001.jpg", 0, "2012 Audi S4"]], "val": [],
            "test": [["cars_test/00001.jpg", 0, "2012 Audi S4"]]}"#,
    )
    .unwrap();
    let ds = Dataset::load(DatasetKind::StanfordCars, tmp.path()).unwrap();
    assert_eq!(
        ds.image_path(&ds.train()[0]),
        cars.join("cars_train/00001.jpg")
    );
    assert_eq!(ds.prompts(), ["a photo of a 2012 Audi S4."]);
    assert!(check_dataset(
        &LoadOptions::new(DatasetKind::StanfordCars, tmp.path()),
        true
    )
    .is_ok());
}

#[test]
fn eurosat_fixture_gets_readable_names_and_gap_warning() {
    let ds = Dataset::load(DatasetKind::EuroSat, common::fixture_root()).unwrap();
    assert_eq!(ds.train().len(), 3);
    assert_eq!(ds.classnames[0], "Annual Crop Land");
    assert_eq!(ds.classnames[7], "Residential Buildings");
    let report = check_dataset(
        &LoadOptions::new(DatasetKind::EuroSat, common::fixture_root()),
        true,
    );
    assert!(report.is_ok(), "{}", report.render());
    assert_eq!(
        report.warnings(),
        1,
        "labels 1..6 have no images in the trimmed split"
    );
}

#[test]
fn fewshot_folder_depends_on_the_split_file() {
    let root = common::fixture_root();
    let ds = Dataset::load(DatasetKind::Dtd, &root).unwrap();
    assert_eq!(ds.fewshot_dir, root.join("dtd/split_fewshot"));
    let tmp = tempfile::tempdir().unwrap();
    let other = tmp.path().join("split_small.json");
    std::fs::copy(root.join("dtd/split_zhou_DescribableTextures.json"), &other).unwrap();
    let ds = Dataset::load_with(&LoadOptions::new(DatasetKind::Dtd, &root).with_split_file(&other))
        .unwrap();
    assert_eq!(ds.fewshot_dir, root.join("dtd/split_fewshot_split_small"));
    let e =
        Dataset::load_with(&LoadOptions::new(DatasetKind::ImageNet, &root).with_split_file(&other))
            .unwrap_err()
            .to_string();
    assert!(e.contains("drop --split-file"), "{e}");
}
