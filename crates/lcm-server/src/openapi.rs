//! `GET /openapi.json`: the OpenAPI 3.1 description of the routes.
//!
//! Written by hand as JSON rather than derived (utoipa): the request types are few, the
//! AUTOMATIC1111 and OpenAI bodies are read leniently and documented by their own projects, and
//! a derive would put annotations on every handler for little gain. A test calls every
//! documented path, so the document cannot name a route the router lacks.

use axum::Json;
use serde_json::{json, Value};

fn op(summary: &str, tag: &str) -> Value {
    json!({"summary": summary, "tags": [tag], "responses": {"200": {"description": "OK"}, "4XX": {"$ref": "#/components/responses/Error"}}})
}

fn with_body(mut op: Value, schema: Value, content_type: &str) -> Value {
    op["requestBody"] = json!({"required": true, "content": {content_type: {"schema": schema}}});
    op
}

fn id_param() -> Value {
    json!([{"name": "id", "in": "path", "required": true, "schema": {"type": "string"}}])
}

/// The document.
pub fn spec() -> Value {
    let image = json!({"type": "string", "description": "base64 or a data: URL (PNG, JPEG, WebP, BMP, TIFF)"});
    let job_request = json!({
        "type": "object",
        "required": ["prompt"],
        "additionalProperties": false,
        "properties": {
            "model": {"type": "string", "description": "a name from /api/v1/models (default: the first model)"},
            "prompt": {"type": "string"},
            "negative_prompt": {"type": "string"},
            "num_inference_steps": {"type": "integer", "minimum": 1, "default": 4},
            "guidance_scale": {"type": "number", "description": "default: the pipeline's"},
            "width": {"type": "integer"},
            "height": {"type": "integer"},
            "seed": {"type": "integer", "minimum": 0, "description": "random when absent"},
            "num_images_per_prompt": {"type": "integer", "minimum": 1, "default": 1},
            "original_inference_steps": {"type": "integer"},
            "strength": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
            "image": image,
            "mask_image": {"type": "string", "description": "white = repaint; base64 or a data: URL"},
            "loras": {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}, "weight": {"type": "number", "default": 1}}}},
            "controlnet": {"type": "array", "items": {"type": "object", "required": ["name", "image"], "properties": {
                "name": {"type": "string"}, "image": image, "conditioning_scale": {"type": "number", "default": 1},
                "guidance_start": {"type": "number", "default": 0}, "guidance_end": {"type": "number", "default": 1},
                "canny": {"oneOf": [{"type": "boolean"}, {"type": "object", "properties": {"low": {"type": "number"}, "high": {"type": "number"}}}]}}}},
            "guess_mode": {"type": "boolean"},
            "t2i_adapter": {"type": "array", "items": {"type": "object", "required": ["name", "image"], "properties": {
                "name": {"type": "string"}, "image": image, "conditioning_scale": {"type": "number", "default": 1}, "canny": {}}}},
            "adapter_conditioning_factor": {"type": "number"},
            "num_frames": {"type": "integer", "description": "AnimateDiff: frames per video (needs the motion adapter's model)"},
            "fps": {"type": "integer", "default": 10},
        }
    });
    let job = json!({
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "status": {"enum": ["queued", "running", "succeeded", "failed", "cancelled"]},
            "model": {"type": "string"},
            "queue_position": {"type": ["integer", "null"]},
            "step": {"type": "integer"},
            "total_steps": {"type": "integer"},
            "error": {"type": "object", "properties": {"message": {"type": "string"}, "status": {"type": "integer"}}},
            "images": {"type": "array", "items": {"type": "object", "properties": {
                "url": {"type": "string"}, "content_type": {"type": "string"}, "seed": {"type": "integer"},
                "width": {"type": "integer"}, "height": {"type": "integer"}, "parameters": {"type": "string"}}}},
        }
    });
    let mut create = with_body(
        op("Queue a generation job (202)", "native"),
        json!({"$ref": "#/components/schemas/JobRequest"}),
        "application/json",
    );
    create["responses"] = json!({"202": {"description": "queued", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Job"}}}},
                                  "429": {"description": "the queue is full (Retry-After)"}, "4XX": {"$ref": "#/components/responses/Error"}});
    let mut events = op("Server-Sent Events: queued, started, step (one per denoising step; `image`: a base64 JPEG preview when the server has --preview-vae), then succeeded | failed | cancelled", "native");
    events["parameters"] = id_param();
    let mut status = op("A job's status, queue position and progress", "native");
    status["parameters"] = id_param();
    let mut cancel = op("Cancel: a queued job at once, a running one before its next step", "native");
    cancel["parameters"] = id_param();
    let mut image_op =
        op("Image k of a succeeded job: PNG with the `parameters` text (GIF for a video); ?format=jpeg|webp", "native");
    image_op["parameters"] = json!([
        {"name": "id", "in": "path", "required": true, "schema": {"type": "string"}},
        {"name": "k", "in": "path", "required": true, "schema": {"type": "integer"}},
        {"name": "format", "in": "query", "schema": {"enum": ["png", "jpeg", "webp"]}}]);
    let a1111_body = json!({"type": "object", "description": "AUTOMATIC1111's StableDiffusionProcessing fields (prompt, negative_prompt, seed, steps, cfg_scale, width, height, batch_size, n_iter, override_settings.sd_model_checkpoint, alwayson_scripts.controlnet.args; img2img: init_images, mask, denoising_strength, mask_blur, inpainting_mask_invert)"});
    let openai_body = json!({"type": "object", "required": ["prompt"], "description": "OpenAI's fields (model, prompt, n, size, response_format, output_format, stream, partial_images) plus negative_prompt, seed, num_inference_steps, guidance_scale"});
    let native = json!({
            "/health": {"get": {"summary": "Liveness, queue depth (no key needed)", "tags": ["service"], "security": [], "responses": {"200": {"description": "OK"}}}},
            "/metrics": {"get": op("Prometheus text: queue depth, jobs by outcome, job and step latency", "service")},
            "/openapi.json": {"get": op("This document", "service")},
            "/api/v1/jobs": {"post": create, "get": op("Jobs kept now", "native")},
            "/api/v1/jobs/{id}": {"get": status},
            "/api/v1/jobs/{id}/events": {"get": events},
            "/api/v1/jobs/{id}/cancel": {"post": cancel},
            "/api/v1/jobs/{id}/images/{k}": {"get": image_op},
            "/api/v1/models": {"get": op("Models with their LoRAs, ControlNets and T2I-Adapters", "native")}
    });
    let a1111 = json!({
            "/sdapi/v1/txt2img": {"post": with_body(op("Text to image (waits; a client that disconnects cancels)", "a1111"), a1111_body.clone(), "application/json")},
            "/sdapi/v1/img2img": {"post": with_body(op("Image to image and inpainting", "a1111"), a1111_body, "application/json")},
            "/sdapi/v1/progress": {"get": op("Progress of the running job, with the latest preview", "a1111")},
            "/sdapi/v1/interrupt": {"post": op("Stop the running job", "a1111")},
            "/sdapi/v1/skip": {"post": op("Same as interrupt", "a1111")},
            "/sdapi/v1/sd-models": {"get": op("Models", "a1111")},
            "/sdapi/v1/options": {"get": op("Options", "a1111"), "post": op("Set options: sd_model_checkpoint selects the default model", "a1111")},
            "/sdapi/v1/loras": {"get": op("LoRAs", "a1111")},
            "/sdapi/v1/refresh-loras": {"post": op("No-op: LoRAs load at start", "a1111")},
            "/sdapi/v1/refresh-checkpoints": {"post": op("No-op: models load at start", "a1111")},
            "/sdapi/v1/samplers": {"get": op("LCM", "a1111")},
            "/sdapi/v1/schedulers": {"get": op("LCM", "a1111")},
            "/sdapi/v1/sd-vae": {"get": op("Empty", "a1111")},
            "/sdapi/v1/upscalers": {"get": op("Empty", "a1111")},
            "/sdapi/v1/latent-upscale-modes": {"get": op("Empty", "a1111")},
            "/sdapi/v1/embeddings": {"get": op("Empty", "a1111")},
            "/controlnet/model_list": {"get": op("ControlNets", "a1111")},
            "/controlnet/module_list": {"get": op("Preprocessors: none, canny", "a1111")}
    });
    let openai = json!({
            "/v1/images/generations": {"post": with_body(op("Generate (stream: SSE image_generation.partial_image / .completed)", "openai"), openai_body, "application/json")},
            "/v1/images/edits": {"post": with_body(op("Edit: image, optional mask (transparent = repaint); without a mask, image to image", "openai"),
                json!({"type": "object", "required": ["image", "prompt"], "properties": {"image": {"type": "string", "format": "binary"}, "mask": {"type": "string", "format": "binary"}, "prompt": {"type": "string"}}}),
                "multipart/form-data")},
            "/v1/models": {"get": op("Models", "openai")},
            "/v1/models/{id}": {"get": {"summary": "A model", "tags": ["openai"], "parameters": id_param(), "responses": {"200": {"description": "OK"}}}}
    });
    json!({
        "openapi": "3.1.0",
        "info": {"title": "lcm serve", "version": env!("CARGO_PKG_VERSION"),
                 "description": "Latent Consistency Model generation: a native job API, AUTOMATIC1111's /sdapi/v1 subset and OpenAI's Images API on one queue."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}, "basic": {"type": "http", "scheme": "basic"}},
            "schemas": {"JobRequest": job_request, "Job": job},
            "responses": {"Error": {"description": "an error in the API's shape: native {error: {message, status}}, A1111 {detail, ...}, OpenAI {error: {message, type, param, code}}"}},
        },
        "security": [{"bearer": []}, {"basic": []}],
        "paths": merge([native, a1111, openai]),
    })
}

/// One object of the keys of several.
fn merge<const N: usize>(parts: [Value; N]) -> Value {
    let mut out = serde_json::Map::new();
    for p in parts {
        if let Value::Object(m) = p {
            out.extend(m);
        }
    }
    Value::Object(out)
}

pub async fn document() -> Json<Value> {
    Json(spec())
}
