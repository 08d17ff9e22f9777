//! Shared by the capt-export integration tests: paths, a short training run on the DTD
//! fixture, tract loading, and the capt-train side of the parity checks.
#![allow(dead_code, unused_imports)]

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
pub use capt_backend::max_abs_diff;
use capt_backend::ModelDir;
use capt_backend_tract::{TractBackend, TractOptions};
use capt_core::ImageBatch;
use capt_train::backbone::{BackboneSpec, ImageEncoder};
use capt_train::model::Feats;

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The tiny CLIP, or `CAPT_EXPORT_BACKBONE` (e.g. the random ViT-B/16 of
/// tools/bench_export.sh) to run the same checks at full size.
pub fn backbone_dir() -> PathBuf {
    std::env::var_os("CAPT_EXPORT_BACKBONE")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("tests/fixtures/clip/tiny-hf"))
}

/// One epoch of `method` on the DTD fixture with the tiny test config, into `out`.
pub fn train(out: &Path, method: capt_method::Method, seed: u64) {
    let mut config = capt_train::config::RunConfig::from_toml_file(
        &repo().join("tests/fixtures/train/tiny.toml"),
    )
    .unwrap();
    config.capt.optim.epochs = 1;
    config.capt.method = method;
    let args = capt_train::fit::FitArgs {
        dataset: "dtd".parse().unwrap(),
        root: repo().join("tests/fixtures/coop"),
        split_file: None,
        config,
        backbone: BackboneSpec::Path(backbone_dir()),
        device: Device::Cpu,
        dtype: DType::F32,
        seed,
        subsample: capt_data::Subsample::All,
        out: out.to_path_buf(),
        resume: false,
        stop_after: None,
        feature_cache: None,
        progress: false,
    };
    capt_train::fit::fit(&args).unwrap();
}

/// The MGDE gains every parity check runs with: all three experts clearly active (a one-epoch
/// run on the tiny CLIP leaves them near their zero initialisation, where an expert's path
/// could be wrong without any logit showing it).
pub const ACTIVE_GAINS: [f32; 3] = [0.6, -0.4, 0.5];

/// Writes `gains` into the checkpoint of run `out` (`capt.mgde.gains` in learned.safetensors).
pub fn set_gains(out: &Path, gains: [f32; 3]) {
    let dir = capt_checkpoint::resolve(out).unwrap();
    let mut t = capt_checkpoint::read_tensors(&dir, capt_checkpoint::LEARNED).unwrap();
    let g = t
        .get_mut(capt_method::head::GAINS)
        .expect("a CAPT checkpoint has gains");
    *g = capt_graph::HostTensor::f32(g.dims().to_vec(), gains.to_vec()).unwrap();
    std::fs::write(
        dir.join(capt_checkpoint::LEARNED),
        capt_checkpoint::serialize_tensors(&t, None).unwrap(),
    )
    .unwrap();
}

/// The exported classifier of `dir` on tract (one thread).
pub fn tract(dir: &Path) -> TractBackend {
    let md = ModelDir::open(dir).unwrap();
    TractBackend::load(
        &md,
        &TractOptions {
            threads: 1,
            fixed_batches: vec![],
        },
    )
    .unwrap()
}

/// capt-train's scorer of checkpoint `ckpt` on `classes` (`None`: the trained classes), as
/// `capt-train eval` builds it.
pub fn eval_scorer(ckpt: &Path, classes: Option<&[String]>) -> capt_train::evaluate::Scorer {
    let dir = capt_train::checkpoint::resolve(ckpt).unwrap();
    let state = capt_train::checkpoint::read_state(&dir).unwrap();
    let bb = capt_train::backbone::Backbone::load(
        &BackboneSpec::Path(backbone_dir()),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let classes = classes.unwrap_or(&state.class_names).to_vec();
    capt_train::evaluate::scorer_from_checkpoint(bb, &dir, &state, &classes).unwrap()
}

/// Logits of a capt-train scorer on a batch, the way `capt-train eval` computes them.
pub fn logits_of(scorer: &capt_train::evaluate::Scorer, batch: &ImageBatch) -> Vec<f32> {
    let grid = scorer.model.cfg.capt.bank.local_grid;
    let enc = ImageEncoder::new(&scorer.model.backbone, grid).unwrap();
    let px = Tensor::from_vec(
        batch.data.clone(),
        (batch.n, 3, batch.height, batch.width),
        &Device::Cpu,
    )
    .unwrap();
    let (global, local) = enc.encode_pixels(&px).unwrap();
    let l = scorer.logits(&Feats { global, local }).unwrap();
    l.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}
