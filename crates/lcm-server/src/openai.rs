//! OpenAI's Images API: `/v1/images/generations`, `/v1/images/edits` (multipart; transparent
//! pixels of the mask mark the area to repaint, as OpenAI defines it) and `/v1/models`, for the
//! official `openai` clients and the apps built on them. `negative_prompt`, `seed`,
//! `num_inference_steps`, `guidance_scale` (and `strength` for edits) are accepted as extra
//! fields; `quality`, `style`, `background`, `moderation` and `user` are accepted and ignored.

use crate::error::{ApiError, Shape};
use crate::input::{self, alpha_mask, decode_image, to_image8};
use crate::jobs::{Job, Status};
use crate::models::Setup;
use crate::{parse_json, wait_or_cancel, CancelOnDrop, JobInput, Server};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Multipart, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use lcm::image_io::{encode_image, OutputFormat, RgbImage};
use lcm::pipelines::GenerateRequest;
use serde::Deserialize;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::Arc;

const SHAPE: Shape = Shape::OpenAi;

pub fn routes() -> Router<Server> {
    Router::new()
        .route("/v1/images/generations", post(generations))
        .route("/v1/images/edits", post(edits))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
}

#[derive(Deserialize)]
struct Generation {
    prompt: String,
    model: Option<String>,
    n: Option<usize>,
    size: Option<String>,
    response_format: Option<String>,
    output_format: Option<String>,
    #[serde(default)]
    stream: bool,
    partial_images: Option<usize>,
    negative_prompt: Option<String>,
    seed: Option<u64>,
    num_inference_steps: Option<usize>,
    guidance_scale: Option<f64>,
}

/// How the images go back.
struct Delivery {
    url: bool,
    format: OutputFormat,
    format_name: &'static str,
    stream: bool,
    partial_images: usize,
}

fn delivery(
    response_format: Option<&str>,
    output_format: Option<&str>,
    stream: bool,
    partial_images: Option<usize>,
) -> Result<Delivery, ApiError> {
    let url = match response_format {
        None | Some("b64_json") => false,
        Some("url") => true,
        Some(f) => {
            return Err(ApiError::bad(SHAPE, format!("response_format `{}`: use b64_json or url", f.escape_debug()))
                .param("response_format"))
        }
    };
    let (format, format_name) = match output_format {
        None | Some("png") => (OutputFormat::Png, "png"),
        Some("jpeg" | "jpg") => (OutputFormat::Jpeg, "jpeg"),
        Some("webp") => (OutputFormat::WebP, "webp"),
        Some(f) => {
            return Err(ApiError::bad(SHAPE, format!("output_format `{}`: use png, jpeg or webp", f.escape_debug()))
                .param("output_format"))
        }
    };
    let partial_images = partial_images.unwrap_or(0);
    if partial_images > 3 {
        return Err(ApiError::bad(SHAPE, "partial_images must be between 0 and 3").param("partial_images"));
    }
    Ok(Delivery { url, format, format_name, stream, partial_images })
}

/// `WxH` or `auto` (the model's default, or an edited image's size).
fn size(text: Option<&str>) -> Result<(Option<usize>, Option<usize>), ApiError> {
    match text {
        None | Some("auto") => Ok((None, None)),
        Some(s) => {
            let parsed = s.split_once('x').and_then(|(w, h)| Some((w.trim().parse().ok()?, h.trim().parse().ok()?)));
            match parsed {
                Some((w, h)) => Ok((Some(w), Some(h))),
                None => Err(ApiError::bad(SHAPE, format!("size `{}`: use WIDTHxHEIGHT or auto", s.escape_debug()))
                    .param("size")),
            }
        }
    }
}

async fn generations(
    State(s): State<Server>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let g: Generation = parse_json(SHAPE, body)?;
    let d = delivery(g.response_format.as_deref(), g.output_format.as_deref(), g.stream, g.partial_images)?;
    let (width, height) = size(g.size.as_deref())?;
    let req = GenerateRequest {
        prompt: g.prompt,
        negative_prompt: g.negative_prompt,
        num_inference_steps: g.num_inference_steps.unwrap_or(4),
        guidance_scale: g.guidance_scale,
        width,
        height,
        seed: g.seed.unwrap_or_else(input::random_seed),
        num_images_per_prompt: g.n.unwrap_or(1),
        ..Default::default()
    };
    let input = JobInput { model: g.model, setup: Setup::default(), requests: vec![req], fps: 10, video: false };
    respond(s, &headers, input, d).await
}

async fn edits(
    State(s): State<Server>,
    headers: HeaderMap,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<Response, ApiError> {
    let mut multipart = multipart.map_err(|e| ApiError::new(SHAPE, e.status(), e.body_text()))?;
    let max = s.config.limits.max_input_pixels;
    let mut image = None;
    let mut mask = None;
    let mut fields = std::collections::HashMap::<String, String>::new();
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => return Err(ApiError::new(SHAPE, e.status(), e.body_text())),
        };
        let name = field.name().unwrap_or_default().to_string();
        let bytes = field.bytes().await.map_err(|e| ApiError::new(SHAPE, e.status(), e.body_text()))?;
        match name.as_str() {
            // Several images (`image[]`) are accepted; the first is edited.
            "image" | "image[]" if image.is_none() => image = Some(decode_image(SHAPE, "image", &bytes, max)?),
            "image" | "image[]" => {}
            "mask" => mask = Some(decode_image(SHAPE, "mask", &bytes, max)?),
            _ => {
                let text = String::from_utf8(bytes.to_vec())
                    .map_err(|_| ApiError::bad(SHAPE, format!("{name}: expected text")).param(&name))?;
                fields.insert(name, text);
            }
        }
    }
    let image = image.ok_or_else(|| ApiError::bad(SHAPE, "image: required").param("image"))?;
    let prompt =
        fields.get("prompt").cloned().ok_or_else(|| ApiError::bad(SHAPE, "prompt: required").param("prompt"))?;
    fn parse<T: std::str::FromStr>(
        fields: &std::collections::HashMap<String, String>,
        key: &str,
    ) -> Result<Option<T>, ApiError> {
        fields
            .get(key)
            .map(|v| {
                v.trim()
                    .parse::<T>()
                    .map_err(|_| ApiError::bad(SHAPE, format!("{key}: `{}` is not valid", v.escape_debug())).param(key))
            })
            .transpose()
    }
    let stream = parse::<bool>(&fields, "stream")?.unwrap_or(false);
    let d = delivery(
        fields.get("response_format").map(String::as_str),
        fields.get("output_format").map(String::as_str),
        stream,
        parse(&fields, "partial_images")?,
    )?;
    let (width, height) = size(fields.get("size").map(String::as_str))?;
    let mask_image = match &mask {
        Some(m) => {
            if (m.width(), m.height()) != (image.width(), image.height()) {
                return Err(ApiError::bad(
                    SHAPE,
                    format!(
                        "mask: {}x{} but the image is {}x{}; they must match",
                        m.width(),
                        m.height(),
                        image.width(),
                        image.height()
                    ),
                )
                .param("mask"));
            }
            Some(alpha_mask(SHAPE, m)?)
        }
        None => None,
    };
    let req = GenerateRequest {
        prompt,
        negative_prompt: fields.get("negative_prompt").cloned(),
        num_inference_steps: parse(&fields, "num_inference_steps")?.unwrap_or(4),
        guidance_scale: parse(&fields, "guidance_scale")?,
        width,
        height,
        seed: parse(&fields, "seed")?.unwrap_or_else(input::random_seed),
        num_images_per_prompt: parse(&fields, "n")?.unwrap_or(1),
        strength: parse(&fields, "strength")?,
        image: Some(to_image8(&image)),
        mask_image,
        ..Default::default()
    };
    let input = JobInput {
        model: fields.get("model").cloned(),
        setup: Setup::default(),
        requests: vec![req],
        fps: 10,
        video: false,
    };
    respond(s, &headers, input, d).await
}

fn encoded(o: &crate::jobs::Output, d: &Delivery) -> Result<Vec<u8>, ApiError> {
    match d.format {
        // The PNG carries the `parameters` text, as `lcm generate` writes it.
        OutputFormat::Png => Ok(o.bytes.as_ref().clone()),
        f => encode_image(&o.image, f, None).map_err(|e| ApiError::engine(SHAPE, &e)),
    }
}

fn size_text(img: &RgbImage) -> String {
    format!("{}x{}", img.width, img.height)
}

async fn respond(s: Server, headers: &HeaderMap, input: JobInput, d: Delivery) -> Result<Response, ApiError> {
    let job = s.submit(SHAPE, input)?;
    if d.stream {
        return Ok(stream(s, job, d));
    }
    wait_or_cancel(&s, &job).await;
    let st = job.state();
    match st.status {
        Status::Succeeded => {}
        Status::Cancelled => return Err(ApiError::new(SHAPE, StatusCode::CONFLICT, "the request was cancelled")),
        _ => {
            let (code, msg) = st.error.clone().unwrap_or((500, "failed".into()));
            return Err(ApiError::new(
                SHAPE,
                StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                msg,
            ));
        }
    }
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("127.0.0.1");
    let mut data = Vec::new();
    for (k, o) in st.outputs.iter().enumerate() {
        data.push(if d.url {
            let query = if d.format_name == "png" { String::new() } else { format!("?format={}", d.format_name) };
            json!({"url": format!("http://{host}/api/v1/jobs/{}/images/{k}{query}", job.id)})
        } else {
            json!({"b64_json": base64::engine::general_purpose::STANDARD.encode(encoded(o, &d)?)})
        });
    }
    Ok(Json(json!({
        "created": job.created_unix,
        "data": data,
        "output_format": d.format_name,
        "size": st.outputs.first().map(|o| size_text(&o.image)),
        "quality": "auto",
        "background": "opaque",
    }))
    .into_response())
}

/// `stream: true`: `image_generation.partial_image` events from the step previews (the
/// `partial_images` of them spread over the steps), then one `image_generation.completed` per
/// image. A client that goes away cancels the job.
fn stream(s: Server, job: Arc<Job>, d: Delivery) -> Response {
    struct St {
        guard: CancelOnDrop,
        seen: usize,
        partials_sent: usize,
        pending: std::collections::VecDeque<axum::response::sse::Event>,
        done: bool,
        d: Delivery,
    }
    let guard = CancelOnDrop { server: s, job, armed: true };
    let st = St { guard, seen: 0, partials_sent: 0, pending: Default::default(), done: false, d };
    let events = futures_util::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(e) = st.pending.pop_front() {
                return Some((Ok::<_, Infallible>(e), st));
            }
            if st.done {
                return None;
            }
            let job = st.guard.job.clone();
            let Some(event) = job.next_event(st.seen).await else {
                st.done = true;
                continue;
            };
            st.seen += 1;
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |t| t.as_secs());
            match event.kind {
                "step" => {
                    let (step, total) =
                        (event.data["step"].as_u64().unwrap_or(0), event.data["total"].as_u64().unwrap_or(0));
                    let (p, j) = (st.d.partial_images as u64, st.partials_sent as u64);
                    // Partial j goes out at step ceil((j + 1) * total / (p + 1)).
                    let due = j < p && total > 0 && step * (p + 1) >= (j + 1) * total;
                    // A finished job keeps its previews as JPEG only.
                    let preview = event.preview.clone().or_else(|| {
                        let jpeg =
                            base64::engine::general_purpose::STANDARD.decode(event.data["image"].as_str()?).ok()?;
                        let img = image::load_from_memory(&jpeg).ok()?.to_rgb8();
                        let (width, height) = (img.width() as usize, img.height() as usize);
                        Some(Arc::new(RgbImage { width, height, pixels: img.into_raw() }))
                    });
                    if let (true, Some(img)) = (due, &preview) {
                        if let Ok(bytes) = encode_image(img, st.d.format, None) {
                            st.pending.push_back(sse_json(
                                "image_generation.partial_image",
                                json!({"type": "image_generation.partial_image",
                                       "b64_json": base64::engine::general_purpose::STANDARD.encode(bytes),
                                       "created_at": now, "size": size_text(img), "quality": "auto",
                                       "background": "opaque", "output_format": st.d.format_name,
                                       "partial_image_index": j}),
                            ));
                            st.partials_sent += 1;
                        }
                    }
                }
                "succeeded" => {
                    let outputs = job.state().outputs.clone();
                    for o in &outputs {
                        let b64 = encoded(o, &st.d)
                            .map(|b| base64::engine::general_purpose::STANDARD.encode(b))
                            .unwrap_or_default();
                        st.pending.push_back(sse_json(
                            "image_generation.completed",
                            json!({"type": "image_generation.completed", "b64_json": b64, "created_at": now,
                                   "size": size_text(&o.image), "quality": "auto", "background": "opaque",
                                   "output_format": st.d.format_name,
                                   "usage": {"total_tokens": 0, "input_tokens": 0, "output_tokens": 0,
                                             "input_tokens_details": {"text_tokens": 0, "image_tokens": 0}}}),
                        ));
                    }
                    st.guard.armed = false;
                    st.done = true;
                }
                "failed" | "cancelled" => {
                    let (code, msg) = job.state().error.clone().unwrap_or((409, "the request was cancelled".into()));
                    let kind = if code >= 500 { "server_error" } else { "invalid_request_error" };
                    st.pending.push_back(sse_json(
                        "error",
                        json!({"type": "error", "error": {"message": msg, "type": kind, "param": Value::Null, "code": Value::Null}}),
                    ));
                    st.guard.armed = false;
                    st.done = true;
                }
                _ => {}
            }
        }
    });
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}

fn sse_json(kind: &'static str, data: Value) -> axum::response::sse::Event {
    axum::response::sse::Event::default().event(kind).data(data.to_string())
}

fn model_json(name: &str) -> Value {
    json!({"id": name, "object": "model", "created": 0, "owned_by": "lcm"})
}

async fn models(State(s): State<Server>) -> Json<Value> {
    Json(json!({"object": "list", "data": s.models.iter().map(|m| model_json(&m.name)).collect::<Vec<_>>()}))
}

async fn model(State(s): State<Server>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let m = s.model(SHAPE, Some(&id))?;
    Ok(Json(model_json(&m.name)))
}
