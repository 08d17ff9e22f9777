//! The generic mini CAPT path (tests/common) evaluated by candle and emitted as ONNX, then run
//! in tract; determinism, external data, f16 weights, and corrupt-file handling.
//!
//! Set `CAPT_ONNX_KEEP=<dir>` to keep the written models there (for `tools/check_onnx.py`);
//! set `CAPT_BLESS=1` to regenerate the committed fixture under `tests/fixtures/onnx/`.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use capt_graph::{CandleOps, DType, HostData, HostTensor};
use capt_onnx::{
    pb, read_model, run_tract, write_model, BuildOptions, Dim, ExternalData, ModelMeta,
    OnnxBuilder, WriteOptions,
};
use common::{mini_capt, params, pixels, OUTPUTS};

const TOL: f32 = 1e-5;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/onnx")
}

fn keep(path: &Path) {
    if let Ok(dir) = std::env::var("CAPT_ONNX_KEEP") {
        std::fs::create_dir_all(&dir).unwrap();
        let name = path.file_name().unwrap();
        std::fs::copy(path, Path::new(&dir).join(name)).unwrap();
        let data = capt_onnx::external_data_path(path);
        if data.exists() {
            std::fs::copy(&data, Path::new(&dir).join(data.file_name().unwrap())).unwrap();
        }
    }
}

fn run_candle(params: &[(String, HostTensor)], x: &HostTensor) -> Vec<HostTensor> {
    let dev = candle_core::Device::Cpu;
    let ops = CandleOps::new(&dev, DType::F32)
        .unwrap()
        .with_params(params.iter().map(|(n, t)| {
            (
                n.clone(),
                t.to_candle(&dev, candle_core::DType::F32).unwrap(),
            )
        }));
    let x = x.to_candle(&dev, candle_core::DType::F32).unwrap();
    mini_capt(&ops, &x)
        .unwrap()
        .iter()
        .map(|t| HostTensor::from_candle(t).unwrap())
        .collect()
}

fn build(params: Vec<(String, HostTensor)>, opts: BuildOptions) -> pb::ModelProto {
    let b = OnnxBuilder::new(params, opts);
    let dims: Vec<Dim> = vec!["N".into(), 3.into(), 16.into(), 16.into()];
    let x = b.input("pixel_values", DType::F32, &dims).unwrap();
    let outs = mini_capt(&b, &x).unwrap();
    // Export-time shapes keep the symbolic batch.
    assert_eq!(
        outs[0].dims(),
        &[Dim::Sym("N".into()), Dim::Known(common::C)]
    );
    assert_eq!(
        outs[3].dims(),
        &[Dim::Sym("N".into()), Dim::Known(common::KP)]
    );
    for (name, v) in OUTPUTS.iter().zip(&outs) {
        b.output(name, v).unwrap();
    }
    let meta = ModelMeta {
        graph_name: "mini_capt".into(),
        doc_string: "capt-onnx test model".into(),
        model_version: 1,
        metadata: BTreeMap::from([
            ("capt.classes".to_string(), "7".to_string()),
            ("capt.test".to_string(), "mini".to_string()),
        ]),
    };
    b.finish(&meta).unwrap()
}

/// Max abs difference of float outputs; integer outputs must be equal.
fn max_diff(a: &HostTensor, b: &HostTensor, what: &str) -> f32 {
    assert_eq!(a.dims(), b.dims(), "{what}: dims");
    match (a.data(), b.data()) {
        (HostData::F32(x), HostData::F32(y)) => x
            .iter()
            .zip(y)
            .map(|(p, q)| (p - q).abs())
            .fold(0.0, f32::max),
        (HostData::I64(x), HostData::I64(y)) => {
            assert_eq!(x, y, "{what}: integer outputs differ");
            0.0
        }
        (x, y) => panic!("{what}: dtype {:?} vs {:?}", x.dtype(), y.dtype()),
    }
}

fn f32s(t: &HostTensor) -> &[f32] {
    match t.data() {
        HostData::F32(v) => v,
        other => panic!("f32 expected, got {:?}", other.dtype()),
    }
}

fn compare(reference: &[HostTensor], got: &[HostTensor], tol: f32, what: &str) -> f32 {
    assert_eq!(reference.len(), got.len());
    let mut worst = 0f32;
    for ((r, g), name) in reference.iter().zip(got).zip(OUTPUTS) {
        let d = max_diff(r, g, &format!("{what}/{name}"));
        assert!(d <= tol, "{what}/{name}: max abs diff {d:e} > {tol:e}");
        worst = worst.max(d);
    }
    worst
}

/// The argmax / top-k decisions in the fixture must not sit on near-ties, or a 1e-7
/// difference between engines could flip them.
fn assert_no_near_ties(logits: &HostTensor) {
    for row in f32s(logits).chunks(common::C) {
        let mut v = row.to_vec();
        v.sort_by(|a, b| b.partial_cmp(a).unwrap());
        assert!(v[0] - v[1] > 1e-3, "near tie in {row:?}");
    }
}

#[test]
fn candle_and_tract_agree() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mini_capt.onnx");
    let model = build(params(), BuildOptions::default());
    write_model(&path, &model, &WriteOptions::default()).unwrap();
    keep(&path);
    for n in [1, 8] {
        let x = pixels(n);
        let want = run_candle(&params(), &x);
        assert_no_near_ties(&want[0]);
        eprintln!(
            "N={n}: pred {:?}, pairs {:?}",
            want[2].data(),
            want[3].data()
        );
        let got = run_tract(&path, std::slice::from_ref(&x)).unwrap();
        let worst = compare(&want, &got, TOL, &format!("tract N={n}"));
        eprintln!("candle vs tract, N={n}: max abs diff {worst:.2e}");
    }
    // The fixture must exercise different predictions (different candidate rows, bank cells
    // with and without -1 padding), not one class for every image.
    let out = run_candle(&params(), &pixels(8));
    let HostData::I64(pred) = out[2].data() else {
        panic!("pred must be I64")
    };
    // Class 0 has only empty cells, odd classes one -1 padded cell, even ones none.
    let covers = |f: &dyn Fn(i64) -> bool| pred.iter().any(|&c| f(c));
    assert!(
        covers(&|c| c == 0) && covers(&|c| c % 2 == 1) && covers(&|c| c > 0 && c % 2 == 0),
        "predictions {pred:?} do not cover empty, padded and full bank rows"
    );
}

#[test]
fn empty_bank_cells_stay_finite_and_agree() {
    // With every cell empty the masked softmax is gated to zero weights: nothing is NaN and
    // both engines agree.
    let mut p = params();
    for (name, t) in p.iter_mut() {
        if name == "cells" {
            *t = HostTensor::i64(t.dims().to_vec(), vec![-1; t.elem_count()]).unwrap();
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty_cells.onnx");
    write_model(
        &path,
        &build(p.clone(), BuildOptions::default()),
        &WriteOptions::default(),
    )
    .unwrap();
    let x = pixels(2);
    let want = run_candle(&p, &x);
    assert!(f32s(&want[0]).iter().all(|v| v.is_finite()));
    compare(&want, &run_tract(&path, &[x]).unwrap(), TOL, "empty cells");
}

#[test]
fn emission_is_deterministic_and_matches_fixture() {
    use prost::Message;
    let a = build(params(), BuildOptions::default()).encode_to_vec();
    let b = build(params(), BuildOptions::default()).encode_to_vec();
    assert_eq!(a, b, "two builds of the same graph differ");

    let dir = tempfile::tempdir().unwrap();
    let (p1, p2) = (dir.path().join("a.onnx"), dir.path().join("b.onnx"));
    let model = build(params(), BuildOptions::default());
    write_model(&p1, &model, &WriteOptions::default()).unwrap();
    write_model(
        &p2,
        &build(params(), BuildOptions::default()),
        &WriteOptions::default(),
    )
    .unwrap();
    let bytes = std::fs::read(&p1).unwrap();
    assert_eq!(bytes, std::fs::read(&p2).unwrap(), "written files differ");
    // Re-writing a model read back from disk gives the same bytes (the size entry is replaced,
    // not duplicated).
    let back = read_model(&p1).unwrap();
    write_model(&p2, &back, &WriteOptions::default()).unwrap();
    assert_eq!(
        bytes,
        std::fs::read(&p2).unwrap(),
        "read + rewrite changed the bytes"
    );

    // The committed fixture pins the bytes across machines and versions of this crate.
    let fixture = fixture_dir().join("mini_capt.onnx");
    if std::env::var("CAPT_BLESS").is_ok_and(|v| v == "1") {
        std::fs::create_dir_all(fixture_dir()).unwrap();
        std::fs::write(&fixture, &bytes).unwrap();
        write_io_json(&fixture_dir().join("mini_capt.io.json"));
    }
    let committed = std::fs::read(&fixture).unwrap_or_default();
    assert!(
        committed == bytes,
        "{} differs from the freshly emitted graph ({} vs {} bytes). If the change to the \
         exported graph is intended, regenerate with `CAPT_BLESS=1 cargo test -p capt-onnx \
         --test export emission_is_deterministic` and re-run tools/check_onnx.py.",
        fixture.display(),
        committed.len(),
        bytes.len()
    );
}

/// Inputs and candle's outputs for `tools/check_onnx.py` (which compares onnxruntime).
fn write_io_json(path: &Path) {
    let x = pixels(8);
    let outs = run_candle(&params(), &x);
    let enc = |t: &HostTensor| {
        let (dtype, data) = match t.data() {
            HostData::F32(v) => ("float32", serde_json::json!(v)),
            HostData::I64(v) => ("int64", serde_json::json!(v)),
            other => panic!("unexpected {:?}", other.dtype()),
        };
        serde_json::json!({"dims": t.dims(), "dtype": dtype, "data": data})
    };
    let mut o = serde_json::Map::new();
    for (name, t) in OUTPUTS.iter().zip(&outs) {
        o.insert(name.to_string(), enc(t));
    }
    let doc = serde_json::json!({
        "inputs": {"pixel_values": enc(&x)},
        "outputs": o,
        "atol": TOL,
        "source": "candle (capt-graph CandleOps), crates/capt-onnx/tests/export.rs",
    });
    std::fs::write(path, serde_json::to_string(&doc).unwrap()).unwrap();
}

#[test]
fn external_data_roundtrip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mini_capt_ext.onnx");
    let model = build(params(), BuildOptions::default());
    let opts = WriteOptions {
        external_data: ExternalData::Always,
    };
    let written = write_model(&path, &model, &opts).unwrap();
    keep(&path);
    let (data_path, data_len) = written.data.clone().expect("external data written");
    assert_eq!(std::fs::metadata(&data_path).unwrap().len(), data_len);
    let first = (
        std::fs::read(&path).unwrap(),
        std::fs::read(&data_path).unwrap(),
    );

    // Big tensors are external, 4096-aligned, small ones stay inline.
    let back = read_model(&path).unwrap();
    let g = back.graph.as_ref().unwrap();
    let ext: Vec<&pb::TensorProto> = g
        .initializer
        .iter()
        .filter(|t| t.data_location == Some(pb::tensor_proto::DataLocation::External as i32))
        .collect();
    assert!(!ext.is_empty());
    for t in &ext {
        assert!(t.raw_data.is_empty());
        let off: u64 = t
            .external_data
            .iter()
            .find(|e| e.key == "offset")
            .unwrap()
            .value
            .parse()
            .unwrap();
        assert_eq!(off % capt_onnx::EXTERNAL_ALIGN, 0);
    }
    assert!(g.initializer.iter().any(|t| !t.raw_data.is_empty()));

    let x = pixels(2);
    compare(
        &run_candle(&params(), &x),
        &run_tract(&path, std::slice::from_ref(&x)).unwrap(),
        TOL,
        "external data",
    );

    // Deterministic, both files.
    write_model(&path, &model, &opts).unwrap();
    assert_eq!(first.0, std::fs::read(&path).unwrap());
    assert_eq!(first.1, std::fs::read(&data_path).unwrap());

    // A missing or short data file is reported with its name.
    std::fs::write(&data_path, &first.1[..first.1.len() / 2]).unwrap();
    let err = read_model(&path).unwrap_err().to_string();
    assert!(err.contains("mini_capt_ext.onnx.data"), "{err}");
    std::fs::remove_file(&data_path).unwrap();
    let err = read_model(&path).unwrap_err().to_string();
    assert!(err.contains("mini_capt_ext.onnx.data"), "{err}");
}

#[test]
fn f16_weights_cast_at_load() {
    let opts = BuildOptions {
        weights_f16: true,
        f16_min_elems: 64,
    };
    let dir = tempfile::tempdir().unwrap();
    let (p32, p16) = (
        dir.path().join("f32.onnx"),
        dir.path().join("mini_capt_f16.onnx"),
    );
    let s32 = write_model(
        &p32,
        &build(params(), BuildOptions::default()),
        &WriteOptions::default(),
    )
    .unwrap()
    .model_bytes;
    let s16 = write_model(&p16, &build(params(), opts), &WriteOptions::default())
        .unwrap()
        .model_bytes;
    keep(&p16);
    assert!(s16 < s32, "f16 file {s16} B vs f32 {s32} B");
    // Every large float parameter is stored as f16 (half the bytes), under its own name.
    let inits = |p: &Path| read_model(p).unwrap().graph.unwrap().initializer;
    let (i32s, i16s) = (inits(&p32), inits(&p16));
    let f16: Vec<&pb::TensorProto> = i16s
        .iter()
        .filter(|t| t.data_type == pb::tensor_proto::DataType::Float16 as i32)
        .collect();
    let expected = params()
        .iter()
        .filter(|(_, t)| t.dtype() == DType::F32 && t.elem_count() >= 64)
        .count();
    assert_eq!(f16.len(), expected);
    for t in f16 {
        let full = i32s.iter().find(|u| u.name == t.name).unwrap();
        assert_eq!(full.raw_data.len(), 2 * t.raw_data.len(), "{}", t.name);
    }

    // Exactly candle with the weights rounded to f16 (compute stays f32).
    let rounded: Vec<(String, HostTensor)> = params()
        .into_iter()
        .map(|(n, t)| match t.data() {
            HostData::F32(v) if v.len() >= 64 => {
                let r = v.iter().map(|x| half::f16::from_f32(*x).to_f32()).collect();
                (n, HostTensor::f32(t.dims().to_vec(), r).unwrap())
            }
            _ => (n, t),
        })
        .collect();
    let x = pixels(3);
    let got = run_tract(&p16, std::slice::from_ref(&x)).unwrap();
    compare(
        &run_candle(&rounded, &x),
        &got,
        TOL,
        "f16 weights vs rounded candle",
    );
    let full = run_candle(&params(), &x);
    let drift = max_diff(&full[1], &got[1], "probs");
    eprintln!("f16 weights: {s16} B vs {s32} B; probs drift vs f32 weights {drift:.2e}");
    assert!(drift < 5e-2, "f16 weights moved probs by {drift}");
}

#[test]
fn truncated_or_corrupt_files_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("good.onnx");
    write_model(
        &path,
        &build(params(), BuildOptions::default()),
        &WriteOptions::default(),
    )
    .unwrap();
    let bytes = std::fs::read(&path).unwrap();
    read_model(&path).unwrap();

    // Every strict prefix is rejected, whether or not it ends on a protobuf field boundary.
    let bad = dir.path().join("bad.onnx");
    for cut in (0..bytes.len()).rev() {
        match capt_onnx::decode_model(&bad, &bytes[..cut]) {
            Ok(_) => panic!(
                "a file truncated to {cut} of {} bytes was accepted",
                bytes.len()
            ),
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.contains("bad.onnx"), "{msg}");
                if cut == bytes.len() / 2 || cut == bytes.len() - 1 {
                    eprintln!("truncated to {cut}: {msg}");
                }
            }
        }
    }
    std::fs::write(&bad, &bytes[..bytes.len() - 1]).unwrap();
    assert!(read_model(&bad).is_err());
    // Garbage and appended bytes.
    std::fs::write(&bad, b"this is not an onnx model at all").unwrap();
    let msg = read_model(&bad).unwrap_err().to_string();
    assert!(msg.contains("re-export"), "{msg}");
    let mut longer = bytes.clone();
    longer.extend_from_slice(&[0u8; 3]);
    std::fs::write(&bad, &longer).unwrap();
    assert!(read_model(&bad).is_err());
    // A missing file names the path.
    let msg = read_model(&dir.path().join("missing.onnx"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("missing.onnx"), "{msg}");
    // tract refuses a truncated file too (and the error comes back, not a panic).
    std::fs::write(&bad, &bytes[..bytes.len() / 2]).unwrap();
    assert!(run_tract(&bad, &[pixels(1)]).is_err());
}

#[test]
fn builder_errors_name_the_problem() {
    use capt_graph::Ops;
    let b = OnnxBuilder::new(params(), BuildOptions::default());
    let err = b.param("visual.proj").unwrap_err().to_string();
    assert!(err.contains("visual.proj"), "{err}");
    let x = b.input("x", DType::F32, &["N".into(), 5.into()]).unwrap();
    let w = b.param("proj").unwrap(); // [8, 6]
    let err = b.matmul(&x, &w).unwrap_err().to_string();
    assert!(err.contains("matmul"), "{err}");
    assert!(
        b.input("x", DType::F32, &[1.into()]).is_err(),
        "duplicate name accepted"
    );
    let idx = b
        .constant(&HostTensor::f32(vec![1], vec![0.0]).unwrap())
        .unwrap();
    assert!(b.gather(&w, &idx, 0).is_err(), "float indices accepted");
    assert!(
        b.squeeze(&x, 0).is_err(),
        "squeeze of a symbolic dim accepted"
    );
    let err = OnnxBuilder::new(vec![], BuildOptions::default())
        .finish(&ModelMeta::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("no outputs"), "{err}");
}
