//! Bicubic resampling bit-exact with Pillow's `Image.resize(size, BICUBIC)` on 8-bit images
//! (libImaging/Resample.c), which is what torchvision's `Resize` runs on PIL images.
//!
//! Why not `image::imageops::resize(CatmullRom)`: it filters in f32 without clamping between
//! the two passes and runs them in the other order, which is up to 20 levels off Pillow at hard
//! edges (Caltech line drawings). `fast_image_resize` also runs the passes in the other order
//! with 16-bit coefficients. Pillow: horizontal pass first, each pass rounds and clamps to u8,
//! weights are 22-bit fixed point, and the kernel widens by the scale when downsampling
//! (antialiasing).

/// Fixed-point bits of the weights: 32 bits minus 8 for the value and 2 for overshoot.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Keys' cubic with a = -0.5 (Pillow's `bicubic_filter`), support 2.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per output index: first input index, and fixed-point weights of the inputs from there.
struct Weights {
    first: Vec<usize>,
    taps: Vec<Vec<i32>>,
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for the box `[0, in_size)`.
fn weights(in_size: usize, out_size: usize) -> Weights {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let ss = 1.0 / filterscale;
    let mut first = Vec::with_capacity(out_size);
    let mut taps = Vec::with_capacity(out_size);
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        // C's `(int)` truncates toward zero, then Pillow clamps to the image.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64)
            .min(in_size as i64)
            .max(xmin as i64) as usize;
        let raw: Vec<f64> = (xmin..xmax)
            .map(|x| bicubic((x as f64 - center + 0.5) * ss))
            .collect();
        let total: f64 = raw.iter().sum();
        let unit = (1u32 << PRECISION_BITS) as f64;
        let fixed = raw
            .iter()
            .map(|&w| {
                let w = if total != 0.0 { w / total } else { w };
                if w < 0.0 {
                    (-0.5 + w * unit) as i32
                } else {
                    (0.5 + w * unit) as i32
                }
            })
            .collect();
        first.push(xmin);
        taps.push(fixed);
    }
    Weights { first, taps }
}

fn clip8(acc: i32) -> u8 {
    if acc >= (1 << PRECISION_BITS << 8) {
        255
    } else if acc <= 0 {
        0
    } else {
        (acc >> PRECISION_BITS) as u8
    }
}

/// Resizes interleaved 8-bit pixels (`C` channels, rows of `width`) to `out_w x out_h`.
///
/// Sums are i32 as in Pillow: normalised weights have an absolute sum of at most 1.25
/// (upsampling at half-pixel phase), so 255 * 1.25 * 2^22 + 2^21 stays under 2^31.
pub(crate) fn resize_bicubic<const C: usize>(
    src: &[u8],
    width: usize,
    height: usize,
    out_w: usize,
    out_h: usize,
) -> Vec<u8> {
    debug_assert_eq!(src.len(), width * height * C);
    let half = 1i32 << (PRECISION_BITS - 1);
    // Horizontal pass first, over all rows (Pillow limits it to the rows the vertical pass
    // reads, which changes nothing in the result).
    let (mid, mid_w) = if out_w != width {
        let wx = weights(width, out_w);
        let mut mid = vec![0u8; out_w * height * C];
        for (row_in, row_out) in src
            .chunks_exact(width * C)
            .zip(mid.chunks_exact_mut(out_w * C))
        {
            for (xx, px_out) in row_out.chunks_exact_mut(C).enumerate() {
                let (x0, taps) = (wx.first[xx], &wx.taps[xx]);
                let window = &row_in[x0 * C..(x0 + taps.len()) * C];
                let mut acc = [half; C];
                for (px, &k) in window.chunks_exact(C).zip(taps) {
                    for c in 0..C {
                        acc[c] += px[c] as i32 * k;
                    }
                }
                for c in 0..C {
                    px_out[c] = clip8(acc[c]);
                }
            }
        }
        (std::borrow::Cow::Owned(mid), out_w)
    } else {
        (std::borrow::Cow::Borrowed(src), width)
    };
    if out_h == height {
        return mid.into_owned();
    }
    let wy = weights(height, out_h);
    let stride = mid_w * C;
    let mut out = vec![0u8; out_h * stride];
    let mut acc = vec![0i32; stride];
    for (yy, row_out) in out.chunks_exact_mut(stride).enumerate() {
        let (y0, taps) = (wy.first[yy], &wy.taps[yy]);
        acc.fill(half);
        for (j, &k) in taps.iter().enumerate() {
            let row = &mid[(y0 + j) * stride..(y0 + j + 1) * stride];
            for (a, &v) in acc.iter_mut().zip(row) {
                *a += v as i32 * k;
            }
        }
        for (o, &a) in row_out.iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_and_widen_when_shrinking() {
        for (n_in, n_out) in [
            (300, 224),
            (64, 224),
            (1000, 224),
            (5, 3),
            (2, 224),
            (112, 224),
        ] {
            let w = weights(n_in, n_out);
            for taps in &w.taps {
                let s: i64 = taps.iter().map(|&k| k as i64).sum();
                let abs: i64 = taps.iter().map(|&k| (k as i64).abs()).sum();
                assert!(
                    abs <= (5 << PRECISION_BITS) / 4 + taps.len() as i64,
                    "i32 headroom: {abs}"
                );
                assert!(
                    (s - (1 << PRECISION_BITS)).abs() <= taps.len() as i64,
                    "{s}"
                );
            }
        }
        // 1000 -> 224 is a 4.46x shrink: the kernel spans about 4 * 4.46 inputs.
        assert!(weights(1000, 224).taps[100].len() >= 17);
        assert!(weights(64, 224).taps[100].len() <= 5);
    }

    #[test]
    fn constant_image_stays_constant() {
        let src = vec![77u8; 13 * 9 * 3];
        let out = resize_bicubic::<3>(&src, 13, 9, 31, 5);
        assert_eq!(out.len(), 31 * 5 * 3);
        assert!(out.iter().all(|&v| v == 77));
    }

    #[test]
    fn overshoot_is_clamped() {
        // A hard 0/255 edge rings past both ends; each pass clamps.
        let src: Vec<u8> = (0..16).map(|x| if x < 8 { 0 } else { 255 }).collect();
        let out = resize_bicubic::<1>(&src, 16, 1, 40, 1);
        assert_eq!(out[0], 0);
        assert_eq!(out[39], 255);
        assert!(out.windows(2).any(|w| w[0] > 0 && w[0] < 255));
    }
}
