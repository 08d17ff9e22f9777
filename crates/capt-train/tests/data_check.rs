//! `capt-train data check` on the shipped fixture, on a broken copy, and on bad names.

use std::path::{Path, PathBuf};

fn fixture_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/coop")
}

mod common;

/// `capt-train ARGS`: (exit code, stdout, stderr), through the suite's one runner.
fn capt_train(args: &[&str]) -> (i32, String, String) {
    let r = common::capt_train(args);
    (r.code, r.stdout, r.stderr)
}

/// A scratch folder removed on drop (no tempfile dependency in this crate).
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let p = std::env::temp_dir().join(format!(
            "capt-data-check-{tag}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

#[test]
fn clean_fixture_passes_with_counts() {
    let root = fixture_root();
    let (code, out, err) = capt_train(&[
        "data",
        "check",
        "--dataset",
        "dtd",
        "--root",
        root.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("train: 20 images, 10 classes"), "{out}");
    assert!(out.contains("val: 10 images, 10 classes"), "{out}");
    assert!(out.contains("crystalline"), "{out}");
    assert!(out.contains("images checked: 50"), "{out}");
    assert!(out.contains("OK: 0 error(s)"), "{out}");
}

#[test]
fn broken_copy_lists_all_problems_and_fails() {
    let s = Scratch::new("broken");
    copy_tree(&fixture_root().join("dtd"), &s.0.join("dtd"));
    std::fs::remove_file(s.0.join("dtd/images/banded/banded_0106.jpg")).unwrap();
    std::fs::write(s.0.join("dtd/images/bubbly/bubbly_0159.jpg"), b"garbage").unwrap();
    let (code, out, _) = capt_train(&[
        "data",
        "check",
        "--dataset",
        "DescribableTextures",
        "--root",
        s.0.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("missing image") && out.contains("banded_0106.jpg"),
        "{out}"
    );
    assert!(
        out.contains("undecodable image") && out.contains("bubbly_0159.jpg"),
        "{out}"
    );
    assert!(out.contains("FAILED: 2 error(s)"), "{out}");
}

#[test]
fn bad_names_and_paths_fail_clearly() {
    let (code, _, err) = capt_train(&["data", "check", "--dataset", "mnist", "--root", "."]);
    assert_ne!(code, 0);
    assert!(err.contains("unknown dataset \"mnist\""), "{err}");
    let s = Scratch::new("empty");
    let (code, out, _) = capt_train(&[
        "data",
        "check",
        "--dataset",
        "pets",
        "--root",
        s.0.to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(
        out.contains("oxford_pets") && out.contains("$DATA"),
        "{out}"
    );
}

#[test]
fn fewshot_subcommand_samples_and_caches() {
    let s = Scratch::new("fewshot");
    let root = fixture_root();
    let args = [
        "data",
        "fewshot",
        "--dataset",
        "dtd",
        "--root",
        root.to_str().unwrap(),
        "--shots",
        "2",
        "--seed",
        "1",
        "--subsample",
        "base",
        "--cache-dir",
        s.0.to_str().unwrap(),
    ];
    let (code, out, err) = capt_train(&args);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("sampled and cached") && out.contains("classes 5  train 10  val 5  test 10"),
        "{out}"
    );
    assert!(s.0.join("shot_2-seed_1.json").is_file());
    let (_, out, _) = capt_train(&args);
    assert!(out.contains("loaded from cache"), "{out}");
}

#[test]
fn samples_are_test_images_one_per_class() {
    let root = fixture_root();
    let (code, out, err) = capt_train(&[
        "data",
        "samples",
        "--dataset",
        "dtd",
        "--root",
        root.to_str().unwrap(),
        "--n",
        "3",
    ]);
    assert_eq!(code, 0, "{err}");
    let paths: Vec<&str> = out.lines().collect();
    assert_eq!(paths.len(), 3, "{out}");
    let classes: std::collections::BTreeSet<&str> = paths
        .iter()
        .map(|p| {
            assert!(Path::new(p).is_file(), "{p} does not exist");
            Path::new(p)
                .parent()
                .and_then(|d| d.file_name())
                .and_then(|n| n.to_str())
                .unwrap()
        })
        .collect();
    assert_eq!(classes.len(), 3, "one image per class: {paths:?}");
}
