//! `lcm serve`: the `lcm` engine as a resident HTTP service. Models load once and stay; one
//! executor thread per device runs jobs from a bounded FIFO queue; three APIs share that queue:
//!
//! - the native, asynchronous API (`/api/v1`: jobs, Server-Sent Events, cancel, images),
//!   described by `/openapi.json`;
//! - AUTOMATIC1111's `/sdapi/v1` subset its clients call;
//! - OpenAI's Images API (`/v1/images/generations`, `/v1/images/edits`, `/v1/models`).
//!
//! Requests are checked against the loaded model ([`lcm::pipelines::LcmPipeline::plan`]) before
//! they are queued. Other programs can build the router in-process:
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use lcm_server::{config::{NamedSource, ServerConfig}, Server};
//! let config = ServerConfig { models: vec![NamedSource::parse("SimianLuo/LCM_Dreamshaper_v7")], ..Default::default() };
//! let server = Server::load(config)?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! server.serve(listener, std::future::pending()).await?;
//! # Ok(()) }
//! ```

pub mod a1111;
pub mod config;
pub mod error;
pub mod input;
pub mod jobs;
pub mod metrics;
pub mod models;
pub mod native;
pub mod openai;
pub mod openapi;

use crate::config::ServerConfig;
use crate::error::{ApiError, Shape};
use crate::jobs::{Job, Queue, Work};
use crate::metrics::Metrics;
use crate::models::{Model, Setup};
use anyhow::Result;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use lcm::pipelines::GenerateRequest;
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A loaded server: models, queue, executor. Cheap to clone (shared state).
#[derive(Clone)]
pub struct Server(Arc<Inner>);

pub struct Inner {
    pub config: ServerConfig,
    pub models: Vec<Arc<Model>>,
    /// The model requests get when they name none (AUTOMATIC1111's `sd_model_checkpoint`).
    pub default_model: Mutex<usize>,
    pub queue: Arc<Queue>,
    pub jobs: Mutex<HashMap<String, Arc<Job>>>,
    pub metrics: Arc<Metrics>,
    pub shutting_down: AtomicBool,
    executor: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::ops::Deref for Server {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

/// A job before it is queued: what the API asked for, in engine terms.
pub struct JobInput {
    pub model: Option<String>,
    pub setup: Setup,
    pub requests: Vec<GenerateRequest>,
    pub fps: u32,
    /// Pick the video model when none is named.
    pub video: bool,
}

impl Server {
    /// Check the configuration, load every model (failing on the first that cannot load) and
    /// start the executor.
    pub fn load(config: ServerConfig) -> Result<Self> {
        config.check()?;
        if let Some(dir) = &config.output_dir {
            anyhow::ensure!(dir.is_dir(), "--output-dir {} is not a folder", dir.display());
        }
        let models = models::load_all(&config)?.into_iter().map(Arc::new).collect();
        let queue = Arc::new(Queue::new(config.queue));
        let metrics = Arc::new(Metrics::default());
        let executor = jobs::spawn_executor(queue.clone(), metrics.clone(), config.output_dir.clone())?;
        Ok(Self(Arc::new(Inner {
            config,
            models,
            default_model: Mutex::new(0),
            queue,
            jobs: Mutex::new(HashMap::new()),
            metrics,
            shutting_down: AtomicBool::new(false),
            executor: Mutex::new(Some(executor)),
        })))
    }

    pub fn default_model(&self) -> Arc<Model> {
        let i = *self.default_model.lock().unwrap_or_else(|e| e.into_inner());
        self.models[i.min(self.models.len() - 1)].clone()
    }

    /// A model by name (`None`: the default one).
    pub fn model(&self, shape: Shape, name: Option<&str>) -> Result<Arc<Model>, ApiError> {
        match name {
            None => Ok(self.default_model()),
            Some(n) => {
                let i = input::find(shape, "model", n, self.models.iter().map(|m| &m.name))?;
                Ok(self.models[i].clone())
            }
        }
    }

    pub fn job(&self, shape: Shape, id: &str) -> Result<Arc<Job>, ApiError> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).get(id).cloned().ok_or_else(|| {
            ApiError::new(
                shape,
                StatusCode::NOT_FOUND,
                format!("no job `{}` (finished jobs are kept for a while)", id.escape_debug()),
            )
        })
    }

    /// Check a job against the limits and the loaded model, then queue it.
    pub fn submit(&self, shape: Shape, input: JobInput) -> Result<Arc<Job>, ApiError> {
        let r = self.prepare(shape, input);
        if r.is_err() {
            self.metrics.rejected(false);
        }
        let job = Arc::new(r?);
        self.sweep();
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).insert(job.id.clone(), job.clone());
        if let Err(full) = self.queue.push(job.clone(), &self.metrics) {
            self.jobs.lock().unwrap_or_else(|e| e.into_inner()).remove(&job.id);
            self.metrics.rejected(true);
            let mut e = ApiError::new(
                shape,
                StatusCode::TOO_MANY_REQUESTS,
                format!("the queue is full ({} jobs waiting); retry later", self.config.queue),
            );
            if self.shutting_down.load(Ordering::SeqCst) {
                e = ApiError::new(shape, StatusCode::SERVICE_UNAVAILABLE, "the server is shutting down");
            } else {
                e.retry_after = Some(full.retry_after);
            }
            return Err(e);
        }
        Ok(job)
    }

    fn prepare(&self, shape: Shape, input: JobInput) -> Result<Job, ApiError> {
        let JobInput { model, setup, requests, fps, video } = input;
        let model = match (model.as_deref(), video) {
            (None, true) => self.models.iter().find(|m| m.video).cloned().ok_or_else(|| {
                ApiError::bad(shape, "this server has no video model (start it with --motion-adapter)")
            })?,
            (name, _) => self.model(shape, name)?,
        };
        for (name, _) in &setup.loras {
            input::find(shape, "LoRA", name, model.loras.iter())?;
        }
        if setup.loras.iter().enumerate().any(|(i, (n, _))| setup.loras[..i].iter().any(|(m, _)| m == n)) {
            return Err(ApiError::bad(shape, "a LoRA is named twice"));
        }
        for name in &setup.controlnets {
            input::find(shape, "ControlNet", name, model.controlnet_names.iter())?;
        }
        for name in &setup.adapters {
            input::find(shape, "T2I-Adapter", name, model.adapter_names.iter())?;
        }
        let l = &self.config.limits;
        if requests.is_empty() {
            return Err(ApiError::bad(shape, "nothing to generate"));
        }
        let images: usize = requests.iter().map(|r| r.num_images_per_prompt).sum();
        if images > l.max_images {
            return Err(ApiError::bad(
                shape,
                format!("{images} images exceed this server's limit of {} per request", l.max_images),
            ));
        }
        for r in &requests {
            let steps = r.timesteps.as_ref().map_or(r.num_inference_steps, Vec::len);
            if steps > l.max_steps {
                return Err(ApiError::bad(
                    shape,
                    format!("{steps} steps exceed this server's limit of {}", l.max_steps),
                ));
            }
            if let Some(f) = r.num_frames.filter(|f| *f > l.max_frames) {
                return Err(ApiError::bad(shape, format!("{f} frames exceed this server's limit of {}", l.max_frames)));
            }
            let (w, h) = (r.width.unwrap_or(1), r.height.unwrap_or(1));
            if w.saturating_mul(h) > l.max_pixels || w > 65536 || h > 65536 {
                return Err(ApiError::bad(
                    shape,
                    format!("{w}x{h} exceeds this server's limit of {} pixels", l.max_pixels),
                ));
            }
            r.check().map_err(|e| ApiError::from_engine_error(shape, &e))?;
        }
        // The engine's own checks against the model, as the job will run. They need the
        // pipeline carrying the job's control models; when it carries others (or the executor
        // is reconfiguring it), those checks run when the job starts.
        let mut total = 0;
        let current = model.setup_if_idle();
        if current.is_some_and(|c| c.controlnets == setup.controlnets && c.adapters == setup.adapters) {
            if let Ok(pipe) = model.pipe.try_read() {
                for r in &requests {
                    let plan = pipe.plan(r).map_err(|e| ApiError::from_engine_error(shape, &e))?;
                    if plan.width * plan.height > l.max_pixels {
                        return Err(ApiError::bad(
                            shape,
                            format!(
                                "{}x{} exceeds this server's limit of {} pixels",
                                plan.width, plan.height, l.max_pixels
                            ),
                        ));
                    }
                    total += plan.timesteps.len();
                }
            }
        }
        if total == 0 {
            total = requests.iter().map(|r| r.timesteps.as_ref().map_or(r.num_inference_steps, Vec::len)).sum();
        }
        Ok(Job::new(input::new_id(), Work { model, setup, requests, fps }, total))
    }

    /// Cancel a job (queued: at once; running: before its next step).
    pub fn cancel(&self, job: &Arc<Job>) -> bool {
        self.queue.cancel(job, &self.metrics)
    }

    /// Drop finished jobs older than the configured time.
    pub fn sweep(&self) {
        let ttl = self.config.job_ttl;
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).retain(|_, j| !jobs::expired(j, ttl));
    }

    /// Stop accepting jobs (503) and cancel the queued ones; the running job finishes.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        self.queue.close(&self.metrics);
    }

    /// Wait for the executor to finish its job (after [`Self::begin_shutdown`]).
    pub fn join_executor(&self) {
        if let Some(h) = self.executor.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = h.join();
        }
    }

    /// The router of all three APIs, with authentication, CORS and the body limit.
    pub fn router(&self) -> Router {
        let api = Router::new()
            .merge(native::routes())
            .merge(a1111::routes())
            .merge(openai::routes())
            .route("/metrics", get(metrics_text))
            .route("/openapi.json", get(openapi::document))
            .route_layer(axum::middleware::from_fn_with_state(self.clone(), auth));
        let mut app = Router::new()
            .route("/health", get(health))
            .merge(api)
            .fallback(not_found)
            .method_not_allowed_fallback(method_not_allowed)
            // axum's own limit (not tower-http's RequestBodyLimitLayer): its rejection reaches
            // the handlers, which answer in their API's error shape.
            .layer(axum::extract::DefaultBodyLimit::max(self.config.limits.max_body_bytes))
            .layer(axum::middleware::from_fn_with_state(self.clone(), refuse_when_stopping))
            .with_state(self.clone());
        if !self.config.cors_origins.is_empty() {
            let origins: Vec<HeaderValue> = self.config.cors_origins.iter().filter_map(|o| o.parse().ok()).collect();
            app = app.layer(
                tower_http::cors::CorsLayer::new()
                    .allow_origin(origins)
                    .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
                    .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE]),
            );
        }
        app
    }

    /// Serve on `listener` until `shutdown` resolves; then stop accepting, cancel the queued
    /// jobs, let the running one finish and return.
    pub async fn serve(
        &self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        let this = self.clone();
        let sweeper = {
            let this = self.clone();
            let every = (self.config.job_ttl / 4).clamp(Duration::from_millis(100), Duration::from_secs(60));
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    this.sweep();
                }
            })
        };
        let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel::<()>();
        let signal = async move {
            shutdown.await;
            this.begin_shutdown();
            // The running job finishes (its clients get their result) before connections close.
            let t = this.clone();
            let _ = tokio::task::spawn_blocking(move || t.join_executor()).await;
            let _ = stopped_tx.send(());
        };
        let app = self.router();
        // No Nagle delay: an SSE stream writes small events one after another, and each would
        // otherwise wait for the client's delayed ACK of the previous one (tens of ms per job).
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        axum::serve(listener, app).with_graceful_shutdown(signal).await?;
        let _ = stopped_rx.await;
        sweeper.abort();
        Ok(())
    }
}

/// Bind, serve until SIGINT / SIGTERM, exit cleanly: what `lcm serve` runs.
pub fn run(config: ServerConfig) -> Result<()> {
    let addr = format!("{}:{}", config.host, config.port);
    let server = Server::load(config)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let listener =
            tokio::net::TcpListener::bind(&addr).await.map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
        let local = listener.local_addr()?;
        let names: Vec<&str> = server.models.iter().map(|m| m.name.as_str()).collect();
        eprintln!("listening on http://{local} (models: {})", names.join(", "));
        server.serve(listener, shutdown_signal()).await?;
        eprintln!("stopped");
        Ok(())
    })
}

async fn shutdown_signal() {
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

async fn health(State(s): State<Server>) -> Response {
    let running = s.queue.running().is_some();
    axum::Json(serde_json::json!({
        "status": if s.shutting_down.load(Ordering::SeqCst) { "stopping" } else { "ok" },
        "queue_depth": s.queue.depth(),
        "running": running,
        "models": s.models.iter().map(|m| m.name.clone()).collect::<Vec<_>>(),
    }))
    .into_response()
}

async fn metrics_text(State(s): State<Server>) -> Response {
    let text = s.metrics.render(s.queue.depth(), s.queue.running().is_some());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn not_found(req: Request) -> ApiError {
    let path = req.uri().path().to_string();
    ApiError::new(Shape::of_path(&path), StatusCode::NOT_FOUND, format!("no route {path}"))
}

async fn method_not_allowed(req: Request) -> ApiError {
    let path = req.uri().path().to_string();
    ApiError::new(
        Shape::of_path(&path),
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{} is not allowed on {path}", req.method()),
    )
}

/// 503 while stopping; 413 for a declared body over the limit before any of it is read (a
/// chunked body is cut by the body limit while it is read).
async fn refuse_when_stopping(State(s): State<Server>, req: Request, next: Next) -> Response {
    let shape = Shape::of_path(req.uri().path());
    if s.shutting_down.load(Ordering::SeqCst) && req.uri().path() != "/health" {
        return ApiError::new(shape, StatusCode::SERVICE_UNAVAILABLE, "the server is shutting down").into_response();
    }
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let max = s.config.limits.max_body_bytes;
    if declared.is_some_and(|n| n > max as u64) {
        let msg = format!("the request body exceeds this server's limit of {max} bytes (--max-body-mb)");
        return ApiError::new(shape, StatusCode::PAYLOAD_TOO_LARGE, msg).into_response();
    }
    next.run(req).await
}

/// Bearer (OpenAI clients) or HTTP Basic with the key as the password (AUTOMATIC1111's
/// `--api-auth user:pass` clients; `user:pass` as a whole also matches), compared in constant
/// time. CORS preflights pass: browsers send them without credentials.
async fn auth(State(s): State<Server>, req: Request, next: Next) -> Response {
    if s.config.api_keys.is_empty() || req.method() == Method::OPTIONS {
        return next.run(req).await;
    }
    let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(credentials);
    let ok = given.is_some_and(|creds| {
        creds.iter().any(|c| s.config.api_keys.iter().any(|k| constant_time_eq(c.as_bytes(), k.as_bytes())))
    });
    if ok {
        return next.run(req).await;
    }
    let shape = Shape::of_path(req.uri().path());
    let mut e = ApiError::new(
        shape,
        StatusCode::UNAUTHORIZED,
        "missing or wrong API key (Authorization: Bearer KEY, or HTTP Basic with the key as the password)",
    );
    e.www_authenticate = shape == Shape::A1111;
    e.into_response()
}

/// The secrets an Authorization header offers.
fn credentials(value: &str) -> Option<Vec<String>> {
    let (scheme, rest) = value.trim().split_once(' ')?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        Some(vec![rest.to_string()])
    } else if scheme.eq_ignore_ascii_case("basic") {
        use base64::Engine as _;
        let decoded = base64::engine::general_purpose::STANDARD.decode(rest).ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let password = text.split_once(':').map(|(_, p)| p.to_string()).unwrap_or_default();
        Some(vec![password, text])
    } else {
        None
    }
}

/// Constant time in the contents (the length of the key is not secret).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// Parse a JSON body into `T`, answering in the API's error shape (axum's own rejections are
/// plain text).
pub fn parse_json<T: serde::de::DeserializeOwned>(
    shape: Shape,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<T, ApiError> {
    let bytes = body.map_err(|e| ApiError::new(shape, e.status(), e.body_text()))?;
    serde_json::from_slice(&bytes).map_err(|e| ApiError::bad(shape, format!("invalid JSON body: {e}")))
}

/// Waits for a job on behalf of a client; if the client goes away first (the handler's future
/// is dropped), the job is cancelled.
pub struct CancelOnDrop {
    pub server: Server,
    pub job: Arc<Job>,
    pub armed: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.armed {
            self.server.cancel(&self.job);
        }
    }
}

/// Wait for a job; cancel it if the waiting client disconnects.
pub async fn wait_or_cancel(server: &Server, job: &Arc<Job>) {
    let mut guard = CancelOnDrop { server: server.clone(), job: job.clone(), armed: true };
    job.wait_done().await;
    guard.armed = false;
}
