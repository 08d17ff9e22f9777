//! HTTP API on axum: routes, auth, limits, metrics and graceful shutdown. The batching queue
//! lives in [`crate::batcher`]; this layer only parses requests, preprocesses images on the
//! blocking pool, submits them and formats answers.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, MatchedPath, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use capt_backend::{top_k, Backend, ModelDir};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::batcher::{BatchConfig, BatchError, Batcher};
use crate::input::{self, BodyKind, InputLimits, NamedImage};
use crate::metrics::Metrics;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub batch: BatchConfig,
    /// Largest request body in bytes (413 above).
    pub body_limit: usize,
    /// Longest time a classify request may take end to end (504 above).
    pub request_timeout: Duration,
    /// When set, every route except /healthz and /readyz needs `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
    pub limits: InputLimits,
    /// top-k when the request does not say.
    pub default_top_k: usize,
    /// Seconds suggested in Retry-After when the queue is full.
    pub retry_after_seconds: u64,
    /// Origins browsers may call the API from (CORS); empty: no CORS headers at all (the
    /// default); `*`: any origin.
    pub cors_origins: Vec<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            batch: BatchConfig::default(),
            body_limit: 16 * 1024 * 1024,
            request_timeout: Duration::from_secs(30),
            api_key: None,
            limits: InputLimits::default(),
            default_top_k: 5,
            retry_after_seconds: 1,
            cors_origins: Vec::new(),
        }
    }
}

pub struct AppState {
    model: ModelDir,
    backend: String,
    batcher: Batcher,
    pub metrics: Arc<Metrics>,
    cfg: ServerConfig,
    ready: AtomicBool,
    in_flight: AtomicUsize,
}

impl AppState {
    /// Images waiting in the batching queue.
    pub fn queue_depth(&self) -> usize {
        self.batcher.depth()
    }

    /// False once shutdown has begun.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
}

/// A server ready to run: model, backend and batching workers.
pub struct Server {
    state: Arc<AppState>,
}

impl Server {
    /// Starts the batching workers for `backend` (already loaded and warmed up).
    pub fn new(
        model: ModelDir,
        backend: Arc<dyn Backend>,
        cfg: ServerConfig,
    ) -> std::io::Result<Self> {
        let metrics = Arc::new(Metrics::default());
        let crop = model.manifest.preprocess.crop as usize;
        let describe = backend.describe();
        let batcher = Batcher::start(backend, crop, cfg.batch.clone(), metrics.clone())?;
        Ok(Self {
            state: Arc::new(AppState {
                model,
                backend: describe,
                batcher,
                metrics,
                cfg,
                ready: AtomicBool::new(true),
                in_flight: AtomicUsize::new(0),
            }),
        })
    }

    pub fn state(&self) -> Arc<AppState> {
        self.state.clone()
    }

    pub fn router(&self) -> Router {
        router(self.state.clone())
    }

    /// Serves until `shutdown` resolves, then stops accepting connections, lets in-flight
    /// requests finish (including their queued batches) and stops the workers.
    pub async fn run(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        self.run_with_probes(listener, None, shutdown).await
    }

    /// [`Self::run`], also serving [`probe_router`] on `probes` (unauthenticated) until the
    /// main listener has drained.
    pub async fn run_with_probes(
        self,
        listener: tokio::net::TcpListener,
        probes: Option<tokio::net::TcpListener>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let probe_task = probes.map(|l| {
            let app = probe_router(self.state.clone());
            tokio::spawn(async move { axum::serve(l, app).await })
        });
        let state = self.state.clone();
        let signal = async move {
            shutdown.await;
            state.ready.store(false, Ordering::SeqCst);
            tracing::info!(
                in_flight = state.in_flight.load(Ordering::SeqCst),
                "shutdown requested: refusing new connections, finishing in-flight requests"
            );
        };
        axum::serve(listener, self.router())
            .with_graceful_shutdown(signal)
            .await?;
        if let Some(t) = probe_task {
            t.abort();
        }
        let batcher = self.state.batcher.clone();
        let _ = tokio::task::spawn_blocking(move || batcher.shutdown()).await;
        tracing::info!("server stopped");
        Ok(())
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// The unauthenticated probe and scrape routes (`/metrics`, `/healthz`, `/readyz`) for a
/// separate listener (`--metrics-addr`), as TEI and Triton serve them.
pub fn probe_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(state)
}

/// A request id: the client's `X-Request-Id` when it is 1-128 characters of
/// `[A-Za-z0-9._-]`, else a fresh one; echoed in the response and carried by the request's logs.
async fn request_id(req: Request, next: Next) -> Response {
    use std::sync::atomic::AtomicU64;
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let given = req
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            (1..=128).contains(&v.len())
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        })
        .map(str::to_string);
    let id = given.unwrap_or_else(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        format!(
            "{:08x}{:08x}",
            (nanos >> 16) as u32,
            NEXT.fetch_add(1, Ordering::Relaxed) as u32 ^ std::process::id()
        )
    });
    let span =
        tracing::info_span!("request", id = %id, method = %req.method(), path = %req.uri().path());
    let mut resp = tracing::Instrument::instrument(next.run(req), span).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(REQUEST_ID, v);
    }
    resp
}

/// The request-id header.
pub const REQUEST_ID: &str = "x-request-id";

/// The CORS layer for `origins` (none when empty).
fn cors(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use axum::http::Method;
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST])
            .allow_headers([
                header::CONTENT_TYPE,
                header::AUTHORIZATION,
                header::HeaderName::from_static(REQUEST_ID),
            ])
            .expose_headers([
                header::HeaderName::from_static(REQUEST_ID),
                header::RETRY_AFTER,
            ]),
    )
}

pub fn router(state: Arc<AppState>) -> Router {
    let protected = Router::new()
        .route("/v1/classify", post(classify))
        .route("/v1/model", get(model_info))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(protected)
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .layer(DefaultBodyLimit::max(state.cfg.body_limit))
        .layer(middleware::from_fn(request_id));
    // Outermost, so a browser's preflight is answered before auth and routing.
    let app = match cors(&state.cfg.cors_origins) {
        Some(layer) => app.layer(layer),
        None => app,
    };
    app.with_state(state)
}

/// A JSON error: `{"error": {"code", "message"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(json!({"error": {"code": self.code, "message": self.message}}));
        let mut resp = (self.status, body).into_response();
        if let Some(s) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        // Lets the metrics layer count errors by code.
        resp.extensions_mut().insert(ErrorCode(self.code));
        resp
    }
}

#[derive(Clone, Copy)]
struct ErrorCode(&'static str);

impl From<input::InputError> for ApiError {
    fn from(e: input::InputError) -> Self {
        let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST);
        Self::new(status, e.code(), e.to_string())
    }
}

/// Counts every request by route and status, its latency, and errors by code.
async fn observe(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "other".into());
    let t = Instant::now();
    st.in_flight.fetch_add(1, Ordering::SeqCst);
    let resp = next.run(req).await;
    st.in_flight.fetch_sub(1, Ordering::SeqCst);
    let seconds = t.elapsed().as_secs_f64();
    st.metrics
        .record_request(&route, resp.status().as_u16(), seconds);
    // One line per API request (inside the request-id span); probes and scrapes stay quiet.
    if !matches!(route.as_str(), "/healthz" | "/readyz" | "/metrics") {
        tracing::info!(
            status = resp.status().as_u16(),
            ms = (seconds * 1e3 * 100.0).round() / 100.0,
            "request done"
        );
    }
    if let Some(ErrorCode(code)) = resp.extensions().get::<ErrorCode>() {
        st.metrics.record_error(code);
    }
    resp
}

async fn auth(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &st.cfg.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim);
        if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), key.as_bytes())) {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or wrong API key; send `Authorization: Bearer <key>`",
            )
            .into_response();
        }
    }
    next.run(req).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such route; see /openapi.json",
    )
}

#[derive(Debug, Deserialize)]
struct HealthQuery {
    /// Run one image through the queue and the backend (`?deep=1`), as TEI's /health does.
    #[serde(default)]
    deep: Option<String>,
}

async fn healthz(
    State(st): State<Arc<AppState>>,
    q: Result<Query<HealthQuery>, QueryRejection>,
) -> Response {
    let deep =
        matches!(q, Ok(Query(HealthQuery { deep: Some(ref d) })) if d != "0" && d != "false");
    if !deep {
        return (StatusCode::OK, "ok\n").into_response();
    }
    // One synthetic image through the batching queue: the backend really answers.
    let crop = st.model.manifest.preprocess.crop as usize;
    let image = capt_backend::synthetic_batch(1, crop);
    let answer = match st.batcher.submit(image.data, 1) {
        Ok(rx) => match tokio::time::timeout(st.cfg.request_timeout, rx).await {
            Ok(Ok(Ok(reply))) if reply.output.logits.iter().all(|v| v.is_finite()) => Ok(()),
            Ok(Ok(Ok(_))) => Err("the model returned non-finite logits".to_string()),
            Ok(Ok(Err(e))) => Err(e.to_string()),
            Ok(Err(_)) => Err("the batch worker dropped the request".to_string()),
            Err(_) => Err("no answer within the request timeout".to_string()),
        },
        Err(e) => Err(e.to_string()),
    };
    match answer {
        Ok(()) => (StatusCode::OK, "ok (inference)\n").into_response(),
        Err(why) => {
            tracing::warn!("deep health check failed: {why}");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("unhealthy: {why}\n"),
            )
                .into_response()
        }
    }
}

async fn readyz(State(st): State<Arc<AppState>>) -> Response {
    if st.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response()
    }
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let version = st.model.version();
    let info = [
        ("version", env!("CARGO_PKG_VERSION")),
        ("backend", st.backend.as_str()),
        ("model", st.model.manifest.model_name.as_str()),
        ("model_version", version.as_str()),
        ("precision", st.model.manifest.precision.as_str()),
    ];
    let body = st.metrics.render(
        st.batcher.depth(),
        st.in_flight.load(Ordering::SeqCst),
        &info,
    );
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn openapi() -> Json<serde_json::Value> {
    Json(crate::openapi::document())
}

async fn model_info(State(st): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let m = &st.model.manifest;
    let b = st.batcher.config();
    Json(json!({
        "name": m.model_name,
        "version": st.model.version(),
        "method": m.method,
        "num_classes": m.class_names.len(),
        "class_names": m.class_names,
        "embedding_dim": m.embedding_dim,
        "preprocess": m.preprocess,
        "backend": st.backend,
        "created_by": m.created_by,
        "source_checkpoint_sha256": m.source_checkpoint_sha256,
        "backbone_sha256": m.backbone_sha256,
        "classifier_sha256": m.files.classifier.sha256,
        "batching": {
            "max_batch": b.max_batch,
            "max_wait_ms": b.max_wait.as_secs_f64() * 1e3,
            "queue_capacity": b.queue_capacity,
            "workers": b.workers,
        },
        "limits": {
            "body_limit_bytes": st.cfg.body_limit,
            "max_pixels": st.cfg.limits.max_pixels,
            "max_images": st.cfg.limits.max_images,
            "request_timeout_ms": st.cfg.request_timeout.as_millis() as u64,
        },
    }))
}

#[derive(Debug, Deserialize)]
pub struct ClassifyQuery {
    pub top_k: Option<usize>,
}

/// Response of `POST /v1/classify`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ClassifyResponse {
    pub model: ModelRef,
    pub results: Vec<ImageResult>,
    pub timing: Timing,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ModelRef {
    pub name: String,
    pub version: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ImageResult {
    pub index: usize,
    pub name: String,
    pub top_k: Vec<Label>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Label {
    pub label: String,
    pub class_index: usize,
    pub probability: f32,
    pub logit: f32,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Timing {
    pub decode_ms: f64,
    pub queue_ms: f64,
    pub inference_ms: f64,
    pub total_ms: f64,
    /// Images in the backend batch this request ran in (> its own count when coalesced).
    pub batch_size: usize,
}

async fn classify(
    State(st): State<Arc<AppState>>,
    query: Result<Query<ClassifyQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<ClassifyResponse>, ApiError> {
    let t = Instant::now();
    let Query(q) =
        query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_query", e.body_text()))?;
    let body = body.map_err(|e| {
        let code = if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            "body_too_large"
        } else {
            "bad_body"
        };
        let msg = if code == "body_too_large" {
            format!(
                "request body is larger than the server's limit of {} bytes; send fewer or smaller images",
                st.cfg.body_limit
            )
        } else {
            e.body_text()
        };
        ApiError::new(e.status(), code, msg)
    })?;
    let classes = st.model.manifest.class_names.len();
    let k = q.top_k.unwrap_or(st.cfg.default_top_k).min(classes);
    if k == 0 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_query",
            "top_k must be at least 1",
        ));
    }
    let timeout = st.cfg.request_timeout;
    match tokio::time::timeout(timeout, classify_inner(st.clone(), headers, body, k, t)).await {
        Ok(r) => r,
        Err(_) => Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            format!(
                "the request took longer than the server's {} ms limit",
                timeout.as_millis()
            ),
        )),
    }
}

async fn classify_inner(
    st: Arc<AppState>,
    headers: HeaderMap,
    body: Bytes,
    k: usize,
    t: Instant,
) -> Result<Json<ClassifyResponse>, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let kind = input::body_kind(content_type)?;
    let limits = st.cfg.limits.clone();
    let pre = st.model.manifest.preprocess.clone();
    // Parsing, decoding and resizing are CPU work: keep them off the async threads.
    let decoded = tokio::task::spawn_blocking(move || {
        let images = match kind {
            BodyKind::Raw => vec![NamedImage {
                name: "body".into(),
                bytes: body,
            }],
            BodyKind::Multipart { boundary } => input::split_multipart(&body, &boundary, &limits)?,
        };
        input::decode_all(&images, &limits, &pre)
    })
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("decode task failed: {e}"),
        )
    })??;
    let decode_ms = t.elapsed().as_secs_f64() * 1e3;

    let n = decoded.names.len();
    let rx = st
        .batcher
        .submit(decoded.pixels, n)
        .map_err(|e| batch_error(&st, e))?;
    let reply = rx
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "the server is shutting down",
            )
        })?
        .map_err(|e| batch_error(&st, e))?;

    let names = &st.model.manifest.class_names;
    let results = (0..n)
        .map(|i| {
            let logits = reply.output.logits_row(i);
            ImageResult {
                index: i,
                name: decoded.names[i].clone(),
                top_k: top_k(reply.output.probs_row(i), k)
                    .into_iter()
                    .map(|(c, p)| Label {
                        label: names.get(c).cloned().unwrap_or_default(),
                        class_index: c,
                        probability: p,
                        logit: logits[c],
                    })
                    .collect(),
            }
        })
        .collect();
    Ok(Json(ClassifyResponse {
        model: ModelRef {
            name: st.model.manifest.model_name.clone(),
            version: st.model.version(),
        },
        results,
        timing: Timing {
            decode_ms,
            queue_ms: reply.queue_seconds * 1e3,
            inference_ms: reply.inference_seconds * 1e3,
            total_ms: t.elapsed().as_secs_f64() * 1e3,
            batch_size: reply.batch_size,
        },
    }))
}

fn batch_error(st: &AppState, e: BatchError) -> ApiError {
    match e {
        BatchError::QueueFull { .. } => {
            st.metrics.queue_rejected.fetch_add(1, Ordering::Relaxed);
            ApiError {
                retry_after: Some(st.cfg.retry_after_seconds),
                ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "queue_full", e.to_string())
            }
        }
        BatchError::ShuttingDown => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            e.to_string(),
        ),
        BatchError::Backend(_) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "inference_failed",
            e.to_string(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_works() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
