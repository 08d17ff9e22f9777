//! The `capt-edge` binary: classify, bench, errors, and serve with SIGTERM.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Spawns `capt-edge serve` from `cmd` (stderr piped) and waits up to 60 s for the log line
/// from which `addr_of` reads the listening address.
fn spawn_serve(
    mut cmd: Command,
    addr_of: impl Fn(&str) -> Option<std::net::SocketAddr>,
) -> (
    std::process::Child,
    BufReader<std::process::ChildStderr>,
    std::net::SocketAddr,
) {
    let mut child = cmd.stderr(Stdio::piped()).spawn().unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let started = Instant::now();
    let mut addr = None;
    let mut line = String::new();
    while addr.is_none() && started.elapsed() < Duration::from_secs(60) {
        line.clear();
        if stderr.read_line(&mut line).unwrap() == 0 {
            break;
        }
        addr = addr_of(&line);
    }
    let addr = addr.expect("server logged its address");
    (child, stderr, addr)
}

/// `capt-edge serve` on the fixture model (port 0, one thread, text logs), started.
fn spawn_text_serve() -> (
    std::process::Child,
    BufReader<std::process::ChildStderr>,
    std::net::SocketAddr,
) {
    let mut cmd = bin();
    cmd.args([
        "serve",
        "--model",
        &model_arg(),
        "--addr",
        "127.0.0.1:0",
        "--threads",
        "1",
    ])
    .env("RUST_LOG", "info");
    spawn_serve(cmd, |line| {
        line.contains("serving")
            .then(|| {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix("addr="))
                    .map(|a| a.parse().unwrap())
            })
            .flatten()
    })
}

fn model_arg() -> String {
    fixture().join("model").display().to_string()
}

#[test]
fn classify_files_folders_and_stdin_as_json() {
    let images = fixture().join("images");
    let out = bin()
        .args([
            "classify",
            "--model",
            &model_arg(),
            "--json",
            "--top-k",
            "5",
            "--threads",
            "1",
        ])
        .arg(&images)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    let reference = reference();
    for r in reference["images"].as_array().unwrap() {
        let file = r["file"].as_str().unwrap();
        let line = lines
            .iter()
            .find(|l| l["image"].as_str().unwrap().ends_with(file))
            .unwrap_or_else(|| panic!("{file} missing"));
        let got = probs_in_class_order(line, 5);
        let want: Vec<f32> = r["probs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert!(
            max_abs_diff(&got, &want) <= 1e-5,
            "{file}: {got:?} vs {want:?}"
        );
    }

    // stdin, text output.
    let mut child = bin()
        .args(["classify", "--model", &model_arg(), "--top-k", "2", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&image("gradient_32.png"))
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let top1 = reference["images"][0]["top1"].as_u64().unwrap() as usize;
    let names = ["cat", "dog", "sea turtle", "fire truck", "maple leaf"];
    assert!(text.starts_with(&format!("-: {} (", names[top1])), "{text}");
    assert_eq!(text.matches('(').count(), 2, "{text}");
}

#[test]
fn bad_image_is_reported_and_others_still_classified() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("broken.jpg");
    std::fs::write(&bad, b"definitely not a jpeg").unwrap();
    let good = fixture().join("images/noise_32.png");
    let out = bin()
        .args(["classify", "--model", &model_arg()])
        .arg(&bad)
        .arg(&good)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("broken.jpg") && stderr.contains("not a decodable image"),
        "{stderr}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("noise_32.png: "), "{stdout}");
}

#[test]
fn model_errors_name_the_problem_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let out = bin()
        .args(["classify", "--model"])
        .arg(dir.path())
        .arg(fixture().join("images/noise_32.png"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("capt.json is missing"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    let out = bin()
        .args(["classify", "--model", &model_arg(), "/no/such/image.png"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/no/such/image.png does not exist"));

    let out = bin()
        .args(["classify", "--model", &model_arg(), "--device", "cuda"])
        .arg(fixture().join("images/noise_32.png"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("tract runs on the CPU only"));
}

#[cfg(feature = "ort")]
#[test]
fn missing_onnxruntime_is_a_clear_error() {
    let out = bin()
        .args([
            "classify",
            "--model",
            &model_arg(),
            "--backend",
            "ort",
            "--ort-lib",
            "/nonexistent/libonnxruntime.so",
        ])
        .arg(fixture().join("images/noise_32.png"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/nonexistent/libonnxruntime.so")
            && stderr.contains("does not exist")
            && stderr.contains("pip install onnxruntime"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn bench_reports_percentiles_cold_start_and_rss() {
    let out = bin()
        .args([
            "bench",
            "--model",
            &model_arg(),
            "--batch",
            "1,4",
            "--iters",
            "5",
            "--warmup",
            "1",
            "--json",
            "--threads",
            "1",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(r["cold_start_ms"].as_f64().unwrap() >= r["load_ms"].as_f64().unwrap());
    assert!(r["peak_rss_mib"].as_f64().unwrap() > 1.0);
    let batches = r["batches"].as_array().unwrap();
    assert_eq!(batches.len(), 2);
    for (b, n) in batches.iter().zip([1, 4]) {
        assert_eq!(b["batch"], n);
        assert_eq!(b["runs"], 5);
        let (p50, p90, p99) = (
            b["p50_ms"].as_f64().unwrap(),
            b["p90_ms"].as_f64().unwrap(),
            b["p99_ms"].as_f64().unwrap(),
        );
        assert!(0.0 < p50 && p50 <= p90 && p90 <= p99, "{b}");
        assert!(b["images_per_second"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn bench_compare_times_two_models_interleaved() {
    let run = |extra: &[&str]| {
        let model = model_arg();
        let mut args = vec![
            "bench",
            "--model",
            &model,
            "--compare",
            &model,
            "--batch",
            "1,2",
            "--iters",
            "4",
            "--warmup",
            "1",
            "--threads",
            "1",
        ];
        args.extend_from_slice(extra);
        bin().args(&args).output().unwrap()
    };
    let out = run(&["--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let c = &r["compare"];
    let (a, b) = (
        r["batches"].as_array().unwrap(),
        c["batches"].as_array().unwrap(),
    );
    assert_eq!((a.len(), b.len()), (2, 2));
    for (i, n) in [1, 2].into_iter().enumerate() {
        // Interleaved: both sides ran every iteration.
        assert_eq!(
            (a[i]["runs"].as_u64(), b[i]["runs"].as_u64()),
            (Some(4), Some(4))
        );
        let ratio = c["p50_ratio"][i].as_array().unwrap();
        assert_eq!(ratio[0], n);
        let want = a[i]["p50_ms"].as_f64().unwrap() / b[i]["p50_ms"].as_f64().unwrap();
        assert!((ratio[1].as_f64().unwrap() - want).abs() < 1e-9);
    }
    // The table names both sides and prints the ratio.
    let text = String::from_utf8_lossy(&run(&[]).stdout).into_owned();
    assert!(
        text.contains("compared, interleaved") && text.contains("A / B"),
        "{text}"
    );
    // A missing second model is a named error.
    let out = bin()
        .args([
            "bench",
            "--model",
            &model_arg(),
            "--compare",
            "/nonexistent/export",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/export") && !err.contains("panicked"),
        "{err}"
    );
}

#[test]
fn serve_binary_stops_cleanly_on_sigterm() {
    let (mut child, mut stderr, addr) = spawn_text_serve();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = capt_edge::client::Client::connect(addr).await.unwrap();
        let r = c
            .post("/v1/classify", "image/png", image("noise_32.png"))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    });
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "server did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status}");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    assert!(rest.contains("server stopped"), "{rest}");
}

/// Every serve flag can come from the environment (`CAPT_EDGE_*`); `--json-logs` writes one
/// JSON object per line, and a request's log line carries its request id.
#[test]
fn serve_takes_its_flags_from_the_environment_and_logs_json() {
    let mut cmd = bin();
    cmd.arg("serve")
        .env("CAPT_EDGE_MODEL", model_arg())
        .env("CAPT_EDGE_ADDR", "127.0.0.1:0")
        .env("CAPT_EDGE_THREADS", "1")
        .env("CAPT_EDGE_TOP_K", "2")
        .env("CAPT_EDGE_JSON_LOGS", "true")
        .env("RUST_LOG", "info");
    let (mut child, mut stderr, addr) = spawn_serve(cmd, |line| {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        (v["fields"]["message"] == "serving")
            .then(|| v["fields"]["addr"].as_str().map(|a| a.parse().unwrap()))
            .flatten()
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = capt_edge::client::Client::connect(addr)
            .await
            .unwrap()
            .with_header("x-request-id", "env-test-7");
        let r = c
            .post("/v1/classify", "image/png", image("noise_32.png"))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        // CAPT_EDGE_TOP_K=2 took effect.
        assert_eq!(r.json()["results"][0]["top_k"].as_array().unwrap().len(), 2);
        assert_eq!(r.header("x-request-id"), Some("env-test-7"));
    });
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status {status}");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    let done: Vec<serde_json::Value> = rest
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["fields"]["message"] == "request done")
        .collect();
    assert!(
        done.iter().any(|v| v["span"]["id"] == "env-test-7"),
        "no request log line with the request id: {rest}"
    );
}

/// examples/client.py (requests only) against a running server: one image as the raw body,
/// two as multipart, and a non-image answered with the server's error. Skipped, with a
/// notice, without a Python that has `requests` (CAPT_PYTHON, set by tools/test.sh).
#[test]
fn python_client_example_talks_to_a_running_server() {
    let py = std::env::var_os("CAPT_PYTHON").filter(|p| {
        Command::new(p)
            .args(["-c", "import requests"])
            .status()
            .is_ok_and(|s| s.success())
    });
    let Some(py) = py else {
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED python_client_example_talks_to_a_running_server: no CAPT_PYTHON with requests"
        );
        return;
    };
    let (mut child, _stderr, addr) = spawn_text_serve();
    let client = fixture().join("../../../examples/client.py");
    let url = format!("http://{addr}");
    let img = |n: &str| fixture().join("images").join(n);
    let run = |args: &[&std::ffi::OsStr]| {
        Command::new(&py)
            .arg(&client)
            .args(["--url", &url, "--top-k", "2"])
            .args(args)
            .output()
            .unwrap()
    };
    let one = run(&[img("noise_32.png").as_os_str()]);
    let text = String::from_utf8_lossy(&one.stdout);
    assert!(
        one.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&one.stderr)
    );
    assert!(
        text.starts_with("body: ") && text.matches('(').count() == 2,
        "{text}"
    );
    let two = run(&[
        img("noise_32.png").as_os_str(),
        img("gradient_32.png").as_os_str(),
    ]);
    let text = String::from_utf8_lossy(&two.stdout);
    assert!(two.status.success(), "{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines.len() == 2
            && lines[0].starts_with("noise_32.png: ")
            && lines[1].starts_with("gradient_32.png: "),
        "{text}"
    );
    let tmp = tempfile::tempdir().unwrap();
    let not_image = tmp.path().join("notes.txt");
    std::fs::write(&not_image, b"not an image").unwrap();
    let bad = run(&[not_image.as_os_str()]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(1), "{err}");
    assert!(err.contains("error 400"), "{err}");
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

/// Needs ONNX Runtime: skipped with a notice unless ORT_DYLIB_PATH names the library.
#[cfg(feature = "ort")]
#[test]
fn ort_and_tract_classify_alike() {
    let Some(lib) =
        std::env::var_os("ORT_DYLIB_PATH").filter(|p| std::path::Path::new(p).is_file())
    else {
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED ort_and_tract_classify_alike: set ORT_DYLIB_PATH to run it"
        );
        return;
    };
    let run = |backend: &str| -> Vec<serde_json::Value> {
        let out = bin()
            .args([
                "classify",
                "--model",
                &model_arg(),
                "--json",
                "--backend",
                backend,
                "--batch",
                "3",
            ])
            .arg("--ort-lib")
            .arg(&lib)
            .arg(fixture().join("images"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{backend}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let (a, b) = (run("ort"), run("tract"));
    assert_eq!(a.len(), 4);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x["image"], y["image"]);
        let d = max_abs_diff(&probs_in_class_order(x, 5), &probs_in_class_order(y, 5));
        assert!(d <= 1e-5, "{}: {d}", x["image"]);
    }
}
