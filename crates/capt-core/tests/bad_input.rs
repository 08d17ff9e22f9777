//! Bad image input gives a `PreprocessError` that names the source, never a panic.

mod common;

use capt_core::preprocess::{
    decode_image, decode_image_with_alpha, load_image, PreprocessConfig, PreprocessError,
};
use common::*;

fn decode_err(bytes: &[u8], name: &str) -> PreprocessError {
    let Err(err) = decode_image(bytes, name) else {
        panic!("{name} decoded without an error");
    };
    assert!(
        err.to_string().contains(name),
        "error does not name {name}: {err}"
    );
    err
}

#[test]
fn unreadable_files_are_io_errors_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.jpg");
    let err = load_image(&missing).unwrap_err();
    assert!(matches!(err, PreprocessError::Io { .. }), "{err}");
    assert!(err.to_string().contains("missing.jpg"), "{err}");
    // A directory cannot be read as a file either.
    let err = load_image(dir.path()).unwrap_err();
    assert!(matches!(err, PreprocessError::Io { .. }), "{err}");
    let err = PreprocessConfig::clip(224)
        .preprocess_file(&missing)
        .unwrap_err();
    assert!(err.to_string().contains("missing.jpg"), "{err}");
}

#[test]
fn zero_bytes_and_non_images_are_decode_errors() {
    assert!(matches!(
        decode_err(b"", "empty.jpg"),
        PreprocessError::Decode { .. }
    ));
    assert!(matches!(
        decode_err(b"hello, I am text\n", "notes.png"),
        PreprocessError::Decode { .. }
    ));
    assert!(matches!(
        decode_err(&[0u8; 4096], "zeros.bin"),
        PreprocessError::Decode { .. }
    ));
    // Right magic, nothing after it.
    assert!(matches!(
        decode_err(b"\xff\xd8\xff", "stub.jpg"),
        PreprocessError::Decode { .. }
    ));
    assert!(matches!(
        decode_err(b"\x89PNG\r\n\x1a\n", "stub.png"),
        PreprocessError::Decode { .. }
    ));
}

#[test]
fn truncated_files_are_decode_errors() {
    for name in [
        "pets_pug_portrait.jpg",
        "caltech_gray_wrench.jpg",
        "pets_alpha.png",
        "imagenet_rgb16.png",
        "caltech_bmp.bmp",
        "dtd_webp.webp",
    ] {
        let full = fixture(name);
        // Cuts inside the pixel data (a PNG cut inside its IEND trailer still has every pixel).
        for keep in [full.len() / 3, full.len() * 2 / 3] {
            let label = format!("{name} cut to {keep} bytes");
            let err = decode_err(&full[..keep], &label);
            assert!(matches!(err, PreprocessError::Decode { .. }), "{err}");
        }
    }
    let jpeg = fixture("pets_pug_portrait.jpg");
    for keep in [4000, jpeg.len() - 2] {
        let err = decode_err(&jpeg[..keep], "cut.jpg");
        assert!(err.to_string().contains("truncated"), "{err}");
    }
}

#[test]
fn huge_headers_are_too_large() {
    let cases: [(&str, Vec<u8>); 3] = [
        ("huge.png", png_claiming(HUGE, HUGE)),
        ("huge.jpg", jpeg_claiming(HUGE as u16, HUGE as u16)),
        ("huge.bmp", bmp_claiming(HUGE as i32, HUGE as i32)),
    ];
    for (name, bytes) in &cases {
        match decode_err(bytes, name) {
            PreprocessError::TooLarge { width, height, .. } => {
                assert_eq!((width, height), (HUGE, HUGE), "{name}")
            }
            other => panic!("{name}: expected TooLarge, got {other}"),
        }
    }
    // WebP's extended header: image-webp may already refuse the canvas/frame mismatch.
    let err = decode_image_with_alpha(&webp_claiming(HUGE, HUGE), "huge.webp").unwrap_err();
    assert!(
        matches!(
            err,
            PreprocessError::TooLarge { .. } | PreprocessError::Decode { .. }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("huge.webp"), "{err}");
}

#[test]
fn empty_dimension_is_an_error() {
    let err = decode_err(&png_claiming(0, 10), "flat.png");
    assert!(
        matches!(
            err,
            PreprocessError::Empty { .. } | PreprocessError::Decode { .. }
        ),
        "{err}"
    );
}

/// Cut and corrupt every fixture in many places; each result must be Ok or a named error.
#[test]
fn corrupted_bytes_never_panic() {
    let names = [
        "eurosat_tiny.jpg",
        "caltech_gray_wrench.jpg",
        "pets_alpha.png",
        "caltech_bmp.bmp",
        "dtd_webp.webp",
    ];
    let mut errors = 0;
    for name in names {
        let full = fixture(name);
        let mut variants: Vec<Vec<u8>> = (1..12)
            .map(|i| full[..full.len() * i / 12].to_vec())
            .collect();
        for i in 0..40usize {
            let mut v = full.clone();
            // Deterministic spread of positions, biased to the headers where parsers branch.
            let pos = if i < 20 {
                (i * 7 + 2) % full.len().min(400)
            } else {
                (i * 7919) % full.len()
            };
            v[pos] ^= 0x5a ^ (i as u8);
            variants.push(v);
        }
        for (k, v) in variants.iter().enumerate() {
            let label = format!("{name}#{k}");
            let outcome = std::panic::catch_unwind(|| decode_image_with_alpha(v, &label));
            match outcome {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    assert!(e.to_string().contains(&label), "{e}");
                    errors += 1;
                }
                Err(_) => panic!("decoding {label} panicked"),
            }
        }
    }
    assert!(errors > 0);
}
