//! A stable-toolchain companion of the cargo-fuzz target: thousands of seeded mutations of
//! the fixture images (truncations, bit flips, inserted and duplicated spans, corrupted
//! headers) through the request decode path. Each must end as Ok or a 4xx error, never a panic.

mod common;

use capt_core::PreprocessConfig;
use capt_edge::input::{decode_one, multipart_body, split_multipart, InputLimits};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn mutate(rng: &mut StdRng, src: &[u8]) -> Vec<u8> {
    let mut v = src.to_vec();
    for _ in 0..rng.random_range(1..4) {
        match rng.random_range(0..5) {
            0 => v.truncate(rng.random_range(0..=v.len())),
            1 => {
                for _ in 0..rng.random_range(1..16) {
                    if !v.is_empty() {
                        let i = rng.random_range(0..v.len());
                        v[i] ^= 1 << rng.random_range(0..8);
                    }
                }
            }
            2 => {
                let i = rng.random_range(0..=v.len());
                let junk: Vec<u8> = (0..rng.random_range(1..64)).map(|_| rng.random()).collect();
                v.splice(i..i, junk);
            }
            3 if v.len() > 8 => {
                let a = rng.random_range(0..v.len() - 4);
                let b = rng.random_range(a..v.len());
                let span = v[a..b].to_vec();
                v.splice(b..b, span);
            }
            _ => {
                // Corrupt the header region, where sizes and chunk lengths live.
                for _ in 0..4 {
                    if v.len() > 32 {
                        let i = rng.random_range(8..32);
                        v[i] = rng.random();
                    }
                }
            }
        }
    }
    v
}

#[test]
fn mutated_images_never_panic() {
    let pre = PreprocessConfig::clip(32);
    let limits = InputLimits {
        max_pixels: 4_000_000,
        max_images: 4,
    };
    let mut rng = StdRng::seed_from_u64(20261130);
    let (mut ok, mut rejected) = (0, 0);
    for name in [
        "gradient_32.png",
        "noise_32.png",
        "waves_48x40.jpg",
        "checker_48x64.png",
    ] {
        let src = common::image(name);
        for _ in 0..300 {
            let m = mutate(&mut rng, &src);
            match decode_one(&m, name, &limits, &pre) {
                Ok(px) => {
                    assert_eq!(px.len(), 3 * 32 * 32);
                    assert!(px.iter().all(|x| x.is_finite()));
                    ok += 1;
                }
                Err(e) => {
                    assert!((400..500).contains(&e.status()), "{e}");
                    rejected += 1;
                }
            }
        }
    }
    eprintln!("mutations: {ok} decoded, {rejected} rejected");
    assert!(rejected > 100, "mutations should mostly be rejected");
}

#[test]
fn mutated_multipart_bodies_never_panic() {
    let limits = InputLimits::default();
    let img = common::image("gradient_32.png");
    let (_, body) = multipart_body(&[("a.png", &img), ("b.png", &img)]);
    let mut rng = StdRng::seed_from_u64(7);
    for _ in 0..2000 {
        let m = mutate(&mut rng, &body);
        if let Err(e) = split_multipart(&m, "capt-edge-boundary-7d1c9a", &limits) {
            assert!((400..500).contains(&e.status()), "{e}");
        }
    }
}
