//! `lcm serve` as a process: each API's images equal `lcm generate`'s files byte for byte, the
//! process stops cleanly on SIGTERM, and refuses an open host without a key.
mod common;

use base64::Engine as _;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

struct Serve {
    child: Child,
    base: String,
}

impl Serve {
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_lcm"))
            .args(["serve", "--port", "0"])
            .args(args)
            .env("HF_HUB_OFFLINE", "1")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let base = loop {
            let line = lines.next().expect("server exited before listening").unwrap();
            if let Some(rest) = line.strip_prefix("listening on ") {
                break rest.split_whitespace().next().unwrap().to_string();
            }
        };
        // Keep draining stderr so the server never blocks on it.
        std::thread::spawn(move || for _ in lines {});
        Self { child, base }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// SIGTERM; the exit status.
    fn terminate(mut self) -> std::process::ExitStatus {
        Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        let status = self.child.wait().unwrap();
        std::mem::forget(self);
        status
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn post(url: &str, body: &Value) -> (u16, Value) {
    let r = match ureq::post(url).send_json(body.clone()) {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{e}"),
    };
    (r.status(), r.into_json().unwrap())
}

fn get_bytes(url: &str) -> Vec<u8> {
    let mut out = Vec::new();
    ureq::get(url).call().unwrap().into_reader().read_to_end(&mut out).unwrap();
    out
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn unb64(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

/// `lcm generate ARGS --output DIR/NAME`: the file's bytes.
fn generate(dir: &Path, name: &str, args: &[&str]) -> Vec<u8> {
    let out = dir.join(name);
    let o = Command::new(env!("CARGO_BIN_EXE_lcm"))
        .arg("generate")
        .args(args)
        .args(["--output", out.to_str().unwrap()])
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::read(out).unwrap()
}

fn fx(rel: &str) -> String {
    common::fixtures().join(rel).to_str().unwrap().to_string()
}

fn lora_dir(tmp: &Path) -> PathBuf {
    let dir = tmp.join("loras");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        common::fixtures().join("loras/lcm_like/pytorch_lora_weights.safetensors"),
        dir.join("lcm_like.safetensors"),
    )
    .unwrap();
    dir
}

#[test]
fn every_api_matches_lcm_generate_byte_for_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let loras = lora_dir(tmp.path());
    let (lcm_model, sd_model) = (fx("models/tiny-lcm"), fx("models/tiny-sd"));
    let server = Serve::start(&[
        "--model",
        &lcm_model,
        "--model",
        &sd_model,
        "--lora-dir",
        loras.to_str().unwrap(),
        "--controlnet",
        &fx("controlnets/sd"),
    ]);
    let cli = |name: &str, args: &[&str]| generate(tmp.path(), name, args);

    // Native.
    let (status, job) =
        post(&server.url("/api/v1/jobs"), &json!({"prompt": "a photo of a cat", "seed": 7, "num_inference_steps": 3}));
    assert_eq!(status, 202, "{job}");
    let id = job["id"].as_str().unwrap();
    let events = get_bytes(&server.url(&format!("/api/v1/jobs/{id}/events")));
    assert!(String::from_utf8_lossy(&events).contains("event: succeeded"));
    let native = get_bytes(&server.url(&format!("/api/v1/jobs/{id}/images/0")));
    assert_eq!(
        native,
        cli("native.png", &["--model", &lcm_model, "--prompt", "a photo of a cat", "--seed", "7", "--steps", "3"])
    );

    // AUTOMATIC1111: a batch of two is seeds 11 and 12, each reproducible alone.
    let (status, r) = post(
        &server.url("/sdapi/v1/txt2img"),
        &json!({"prompt": "a red fox", "negative_prompt": "blurry", "seed": 11, "steps": 2, "cfg_scale": 2.5, "batch_size": 2,
                "width": 32, "height": 32, "sampler_name": "Euler a", "override_settings": {"sd_model_checkpoint": "tiny-sd"}}),
    );
    assert_eq!(status, 200, "{r}");
    let info: Value = serde_json::from_str(r["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["all_seeds"], json!([11, 12]));
    for (i, seed) in ["11", "12"].iter().enumerate() {
        let want = cli(
            &format!("a1111-{i}.png"),
            &[
                "--model",
                &sd_model,
                "--prompt",
                "a red fox",
                "--negative-prompt",
                "blurry",
                "--seed",
                seed,
                "--steps",
                "2",
                "--guidance-scale",
                "2.5",
                "--width",
                "32",
                "--height",
                "32",
            ],
        );
        assert_eq!(unb64(r["images"][i].as_str().unwrap()), want, "A1111 image {i}");
        assert!(info["infotexts"][i].as_str().unwrap().contains(&format!("Seed: {seed}")));
    }

    // A1111 <lora:name:weight> in the prompt, then without: the LoRA set switches back.
    let lora_file = loras.join("lcm_like.safetensors");
    for (prompt, lora) in [("a cat <lora:lcm_like:0.7>", Some("@0.7")), ("a cat", None)] {
        let (status, r) = post(
            &server.url("/sdapi/v1/txt2img"),
            &json!({"prompt": prompt, "seed": 5, "steps": 2, "cfg_scale": 1, "override_settings": {"sd_model_checkpoint": "tiny-sd"}}),
        );
        assert_eq!(status, 200, "{r}");
        let mut args =
            vec!["--model", &sd_model, "--prompt", "a cat", "--seed", "5", "--steps", "2", "--guidance-scale", "1"];
        let spec = lora.map(|w| format!("{}{w}", lora_file.display()));
        if let Some(s) = &spec {
            args.extend(["--lora", s]);
        }
        assert_eq!(
            unb64(r["images"][0].as_str().unwrap()),
            cli("lora.png", &[&args[..], &["--overwrite"]].concat()),
            "{prompt}"
        );
    }

    // A1111 img2img.
    let photo = std::fs::read(fx("images/photo_45x37.png")).unwrap();
    let (status, r) = post(
        &server.url("/sdapi/v1/img2img"),
        &json!({"prompt": "a lake", "seed": 2, "steps": 4, "denoising_strength": 0.5, "init_images": [b64(&photo)],
                "override_settings": {"sd_model_checkpoint": "tiny-sd"}}),
    );
    assert_eq!(status, 200, "{r}");
    let want = cli(
        "img2img.png",
        &[
            "--model",
            &sd_model,
            "--prompt",
            "a lake",
            "--seed",
            "2",
            "--steps",
            "4",
            "--strength",
            "0.5",
            "--image",
            &fx("images/photo_45x37.png"),
        ],
    );
    assert_eq!(unb64(r["images"][0].as_str().unwrap()), want, "A1111 img2img");

    // A1111 ControlNet unit with the canny module.
    let (status, r) = post(
        &server.url("/sdapi/v1/txt2img"),
        &json!({"prompt": "a mountain lake", "seed": 0, "steps": 2, "cfg_scale": 1,
                "override_settings": {"sd_model_checkpoint": "tiny-sd"},
                "alwayson_scripts": {"controlnet": {"args": [{"module": "canny", "model": "sd [abcd1234]", "weight": 0.8, "image": b64(&photo)}]}}}),
    );
    assert_eq!(status, 200, "{r}");
    let want = cli(
        "cn.png",
        &[
            "--model",
            &sd_model,
            "--prompt",
            "a mountain lake",
            "--seed",
            "0",
            "--steps",
            "2",
            "--guidance-scale",
            "1",
            "--controlnet",
            &fx("controlnets/sd"),
            "--control-image",
            &fx("images/photo_45x37.png"),
            "--controlnet-scale",
            "0.8",
            "--canny",
        ],
    );
    assert_eq!(unb64(r["images"][0].as_str().unwrap()), want, "A1111 ControlNet");
    let (_, lists) =
        (0, ureq::get(&server.url("/controlnet/model_list")).call().unwrap().into_json::<Value>().unwrap());
    assert_eq!(lists["model_list"], json!(["sd"]));

    // OpenAI, with its extra fields.
    let (status, r) = post(
        &server.url("/v1/images/generations"),
        &json!({"model": "tiny-lcm", "prompt": "a blue bird", "seed": 3, "num_inference_steps": 2, "guidance_scale": 3.0, "size": "32x32"}),
    );
    assert_eq!(status, 200, "{r}");
    let want = cli(
        "openai.png",
        &[
            "--model",
            &lcm_model,
            "--prompt",
            "a blue bird",
            "--seed",
            "3",
            "--steps",
            "2",
            "--guidance-scale",
            "3",
            "--width",
            "32",
            "--height",
            "32",
        ],
    );
    assert_eq!(unb64(r["data"][0]["b64_json"].as_str().unwrap()), want, "OpenAI");

    assert!(server.terminate().success());
}

#[test]
fn refuses_an_open_host_without_a_key() {
    let o = Command::new(env!("CARGO_BIN_EXE_lcm"))
        .args(["serve", "--host", "0.0.0.0", "--port", "0", "--model", &fx("models/tiny-lcm")])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.starts_with("error: ") && err.contains("--api-key"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

/// A motion adapter is served as one more model: a job with frames returns the GIF `lcm animate`
/// writes.
#[test]
fn videos_match_lcm_animate() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, adapter) = (fx("models/tiny-sd"), fx("motion_adapters/tiny_sd"));
    let server = Serve::start(&["--model", &model, "--motion-adapter", &format!("clip={adapter}")]);
    let (status, job) = post(
        &server.url("/api/v1/jobs"),
        &json!({"prompt": "a small red house", "seed": 1, "num_frames": 3, "num_inference_steps": 2, "guidance_scale": 1.0, "fps": 5}),
    );
    assert_eq!(status, 202, "{job}");
    assert_eq!(job["model"], "clip");
    let id = job["id"].as_str().unwrap();
    get_bytes(&server.url(&format!("/api/v1/jobs/{id}/events")));
    let gif = get_bytes(&server.url(&format!("/api/v1/jobs/{id}/images/0")));
    let out = tmp.path().join("clip.gif");
    let o = Command::new(env!("CARGO_BIN_EXE_lcm"))
        .args([
            "animate",
            "--model",
            &model,
            "--motion-adapter",
            &adapter,
            "--prompt",
            "a small red house",
            "--seed",
            "1",
        ])
        .args([
            "--frames",
            "3",
            "--steps",
            "2",
            "--guidance-scale",
            "1",
            "--fps",
            "5",
            "--output",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(gif, std::fs::read(out).unwrap());
    // The image model refuses frames; frames are limited.
    let (status, _) = post(&server.url("/api/v1/jobs"), &json!({"model": "tiny-sd", "prompt": "x", "num_frames": 3}));
    assert_eq!(status, 400);
    let (status, e) = post(&server.url("/api/v1/jobs"), &json!({"prompt": "x", "num_frames": 100}));
    assert_eq!(status, 400);
    assert!(e["error"]["message"].as_str().unwrap().contains("limit"), "{e}");
}

#[test]
fn api_key_from_a_file() {
    let tmp = tempfile::tempdir().unwrap();
    let key = tmp.path().join("key");
    std::fs::write(&key, "k3y-from-file\n").unwrap();
    let server = Serve::start(&["--model", &fx("models/tiny-lcm"), "--api-key-file", key.to_str().unwrap()]);
    let status = |auth: Option<&str>| {
        let mut r = ureq::get(&server.url("/api/v1/models"));
        if let Some(a) = auth {
            r = r.set("Authorization", a);
        }
        match r.call() {
            Ok(r) => r.status(),
            Err(ureq::Error::Status(s, _)) => s,
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(status(None), 401);
    assert_eq!(status(Some("Bearer k3y-from-file")), 200);
    assert_eq!(ureq::get(&server.url("/health")).call().unwrap().status(), 200);
    assert!(server.terminate().success());
}
