//! tools/gpu-check.sh without a GPU: `--dry-run` parses its arguments, finds the binary,
//! reports the GPU it finds ("no GPU" on CI) and writes its JSON; a missing binary is a named
//! error with exit code 2. (The checks themselves need a GPU: docs/training.md.)

mod common;

use std::process::Command;

use common::{capt_train, repo};

fn has_nvidia_smi() -> bool {
    Command::new("nvidia-smi")
        .arg("-L")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn gpu_check(args: &[&str]) -> (i32, String, serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("gpu-check.json");
    let o = Command::new("bash")
        .arg(repo().join("tools/gpu-check.sh"))
        .args(args)
        .arg("--out")
        .arg(&out)
        .output()
        .expect("bash runs");
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    let json = std::fs::read_to_string(&out)
        .unwrap_or_else(|e| panic!("{} not written ({e}); stderr: {stderr}", out.display()));
    (
        o.status.code().unwrap_or(-1),
        stderr,
        serde_json::from_str(&json).unwrap(),
    )
}

#[test]
fn dry_run_finds_the_binary_and_reports_the_gpu() {
    let bin = env!("CARGO_BIN_EXE_capt-train");
    let (code, stderr, doc) = gpu_check(&["--dry-run", "--bin", bin]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(doc["status"], "dry-run", "{doc}");
    assert_eq!(doc["setup"]["binary"], bin);
    assert_eq!(doc["setup"]["binary_found"], true);
    // This test binary's own build: a CUDA one links libcuda, a CPU one does not.
    assert_eq!(doc["setup"]["cuda_build"], cfg!(feature = "cuda"), "{doc}");
    assert!(doc["checks"].as_object().unwrap().is_empty(), "{doc}");
    if !has_nvidia_smi() {
        assert!(doc["setup"]["gpu"].is_null(), "{doc}");
        assert!(stderr.contains("no GPU"), "{stderr}");
    }
}

#[test]
fn a_missing_binary_is_named_with_the_fix() {
    let (code, stderr, doc) = gpu_check(&["--dry-run", "--bin", "/nonexistent/capt-train"]);
    assert_eq!(code, 2);
    assert_eq!(doc["status"], "cannot-run");
    assert_eq!(doc["setup"]["binary_found"], false);
    assert!(
        stderr.contains("/nonexistent/capt-train") && stderr.contains("tools/build-cuda.sh"),
        "{stderr}"
    );
}

#[test]
fn unknown_arguments_are_refused() {
    let o = Command::new("bash")
        .arg(repo().join("tools/gpu-check.sh"))
        .arg("--gpu-please")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown argument --gpu-please"));
}

fn last_json(stdout: &str) -> serde_json::Value {
    let line = stdout.lines().rfind(|l| l.starts_with('{')).unwrap_or("");
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// The two benches gpu-check.sh reads, on the CPU: `bench forward` compares against CPU f32
/// (identical in f32, close in bf16) and `bench train-step` ends with one JSON line.
#[test]
fn the_benches_gpu_check_reads_print_their_json() {
    let r = capt_train(&["bench", "forward", "--backbone", "tiny", "--batch", "4"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let j = last_json(&r.stdout);
    assert_eq!(j["image_max_abs_diff"], 0.0, "{j}");
    assert_eq!(j["text_max_abs_diff"], 0.0, "{j}");
    assert!(j["images_per_s"].as_f64().unwrap() > 0.0, "{j}");

    let r = capt_train(&[
        "bench",
        "forward",
        "--backbone",
        "tiny",
        "--batch",
        "4",
        "--dtype",
        "bf16",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let j = last_json(&r.stdout);
    let d = j["image_max_abs_diff"].as_f64().unwrap();
    assert!(
        d > 0.0 && d < 2e-2,
        "bf16 towers should deviate a little: {j}"
    );

    let r = capt_train(&[
        "bench",
        "train-step",
        "--size",
        "tiny",
        "--classes",
        "5",
        "--steps",
        "1",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let j = last_json(&r.stdout);
    let methods: Vec<&str> = j["train_step"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["method"].as_str().unwrap())
        .collect();
    assert_eq!(methods, ["coop", "capt"], "{j}");
}

/// A CPU build asked for CUDA names the script that builds the CUDA one, without a panic.
#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_on_a_cpu_build_says_how_to_build_it() {
    let r = capt_train(&["bench", "forward", "--backbone", "tiny", "--device", "cuda"]);
    assert_ne!(r.code, 0);
    let err = &r.stderr;
    assert!(
        err.contains("tools/build-cuda.sh") && !err.contains("panicked"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}
