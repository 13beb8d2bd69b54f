//! The native, asynchronous API (`/api/v1`): a job is queued at once (202) and followed by
//! polling or Server-Sent Events; its images stay available until the job expires.

use crate::error::{ApiError, Shape};
use crate::input::{self, image_from_base64};
use crate::jobs::{Event, Job, Status};
use crate::models::Setup;
use crate::{parse_json, JobInput, Server};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use lcm::image_io::{encode_image, OutputFormat};
use lcm::pipelines::{AdapterInput, ControlNetInput, GenerateRequest};
use serde::Deserialize;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::Arc;

const SHAPE: Shape = Shape::Native;

pub fn routes() -> Router<Server> {
    Router::new()
        .route("/api/v1/jobs", post(create).get(list))
        .route("/api/v1/jobs/{id}", get(status))
        .route("/api/v1/jobs/{id}/events", get(events))
        .route("/api/v1/jobs/{id}/cancel", post(cancel))
        .route("/api/v1/jobs/{id}/images/{k}", get(image))
        .route("/api/v1/models", get(models))
}

/// `POST /api/v1/jobs`: diffusers' argument names.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    pub model: Option<String>,
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub num_inference_steps: Option<usize>,
    pub guidance_scale: Option<f64>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub seed: Option<u64>,
    pub num_images_per_prompt: Option<usize>,
    pub original_inference_steps: Option<usize>,
    pub strength: Option<f64>,
    /// base64 or a data URL.
    pub image: Option<String>,
    /// White = repaint.
    pub mask_image: Option<String>,
    #[serde(default)]
    pub loras: Vec<LoraRef>,
    #[serde(default)]
    pub controlnet: Vec<ControlRef>,
    #[serde(default)]
    pub guess_mode: bool,
    #[serde(default)]
    pub t2i_adapter: Vec<AdapterRef>,
    pub adapter_conditioning_factor: Option<f64>,
    pub num_frames: Option<usize>,
    pub fps: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraRef {
    pub name: String,
    pub weight: Option<f64>,
}

/// `true` for OpenCV's usual thresholds (100, 200), or the thresholds.
#[derive(Deserialize)]
#[serde(untagged)]
pub enum Canny {
    On(bool),
    Thresholds { low: f64, high: f64 },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlRef {
    pub name: String,
    pub image: String,
    pub conditioning_scale: Option<f64>,
    pub guidance_start: Option<f64>,
    pub guidance_end: Option<f64>,
    pub canny: Option<Canny>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterRef {
    pub name: String,
    pub image: String,
    pub conditioning_scale: Option<f64>,
    pub canny: Option<Canny>,
}

fn control_image(
    s: &Server,
    field: &str,
    b64: &str,
    canny: &Option<Canny>,
) -> Result<lcm::image_processor::Image8, ApiError> {
    let img = image_from_base64(SHAPE, field, b64, s.config.limits.max_input_pixels)?;
    let (low, high) = match canny {
        None | Some(Canny::On(false)) => return Ok(img),
        Some(Canny::On(true)) => (100.0, 200.0),
        Some(Canny::Thresholds { low, high }) => (*low, *high),
    };
    lcm::canny::canny(&img, low, high).map_err(|e| ApiError::engine(SHAPE, &e).param(field))
}

impl JobRequest {
    pub fn into_input(self, s: &Server) -> Result<JobInput, ApiError> {
        let max = s.config.limits.max_input_pixels;
        let mut req = GenerateRequest {
            prompt: self.prompt,
            negative_prompt: self.negative_prompt,
            num_inference_steps: self.num_inference_steps.unwrap_or(4),
            guidance_scale: self.guidance_scale,
            width: self.width,
            height: self.height,
            seed: self.seed.unwrap_or_else(input::random_seed),
            num_images_per_prompt: self.num_images_per_prompt.unwrap_or(1),
            original_inference_steps: self.original_inference_steps,
            strength: self.strength,
            guess_mode: self.guess_mode,
            adapter_conditioning_factor: self.adapter_conditioning_factor.unwrap_or(1.0),
            num_frames: self.num_frames,
            ..Default::default()
        };
        req.image = self.image.as_deref().map(|b| image_from_base64(SHAPE, "image", b, max)).transpose()?;
        req.mask_image =
            self.mask_image.as_deref().map(|b| image_from_base64(SHAPE, "mask_image", b, max)).transpose()?;
        let mut setup = Setup {
            loras: self.loras.iter().map(|l| (l.name.clone(), l.weight.unwrap_or(1.0))).collect(),
            ..Default::default()
        };
        for (i, c) in self.controlnet.iter().enumerate() {
            setup.controlnets.push(c.name.clone());
            req.controlnet.push(ControlNetInput {
                image: control_image(s, &format!("controlnet[{i}].image"), &c.image, &c.canny)?,
                conditioning_scale: c.conditioning_scale.unwrap_or(1.0),
                guidance_start: c.guidance_start.unwrap_or(0.0),
                guidance_end: c.guidance_end.unwrap_or(1.0),
            });
        }
        for (i, a) in self.t2i_adapter.iter().enumerate() {
            setup.adapters.push(a.name.clone());
            req.adapter.push(AdapterInput {
                image: control_image(s, &format!("t2i_adapter[{i}].image"), &a.image, &a.canny)?,
                conditioning_scale: a.conditioning_scale.unwrap_or(1.0),
            });
        }
        if self.fps == Some(0) {
            return Err(ApiError::bad(SHAPE, "fps must be at least 1"));
        }
        Ok(JobInput {
            model: self.model,
            setup,
            video: req.num_frames.is_some(),
            requests: vec![req],
            fps: self.fps.unwrap_or(10),
        })
    }
}

async fn create(State(s): State<Server>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let req: JobRequest = parse_json(SHAPE, body)?;
    let input = req.into_input(&s)?;
    let job = s.submit(SHAPE, input)?;
    let mut resp = (StatusCode::ACCEPTED, Json(job_json(&s, &job))).into_response();
    if let Ok(v) = format!("/api/v1/jobs/{}", job.id).parse() {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    Ok(resp)
}

/// A job as the API shows it.
pub fn job_json(s: &Server, job: &Arc<Job>) -> Value {
    let position = s.queue.position(&job.id);
    let st = job.state();
    let mut v = json!({
        "id": job.id,
        "status": st.status.as_str(),
        "model": job.work.model.name,
        "queue_position": position,
        "step": st.step,
        "total_steps": st.total,
        "created": job.created_unix,
        "events": format!("/api/v1/jobs/{}/events", job.id),
    });
    if let Some((code, msg)) = &st.error {
        v["error"] = json!({"message": msg, "status": code});
    }
    if st.status == Status::Succeeded {
        let images: Vec<Value> = st
            .outputs
            .iter()
            .enumerate()
            .map(|(k, o)| {
                json!({
                    "url": format!("/api/v1/jobs/{}/images/{k}", job.id),
                    "content_type": o.mime,
                    "seed": o.seed,
                    "width": o.image.width,
                    "height": o.image.height,
                    "parameters": o.parameters,
                })
            })
            .collect();
        v["images"] = json!(images);
    }
    v
}

async fn list(State(s): State<Server>) -> Json<Value> {
    let jobs: Vec<Arc<Job>> = s.jobs.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
    let mut jobs: Vec<Value> = jobs.iter().map(|j| job_json(&s, j)).collect();
    jobs.sort_by_key(|j| j["created"].as_u64());
    Json(json!({"jobs": jobs}))
}

async fn status(State(s): State<Server>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let job = s.job(SHAPE, &id)?;
    Ok(Json(job_json(&s, &job)))
}

async fn cancel(State(s): State<Server>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let job = s.job(SHAPE, &id)?;
    s.cancel(&job);
    Ok(Json(job_json(&s, &job)))
}

fn sse_event(e: &Event) -> axum::response::sse::Event {
    axum::response::sse::Event::default().event(e.kind).data(e.data.to_string())
}

/// Every event of the job from the first (queued, started, one `step` per denoising step,
/// then succeeded / failed / cancelled); the stream ends after the last.
async fn events(State(s): State<Server>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let job = s.job(SHAPE, &id)?;
    let stream = futures_util::stream::unfold((job, 0usize), |(job, seen)| async move {
        let e = job.next_event(seen).await?;
        Some((Ok::<_, Infallible>(sse_event(&e)), (job, seen + 1)))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()).into_response())
}

#[derive(Deserialize)]
struct ImageQuery {
    format: Option<String>,
}

async fn image(
    State(s): State<Server>,
    Path((id, k)): Path<(String, String)>,
    Query(q): Query<ImageQuery>,
) -> Result<Response, ApiError> {
    let job = s.job(SHAPE, &id)?;
    let output = {
        let st = job.state();
        if st.status != Status::Succeeded {
            return Err(ApiError::new(
                SHAPE,
                StatusCode::CONFLICT,
                format!("job {id} is {}, it has no images", st.status.as_str()),
            ));
        }
        k.parse::<usize>().ok().and_then(|k| st.outputs.get(k).cloned())
    };
    let output = output.ok_or_else(|| {
        ApiError::new(SHAPE, StatusCode::NOT_FOUND, format!("job {id} has no image {}", k.escape_debug()))
    })?;
    let format = match q.format.as_deref() {
        None | Some("png") => None,
        Some("jpeg" | "jpg") => Some((OutputFormat::Jpeg, "image/jpeg")),
        Some("webp") => Some((OutputFormat::WebP, "image/webp")),
        Some(f) => return Err(ApiError::bad(SHAPE, format!("format `{}`: use png, jpeg or webp", f.escape_debug()))),
    };
    match format {
        Some((f, mime)) if output.mime == "image/png" => {
            let bytes = encode_image(&output.image, f, None).map_err(|e| ApiError::engine(SHAPE, &e))?;
            Ok(([(header::CONTENT_TYPE, mime)], bytes).into_response())
        }
        _ => Ok(([(header::CONTENT_TYPE, output.mime)], output.bytes.as_ref().clone()).into_response()),
    }
}

async fn models(State(s): State<Server>) -> Json<Value> {
    let default = s.default_model().name.clone();
    let list: Vec<Value> = s
        .models
        .iter()
        .map(|m| {
            json!({
                "name": m.name,
                "default": m.name == default,
                "pipeline": m.kind.diffusers_name(),
                "width": m.default_size.0,
                "height": m.default_size.1,
                "video": m.video,
                "loras": m.loras,
                "controlnets": m.controlnet_names,
                "t2i_adapters": m.adapter_names,
                "previews": m.preview_vae.is_some(),
            })
        })
        .collect();
    Json(json!({"models": list}))
}
