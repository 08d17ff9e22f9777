//! The tract backend against the committed fixture model and its onnxruntime reference
//! outputs (tools/gen_edge_fixture.py).

use std::path::{Path, PathBuf};

use capt_backend::{max_abs_diff, synthetic_batch, warm_up, Backend, ModelDir};
use capt_backend_tract::{TractBackend, TractOptions};
use sha2::Digest;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/edge")
}

fn reference() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture().join("reference.json")).unwrap())
        .unwrap()
}

fn rows(v: &serde_json::Value) -> Vec<Vec<f32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect()
}

fn load(threads: usize) -> (ModelDir, TractBackend) {
    let dir = ModelDir::open(fixture().join("model")).unwrap();
    let b = TractBackend::load(
        &dir,
        &TractOptions {
            threads,
            ..Default::default()
        },
    )
    .unwrap();
    (dir, b)
}

#[test]
fn matches_onnxruntime_on_synthetic_batch() {
    let reference = reference();
    for threads in [1, 2] {
        let (dir, backend) = load(threads);
        warm_up(&backend, &dir).unwrap();
        let out = backend.classify(&synthetic_batch(3, 32)).unwrap();
        assert_eq!((out.n, out.classes), (3, 5));
        let logits = rows(&reference["synthetic"]["logits"]);
        let probs = rows(&reference["synthetic"]["probs"]);
        for i in 0..3 {
            // logits carry CLIP's logit scale (100): 1e-4 absolute is 1e-6 relative.
            let dl = max_abs_diff(out.logits_row(i), &logits[i]);
            let dp = max_abs_diff(out.probs_row(i), &probs[i]);
            assert!(
                dl <= 1e-4 && dp <= 1e-5,
                "row {i}: logits diff {dl}, probs diff {dp}"
            );
        }
    }
}

#[test]
fn batch_rows_are_independent_of_batch_size() {
    let (_, backend) = load(2);
    let b3 = synthetic_batch(3, 32);
    let all = backend.classify(&b3).unwrap();
    let per = 3 * 32 * 32;
    for i in 0..3 {
        let one = capt_backend::ImageBatch {
            data: b3.data[i * per..(i + 1) * per].to_vec(),
            n: 1,
            height: 32,
            width: 32,
        };
        let o = backend.classify(&one).unwrap();
        assert!(max_abs_diff(o.probs_row(0), all.probs_row(i)) <= 1e-6);
    }
}

#[test]
fn images_match_reference() {
    let reference = reference();
    let (dir, backend) = load(2);
    for img in reference["images"].as_array().unwrap() {
        let file = img["file"].as_str().unwrap();
        let pixels = dir
            .manifest
            .preprocess
            .preprocess_file(&fixture().join("images").join(file))
            .unwrap();
        let batch = capt_backend::ImageBatch {
            data: pixels,
            n: 1,
            height: 32,
            width: 32,
        };
        let out = backend.classify(&batch).unwrap();
        let probs: Vec<f32> = img["probs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        let d = max_abs_diff(out.probs_row(0), &probs);
        // capt-core reproduces Pillow's decoding and bicubic resize, so even the resized JPEG
        // and PNG match the Python pipeline (PIL + onnxruntime).
        assert!(d <= 1e-5, "{file}: probs diff {d}");
    }
}

#[test]
fn wrong_input_and_output_names_are_named_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let onnx = std::fs::read(fixture().join("bad_io/classifier.onnx")).unwrap();
    std::fs::write(tmp.path().join("classifier.onnx"), &onnx).unwrap();
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("model/capt.json")).unwrap())
            .unwrap();
    m["files"]["classifier"]["sha256"] = hex::encode(sha2::Sha256::digest(&onnx)).into();
    std::fs::write(tmp.path().join("capt.json"), m.to_string()).unwrap();
    let dir = ModelDir::open(tmp.path()).unwrap();
    let err = TractBackend::load(&dir, &TractOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("classifier.onnx")
            && err.contains("pixel_values")
            && err.contains("re-export"),
        "{err}"
    );
}

#[test]
fn class_count_mismatch_fails_warm_up() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture().join("model/classifier.onnx"),
        tmp.path().join("classifier.onnx"),
    )
    .unwrap();
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("model/capt.json")).unwrap())
            .unwrap();
    m["class_names"]
        .as_array_mut()
        .unwrap()
        .push("extra".into());
    std::fs::write(tmp.path().join("capt.json"), m.to_string()).unwrap();
    let dir = ModelDir::open(tmp.path()).unwrap();
    let backend = TractBackend::load(&dir, &TractOptions::default()).unwrap();
    let err = warm_up(&backend, &dir).unwrap_err().to_string();
    assert!(
        err.contains("5 classes") && err.contains("6 class_names"),
        "{err}"
    );
}

#[test]
fn crop_mismatch_is_a_contract_error() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture().join("model/classifier.onnx"),
        tmp.path().join("classifier.onnx"),
    )
    .unwrap();
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("model/capt.json")).unwrap())
            .unwrap();
    m["preprocess"]["crop"] = 64.into();
    std::fs::write(tmp.path().join("capt.json"), m.to_string()).unwrap();
    let dir = ModelDir::open(tmp.path()).unwrap();
    let err = TractBackend::load(&dir, &TractOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("[?,3,32,32]") && err.contains("[N,3,64,64]"),
        "{err}"
    );
    // A wrongly shaped batch is rejected before tract sees it.
    let (_, backend) = load(1);
    let err = backend
        .classify(&synthetic_batch(1, 16))
        .unwrap_err()
        .to_string();
    assert!(err.contains("[N,3,32,32]"), "{err}");
}

/// The three ways a batch runs give the same answer: images side by side on single-threaded
/// plans (2 threads), image by image on one plan (1 thread), and a plan compiled for N=3.
#[test]
fn batch_paths_agree() {
    let dir = ModelDir::open(fixture().join("model")).unwrap();
    let side_by_side = TractBackend::load(
        &dir,
        &TractOptions {
            threads: 2,
            fixed_batches: vec![],
        },
    )
    .unwrap();
    let fixed = TractBackend::load(
        &dir,
        &TractOptions {
            threads: 1,
            fixed_batches: vec![1, 3],
        },
    )
    .unwrap();
    for n in [1, 2, 3, 5] {
        let x = synthetic_batch(n, 32);
        let a = side_by_side.classify(&x).unwrap();
        let b = fixed.classify(&x).unwrap();
        assert_eq!((a.n, b.n), (n, n));
        assert_eq!(a.classes, b.classes);
        // Summation order differs between plans; logits carry CLIP's x100 scale.
        let (dp, dl) = (
            max_abs_diff(&a.probs, &b.probs),
            max_abs_diff(&a.logits, &b.logits),
        );
        assert!(
            dp <= 1e-6 && dl <= 1e-4,
            "batch {n}: probs {dp}, logits {dl}"
        );
        // Row i of the batch is image i alone.
        let last = synthetic_batch(n, 32);
        let one = capt_core::ImageBatch {
            data: last.data[(n - 1) * 3 * 32 * 32..].to_vec(),
            n: 1,
            height: 32,
            width: 32,
        };
        let solo = side_by_side.classify(&one).unwrap();
        let d = max_abs_diff(solo.logits_row(0), a.logits_row(n - 1));
        assert!(d <= 1e-4, "batch {n}, last row: {d}");
    }
}
