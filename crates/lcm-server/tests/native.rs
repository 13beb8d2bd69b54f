//! The native API over real HTTP: jobs, events, cancel, the queue's limits, errors.
mod common;

use common::*;
use serde_json::json;

#[test]
fn job_events_and_image_match_the_library() {
    let ts = TestServer::start(config());
    let r =
        post_json(&ts.url("/api/v1/jobs"), &json!({"prompt": "a photo of a cat", "seed": 0, "num_inference_steps": 3}));
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.bytes));
    let id = r.json()["id"].as_str().unwrap().to_string();
    let events = sse(&ts.url(&format!("/api/v1/jobs/{id}/events")));
    let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(kinds, ["queued", "started", "step", "step", "step", "succeeded"]);
    for (i, (_, data)) in events[2..5].iter().enumerate() {
        assert_eq!((data["step"].as_u64(), data["total"].as_u64()), (Some(i as u64 + 1), Some(3)));
        let jpeg = unb64(data["image"].as_str().expect("a preview per step"));
        assert_eq!(&jpeg[..2], [0xff, 0xd8]);
    }
    let job = get(&ts.url(&format!("/api/v1/jobs/{id}"))).json();
    assert_eq!(job["status"], "succeeded");
    assert_eq!((job["step"].as_u64(), job["total_steps"].as_u64()), (Some(3), Some(3)));
    let img = get(&ts.url(&format!("/api/v1/jobs/{id}/images/0")));
    assert_eq!((img.status, img.content_type.as_str()), (200, "image/png"));
    let req = lcm::pipelines::GenerateRequest {
        prompt: "a photo of a cat".into(),
        num_inference_steps: 3,
        ..Default::default()
    };
    assert_eq!(img.bytes, library_png("models/tiny-lcm", &req)[0]);
    // The events of a finished job replay in full.
    assert_eq!(sse(&ts.url(&format!("/api/v1/jobs/{id}/events"))).len(), 6);
    let jpeg = get(&ts.url(&format!("/api/v1/jobs/{id}/images/0?format=jpeg")));
    assert_eq!((jpeg.status, jpeg.content_type.as_str()), (200, "image/jpeg"));
    assert_eq!(get(&ts.url(&format!("/api/v1/jobs/{id}/images/1"))).status, 404);

    let models = get(&ts.url("/api/v1/models")).json();
    assert_eq!(models["models"][0]["name"], "tiny-lcm");
    assert_eq!(models["models"][1]["name"], "tiny-sd");
}

#[test]
fn image_to_image_and_inpainting_by_name() {
    let ts = TestServer::start(config());
    let photo = std::fs::read(fixtures().join("images/photo_45x37.png")).unwrap();
    let mask = std::fs::read(fixtures().join("images/mask_45x37.png")).unwrap();
    let body = json!({"model": "tiny-sd", "prompt": "a lake", "seed": 3, "image": b64(&photo), "strength": 0.5,
        "mask_image": format!("data:image/png;base64,{}", b64(&mask))});
    let r = post_json(&ts.url("/api/v1/jobs"), &body);
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.bytes));
    let id = r.json()["id"].as_str().unwrap().to_string();
    assert_eq!(wait_job(&ts, &id)["status"], "succeeded");
    let got = get(&ts.url(&format!("/api/v1/jobs/{id}/images/0"))).bytes;
    let req = lcm::pipelines::GenerateRequest {
        prompt: "a lake".into(),
        seed: 3,
        strength: Some(0.5),
        image: Some(lcm::image_processor::Image8::read(&fixtures().join("images/photo_45x37.png")).unwrap()),
        mask_image: Some(lcm::image_processor::Image8::read(&fixtures().join("images/mask_45x37.png")).unwrap()),
        ..Default::default()
    };
    assert_eq!(got, library_png("models/tiny-sd", &req)[0]);
}

/// A long job: many steps of the tiny model.
fn long_job(ts: &TestServer) -> String {
    let r = post_json(
        &ts.url("/api/v1/jobs"),
        &json!({"prompt": "x", "seed": 1, "num_inference_steps": 400, "original_inference_steps": 1000, "width": 64, "height": 64}),
    );
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.bytes));
    r.json()["id"].as_str().unwrap().to_string()
}

fn slow_config(queue: usize) -> lcm_server::config::ServerConfig {
    let mut c = config();
    c.queue = queue;
    c.limits.max_steps = 1000;
    c.preview_vae = None;
    c
}

#[test]
fn cancel_queued_and_running_and_queue_full() {
    let ts = TestServer::start(slow_config(1));
    let a = long_job(&ts);
    wait_running(&ts, &a);
    let b = long_job(&ts);
    assert_eq!(get(&ts.url(&format!("/api/v1/jobs/{b}"))).json()["queue_position"], 0);
    // The queue holds one job: a third is refused, with Retry-After, in the native shape.
    let full = post_json(&ts.url("/api/v1/jobs"), &json!({"prompt": "x"}));
    assert_eq!(full.status, 429);
    assert!(full.retry_after.is_some());
    assert!(full.json()["error"]["message"].as_str().unwrap().contains("queue is full"));
    // A queued job is cancelled at once.
    let c = post_json(&ts.url(&format!("/api/v1/jobs/{b}/cancel")), &json!({}));
    assert_eq!(c.json()["status"], "cancelled");
    let kinds: Vec<String> = sse(&ts.url(&format!("/api/v1/jobs/{b}/events"))).into_iter().map(|e| e.0).collect();
    assert_eq!(kinds, ["queued", "cancelled"]);
    // A running one stops before its next step.
    post_json(&ts.url(&format!("/api/v1/jobs/{a}/cancel")), &json!({}));
    let done = wait_job(&ts, &a);
    assert_eq!(done["status"], "cancelled");
    assert!(done["step"].as_u64().unwrap() < 400);
    assert_eq!(get(&ts.url(&format!("/api/v1/jobs/{a}/images/0"))).status, 409);
    let metrics = String::from_utf8(get(&ts.url("/metrics")).bytes).unwrap();
    assert!(metrics.contains("lcm_jobs_total{outcome=\"cancelled\"} 2"), "{metrics}");
    assert!(metrics.contains("lcm_requests_rejected_total{reason=\"queue_full\"} 1"), "{metrics}");
    assert!(metrics.contains("lcm_queue_depth 0"), "{metrics}");
}

/// Send raw bytes, read the answer until the server closes (whatever it managed to send).
fn raw_request(ts: &TestServer, text: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(ts.base.trim_start_matches("http://")).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
    let _ = s.write_all(text.as_bytes());
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        // One response is enough; the connection may stay open.
        if out.windows(4).any(|w| w == b"\r\n\r\n") && String::from_utf8_lossy(&out).contains("}") {
            break;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A PNG that claims 60000x60000 pixels: refused from its header, never allocated.
fn huge_png_header() -> Vec<u8> {
    fn crc32(data: &[u8]) -> u32 {
        let mut c = !0u32;
        for &b in data {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
            }
        }
        !c
    }
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend(60000u32.to_be_bytes());
    ihdr.extend(60000u32.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(13u32.to_be_bytes());
    png.extend(&ihdr);
    png.extend(crc32(&ihdr).to_be_bytes());
    // The decoder reads the header up to the first image data.
    png.extend(0u32.to_be_bytes());
    png.extend(b"IDAT");
    png.extend(crc32(b"IDAT").to_be_bytes());
    png
}

#[test]
fn bad_requests_are_clean_json_errors() {
    let mut c = config();
    c.limits.max_body_bytes = 1 << 20;
    let ts = TestServer::start(c);
    let url = ts.url("/api/v1/jobs");
    let photo = std::fs::read(fixtures().join("images/photo_45x37.png")).unwrap();
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (b"{not json".to_vec(), 400, "invalid JSON"),
        (json!({"prompt": "x", "model": "nope"}).to_string().into_bytes(), 404, "no model named `nope`"),
        (json!({"prompt": "x", "model": "../tiny-sd"}).to_string().into_bytes(), 400, "not a name"),
        (json!({"prompt": "x", "model": "/etc"}).to_string().into_bytes(), 400, "not a name"),
        (json!({"prompt": "x", "loras": [{"name": "missing"}]}).to_string().into_bytes(), 404, "no LoRA"),
        (json!({"prompt": "x", "width": 1_000_000, "height": 1_000_000}).to_string().into_bytes(), 400, "limit"),
        (json!({"prompt": "x", "num_inference_steps": 10_000}).to_string().into_bytes(), 400, "limit"),
        (json!({"prompt": "x", "num_images_per_prompt": 100}).to_string().into_bytes(), 400, "limit"),
        (json!({"prompt": "x", "width": 33}).to_string().into_bytes(), 400, "multiple of"),
        (json!({"prompt": "x", "num_inference_steps": 0}).to_string().into_bytes(), 400, "at least 1"),
        (json!({"prompt": "x", "image": "%%%not base64"}).to_string().into_bytes(), 400, "base64"),
        (json!({"prompt": "x", "image": b64(b"hello, not an image")}).to_string().into_bytes(), 400, "not an image"),
        (json!({"prompt": "x", "strength": 0.5}).to_string().into_bytes(), 400, "strength needs an image"),
        (json!({"prompt": "x", "unknown_field": 1}).to_string().into_bytes(), 400, "unknown field"),
        (json!({"prompt": "x", "num_frames": 2}).to_string().into_bytes(), 400, "no video model"),
        (json!({"prompt": "x", "image": b64(&huge_png_header())}).to_string().into_bytes(), 400, "exceeds"),
        (
            json!({"prompt": "x", "controlnet": [{"name": "sd", "image": b64(&photo)}]}).to_string().into_bytes(),
            404,
            "no ControlNet",
        ),
    ];
    for (body, status, text) in cases {
        let r = post_raw(&url, "application/json", &body);
        assert_eq!(r.status, status, "{}", String::from_utf8_lossy(&r.bytes));
        let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(msg.contains(text), "`{text}` not in `{msg}`");
        assert!(!msg.contains('\n'));
    }
    // An oversized body is refused from its Content-Length, before it is sent.
    let r = raw_request(
        &ts,
        "POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2097152\r\n\r\n",
    );
    assert!(r.starts_with("HTTP/1.1 413"), "{r}");
    assert!(r.contains("exceeds this server's limit"), "{r}");
    // A chunked one while it is read.
    let chunk = format!("{:x}\r\n{}\r\n", 1 << 20, "x".repeat(1 << 20));
    let head =
        "POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    let r = raw_request(&ts, &format!("{head}{chunk}{chunk}0\r\n\r\n"));
    assert!(r.is_empty() || r.starts_with("HTTP/1.1 413"), "{r}");
    assert_eq!(get(&ts.url("/api/v1/jobs/does-not-exist")).status, 404);
    assert_eq!(get(&ts.url("/nowhere")).json()["error"]["status"], 404);
    // Still serving.
    assert_eq!(get(&ts.url("/health")).status, 200);
}

#[test]
fn many_clients_against_a_small_queue() {
    let ts = std::sync::Arc::new(TestServer::start(ServerConfig { queue: 8, ..config() }));
    let expected: Vec<Vec<u8>> = (0..3)
        .map(|seed| {
            let req = lcm::pipelines::GenerateRequest {
                prompt: "many".into(),
                seed,
                num_inference_steps: 2,
                ..Default::default()
            };
            library_png("models/tiny-lcm", &req).remove(0)
        })
        .collect();
    let expected = std::sync::Arc::new(expected);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let health = {
        let (ts, stop) = (ts.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut worst = std::time::Duration::ZERO;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let t = std::time::Instant::now();
                assert_eq!(get(&ts.url("/health")).status, 200);
                worst = worst.max(t.elapsed());
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            worst
        })
    };
    let clients: Vec<_> = (0..100)
        .map(|i| {
            let (ts, expected) = (ts.clone(), expected.clone());
            std::thread::spawn(move || {
                let seed = i % 3;
                let r = post_json(
                    &ts.url("/api/v1/jobs"),
                    &json!({"prompt": "many", "seed": seed, "num_inference_steps": 2}),
                );
                match r.status {
                    202 => {
                        let id = r.json()["id"].as_str().unwrap().to_string();
                        assert_eq!(wait_job(&ts, &id)["status"], "succeeded");
                        let img = get(&ts.url(&format!("/api/v1/jobs/{id}/images/0"))).bytes;
                        assert!(img == expected[seed as usize], "client {i}: wrong image");
                        true
                    }
                    429 => false,
                    s => panic!("client {i}: status {s}"),
                }
            })
        })
        .collect();
    let accepted = clients.into_iter().map(|c| c.join().unwrap()).filter(|a| *a).count();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let worst = health.join().unwrap();
    assert!(accepted >= 5, "{accepted} accepted");
    assert!(worst < std::time::Duration::from_millis(100), "/health took {worst:?}");
}

use lcm_server::config::ServerConfig;

#[test]
fn shutdown_finishes_the_running_job_and_cancels_the_queued() {
    let mut ts = TestServer::start(slow_config(4));
    let r = post_json(
        &ts.url("/api/v1/jobs"),
        &json!({"prompt": "x", "seed": 1, "num_inference_steps": 60, "original_inference_steps": 100}),
    );
    let a = r.json()["id"].as_str().unwrap().to_string();
    wait_running(&ts, &a);
    let b = long_job(&ts);
    let server = ts.server.clone();
    ts.stop();
    let job = |id: &str| server.jobs.lock().unwrap().get(id).cloned().unwrap();
    assert_eq!(job(&a).state().status, lcm_server::jobs::Status::Succeeded);
    assert_eq!(job(&b).state().status, lcm_server::jobs::Status::Cancelled);
}

/// Every path of /openapi.json is served with its documented methods.
#[test]
fn openapi_names_only_served_routes() {
    let ts = TestServer::start(config());
    let doc = get(&ts.url("/openapi.json")).json();
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() > 25);
    for (path, ops) in paths {
        let concrete = path.replace("{id}", "none").replace("{k}", "0");
        for method in ops.as_object().unwrap().keys() {
            let r = match method.as_str() {
                "get" if path.ends_with("/events") => continue,
                "get" => get(&ts.url(&concrete)),
                "post" => post_raw(&ts.url(&concrete), "application/json", b"{}"),
                m => panic!("{m}"),
            };
            let text = String::from_utf8_lossy(&r.bytes);
            assert!(r.status != 405 && !text.contains("no route"), "{method} {path}: {} {text}", r.status);
        }
    }
}

#[test]
fn output_dir_gets_every_image() {
    let dir = tempfile::tempdir().unwrap();
    let ts = TestServer::start(ServerConfig { output_dir: Some(dir.path().to_path_buf()), ..config() });
    let r = post_json(
        &ts.url("/api/v1/jobs"),
        &json!({"prompt": "x", "num_inference_steps": 1, "num_images_per_prompt": 2}),
    );
    let id = r.json()["id"].as_str().unwrap().to_string();
    assert_eq!(wait_job(&ts, &id)["status"], "succeeded");
    for k in 0..2 {
        let served = get(&ts.url(&format!("/api/v1/jobs/{id}/images/{k}"))).bytes;
        assert_eq!(std::fs::read(dir.path().join(format!("{id}-{k}.png"))).unwrap(), served);
    }
}

#[test]
fn finished_jobs_expire() {
    let ts = TestServer::start(ServerConfig { job_ttl: std::time::Duration::from_millis(200), ..config() });
    let r = post_json(&ts.url("/api/v1/jobs"), &json!({"prompt": "x", "num_inference_steps": 1}));
    let id = r.json()["id"].as_str().unwrap().to_string();
    assert_eq!(wait_job(&ts, &id)["status"], "succeeded");
    let mut gone = false;
    for _ in 0..300 {
        if get(&ts.url(&format!("/api/v1/jobs/{id}"))).status == 404 {
            gone = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(gone, "job kept past its time");
}

/// ControlNet (with the built-in Canny) and T2I-Adapter jobs by name, one after the other on one
/// model: the control models are swapped between jobs, the images are the library's.
#[test]
fn controlnet_and_t2i_adapter_jobs() {
    let mut c = config();
    c.controlnets = vec![source("controlnets/sd")];
    c.adapters = vec![source("adapters/full_sd")];
    let ts = TestServer::start(c);
    let photo_path = fixtures().join("images/photo_45x37.png");
    let photo = lcm::image_processor::Image8::read(&photo_path).unwrap();
    let photo_b64 = b64(&std::fs::read(&photo_path).unwrap());
    let bodies = [
        json!({"model": "tiny-sd", "prompt": "a lake", "seed": 2, "num_inference_steps": 2, "guidance_scale": 1.0,
               "controlnet": [{"name": "sd", "image": photo_b64, "conditioning_scale": 0.7, "canny": true}]}),
        json!({"model": "tiny-sd", "prompt": "a lake", "seed": 2, "num_inference_steps": 2, "guidance_scale": 1.0,
               "width": 32, "height": 32, "t2i_adapter": [{"name": "full_sd", "image": photo_b64, "conditioning_scale": 0.5}]}),
        json!({"model": "tiny-sd", "prompt": "a lake", "seed": 2, "num_inference_steps": 2, "guidance_scale": 1.0}),
    ];
    let mut pipe =
        lcm::pipelines::LcmPipeline::load(fixtures().join("models/tiny-sd").to_str().unwrap(), &Default::default())
            .unwrap();
    for (i, body) in bodies.iter().enumerate() {
        let r = post_json(&ts.url("/api/v1/jobs"), body);
        assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.bytes));
        let id = r.json()["id"].as_str().unwrap().to_string();
        assert_eq!(wait_job(&ts, &id)["status"], "succeeded", "job {i}");
        let got = get(&ts.url(&format!("/api/v1/jobs/{id}/images/0"))).bytes;
        let mut req = lcm::pipelines::GenerateRequest {
            prompt: "a lake".into(),
            seed: 2,
            num_inference_steps: 2,
            guidance_scale: Some(1.0),
            ..Default::default()
        };
        pipe.controlnets = Default::default();
        pipe.t2i_adapters = Default::default();
        match i {
            0 => {
                pipe.load_controlnet(fixtures().join("controlnets/sd").to_str().unwrap(), None).unwrap();
                let edges = lcm::canny::canny(&photo, 100.0, 200.0).unwrap();
                req.controlnet = vec![lcm::pipelines::ControlNetInput {
                    conditioning_scale: 0.7,
                    ..lcm::pipelines::ControlNetInput::new(edges)
                }];
            }
            1 => {
                pipe.load_t2i_adapter(fixtures().join("adapters/full_sd").to_str().unwrap(), None).unwrap();
                (req.width, req.height) = (Some(32), Some(32));
                req.adapter = vec![lcm::pipelines::AdapterInput {
                    conditioning_scale: 0.5,
                    ..lcm::pipelines::AdapterInput::new(photo.clone())
                }];
            }
            _ => {}
        }
        let plan = pipe.plan(&req).unwrap();
        let img = pipe.run(&plan, &req, |_| Ok(())).unwrap().remove(0);
        let want = lcm::image_io::encode_image(
            &img,
            lcm::image_io::OutputFormat::Png,
            Some(&pipe.parameters_text(&plan, &req, 0)),
        )
        .unwrap();
        assert!(got == want, "job {i} differs from the library");
    }
}
