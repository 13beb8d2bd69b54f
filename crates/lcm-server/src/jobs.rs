//! Jobs, the bounded FIFO queue and the executor: one thread per device that runs jobs one at a
//! time on the resident pipelines, reports each step (with a preview through the tiny
//! autoencoder) and stops a job at the next step when it is cancelled.

use crate::metrics::Metrics;
use crate::models::{Model, Setup};
use anyhow::Result;
use base64::Engine as _;
use lcm::image_io::{encode_image, OutputFormat, RgbImage};
use lcm::pipelines::{GenerateRequest, LcmPipeline, Step};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::watch;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

/// What a job runs: engine requests, one after the other, on one model set up one way.
/// (AUTOMATIC1111's batches are one request per image, each with its own seed.)
pub struct Work {
    pub model: Arc<Model>,
    pub setup: Setup,
    pub requests: Vec<GenerateRequest>,
    /// Frames per second of the GIFs videos are returned as.
    pub fps: u32,
}

/// One image (or video, as a GIF) a job made.
#[derive(Clone)]
pub struct Output {
    /// PNG with the `parameters` text, or GIF for a video.
    pub bytes: Arc<Vec<u8>>,
    pub mime: &'static str,
    /// The image (a video's first frame).
    pub image: Arc<RgbImage>,
    pub parameters: String,
    pub seed: u64,
    pub guidance_scale: f64,
    pub steps: usize,
}

/// A server-sent event of a job's history.
#[derive(Clone)]
pub struct Event {
    pub kind: &'static str,
    pub data: Value,
    /// Step events: the preview, for APIs that send it in their own format.
    pub preview: Option<Arc<RgbImage>>,
}

pub struct JobState {
    pub status: Status,
    pub step: usize,
    pub total: usize,
    pub events: Vec<Event>,
    pub outputs: Vec<Output>,
    /// HTTP status and message of a failure.
    pub error: Option<(u16, String)>,
    pub started: Option<Instant>,
    pub finished: Option<Instant>,
    /// The latest step preview, JPEG.
    pub preview_jpeg: Option<Arc<Vec<u8>>>,
}

pub struct Job {
    pub id: String,
    pub work: Work,
    pub created: Instant,
    pub created_unix: u64,
    cancel: AtomicBool,
    state: Mutex<JobState>,
    changed: watch::Sender<u64>,
}

/// Returned by the step callback to stop a cancelled job.
#[derive(Debug)]
struct Cancelled;

impl std::fmt::Display for Cancelled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("cancelled")
    }
}

impl std::error::Error for Cancelled {}

impl Job {
    pub fn new(id: String, work: Work, total: usize) -> Self {
        let created_unix =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        Self {
            id,
            work,
            created: Instant::now(),
            created_unix,
            cancel: AtomicBool::new(false),
            state: Mutex::new(JobState {
                status: Status::Queued,
                step: 0,
                total,
                events: Vec::new(),
                outputs: Vec::new(),
                error: None,
                started: None,
                finished: None,
                preview_jpeg: None,
            }),
            changed: watch::channel(0).0,
        }
    }

    pub fn state(&self) -> MutexGuard<'_, JobState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_cancel_requested(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// Record an event and wake whoever waits on the job.
    pub fn push_event(&self, kind: &'static str, data: Value, preview: Option<Arc<RgbImage>>) {
        self.state().events.push(Event { kind, data, preview });
        self.changed.send_modify(|v| *v += 1);
    }

    /// Move to a final status (once).
    fn finish(&self, status: Status, error: Option<(u16, String)>, outputs: Vec<Output>) {
        let data = {
            let mut s = self.state();
            if s.status.is_final() {
                return;
            }
            s.status = status;
            s.finished = Some(Instant::now());
            s.outputs = outputs;
            // Kept jobs hold their previews as JPEG only (in the events' data).
            for e in &mut s.events {
                e.preview = None;
            }
            let mut data = json!({"id": self.id, "status": status.as_str()});
            if let Some((code, msg)) = &error {
                data["error"] = json!({"message": msg, "status": code});
            }
            if status == Status::Succeeded {
                let urls: Vec<String> =
                    (0..s.outputs.len()).map(|k| format!("/api/v1/jobs/{}/images/{k}", self.id)).collect();
                data["images"] = json!(urls);
            }
            s.error = error;
            data
        };
        self.push_event(status.as_str(), data, None);
    }

    /// Wait until the job is final.
    pub async fn wait_done(&self) {
        let mut rx = self.changed.subscribe();
        loop {
            rx.borrow_and_update();
            if self.state().status.is_final() {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Wait for the event after the first `seen` ones; `None` once the job is final and all its
    /// events were seen.
    pub async fn next_event(&self, seen: usize) -> Option<Event> {
        let mut rx = self.changed.subscribe();
        loop {
            rx.borrow_and_update();
            {
                let s = self.state();
                if let Some(e) = s.events.get(seen) {
                    return Some(e.clone());
                }
                if s.status.is_final() {
                    return None;
                }
            }
            if rx.changed().await.is_err() {
                return None;
            }
        }
    }
}

/// Why a job was not queued.
pub struct QueueFull {
    pub retry_after: u64,
}

struct QueueState {
    pending: VecDeque<Arc<Job>>,
    running: Option<Arc<Job>>,
    closed: bool,
}

/// Jobs waiting for the executor, first in first out, at most `capacity` of them.
pub struct Queue {
    state: Mutex<QueueState>,
    wake: Condvar,
    capacity: usize,
}

impl Queue {
    pub fn new(capacity: usize) -> Self {
        Self {
            state: Mutex::new(QueueState { pending: VecDeque::new(), running: None, closed: false }),
            wake: Condvar::new(),
            capacity,
        }
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue a job; its 0-based position among the waiting ones.
    pub fn push(&self, job: Arc<Job>, metrics: &Metrics) -> Result<usize, QueueFull> {
        let mut q = self.lock();
        if q.closed || q.pending.len() >= self.capacity {
            // Roughly when a slot frees: the jobs ahead at the average job time.
            let per_job = metrics.mean_job_seconds().unwrap_or(1.0);
            let secs = (per_job * (q.pending.len() + 1) as f64 / 2.0).ceil().clamp(1.0, 3600.0) as u64;
            return Err(QueueFull { retry_after: secs });
        }
        let pos = q.pending.len();
        // Recorded before the executor can see the job, so `queued` always comes before `started`.
        job.push_event("queued", json!({"id": job.id, "status": "queued", "queue_position": pos}), None);
        q.pending.push_back(job.clone());
        drop(q);
        self.wake.notify_one();
        Ok(pos)
    }

    /// Jobs waiting.
    pub fn depth(&self) -> usize {
        self.lock().pending.len()
    }

    pub fn running(&self) -> Option<Arc<Job>> {
        self.lock().running.clone()
    }

    pub fn position(&self, id: &str) -> Option<usize> {
        self.lock().pending.iter().position(|j| j.id == id)
    }

    /// Cancel a job: a queued one leaves the queue now, a running one stops before its next
    /// step. Returns whether the job was still to be cancelled.
    pub fn cancel(&self, job: &Arc<Job>, metrics: &Metrics) -> bool {
        if job.state().status.is_final() {
            return false;
        }
        job.cancel.store(true, Ordering::SeqCst);
        let removed = {
            let mut q = self.lock();
            let before = q.pending.len();
            q.pending.retain(|j| !Arc::ptr_eq(j, job));
            q.pending.len() != before
        };
        if removed {
            job.finish(Status::Cancelled, None, Vec::new());
            metrics.job_finished("cancelled", None);
        }
        true
    }

    /// Stop taking jobs and cancel the waiting ones; the running one finishes.
    pub fn close(&self, metrics: &Metrics) {
        let pending: Vec<Arc<Job>> = {
            let mut q = self.lock();
            q.closed = true;
            q.pending.drain(..).collect()
        };
        for job in pending {
            job.cancel.store(true, Ordering::SeqCst);
            job.finish(Status::Cancelled, None, Vec::new());
            metrics.job_finished("cancelled", None);
        }
        self.wake.notify_all();
    }

    /// The next job for the executor; `None` once closed and empty.
    fn next(&self) -> Option<Arc<Job>> {
        let mut q = self.lock();
        loop {
            if let Some(job) = q.pending.pop_front() {
                q.running = Some(job.clone());
                return Some(job);
            }
            if q.closed {
                return None;
            }
            q = self.wake.wait(q).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn done(&self) {
        self.lock().running = None;
    }
}

/// The executor thread: jobs in order until the queue closes.
pub fn spawn_executor(
    queue: Arc<Queue>,
    metrics: Arc<Metrics>,
    output_dir: Option<PathBuf>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("lcm-executor".into()).spawn(move || {
        while let Some(job) = queue.next() {
            execute(&job, &metrics, output_dir.as_deref());
            queue.done();
        }
    })
}

fn execute(job: &Arc<Job>, metrics: &Metrics, output_dir: Option<&std::path::Path>) {
    if job.is_cancel_requested() {
        job.finish(Status::Cancelled, None, Vec::new());
        metrics.job_finished("cancelled", None);
        return;
    }
    let start = Instant::now();
    {
        let mut s = job.state();
        s.status = Status::Running;
        s.started = Some(start);
    }
    job.push_event("started", json!({"id": job.id, "status": "running"}), None);
    // A panic in the engine fails this job, not the executor.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(job, metrics)));
    let elapsed = start.elapsed();
    match result {
        Ok(Ok(outputs)) => {
            if let Some(dir) = output_dir {
                for (k, o) in outputs.iter().enumerate() {
                    let ext = if o.mime == "image/gif" { "gif" } else { "png" };
                    let path = dir.join(format!("{}-{k}.{ext}", job.id));
                    if let Err(e) = lcm::image_io::write_atomic(&path, &o.bytes, false) {
                        eprintln!("warning: {e:#}");
                    }
                }
            }
            job.finish(Status::Succeeded, None, outputs);
            metrics.job_finished("succeeded", Some(elapsed));
        }
        Ok(Err(_)) if job.is_cancel_requested() => {
            job.finish(Status::Cancelled, None, Vec::new());
            metrics.job_finished("cancelled", Some(elapsed));
        }
        Ok(Err(e)) => {
            let status = lcm::Error::find(&e).map_or(500, |t| t.http_status());
            job.finish(Status::Failed, Some((status, crate::error::one_line(&format!("{e:#}")))), Vec::new());
            metrics.job_finished("failed", Some(elapsed));
        }
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            job.finish(
                Status::Failed,
                Some((500, crate::error::one_line(&format!("internal error: {msg}")))),
                Vec::new(),
            );
            metrics.job_finished("failed", Some(elapsed));
        }
    }
}

fn run(job: &Job, metrics: &Metrics) -> Result<Vec<Output>> {
    let w = &job.work;
    w.model.configure(&w.setup)?;
    let pipe = w.model.pipe.read().unwrap_or_else(|e| e.into_inner());
    let plans = w.requests.iter().map(|r| pipe.plan(r)).collect::<Result<Vec<_>, _>>()?;
    let total: usize = plans.iter().map(|p| p.timesteps.len()).sum();
    job.state().total = total;
    let mut done = 0;
    let mut outputs = Vec::new();
    for (req, plan) in w.requests.iter().zip(&plans) {
        if job.is_cancel_requested() {
            return Err(Cancelled.into());
        }
        let mut last = Instant::now();
        let images = pipe.run(plan, req, |step| {
            metrics.step_finished(last.elapsed());
            done += 1;
            let preview = preview(&pipe, &w.model, step).map(Arc::new);
            let jpeg = preview.as_ref().and_then(|p| encode_image(p, OutputFormat::Jpeg, None).ok()).map(Arc::new);
            let mut data = json!({"id": job.id, "step": done, "total": total});
            if let Some(j) = &jpeg {
                data["image"] = json!(base64::engine::general_purpose::STANDARD.encode(j.as_slice()));
            }
            {
                let mut s = job.state();
                s.step = done;
                if jpeg.is_some() {
                    s.preview_jpeg = jpeg.clone();
                }
            }
            job.push_event("step", data, preview);
            last = Instant::now();
            // Checked after the step is reported: a cancel stops before the next step.
            if job.is_cancel_requested() {
                return Err(Cancelled.into());
            }
            Ok(())
        })?;
        let steps = plan.timesteps.len();
        match plan.num_frames {
            Some(frames) => {
                for clip in images.chunks(frames.max(1)) {
                    let bytes = lcm::image_io::encode_gif(clip, w.fps)?;
                    outputs.push(Output {
                        bytes: Arc::new(bytes),
                        mime: "image/gif",
                        image: Arc::new(clip[0].clone()),
                        parameters: pipe.parameters_text(plan, req, 0),
                        seed: req.seed,
                        guidance_scale: plan.guidance_scale,
                        steps,
                    });
                }
            }
            None => {
                for (i, img) in images.into_iter().enumerate() {
                    let parameters = pipe.parameters_text(plan, req, i);
                    let bytes = encode_image(&img, OutputFormat::Png, Some(&parameters))?;
                    outputs.push(Output {
                        bytes: Arc::new(bytes),
                        mime: "image/png",
                        image: Arc::new(img),
                        parameters,
                        seed: req.seed,
                        guidance_scale: plan.guidance_scale,
                        steps,
                    });
                }
            }
        }
    }
    Ok(outputs)
}

/// The first image's predicted clean latents (`denoised`) through the tiny autoencoder; a video's
/// first frame. Previews are best effort: a failure shows as a step without an image.
fn preview(pipe: &LcmPipeline, model: &Model, step: &Step) -> Option<RgbImage> {
    let vae = model.preview_vae.as_ref()?;
    let z = step.denoised.narrow(0, 0, 1).ok()?;
    let (z, frames) = match step.num_frames {
        Some(_) => (z.narrow(2, 0, 1).ok()?, Some(1)),
        None => (z, None),
    };
    pipe.decode_latents(vae, &z, frames).ok()?.into_iter().next()
}

/// How long finished jobs stay: those older than `ttl` are dropped.
pub fn expired(job: &Job, ttl: Duration) -> bool {
    job.state().finished.is_some_and(|t| t.elapsed() > ttl)
}
