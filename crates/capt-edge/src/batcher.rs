//! Dynamic batching, apart from the HTTP layer (as text-embeddings-inference does): requests
//! put preprocessed images in a bounded queue; worker threads take up to `max_batch` images,
//! waiting at most `max_wait` after the oldest arrived for more to coalesce, run the backend
//! once and send each request its rows. A full queue refuses at once (the server answers 503).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use capt_backend::{Backend, ClassifierOutput, ImageBatch};
use tokio::sync::oneshot;

use crate::metrics::Metrics;

#[derive(Debug, Clone)]
pub struct BatchConfig {
    /// Most images per backend call.
    pub max_batch: usize,
    /// Longest time the oldest queued image waits for others to join its batch.
    pub max_wait: Duration,
    /// Most images queued (not yet running); more is refused.
    pub queue_capacity: usize,
    /// Worker threads, each running whole batches.
    pub workers: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_batch: 8,
            // Greedy: a free worker runs what is queued at once; under load, requests that
            // arrive while a batch runs coalesce into the next one.
            max_wait: Duration::ZERO,
            queue_capacity: 256,
            workers: 1,
        }
    }
}

/// What a request gets back: its rows of the batch output and how it was served.
#[derive(Debug, Clone)]
pub struct BatchReply {
    pub output: ClassifierOutput,
    pub queue_seconds: f64,
    pub inference_seconds: f64,
    /// Images in the backend batch this request ran in.
    pub batch_size: usize,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum BatchError {
    #[error(
        "the request queue is full ({depth} images waiting, capacity {capacity}); retry shortly"
    )]
    QueueFull { depth: usize, capacity: usize },
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("inference failed: {0}")]
    Backend(String),
}

struct Job {
    pixels: Vec<f32>,
    n: usize,
    enqueued: Instant,
    reply: oneshot::Sender<Result<BatchReply, BatchError>>,
}

struct State {
    queue: VecDeque<Job>,
    queued_images: usize,
    closed: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    cfg: BatchConfig,
    crop: usize,
    backend: Arc<dyn Backend>,
    metrics: Arc<Metrics>,
    running: AtomicUsize,
}

/// The queue and its workers. Cloning shares them.
#[derive(Clone)]
pub struct Batcher {
    shared: Arc<Shared>,
    workers: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Batcher {
    /// Starts the worker threads. `crop` is the model's input side.
    pub fn start(
        backend: Arc<dyn Backend>,
        crop: usize,
        cfg: BatchConfig,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                queued_images: 0,
                closed: false,
            }),
            wake: Condvar::new(),
            cfg: BatchConfig {
                max_batch: cfg.max_batch.max(1),
                workers: cfg.workers.max(1),
                ..cfg
            },
            crop,
            backend,
            metrics,
            running: AtomicUsize::new(0),
        });
        let mut handles = Vec::new();
        for i in 0..shared.cfg.workers {
            let s = shared.clone();
            handles.push(
                std::thread::Builder::new()
                    .name(format!("capt-batch-{i}"))
                    .spawn(move || worker(&s))?,
            );
        }
        Ok(Self {
            shared,
            workers: Arc::new(Mutex::new(handles)),
        })
    }

    pub fn config(&self) -> &BatchConfig {
        &self.shared.cfg
    }

    /// Queues `n` preprocessed images (NCHW). Never blocks: refuses when the queue is full.
    pub fn submit(
        &self,
        pixels: Vec<f32>,
        n: usize,
    ) -> Result<oneshot::Receiver<Result<BatchReply, BatchError>>, BatchError> {
        let (tx, rx) = oneshot::channel();
        let mut st = self.lock();
        if st.closed {
            return Err(BatchError::ShuttingDown);
        }
        let cap = self.shared.cfg.queue_capacity;
        // An oversized request still runs alone when the queue is empty, so it cannot starve.
        if st.queued_images + n > cap && st.queued_images > 0 {
            return Err(BatchError::QueueFull {
                depth: st.queued_images,
                capacity: cap,
            });
        }
        st.queued_images += n;
        st.queue.push_back(Job {
            pixels,
            n,
            enqueued: Instant::now(),
            reply: tx,
        });
        drop(st);
        self.shared.wake.notify_one();
        Ok(rx)
    }

    /// Images waiting in the queue.
    pub fn depth(&self) -> usize {
        self.lock().queued_images
    }

    /// Batches being run right now.
    pub fn running(&self) -> usize {
        self.shared.running.load(Ordering::Relaxed)
    }

    /// Stops accepting work; queued jobs still run. Then waits for the workers to finish.
    pub fn shutdown(&self) {
        self.lock().closed = true;
        self.shared.wake.notify_all();
        let handles: Vec<_> =
            std::mem::take(&mut *self.workers.lock().unwrap_or_else(|e| e.into_inner()));
        for h in handles {
            let _ = h.join();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn worker(s: &Shared) {
    while let Some(jobs) = next_batch(s) {
        run_batch(s, jobs);
    }
}

/// Waits for work, then for the batch to fill or the oldest job's wait to expire.
fn next_batch(s: &Shared) -> Option<Vec<Job>> {
    let mut st = s.state.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        if let Some(first) = st.queue.front() {
            let deadline = first.enqueued + s.cfg.max_wait;
            let now = Instant::now();
            if st.queued_images >= s.cfg.max_batch || now >= deadline || st.closed {
                break;
            }
            st = s
                .wake
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        } else if st.closed {
            return None;
        } else {
            st = s.wake.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }
    // Take whole jobs from the front while they fit; the first is always taken.
    let mut jobs = Vec::new();
    let mut images = 0;
    while let Some(job) = st.queue.front() {
        if !jobs.is_empty() && images + job.n > s.cfg.max_batch {
            break;
        }
        images += job.n;
        let job = st.queue.pop_front().expect("front exists");
        jobs.push(job);
    }
    st.queued_images -= images;
    let more = !st.queue.is_empty();
    drop(st);
    if more {
        // Another worker may start on the rest right away.
        s.wake.notify_one();
    }
    Some(jobs)
}

fn run_batch(s: &Shared, jobs: Vec<Job>) {
    // Requests that gave up (timeout, client gone) are dropped before spending compute.
    let jobs: Vec<Job> = jobs.into_iter().filter(|j| !j.reply.is_closed()).collect();
    if jobs.is_empty() {
        return;
    }
    let n: usize = jobs.iter().map(|j| j.n).sum();
    let mut data = Vec::with_capacity(jobs.iter().map(|j| j.pixels.len()).sum());
    let started = Instant::now();
    for j in &jobs {
        data.extend_from_slice(&j.pixels);
        s.metrics
            .queue_wait_seconds
            .observe(started.duration_since(j.enqueued).as_secs_f64());
    }
    s.running.fetch_add(1, Ordering::Relaxed);
    let result = run_chunks(s, data, n);
    s.running.fetch_sub(1, Ordering::Relaxed);
    let inference_seconds = started.elapsed().as_secs_f64();
    s.metrics.inference_seconds.observe(inference_seconds);
    s.metrics.batch_size.observe(n as f64);
    s.metrics.images.fetch_add(n as u64, Ordering::Relaxed);

    let mut row = 0;
    for j in jobs {
        let reply = match &result {
            Ok(out) => {
                let c = out.classes;
                Ok(BatchReply {
                    output: ClassifierOutput {
                        n: j.n,
                        classes: c,
                        logits: out.logits[row * c..(row + j.n) * c].to_vec(),
                        probs: out.probs[row * c..(row + j.n) * c].to_vec(),
                    },
                    queue_seconds: started.duration_since(j.enqueued).as_secs_f64(),
                    inference_seconds,
                    batch_size: n,
                })
            }
            Err(e) => Err(e.clone()),
        };
        row += j.n;
        let _ = j.reply.send(reply);
    }
}

/// Runs `n` images in backend calls of at most `max_batch` (one oversized request may exceed
/// it), shielding the worker from a panicking backend.
fn run_chunks(s: &Shared, data: Vec<f32>, n: usize) -> Result<ClassifierOutput, BatchError> {
    let per = capt_core::chw_len(s.crop);
    let mut out = ClassifierOutput {
        n: 0,
        classes: 0,
        logits: Vec::new(),
        probs: Vec::new(),
    };
    for start in (0..n).step_by(s.cfg.max_batch) {
        let m = s.cfg.max_batch.min(n - start);
        let batch = ImageBatch {
            data: data[start * per..(start + m) * per].to_vec(),
            n: m,
            height: s.crop,
            width: s.crop,
        };
        let r =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| s.backend.classify(&batch)));
        let part = match r {
            Ok(Ok(o)) => o,
            Ok(Err(e)) => return Err(BatchError::Backend(e.to_string())),
            Err(_) => return Err(BatchError::Backend("the backend panicked".into())),
        };
        out.n += part.n;
        out.classes = part.classes;
        out.logits.extend(part.logits);
        out.probs.extend(part.probs);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use capt_backend::BackendError;

    /// Echoes the first pixel of each image as its single "class" score, counting calls.
    struct Echo {
        calls: Mutex<Vec<usize>>,
        delay: Duration,
    }

    impl Backend for Echo {
        fn name(&self) -> &'static str {
            "echo"
        }
        fn describe(&self) -> String {
            "echo".into()
        }
        fn classify(&self, b: &ImageBatch) -> Result<ClassifierOutput, BackendError> {
            std::thread::sleep(self.delay);
            self.calls.lock().unwrap().push(b.n);
            let per = 3 * b.height * b.width;
            let v: Vec<f32> = (0..b.n).map(|i| b.data[i * per]).collect();
            Ok(ClassifierOutput {
                n: b.n,
                classes: 1,
                logits: v.clone(),
                probs: v,
            })
        }
    }

    fn start(delay_ms: u64, cfg: BatchConfig) -> (Arc<Echo>, Batcher) {
        let echo = Arc::new(Echo {
            calls: Mutex::new(vec![]),
            delay: Duration::from_millis(delay_ms),
        });
        let b = Batcher::start(echo.clone(), 1, cfg, Arc::new(Metrics::default())).unwrap();
        (echo, b)
    }

    fn img(v: f32, n: usize) -> Vec<f32> {
        (0..n).flat_map(|i| [v + i as f32, 0.0, 0.0]).collect()
    }

    #[test]
    fn coalesces_and_routes_rows() {
        let cfg = BatchConfig {
            max_batch: 8,
            max_wait: Duration::from_millis(200),
            ..Default::default()
        };
        let (echo, b) = start(0, cfg);
        let rxs: Vec<_> = (0..4)
            .map(|i| b.submit(img(10.0 * i as f32, 2), 2).unwrap())
            .collect();
        for (i, rx) in rxs.into_iter().enumerate() {
            let r = rx.blocking_recv().unwrap().unwrap();
            assert_eq!(r.output.probs, vec![10.0 * i as f32, 10.0 * i as f32 + 1.0]);
            assert_eq!(r.batch_size, 8);
        }
        assert_eq!(*echo.calls.lock().unwrap(), vec![8]);
        b.shutdown();
    }

    #[test]
    fn full_queue_refuses_and_shutdown_drains() {
        let cfg = BatchConfig {
            max_batch: 1,
            max_wait: Duration::ZERO,
            queue_capacity: 2,
            workers: 1,
        };
        let (echo, b) = start(100, cfg);
        let first = b.submit(img(1.0, 1), 1).unwrap();
        // Let the worker take the first job so the queue is empty again.
        std::thread::sleep(Duration::from_millis(30));
        let q1 = b.submit(img(2.0, 1), 1).unwrap();
        let q2 = b.submit(img(3.0, 1), 1).unwrap();
        assert!(matches!(
            b.submit(img(4.0, 1), 1),
            Err(BatchError::QueueFull { depth: 2, .. })
        ));
        assert_eq!(b.depth(), 2);
        b.shutdown();
        assert!(matches!(
            b.submit(img(5.0, 1), 1),
            Err(BatchError::ShuttingDown)
        ));
        for (rx, v) in [(first, 1.0), (q1, 2.0), (q2, 3.0)] {
            assert_eq!(rx.blocking_recv().unwrap().unwrap().output.probs, vec![v]);
        }
        assert_eq!(echo.calls.lock().unwrap().len(), 3);
    }

    #[test]
    fn oversized_request_runs_in_chunks() {
        let cfg = BatchConfig {
            max_batch: 2,
            max_wait: Duration::ZERO,
            queue_capacity: 3,
            workers: 2,
        };
        let (echo, b) = start(0, cfg);
        let r = b
            .submit(img(0.0, 5), 5)
            .unwrap()
            .blocking_recv()
            .unwrap()
            .unwrap();
        assert_eq!(r.output.probs, vec![0.0, 1.0, 2.0, 3.0, 4.0]);
        assert_eq!(*echo.calls.lock().unwrap(), vec![2, 2, 1]);
        b.shutdown();
    }

    #[test]
    fn abandoned_jobs_are_skipped() {
        let cfg = BatchConfig {
            max_batch: 4,
            max_wait: Duration::from_millis(50),
            ..Default::default()
        };
        let (echo, b) = start(0, cfg);
        drop(b.submit(img(1.0, 1), 1).unwrap());
        std::thread::sleep(Duration::from_millis(120));
        assert!(echo.calls.lock().unwrap().is_empty());
        b.shutdown();
    }
}
