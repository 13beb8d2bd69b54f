//! What a server is started with: models, network, keys and limits.

use lcm::pipelines::WeightDType;
use std::path::PathBuf;
use std::time::Duration;

/// A model given as `[NAME=]SOURCE`.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedSource {
    pub name: String,
    pub source: String,
}

impl NamedSource {
    /// `NAME=SOURCE`, or `SOURCE` named after its folder, file stem or repo name. A `=` inside a
    /// path that exists is part of the path.
    pub fn parse(arg: &str) -> Self {
        match arg.split_once('=') {
            Some((name, source)) if !name.is_empty() && !std::path::Path::new(arg).exists() => {
                Self { name: name.to_string(), source: source.to_string() }
            }
            _ => Self { name: crate::models::default_name(arg), source: arg.to_string() },
        }
    }
}

/// What a request may ask for at most.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Request bodies (JSON with base64 images, multipart uploads).
    pub max_body_bytes: usize,
    /// Output width x height.
    pub max_pixels: usize,
    pub max_steps: usize,
    /// Images (videos) per request.
    pub max_images: usize,
    pub max_frames: usize,
    /// Width x height of an uploaded image, checked before it is decoded.
    pub max_input_pixels: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 50 << 20,
            max_pixels: 2048 * 2048,
            max_steps: 50,
            max_images: 8,
            max_frames: 32,
            max_input_pixels: 4096 * 4096,
        }
    }
}

/// Everything `lcm serve` takes.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// The first is the default model.
    pub models: Vec<NamedSource>,
    /// LoRAs: the `.safetensors` files of this folder, by file stem.
    pub lora_dir: Option<PathBuf>,
    pub controlnets: Vec<NamedSource>,
    pub adapters: Vec<NamedSource>,
    /// AnimateDiff: served as one more model over the first, under this name.
    pub motion_adapter: Option<NamedSource>,
    /// A tiny autoencoder (TAESD) for step previews; without one, step events carry no image.
    pub preview_vae: Option<String>,
    /// Every output image is also written here.
    pub output_dir: Option<PathBuf>,
    pub dtype: Option<WeightDType>,
    pub device: String,
    pub host: String,
    pub port: u16,
    /// Accepted keys (Bearer, or the password of HTTP Basic). Empty: no authentication.
    pub api_keys: Vec<String>,
    /// Allow a non-loopback host without a key.
    pub insecure_no_auth: bool,
    pub cors_origins: Vec<String>,
    /// Jobs waiting beyond the running one; more are answered 429.
    pub queue: usize,
    pub limits: Limits,
    /// How long finished jobs (and their images) are kept.
    pub job_ttl: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            models: Vec::new(),
            lora_dir: None,
            controlnets: Vec::new(),
            adapters: Vec::new(),
            motion_adapter: None,
            preview_vae: None,
            output_dir: None,
            dtype: None,
            device: "cpu".into(),
            host: "127.0.0.1".into(),
            port: 7860,
            api_keys: Vec::new(),
            insecure_no_auth: false,
            cors_origins: Vec::new(),
            queue: 16,
            limits: Limits::default(),
            job_ttl: Duration::from_secs(600),
        }
    }
}

impl ServerConfig {
    /// Refuse what would be unsafe or cannot work, before anything loads.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.models.is_empty() {
            anyhow::bail!("give at least one --model");
        }
        if self.queue == 0 {
            anyhow::bail!("--queue must be at least 1");
        }
        if self.api_keys.iter().any(|k| k.is_empty()) {
            anyhow::bail!("an API key must not be empty");
        }
        if !is_loopback(&self.host) && self.api_keys.is_empty() && !self.insecure_no_auth {
            anyhow::bail!(
                "--host {} is reachable from other machines: give --api-key or --api-key-file (or --insecure-no-auth)",
                self.host
            );
        }
        Ok(())
    }
}

/// Whether `host` only listens on this machine.
pub fn is_loopback(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost") || h.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}
