//! Training augmentation: torchvision's `RandomResizedCrop(size, scale=(0.08, 1),
//! ratio=(3/4, 4/3), bicubic)` + `RandomHorizontalFlip(0.5)` + CLIP normalisation, as in
//! CoOp's `random_resized_crop, random_flip, normalize` transform list.
//!
//! Randomness comes from a ChaCha stream derived from (seed, stream, index), so a view
//! depends only on its key and not on thread scheduling. Torch's generator is not
//! reproduced: augmented pixels are deterministic per seed but not equal to torchvision's.

use capt_core::PreprocessConfig;
use image::imageops::FilterType;
use image::RgbImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A crop rectangle in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropBox {
    pub left: u32,
    pub top: u32,
    pub width: u32,
    pub height: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TrainAugment {
    /// Output side (square).
    pub size: u32,
    /// Range of the crop area as a fraction of the image area.
    pub scale: (f64, f64),
    /// Range of the crop aspect ratio (w / h), sampled log-uniformly.
    pub ratio: (f64, f64),
    pub flip_prob: f64,
    /// Mean/std used for normalisation (resize/crop fields are not used here).
    pub normalize: PreprocessConfig,
}

impl TrainAugment {
    /// CoOp's defaults at `size` pixels with CLIP's mean and std.
    pub fn clip(size: u32) -> Self {
        Self::from_preprocess(&PreprocessConfig::clip(size))
    }

    /// Matches a test-time preprocessing: same output side, mean and std.
    pub fn from_preprocess(cfg: &PreprocessConfig) -> Self {
        Self {
            size: cfg.crop,
            scale: (0.08, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
            flip_prob: 0.5,
            normalize: cfg.clone(),
        }
    }

    /// torchvision's `RandomResizedCrop.get_params`: up to 10 tries of a random area and
    /// log-uniform aspect ratio that fits, else a centre crop clamped to the ratio range.
    pub fn crop_box<R: Rng + ?Sized>(&self, width: u32, height: u32, rng: &mut R) -> CropBox {
        let area = width as f64 * height as f64;
        let (lr0, lr1) = (self.ratio.0.ln(), self.ratio.1.ln());
        for _ in 0..10 {
            let target_area = area * uniform(rng, self.scale.0, self.scale.1);
            let aspect = uniform(rng, lr0, lr1).exp();
            let w = (target_area * aspect).sqrt().round() as i64;
            let h = (target_area / aspect).sqrt().round() as i64;
            if 0 < w && w <= width as i64 && 0 < h && h <= height as i64 {
                let (w, h) = (w as u32, h as u32);
                let top = rng.random_range(0..=height - h);
                let left = rng.random_range(0..=width - w);
                return CropBox {
                    left,
                    top,
                    width: w,
                    height: h,
                };
            }
        }
        let in_ratio = width as f64 / height as f64;
        let (w, h) = if in_ratio < self.ratio.0 {
            (
                width,
                ((width as f64 / self.ratio.0).round() as u32).clamp(1, height),
            )
        } else if in_ratio > self.ratio.1 {
            (
                ((height as f64 * self.ratio.1).round() as u32).clamp(1, width),
                height,
            )
        } else {
            (width, height)
        };
        CropBox {
            left: (width - w) / 2,
            top: (height - h) / 2,
            width: w,
            height: h,
        }
    }

    /// Crop, bicubic resize to `size` x `size`, random flip.
    pub fn augment<R: Rng + ?Sized>(&self, img: &RgbImage, rng: &mut R) -> RgbImage {
        let (w, h) = img.dimensions();
        let b = self.crop_box(w, h, rng);
        let crop = image::imageops::crop_imm(img, b.left, b.top, b.width, b.height).to_image();
        let mut out = if (b.width, b.height) == (self.size, self.size) {
            crop
        } else {
            image::imageops::resize(&crop, self.size, self.size, FilterType::CatmullRom)
        };
        if rng.random::<f64>() < self.flip_prob {
            image::imageops::flip_horizontal_in_place(&mut out);
        }
        out
    }

    /// Augmented, normalised CHW floats (`3 * size * size`).
    pub fn augment_chw<R: Rng + ?Sized>(&self, img: &RgbImage, rng: &mut R) -> Vec<f32> {
        let view = self.augment(img, rng);
        let mut out = vec![0.0; 3 * (self.size * self.size) as usize];
        self.normalize.normalize_into(&view, &mut out);
        out
    }
}

fn uniform<R: Rng + ?Sized>(rng: &mut R, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.random::<f64>()
}

/// SplitMix64 finaliser, to spread (seed, stream, index) over the ChaCha seed space.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The generator for one augmented view: a pure function of its key.
pub fn view_rng(seed: u64, stream: u64, index: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(mix(mix(mix(seed) ^ stream) ^ index))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crop_box_stays_inside_and_respects_scale() {
        let aug = TrainAugment::clip(224);
        let mut rng = view_rng(0, 0, 0);
        for (w, h) in [(500, 375), (64, 64), (1000, 40), (40, 1000), (1, 1)] {
            for _ in 0..200 {
                let b = aug.crop_box(w, h, &mut rng);
                assert!(b.width >= 1 && b.height >= 1);
                assert!(
                    b.left + b.width <= w && b.top + b.height <= h,
                    "{b:?} in {w}x{h}"
                );
            }
        }
        // Normal images land in the sampling branch: area fraction within [0.08, 1] (+rounding).
        for _ in 0..200 {
            let b = aug.crop_box(500, 375, &mut rng);
            let frac = (b.width * b.height) as f64 / (500.0 * 375.0);
            assert!((0.07..=1.0).contains(&frac), "{frac}");
        }
    }

    #[test]
    fn extreme_aspect_falls_back_to_clamped_centre_crop() {
        let aug = TrainAugment::clip(224);
        let mut rng = view_rng(1, 2, 3);
        // 1000x4: no crop with ratio in 3/4..4/3 and >= 8% of the area fits (it would need
        // h >= 15), so the fallback is a centre crop of width round(4 * 4/3) = 5.
        let b = aug.crop_box(1000, 4, &mut rng);
        assert_eq!(
            b,
            CropBox {
                left: (1000 - 5) / 2,
                top: 0,
                width: 5,
                height: 4
            }
        );
    }

    #[test]
    fn views_are_deterministic_per_key_and_differ_across_keys() {
        let mut img = RgbImage::new(97, 61);
        for (x, y, p) in img.enumerate_pixels_mut() {
            *p = image::Rgb([(x * 2) as u8, (y * 4) as u8, ((x + y) % 256) as u8]);
        }
        let aug = TrainAugment::clip(32);
        let a = aug.augment_chw(&img, &mut view_rng(7, 1, 0));
        let b = aug.augment_chw(&img, &mut view_rng(7, 1, 0));
        let c = aug.augment_chw(&img, &mut view_rng(7, 1, 1));
        assert_eq!(a.len(), 3 * 32 * 32);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn flip_probability_one_mirrors() {
        let mut img = RgbImage::new(8, 8);
        img.put_pixel(0, 0, image::Rgb([255, 0, 0]));
        let aug = TrainAugment {
            size: 8,
            scale: (1.0, 1.0),
            ratio: (1.0, 1.0),
            flip_prob: 1.0,
            normalize: PreprocessConfig::clip(8),
        };
        let out = aug.augment(&img, &mut view_rng(0, 0, 0));
        assert_eq!(out.get_pixel(7, 0), &image::Rgb([255, 0, 0]));
    }
}
