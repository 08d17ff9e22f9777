//! Shared helpers for the capt-edge integration tests: the fixture model, a real server on
//! a loopback port, and test backends that count or hold batches.
#![allow(dead_code, unused_imports)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

pub use capt_backend::max_abs_diff;
use capt_backend::{Backend, BackendError, ClassifierOutput, ImageBatch, ModelDir};
use capt_backend_tract::{TractBackend, TractOptions};
use capt_edge::server::{AppState, Server, ServerConfig};
use tokio::sync::oneshot;

pub fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/edge")
}

pub fn image(name: &str) -> Vec<u8> {
    std::fs::read(fixture().join("images").join(name)).unwrap()
}

pub fn reference() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture().join("reference.json")).unwrap())
        .unwrap()
}

pub fn model() -> ModelDir {
    ModelDir::open(fixture().join("model")).unwrap()
}

pub fn tract() -> Arc<dyn Backend> {
    Arc::new(
        TractBackend::load(
            &model(),
            &TractOptions {
                threads: 1,
                ..Default::default()
            },
        )
        .unwrap(),
    )
}

/// Wraps a backend and counts its calls and images.
pub struct Counting {
    pub inner: Arc<dyn Backend>,
    pub calls: AtomicUsize,
    pub batch_sizes: Mutex<Vec<usize>>,
}

impl Counting {
    pub fn new(inner: Arc<dyn Backend>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            calls: AtomicUsize::new(0),
            batch_sizes: Mutex::new(vec![]),
        })
    }
}

impl Backend for Counting {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn classify(&self, b: &ImageBatch) -> Result<ClassifierOutput, BackendError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.batch_sizes.lock().unwrap().push(b.n);
        self.inner.classify(b)
    }
}

/// A backend whose calls block until the test opens the gate, so tests can hold a batch
/// "in flight" deterministically.
pub struct Gated {
    pub inner: Arc<dyn Backend>,
    open: Mutex<bool>,
    cv: Condvar,
    pub entered: AtomicUsize,
}

impl Gated {
    pub fn new(inner: Arc<dyn Backend>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            open: Mutex::new(false),
            cv: Condvar::new(),
            entered: AtomicUsize::new(0),
        })
    }

    pub fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.cv.notify_all();
    }

    pub async fn wait_entered(&self, n: usize) {
        for _ in 0..500 {
            if self.entered.load(Ordering::SeqCst) >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("backend was not entered {n} times");
    }
}

impl Backend for Gated {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn classify(&self, b: &ImageBatch) -> Result<ClassifierOutput, BackendError> {
        self.entered.fetch_add(1, Ordering::SeqCst);
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.cv.wait(open).unwrap();
        }
        drop(open);
        self.inner.classify(b)
    }
}

/// A server running on 127.0.0.1 with a random port.
pub struct TestServer {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    stop: Option<oneshot::Sender<()>>,
    pub handle: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl TestServer {
    pub async fn start(backend: Arc<dyn Backend>, cfg: ServerConfig) -> Self {
        Self::start_with_probes(backend, cfg, false).await.0
    }

    /// [`Self::start`], with the unauthenticated probe listener (`--metrics-addr`) when
    /// `probes`; returns its address.
    pub async fn start_with_probes(
        backend: Arc<dyn Backend>,
        cfg: ServerConfig,
        probes: bool,
    ) -> (Self, Option<SocketAddr>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let probe = if probes {
            Some(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap())
        } else {
            None
        };
        let probe_addr = probe.as_ref().map(|l| l.local_addr().unwrap());
        let server = Server::new(model(), backend, cfg).unwrap();
        let state = server.state();
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(server.run_with_probes(listener, probe, async {
            let _ = rx.await;
        }));
        (
            Self {
                addr,
                state,
                stop: Some(tx),
                handle,
            },
            probe_addr,
        )
    }

    pub async fn client(&self) -> capt_edge::client::Client {
        capt_edge::client::Client::connect(self.addr).await.unwrap()
    }

    /// Signals graceful shutdown (does not wait).
    pub fn signal_shutdown(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }

    pub async fn shutdown(mut self) {
        self.signal_shutdown();
        tokio::time::timeout(Duration::from_secs(20), self.handle)
            .await
            .expect("server stops within 20 s")
            .unwrap()
            .unwrap();
    }
}

/// Full probability vector of one result (top_k = all classes), in class order.
pub fn probs_in_class_order(result: &serde_json::Value, classes: usize) -> Vec<f32> {
    let mut v = vec![f32::NAN; classes];
    for l in result["top_k"].as_array().unwrap() {
        v[l["class_index"].as_u64().unwrap() as usize] = l["probability"].as_f64().unwrap() as f32;
    }
    v
}

/// The built binary, run the way cargo runs this test: through the target's runner
/// (`CARGO_TARGET_<ARCH>_UNKNOWN_LINUX_GNU_RUNNER`, e.g. qemu-aarch64 from
/// tools/test-aarch64.sh) when one is set, because a cross-compiled binary cannot be exec'd
/// directly on a host without binfmt_misc.
pub fn bin() -> std::process::Command {
    let exe = env!("CARGO_BIN_EXE_capt-edge");
    let runner = format!(
        "CARGO_TARGET_{}_UNKNOWN_LINUX_GNU_RUNNER",
        std::env::consts::ARCH.to_uppercase()
    );
    let runner = std::env::var(runner).unwrap_or_default();
    let mut words = runner.split_whitespace();
    let mut c = match words.next() {
        Some(program) => {
            let mut c = std::process::Command::new(program);
            c.args(words).arg(exe);
            c
        }
        None => std::process::Command::new(exe),
    };
    c.env_remove("RUST_LOG").env_remove("CAPT_API_KEY");
    c
}
