//! `lcm bench`: the real SD1.5 architecture with random weights (the same compute as real ones),
//! written once as a diffusers folder so diffusers can load the very same model
//! (`benches/bench_diffusers.py`), then timed stage by stage with warm-up and the median of
//! several runs: text encoding, one UNet step (batch 1, and batch 2 as under CFG), VAE decode and
//! the whole 4-step LCM text-to-image; with GFLOP/s from the FLOPs the ops count, the machine's
//! FP32 matrix-multiply rate on the same threads, and peak memory.

use crate::loaders::weights::recording_random_var_builder;
use crate::models::autoencoder_kl::{AutoencoderKL, AutoencoderKLConfig};
use crate::models::clip_text_model::{ClipTextConfig, ClipTextModel};
use crate::models::unet_2d_condition::{UNet2DConditionConfig, UNet2DConditionModel, UNetConditioning};
use crate::pipelines::{conditioning, GenerateRequest, LcmPipeline, LoadOptions, PipelineKind};
use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use std::path::Path;
use std::time::Instant;

const UNET_CONFIG: &str = include_str!("../tests/fixtures/real_configs/sd15/unet/config.json");
const VAE_CONFIG: &str = include_str!("../tests/fixtures/real_configs/sd15/vae/config.json");
const TEXT_ENCODER_CONFIG: &str = include_str!("../tests/fixtures/real_configs/sd15/text_encoder/config.json");
/// The CLIP ViT-L/14 BPE vocabulary SD1.5 uses (the tiny fixtures carry the real files).
const VOCAB: &str = include_str!("../tests/fixtures/models/tiny-sd/tokenizer/vocab.json");
const MERGES: &str = include_str!("../tests/fixtures/models/tiny-sd/tokenizer/merges.txt");
const TOKENIZER_CONFIG: &str = include_str!("../tests/fixtures/models/tiny-sd/tokenizer/tokenizer_config.json");
const SPECIAL_TOKENS: &str = include_str!("../tests/fixtures/models/tiny-sd/tokenizer/special_tokens_map.json");
const SCHEDULER_CONFIG: &str = r#"{
  "_class_name": "LCMScheduler",
  "beta_start": 0.00085,
  "beta_end": 0.012,
  "beta_schedule": "scaled_linear",
  "num_train_timesteps": 1000,
  "original_inference_steps": 50,
  "prediction_type": "epsilon",
  "set_alpha_to_one": true,
  "steps_offset": 1,
  "timestep_spacing": "leading",
  "clip_sample": false
}"#;
const MODEL_INDEX: &str = r#"{
  "_class_name": "StableDiffusionPipeline",
  "_diffusers_version": "0.42.1",
  "feature_extractor": [null, null],
  "requires_safety_checker": false,
  "safety_checker": [null, null],
  "scheduler": ["diffusers", "LCMScheduler"],
  "text_encoder": ["transformers", "CLIPTextModel"],
  "tokenizer": ["transformers", "CLIPTokenizer"],
  "unet": ["diffusers", "UNet2DConditionModel"],
  "vae": ["diffusers", "AutoencoderKL"]
}"#;

fn write(path: &Path, text: &str) -> Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

fn save_weights(record: &crate::loaders::weights::RecordedWeights, path: &Path) -> Result<()> {
    let map = record.lock().map_err(|_| anyhow::anyhow!("weight record poisoned"))?;
    candle_core::safetensors::save(&map, path).with_context(|| format!("cannot write {}", path.display()))
}

/// Write the random-weight SD1.5 folder (unless `dir/model_index.json` exists already).
pub fn write_sd15_folder(dir: &Path) -> Result<()> {
    if dir.join("model_index.json").is_file() {
        return Ok(());
    }
    let dev = Device::Cpu;
    write(&dir.join("unet/config.json"), UNET_CONFIG)?;
    write(&dir.join("vae/config.json"), VAE_CONFIG)?;
    write(&dir.join("text_encoder/config.json"), TEXT_ENCODER_CONFIG)?;
    write(&dir.join("tokenizer/vocab.json"), VOCAB)?;
    write(&dir.join("tokenizer/merges.txt"), MERGES)?;
    write(&dir.join("tokenizer/tokenizer_config.json"), TOKENIZER_CONFIG)?;
    write(&dir.join("tokenizer/special_tokens_map.json"), SPECIAL_TOKENS)?;
    write(&dir.join("scheduler/scheduler_config.json"), SCHEDULER_CONFIG)?;

    let (vb, rec) = recording_random_var_builder(1, &dev);
    UNet2DConditionModel::new(vb, &serde_json::from_str::<UNet2DConditionConfig>(UNET_CONFIG)?)?;
    save_weights(&rec, &dir.join("unet/diffusion_pytorch_model.safetensors"))?;
    drop(rec);
    let (vb, rec) = recording_random_var_builder(2, &dev);
    AutoencoderKL::new(vb, &serde_json::from_str::<AutoencoderKLConfig>(VAE_CONFIG)?)?;
    save_weights(&rec, &dir.join("vae/diffusion_pytorch_model.safetensors"))?;
    let (vb, rec) = recording_random_var_builder(3, &dev);
    ClipTextModel::new(vb, &serde_json::from_str::<ClipTextConfig>(TEXT_ENCODER_CONFIG)?)?;
    save_weights(&rec, &dir.join("text_encoder/model.safetensors"))?;
    // Last, so an interrupted write is not mistaken for a finished folder.
    write(&dir.join("model_index.json"), MODEL_INDEX)
}

/// The benchmark's settings.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub size: usize,
    pub steps: usize,
    pub warmup: usize,
    pub runs: usize,
}

/// One timed stage.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Stage {
    pub name: String,
    pub seconds: f64,
    pub runs: Vec<f64>,
    pub gflop: f64,
    pub gflops: f64,
    /// Of the measured FP32 matrix-multiply rate.
    pub gemm_fraction: f64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchReport {
    pub model: String,
    pub size: usize,
    pub steps: usize,
    pub threads: usize,
    pub gemm_gflops: f64,
    pub stages: Vec<Stage>,
    pub peak_rss_mb: f64,
    pub weights_mb: f64,
}

/// The process's peak resident set (Linux `VmHWM`), MB.
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(String::from))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<f64>().ok()))
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Median seconds of `runs` runs after `warmup`, and the FLOPs of one run.
fn time(opts: &BenchOptions, mut f: impl FnMut() -> Result<()>) -> Result<(f64, Vec<f64>, u64)> {
    for _ in 0..opts.warmup {
        f()?;
    }
    let mut runs = Vec::new();
    let mut flops = 0;
    for _ in 0..opts.runs.max(1) {
        crate::ops::flops::take();
        crate::ops::profile::take();
        let t = Instant::now();
        f()?;
        runs.push(t.elapsed().as_secs_f64());
        flops = crate::ops::flops::take();
        if crate::ops::profile::enabled() {
            let kinds = crate::ops::profile::take();
            let other = runs.last().unwrap() - kinds.iter().map(|k| k.1).sum::<f64>();
            let parts: Vec<String> = kinds.iter().map(|(k, s)| format!("{k} {s:.3}")).collect();
            eprintln!("  profile: {}, other {other:.3} s", parts.join(", "));
        }
    }
    let mut sorted = runs.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    Ok((sorted[sorted.len() / 2], runs, flops))
}

/// FP32 matrix-multiply rate of this machine through the same op the models use.
pub fn gemm_gflops(opts: &BenchOptions) -> Result<f64> {
    let n = 2048;
    let a = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?;
    let (s, _, flops) = time(opts, || {
        crate::ops::linear(&a, &b, None)?.sum_all()?.to_scalar::<f32>()?;
        Ok(())
    })?;
    Ok(flops as f64 / s / 1e9)
}

fn threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Time every stage of the model in `dir`.
pub fn run(dir: &Path, opts: &BenchOptions) -> Result<BenchReport> {
    let gemm = gemm_gflops(opts)?;
    let weights_mb = ["unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"]
        .iter()
        .map(|f| std::fs::metadata(dir.join(f)).map(|m| m.len() as f64 / 1048576.0).unwrap_or(0.0))
        .sum();
    let pipe = LcmPipeline::load(dir.to_str().context("folder path is not UTF-8")?, &LoadOptions::default())?
        .with_kind(PipelineKind::StableDiffusion);
    let c = &pipe.components;
    let dev = Device::Cpu;
    let prompt = "a photograph of an astronaut riding a horse";
    let lat = opts.size / pipe.vae_scale_factor();
    let mut stages = Vec::new();
    let mut stage = |name: &str, r: (f64, Vec<f64>, u64)| {
        let gflop = r.2 as f64 / 1e9;
        stages.push(Stage {
            name: name.into(),
            seconds: r.0,
            runs: r.1,
            gflop,
            gflops: gflop / r.0,
            gemm_fraction: gflop / r.0 / gemm,
        });
    };

    let text = conditioning::encode_text(c, prompt, None, false, 1, (opts.size, opts.size), &dev)?;
    stage("text encoding", time(opts, || {
        conditioning::encode_text(c, prompt, None, false, 1, (opts.size, opts.size), &dev)?;
        Ok(())
    })?);
    let x1 = Tensor::randn(0f32, 1.0, (1, 4, lat, lat), &dev)?;
    let ehs2 = Tensor::cat(&[&text.prompt_embeds, &text.prompt_embeds], 0)?;
    let x2 = Tensor::cat(&[&x1, &x1], 0)?;
    let cond = UNetConditioning::default();
    stage("UNet step, batch 1", time(opts, || {
        c.unet.forward(&x1, 999.0, &text.prompt_embeds, &cond)?.sum_all()?.to_scalar::<f32>()?;
        Ok(())
    })?);
    stage("UNet step, batch 2 (CFG)", time(opts, || {
        c.unet.forward(&x2, 999.0, &ehs2, &cond)?.sum_all()?.to_scalar::<f32>()?;
        Ok(())
    })?);
    stage("VAE decode", time(opts, || {
        c.vae.decode(&x1)?.sum_all()?.to_scalar::<f32>()?;
        Ok(())
    })?);
    let req = GenerateRequest {
        prompt: prompt.into(),
        num_inference_steps: opts.steps,
        guidance_scale: Some(1.0),
        width: Some(opts.size),
        height: Some(opts.size),
        seed: 0,
        ..Default::default()
    };
    stage(&format!("text-to-image, {} LCM steps", opts.steps), time(opts, || {
        pipe.generate(&req, |_, _| {})?;
        Ok(())
    })?);
    Ok(BenchReport {
        model: "SD1.5 architecture, random weights".into(),
        size: opts.size,
        steps: opts.steps,
        threads: threads(),
        gemm_gflops: gemm,
        stages,
        peak_rss_mb: peak_rss_mb(),
        weights_mb,
    })
}

impl BenchReport {
    /// A table for people.
    pub fn table(&self) -> String {
        let mut s = format!(
            "{} at {}x{}, f32, {} threads; FP32 GEMM {:.1} GFLOP/s\n{:<32} {:>9} {:>9} {:>9} {:>8}\n",
            self.model, self.size, self.size, self.threads, self.gemm_gflops, "stage", "seconds", "GFLOP", "GFLOP/s", "% GEMM"
        );
        for st in &self.stages {
            s.push_str(&format!(
                "{:<32} {:>9.3} {:>9.1} {:>9.1} {:>7.0}%\n",
                st.name,
                st.seconds,
                st.gflop,
                st.gflops,
                100.0 * st.gemm_fraction
            ));
        }
        s.push_str(&format!("peak RSS {:.0} MB (weights on disk {:.0} MB)\n", self.peak_rss_mb, self.weights_mb));
        s
    }
}
