//! Prompt gradients from candle autograd vs central finite differences, in F64, on the tiny
//! fixture model (default `Mode::Auto`, which must pick the autograd-safe kernels).

mod common;

use candle_core::{DType, Device, Tensor, Var};
use capt_clip::{ClipModel, DeepTextPrompts, Mode, VisualPrompts};
use common::{get, reference, tiny_hf};

const H: f64 = 1e-5;

fn model() -> ClipModel {
    ClipModel::load(tiny_hf(), DType::F64, &Device::Cpu).unwrap()
}

/// Fixed, non-symmetric loss weights.
fn weights(shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let w: Vec<f64> = (0..n).map(|i| (i as f64 * 0.731).sin() + 0.25).collect();
    Tensor::from_vec(w, shape, &Device::Cpu).unwrap()
}

fn weighted_sum(x: &Tensor) -> Tensor {
    (x * weights(x.dims())).unwrap().sum_all().unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_scalar::<f64>().unwrap()
}

/// Compares `grad` with central differences of `loss` at a spread of entries of `x`.
fn check_fd(what: &str, x: &Tensor, grad: &Tensor, loss: impl Fn(&Tensor) -> f64) {
    let base: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
    let g: Vec<f64> = grad.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(base.len(), g.len());
    let gmax = g.iter().fold(0f64, |a, b| a.max(b.abs()));
    assert!(gmax > 1e-3, "{what}: gradient is (near) zero: {gmax:e}");
    let n = base.len();
    for k in 0..12 {
        let j = (k * 37 + 5) % n;
        let at = |d: f64| {
            let mut v = base.clone();
            v[j] += d;
            loss(&Tensor::from_vec(v, x.dims(), &Device::Cpu).unwrap())
        };
        let fd = (at(H) - at(-H)) / (2.0 * H);
        let tol = 1e-7 * (1.0 + g[j].abs());
        assert!(
            (fd - g[j]).abs() <= tol,
            "{what}[{j}]: autograd {} vs finite difference {fd}",
            g[j]
        );
    }
}

#[test]
fn shared_ctx_gradient_matches_finite_differences() {
    let m = model();
    let r = reference();
    let ids = get(&r, "prompt.class_ids");
    let ctx = Var::from_tensor(&get(&r, "prompt.ctx")).unwrap();
    let loss = |ctx: &Tensor| {
        let p = m.text.build_prompts(ctx, &ids).unwrap();
        weighted_sum(
            &m.text
                .forward_embeds(&p.embeds, &p.eot_positions, None)
                .unwrap(),
        )
    };
    let grads = loss(ctx.as_tensor()).backward().unwrap();
    let g = grads.get(ctx.as_tensor()).expect("ctx gradient");
    check_fd("shared ctx", ctx.as_tensor(), g, |c| scalar(&loss(c)));
}

#[test]
fn class_specific_ctx_gradient_matches_finite_differences() {
    let m = model();
    let r = reference();
    let ids = get(&r, "prompt.class_ids");
    let ctx = Var::from_tensor(&get(&r, "prompt.ctx_cs")).unwrap();
    let loss = |ctx: &Tensor| {
        let p = m.text.build_prompts(ctx, &ids).unwrap();
        let t = m
            .text
            .forward_embeds(&p.embeds, &p.eot_positions, None)
            .unwrap();
        // Through the logits as the trainer uses them.
        let img = m
            .vision
            .forward(&get(&r, "image.pixels").to_dtype(DType::F64).unwrap(), None)
            .unwrap();
        weighted_sum(&m.logits(&img.global, &t).unwrap())
    };
    let grads = loss(ctx.as_tensor()).backward().unwrap();
    let g = grads.get(ctx.as_tensor()).expect("ctx gradient");
    check_fd("class-specific ctx", ctx.as_tensor(), g, |c| {
        scalar(&loss(c))
    });
}

#[test]
fn deep_text_prompt_gradient_matches_finite_differences() {
    let m = model();
    let r = reference();
    let ids = get(&r, "prompt.class_ids");
    let ctx = Var::from_tensor(&get(&r, "prompt.ctx")).unwrap();
    let deep = Var::from_tensor(&get(&r, "prompt.deep").get(0).unwrap()).unwrap();
    let loss = |ctx: &Tensor, deep: &Tensor| {
        let p = m.text.build_prompts(ctx, &ids).unwrap();
        let d = DeepTextPrompts {
            layers: vec![deep.clone()],
        };
        weighted_sum(
            &m.text
                .forward_embeds(&p.embeds, &p.eot_positions, Some(&d))
                .unwrap(),
        )
    };
    let grads = loss(ctx.as_tensor(), deep.as_tensor()).backward().unwrap();
    let gd = grads.get(deep.as_tensor()).expect("deep prompt gradient");
    check_fd("deep text prompt", deep.as_tensor(), gd, |d| {
        scalar(&loss(ctx.as_tensor(), d))
    });
    let gc = grads
        .get(ctx.as_tensor())
        .expect("ctx gradient with deep prompts");
    check_fd("ctx under deep prompts", ctx.as_tensor(), gc, |c| {
        scalar(&loss(c, deep.as_tensor()))
    });
}

#[test]
fn deep_visual_prompt_gradient_matches_finite_differences() {
    let m = model();
    let r = reference();
    let px = get(&r, "image.pixels").to_dtype(DType::F64).unwrap();
    let vp = get(&r, "vprompt.layers");
    let p0 = Var::from_tensor(&vp.get(0).unwrap()).unwrap();
    let p1 = Var::from_tensor(&vp.get(1).unwrap()).unwrap();
    let loss = |p0: &Tensor, p1: &Tensor| {
        let vp = VisualPrompts {
            layers: vec![p0.clone(), p1.clone()],
        };
        let out = m.vision.forward(&px, Some(&vp)).unwrap();
        (weighted_sum(&out.global) + weighted_sum(&out.local)).unwrap()
    };
    let grads = loss(p0.as_tensor(), p1.as_tensor()).backward().unwrap();
    let g0 = grads
        .get(p0.as_tensor())
        .expect("layer-0 visual prompt gradient");
    check_fd("visual prompt layer 0", p0.as_tensor(), g0, |p| {
        scalar(&loss(p, p1.as_tensor()))
    });
    let g1 = grads
        .get(p1.as_tensor())
        .expect("layer-1 visual prompt gradient");
    check_fd("visual prompt layer 1", p1.as_tensor(), g1, |p| {
        scalar(&loss(p0.as_tensor(), p))
    });
}

#[test]
fn fast_mode_cuts_gradients_and_auto_does_not() {
    // Why `Mode::Auto` exists: the fused kernels have no backward, so forcing them while
    // training silently drops the prompt gradient.
    let mut m = ClipModel::load(tiny_hf(), DType::F32, &Device::Cpu).unwrap();
    let r = reference();
    let ids = get(&r, "prompt.class_ids");
    let ctx = Var::from_tensor(&get(&r, "prompt.ctx").to_dtype(DType::F32).unwrap()).unwrap();
    let grad_norm = |m: &ClipModel| {
        let p = m.text.build_prompts(ctx.as_tensor(), &ids).unwrap();
        let out = m
            .text
            .forward_embeds(&p.embeds, &p.eot_positions, None)
            .unwrap();
        let grads = out.sum_all().unwrap().backward().unwrap();
        grads
            .get(ctx.as_tensor())
            .map(|g| {
                g.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            })
            .unwrap_or(0.0)
    };
    m.set_mode(Mode::Fast);
    assert_eq!(grad_norm(&m), 0.0);
    m.set_mode(Mode::Auto);
    assert!(grad_norm(&m) > 1e-3);
}
