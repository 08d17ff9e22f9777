//! `capt-edge add-class` / `remove-class` through the binary, on a real CAPT export
//! (tests/fixtures/edge/capt, written by capt-export): the label set changes atomically,
//! `classify` serves the new classes, and bad requests are named errors that leave the model
//! untouched.

mod common;

use std::path::Path;
use std::process::Output;

fn capt_fixture() -> std::path::PathBuf {
    common::fixture().join("capt")
}

fn run(args: &[&str]) -> Output {
    common::bin().args(args).output().unwrap()
}

fn copy_model(to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(capt_fixture()).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
    }
}

fn classes(dir: &Path) -> Vec<String> {
    capt_backend::ModelDir::open(dir)
        .unwrap()
        .manifest
        .class_names
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn add_and_remove_classes_then_classify() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    copy_model(&dir);
    let m = dir.to_str().unwrap();
    let before = classes(&dir);

    let o = run(&["add-class", "--model", m, "zebra stripes", "polka dots"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("added 2 class(es)"), "{}", text(&o));
    let after = classes(&dir);
    assert_eq!(after.len(), before.len() + 2);
    assert_eq!(&after[before.len()..], ["zebra stripes", "polka dots"]);

    // classify reports probabilities over the extended label set.
    let img = common::fixture().join("images/noise_32.png");
    let o = run(&[
        "classify",
        "--model",
        m,
        "--json",
        "--top-k",
        "12",
        img.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("zebra stripes") && out.contains("polka dots"),
        "{out}"
    );

    let o = run(&["remove-class", "--model", m, "polka dots", &before[0]]);
    assert!(o.status.success(), "{}", text(&o));
    let left = classes(&dir);
    assert_eq!(left.len(), before.len());
    assert!(!left.contains(&before[0]) && !left.contains(&"polka dots".to_string()));
}

#[test]
fn bad_edits_are_named_and_leave_the_model_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    copy_model(&dir);
    let m = dir.to_str().unwrap();
    let manifest = std::fs::read(dir.join("capt.json")).unwrap();
    for (args, needle) in [
        (vec!["add-class", "--model", m, "banded"], "already a class"),
        (vec!["remove-class", "--model", m, "nope"], "not a class"),
        (vec!["add-class", "--model", m, "a", "a"], "twice"),
    ] {
        let o = run(&args);
        assert!(!o.status.success());
        assert!(text(&o).contains(needle), "{args:?}: {}", text(&o));
    }
    assert_eq!(std::fs::read(dir.join("capt.json")).unwrap(), manifest);
    // A model without a text encoder cannot grow.
    std::fs::remove_file(dir.join("text_encoder.onnx")).unwrap();
    let o = run(&["add-class", "--model", m, "zebra"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("text_encoder"), "{}", text(&o));
    // A model from another exporter (no model_spec) is refused with the fix.
    let o = run(&[
        "add-class",
        "--model",
        common::fixture().join("model").to_str().unwrap(),
        "zebra",
    ]);
    assert!(!o.status.success());
    assert!(text(&o).contains("re-export"), "{}", text(&o));
}
