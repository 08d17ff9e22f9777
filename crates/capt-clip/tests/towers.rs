//! The two CLIP definitions agree tower by tower: `capt_model::clip` (written over
//! `capt_graph::Ops`, what capt-export emits as ONNX) run under `CandleOps`, against this
//! crate's towers (fused kernels, autograd, what capt-train runs), on the tiny HF fixture.

mod common;

use candle_core::{DType, Device, Tensor};
use capt_core::ClipTokenizer;
use capt_graph::CandleOps;
use capt_model::ClipSpec;
use common::*;

#[test]
fn capt_model_towers_under_candle_equal_capt_clip() {
    let dev = Device::Cpu;
    let (cfg, tensors, _) = capt_clip::load_hf_tensors(tiny_hf(), None).unwrap();
    let model = capt_clip::ClipModel::load(tiny_hf(), DType::F32, &dev).unwrap();
    let spec = ClipSpec::from(&cfg);
    let ops = CandleOps::new(&dev, capt_graph::DType::F32)
        .unwrap()
        .with_params(tensors);

    // Vision: a deterministic image batch of 2.
    let s = cfg.vision.image_size;
    let n = 2 * 3 * s * s;
    let px: Vec<f32> = (0..n)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();
    let pixels = Tensor::from_vec(px, (2, 3, s, s), &dev).unwrap();
    let (global, local) = capt_model::clip::vision(&ops, &spec, &pixels, 0).unwrap();
    let want = model.vision.forward(&pixels, None).unwrap();
    let dg = max_abs_diff(&global, &want.global);
    let dl = max_abs_diff(&local, &want.local);
    println!("vision: global {dg:.2e}, local {dl:.2e}");
    assert!(dg <= 1e-5 && dl <= 1e-5, "vision towers differ: {dg} {dl}");

    // Text: three prompts of different lengths, folded into the tiny vocabulary.
    let tok = ClipTokenizer::bundled().unwrap();
    let texts = [
        "a photo of a cat.",
        "banded",
        "a very long description of a striped fabric.",
    ];
    let lists: Vec<(String, Vec<u32>)> = texts
        .iter()
        .map(|t| (t.to_string(), tok.encode(t).unwrap()))
        .collect();
    let len = cfg.text.max_position_embeddings;
    let ids = capt_model::tokens::rows(&lists, cfg.text.vocab_size, len, 0).unwrap();
    let ids_t = ids.to_candle(&dev, DType::F32).unwrap();
    let got = capt_model::clip::text(&ops, &spec, &ids_t, len, None, 0).unwrap();
    let want = model
        .text
        .forward_ids(&ids_t.to_dtype(DType::U32).unwrap())
        .unwrap();
    let dt = max_abs_diff(&got, &want);
    println!("text: {dt:.2e}");
    assert!(dt <= 1e-5, "text towers differ: {dt}");
}
