//! Seeded randomness. Every random draw of a run comes from a ChaCha stream that is a pure
//! function of (run seed, purpose, index), so runs are reproducible and a resumed run draws
//! exactly what an uninterrupted one would (no generator state has to survive a restart).

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

/// Purposes of the random streams (one namespace per use).
pub mod stream {
    /// Parameter initialisation (index: hash of the parameter name).
    pub const INIT: u64 = 0x1;
    /// Which cached view each training image uses in an epoch (index: epoch).
    pub const VIEWS: u64 = 0x2;
    /// Batch order of an epoch (index: epoch).
    pub const ORDER: u64 = 0x3;
    /// Random backbone weights (index: hash of the tensor name).
    pub const BACKBONE: u64 = 0x4;
    /// Training augmentation (feature cache / vision-prompt loader seed).
    pub const AUGMENT: u64 = 0x5;
}

/// The generator for `(seed, purpose, index)`.
pub fn rng(seed: u64, purpose: u64, index: u64) -> ChaCha8Rng {
    capt_data::view_rng(seed, purpose, index)
}

/// A stable 64-bit id of a name (for per-tensor streams independent of creation order).
pub fn name_id(name: &str) -> u64 {
    let d = Sha256::digest(name.as_bytes());
    u64::from_le_bytes(d[..8].try_into().expect("8 bytes"))
}

/// `n` draws of N(0, std^2) (Box-Muller on f64, rounded to f32).
pub fn normal<R: Rng + ?Sized>(rng: &mut R, n: usize, std: f64) -> Vec<f32> {
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        // 1 - u keeps the log argument in (0, 1].
        let u1: f64 = 1.0 - rng.random::<f64>();
        let u2: f64 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        let t = 2.0 * std::f64::consts::PI * u2;
        out.push((std * r * t.cos()) as f32);
        out.push((std * r * t.sin()) as f32);
    }
    out.truncate(n);
    out
}

/// Fisher-Yates shuffle of `0..n`.
pub fn permutation<R: Rng + ?Sized>(rng: &mut R, n: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.random_range(0..=i);
        v.swap(i, j);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_pure_functions_of_their_key() {
        let a = normal(&mut rng(1, stream::INIT, 7), 5, 1.0);
        let b = normal(&mut rng(1, stream::INIT, 7), 5, 1.0);
        let c = normal(&mut rng(1, stream::INIT, 8), 5, 1.0);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn normal_has_the_requested_spread() {
        let v = normal(&mut rng(3, stream::INIT, 0), 20000, 0.02);
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 1e-3, "{mean}");
        assert!((var.sqrt() - 0.02).abs() < 1e-3, "{}", var.sqrt());
    }

    #[test]
    fn permutation_is_a_permutation() {
        let mut p = permutation(&mut rng(0, stream::ORDER, 0), 50);
        p.sort();
        assert_eq!(p, (0..50).collect::<Vec<_>>());
    }
}
