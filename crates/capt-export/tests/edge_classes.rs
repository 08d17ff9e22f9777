//! Adding and removing classes at the edge (`capt-edge add-class/remove-class`) on models
//! written by capt-export: the text encoder's embeddings land in the classifier, CoOp logits
//! with added classes equal capt-train's on the extended class list, an add followed by a
//! remove restores the CAPT classifier's logits, and an f16-compute export stays f16 compute.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use capt_backend::{Backend, ModelDir};
use capt_core::{ImageBatch, PreprocessConfig};
use capt_export::{Classes, ExportOptions, Precision};
use common::*;

fn batch(size: u32) -> ImageBatch {
    let root = repo().join("tests/fixtures/coop/dtd/images");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .flat_map(|c| std::fs::read_dir(c.unwrap().path()).unwrap())
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let pre = PreprocessConfig::clip(size);
    let data: Vec<f32> = files
        .iter()
        .step_by(3)
        .take(5)
        .flat_map(|f| pre.preprocess_file(f).unwrap())
        .collect();
    ImageBatch {
        n: data.len() / (3 * size as usize * size as usize),
        data,
        height: size as usize,
        width: size as usize,
    }
}

fn classify(dir: &Path, b: &ImageBatch) -> (Vec<String>, Vec<f32>) {
    let names = ModelDir::open(dir).unwrap().manifest.class_names;
    (names, tract(dir).classify(b).unwrap().logits)
}

/// Trains `method` with `seed` in `tmp`, exports it with `opts` to `tmp/model`; returns the
/// export source (class names, spec) and the model directory.
fn trained_export(
    tmp: &Path,
    method: capt_method::Method,
    seed: u64,
    opts: &ExportOptions,
) -> (capt_export::ExportSource, PathBuf) {
    let run = tmp.join("run");
    train(&run, method, seed);
    let out = tmp.join("model");
    let src = capt_export::from_checkpoint(&run, None, &Classes::Trained).unwrap();
    capt_export::export(&src, opts, &out).unwrap();
    (src, out)
}

const NEW: [&str; 2] = ["zebra stripes", "polka dots"];

/// Adds [`NEW`] to the model at `out` (which had `before` classes); returns the new names and
/// the class names and logits of `b` afterwards, checked for length and finiteness.
fn add_new(out: &Path, b: &ImageBatch, before: usize) -> (Vec<String>, Vec<String>, Vec<f32>) {
    let new: Vec<String> = NEW.iter().map(|s| s.to_string()).collect();
    capt_package::classes::add_classes(out, &new).unwrap();
    let (names, logits) = classify(out, b);
    assert_eq!(names.len(), before + 2);
    assert!(logits.iter().all(|v| v.is_finite()));
    (new, names, logits)
}

/// The parameters of the model's current classifier, as `capt-edge` reads them back.
fn classifier_params(out: &Path) -> BTreeMap<String, capt_graph::HostTensor> {
    let path = ModelDir::open(out).unwrap().classifier_path();
    capt_onnx::read_params(&capt_onnx::read_model(&path).unwrap()).unwrap()
}

#[test]
fn coop_with_added_classes_equals_capt_train_on_the_extended_list() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, out) = trained_export(
        tmp.path(),
        capt_method::Method::Coop,
        2,
        &ExportOptions::default(),
    );
    let new: Vec<String> = NEW.iter().map(|s| s.to_string()).collect();
    let edit = capt_package::classes::add_classes(&out, &new).unwrap();
    assert_eq!(edit.classes, src.class_names.len() + 2);
    let b = batch(src.spec.clip.vision.image_size as u32);
    let (names, got) = classify(&out, &b);
    let mut all = src.class_names.clone();
    all.extend(new.clone());
    assert_eq!(names, all);
    // capt-train scoring the checkpoint on the extended class list.
    let scorer = eval_scorer(&tmp.path().join("run"), Some(&all));
    let want = logits_of(&scorer, &b);
    let d = max_abs_diff(&got, &want);
    println!("CoOp + 2 added classes vs capt-train eval: max |dlogit| {d:.3e}");
    assert!(d <= 1e-4);
    // The old classifier file is gone, the manifest names the new one, hashes check out.
    assert!(!out.join("classifier.onnx").exists());
    ModelDir::open(&out).unwrap();
}

#[test]
fn capt_add_then_remove_restores_the_classifier_and_errors_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, out) = trained_export(
        tmp.path(),
        capt_method::Method::Capt,
        2,
        &ExportOptions::default(),
    );
    let b = batch(src.spec.clip.vision.image_size as u32);
    let (names0, logits0) = classify(&out, &b);
    let (new, names1, _) = add_new(&out, &b, names0.len());
    // New classes have candidate partners from the prior and empty cells.
    let p = classifier_params(&out);
    let cells = p[capt_model::names::table("cells").as_str()]
        .as_i64()
        .unwrap();
    let per_class = cells.len() / names1.len();
    assert!(cells[names0.len() * per_class..].iter().all(|&c| c == -1));
    let cand = p[capt_model::names::table("cand_index").as_str()]
        .as_i64()
        .unwrap();
    let k = cand.len() / names1.len();
    for (y, row) in cand.chunks(k).enumerate() {
        assert!(row
            .iter()
            .all(|&j| j as usize != y && (j as usize) < names1.len()));
    }

    capt_package::classes::remove_classes(&out, &new).unwrap();
    let (names2, logits2) = classify(&out, &b);
    assert_eq!(names2, names0);
    let d = max_abs_diff(&logits2, &logits0);
    println!("CAPT add 2 + remove 2 vs original: max |dlogit| {d:.3e}");
    assert!(d <= 1e-5);

    // Removing a trained class refills the candidate lists that named it.
    let gone = names0[0].clone();
    let edit = capt_package::classes::remove_classes(&out, std::slice::from_ref(&gone)).unwrap();
    assert_eq!(edit.classes, names0.len() - 1);
    let (names3, logits3) = classify(&out, &b);
    assert!(!names3.contains(&gone));
    assert!(logits3.iter().all(|v| v.is_finite()));

    // Errors name the problem.
    let err =
        capt_package::classes::add_classes(&out, std::slice::from_ref(&names3[0])).unwrap_err();
    assert!(err.to_string().contains("already a class"), "{err}");
    let err = capt_package::classes::remove_classes(&out, &["no such".to_string()]).unwrap_err();
    assert!(err.to_string().contains("not a class"), "{err}");
    let err = capt_package::classes::remove_classes(&out, &names3[1..]).unwrap_err();
    assert!(err.to_string().contains("at least 2"), "{err}");
    let long = "word ".repeat(80);
    let err = capt_package::classes::add_classes(&out, &[long]).unwrap_err();
    assert!(err.to_string().contains("shorter name"), "{err}");
}

#[test]
fn f16_compute_export_stays_f16_through_class_edits() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = ExportOptions {
        precision: Precision::F16,
        ..Default::default()
    };
    let (src, out) = trained_export(tmp.path(), capt_method::Method::Capt, 3, &opts);
    let b = batch(src.spec.clip.vision.image_size as u32);
    let (names0, logits0) = classify(&out, &b);
    let params0 = classifier_params(&out);
    let (new, _, _) = add_new(&out, &b, names0.len());
    // Still f16 compute: recorded, MatMul operands typed F16, parameters read back.
    let md = ModelDir::open(&out).unwrap();
    assert_eq!(md.manifest.precision, capt_package::Precision::F16);
    let path = md.classifier_path();
    let model = capt_onnx::read_model(&path).unwrap();
    let types = capt_onnx::tract_value_types(&path).unwrap();
    let g = model.graph.as_ref().unwrap();
    let matmuls: Vec<_> = g.node.iter().filter(|n| n.op_type == "MatMul").collect();
    assert!(!matmuls.is_empty());
    for n in matmuls {
        for i in &n.input {
            assert_eq!(types[i], "F16", "{} input {i}", n.name);
        }
    }
    let p = capt_onnx::read_params(&model).unwrap();
    let emb = p[capt_model::names::CLASS_EMB].as_f32().unwrap();
    let emb0 = params0[capt_model::names::CLASS_EMB].as_f32().unwrap();
    assert_eq!(
        &emb[..emb0.len()],
        emb0,
        "existing class embeddings changed"
    );

    capt_package::classes::remove_classes(&out, &new).unwrap();
    let (names2, logits2) = classify(&out, &b);
    assert_eq!(names2, names0);
    let d = max_abs_diff(&logits2, &logits0);
    println!("f16 CAPT add 2 + remove 2 vs original: max |dlogit| {d:.3e}");
    assert!(d <= 1e-5);
}

#[test]
fn int8_compute_export_stays_int8_through_class_edits() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = ExportOptions {
        precision: Precision::Int8,
        ..Default::default()
    };
    let (src, out) = trained_export(tmp.path(), capt_method::Method::Capt, 4, &opts);
    let b = batch(src.spec.clip.vision.image_size as u32);
    let (names0, logits0) = classify(&out, &b);
    let (new, _, _) = add_new(&out, &b, names0.len());
    // Still integer compute: recorded, and the re-emitted classifier runs MatMulInteger.
    let md = ModelDir::open(&out).unwrap();
    assert_eq!(md.manifest.precision, Precision::Int8);
    let model = capt_onnx::read_model(&md.classifier_path()).unwrap();
    let ops = |op: &str| {
        model
            .graph
            .as_ref()
            .unwrap()
            .node
            .iter()
            .filter(|n| n.op_type == op)
            .count()
    };
    assert!(ops("MatMulInteger") > 0 && ops("DynamicQuantizeLinear") > 0);
    // Re-quantising the read-back weights gives the same int8 values: removing the added
    // classes restores the logits.
    capt_package::classes::remove_classes(&out, &new).unwrap();
    let (names2, logits2) = classify(&out, &b);
    assert_eq!(names2, names0);
    let d = max_abs_diff(&logits2, &logits0);
    println!("int8 CAPT add 2 + remove 2 vs original: max |dlogit| {d:.3e}");
    assert!(d <= 1e-5);
}
