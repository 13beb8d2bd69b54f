//! AUTOMATIC1111's API as its clients use it (SillyTavern: options -> sd-models -> txt2img while
//! polling progress, interrupt), and its error shape.
mod common;

use common::*;
use serde_json::{json, Value};

fn slow_config() -> lcm_server::config::ServerConfig {
    let mut c = config();
    c.limits.max_steps = 1000;
    c
}

fn long_body() -> Value {
    json!({"prompt": "x", "seed": 1, "steps": 400, "width": 64, "height": 64,
           "override_settings": {"sd_model_checkpoint": "tiny-lcm"}, "original_inference_steps": 1000})
}

#[test]
fn lists_options_and_model_switch() {
    let ts = TestServer::start(config());
    let opts = get(&ts.url("/sdapi/v1/options")).json();
    assert_eq!(opts["sd_model_checkpoint"], "tiny-lcm");
    let models = get(&ts.url("/sdapi/v1/sd-models")).json();
    assert_eq!(
        models.as_array().unwrap().iter().map(|m| m["title"].as_str().unwrap()).collect::<Vec<_>>(),
        ["tiny-lcm", "tiny-sd"]
    );
    assert!(!models.to_string().contains('/'), "no paths: {models}");
    for list in ["samplers", "schedulers", "sd-vae", "upscalers", "loras"] {
        let r = get(&ts.url(&format!("/sdapi/v1/{list}")));
        assert_eq!(r.status, 200);
        assert!(r.json().is_array(), "{list}");
    }
    assert_eq!(get(&ts.url("/controlnet/module_list")).json()["module_list"], json!(["none", "canny"]));
    // sd_model_checkpoint switches the default model (A1111 titles carry a hash).
    let r = post_json(&ts.url("/sdapi/v1/options"), &json!({"sd_model_checkpoint": "tiny-sd [0123abcd]", "other": 1}));
    assert_eq!(r.status, 200);
    assert_eq!(get(&ts.url("/sdapi/v1/options")).json()["sd_model_checkpoint"], "tiny-sd");
    let r = post_json(&ts.url("/sdapi/v1/txt2img"), &json!({"prompt": "a cat", "seed": -1, "steps": 1}));
    assert_eq!(r.status, 200);
    let info: Value = serde_json::from_str(r.json()["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["sd_model_name"], "tiny-sd");
    assert!(info["seed"].as_u64().is_some());
    // Unknown and path-like names, in A1111's error shape.
    let r = post_json(&ts.url("/sdapi/v1/options"), &json!({"sd_model_checkpoint": "../../etc"}));
    assert_eq!(r.status, 400);
    assert!(r.json()["detail"].as_str().unwrap().contains("not a name"));
    let r = post_json(
        &ts.url("/sdapi/v1/txt2img"),
        &json!({"prompt": "x", "override_settings": {"sd_model_checkpoint": "sdxl"}}),
    );
    assert_eq!(r.status, 404);
    let r = post_json(&ts.url("/sdapi/v1/txt2img"), &json!({"prompt": "x <lora:nope:1>"}));
    assert_eq!(r.status, 404);
    assert!(r.json()["detail"].as_str().unwrap().contains("no LoRA named `nope`"));
    let r = post_json(&ts.url("/sdapi/v1/img2img"), &json!({"prompt": "x", "init_images": ["not base64!"]}));
    assert_eq!(r.status, 400);
    let r = post_raw(&ts.url("/sdapi/v1/txt2img"), "application/json", b"[1,2");
    assert_eq!(r.status, 400);
    assert!(r.json()["detail"].is_string());
    let unit = json!({"module": "depth", "model": "x", "image": b64(b"x")});
    let r = post_json(
        &ts.url("/sdapi/v1/txt2img"),
        &json!({"prompt": "x", "alwayson_scripts": {"controlnet": {"args": [unit]}}}),
    );
    assert_eq!(r.status, 400);
}

#[test]
fn inpainting_with_an_inverted_mask() {
    let ts = TestServer::start(config());
    let photo = std::fs::read(fixtures().join("images/photo_45x37.png")).unwrap();
    let mask = lcm::image_processor::Image8::read(&fixtures().join("images/mask_45x37.png")).unwrap();
    // The inverted mask, inverted back by the server, is the fixture's mask.
    let inverted: Vec<u8> = mask.pixels.iter().map(|p| 255 - p).collect();
    let mut png = Vec::new();
    let channels = if mask.channels == 1 { image::ExtendedColorType::L8 } else { image::ExtendedColorType::Rgb8 };
    image::ImageEncoder::write_image(
        image::codecs::png::PngEncoder::new(&mut png),
        &inverted,
        mask.width as u32,
        mask.height as u32,
        channels,
    )
    .unwrap();
    let r = post_json(
        &ts.url("/sdapi/v1/img2img"),
        &json!({"prompt": "a lake", "seed": 4, "steps": 4, "denoising_strength": 1.0, "init_images": [b64(&photo)],
                "mask": b64(&png), "inpainting_mask_invert": 1, "mask_blur": 0,
                "override_settings": {"sd_model_checkpoint": "tiny-sd"}}),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.bytes));
    let req = lcm::pipelines::GenerateRequest {
        prompt: "a lake".into(),
        seed: 4,
        strength: Some(1.0),
        image: Some(lcm::image_processor::Image8::read(&fixtures().join("images/photo_45x37.png")).unwrap()),
        mask_image: Some(mask.to_grayscale()),
        ..Default::default()
    };
    assert_eq!(unb64(r.json()["images"][0].as_str().unwrap()), library_png("models/tiny-sd", &req)[0]);
}

#[test]
fn progress_and_interrupt() {
    let ts = std::sync::Arc::new(TestServer::start(slow_config()));
    let idle = get(&ts.url("/sdapi/v1/progress")).json();
    assert_eq!(idle["progress"], 0.0);
    let client = {
        let ts = ts.clone();
        std::thread::spawn(move || post_json(&ts.url("/sdapi/v1/txt2img"), &long_body()))
    };
    // Poll as SillyTavern does until steps show, with a preview.
    let mut seen = None;
    for _ in 0..2000 {
        let p = get(&ts.url("/sdapi/v1/progress")).json();
        if p["state"]["sampling_step"].as_u64().unwrap_or(0) > 0 && p["current_image"].is_string() {
            seen = Some(p);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let p = seen.expect("progress with a preview");
    assert!(p["progress"].as_f64().unwrap() > 0.0 && p["progress"].as_f64().unwrap() < 1.0);
    assert_eq!(p["state"]["sampling_steps"], 400);
    assert_eq!(&unb64(p["current_image"].as_str().unwrap())[..2], [0xff, 0xd8]);
    assert_eq!(post_json(&ts.url("/sdapi/v1/interrupt"), &json!({})).status, 200);
    let r = client.join().unwrap();
    assert_eq!(r.status, 409, "{}", String::from_utf8_lossy(&r.bytes));
    assert_eq!(get(&ts.url("/sdapi/v1/progress")).json()["state"]["job_count"], 0);
}

#[test]
fn a_client_that_disconnects_cancels_its_job() {
    let ts = TestServer::start(slow_config());
    let agent = ureq::AgentBuilder::new().timeout(std::time::Duration::from_millis(300)).build();
    let r = agent.post(&ts.url("/sdapi/v1/txt2img")).send_json(long_body());
    assert!(matches!(r, Err(ureq::Error::Transport(_))), "expected a timeout");
    let job = || {
        let jobs = get(&ts.url("/api/v1/jobs")).json();
        jobs["jobs"][0].clone()
    };
    let mut status = String::new();
    for _ in 0..2000 {
        status = job()["status"].as_str().unwrap().to_string();
        if status != "running" && status != "queued" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(status, "cancelled");
    assert!(job()["step"].as_u64().unwrap() < 400);
}
