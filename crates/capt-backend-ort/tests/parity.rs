//! ONNX Runtime backend against the onnxruntime reference and against tract. Skipped, with a
//! notice, when no ONNX Runtime library is configured: set ORT_DYLIB_PATH to
//! `.../site-packages/onnxruntime/capi/libonnxruntime.so.1.32.0` (pip install onnxruntime==1.32.0).

use std::io::Write;
use std::path::{Path, PathBuf};

use capt_backend::{max_abs_diff, synthetic_batch, warm_up, Backend, ModelDir};
use capt_backend_ort::{Device, OrtBackend, OrtOptions};
use capt_backend_tract::{TractBackend, TractOptions};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/edge")
}

/// The runtime, or None after printing why the test is skipped.
fn runtime_or_skip(test: &str) -> Option<()> {
    match capt_backend_ort::runtime(None) {
        Ok(_) => Some(()),
        Err(e) => {
            // Written to the real stderr, past the test harness's capture, so the skip shows.
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED {test}: no ONNX Runtime library ({e}); set ORT_DYLIB_PATH to run it"
            );
            None
        }
    }
}

fn opts(device: Device, allow_fallback: bool) -> OrtOptions {
    OrtOptions {
        device,
        allow_fallback,
        threads: 1,
        ..Default::default()
    }
}

#[test]
fn ort_matches_reference_and_tract() {
    let Some(()) = runtime_or_skip("ort_matches_reference_and_tract") else {
        return;
    };
    let dir = ModelDir::open(fixture().join("model")).unwrap();
    let ort = OrtBackend::load(&dir, &opts(Device::Cpu, false)).unwrap();
    assert_eq!(ort.provider(), "CPUExecutionProvider");
    assert!(
        ort.describe().starts_with("onnxruntime 1."),
        "{}",
        ort.describe()
    );
    warm_up(&ort, &dir).unwrap();
    let tract = TractBackend::load(
        &dir,
        &TractOptions {
            threads: 1,
            ..Default::default()
        },
    )
    .unwrap();

    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("reference.json")).unwrap())
            .unwrap();
    let batch = synthetic_batch(3, 32);
    let a = ort.classify(&batch).unwrap();
    let b = tract.classify(&batch).unwrap();
    let want: Vec<f32> = reference["synthetic"]["probs"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
        })
        .collect();
    // Same library and graph as the Python reference: bit-for-bit up to thread scheduling.
    assert!(
        max_abs_diff(&a.probs, &want) <= 1e-6,
        "ort vs python onnxruntime"
    );
    let dp = max_abs_diff(&a.probs, &b.probs);
    let dl = max_abs_diff(&a.logits, &b.logits);
    eprintln!("ort vs tract: max |probs diff| {dp:e}, max |logits diff| {dl:e}");
    assert!(dp <= 1e-5, "probs differ by {dp}");
    assert!(dl <= 1e-4, "logits (scale 100) differ by {dl}");

    // Every batch size from 1 to 8 agrees across engines.
    for n in 1..=8 {
        let x = synthetic_batch(n, 32);
        let d = max_abs_diff(
            &ort.classify(&x).unwrap().probs,
            &tract.classify(&x).unwrap().probs,
        );
        assert!(d <= 1e-5, "batch {n}: {d}");
    }
    // Real images through capt-core preprocessing.
    for name in [
        "gradient_32.png",
        "noise_32.png",
        "waves_48x40.jpg",
        "checker_48x64.png",
    ] {
        let x = capt_backend::ImageBatch {
            data: dir
                .manifest
                .preprocess
                .preprocess_file(&fixture().join("images").join(name))
                .unwrap(),
            n: 1,
            height: 32,
            width: 32,
        };
        let d = max_abs_diff(
            &ort.classify(&x).unwrap().probs,
            &tract.classify(&x).unwrap().probs,
        );
        assert!(d <= 1e-5, "{name}: {d}");
    }
}

/// The optimised-graph cache: written on the first start, loaded on the next (same outputs),
/// skipped without failing when the folder is read-only, unused when turned off.
#[test]
fn optimised_graph_cache_is_written_then_loaded() {
    let Some(()) = runtime_or_skip("optimised_graph_cache_is_written_then_loaded") else {
        return;
    };
    use capt_backend_ort::{Cached, CACHE_DIR};
    let tmp = tempfile::tempdir().unwrap();
    for f in ["capt.json", "classifier.onnx"] {
        std::fs::copy(fixture().join("model").join(f), tmp.path().join(f)).unwrap();
    }
    let dir = ModelDir::open(tmp.path()).unwrap();
    let cached = OrtOptions {
        cache: true,
        ..opts(Device::Cpu, false)
    };
    let batch = synthetic_batch(2, dir.manifest.preprocess.crop as usize);
    let first = OrtBackend::load(&dir, &cached).unwrap();
    assert_eq!(first.cache(), Some(Cached::Written));
    let files: Vec<_> = std::fs::read_dir(tmp.path().join(CACHE_DIR))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        files.len(),
        1,
        "one cache file, no temporary left: {files:?}"
    );
    let second = OrtBackend::load(&dir, &cached).unwrap();
    assert_eq!(second.cache(), Some(Cached::Hit));
    let (a, b) = (
        first.classify(&batch).unwrap(),
        second.classify(&batch).unwrap(),
    );
    assert!(max_abs_diff(&a.logits, &b.logits) <= 1e-6);
    let off = OrtBackend::load(&dir, &opts(Device::Cpu, false)).unwrap();
    assert_eq!(off.cache(), None);
    // A read-only export still loads; the cache is just not written.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let ro = tempfile::tempdir().unwrap();
        for f in ["capt.json", "classifier.onnx"] {
            std::fs::copy(fixture().join("model").join(f), ro.path().join(f)).unwrap();
        }
        std::fs::set_permissions(ro.path(), std::fs::Permissions::from_mode(0o555)).unwrap();
        let writable = std::fs::write(ro.path().join(".probe"), b"").is_ok();
        let rodir = ModelDir::open(ro.path()).unwrap();
        let r = OrtBackend::load(&rodir, &cached).unwrap();
        if !writable {
            assert_eq!(r.cache(), Some(Cached::NotWritten));
        }
        r.classify(&batch).unwrap();
        std::fs::set_permissions(ro.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

#[test]
fn ort_checks_the_contract() {
    let Some(()) = runtime_or_skip("ort_checks_the_contract") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let onnx = std::fs::read(fixture().join("bad_io/classifier.onnx")).unwrap();
    std::fs::write(tmp.path().join("classifier.onnx"), &onnx).unwrap();
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("model/capt.json")).unwrap())
            .unwrap();
    m["files"]["classifier"]["sha256"] =
        capt_backend::sha256_file(&tmp.path().join("classifier.onnx"))
            .unwrap()
            .into();
    std::fs::write(tmp.path().join("capt.json"), m.to_string()).unwrap();
    let dir = ModelDir::open(tmp.path()).unwrap();
    let err = OrtBackend::load(&dir, &opts(Device::Cpu, false))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("pixel_values") && err.contains("re-export"),
        "{err}"
    );
}

#[test]
fn gpu_request_fails_clearly_or_falls_back_when_allowed() {
    let Some(()) = runtime_or_skip("gpu_request_fails_clearly_or_falls_back_when_allowed") else {
        return;
    };
    let dir = ModelDir::open(fixture().join("model")).unwrap();
    for device in [Device::Cuda, Device::TensorRt] {
        match OrtBackend::load(&dir, &opts(device, false)) {
            // A GPU build of ONNX Runtime on a GPU machine: the provider is really used.
            Ok(b) => assert_ne!(b.provider(), "CPUExecutionProvider"),
            Err(e) => {
                let e = e.to_string();
                assert!(
                    e.contains(&format!("--device {device}")) && e.contains("--allow-fallback"),
                    "{e}"
                );
                let b = OrtBackend::load(&dir, &opts(device, true)).unwrap();
                assert_eq!(b.provider(), "CPUExecutionProvider");
                assert_eq!(b.classify(&synthetic_batch(1, 32)).unwrap().classes, 5);
            }
        }
    }
}
