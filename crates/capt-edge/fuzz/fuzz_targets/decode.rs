//! Fuzzes what `POST /v1/classify` does with untrusted bytes before inference: content-type
//! parsing, multipart splitting, header size checks, image decoding and preprocessing. Any
//! panic, hang or runaway allocation is a bug; errors are the expected outcome, and every error
//! must map to a 4xx status (a 5xx would blame the server for a bad upload).
#![no_main]

use capt_core::PreprocessConfig;
use capt_edge::input::{
    body_kind, decode_all, decode_one, split_multipart, BodyKind, Decoded, InputError, InputLimits,
    NamedImage,
};
use libfuzzer_sys::fuzz_target;

/// Small crop: the fuzzer is after the decode path, not resize speed.
const CROP: usize = 32;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let pre = PreprocessConfig::clip(CROP as u32);
    let limits = InputLimits {
        max_pixels: 4_000_000,
        max_images: 4,
    };
    match selector % 3 {
        // A raw image body.
        0 => match decode_one(rest, "fuzz", &limits, &pre) {
            Ok(px) => check_pixels(&px, 1),
            Err(e) => check_error(&e),
        },
        // A multipart body with a fixed boundary.
        1 => multipart(rest, "capt-edge-boundary-7d1c9a", &limits, &pre),
        // A Content-Type line, then the body.
        _ => {
            let split = rest.iter().position(|b| *b == b'\n').unwrap_or(rest.len());
            let ct = String::from_utf8_lossy(&rest[..split]);
            let body = rest.get(split + 1..).unwrap_or_default();
            match body_kind(Some(&ct)) {
                Ok(BodyKind::Raw) => {
                    let img = NamedImage {
                        name: "body".into(),
                        bytes: capt_edge::input::Bytes::copy_from_slice(body),
                    };
                    check_all(decode_all(&[img], &limits, &pre), 1);
                }
                Ok(BodyKind::Multipart { boundary }) => multipart(body, &boundary, &limits, &pre),
                Err(e) => check_error(&e),
            }
        }
    }
});

fn multipart(body: &[u8], boundary: &str, limits: &InputLimits, pre: &PreprocessConfig) {
    match split_multipart(body, boundary, limits) {
        Ok(parts) => {
            assert!(!parts.is_empty() && parts.len() <= limits.max_images);
            check_all(decode_all(&parts, limits, pre), parts.len());
        }
        Err(e) => check_error(&e),
    }
}

fn check_all(result: Result<Decoded, InputError>, n: usize) {
    match result {
        Ok(d) => {
            assert_eq!(d.names.len(), n);
            check_pixels(&d.pixels, n);
        }
        Err(e) => check_error(&e),
    }
}

fn check_pixels(px: &[f32], n: usize) {
    assert_eq!(px.len(), n * 3 * CROP * CROP);
    assert!(px.iter().all(|x| x.is_finite()));
}

fn check_error(e: &InputError) {
    assert!((400..500).contains(&e.status()), "{e}");
    assert!(!e.to_string().is_empty());
}
