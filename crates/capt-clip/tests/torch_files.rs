//! OpenAI's checkpoint files read in Rust, no Python: a TorchScript archive like the released
//! `ViT-B-16.pt` (fp16 weights) and a `torch.save` state dict, both made from OpenAI's model
//! code by tools/make_openai_fixture.py, against that model's embeddings (<= 1e-5 in f32).
//! Bad files get named errors.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use capt_clip::{Activation, ClipError, ClipModel, LoadOptions};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/clip/openai-tiny")
}

fn reference() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join("reference.json")).unwrap()).unwrap()
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .flat_map(|x| match x.as_array() {
            Some(row) => row.iter().map(|y| y.as_f64().unwrap() as f32).collect(),
            None => vec![x.as_f64().unwrap() as f32],
        })
        .collect()
}

fn max_diff(a: &Tensor, b: &[f32]) -> f32 {
    a.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn load(file: &Path, arch: Option<&str>) -> capt_clip::Result<ClipModel> {
    ClipModel::load_with(
        file,
        &LoadOptions { config: None, arch },
        DType::F32,
        &Device::Cpu,
    )
}

/// Max deviation of the model's embeddings from OpenAI's model's (reference.json).
fn deviation(m: &ClipModel) -> (f32, f32) {
    let r = reference();

    let shape: Vec<usize> = r["pixels_shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect();
    let pixels = Tensor::from_vec(floats(&r["pixels"]), shape, &Device::Cpu).unwrap();
    let img = m.vision.forward(&pixels, None).unwrap().global;
    let want = floats(&r["image_embeds"]);
    assert_eq!(img.elem_count(), want.len());
    let di = max_diff(&img, &want);

    let rows: Vec<Vec<u32>> = r["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect();
    let ids = Tensor::new(rows, &Device::Cpu).unwrap();
    let text = m.text.forward_ids(&ids).unwrap();
    let want = floats(&r["text_embeds"]);
    assert_eq!(text.elem_count(), want.len());
    (di, max_diff(&text, &want))
}

fn check_parity(file: &Path, arch: Option<&str>) {
    let m = load(file, arch).unwrap();
    let cfg = m.config();
    assert_eq!(cfg.projection_dim, 32);
    assert_eq!(cfg.vision.image_size, 32);
    assert_eq!(cfg.text.num_hidden_layers, 2);
    assert_eq!(cfg.vision.hidden_act, Activation::QuickGelu);
    let (di, dt) = deviation(&m);
    assert!(
        di <= 1e-5,
        "{}: image embeddings differ by {di}",
        file.display()
    );
    assert!(
        dt <= 1e-5,
        "{}: text embeddings differ by {dt}",
        file.display()
    );
}

/// OpenAI's TorchScript says what it is (`__torch__.clip.model.CLIP`): QuickGELU, no --arch.
#[test]
fn openai_torchscript_checkpoint_matches_its_pytorch_model() {
    check_parity(&dir().join("ViT-tiny.pt"), None);
}

/// A bare state dict cannot tell QuickGELU from GELU: `--arch` says it.
#[test]
fn torch_save_state_dict_matches_its_pytorch_model() {
    check_parity(&dir().join("state_dict.pt"), Some("openai"));
    check_parity(&dir().join("state_dict.pt"), Some("ViT-tiny-quickgelu"));
}

#[test]
fn an_open_clip_checkpoint_without_its_architecture_is_refused_by_name() {
    let e = load(&dir().join("state_dict.pt"), None).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, ClipError::UnknownArch { .. }), "{msg}");
    assert!(
        msg.contains("state_dict.pt")
            && msg.contains("--arch ViT-B-16-quickgelu")
            && msg.contains("open_clip_config.json"),
        "{msg}"
    );
    let e = load(&dir().join("state_dict.pt"), Some("resnet50")).unwrap_err();
    assert!(e.to_string().contains("--arch resnet50"), "{e}");
}

/// open_clip's own config decides: `quick_gelu: true` gives OpenAI's model, its default
/// (false) a GELU model, whose features differ.
#[test]
fn open_clip_config_chooses_gelu_or_quickgelu() {
    for (quick, want) in [(true, Activation::QuickGelu), (false, Activation::Gelu)] {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("open_clip_pytorch_model.bin");
        std::fs::copy(dir().join("state_dict.pt"), &file).unwrap();
        let cfg = serde_json::json!({
            "model_cfg": {
                "embed_dim": 32,
                "quick_gelu": quick,
                "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
                "text_cfg": {"context_length": 77, "vocab_size": 1000, "width": 64, "heads": 1, "layers": 2}
            }
        });
        std::fs::write(tmp.path().join("open_clip_config.json"), cfg.to_string()).unwrap();
        let m = load(tmp.path(), None).unwrap();
        assert_eq!(m.config().vision.hidden_act, want);
        assert_eq!(m.config().text.hidden_act, want);
        let (di, _) = deviation(&m);
        if quick {
            assert!(di <= 1e-5, "{di}");
        } else {
            assert!(di > 1e-3, "GELU should change the features: {di}");
        }
    }
    // --arch names: open_clip's plain names are GELU.
    let m = load(&dir().join("state_dict.pt"), Some("ViT-B-16")).unwrap();
    assert_eq!(m.config().vision.hidden_act, Activation::Gelu);
}

#[test]
fn a_folder_with_one_pytorch_file_resolves_to_it() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(dir().join("ViT-tiny.pt"), tmp.path().join("ViT-tiny.pt")).unwrap();
    let files = capt_clip::load::resolve_checkpoint(tmp.path()).unwrap();
    assert_eq!(files.weights, tmp.path().join("ViT-tiny.pt"));
    load(tmp.path(), None).unwrap();
}

#[test]
fn truncated_or_foreign_pytorch_files_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(dir().join("ViT-tiny.pt")).unwrap();
    // Cut in the middle: the zip directory at the end is gone.
    let cut = tmp.path().join("cut.pt");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = ClipModel::load(&cut, DType::F32, &Device::Cpu).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(e, ClipError::UnknownFormat { .. })
            && msg.contains("cut.pt")
            && msg.contains("truncated"),
        "{msg}"
    );
    // A zip that is no PyTorch file.
    let other = tmp.path().join("other.pt");
    let mut z = zip::ZipWriter::new(std::fs::File::create(&other).unwrap());
    z.start_file(
        "readme.txt",
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored),
    )
    .unwrap();
    std::io::Write::write_all(&mut z, b"hello").unwrap();
    z.finish().unwrap();
    let msg = ClipModel::load(&other, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("other.pt") && msg.contains("data.pkl"),
        "{msg}"
    );
    // A readable PyTorch file of another model (a small ResNet-like state dict).
    let msg = ClipModel::load(dir().join("not_clip.pt"), DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("not_clip.pt") && msg.contains("not a CLIP state dict"),
        "{msg}"
    );
    // OpenAI's ResNet CLIPs have OpenAI names but another image tower: named as such.
    let rn = tmp.path().join("RN50.safetensors");
    let z = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
    let tensors: std::collections::HashMap<String, Tensor> = [
        ("token_embedding.weight".to_string(), z(&[10, 8])),
        ("visual.conv1.weight".to_string(), z(&[4, 3, 3, 3])),
        ("visual.layer1.0.conv1.weight".to_string(), z(&[4, 4, 1, 1])),
        (
            "visual.attnpool.positional_embedding".to_string(),
            z(&[5, 8]),
        ),
    ]
    .into_iter()
    .collect();
    candle_core::safetensors::save(&tensors, &rn).unwrap();
    let msg = ClipModel::load(&rn, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("RN50.safetensors") && msg.contains("ResNet CLIP"),
        "{msg}"
    );
    // A pre-1.6 torch.save file (a bare pickle).
    let old = tmp.path().join("old.pth");
    std::fs::write(&old, b"\x80\x02}q\x00.").unwrap();
    let msg = ClipModel::load(&old, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("old.pth") && msg.contains("pre-1.6"), "{msg}");
}
