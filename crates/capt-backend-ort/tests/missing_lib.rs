//! Its own test binary: ONNX Runtime loads once per process, so the "library missing" path
//! must run before anything loads it.

use std::path::Path;

#[test]
fn missing_library_is_an_error_not_a_panic() {
    let err =
        capt_backend_ort::runtime(Some(Path::new("/nonexistent/dir/libonnxruntime.so.1.32.0")))
            .expect_err("a missing library cannot load")
            .to_string();
    assert!(
        err.contains("/nonexistent/dir/libonnxruntime.so.1.32.0"),
        "{err}"
    );
    assert!(
        err.contains("--ort-lib") && err.contains("pip install onnxruntime"),
        "{err}"
    );

    let not_a_lib = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(not_a_lib.path(), b"not an ELF file").unwrap();
    let err = capt_backend_ort::runtime(Some(not_a_lib.path()))
        .expect_err("garbage cannot load")
        .to_string();
    assert!(
        err.contains("no ONNX Runtime library found") || err.contains("failed to load"),
        "{err}"
    );
}
