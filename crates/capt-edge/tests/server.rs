//! The real HTTP server on a loopback port: every endpoint, batching, overflow (503), limits
//! (413), auth, malformed inputs, and graceful shutdown.

mod common;

use std::io::Write;
use std::sync::atomic::Ordering;
use std::time::Duration;

use capt_edge::batcher::BatchConfig;
use capt_edge::input::{multipart_body, InputLimits};
use capt_edge::server::ServerConfig;
use common::*;

fn cfg() -> ServerConfig {
    ServerConfig {
        batch: BatchConfig {
            max_batch: 8,
            max_wait: Duration::from_millis(2),
            queue_capacity: 64,
            workers: 1,
        },
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_answers() {
    let srv = TestServer::start(tract(), cfg()).await;
    let mut c = srv.client().await;

    let r = c.get("/healthz").await.unwrap();
    assert_eq!((r.status, r.text().trim()), (200, "ok"));
    assert_eq!(c.get("/readyz").await.unwrap().status, 200);

    let m = c.get("/v1/model").await.unwrap().json();
    assert_eq!(m["name"], "capt-edge-fixture-tiny");
    assert_eq!(m["num_classes"], 5);
    assert_eq!(m["class_names"][2], "sea turtle");
    assert_eq!(m["version"].as_str().unwrap().len(), 12);
    assert!(m["backend"].as_str().unwrap().starts_with("tract"));

    let doc = c.get("/openapi.json").await.unwrap().json();
    assert_eq!(doc["openapi"], "3.1.0");
    for p in [
        "/v1/classify",
        "/v1/model",
        "/healthz",
        "/readyz",
        "/metrics",
    ] {
        assert!(doc["paths"].get(p).is_some(), "{p} missing from OpenAPI");
    }

    // One raw image, all classes: equal to the onnxruntime reference.
    let r = c
        .post(
            "/v1/classify?top_k=5",
            "image/png",
            image("gradient_32.png"),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert_eq!(j["model"]["version"], m["version"]);
    let res = &j["results"][0];
    assert_eq!(res["name"], "body");
    let probs = probs_in_class_order(res, 5);
    let reference = reference();
    let want: Vec<f32> = reference["images"][0]["probs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    assert!(max_abs_diff(&probs, &want) <= 1e-5, "{probs:?} vs {want:?}");
    let ps: Vec<f64> = res["top_k"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["probability"].as_f64().unwrap())
        .collect();
    assert!(ps.windows(2).all(|w| w[0] >= w[1]), "top-k sorted: {ps:?}");
    for key in [
        "decode_ms",
        "queue_ms",
        "inference_ms",
        "total_ms",
        "batch_size",
    ] {
        assert!(j["timing"][key].as_f64().is_some(), "timing.{key}");
    }

    // Several images in one multipart request keep their order and names; default top-k.
    let (ct, body) = multipart_body(&[
        ("noise.png", &image("noise_32.png")),
        ("waves.jpg", &image("waves_48x40.jpg")),
        ("checker.png", &image("checker_48x64.png")),
    ]);
    let r = c.post("/v1/classify?top_k=2", &ct, body).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    let results = j["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    for (i, (res, name)) in results
        .iter()
        .zip(["noise.png", "waves.jpg", "checker.png"])
        .enumerate()
    {
        assert_eq!(res["name"], name);
        assert_eq!(res["index"], i);
        assert_eq!(res["top_k"].as_array().unwrap().len(), 2);
        let top1 = reference["images"][i + 1]["top1"].as_u64().unwrap();
        assert_eq!(
            res["top_k"][0]["class_index"].as_u64().unwrap(),
            top1,
            "{name}"
        );
    }

    // Errors are JSON with a code.
    let r = c
        .post("/v1/classify", "application/json", "{}")
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.json()["error"]["code"].as_str()),
        (415, Some("unsupported_media_type"))
    );
    let r = c
        .post("/v1/classify?top_k=0", "image/png", image("noise_32.png"))
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    let r = c
        .post("/v1/classify?top_k=abc", "image/png", image("noise_32.png"))
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    let r = c.get("/v2/nothing").await.unwrap();
    assert_eq!(
        (r.status, r.json()["error"]["code"].as_str()),
        (404, Some("not_found"))
    );

    let text = c.get("/metrics").await.unwrap().text();
    for needle in [
        "capt_requests_total{route=\"/v1/classify\",status=\"200\"} 2",
        "capt_requests_total{route=\"/v1/classify\",status=\"415\"} 1",
        "capt_errors_total{code=\"unsupported_media_type\"} 1",
        "capt_batch_size_count 2",
        "capt_images_total 4",
        "capt_queue_depth 0",
        "capt_inference_duration_seconds_bucket",
        "capt_request_duration_seconds_count",
    ] {
        assert!(text.contains(needle), "metrics lack {needle:?}:\n{text}");
    }
    srv.shutdown().await;
}

/// Probes and scrapes never land in the classify latency series; the probe port serves
/// /metrics, /healthz (deep too) and /readyz without the key; every answer carries a request id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_stay_out_of_the_classify_series_and_requests_carry_ids() {
    let mut config = cfg();
    let key = "probe-test-key-123".to_string();
    config.api_key = Some(key.clone());
    let (srv, probe) = TestServer::start_with_probes(tract(), config, true).await;
    let probe = probe.unwrap();
    let mut c = srv.client().await.with_api_key(Some(key));
    let r = c
        .post("/v1/classify", "image/png", image("noise_32.png"))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let generated = r.header("x-request-id").unwrap().to_string();
    assert!(!generated.is_empty());
    let classify_count = srv.state.metrics.request_latency_count("/v1/classify");
    assert_eq!(classify_count, 1);

    // The probe port: no key needed; deep health runs an inference through the queue.
    let mut p = capt_edge::client::Client::connect(probe).await.unwrap();
    for path in ["/healthz", "/readyz", "/healthz?deep=1", "/metrics"] {
        let r = p.get(path).await.unwrap();
        assert_eq!(r.status, 200, "{path}: {}", r.text());
    }
    assert!(p
        .get("/healthz?deep=1")
        .await
        .unwrap()
        .text()
        .contains("inference"));
    assert_eq!(p.get("/v1/classify").await.unwrap().status, 404);
    // The main port still wants the key for /metrics.
    let mut stranger = srv.client().await;
    assert_eq!(stranger.get("/metrics").await.unwrap().status, 401);
    for _ in 0..3 {
        assert_eq!(c.get("/healthz").await.unwrap().status, 200);
        assert_eq!(c.get("/metrics").await.unwrap().status, 200);
    }
    // Deep health used the backend, not the classify route.
    assert_eq!(
        srv.state.metrics.request_latency_count("/v1/classify"),
        classify_count,
        "probes and scrapes must not change the classify latency series"
    );
    let text = p.get("/metrics").await.unwrap().text();
    for needle in [
        "capt_request_duration_seconds_count{route=\"/v1/classify\",status=\"200\"} 1",
        "capt_request_duration_seconds_count{route=\"/healthz\",status=\"200\"} 3",
        "capt_edge_build_info{version=",
        "process_resident_memory_bytes ",
    ] {
        assert!(text.contains(needle), "metrics lack {needle:?}:\n{text}");
    }

    // A client's own request id is echoed; an unusable one is replaced.
    let mut tagged = srv
        .client()
        .await
        .with_header("x-request-id", "order-42.a_b");
    let r = tagged.get("/healthz").await.unwrap();
    assert_eq!(r.header("x-request-id"), Some("order-42.a_b"));
    let mut bad = srv
        .client()
        .await
        .with_header("x-request-id", "spaces are not ok");
    let r = bad.get("/healthz").await.unwrap();
    let id = r.header("x-request-id").unwrap();
    assert!(id != "spaces are not ok" && !id.is_empty());
    srv.shutdown().await;
}

/// CORS is off unless origins are configured; then a preflight from an allowed origin is
/// answered (before auth) and the request id is exposed to the page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_is_off_by_default_and_answers_configured_origins() {
    /// A browser's preflight for POST /v1/classify from `origin`.
    async fn preflight(srv: &TestServer, origin: &str) -> capt_edge::client::Reply {
        srv.client()
            .await
            .with_header("origin", origin)
            .with_header("access-control-request-method", "POST")
            .send("OPTIONS", "/v1/classify", None, Default::default())
            .await
            .unwrap()
    }
    let srv = TestServer::start(tract(), cfg()).await;
    let r = preflight(&srv, "https://app.example").await;
    assert!(r.header("access-control-allow-origin").is_none());
    srv.shutdown().await;

    let mut config = cfg();
    config.cors_origins = vec!["https://app.example".into()];
    config.api_key = Some("cors-test-key-123".into());
    let srv = TestServer::start(tract(), config).await;
    let r = preflight(&srv, "https://app.example").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    let r = preflight(&srv, "https://evil.example").await;
    assert!(r.header("access-control-allow-origin").is_none());
    let mut page = srv
        .client()
        .await
        .with_api_key(Some("cors-test-key-123".into()))
        .with_header("origin", "https://app.example");
    let r = page
        .post("/v1/classify", "image/png", image("noise_32.png"))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    assert!(r
        .header("access-control-expose-headers")
        .is_some_and(|h| h.contains("x-request-id")));
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_coalesce_into_batches() {
    let counting = Counting::new(tract());
    let mut config = cfg();
    config.batch.max_wait = Duration::from_millis(1500);
    let srv = TestServer::start(counting.clone(), config).await;
    let img = image("noise_32.png");
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut c = srv.client().await;
        let img = img.clone();
        tasks.push(tokio::spawn(async move {
            c.post("/v1/classify", "image/png", img).await.unwrap()
        }));
    }
    let mut sizes = Vec::new();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        sizes.push(r.json()["timing"]["batch_size"].as_u64().unwrap());
    }
    let calls = counting.calls.load(Ordering::SeqCst);
    assert!(
        calls < 8,
        "8 concurrent requests ran in {calls} backend calls; expected coalescing"
    );
    assert!(
        sizes.iter().all(|s| *s >= 2),
        "batch sizes seen by requests: {sizes:?}"
    );
    assert_eq!(
        counting.batch_sizes.lock().unwrap().iter().sum::<usize>(),
        8
    );
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_answers_503_with_retry_after() {
    let gated = Gated::new(tract());
    let config = ServerConfig {
        batch: BatchConfig {
            max_batch: 1,
            max_wait: Duration::ZERO,
            queue_capacity: 2,
            workers: 1,
        },
        ..Default::default()
    };
    let srv = TestServer::start(gated.clone(), config).await;
    let img = image("noise_32.png");
    let post = |srv_addr: std::net::SocketAddr, img: Vec<u8>| {
        tokio::spawn(async move {
            let mut c = capt_edge::client::Client::connect(srv_addr).await.unwrap();
            c.post("/v1/classify", "image/png", img).await.unwrap()
        })
    };
    // One batch held in the backend, two more fill the queue.
    let running = post(srv.addr, img.clone());
    gated.wait_entered(1).await;
    let queued: Vec<_> = (0..2).map(|_| post(srv.addr, img.clone())).collect();
    for _ in 0..500 {
        if srv.state.queue_depth() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(srv.state.queue_depth(), 2);

    let mut c = srv.client().await;
    let r = c
        .post("/v1/classify", "image/png", img.clone())
        .await
        .unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.json()["error"]["code"], "queue_full");
    assert!(c
        .get("/metrics")
        .await
        .unwrap()
        .text()
        .contains("capt_queue_rejected_total 1"));

    gated.open();
    assert_eq!(running.await.unwrap().status, 200);
    for q in queued {
        assert_eq!(q.await.unwrap().status, 200);
    }
    // Still serving after the overflow.
    assert_eq!(
        c.post("/v1/classify", "image/png", img)
            .await
            .unwrap()
            .status,
        200
    );
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn size_limits_answer_413() {
    let config = ServerConfig {
        body_limit: 4096,
        limits: InputLimits {
            max_pixels: 40 * 40,
            max_images: 2,
        },
        ..cfg()
    };
    let srv = TestServer::start(tract(), config).await;
    let mut c = srv.client().await;

    let r = c
        .post("/v1/classify", "image/png", vec![0u8; 5000])
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.json()["error"]["code"].as_str()),
        (413, Some("body_too_large"))
    );
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("4096 bytes"));

    let png = image("gradient_32.png");
    let (ct, body) = multipart_body(&[("a.png", &png), ("b.png", &png), ("c.png", &png)]);
    let r = c.post("/v1/classify", &ct, body).await.unwrap();
    assert_eq!(
        (r.status, r.json()["error"]["code"].as_str()),
        (413, Some("too_many_images"))
    );

    // 48x64 = 3072 pixels > 1600.
    let r = c
        .post("/v1/classify", "image/png", image("checker_48x64.png"))
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.json()["error"]["code"].as_str()),
        (413, Some("image_too_large"))
    );
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("48x64"));

    let (ct, body) = multipart_body(&[("a.png", &png), ("b.png", &png)]);
    assert_eq!(c.post("/v1/classify", &ct, body).await.unwrap().status, 200);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_keeps_strangers_out() {
    let config = ServerConfig {
        api_key: Some("s3cret-key-123".into()),
        ..cfg()
    };
    let srv = TestServer::start(tract(), config).await;
    let mut anon = srv.client().await;
    let img = image("noise_32.png");
    let r = anon
        .post("/v1/classify", "image/png", img.clone())
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.header("www-authenticate")),
        (401, Some("Bearer"))
    );
    for path in ["/v1/model", "/metrics", "/openapi.json"] {
        assert_eq!(anon.get(path).await.unwrap().status, 401, "{path}");
    }
    // Probes stay open.
    assert_eq!(anon.get("/healthz").await.unwrap().status, 200);
    assert_eq!(anon.get("/readyz").await.unwrap().status, 200);

    let mut wrong = srv
        .client()
        .await
        .with_api_key(Some("s3cret-key-124".into()));
    assert_eq!(wrong.get("/v1/model").await.unwrap().status, 401);
    let mut ok = srv
        .client()
        .await
        .with_api_key(Some("s3cret-key-123".into()));
    assert_eq!(
        ok.post("/v1/classify", "image/png", img)
            .await
            .unwrap()
            .status,
        200
    );
    assert_eq!(ok.get("/v1/model").await.unwrap().status, 200);
    srv.shutdown().await;
}

fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend((data.len() as u32).to_be_bytes());
    out.extend(kind);
    out.extend(data);
    let mut crc = flate2::Crc::new();
    crc.update(kind);
    crc.update(data);
    out.extend(crc.sum().to_be_bytes());
}

/// An 8-bit grayscale PNG of `w`x`h` zero pixels; `with_data = false` leaves out IDAT.
fn gray_png(w: u32, h: u32, with_data: bool) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend(w.to_be_bytes());
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 0, 0, 0, 0]);
    png_chunk(&mut out, b"IHDR", &ihdr);
    if with_data {
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
        let row = vec![0u8; w as usize + 1];
        for _ in 0..h {
            z.write_all(&row).unwrap();
        }
        png_chunk(&mut out, b"IDAT", &z.finish().unwrap());
    }
    png_chunk(&mut out, b"IEND", &[]);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_inputs_get_4xx_and_the_server_keeps_serving() {
    let srv = TestServer::start(tract(), cfg()).await;
    let mut c = srv.client().await;
    let jpeg = image("waves_48x40.jpg");
    let good = image("noise_32.png");
    let bomb = gray_png(8000, 8000, true);
    assert!(bomb.len() < 200_000, "bomb is {} bytes", bomb.len());
    let cases: Vec<(&str, &str, Vec<u8>)> = vec![
        (
            "truncated jpeg",
            "image/jpeg",
            jpeg[..jpeg.len() / 2].to_vec(),
        ),
        ("jpeg header only", "image/jpeg", jpeg[..20].to_vec()),
        ("png bomb 8000x8000", "image/png", bomb),
        (
            "20000x20000 header",
            "image/png",
            gray_png(20_000, 20_000, false),
        ),
        ("zero bytes", "image/png", Vec::new()),
        (
            "text",
            "image/png",
            b"this is not an image, it is text\n".to_vec(),
        ),
        (
            "truncated png",
            "image/png",
            good[..good.len() - 40].to_vec(),
        ),
        (
            "random bytes",
            "application/octet-stream",
            (0..4096u32)
                .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
                .collect(),
        ),
        (
            "bad multipart",
            "multipart/form-data; boundary=xyz",
            b"--xyz\r\nno headers end".to_vec(),
        ),
        (
            "multipart without parts",
            "multipart/form-data; boundary=xyz",
            b"--xyz--\r\n".to_vec(),
        ),
    ];
    for (what, ct, body) in cases {
        let r = c.post("/v1/classify", ct, body).await.unwrap();
        assert!(
            (400..500).contains(&r.status),
            "{what}: status {} {}",
            r.status,
            r.text()
        );
        let msg = r.json()["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(!msg.is_empty(), "{what}: error message");
        let ok = c
            .post("/v1/classify", "image/png", good.clone())
            .await
            .unwrap();
        assert_eq!(ok.status, 200, "server stopped serving after {what}");
    }
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_in_flight_requests() {
    let gated = Gated::new(tract());
    let config = ServerConfig {
        batch: BatchConfig {
            max_batch: 1,
            max_wait: Duration::ZERO,
            queue_capacity: 8,
            workers: 1,
        },
        ..Default::default()
    };
    let mut srv = TestServer::start(gated.clone(), config).await;
    let img = image("noise_32.png");
    let addr = srv.addr;
    let spawn_post = |img: Vec<u8>| {
        tokio::spawn(async move {
            let mut c = capt_edge::client::Client::connect(addr).await.unwrap();
            c.post("/v1/classify", "image/png", img).await.unwrap()
        })
    };
    let in_backend = spawn_post(img.clone());
    gated.wait_entered(1).await;
    let queued = spawn_post(img.clone());
    for _ in 0..500 {
        if srv.state.queue_depth() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(srv.state.queue_depth(), 1);

    srv.signal_shutdown();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!srv.state.is_ready(), "readiness drops at shutdown");
    assert!(
        !srv.handle.is_finished(),
        "server waits for in-flight requests"
    );
    // New connections are no longer accepted.
    let refused = tokio::time::timeout(Duration::from_secs(2), async {
        match capt_edge::client::Client::connect(addr).await {
            Err(_) => true,
            Ok(mut c) => c.get("/healthz").await.is_err(),
        }
    })
    .await
    .unwrap_or(true);
    assert!(refused, "a new connection was served during shutdown");

    gated.open();
    let r1 = in_backend.await.unwrap();
    let r2 = queued.await.unwrap();
    assert_eq!(
        (r1.status, r2.status),
        (200, 200),
        "{} / {}",
        r1.text(),
        r2.text()
    );
    tokio::time::timeout(Duration::from_secs(20), srv.handle)
        .await
        .expect("server exits after draining")
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_requests_time_out_with_504() {
    let gated = Gated::new(tract());
    let config = ServerConfig {
        request_timeout: Duration::from_millis(300),
        ..cfg()
    };
    let srv = TestServer::start(gated.clone(), config).await;
    let mut c = srv.client().await;
    let r = c
        .post("/v1/classify", "image/png", image("noise_32.png"))
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.json()["error"]["code"].as_str()),
        (504, Some("timeout")),
        "{}",
        r.text()
    );
    gated.open();
    assert_eq!(
        c.post("/v1/classify", "image/png", image("noise_32.png"))
            .await
            .unwrap()
            .status,
        200
    );
    assert!(c
        .get("/metrics")
        .await
        .unwrap()
        .text()
        .contains("capt_errors_total{code=\"timeout\"} 1"));
    srv.shutdown().await;
}
