//! CLIP image preprocessing, equal to the reference `Resize(224, bicubic)` +
//! `CenterCrop(224)` + `ToTensor` + `Normalize(mean, std)` of OpenAI CLIP / open_clip.

use std::io::Cursor;
use std::path::Path;

use image::imageops::FilterType;
use image::{DynamicImage, ImageReader, Limits, RgbImage};
use serde::{Deserialize, Serialize};

/// CLIP's image mean and std (OpenAI).
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

/// Largest accepted image side; bigger headers are rejected before any pixel is decoded
/// so a hostile "20000x20000" header cannot exhaust memory.
pub const MAX_IMAGE_SIDE: u32 = 12_000;
/// Largest decode allocation in bytes.
pub const MAX_DECODE_ALLOC: u64 = 512 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    #[error("cannot read image file {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{source_name} is not a decodable image ({reason}); supported formats are JPEG, PNG, WebP and BMP")]
    Decode { source_name: String, reason: String },
    #[error("{source_name} is {width}x{height}, larger than the {max}x{max} limit; downscale it first")]
    TooLarge {
        source_name: String,
        width: u32,
        height: u32,
        max: u32,
    },
    #[error("{source_name} has an empty dimension ({width}x{height})")]
    Empty {
        source_name: String,
        width: u32,
        height: u32,
    },
}

/// How an image becomes a model input; serialised into exported manifests so the edge
/// runtime reproduces training-time preprocessing exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreprocessConfig {
    /// Target length of the shorter side after resizing.
    pub resize_shorter: u32,
    /// Side of the square centre crop.
    pub crop: u32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// Always "bicubic" today; recorded so manifests are self-describing.
    pub interpolation: String,
}

impl Default for PreprocessConfig {
    fn default() -> Self {
        Self::clip(224)
    }
}

/// A batch of preprocessed images in NCHW order.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageBatch {
    pub data: Vec<f32>,
    pub n: usize,
    pub height: usize,
    pub width: usize,
}

impl ImageBatch {
    pub fn shape(&self) -> [usize; 4] {
        [self.n, 3, self.height, self.width]
    }
}

/// Decodes an image from memory and converts it to 8-bit RGB (grayscale replicated,
/// alpha dropped as PIL's `convert("RGB")` does, 16-bit scaled to 8-bit).
/// `source_name` names the origin (a path, "request body #2") in errors.
pub fn decode_image(bytes: &[u8], source_name: &str) -> Result<RgbImage, PreprocessError> {
    let decode_err = |reason: String| PreprocessError::Decode {
        source_name: source_name.to_string(),
        reason,
    };
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| decode_err(e.to_string()))?;
    if reader.format().is_none() {
        return Err(decode_err("unknown format".into()));
    }
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_DECODE_ALLOC);
    reader.limits(limits);
    let (width, height) = reader
        .into_dimensions()
        .map_err(|e| decode_err(e.to_string()))?;
    if width > MAX_IMAGE_SIDE || height > MAX_IMAGE_SIDE {
        return Err(PreprocessError::TooLarge {
            source_name: source_name.to_string(),
            width,
            height,
            max: MAX_IMAGE_SIDE,
        });
    }
    if width == 0 || height == 0 {
        return Err(PreprocessError::Empty {
            source_name: source_name.to_string(),
            width,
            height,
        });
    }
    // `into_dimensions` consumed the reader; decoding again from the same bytes is cheap.
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| decode_err(e.to_string()))?;
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_DECODE_ALLOC);
    reader.limits(limits);
    let img = reader.decode().map_err(|e| decode_err(e.to_string()))?;
    Ok(to_rgb8(img))
}

fn to_rgb8(img: DynamicImage) -> RgbImage {
    match img {
        DynamicImage::ImageRgb8(rgb) => rgb,
        other => other.to_rgb8(),
    }
}

/// Reads and decodes an image file; errors name the path.
pub fn load_image(path: &Path) -> Result<RgbImage, PreprocessError> {
    let bytes = std::fs::read(path).map_err(|source| PreprocessError::Io {
        path: path.display().to_string(),
        source,
    })?;
    decode_image(&bytes, &path.display().to_string())
}

impl PreprocessConfig {
    /// OpenAI CLIP preprocessing at `size` pixels.
    pub fn clip(size: u32) -> Self {
        Self {
            resize_shorter: size,
            crop: size,
            mean: CLIP_MEAN,
            std: CLIP_STD,
            interpolation: "bicubic".to_string(),
        }
    }

    /// Resizes so the shorter side is `resize_shorter`, the longer side scaled and truncated
    /// as torchvision does (`int(size * long / short)`).
    pub fn resize_shorter_side(&self, img: &RgbImage) -> RgbImage {
        let (w, h) = img.dimensions();
        let s = self.resize_shorter;
        let (nw, nh) = if w <= h {
            (s, ((s as u64 * h as u64) / w as u64).max(1) as u32)
        } else {
            (((s as u64 * w as u64) / h as u64).max(1) as u32, s)
        };
        if (nw, nh) == (w, h) {
            return img.clone();
        }
        image::imageops::resize(img, nw, nh, FilterType::CatmullRom)
    }

    /// Square centre crop of side `crop`, offsets rounded as torchvision's `CenterCrop`
    /// (`round((h - crop) / 2)`, round half to even). Images smaller than the crop are
    /// zero-padded symmetrically first, also as torchvision does.
    pub fn center_crop(&self, img: &RgbImage) -> RgbImage {
        let c = self.crop;
        let (w, h) = img.dimensions();
        let padded = (w < c || h < c).then(|| {
            let (pw, ph) = (c.max(w), c.max(h));
            let mut canvas = RgbImage::new(pw, ph);
            image::imageops::overlay(&mut canvas, img, ((pw - w) / 2) as i64, ((ph - h) / 2) as i64);
            canvas
        });
        let src = padded.as_ref().unwrap_or(img);
        let (w, h) = src.dimensions();
        let left = round_half_even((w - c) as f64 / 2.0);
        let top = round_half_even((h - c) as f64 / 2.0);
        image::imageops::crop_imm(src, left, top, c, c).to_image()
    }

    /// Writes the normalised CHW tensor of an already cropped image into `out`.
    pub fn normalize_into(&self, img: &RgbImage, out: &mut [f32]) {
        let (w, h) = img.dimensions();
        let plane = (w * h) as usize;
        assert_eq!(out.len(), 3 * plane, "output buffer must hold 3*H*W floats");
        for (i, px) in img.pixels().enumerate() {
            for ch in 0..3 {
                out[ch * plane + i] = (px[ch] as f32 / 255.0 - self.mean[ch]) / self.std[ch];
            }
        }
    }

    /// Full test-time transform of one image: resize, crop, normalise; returns CHW floats.
    pub fn preprocess(&self, img: &RgbImage) -> Vec<f32> {
        let cropped = self.center_crop(&self.resize_shorter_side(img));
        let mut out = vec![0.0; 3 * (self.crop * self.crop) as usize];
        self.normalize_into(&cropped, &mut out);
        out
    }

    /// Preprocesses several images into one NCHW batch.
    pub fn batch(&self, images: &[RgbImage]) -> ImageBatch {
        let per = 3 * (self.crop * self.crop) as usize;
        let mut data = Vec::with_capacity(per * images.len());
        for img in images {
            data.extend_from_slice(&self.preprocess(img));
        }
        ImageBatch {
            data,
            n: images.len(),
            height: self.crop as usize,
            width: self.crop as usize,
        }
    }
}

fn round_half_even(x: f64) -> u32 {
    let r = x.round();
    let v = if (x - x.trunc() - 0.5).abs() < 1e-12 && (r as i64) % 2 != 0 {
        r - 1.0
    } else {
        r
    };
    v.max(0.0) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_half_even_matches_python() {
        assert_eq!(round_half_even(0.5), 0);
        assert_eq!(round_half_even(1.5), 2);
        assert_eq!(round_half_even(2.5), 2);
        assert_eq!(round_half_even(3.0), 3);
    }

    #[test]
    fn resize_keeps_aspect_and_truncates() {
        let cfg = PreprocessConfig::clip(224);
        let img = RgbImage::new(500, 375);
        let r = cfg.resize_shorter_side(&img);
        assert_eq!(r.dimensions(), (298, 224));
    }

    #[test]
    fn tiny_image_is_upscaled_and_cropped() {
        let cfg = PreprocessConfig::clip(224);
        let img = RgbImage::from_pixel(7, 5, image::Rgb([255, 0, 0]));
        let t = cfg.preprocess(&img);
        assert_eq!(t.len(), 3 * 224 * 224);
        let expect_r = (1.0 - CLIP_MEAN[0]) / CLIP_STD[0];
        assert!((t[224 * 112 + 112] - expect_r).abs() < 1e-5);
    }

    #[test]
    fn garbage_bytes_are_a_named_error() {
        let err = decode_image(b"not an image at all", "upload.bin").unwrap_err();
        assert!(err.to_string().contains("upload.bin"), "{err}");
    }
}
