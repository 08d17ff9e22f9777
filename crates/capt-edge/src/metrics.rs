//! Prometheus text metrics, kept by hand with atomics (no metrics crate): request counts and
//! latency by route and status (a probe or a scrape never lands in the classify series),
//! inference latency, batch sizes, queue depth, errors, `capt_edge_build_info` and the
//! standard `process_*` metrics (Linux /proc).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// A cumulative histogram with fixed upper bounds.
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    /// Sum in millionths, so it fits an atomic integer.
    sum_micro: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micro: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|b| v <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_micro
            .fetch_add((v.max(0.0) * 1e6).round() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Number of observations in buckets above `bound`.
    pub fn count_above(&self, bound: f64) -> u64 {
        let at_or_below: u64 = self
            .bounds
            .iter()
            .zip(&self.counts)
            .filter(|(b, _)| **b <= bound)
            .map(|(_, c)| c.load(Ordering::Relaxed))
            .sum();
        self.count() - at_or_below
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        self.render_series(out, name, "");
    }

    /// The buckets, sum and count of one series; `labels` like `route="/x",status="200"`.
    fn render_series(&self, out: &mut String, name: &str, labels: &str) {
        let (open, sep) = if labels.is_empty() {
            (String::new(), "")
        } else {
            (format!("{{{labels}}}"), ",")
        };
        let mut cum = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cum += c.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cum}");
        }
        let n = self.count();
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {n}");
        let sum = self.sum_micro.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{open} {sum}\n{name}_count{open} {n}");
    }
}

const LATENCY_BOUNDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const BATCH_BOUNDS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

/// All server metrics. Shared as `Arc<Metrics>`.
pub struct Metrics {
    errors: Mutex<BTreeMap<&'static str, u64>>,
    /// End-to-end latency per (route, status); its counts are `capt_requests_total`.
    request_seconds: Mutex<BTreeMap<(String, u16), Histogram>>,
    pub inference_seconds: Histogram,
    pub queue_wait_seconds: Histogram,
    pub batch_size: Histogram,
    pub images: AtomicU64,
    pub queue_rejected: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            errors: Mutex::default(),
            request_seconds: Mutex::default(),
            inference_seconds: Histogram::new(LATENCY_BOUNDS),
            queue_wait_seconds: Histogram::new(LATENCY_BOUNDS),
            batch_size: Histogram::new(BATCH_BOUNDS),
            images: AtomicU64::new(0),
            queue_rejected: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    pub fn record_request(&self, route: &str, status: u16, seconds: f64) {
        self.request_seconds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((route.to_string(), status))
            .or_insert_with(|| Histogram::new(LATENCY_BOUNDS))
            .observe(seconds);
    }

    /// Latency observations of `route`, all statuses.
    pub fn request_latency_count(&self, route: &str) -> u64 {
        self.request_seconds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|((r, _), _)| r == route)
            .map(|(_, h)| h.count())
            .sum()
    }

    /// Counts an error by its machine-readable code.
    pub fn record_error(&self, code: &'static str) {
        *self
            .errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(code)
            .or_default() += 1;
    }

    pub fn requests_with_status(&self, status: u16) -> u64 {
        self.request_seconds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|((_, s), _)| *s == status)
            .map(|(_, h)| h.count())
            .sum()
    }

    /// Prometheus text exposition (format 0.0.4); `info` labels `capt_edge_build_info`.
    pub fn render(&self, queue_depth: usize, in_flight: usize, info: &[(&str, &str)]) -> String {
        let mut out = String::new();
        out.push_str("# HELP capt_requests_total HTTP requests by route and status.\n# TYPE capt_requests_total counter\n");
        for ((route, status), h) in self
            .request_seconds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "capt_requests_total{{route=\"{route}\",status=\"{status}\"}} {}",
                h.count()
            );
        }
        out.push_str("# HELP capt_errors_total Failed requests by error code.\n# TYPE capt_errors_total counter\n");
        for (code, n) in self.errors.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(out, "capt_errors_total{{code=\"{code}\"}} {n}");
        }
        out.push_str("# HELP capt_request_duration_seconds End-to-end HTTP request latency by route and status.\n# TYPE capt_request_duration_seconds histogram\n");
        for ((route, status), h) in self
            .request_seconds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            h.render_series(
                &mut out,
                "capt_request_duration_seconds",
                &format!("route=\"{route}\",status=\"{status}\""),
            );
        }
        self.inference_seconds.render(
            &mut out,
            "capt_inference_duration_seconds",
            "Backend time per batch.",
        );
        self.queue_wait_seconds.render(
            &mut out,
            "capt_queue_wait_seconds",
            "Time a request waited in the batching queue.",
        );
        self.batch_size
            .render(&mut out, "capt_batch_size", "Images per backend batch.");
        let _ = writeln!(
            out,
            "# HELP capt_images_total Images classified.\n# TYPE capt_images_total counter\ncapt_images_total {}",
            self.images.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP capt_queue_rejected_total Requests refused with 503 because the queue was full.\n# TYPE capt_queue_rejected_total counter\ncapt_queue_rejected_total {}",
            self.queue_rejected.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP capt_queue_depth Images waiting in the batching queue.\n# TYPE capt_queue_depth gauge\ncapt_queue_depth {queue_depth}"
        );
        let _ = writeln!(
            out,
            "# HELP capt_in_flight_requests Requests being handled.\n# TYPE capt_in_flight_requests gauge\ncapt_in_flight_requests {in_flight}"
        );
        let labels: Vec<String> = info
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
            .collect();
        let _ = writeln!(
            out,
            "# HELP capt_edge_build_info The running capt-edge: version, backend, model.\n# TYPE capt_edge_build_info gauge\ncapt_edge_build_info{{{}}} 1",
            labels.join(",")
        );
        out.push_str(&process_metrics());
        out
    }
}

/// The standard `process_*` metrics of this process (Linux; empty elsewhere): CPU seconds,
/// resident and virtual memory, open file descriptors, start time.
pub fn process_metrics() -> String {
    let mut out = String::new();
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return out;
    };
    // Fields after the command name (which may hold spaces) start at ") ".
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok());
    // Kernel clock ticks per second: 100 on every Linux this runs on (USER_HZ).
    let hz = 100.0;
    if let (Some(ut), Some(st)) = (num(11), num(12)) {
        let _ = writeln!(out, "# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.\n# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total {}", (ut + st) / hz);
    }
    if let Some(vsize) = num(20) {
        let _ = writeln!(out, "# HELP process_virtual_memory_bytes Virtual memory size in bytes.\n# TYPE process_virtual_memory_bytes gauge\nprocess_virtual_memory_bytes {vsize}");
    }
    if let Some(rss) = num(21) {
        let _ = writeln!(out, "# HELP process_resident_memory_bytes Resident memory size in bytes.\n# TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes {}", rss * 4096.0);
    }
    let btime = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse::<f64>().ok())
    });
    if let (Some(b), Some(start)) = (btime, num(19)) {
        let _ = writeln!(out, "# HELP process_start_time_seconds Start time of the process since unix epoch in seconds.\n# TYPE process_start_time_seconds gauge\nprocess_start_time_seconds {}", b + start / hz);
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        let _ = writeln!(out, "# HELP process_open_fds Number of open file descriptors.\n# TYPE process_open_fds gauge\nprocess_open_fds {}", fds.count());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::new(&[1.0, 2.0, 4.0]);
        for v in [0.5, 1.5, 3.0, 3.5, 9.0] {
            h.observe(v);
        }
        let mut s = String::new();
        h.render(&mut s, "x", "help");
        assert!(s.contains("x_bucket{le=\"1\"} 1\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"4\"} 4\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"+Inf\"} 5\n"), "{s}");
        assert!(s.contains("x_sum 17.5\n"), "{s}");
        assert_eq!(h.count_above(1.0), 4);
    }

    #[test]
    fn renders_requests_and_gauges() {
        let m = Metrics::default();
        m.record_request("/v1/classify", 200, 0.01);
        m.record_request("/v1/classify", 503, 0.001);
        m.record_error("queue_full");
        let s = m.render(3, 1, &[("version", "0.1.0"), ("backend", "tract")]);
        assert!(
            s.contains("capt_requests_total{route=\"/v1/classify\",status=\"503\"} 1"),
            "{s}"
        );
        assert!(s.contains("capt_errors_total{code=\"queue_full\"} 1"));
        assert!(s.contains("capt_queue_depth 3"));
        assert_eq!(m.requests_with_status(200), 1);
        assert!(
            s.contains(
                "capt_request_duration_seconds_count{route=\"/v1/classify\",status=\"503\"} 1"
            ),
            "{s}"
        );
        assert!(s.contains("capt_edge_build_info{version=\"0.1.0\",backend=\"tract\"} 1"));
        #[cfg(target_os = "linux")]
        for name in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_start_time_seconds",
        ] {
            assert!(s.contains(&format!("\n{name} ")), "{name} missing:\n{s}");
        }
    }
}
