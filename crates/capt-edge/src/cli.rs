//! Command-line interface of the `capt-edge` binary.

use std::path::PathBuf;
use std::time::Duration;

use crate::batcher::BatchConfig;
use crate::bench::BenchArgs;
use crate::classify::ClassifyArgs;
use crate::engine::EngineArgs;
use crate::input::InputLimits;
use crate::loadtest::LoadtestArgs;
use crate::server::ServerConfig;

#[derive(Debug, clap::Parser)]
#[command(
    name = "capt-edge",
    version,
    about = "Serve and run exported capt image classifiers on tract or ONNX Runtime"
)]
pub struct Cli {
    /// Log as JSON lines (one object per event, with the request id) instead of text.
    #[arg(long, global = true, env = "CAPT_EDGE_JSON_LOGS")]
    pub json_logs: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Classify image files, folders or stdin.
    Classify(ClassifyArgs),
    /// Serve the model over HTTP with dynamic batching.
    Serve(ServeArgs),
    /// Time the model: cold start, latency percentiles, throughput, peak RSS.
    Bench(BenchArgs),
    /// Load-test a running server on this machine.
    Loadtest(LoadtestArgs),
    /// Add classes: encodes the names with the model's text_encoder.onnx and rewrites the
    /// classifier (new classes get prior candidates and empty confusion cells).
    AddClass(ClassEditArgs),
    /// Remove classes from the model's label set.
    RemoveClass(ClassEditArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct ClassEditArgs {
    /// Exported model directory (edited in place, atomically).
    #[arg(long)]
    pub model: std::path::PathBuf,
    /// Class names.
    #[arg(required = true)]
    pub names: Vec<String>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Exported model directory.
    #[arg(long, env = "CAPT_EDGE_MODEL")]
    pub model: PathBuf,
    /// Listen address. Binding a non-loopback address exposes the server: set --api-key.
    #[arg(long, env = "CAPT_EDGE_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: String,
    /// Most images per backend call.
    #[arg(long, env = "CAPT_EDGE_MAX_BATCH", default_value_t = 8)]
    pub max_batch: usize,
    /// Longest wait (ms) for a batch to fill after its first image arrived. 0: run as soon as
    /// the worker is free (batches still form from requests that queue while it is busy).
    #[arg(long, env = "CAPT_EDGE_MAX_WAIT_MS", default_value_t = 0)]
    pub max_wait_ms: u64,
    /// Most images waiting in the queue; beyond it requests get 503 + Retry-After.
    #[arg(long, env = "CAPT_EDGE_QUEUE_CAPACITY", default_value_t = 256)]
    pub queue_capacity: usize,
    /// Batch worker threads.
    #[arg(long, env = "CAPT_EDGE_WORKERS", default_value_t = 1)]
    pub workers: usize,
    /// Largest request body in bytes (413 above).
    #[arg(long, env = "CAPT_EDGE_BODY_LIMIT", default_value_t = 16 * 1024 * 1024)]
    pub body_limit: usize,
    /// Largest image in pixels (width*height), checked on the header (413 above).
    #[arg(long, env = "CAPT_EDGE_MAX_PIXELS", default_value_t = 40_000_000)]
    pub max_pixels: u64,
    /// Most images per request (413 above).
    #[arg(long, env = "CAPT_EDGE_MAX_IMAGES", default_value_t = 64)]
    pub max_images: usize,
    /// Per-request time limit in ms (504 above).
    #[arg(long, env = "CAPT_EDGE_REQUEST_TIMEOUT_MS", default_value_t = 30_000)]
    pub request_timeout_ms: u64,
    /// Default number of labels per image (`?top_k=` overrides).
    #[arg(long, env = "CAPT_EDGE_TOP_K", default_value_t = 5)]
    pub top_k: usize,
    /// Require `Authorization: Bearer KEY` (all routes but /healthz and /readyz). Prefer the
    /// environment (CAPT_EDGE_API_KEY, or the older CAPT_API_KEY) or --api-key-file:
    /// arguments are visible to other local users.
    #[arg(long, env = "CAPT_EDGE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Read the API key from this file (first line).
    #[arg(long, env = "CAPT_EDGE_API_KEY_FILE", conflicts_with = "api_key")]
    pub api_key_file: Option<PathBuf>,
    /// Let browsers on these origins call the API (CORS), comma separated, or `*` for any;
    /// off by default (no CORS headers).
    #[arg(
        long,
        env = "CAPT_EDGE_CORS_ORIGIN",
        value_delimiter = ',',
        value_name = "ORIGIN"
    )]
    pub cors_origin: Vec<String>,
    /// Also serve /metrics, /healthz and /readyz on this address, without the API key (for
    /// Prometheus and orchestrator probes), e.g. 0.0.0.0:9090.
    #[arg(long, env = "CAPT_EDGE_METRICS_ADDR", value_name = "ADDR")]
    pub metrics_addr: Option<String>,
    #[command(flatten)]
    pub engine: EngineArgs,
}

impl ServeArgs {
    pub fn server_config(&self) -> anyhow::Result<ServerConfig> {
        anyhow::ensure!(self.max_batch >= 1, "--max-batch must be at least 1");
        anyhow::ensure!(self.workers >= 1, "--workers must be at least 1");
        anyhow::ensure!(
            self.queue_capacity >= 1,
            "--queue-capacity must be at least 1"
        );
        anyhow::ensure!(self.max_images >= 1, "--max-images must be at least 1");
        anyhow::ensure!(self.top_k >= 1, "--top-k must be at least 1");
        for o in &self.cors_origin {
            anyhow::ensure!(
                o == "*"
                    || ((o.starts_with("http://") || o.starts_with("https://"))
                        && !o.ends_with('/')
                        && o.bytes().all(|b| b.is_ascii_graphic())),
                "--cors-origin {o:?}: expected `*` or an origin such as https://app.example.com (scheme and host, optional port, no path)"
            );
        }
        anyhow::ensure!(
            self.request_timeout_ms >= 1,
            "--request-timeout-ms must be at least 1"
        );
        let api_key = match &self.api_key_file {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| {
                    anyhow::anyhow!("cannot read --api-key-file {}: {e}", p.display())
                })?;
                Some(text.lines().next().unwrap_or("").trim().to_string())
            }
            None => self
                .api_key
                .clone()
                .or_else(|| std::env::var("CAPT_API_KEY").ok().filter(|k| !k.is_empty())),
        };
        if let Some(k) = &api_key {
            anyhow::ensure!(k.len() >= 8, "the API key must be at least 8 characters");
        }
        Ok(ServerConfig {
            batch: BatchConfig {
                max_batch: self.max_batch,
                max_wait: Duration::from_millis(self.max_wait_ms),
                queue_capacity: self.queue_capacity,
                workers: self.workers,
            },
            body_limit: self.body_limit,
            request_timeout: Duration::from_millis(self.request_timeout_ms),
            api_key,
            limits: InputLimits {
                max_pixels: self.max_pixels,
                max_images: self.max_images,
            },
            default_top_k: self.top_k,
            retry_after_seconds: 1,
            cors_origins: self.cors_origin.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn parses_serve_flags() {
        let cli = Cli::try_parse_from([
            "capt-edge",
            "serve",
            "--model",
            "m",
            "--max-batch",
            "4",
            "--backend",
            "ort",
            "--device",
            "cuda",
            "--allow-fallback",
            "--api-key",
            "0123456789",
        ])
        .unwrap();
        let Command::Serve(s) = cli.command else {
            panic!("not serve")
        };
        let cfg = s.server_config().unwrap();
        assert_eq!(cfg.batch.max_batch, 4);
        assert_eq!(cfg.api_key.as_deref(), Some("0123456789"));
        assert!(s.engine.allow_fallback);
    }

    #[test]
    fn rejects_short_key_and_bad_device() {
        let cli = Cli::try_parse_from(["capt-edge", "serve", "--model", "m", "--api-key", "abc"])
            .unwrap();
        let Command::Serve(s) = cli.command else {
            panic!("not serve")
        };
        assert!(s
            .server_config()
            .unwrap_err()
            .to_string()
            .contains("at least 8"));
        assert!(
            Cli::try_parse_from(["capt-edge", "bench", "--model", "m", "--device", "tpu"]).is_err()
        );
    }

    #[test]
    fn cors_origins_are_checked() {
        let serve = |origins: &str| {
            let cli = Cli::try_parse_from([
                "capt-edge",
                "serve",
                "--model",
                "m",
                "--cors-origin",
                origins,
            ])
            .unwrap();
            let Command::Serve(s) = cli.command else {
                panic!("not serve")
            };
            s.server_config()
        };
        let ok = serve("https://a.example,http://localhost:3000").unwrap();
        assert_eq!(ok.cors_origins.len(), 2);
        assert!(serve("*").is_ok());
        for bad in ["ftp://a.example", "https://a.example/", "a.example"] {
            let e = serve(bad).unwrap_err().to_string();
            assert!(e.contains("--cors-origin"), "{e}");
        }
    }
}
