//! AUTOMATIC1111's web UI API (`/sdapi/v1`), the subset its clients call (SillyTavern, Krita
//! plug-ins, scripts), and the ControlNet extension's lists. Requests are read leniently (numbers
//! as strings or floats, unknown fields ignored), as A1111 does.
//!
//! Seeds follow A1111: -1 is random, and image `i` of a batch uses `seed + i` with its own
//! generator, so each image is a request of its own and its infotext reproduces it alone.

use crate::error::{ApiError, Shape};
use crate::input::{self, image_from_base64};
use crate::jobs::Status;
use crate::models::Setup;
use crate::{parse_json, wait_or_cancel, JobInput, Server};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use lcm::pipelines::{ControlNetInput, GenerateRequest};
use serde::Deserialize;
use serde_json::{json, Value};

const SHAPE: Shape = Shape::A1111;

pub fn routes() -> Router<Server> {
    Router::new()
        .route("/sdapi/v1/txt2img", post(txt2img))
        .route("/sdapi/v1/img2img", post(img2img))
        .route("/sdapi/v1/progress", get(progress))
        .route("/sdapi/v1/interrupt", post(interrupt))
        .route("/sdapi/v1/skip", post(interrupt))
        .route("/sdapi/v1/sd-models", get(sd_models))
        .route("/sdapi/v1/options", get(options).post(set_options))
        .route("/sdapi/v1/loras", get(loras))
        .route("/sdapi/v1/refresh-loras", post(refreshed))
        .route("/sdapi/v1/refresh-checkpoints", post(refreshed))
        .route("/sdapi/v1/samplers", get(samplers))
        .route("/sdapi/v1/schedulers", get(schedulers))
        .route("/sdapi/v1/sd-vae", get(empty_list))
        .route("/sdapi/v1/upscalers", get(empty_list))
        .route("/sdapi/v1/latent-upscale-modes", get(empty_list))
        .route("/sdapi/v1/embeddings", get(embeddings))
        .route("/controlnet/model_list", get(controlnet_models))
        .route("/controlnet/module_list", get(controlnet_modules))
}

/// A number given as a JSON number or a numeric string; absent or null is `None`.
fn num(v: &Value, key: &str) -> Result<Option<f64>, ApiError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(Value::String(s)) if s.trim().parse::<f64>().is_ok() => Ok(s.trim().parse().ok()),
        Some(Value::Bool(b)) => Ok(Some(if *b { 1.0 } else { 0.0 })),
        Some(other) => Err(ApiError::bad(SHAPE, format!("{key}: expected a number, got {other}"))),
    }
}

/// A count or size: a whole number, not negative.
fn count(v: &Value, key: &str) -> Result<Option<usize>, ApiError> {
    match num(v, key)? {
        None => Ok(None),
        Some(x) if x >= 0.0 && x.fract() == 0.0 && x < 1e12 => Ok(Some(x as usize)),
        Some(x) => Err(ApiError::bad(SHAPE, format!("{key}: expected a whole number, got {x}"))),
    }
}

fn text(v: &Value, key: &str) -> Result<Option<String>, ApiError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(ApiError::bad(SHAPE, format!("{key}: expected a string, got {other}"))),
    }
}

/// `name [hash]` -> `name`, as A1111 titles checkpoints.
fn strip_hash(name: &str) -> &str {
    match name.rsplit_once(" [") {
        Some((n, h)) if h.ends_with(']') => n,
        _ => name,
    }
}

/// What a txt2img / img2img body asks for, as engine requests (one per image).
struct Parsed {
    input: JobInput,
    seed: u64,
    prompt: String,
    negative: String,
    width: Option<usize>,
    height: Option<usize>,
    strength: Option<f64>,
}

fn parse(s: &Server, body: &Value, img2img: bool) -> Result<Parsed, ApiError> {
    if !body.is_object() {
        return Err(ApiError::bad(SHAPE, "the body must be a JSON object"));
    }
    let max = s.config.limits.max_input_pixels;
    let raw_prompt = text(body, "prompt")?.unwrap_or_default();
    let (prompt, loras) = input::extract_lora_tags(SHAPE, &raw_prompt)?;
    let negative = text(body, "negative_prompt")?.unwrap_or_default();
    let seed = match num(body, "seed")? {
        None => input::random_seed(),
        Some(x) if x < 0.0 => input::random_seed(),
        Some(x) if x.fract() == 0.0 && x < 1.8e19 => x as u64,
        Some(x) => return Err(ApiError::bad(SHAPE, format!("seed: expected a whole number, got {x}"))),
    };
    let batch = count(body, "batch_size")?.unwrap_or(1).max(1);
    let n_iter = count(body, "n_iter")?.unwrap_or(1).max(1);
    let images = batch.saturating_mul(n_iter);
    if images > s.config.limits.max_images {
        return Err(ApiError::bad(
            SHAPE,
            format!("{images} images exceed this server's limit of {} per request", s.config.limits.max_images),
        ));
    }
    let model = body
        .get("override_settings")
        .and_then(|o| o.get("sd_model_checkpoint"))
        .and_then(Value::as_str)
        .map(|m| strip_hash(m).to_string());
    let mut req = GenerateRequest {
        prompt: prompt.clone(),
        negative_prompt: (!negative.is_empty()).then(|| negative.clone()),
        num_inference_steps: count(body, "steps")?.unwrap_or(4),
        guidance_scale: num(body, "cfg_scale")?,
        width: count(body, "width")?,
        height: count(body, "height")?,
        // Not A1111's: LCMScheduler's schedule length, for more steps than its default 50.
        original_inference_steps: count(body, "original_inference_steps")?,
        ..Default::default()
    };
    let mut strength = None;
    let mut init = None;
    if img2img {
        let first = match body.get("init_images") {
            Some(Value::Array(a)) => a.first().and_then(Value::as_str),
            _ => None,
        };
        let first = first.ok_or_else(|| ApiError::bad(SHAPE, "init_images: give one base64 image"))?;
        let image = image_from_base64(SHAPE, "init_images", first, max)?;
        strength = Some(num(body, "denoising_strength")?.unwrap_or(0.75));
        req.strength = strength;
        if let Some(m) = text(body, "mask")?.filter(|m| !m.is_empty()) {
            let mut mask = image_from_base64(SHAPE, "mask", &m, max)?.to_grayscale();
            if (mask.width, mask.height) != (image.width, image.height) {
                mask = mask.resize_lanczos(image.width, image.height);
            }
            let invert = num(body, "inpainting_mask_invert")?.unwrap_or(0.0) != 0.0;
            if invert {
                mask.pixels.iter_mut().for_each(|p| *p = 255 - *p);
            }
            let blur = num(body, "mask_blur")?.unwrap_or(4.0);
            req.mask_image = Some(input::blur_mask(&mask, blur));
        }
        init = Some(image.clone());
        req.image = Some(image);
    }
    let mut setup = Setup { loras, ..Default::default() };
    let units =
        body.pointer("/alwayson_scripts/controlnet/args").and_then(Value::as_array).cloned().unwrap_or_default();
    for (i, unit) in units.iter().enumerate() {
        if unit.get("enabled").and_then(Value::as_bool) == Some(false) {
            continue;
        }
        let model = text(unit, "model")?.unwrap_or_default();
        let model = strip_hash(&model).to_string();
        if model.is_empty() || model.eq_ignore_ascii_case("none") {
            continue;
        }
        let field = format!("controlnet unit {i}");
        let image_text = match unit.get("image").or_else(|| unit.get("input_image")) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Object(o)) => o.get("image").and_then(Value::as_str).map(String::from),
            _ => None,
        };
        let image = match (image_text, &init) {
            (Some(t), _) => image_from_base64(SHAPE, &field, &t, max)?,
            (None, Some(init)) => init.clone(),
            (None, None) => return Err(ApiError::bad(SHAPE, format!("{field}: give an image"))),
        };
        let module = text(unit, "module")?.unwrap_or_else(|| "none".into());
        let image = match module.as_str() {
            "none" | "None" | "" => image,
            "canny" => {
                let low = num(unit, "threshold_a")?.unwrap_or(100.0);
                let high = num(unit, "threshold_b")?.unwrap_or(200.0);
                lcm::canny::canny(&image, low, high).map_err(|e| ApiError::engine(SHAPE, &e))?
            }
            other => {
                return Err(ApiError::bad(
                    SHAPE,
                    format!("{field}: module `{}` is not available (none, canny)", other.escape_debug()),
                ))
            }
        };
        setup.controlnets.push(model);
        req.controlnet.push(ControlNetInput {
            image,
            conditioning_scale: num(unit, "weight")?.unwrap_or(1.0),
            guidance_start: num(unit, "guidance_start")?.unwrap_or(0.0),
            guidance_end: num(unit, "guidance_end")?.unwrap_or(1.0),
        });
    }
    let requests = (0..images as u64).map(|i| GenerateRequest { seed: seed.wrapping_add(i), ..req.clone() }).collect();
    Ok(Parsed {
        input: JobInput { model, setup, requests, fps: 10, video: false },
        seed,
        prompt: raw_prompt,
        negative,
        width: req.width,
        height: req.height,
        strength,
    })
}

async fn txt2img(State(s): State<Server>, body: Result<Bytes, BytesRejection>) -> Result<Json<Value>, ApiError> {
    generate(s, body, false).await
}

async fn img2img(State(s): State<Server>, body: Result<Bytes, BytesRejection>) -> Result<Json<Value>, ApiError> {
    generate(s, body, true).await
}

async fn generate(s: Server, body: Result<Bytes, BytesRejection>, img2img: bool) -> Result<Json<Value>, ApiError> {
    let body: Value = parse_json(SHAPE, body)?;
    let p = parse(&s, &body, img2img)?;
    let job = s.submit(SHAPE, p.input)?;
    wait_or_cancel(&s, &job).await;
    let st = job.state();
    match st.status {
        Status::Succeeded => {}
        Status::Cancelled => return Err(ApiError::new(SHAPE, StatusCode::CONFLICT, "interrupted")),
        _ => {
            let (code, msg) = st.error.clone().unwrap_or((500, "failed".into()));
            return Err(ApiError::new(
                SHAPE,
                StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                msg,
            ));
        }
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let images: Vec<String> = st.outputs.iter().map(|o| b64.encode(o.bytes.as_slice())).collect();
    let first = &st.outputs[0];
    let seeds: Vec<u64> = st.outputs.iter().map(|o| o.seed).collect();
    let n = st.outputs.len();
    let info = json!({
        "prompt": p.prompt,
        "all_prompts": vec![p.prompt.clone(); n],
        "negative_prompt": p.negative,
        "all_negative_prompts": vec![p.negative.clone(); n],
        "seed": p.seed,
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": vec![-1; n],
        "subseed_strength": 0,
        "width": p.width.unwrap_or(first.image.width),
        "height": p.height.unwrap_or(first.image.height),
        "sampler_name": "LCM",
        "cfg_scale": first.guidance_scale,
        "steps": first.steps,
        "batch_size": n,
        "restore_faces": false,
        "sd_model_name": job.work.model.name,
        "sd_model_hash": Value::Null,
        "sd_vae_name": Value::Null,
        "denoising_strength": p.strength,
        "clip_skip": 1,
        "styles": [],
        "infotexts": st.outputs.iter().map(|o| o.parameters.clone()).collect::<Vec<_>>(),
        "job_timestamp": job.created_unix.to_string(),
        "index_of_first_image": 0,
        "is_using_inpainting_conditioning": false,
        "version": "lcm",
    });
    Ok(Json(json!({"images": images, "parameters": body, "info": info.to_string()})))
}

#[derive(Deserialize)]
struct ProgressQuery {
    skip_current_image: Option<bool>,
}

async fn progress(State(s): State<Server>, Query(q): Query<ProgressQuery>) -> Json<Value> {
    let waiting = s.queue.depth();
    let Some(job) = s.queue.running() else {
        return Json(json!({
            "progress": 0.0, "eta_relative": 0.0,
            "state": {"skipped": false, "interrupted": false, "job": "", "job_count": waiting, "job_timestamp": "0",
                      "job_no": 0, "sampling_step": 0, "sampling_steps": 0},
            "current_image": Value::Null, "textinfo": Value::Null,
        }));
    };
    let st = job.state();
    let progress = if st.total > 0 { st.step as f64 / st.total as f64 } else { 0.0 };
    let elapsed = st.started.map_or(0.0, |t| t.elapsed().as_secs_f64());
    let eta = if progress > 0.0 { elapsed / progress - elapsed } else { 0.0 };
    let image = match (q.skip_current_image, &st.preview_jpeg) {
        (Some(true), _) | (_, None) => Value::Null,
        (_, Some(jpeg)) => json!(base64::engine::general_purpose::STANDARD.encode(jpeg.as_slice())),
    };
    let per_image = (st.total / job.work.requests.len().max(1)).max(1);
    Json(json!({
        "progress": progress,
        "eta_relative": eta,
        "state": {
            "skipped": false,
            "interrupted": job.is_cancel_requested(),
            "job": job.id,
            "job_count": waiting + 1,
            "job_timestamp": job.created_unix.to_string(),
            "job_no": (st.step / per_image).min(job.work.requests.len().saturating_sub(1)),
            "sampling_step": st.step % per_image,
            "sampling_steps": per_image,
        },
        "current_image": image,
        "textinfo": Value::Null,
    }))
}

/// Interrupt the running job (it stops before its next step).
async fn interrupt(State(s): State<Server>) -> Json<Value> {
    if let Some(job) = s.queue.running() {
        s.cancel(&job);
    }
    Json(json!({}))
}

async fn sd_models(State(s): State<Server>) -> Json<Value> {
    let list: Vec<Value> = s
        .models
        .iter()
        .map(|m| {
            // Names only: a client never learns a path on the server.
            json!({"title": m.name, "model_name": m.name, "hash": Value::Null, "sha256": Value::Null,
                   "filename": m.name, "config": Value::Null})
        })
        .collect();
    Json(json!(list))
}

async fn options(State(s): State<Server>) -> Json<Value> {
    Json(json!({
        "sd_model_checkpoint": s.default_model().name,
        "sd_checkpoint_hash": Value::Null,
        "sd_vae": "Automatic",
        "samples_format": "png",
        "CLIP_stop_at_last_layers": 1,
        "live_previews_enable": true,
        "show_progress_every_n_steps": 1,
    }))
}

/// Only `sd_model_checkpoint` changes anything: the model requests get by default.
async fn set_options(State(s): State<Server>, body: Result<Bytes, BytesRejection>) -> Result<Json<Value>, ApiError> {
    let body: Value = parse_json(SHAPE, body)?;
    if let Some(name) = body.get("sd_model_checkpoint") {
        let name = name.as_str().ok_or_else(|| ApiError::bad(SHAPE, "sd_model_checkpoint: expected a string"))?;
        let i = input::find(SHAPE, "model", strip_hash(name), s.models.iter().map(|m| &m.name))?;
        *s.default_model.lock().unwrap_or_else(|e| e.into_inner()) = i;
    }
    Ok(Json(Value::Null))
}

async fn loras(State(s): State<Server>) -> Json<Value> {
    let mut names: Vec<&String> = s.models.iter().flat_map(|m| &m.loras).collect();
    names.sort();
    names.dedup();
    Json(json!(names.iter().map(|n| json!({"name": n, "alias": n, "path": n, "metadata": {}})).collect::<Vec<_>>()))
}

async fn refreshed() -> Json<Value> {
    Json(Value::Null)
}

async fn samplers() -> Json<Value> {
    Json(json!([{"name": "LCM", "aliases": ["k_lcm", "lcm"], "options": {}}]))
}

async fn schedulers() -> Json<Value> {
    Json(json!([{"name": "lcm", "label": "LCM", "aliases": Value::Null, "default_rho": -1, "need_inner_model": false}]))
}

async fn empty_list() -> Json<Value> {
    Json(json!([]))
}

async fn embeddings() -> Json<Value> {
    Json(json!({"loaded": {}, "skipped": {}}))
}

async fn controlnet_models(State(s): State<Server>) -> Json<Value> {
    let mut names: Vec<&String> = s.models.iter().flat_map(|m| &m.controlnet_names).collect();
    names.sort();
    names.dedup();
    Json(json!({"model_list": names}))
}

async fn controlnet_modules() -> Json<Value> {
    Json(json!({
        "module_list": ["none", "canny"],
        "module_detail": {
            "none": {"model_free": false, "sliders": []},
            "canny": {"model_free": false, "sliders": [
                {"name": "Canny Low Threshold", "value": 100, "min": 1, "max": 255},
                {"name": "Canny High Threshold", "value": 200, "min": 1, "max": 255}]},
        },
    }))
}
