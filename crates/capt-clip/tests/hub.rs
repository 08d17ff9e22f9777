//! Hub ids resolved through hf-hub against a loopback server that answers the hub's file
//! endpoints (`/<repo>/resolve/<revision>/<file>`) for the tiny HF fixture. No test reaches
//! the internet.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device};
use capt_clip::hub::{resolve, HubId, HubSettings};
use capt_clip::ClipModel;
use sha2::{Digest, Sha256};

const MAIN: &str = "1111111111111111111111111111111111111111";
const V2: &str = "2222222222222222222222222222222222222222";

fn fixture(file: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/clip/tiny-hf")
            .join(file),
    )
    .unwrap()
}

/// A hub stand-in: `capt-test/tiny-clip` at revisions `main` and `v2`, and
/// `capt-test/broken`, whose model download stops half way.
struct MockHub {
    endpoint: String,
    requests: Arc<AtomicUsize>,
}

fn mock_hub() -> MockHub {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let requests = Arc::new(AtomicUsize::new(0));
    let count = requests.clone();
    let files: HashMap<&str, Vec<u8>> = [
        ("config.json", fixture("config.json")),
        ("model.safetensors", fixture("model.safetensors")),
    ]
    .into_iter()
    .collect();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            count.fetch_add(1, Ordering::SeqCst);
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
            // hf-hub probes with `Range: bytes=0-0`, then downloads with `bytes=<start>-`.
            let mut range = String::new();
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
                    range = v.trim().to_string();
                }
            }
            let probe = range == "0-0";
            let range_start: usize = range.split('-').next().unwrap_or("0").parse().unwrap_or(0);
            let reply = |stream: &mut std::net::TcpStream,
                         status: &str,
                         headers: &[String],
                         body: &[u8]| {
                let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
                for h in headers {
                    head.push_str(h);
                    head.push_str("\r\n");
                }
                head.push_str("\r\n");
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(body);
            };
            // /<org>/<name>/resolve/<revision>/<file>
            let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
            if parts.len() != 5 || parts[2] != "resolve" {
                reply(
                    &mut stream,
                    "404 Not Found",
                    &["Content-Length: 0".into()],
                    b"",
                );
                continue;
            }
            let (repo, rev, file) = (format!("{}/{}", parts[0], parts[1]), parts[3], parts[4]);
            let error = |code: &str| {
                vec![
                    format!("X-Error-Code: {code}"),
                    "Content-Length: 0".to_string(),
                ]
            };
            if repo != "capt-test/tiny-clip" && repo != "capt-test/broken" {
                reply(&mut stream, "401 Unauthorized", &error("RepoNotFound"), b"");
                continue;
            }
            let commit = match rev {
                "main" => MAIN,
                "v2" | V2 => V2,
                r if r == MAIN => MAIN,
                _ => {
                    reply(
                        &mut stream,
                        "404 Not Found",
                        &error("RevisionNotFound"),
                        b"",
                    );
                    continue;
                }
            };
            let Some(body) = files.get(file) else {
                reply(&mut stream, "404 Not Found", &error("EntryNotFound"), b"");
                continue;
            };
            let size = body.len();
            let etag = hex::encode(Sha256::digest(body));
            let broken = repo == "capt-test/broken" && file == "model.safetensors";
            let start = range_start.min(size);
            let (sent, end) = if probe {
                (&body[..1], 0)
            } else {
                (&body[start..], size - 1)
            };
            let headers = vec![
                format!("X-Repo-Commit: {commit}"),
                format!("ETag: \"{etag}\""),
                format!("Content-Range: bytes {start}-{end}/{size}"),
                format!("Content-Length: {}", sent.len()),
            ];
            if broken && !probe {
                // Declare the whole rest, send half of it, hang up.
                reply(
                    &mut stream,
                    "206 Partial Content",
                    &headers,
                    &sent[..sent.len() / 2],
                );
            } else {
                reply(&mut stream, "206 Partial Content", &headers, sent);
            }
        }
    });
    MockHub { endpoint, requests }
}

fn settings(hub: &MockHub, cache: &Path, offline: bool) -> HubSettings {
    HubSettings {
        endpoint: hub.endpoint.clone(),
        cache_dir: cache.to_path_buf(),
        offline,
        token: None,
        progress: false,
    }
}

fn id(s: &str) -> HubId {
    HubId::parse(s).unwrap()
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() && !p.is_symlink() {
                out.extend(files_under(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn hub_ids_parse_and_local_paths_win() {
    assert_eq!(
        HubId::parse("openai/clip-vit-base-patch16"),
        Some(HubId {
            repo: "openai/clip-vit-base-patch16".into(),
            revision: None
        })
    );
    assert_eq!(
        HubId::parse("laion/CLIP-ViT-B-32@v1.0")
            .unwrap()
            .revision
            .as_deref(),
        Some("v1.0")
    );
    for not_hub in ["tiny", "/abs/dir", "a/b/c", "a/", "/b", "a/b@", "../x"] {
        assert_eq!(HubId::parse(not_hub), None, "{not_hub}");
    }
    // An existing local path named like a hub id is a local path (tests run in the crate
    // folder, which holds tests/hub.rs).
    assert!(Path::new("tests/hub.rs").is_file());
    assert_eq!(HubId::parse("tests/hub.rs"), None);
}

#[test]
fn fetches_into_the_cache_then_answers_offline_from_it() {
    let hub = mock_hub();
    let cache = tempfile::tempdir().unwrap();
    let r = resolve(
        &id("capt-test/tiny-clip"),
        &settings(&hub, cache.path(), false),
    )
    .unwrap();
    assert_eq!(r.commit, MAIN);
    assert_eq!(r.pinned, format!("capt-test/tiny-clip@{MAIN}"));
    assert!(r.dir.starts_with(cache.path()));
    assert!(r.dir.join("config.json").is_file() && r.dir.join("model.safetensors").is_file());
    let m = ClipModel::load(&r.dir, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(m.config().vision.image_size, 32);
    let local = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/clip/tiny-hf");
    assert_eq!(
        capt_clip::backbone_hash(&r.dir).unwrap(),
        capt_clip::backbone_hash(&local).unwrap()
    );
    // Offline: the cache answers, the server is not asked.
    let before = hub.requests.load(Ordering::SeqCst);
    let again = resolve(
        &id("capt-test/tiny-clip"),
        &settings(&hub, cache.path(), true),
    )
    .unwrap();
    assert_eq!(again, r);
    // A commit pin in the cache needs no network even online (how checkpoints reload).
    let pinned = resolve(&id(&r.pinned), &settings(&hub, cache.path(), false)).unwrap();
    assert_eq!(pinned.dir, r.dir);
    assert_eq!(hub.requests.load(Ordering::SeqCst), before);
}

#[test]
fn a_revision_pin_resolves_to_its_commit() {
    let hub = mock_hub();
    let cache = tempfile::tempdir().unwrap();
    let r = resolve(
        &id("capt-test/tiny-clip@v2"),
        &settings(&hub, cache.path(), false),
    )
    .unwrap();
    assert_eq!(r.commit, V2);
    assert!(
        r.dir.ends_with(format!("snapshots/{V2}")),
        "{}",
        r.dir.display()
    );
}

#[test]
fn offline_with_an_empty_cache_says_what_to_download() {
    let hub = mock_hub();
    let cache = tempfile::tempdir().unwrap();
    let e = resolve(
        &id("capt-test/tiny-clip"),
        &settings(&hub, cache.path(), true),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("capt-test/tiny-clip")
            && e.contains("HF_HUB_OFFLINE")
            && e.contains(&cache.path().display().to_string())
            && e.contains("huggingface-cli download capt-test/tiny-clip"),
        "{e}"
    );
    assert_eq!(e.lines().count(), 1, "{e}");
}

#[test]
fn missing_repositories_and_revisions_are_named() {
    let hub = mock_hub();
    let cache = tempfile::tempdir().unwrap();
    let e = resolve(&id("capt-test/nope"), &settings(&hub, cache.path(), false))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("capt-test/nope") && e.contains("does not exist"),
        "{e}"
    );
    let e = resolve(
        &id("capt-test/tiny-clip@nope"),
        &settings(&hub, cache.path(), false),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("revision `nope`"), "{e}");
}

#[test]
fn an_interrupted_download_leaves_no_partial_file() {
    let hub = mock_hub();
    let cache = tempfile::tempdir().unwrap();
    let e = resolve(
        &id("capt-test/broken"),
        &settings(&hub, cache.path(), false),
    );
    let e = e.expect_err("a half download must fail").to_string();
    assert!(
        e.contains("capt-test/broken")
            && e.contains("model.safetensors")
            && e.contains("interrupted"),
        "{e}"
    );
    let left: Vec<PathBuf> = files_under(cache.path())
        .into_iter()
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            name.ends_with(".part") || name == "model.safetensors"
        })
        .collect();
    assert!(left.is_empty(), "partial files left: {left:?}");
}
