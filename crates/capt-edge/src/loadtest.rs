//! `capt-edge loadtest`: a bounded load generator for a running `capt-edge serve`. For each
//! concurrency level it runs that many keep-alive clients, each posting the same image in a
//! loop for a fixed time, and reports throughput, latency percentiles, non-2xx answers and
//! the server overhead (client latency minus backend time). Loopback targets only.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;

use crate::bench::percentile;
use crate::client::Client;

#[derive(Debug, Clone, clap::Args)]
pub struct LoadtestArgs {
    /// Server address, e.g. 127.0.0.1:8080; another machine only with --allow-remote.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: String,
    /// Allow a non-loopback --addr (load-testing a server you run elsewhere; never point this
    /// at a server you do not own).
    #[arg(long)]
    pub allow_remote: bool,
    /// Image posted as the raw body of every request.
    #[arg(long)]
    pub image: PathBuf,
    /// Concurrency levels, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub concurrency: Vec<usize>,
    /// Seconds per concurrency level.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Stop a level after this many requests in total (0: no cap).
    #[arg(long, default_value_t = 0)]
    pub max_requests: u64,
    /// Wait up to this many seconds for /readyz before starting.
    #[arg(long, default_value_t = 30.0)]
    pub wait_ready: f64,
    /// Bearer API key (or CAPT_API_KEY).
    #[arg(long, env = "CAPT_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Exit with an error when any request is not 2xx.
    #[arg(long)]
    pub fail_on_error: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct LevelReport {
    pub concurrency: usize,
    pub requests: u64,
    pub non_2xx: u64,
    pub transport_errors: u64,
    pub seconds: f64,
    pub requests_per_second: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    /// Median backend time per batch as the server reported it.
    pub inference_p50_ms: f64,
    /// Median batch size the server ran these requests in.
    pub batch_size_p50: f64,
}

struct Sample {
    latency: f64,
    status: u16,
    inference_ms: f64,
    batch_size: f64,
}

/// Resolves `addr` and refuses anything but a loopback address.
pub fn loopback_addr(addr: &str) -> anyhow::Result<SocketAddr> {
    target_addr(addr, false)
}

/// Resolves `addr`; without `allow_remote` only a loopback address is accepted.
pub fn target_addr(addr: &str, allow_remote: bool) -> anyhow::Result<SocketAddr> {
    let resolved: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| anyhow::anyhow!("cannot resolve {addr}: {e}"))?
        .collect();
    if allow_remote {
        return resolved
            .first()
            .copied()
            .ok_or_else(|| anyhow::anyhow!("{addr} resolves to no address"));
    }
    resolved
        .iter()
        .copied()
        .find(|a| a.ip().is_loopback())
        .ok_or_else(|| anyhow::anyhow!("{addr} is not a loopback address; the load test targets this machine (127.0.0.1, ::1, localhost) unless --allow-remote is given"))
}

pub async fn wait_ready(addr: SocketAddr, within: Duration) -> anyhow::Result<()> {
    let until = Instant::now() + within;
    loop {
        if let Ok(mut c) = Client::connect_to(addr, true).await {
            if c.get("/readyz").await.is_ok_and(|r| r.status == 200) {
                return Ok(());
            }
        }
        anyhow::ensure!(
            Instant::now() < until,
            "server at {addr} not ready after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn run(args: &LoadtestArgs) -> anyhow::Result<Vec<LevelReport>> {
    let addr = target_addr(&args.addr, args.allow_remote)?;
    let image = Bytes::from(
        std::fs::read(&args.image)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", args.image.display()))?,
    );
    anyhow::ensure!(
        args.seconds > 0.0 && args.seconds <= 600.0,
        "--seconds must be in (0, 600]"
    );
    anyhow::ensure!(
        args.concurrency.iter().all(|c| (1..=1024).contains(c)),
        "--concurrency levels must be between 1 and 1024"
    );
    wait_ready(addr, Duration::from_secs_f64(args.wait_ready)).await?;
    let mut reports = Vec::new();
    for &c in &args.concurrency {
        reports.push(level(addr, c, image.clone(), args).await?);
    }
    Ok(reports)
}

async fn level(
    addr: SocketAddr,
    concurrency: usize,
    image: Bytes,
    args: &LoadtestArgs,
) -> anyhow::Result<LevelReport> {
    let duration = Duration::from_secs_f64(args.seconds);
    let started = Instant::now();
    let deadline = started + duration;
    let issued = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let image = image.clone();
        let key = args.api_key.clone();
        let issued = issued.clone();
        let cap = args.max_requests;
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut transport_errors = 0u64;
            let mut client = None;
            while Instant::now() < deadline {
                if cap > 0 && issued.fetch_add(1, std::sync::atomic::Ordering::Relaxed) >= cap {
                    break;
                }
                if client.is_none() {
                    match Client::connect_to(addr, true).await {
                        Ok(c) => client = Some(c.with_api_key(key.clone())),
                        Err(_) => {
                            transport_errors += 1;
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    }
                }
                let c = client.as_mut().expect("connected above");
                let t = Instant::now();
                match c
                    .post("/v1/classify", "application/octet-stream", image.clone())
                    .await
                {
                    Ok(r) => {
                        let j = r.json();
                        samples.push(Sample {
                            latency: t.elapsed().as_secs_f64(),
                            status: r.status,
                            inference_ms: j["timing"]["inference_ms"].as_f64().unwrap_or(f64::NAN),
                            batch_size: j["timing"]["batch_size"].as_f64().unwrap_or(f64::NAN),
                        });
                    }
                    Err(_) => {
                        transport_errors += 1;
                        client = None;
                    }
                }
            }
            (samples, transport_errors)
        }));
    }
    let mut samples = Vec::new();
    let mut transport_errors = 0;
    for t in tasks {
        let (s, e) = t.await?;
        samples.extend(s);
        transport_errors += e;
    }
    let seconds = started.elapsed().as_secs_f64();
    let mut lat: Vec<f64> = samples.iter().map(|s| s.latency * 1e3).collect();
    lat.sort_by(f64::total_cmp);
    let sorted = |mut v: Vec<f64>| {
        v.retain(|x| x.is_finite());
        v.sort_by(f64::total_cmp);
        v
    };
    let ok: Vec<&Sample> = samples
        .iter()
        .filter(|s| (200..300).contains(&s.status))
        .collect();
    let inf = sorted(ok.iter().map(|s| s.inference_ms).collect());
    let bs = sorted(ok.iter().map(|s| s.batch_size).collect());
    Ok(LevelReport {
        concurrency,
        requests: samples.len() as u64,
        non_2xx: (samples.len() - ok.len()) as u64,
        transport_errors,
        seconds,
        requests_per_second: samples.len() as f64 / seconds,
        p50_ms: percentile(&lat, 50.0),
        p90_ms: percentile(&lat, 90.0),
        p99_ms: percentile(&lat, 99.0),
        inference_p50_ms: percentile(&inf, 50.0),
        batch_size_p50: percentile(&bs, 50.0),
    })
}

pub fn print_table(reports: &[LevelReport], out: &mut dyn std::io::Write) -> std::io::Result<()> {
    writeln!(
        out,
        "{:>5} {:>8} {:>7} {:>7} {:>9} {:>9} {:>9} {:>9} {:>11} {:>6}",
        "conc",
        "requests",
        "non2xx",
        "t.err",
        "req/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "infer p50",
        "batch"
    )?;
    for r in reports {
        writeln!(
            out,
            "{:>5} {:>8} {:>7} {:>7} {:>9.1} {:>9.2} {:>9.2} {:>9.2} {:>11.2} {:>6}",
            r.concurrency,
            r.requests,
            r.non_2xx,
            r.transport_errors,
            r.requests_per_second,
            r.p50_ms,
            r.p90_ms,
            r.p99_ms,
            r.inference_p50_ms,
            r.batch_size_p50
        )?;
    }
    if let Some(r) = reports.iter().find(|r| r.concurrency == 1) {
        if r.inference_p50_ms > 0.0 {
            let overhead = (r.p50_ms - r.inference_p50_ms) / r.inference_p50_ms * 100.0;
            writeln!(
                out,
                "server overhead at concurrency 1: {:.2} ms over {:.2} ms of model time ({overhead:.1} %)",
                r.p50_ms - r.inference_p50_ms,
                r.inference_p50_ms
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_targets() {
        assert!(loopback_addr("127.0.0.1:9").is_ok());
        assert!(loopback_addr("[::1]:9").is_ok());
        let e = loopback_addr("10.1.2.3:80").unwrap_err().to_string();
        assert!(
            e.contains("not a loopback") && e.contains("--allow-remote"),
            "{e}"
        );
        assert_eq!(
            target_addr("10.1.2.3:80", true).unwrap(),
            "10.1.2.3:80".parse::<SocketAddr>().unwrap()
        );
    }
}
