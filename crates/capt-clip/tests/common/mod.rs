//! Shared helpers for the integration tests: fixture paths and comparisons.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/clip")
}

pub fn tiny_hf() -> PathBuf {
    fixtures().join("tiny-hf")
}

pub fn tiny_openai() -> PathBuf {
    fixtures().join("tiny-openai/model.safetensors")
}

/// Inputs and float64 outputs written by tools/ref_clip.py.
pub fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("reference.safetensors"), &Device::Cpu)
        .expect("tests/fixtures/clip/reference.safetensors (regenerate with tools/ref_clip.py)")
}

pub fn get(r: &HashMap<String, Tensor>, name: &str) -> Tensor {
    r.get(name)
        .unwrap_or_else(|| panic!("reference tensor {name} missing"))
        .clone()
}

/// Max |a - b| in f64.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

pub fn assert_close(name: &str, got: &Tensor, want: &Tensor, tol: f64) {
    let d = max_abs_diff(got, want);
    eprintln!("{name}: max abs diff {d:.2e}");
    assert!(d <= tol, "{name}: max abs diff {d:e} > {tol:e}");
}
