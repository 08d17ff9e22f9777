//! capt-core's image preprocessing against open_clip's eval transform (Resize(224, bicubic) on the
//! PIL image, CenterCrop(224), convert("RGB"), ToTensor, Normalize), on the real images under
//! tests/fixtures/core/images (made by tools/ref_core.py).

use std::path::{Path, PathBuf};

use capt_core::preprocess::{decode_image, decode_image_with_alpha, PreprocessConfig, CLIP_STD};
use image::GenericImageView;
use image::RgbImage;
use serde::Deserialize;

/// Largest allowed per-pixel, per-channel difference from the reference crop, in 8-bit levels.
/// (Measured: 0 on every fixture; JPEGs are decoded by libjpeg-turbo as in Pillow.)
const MAX_LEVELS: u8 = 2;

#[derive(Deserialize)]
struct Reference {
    images: Vec<Entry>,
}

#[derive(Deserialize)]
struct Entry {
    name: String,
    file: String,
    #[serde(rename = "ref")]
    reference: String,
    pil_mode: String,
    width: u32,
    height: u32,
    probes: Vec<(usize, usize, usize, f32)>,
    channel_means: [f32; 3],
}

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/core/images")
}

fn reference() -> Reference {
    let path = fixture_dir().join("reference.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("reference.json")
}

fn load_ref_crop(e: &Entry) -> RgbImage {
    image::open(fixture_dir().join(&e.reference))
        .unwrap_or_else(|err| panic!("{}: {err}", e.reference))
        .to_rgb8()
}

/// (max, mean) absolute difference in 8-bit levels.
fn diff(a: &RgbImage, b: &RgbImage) -> (u8, f64) {
    assert_eq!(a.dimensions(), b.dimensions());
    let d: Vec<u8> = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .collect();
    let max = d.iter().copied().max().unwrap_or(0);
    let mean = d.iter().map(|&v| v as f64).sum::<f64>() / d.len() as f64;
    (max, mean)
}

#[test]
fn crops_match_open_clip_within_two_levels() {
    let cfg = PreprocessConfig::clip(224);
    let refs = reference();
    assert!(refs.images.len() >= 10);
    let mut report = Vec::new();
    let mut worst = 0;
    for e in &refs.images {
        let path = fixture_dir().join(&e.file);
        let bytes = std::fs::read(&path).unwrap();
        let img = decode_image_with_alpha(&bytes, &e.file).unwrap();
        assert_eq!(img.dimensions(), (e.width, e.height), "{}", e.name);
        let ours = cfg.resize_crop_with_alpha(&img);
        if e.pil_mode != "RGBA" {
            // Opaque images: the plain RGB path is the same computation.
            let rgb = decode_image(&bytes, &e.file).unwrap();
            assert_eq!(
                cfg.center_crop(&cfg.resize_shorter_side(&rgb)),
                ours,
                "{}",
                e.name
            );
        }
        let (max, mean) = diff(&ours, &load_ref_crop(e));
        report.push(format!(
            "{:<24} {:<5} {:>4}x{:<4} max {max} mean {mean:.4}",
            e.name, e.pil_mode, e.width, e.height
        ));
        worst = worst.max(max);
    }
    let report = report.join("\n");
    eprintln!("{report}");
    assert!(
        worst <= MAX_LEVELS,
        "crop differs from open_clip by more than {MAX_LEVELS} levels:\n{report}"
    );
}

#[test]
fn normalised_tensor_matches_open_clip() {
    let cfg = PreprocessConfig::clip(224);
    let plane = 224 * 224;
    for e in &reference().images {
        // Normalisation alone is exact: the reference crop gives the reference tensor.
        let mut t = vec![0.0; 3 * plane];
        cfg.normalize_into(&load_ref_crop(e), &mut t);
        for &(c, y, x, v) in &e.probes {
            let got = t[c * plane + y * 224 + x];
            assert!(
                (got - v).abs() < 1e-5,
                "{} probe {c},{y},{x}: {got} vs {v}",
                e.name
            );
        }
        // The whole pipeline stays within the crop tolerance after normalisation.
        let t = cfg.preprocess_file(&fixture_dir().join(&e.file)).unwrap();
        assert_eq!(t.len(), 3 * plane);
        for &(c, y, x, v) in &e.probes {
            let got = t[c * plane + y * 224 + x];
            let tol = MAX_LEVELS as f32 / 255.0 / CLIP_STD[c] + 1e-5;
            assert!(
                (got - v).abs() <= tol,
                "{} probe {c},{y},{x}: {got} vs {v}",
                e.name
            );
        }
        for c in 0..3 {
            let mean = t[c * plane..(c + 1) * plane].iter().sum::<f32>() / plane as f32;
            assert!(
                (mean - e.channel_means[c]).abs() < 0.01,
                "{} channel {c} mean {mean} vs {}",
                e.name,
                e.channel_means[c]
            );
        }
    }
}
