//! Checkpoint loading: formats, dtypes, named errors, config parsing and inference, hashing.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use capt_clip::load::{infer_config, CheckpointFormat};
use capt_clip::{
    backbone_hash, expected_tensors, Activation, ClipConfig, ClipError, ClipModel, Mode,
};
use common::{assert_close, get, reference, tiny_hf, tiny_openai};

fn read(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

/// A copy of the tiny HF checkpoint with `edit` applied to its tensors.
fn edited_hf(edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut t = read(&tiny_hf().join("model.safetensors"));
    edit(&mut t);
    candle_core::safetensors::save(&t, dir.path().join("model.safetensors")).unwrap();
    std::fs::copy(
        tiny_hf().join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    dir
}

fn err_of(r: capt_clip::Result<ClipModel>) -> ClipError {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e,
    }
}

#[test]
fn missing_tensor_is_named() {
    let name = "vision_model.encoder.layers.1.mlp.fc2.bias";
    let dir = edited_hf(|t| {
        t.remove(name);
    });
    let e = err_of(ClipModel::load(dir.path(), DType::F32, &Device::Cpu));
    let msg = e.to_string();
    assert!(
        matches!(&e, ClipError::MissingTensor { name: n, expected, .. } if n == name && expected == &[48])
    );
    assert!(
        msg.contains(name) && msg.contains("[48]") && msg.contains("model.safetensors"),
        "{msg}"
    );
}

#[test]
fn misshaped_tensor_is_named() {
    let name = "text_model.encoder.layers.0.self_attn.k_proj.weight";
    let dir = edited_hf(|t| {
        t.insert(
            name.into(),
            Tensor::zeros((32, 31), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let e = err_of(ClipModel::load(dir.path(), DType::F32, &Device::Cpu));
    let msg = e.to_string();
    assert!(
        matches!(&e, ClipError::ShapeMismatch { name: n, expected, found, .. }
        if n == name && expected == &[32, 32] && found == &[32, 31])
    );
    assert!(
        msg.contains(name) && msg.contains("[32, 32]") && msg.contains("[32, 31]"),
        "{msg}"
    );
}

#[test]
fn missing_openai_tensor_is_named_by_its_openai_name() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = read(&tiny_openai());
    t.remove("visual.transformer.resblocks.0.attn.in_proj_weight");
    let file = dir.path().join("clip.safetensors");
    candle_core::safetensors::save(&t, &file).unwrap();
    let cfg = ClipConfig::from_hf_config_json(tiny_hf().join("config.json")).unwrap();
    let e = err_of(ClipModel::load_with_config(
        &file,
        Some(&cfg),
        DType::F32,
        &Device::Cpu,
    ));
    assert!(
        matches!(&e, ClipError::MissingTensor { name, expected, .. }
        if name == "visual.transformer.resblocks.0.attn.in_proj_weight" && expected == &[144, 48]),
        "{e}"
    );
}

#[test]
fn bad_config_is_named() {
    let cases = [
        (
            "text_config",
            "hidden_act",
            serde_json::json!("relu"),
            "text_config.hidden_act",
        ),
        (
            "vision_config",
            "num_attention_heads",
            serde_json::json!(5),
            "vision_config.num_attention_heads",
        ),
        (
            "vision_config",
            "patch_size",
            serde_json::json!(7),
            "vision_config.patch_size",
        ),
        (
            "vision_config",
            "image_size",
            serde_json::json!([32, 48]),
            "vision_config.image_size",
        ),
        (
            "text_config",
            "hidden_size",
            serde_json::json!("big"),
            "text_config.hidden_size",
        ),
    ];
    for (section, key, value, field) in cases {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(tiny_hf().join("config.json")).unwrap())
                .unwrap();
        cfg[section][key] = value;
        std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
        std::fs::copy(
            tiny_hf().join("model.safetensors"),
            dir.path().join("model.safetensors"),
        )
        .unwrap();
        let e = err_of(ClipModel::load(dir.path(), DType::F32, &Device::Cpu));
        let msg = e.to_string();
        assert!(
            matches!(&e, ClipError::UnsupportedConfig { field: f, .. } if f == field),
            "{field}: {msg}"
        );
        assert!(msg.contains("config.json") && msg.contains(field), "{msg}");
    }
    // A vision-only config is not a CLIPModel config.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"model_type": "clip_vision_model"}"#,
    )
    .unwrap();
    let e = ClipConfig::from_hf_config_json(dir.path().join("config.json")).unwrap_err();
    assert!(e.to_string().contains("model_type"), "{e}");
}

#[test]
fn not_a_checkpoint_errors() {
    let dir = tempfile::tempdir().unwrap();
    let e = err_of(ClipModel::load(dir.path(), DType::F32, &Device::Cpu));
    assert!(matches!(e, ClipError::UnknownFormat { .. }), "{e}");
    let e = err_of(ClipModel::load(
        dir.path().join("nope.safetensors"),
        DType::F32,
        &Device::Cpu,
    ));
    assert!(matches!(e, ClipError::Io { .. }), "{e}");
    let file = dir.path().join("x.safetensors");
    let t = HashMap::from([(
        "foo".to_string(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    )]);
    candle_core::safetensors::save(&t, &file).unwrap();
    let e = err_of(ClipModel::load(&file, DType::F32, &Device::Cpu));
    assert!(
        matches!(e, ClipError::UnknownFormat { .. }) && e.to_string().contains("foo"),
        "{e}"
    );
    let e = err_of(ClipModel::load(tiny_hf(), DType::U8, &Device::Cpu));
    assert!(matches!(e, ClipError::UnsupportedDType(DType::U8)), "{e}");
}

#[test]
fn hf_config_files_parse() {
    let b16 = ClipConfig::from_hf_config_json(
        common::fixtures().join("openai-clip-vit-base-patch16.config.json"),
    )
    .unwrap();
    assert_eq!(b16, ClipConfig::vit_b16());
    let tiny = ClipConfig::from_hf_config_json(tiny_hf().join("config.json")).unwrap();
    let mut want = ClipConfig::tiny();
    want.text.hidden_act = Activation::Gelu;
    assert_eq!(tiny, want);
}

#[test]
fn config_inferred_from_openai_shapes() {
    let file = tiny_openai();
    let shapes: HashMap<String, Vec<usize>> = read(&file)
        .into_iter()
        .map(|(k, t)| (k, t.dims().to_vec()))
        .collect();
    // Width 32 has no OpenAI head count (width / 64): a clear error, not a guess.
    let e = infer_config(&shapes, CheckpointFormat::OpenAi, &file).unwrap_err();
    assert!(e.to_string().contains("head count"), "{e}");
    // The same shapes scaled to widths 128 / 192 infer every field.
    let scaled: HashMap<String, Vec<usize>> = shapes
        .into_iter()
        .map(|(k, s)| {
            let s = s
                .into_iter()
                .map(|d| match d {
                    32 => 128,
                    48 => 192,
                    96 => 288,
                    144 => 576,
                    d => d,
                })
                .collect();
            (k, s)
        })
        .collect();
    let cfg = infer_config(&scaled, CheckpointFormat::OpenAi, &file).unwrap();
    assert_eq!(
        (
            cfg.text.vocab_size,
            cfg.text.hidden_size,
            cfg.text.num_attention_heads
        ),
        (600, 128, 2)
    );
    assert_eq!(
        (
            cfg.text.num_hidden_layers,
            cfg.text.max_position_embeddings,
            cfg.text.intermediate_size
        ),
        (2, 77, 64)
    );
    assert_eq!(
        (
            cfg.vision.hidden_size,
            cfg.vision.num_attention_heads,
            cfg.vision.num_hidden_layers
        ),
        (192, 3, 2)
    );
    assert_eq!(
        (
            cfg.vision.image_size,
            cfg.vision.patch_size,
            cfg.vision.intermediate_size
        ),
        (32, 8, 288)
    );
    assert_eq!(cfg.projection_dim, 24);
}

#[test]
fn expected_tensors_are_exactly_what_the_model_reads() {
    let cfg = ClipConfig::tiny();
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    ClipModel::new(vb, &cfg).unwrap();
    let mut read: Vec<(String, Vec<usize>)> = vm
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.dims().to_vec()))
        .collect();
    read.sort();
    let mut want = expected_tensors(&cfg);
    want.sort();
    assert_eq!(read, want);
}

#[test]
fn half_precision_loads() {
    let r = reference();
    let m16 = ClipModel::load(tiny_hf(), DType::F16, &Device::Cpu).unwrap();
    assert_eq!(m16.text.dtype(), DType::F16);
    assert_eq!(m16.vision.dtype(), DType::F16);
    for mode in [Mode::Autograd, Mode::Fast] {
        let mut m = m16.clone();
        m.set_mode(mode);
        let text = m.text.forward_ids(&get(&r, "text.input_ids")).unwrap();
        assert_eq!(text.dtype(), DType::F16);
        assert_close("f16 text", &text, &get(&r, "text.embeds"), 2e-2);
        let img = m.vision.forward(&get(&r, "image.pixels"), None).unwrap();
        assert_close("f16 image", &img.global, &get(&r, "image.embeds"), 2e-2);
    }
    let bf = ClipModel::load(tiny_hf(), DType::BF16, &Device::Cpu).unwrap();
    assert_eq!(bf.vision.dtype(), DType::BF16);
    let want = get(&r, "logit_scale").to_scalar::<f64>().unwrap();
    let got = bf
        .logit_scale()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!((got - want).abs() < 1e-2);
    // The OpenAI-named file loads in half precision too.
    let cfg = ClipConfig::from_hf_config_json(tiny_hf().join("config.json")).unwrap();
    ClipModel::load_with_config(tiny_openai(), Some(&cfg), DType::F16, &Device::Cpu).unwrap();
}

#[test]
fn backbone_hash_is_sha256_of_the_weights_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("model.safetensors");
    std::fs::write(&file, b"abc").unwrap();
    let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
    assert_eq!(backbone_hash(&file).unwrap(), abc);
    assert_eq!(backbone_hash(dir.path()).unwrap(), abc);
    let m = ClipModel::load(tiny_hf(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        backbone_hash(m.weights_file().unwrap()).unwrap(),
        backbone_hash(tiny_hf()).unwrap()
    );
}
