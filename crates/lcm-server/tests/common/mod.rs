//! A server on port 0 in this process, and a blocking HTTP client.
#![allow(dead_code)]

use base64::Engine as _;
use lcm_server::config::{NamedSource, ServerConfig};
use lcm_server::Server;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;

pub fn fixtures() -> PathBuf {
    match std::env::var_os("LCM_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures"),
    }
}

pub fn source(rel: &str) -> NamedSource {
    NamedSource::parse(fixtures().join(rel).to_str().unwrap())
}

/// The tiny LCM model with the tiny autoencoder for previews.
pub fn config() -> ServerConfig {
    ServerConfig {
        models: vec![source("models/tiny-lcm"), source("models/tiny-sd")],
        preview_vae: Some(fixtures().join("vaes/taesd-tiny").to_str().unwrap().to_string()),
        ..Default::default()
    }
}

pub struct TestServer {
    pub base: String,
    pub server: Server,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestServer {
    pub fn start(config: ServerConfig) -> Self {
        let server = Server::load(config).expect("server loads");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let s = server.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                s.serve(listener, async move {
                    let _ = stop_rx.await;
                })
                .await
                .unwrap();
            });
        });
        let addr = addr_rx.recv().unwrap();
        Self { base: format!("http://{addr}"), server, stop: Some(stop_tx), thread: Some(thread) }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Stop as SIGTERM would, and wait until the server has returned.
    pub fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new().timeout(std::time::Duration::from_secs(120)).build()
}

/// Status, headers of interest and the body of a response, whatever its status.
pub struct Reply {
    pub status: u16,
    pub content_type: String,
    pub retry_after: Option<String>,
    pub bytes: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.bytes)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.bytes)))
    }
}

fn reply(r: Result<ureq::Response, ureq::Error>) -> Reply {
    let resp = match r {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("transport error: {e}"),
    };
    let status = resp.status();
    let content_type = resp.header("content-type").unwrap_or("").to_string();
    let retry_after = resp.header("retry-after").map(String::from);
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut resp.into_reader(), &mut bytes).unwrap();
    Reply { status, content_type, retry_after, bytes }
}

pub fn get(url: &str) -> Reply {
    reply(agent().get(url).call())
}

pub fn get_auth(url: &str, auth: &str) -> Reply {
    reply(agent().get(url).set("Authorization", auth).call())
}

pub fn post_json(url: &str, body: &Value) -> Reply {
    reply(agent().post(url).set("Content-Type", "application/json").send_string(&body.to_string()))
}

pub fn post_raw(url: &str, content_type: &str, body: &[u8]) -> Reply {
    reply(agent().post(url).set("Content-Type", content_type).send_bytes(body))
}

/// A multipart/form-data body: (name, filename, bytes).
pub fn multipart(parts: &[(&str, Option<&str>, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "lcm-test-boundary-7f3a";
    let mut body = Vec::new();
    for (name, file, bytes) in parts {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        match file {
            Some(f) => body.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\nContent-Type: image/png\r\n\r\n").as_bytes(),
            ),
            None => body.extend_from_slice(format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes()),
        }
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// Server-Sent Events of a URL until the stream ends: (event, data).
pub fn sse(url: &str) -> Vec<(String, Value)> {
    let resp = agent().get(url).call().unwrap();
    read_sse(resp.into_reader())
}

pub fn read_sse(reader: impl std::io::Read) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let (mut event, mut data) = (String::new(), String::new());
    for line in BufReader::new(reader).lines() {
        let line = line.unwrap();
        if line.is_empty() {
            if !data.is_empty() {
                let v = serde_json::from_str(&data).unwrap_or(Value::String(data.clone()));
                out.push((std::mem::take(&mut event), v));
                data.clear();
            }
            event.clear();
        } else if let Some(e) = line.strip_prefix("event:") {
            event = e.trim().to_string();
        } else if let Some(d) = line.strip_prefix("data:") {
            data.push_str(d.strip_prefix(' ').unwrap_or(d));
        }
    }
    out
}

pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub fn unb64(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

/// Poll a native job until it is final.
pub fn wait_job(ts: &TestServer, id: &str) -> Value {
    for _ in 0..6000 {
        let v = get(&ts.url(&format!("/api/v1/jobs/{id}"))).json();
        if ["succeeded", "failed", "cancelled"].contains(&v["status"].as_str().unwrap()) {
            return v;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("job {id} did not finish");
}

/// Poll until a job runs.
pub fn wait_running(ts: &TestServer, id: &str) {
    for _ in 0..6000 {
        let v = get(&ts.url(&format!("/api/v1/jobs/{id}"))).json();
        if v["status"] != "queued" {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    panic!("job {id} did not start");
}

/// What the library makes for a request, as the PNG `lcm generate` would write.
pub fn library_png(model: &str, req: &lcm::pipelines::GenerateRequest) -> Vec<Vec<u8>> {
    let pipe =
        lcm::pipelines::LcmPipeline::load(fixtures().join(model).to_str().unwrap(), &Default::default()).unwrap();
    let plan = pipe.plan(req).unwrap();
    let images = pipe.run(&plan, req, |_| Ok(())).unwrap();
    images
        .iter()
        .enumerate()
        .map(|(i, img)| {
            lcm::image_io::encode_image(
                img,
                lcm::image_io::OutputFormat::Png,
                Some(&pipe.parameters_text(&plan, req, i)),
            )
            .unwrap()
        })
        .collect()
}
