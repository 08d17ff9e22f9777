//! Fuzzes what `POST /v1/classify` does with untrusted bytes before inference: content-type
//! parsing, multipart splitting, header size checks, image decoding and preprocessing. Any
//! panic, hang or runaway allocation is a bug; errors are the expected outcome.
#![no_main]

use capt_core::PreprocessConfig;
use capt_edge::input::{body_kind, decode_all, decode_one, split_multipart, BodyKind, InputLimits, NamedImage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else { return };
    let pre = PreprocessConfig::clip(32);
    let limits = InputLimits {
        max_pixels: 4_000_000,
        max_images: 4,
    };
    match selector % 3 {
        // A raw image body.
        0 => {
            let _ = decode_one(rest, "fuzz", &limits, &pre);
        }
        // A multipart body with a fixed boundary.
        1 => {
            if let Ok(parts) = split_multipart(rest, "capt-edge-boundary-7d1c9a", &limits) {
                let _ = decode_all(&parts, &limits, &pre);
            }
        }
        // A Content-Type line, then the body.
        _ => {
            let split = rest.iter().position(|b| *b == b'\n').unwrap_or(rest.len());
            let ct = String::from_utf8_lossy(&rest[..split]);
            let body = rest.get(split + 1..).unwrap_or_default();
            match body_kind(Some(&ct)) {
                Ok(BodyKind::Raw) => {
                    let img = NamedImage {
                        name: "body".into(),
                        bytes: bytes_of(body),
                    };
                    let _ = decode_all(&[img], &limits, &pre);
                }
                Ok(BodyKind::Multipart { boundary }) => {
                    if let Ok(parts) = split_multipart(body, &boundary, &limits) {
                        let _ = decode_all(&parts, &limits, &pre);
                    }
                }
                Err(_) => {}
            }
        }
    }
});

fn bytes_of(b: &[u8]) -> capt_edge::input::Bytes {
    capt_edge::input::Bytes::copy_from_slice(b)
}
