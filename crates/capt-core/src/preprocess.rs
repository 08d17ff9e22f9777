//! CLIP image preprocessing, equal to open_clip's eval transform: `Resize(224, bicubic)` on
//! the PIL image, `CenterCrop(224)`, `convert("RGB")`, `ToTensor`, `Normalize(mean, std)`.
//!
//! Parity (tests/preprocess_parity.rs, against open_clip + Pillow on real images): the resize is
//! Pillow's bicubic bit for bit (`resample`), and JPEGs are decoded by libjpeg-turbo as Pillow
//! does, so crops come out identical; PNG, BMP and WebP go through the `image` crate (identical
//! on the fixtures too).
//!
//! Alpha: [`decode_image`] drops it (Pillow's `convert("RGB")` at load, as CoOp/Dassl do), which
//! is exact for every opaque image. open_clip instead resizes RGBA premultiplied and drops alpha
//! after the crop; [`decode_image_with_alpha`] + [`PreprocessConfig::preprocess_with_alpha`]
//! (or [`PreprocessConfig::preprocess_file`]) reproduce that. 16-bit images keep their high byte
//! as Pillow does (Pillow clips 16-bit *grayscale* to 255 instead; capt does not copy that).
//! Palette images are resized bicubic after expansion (Pillow would use nearest for mode "P").

mod resample;

use std::io::Cursor;
use std::path::Path;

use image::{
    DynamicImage, ImageBuffer, ImageDecoder, ImageReader, Limits, Pixel, RgbImage, RgbaImage,
};
use serde::{Deserialize, Serialize};

/// CLIP's image mean and std (OpenAI), with the digits open_clip writes.
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
#[allow(clippy::excessive_precision)]
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
    #[error(
        "{source_name} is {width}x{height}, larger than the {max}x{max} limit; downscale it first"
    )]
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

/// Floats in one CHW image of `side x side` pixels (3 channels).
pub fn chw_len(side: usize) -> usize {
    3 * side * side
}

impl ImageBatch {
    pub fn shape(&self) -> [usize; 4] {
        [self.n, 3, self.height, self.width]
    }

    /// Floats per image (`3 * height * width`).
    pub fn image_len(&self) -> usize {
        3 * self.height * self.width
    }
}

/// Decodes an image from memory and converts it to 8-bit RGB (grayscale replicated,
/// alpha dropped as PIL's `convert("RGB")` does, 16-bit reduced to its high byte).
/// `source_name` names the origin (a path, "request body #2") in errors.
pub fn decode_image(bytes: &[u8], source_name: &str) -> Result<RgbImage, PreprocessError> {
    Ok(match decode_image_with_alpha(bytes, source_name)? {
        DynamicImage::ImageRgb8(rgb) => rgb,
        DynamicImage::ImageRgba8(rgba) => drop_alpha(&rgba),
        other => other.to_rgb8(),
    })
}

/// Decodes an image to 8-bit RGB, or 8-bit RGBA when it has an alpha channel (grayscale
/// replicated, 16-bit reduced to its high byte), for [`PreprocessConfig::preprocess_with_alpha`].
/// The header is checked against [`MAX_IMAGE_SIDE`] and [`MAX_DECODE_ALLOC`] before any pixel
/// buffer is allocated.
pub fn decode_image_with_alpha(
    bytes: &[u8],
    source_name: &str,
) -> Result<DynamicImage, PreprocessError> {
    let decode_err = |reason: String| PreprocessError::Decode {
        source_name: source_name.to_string(),
        reason,
    };
    if bytes.is_empty() {
        return Err(decode_err("the data is empty (0 bytes)".into()));
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| decode_err(e.to_string()))?;
    let Some(format) = reader.format() else {
        return Err(decode_err("unknown format".into()));
    };
    // No side limits here: the header's size is checked below to give a precise error.
    let mut limits = Limits::default();
    limits.max_alloc = Some(MAX_DECODE_ALLOC);
    reader.limits(limits);
    let decoder = reader
        .into_decoder()
        .map_err(|e| decode_err(format!("{format:?} header: {e}")))?;
    let (width, height) = decoder.dimensions();
    if width > MAX_IMAGE_SIDE || height > MAX_IMAGE_SIDE || decoder.total_bytes() > MAX_DECODE_ALLOC
    {
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
    if format == image::ImageFormat::Jpeg {
        if !jpeg_has_end(bytes) {
            // libjpeg and zune-jpeg fill a truncated scan with grey; Pillow refuses the file.
            return Err(decode_err("truncated JPEG (no end-of-image marker)".into()));
        }
        if let Some(img) = decode_jpeg_libjpeg(bytes, (width, height)).map_err(decode_err)? {
            return Ok(img);
        }
    }
    // The image crate's decoders are fuzzed, but a panic here must still not take down a server.
    let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        DynamicImage::from_decoder(decoder)
    }));
    match decoded {
        Ok(Ok(img)) => Ok(to_8bit(img)),
        Ok(Err(e)) => Err(decode_err(e.to_string())),
        Err(_) => Err(decode_err(format!("the {format:?} decoder panicked"))),
    }
}

// libjpeg reports fatal errors by unwinding (mozjpeg's error manager); with panic=abort a bad
// upload would abort the process instead of becoming a `PreprocessError`.
#[cfg(not(panic = "unwind"))]
compile_error!(
    "capt-core decodes JPEG with libjpeg-turbo, whose errors unwind: build with panic = \"unwind\""
);

/// Decodes a JPEG with libjpeg-turbo (vendored by the `mozjpeg` crate), the decoder Pillow
/// uses, so pixels are identical (zune-jpeg's chroma upsampling is up to 4 levels off).
/// `Ok(None)` for colour spaces libjpeg cannot turn into RGB (CMYK, YCCK): the caller falls back
/// to the `image` crate. `checked` is the size the caller validated from the same header.
fn decode_jpeg_libjpeg(bytes: &[u8], checked: (u32, u32)) -> Result<Option<DynamicImage>, String> {
    let run = || -> std::io::Result<Option<DynamicImage>> {
        let jpeg = mozjpeg::Decompress::new_mem(bytes)?;
        let (w, h) = (jpeg.width() as u32, jpeg.height() as u32);
        if (w, h) != checked {
            return Err(std::io::Error::other(format!(
                "libjpeg reads a {w}x{h} frame, the header check saw {}x{}",
                checked.0, checked.1
            )));
        }
        let gray = match jpeg.color_space() {
            mozjpeg::ColorSpace::JCS_GRAYSCALE => true,
            mozjpeg::ColorSpace::JCS_YCbCr | mozjpeg::ColorSpace::JCS_RGB => false,
            _ => return Ok(None),
        };
        let mut started = if gray { jpeg.grayscale()? } else { jpeg.rgb()? };
        let pixels: Vec<u8> = started.read_scanlines()?;
        started.finish()?;
        let img = if gray {
            image::GrayImage::from_raw(w, h, pixels).map(|g| DynamicImage::ImageLuma8(g).to_rgb8())
        } else {
            RgbImage::from_raw(w, h, pixels)
        };
        img.map(|rgb| Some(DynamicImage::ImageRgb8(rgb)))
            .ok_or_else(|| {
                std::io::Error::other("libjpeg returned fewer pixels than the header promised")
            })
    };
    match std::panic::catch_unwind(run) {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(payload) => Err(payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "libjpeg failed".into())),
    }
}

/// A complete JPEG ends with the EOI marker FFD9, possibly followed by padding or appended data;
/// a truncated one has no FFD9 after its last start-of-scan.
fn jpeg_has_end(bytes: &[u8]) -> bool {
    let last_sos = bytes.windows(2).rposition(|w| w == [0xff, 0xda]);
    let tail = &bytes[last_sos.unwrap_or(0)..];
    tail.windows(2).any(|w| w == [0xff, 0xd9])
}

/// 8-bit RGB or RGBA, as Pillow reads it (16-bit channels keep their high byte).
fn to_8bit(img: DynamicImage) -> DynamicImage {
    fn high_byte<P: Pixel<Subpixel = u16>, Q: Pixel<Subpixel = u8>>(
        src: &ImageBuffer<P, Vec<u16>>,
    ) -> ImageBuffer<Q, Vec<u8>> {
        let (w, h) = src.dimensions();
        let raw = src.as_raw().iter().map(|&v| (v >> 8) as u8).collect();
        ImageBuffer::from_raw(w, h, raw).expect("same layout, same length")
    }
    let has_alpha = img.color().has_alpha();
    let img = match img {
        DynamicImage::ImageRgb8(_) | DynamicImage::ImageRgba8(_) => return img,
        DynamicImage::ImageLuma16(i) => DynamicImage::ImageLuma8(high_byte(&i)),
        DynamicImage::ImageLumaA16(i) => DynamicImage::ImageLumaA8(high_byte(&i)),
        DynamicImage::ImageRgb16(i) => DynamicImage::ImageRgb8(high_byte(&i)),
        DynamicImage::ImageRgba16(i) => DynamicImage::ImageRgba8(high_byte(&i)),
        other => other,
    };
    if has_alpha {
        DynamicImage::ImageRgba8(img.to_rgba8())
    } else {
        DynamicImage::ImageRgb8(img.to_rgb8())
    }
}

fn drop_alpha(img: &RgbaImage) -> RgbImage {
    let (w, h) = img.dimensions();
    let raw = img
        .as_raw()
        .chunks_exact(4)
        .flat_map(|p| [p[0], p[1], p[2]])
        .collect();
    RgbImage::from_raw(w, h, raw).expect("3 bytes per pixel")
}

/// Reads and decodes an image file to RGB; errors name the path.
pub fn load_image(path: &Path) -> Result<RgbImage, PreprocessError> {
    decode_image(&read_file(path)?, &path.display().to_string())
}

/// Reads and decodes an image file keeping alpha; see [`decode_image_with_alpha`].
pub fn load_image_with_alpha(path: &Path) -> Result<DynamicImage, PreprocessError> {
    decode_image_with_alpha(&read_file(path)?, &path.display().to_string())
}

fn read_file(path: &Path) -> Result<Vec<u8>, PreprocessError> {
    std::fs::read(path).map_err(|source| PreprocessError::Io {
        path: path.display().to_string(),
        source,
    })
}

impl PreprocessConfig {
    /// Floats in one preprocessed image (`3 * crop * crop`).
    pub fn image_len(&self) -> usize {
        chw_len(self.crop as usize)
    }

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

    /// Output size of [`resize_shorter_side`](Self::resize_shorter_side) for a `width x height`
    /// image: shorter side `resize_shorter`, longer side scaled and truncated as torchvision does
    /// (`int(size * long / short)`).
    pub fn resized_size(&self, width: u32, height: u32) -> (u32, u32) {
        let s = self.resize_shorter;
        let scaled =
            |long: u32, short: u32| ((s as u64 * long as u64) / short.max(1) as u64).max(1) as u32;
        if width <= height {
            (s, scaled(height, width))
        } else {
            (scaled(width, height), s)
        }
    }

    /// Resizes so the shorter side is `resize_shorter` with Pillow's bicubic filter, bit-exact.
    pub fn resize_shorter_side(&self, img: &RgbImage) -> RgbImage {
        let (w, h) = img.dimensions();
        let (nw, nh) = self.resized_size(w, h);
        if (nw, nh) == (w, h) {
            return img.clone();
        }
        let out = resample::resize_bicubic::<3>(
            img.as_raw(),
            w as usize,
            h as usize,
            nw as usize,
            nh as usize,
        );
        RgbImage::from_raw(nw, nh, out).expect("resampler returns nw*nh*3 bytes")
    }

    /// Resize and centre crop in open_clip's order for an RGB or RGBA image: an RGBA image is
    /// resized premultiplied by alpha (as Pillow does for mode "RGBA") and loses its alpha only
    /// after the crop. Other kinds are converted first (see [`decode_image_with_alpha`]).
    pub fn resize_crop_with_alpha(&self, img: &DynamicImage) -> RgbImage {
        let rgba = match to_8bit(img.clone()) {
            DynamicImage::ImageRgba8(rgba) => rgba,
            other => return self.center_crop(&self.resize_shorter_side(&other.to_rgb8())),
        };
        let (w, h) = rgba.dimensions();
        let (nw, nh) = self.resized_size(w, h);
        if (nw, nh) == (w, h) {
            // Pillow returns a plain copy when the size is unchanged: no premultiply round trip.
            return self.center_crop(&drop_alpha(&rgba));
        }
        let mut pre = rgba.into_raw();
        for px in pre.chunks_exact_mut(4) {
            let a = px[3] as u32;
            for v in &mut px[..3] {
                // Pillow's MULDIV255: round(v * a / 255).
                let t = *v as u32 * a + 128;
                *v = (((t >> 8) + t) >> 8) as u8;
            }
        }
        let out =
            resample::resize_bicubic::<4>(&pre, w as usize, h as usize, nw as usize, nh as usize);
        // Pillow's RGBa -> RGBA: divide by alpha (floor, clamped); alpha 0 and 255 copy as is.
        let raw = out
            .chunks_exact(4)
            .flat_map(|p| {
                let a = p[3] as u32;
                let un = |v: u8| match a {
                    0 | 255 => v,
                    _ => (255 * v as u32 / a).min(255) as u8,
                };
                [un(p[0]), un(p[1]), un(p[2])]
            })
            .collect();
        self.center_crop(&RgbImage::from_raw(nw, nh, raw).expect("3 bytes per pixel"))
    }

    /// Full open_clip transform of an RGB or RGBA image (see
    /// [`resize_crop_with_alpha`](Self::resize_crop_with_alpha)); returns CHW floats.
    pub fn preprocess_with_alpha(&self, img: &DynamicImage) -> Vec<f32> {
        let cropped = self.resize_crop_with_alpha(img);
        let mut out = vec![0.0; self.image_len()];
        self.normalize_into(&cropped, &mut out);
        out
    }

    /// Decodes `bytes` and applies the full open_clip transform, alpha handled as open_clip does.
    pub fn preprocess_bytes(
        &self,
        bytes: &[u8],
        source_name: &str,
    ) -> Result<Vec<f32>, PreprocessError> {
        Ok(self.preprocess_with_alpha(&decode_image_with_alpha(bytes, source_name)?))
    }

    /// Reads, decodes and preprocesses an image file as open_clip does; errors name the path.
    pub fn preprocess_file(&self, path: &Path) -> Result<Vec<f32>, PreprocessError> {
        Ok(self.preprocess_with_alpha(&load_image_with_alpha(path)?))
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
            image::imageops::overlay(
                &mut canvas,
                img,
                ((pw - w) / 2) as i64,
                ((ph - h) / 2) as i64,
            );
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
        let mut out = vec![0.0; self.image_len()];
        self.normalize_into(&cropped, &mut out);
        out
    }

    /// Preprocesses several images into one NCHW batch.
    pub fn batch(&self, images: &[RgbImage]) -> ImageBatch {
        let per = self.image_len();
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
    fn resized_size_follows_torchvision() {
        let cfg = PreprocessConfig::clip(224);
        assert_eq!(cfg.resized_size(468, 315), (332, 224)); // int(224 * 468 / 315)
        assert_eq!(cfg.resized_size(315, 468), (224, 332));
        assert_eq!(cfg.resized_size(64, 64), (224, 224));
        assert_eq!(cfg.resized_size(20_000, 1), (4_480_000, 224));
    }

    #[test]
    fn libjpeg_errors_are_caught() {
        // A JPEG start followed by a malformed quantisation table: libjpeg's fatal error unwinds
        // out of C and must come back as an Err.
        let bad = b"\xff\xd8\xff\xdb\x00\x03\x00\xff\xd9";
        let err = decode_jpeg_libjpeg(bad, (1, 1)).unwrap_err();
        assert!(err.contains("libjpeg"), "{err}");
    }

    #[test]
    fn rgba_at_target_size_skips_premultiply() {
        // Pillow returns a copy when the size is unchanged, so colour under low alpha survives.
        let cfg = PreprocessConfig::clip(4);
        let img = RgbaImage::from_pixel(4, 4, image::Rgba([200, 100, 50, 3]));
        let out = cfg.resize_crop_with_alpha(&DynamicImage::ImageRgba8(img));
        assert!(out.pixels().all(|p| p.0 == [200, 100, 50]));
        // Resized, the same pixels go through premultiply (200*3/255 -> 2) and back (2*255/3).
        let img = RgbaImage::from_pixel(8, 8, image::Rgba([200, 100, 50, 3]));
        let out = cfg.resize_crop_with_alpha(&DynamicImage::ImageRgba8(img));
        assert!(
            out.pixels().all(|p| p.0 == [170, 85, 85]),
            "{:?}",
            out.get_pixel(0, 0)
        );
    }

    #[test]
    fn sixteen_bit_keeps_high_byte() {
        let img = image::ImageBuffer::<image::Rgb<u16>, _>::from_pixel(
            2,
            2,
            image::Rgb([0x12ff, 0x8080, 0xff00]),
        );
        let DynamicImage::ImageRgb8(rgb) = to_8bit(DynamicImage::ImageRgb16(img)) else {
            panic!("expected RGB8");
        };
        assert_eq!(rgb.get_pixel(1, 1).0, [0x12, 0x80, 0xff]);
    }

    #[test]
    fn garbage_bytes_are_a_named_error() {
        let err = decode_image(b"not an image at all", "upload.bin").unwrap_err();
        assert!(err.to_string().contains("upload.bin"), "{err}");
    }
}
