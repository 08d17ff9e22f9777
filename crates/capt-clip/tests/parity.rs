//! capt-clip vs HF transformers `CLIPModel` (float64 reference outputs from tools/ref_clip.py).

mod common;

use candle_core::{DType, Device, Tensor};
use capt_clip::{ClipModel, DeepTextPrompts, Mode, VisualPrompts};
use common::{assert_close, get, reference, tiny_hf, tiny_openai};

const F32_TOL: f64 = 1e-5;
const F64_TOL: f64 = 1e-10;

fn load(dtype: DType, mode: Mode) -> ClipModel {
    let mut m = ClipModel::load(tiny_hf(), dtype, &Device::Cpu).unwrap();
    m.set_mode(mode);
    m
}

/// Text / image embeddings, local tokens and logits.
fn check_base(m: &ClipModel, tol: f64, what: &str) {
    let r = reference();
    let dtype = m.text.dtype();
    let text = m.text.forward_ids(&get(&r, "text.input_ids")).unwrap();
    assert_close(&format!("{what} text"), &text, &get(&r, "text.embeds"), tol);
    let pixels = get(&r, "image.pixels").to_dtype(dtype).unwrap();
    let img = m.vision.forward(&pixels, None).unwrap();
    assert_close(
        &format!("{what} image"),
        &img.global,
        &get(&r, "image.embeds"),
        tol,
    );
    assert_close(
        &format!("{what} local"),
        &img.local,
        &get(&r, "image.local"),
        tol,
    );
    let logits = m.logits(&img.global, &text).unwrap();
    assert_close(
        &format!("{what} logits"),
        &logits,
        &get(&r, "logits_per_image"),
        tol,
    );
}

trait ScalarF64 {
    fn to_scalar_f64(&self) -> f64;
}

impl ScalarF64 for Tensor {
    fn to_scalar_f64(&self) -> f64 {
        self.to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }
}

#[test]
fn f32_matches_hf_in_both_modes() {
    check_base(&load(DType::F32, Mode::Autograd), F32_TOL, "f32 autograd");
    check_base(&load(DType::F32, Mode::Fast), F32_TOL, "f32 fast");
}

#[test]
fn f64_matches_hf_tightly() {
    check_base(&load(DType::F64, Mode::Autograd), F64_TOL, "f64");
}

#[test]
fn logit_scale_is_loaded() {
    let m = load(DType::F32, Mode::Auto);
    let want = get(&reference(), "logit_scale").to_scalar_f64();
    assert!((m.logit_scale().to_scalar_f64() - want).abs() < 1e-6);
}

#[test]
fn openai_names_give_identical_outputs() {
    // The OpenAI-named dict (mapped independently in Python and checked there against open_clip)
    // must load into exactly the same model; its width 32 needs the config (heads not inferable).
    let cfg = capt_clip::ClipConfig::from_hf_config_json(tiny_hf().join("config.json")).unwrap();
    let oa =
        ClipModel::load_with_config(tiny_openai(), Some(&cfg), DType::F32, &Device::Cpu).unwrap();
    let hf = load(DType::F32, Mode::Auto);
    let r = reference();
    let ids = get(&r, "text.input_ids");
    let a = oa.text.forward_ids(&ids).unwrap();
    let b = hf.text.forward_ids(&ids).unwrap();
    assert_eq!(common::max_abs_diff(&a, &b), 0.0);
    let px = get(&r, "image.pixels");
    let a = oa.vision.forward(&px, None).unwrap();
    let b = hf.vision.forward(&px, None).unwrap();
    assert_eq!(common::max_abs_diff(&a.global, &b.global), 0.0);
    assert_eq!(common::max_abs_diff(&a.local, &b.local), 0.0);
    check_base(&oa, F32_TOL, "openai names");
}

fn check_prompts(dtype: DType, tol: f64) {
    let m = load(dtype, Mode::Auto);
    let r = reference();
    let ids = get(&r, "prompt.class_ids");
    let want_eot: Vec<usize> = get(&r, "prompt.eot")
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|e| e as usize)
        .collect();
    let ctx = get(&r, "prompt.ctx").to_dtype(dtype).unwrap();

    let p = m.text.build_prompts(&ctx, &ids).unwrap();
    assert_eq!(p.eot_positions, want_eot);
    assert_close("prompt embeds", &p.embeds, &get(&r, "prompt.embeds"), tol);
    let out = m
        .text
        .forward_embeds(&p.embeds, &p.eot_positions, None)
        .unwrap();
    assert_close("shared ctx", &out, &get(&r, "prompt.out"), tol);

    let ctx_cs = get(&r, "prompt.ctx_cs").to_dtype(dtype).unwrap();
    let p_cs = m.text.build_prompts(&ctx_cs, &ids).unwrap();
    let out = m
        .text
        .forward_embeds(&p_cs.embeds, &p_cs.eot_positions, None)
        .unwrap();
    assert_close("class-specific ctx", &out, &get(&r, "prompt.out_cs"), tol);

    let deep = get(&r, "prompt.deep").to_dtype(dtype).unwrap();
    let deep = DeepTextPrompts {
        layers: (0..deep.dim(0).unwrap())
            .map(|i| deep.get(i).unwrap())
            .collect(),
    };
    let out = m
        .text
        .forward_embeds(&p.embeds, &p.eot_positions, Some(&deep))
        .unwrap();
    assert_close("deep text prompts", &out, &get(&r, "prompt.out_deep"), tol);

    let vp = get(&r, "vprompt.layers").to_dtype(dtype).unwrap();
    let vp = VisualPrompts {
        layers: (0..vp.dim(0).unwrap())
            .map(|i| vp.get(i).unwrap())
            .collect(),
    };
    let px = get(&r, "image.pixels");
    let out = m.vision.forward(&px, Some(&vp)).unwrap();
    assert_close(
        "visual prompts global",
        &out.global,
        &get(&r, "vprompt.global"),
        tol,
    );
    assert_close(
        "visual prompts local",
        &out.local,
        &get(&r, "vprompt.local"),
        tol,
    );
}

#[test]
fn prompt_paths_match_reference_f32() {
    check_prompts(DType::F32, F32_TOL);
}

#[test]
fn prompt_paths_match_reference_f64() {
    check_prompts(DType::F64, F64_TOL);
}

/// Row `[SOT, toks..., EOT, 0...]` of length 77.
fn row(tokens: &[u32]) -> Vec<u32> {
    let mut r = vec![598];
    r.extend_from_slice(tokens);
    r.push(599);
    r.resize(77, 0);
    r
}

#[test]
fn prompt_with_phrase_embeddings_equals_token_path_exactly() {
    for mode in [Mode::Autograd, Mode::Fast] {
        let m = load(DType::F32, mode);
        let phrase = [11u32, 22, 33, 44]; // "a photo of a"
        let classes: Vec<Vec<u32>> = vec![
            vec![7, 8],
            vec![100],
            (1..=74).map(|i| 200 + i).collect(), // truncated after splicing
        ];
        let class_ids: Vec<u32> = classes.iter().flat_map(|c| row(c)).collect();
        let class_ids = Tensor::from_vec(class_ids, (3, 77), &Device::Cpu).unwrap();
        let full: Vec<u32> = classes
            .iter()
            .flat_map(|c| {
                let mut t = phrase.to_vec();
                t.extend_from_slice(c);
                t.truncate(75); // the tokenizer's own truncation keeps EOT at 76
                row(&t)
            })
            .collect();
        let full = Tensor::from_vec(full, (3, 77), &Device::Cpu).unwrap();

        let phrase = Tensor::new(&phrase, &Device::Cpu).unwrap();
        let ctx = m.text.token_embedding(&phrase).unwrap();
        let p = m.text.build_prompts(&ctx, &class_ids).unwrap();
        assert_eq!(p.eot_positions, vec![7, 6, 76]);
        let via_prompt = m
            .text
            .forward_embeds(&p.embeds, &p.eot_positions, None)
            .unwrap();
        let via_ids = m.text.forward_ids(&full).unwrap();
        assert_eq!(common::max_abs_diff(&via_prompt, &via_ids), 0.0, "{mode:?}");
        // Deep prompts really replace the slots: zero tokens change the result.
        let zeros = DeepTextPrompts {
            layers: vec![ctx.zeros_like().unwrap()],
        };
        let deep = m
            .text
            .forward_embeds(&p.embeds, &p.eot_positions, Some(&zeros))
            .unwrap();
        assert!(common::max_abs_diff(&deep, &via_ids) > 1e-4);
    }
}

#[test]
fn batch_rows_are_independent() {
    // Batched and one-by-one image/text forward agree (no cross-talk through reshapes).
    let m = load(DType::F32, Mode::Fast);
    let r = reference();
    let px = get(&r, "image.pixels");
    let all = m.vision.forward(&px, None).unwrap();
    for i in 0..px.dim(0).unwrap() {
        let one = m
            .vision
            .forward(&px.narrow(0, i, 1).unwrap(), None)
            .unwrap();
        assert_close(
            "image row",
            &one.local,
            &all.local.narrow(0, i, 1).unwrap(),
            1e-6,
        );
    }
    let ids = get(&r, "text.input_ids");
    let all = m.text.forward_ids(&ids).unwrap();
    for i in 0..ids.dim(0).unwrap() {
        let one = m.text.forward_ids(&ids.narrow(0, i, 1).unwrap()).unwrap();
        assert_close("text row", &one, &all.narrow(0, i, 1).unwrap(), 1e-5);
    }
}
