//! The trained model on the tiny backbone: CAPT starts exactly at CoOp, gradients reach every
//! learned tensor, and the full CAPT loss's gradient matches finite differences (F64).

use crate::backbone::Backbone;
use crate::config::RunConfig;
use crate::model::{Feats, Model};
use crate::optim::Sgd;
use crate::rng;
use crate::tables::TableCache;
use candle_core::{DType, Device, Tensor};
use capt_clip::ClipConfig;
use capt_method::{ConfusionBank, Method};

const NAMES: [&str; 6] = [
    "banded",
    "blotchy",
    "braided",
    "bubbly",
    "bumpy",
    "chequered",
];

fn config(method: Method) -> RunConfig {
    let mut c = RunConfig::default();
    c.capt.method = method;
    c.capt.sem.k_cand = 3;
    c.capt.sem.k_pairs = 2;
    c.capt.bank.cell_size = 3;
    // Every pair a batch uses is re-encoded with gradient (exercises the multi-pair splice).
    c.trainer.grad_pairs = 0;
    c
}

fn model(method: Method, dtype: DType) -> Model {
    let bb = Backbone::random(&ClipConfig::tiny(), 11, true, dtype, &Device::Cpu).unwrap();
    let names: Vec<String> = NAMES.iter().map(|s| s.to_string()).collect();
    Model::new(bb, &config(method), &names, "a photo of a {}.", 16, 4).unwrap()
}

fn feats(n: usize, seed: u64, dtype: DType) -> Feats {
    let mut r = rng::rng(seed, 99, 0);
    let (d, g) = (24, 16);
    Feats {
        global: Tensor::from_vec(rng::normal(&mut r, n * d, 1.0), (n, d), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap(),
        local: Tensor::from_vec(rng::normal(&mut r, n * g * d, 1.0), (n, g, d), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap(),
    }
}

/// A bank in which every class was confused a few times (non-empty cells).
fn bank(m: &Model) -> ConfusionBank {
    let c = m.num_classes();
    let mut b = ConfusionBank::new(c, 24, 16, &m.cfg.capt.bank);
    let f = feats(4 * c, 5, DType::F32);
    let g = f.global.to_vec2::<f32>().unwrap();
    let l = f
        .local
        .reshape((4 * c, 16 * 24))
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    for i in 0..4 * c {
        let y = i % c;
        let mut probs = vec![0.05f32; c];
        probs[(y + 1 + i / c) % c] = 0.7;
        b.observe(y, &probs, &g[i], &l[i]).unwrap();
    }
    b
}

fn labels(n: usize) -> Tensor {
    Tensor::from_vec(
        (0..n as u32).map(|i| i % 6).collect::<Vec<_>>(),
        n,
        &Device::Cpu,
    )
    .unwrap()
}

#[test]
fn capt_at_init_equals_coop_exactly() {
    let coop = model(Method::Coop, DType::F32);
    let capt = model(Method::Capt, DType::F32);
    let cache = TableCache::build(&capt, &bank(&capt)).unwrap();
    let x = feats(8, 1, DType::F32);
    let t_coop = coop.class_embeddings(false).unwrap();
    let t_capt = capt.class_embeddings(false).unwrap();
    assert_eq!(
        t_coop.to_vec2::<f32>().unwrap(),
        t_capt.to_vec2::<f32>().unwrap()
    );
    let a = coop
        .predict(&x, &t_coop, None)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let b = capt
        .predict(&x, &t_capt, Some(&cache))
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(a, b, "CAPT logits at init differ from CoOp's");
    // And the training forward too (gradient-path kernels on both sides).
    let y = labels(8);
    let la = coop
        .train_forward(&x, &y, None)
        .unwrap()
        .logits
        .to_vec2::<f32>()
        .unwrap();
    let lb = capt
        .train_forward(&x, &y, Some(&cache))
        .unwrap()
        .logits
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(la, lb);
}

/// Makes every CAPT path strongly active for the finite-difference check: non-zero gains
/// (zero at init) and larger adapter output layers and alpha.
fn activate(m: &Model) {
    let set = |name: &str, std: f64, seed: u64| {
        let v = m.params.var(name).unwrap();
        let n = v.elem_count();
        let data = rng::normal(&mut rng::rng(seed, 77, 0), n, std);
        let t = Tensor::from_vec(data, v.dims(), &Device::Cpu)
            .unwrap()
            .to_dtype(v.dtype())
            .unwrap();
        v.set(&t).unwrap();
    };
    set("capt.mgde.gains", 0.5, 1);
    set("capt.sam.global.fc2.weight", 0.05, 2);
    set("capt.sam.local.fc2.weight", 0.05, 3);
    set("capt.sam.alpha", 0.5, 4);
}

/// Two real training steps from the initial parameters: every learned tensor gets a gradient
/// by the second. Step 1 moves the gains off zero (only they, the router through the
/// load-balance term, and the prompt contexts can move the loss at init); step 2 reaches what
/// sits behind a gain. A parameter behind a gain that can never move (the adapter when its
/// output layer AND gains[2] start at zero: `dz_2 = 0` forever) fails here.
#[test]
fn every_learned_tensor_gets_a_gradient() {
    let m = model(Method::Capt, DType::F32);
    let cache = TableCache::build(&m, &bank(&m)).unwrap();
    let x = feats(8, 2, DType::F32);
    let y = labels(8);
    let mut sgd = Sgd::new(0.9, 5e-4, Some(1.0));
    let mut norms: std::collections::BTreeMap<String, f32> = Default::default();
    for step in 0..2 {
        let out = m.train_forward(&x, &y, Some(&cache)).unwrap();
        assert!(out.grad_pairs > 0);
        let grads = out.loss.backward().unwrap();
        for (name, var) in m.params.iter() {
            let n = grads.get(var.as_tensor()).map_or(0.0, |g| {
                g.sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            });
            assert!(n.is_finite(), "step {step}: {name}: |grad|^2 = {n}");
            *norms.entry(name.to_string()).or_default() += n.sqrt();
        }
        sgd.step(&m.params, &grads, 0.5).unwrap();
        if step == 0 {
            // Every expert's gain moved, the sample expert's included.
            let gains = m
                .params
                .get("capt.mgde.gains")
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            // gains[2] is ~1e-4 here; ~4e-10 (rounding) with a zero adapter output layer.
            assert!(gains.iter().all(|g| g.abs() > 1e-5), "{gains:?}");
        }
    }
    // The smallest, alpha's and fc1's, are second order in small numbers (gains[2] times the
    // adapter output) and ~1e-7 here; with a dead sample expert they are ~1e-17 (rounding).
    for (name, n) in &norms {
        assert!(*n > 1e-9, "{name}: |grad| summed over 2 steps = {n:e}");
    }
}

#[test]
fn capt_loss_gradient_matches_finite_differences_f64() {
    let m = model(Method::Capt, DType::F64);
    let cache = TableCache::build(&m, &bank(&m)).unwrap();
    activate(&m);
    let x = feats(6, 3, DType::F64);
    let y = labels(6);
    let loss = |m: &Model| -> f64 {
        m.train_forward(&x, &y, Some(&cache))
            .unwrap()
            .loss
            .to_scalar::<f64>()
            .unwrap()
    };
    let out = m.train_forward(&x, &y, Some(&cache)).unwrap();
    let grads = out.loss.backward().unwrap();
    let probes: [(&str, usize); 9] = [
        ("prompt.ctx", 5),
        ("sem.com_ctx", 3),
        ("sem.dif_ctx", 17),
        ("capt.sam.global.fc1.weight", 2),
        ("capt.sam.local.fc2.weight", 7),
        ("capt.sam.alpha", 0),
        ("capt.mgde.router", 4),
        ("capt.mgde.gains", 1),
        ("capt.mgde.gains", 2),
    ];
    let eps = 1e-5;
    for (name, i) in probes {
        let var = m.params.var(name).unwrap();
        let analytic = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()[i];
        let base = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let at = |delta: f64| {
            let mut v = base.clone();
            v[i] += delta;
            var.set(&Tensor::from_vec(v, var.dims(), &Device::Cpu).unwrap())
                .unwrap();
            let l = loss(&m);
            var.set(&Tensor::from_vec(base.clone(), var.dims(), &Device::Cpu).unwrap())
                .unwrap();
            l
        };
        let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
        let err = (analytic - numeric).abs() / numeric.abs().max(analytic.abs()).max(1e-6);
        assert!(
            err < 1e-4 || (analytic - numeric).abs() < 1e-8,
            "{name}[{i}]: analytic {analytic:e} vs numeric {numeric:e}"
        );
        assert!(analytic != 0.0, "{name}[{i}] has a zero gradient");
    }
}

#[test]
fn truncated_text_sequences_equal_full_length_ones() {
    use crate::prompts::{class_rows, encode_with_context, CTX};
    let m = model(Method::Coop, DType::F32);
    let names: Vec<String> = NAMES.iter().map(|s| s.to_string()).collect();
    let short = class_rows(&m.backbone, &names, 4).unwrap();
    let full = class_rows(&m.backbone, &names, 77).unwrap();
    assert!(short.ids.dim(1).unwrap() < 20 && full.ids.dim(1).unwrap() == 77);
    let ctx = m.params.get(CTX).unwrap();
    let a = encode_with_context(&m.backbone, &ctx, &short, None)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let b = encode_with_context(&m.backbone, &ctx, &full, None)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    for (ra, rb) in a.iter().zip(&b) {
        for (x, y) in ra.iter().zip(rb) {
            assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        }
    }
}

#[test]
fn descriptions_are_added_to_the_pair_embeddings() {
    use crate::prompts::Family;
    use crate::tables::encode_pairs;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("desc.json");
    std::fs::write(
        &file,
        r#"{"banded|blotchy": ["regular parallel stripes", "bands of colour"]}"#,
    )
    .unwrap();
    let bb = Backbone::random(&ClipConfig::tiny(), 11, true, DType::F32, &Device::Cpu).unwrap();
    let names: Vec<String> = NAMES.iter().map(|s| s.to_string()).collect();
    let mut cfg = config(Method::Capt);
    let plain = Model::new(bb.clone(), &cfg, &names, "a photo of a {}.", 16, 4).unwrap();
    cfg.capt.sem.descriptions = Some(file);
    let described = Model::new(bb.clone(), &cfg, &names, "a photo of a {}.", 16, 4).unwrap();
    let pairs = [(0, 1), (1, 0), (2, 3)];
    let sentences = [
        "regular parallel stripes".to_string(),
        "bands of colour".to_string(),
    ];
    let mean = bb
        .encode_texts(&sentences, 8)
        .unwrap()
        .mean(0)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for fam in [Family::Com, Family::Dif] {
        let a = encode_pairs(&plain, fam, &pairs, false)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let b = encode_pairs(&described, fam, &pairs, false)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        // (0, 1) gets the description; (1, 0) only for the symmetric COM; (2, 3) never.
        let expect_added = |row: usize| row == 0 || (row == 1 && fam == Family::Com);
        for row in 0..3 {
            for (k, (x, y)) in a[row].iter().zip(&b[row]).enumerate() {
                let want = if expect_added(row) { x + mean[k] } else { *x };
                assert!((y - want).abs() < 1e-5, "{fam:?} row {row}: {y} vs {want}");
            }
        }
    }
}
