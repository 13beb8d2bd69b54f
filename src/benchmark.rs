//! `lcm bench`: a real architecture (SD1.5, SDXL, or SD1.5 + the AnimateDiff motion adapter
//! v1-5-2) with random weights (the same compute as real ones), written once as a diffusers folder
//! so diffusers can load the very same model (`benches/bench_diffusers.py`), then timed stage by
//! stage with warm-up and the median of several runs. Images: text encoding, one UNet step (batch
//! 1, and batch 2 as under CFG), VAE decode and the whole 4-step LCM text-to-image. AnimateDiff:
//! one UNet step over the clip, the frame-by-frame VAE decode and the whole 4-step animation.
//! With GFLOP/s from the FLOPs the ops count, the machine's FP32 matrix-multiply rate on the same
//! threads, and peak memory.

use crate::loaders::weights::{random_var_builder, recording_random_var_builder};
use crate::models::clip_text_model::{ClipTextConfig, ClipTextModel, ClipTextModelWithProjection};
use crate::models::unet::motion::{MotionAdapterConfig, MotionModules};
use crate::models::unet::{UNet2DConditionConfig, UNet2DConditionModel, UNetConditioning};
use crate::models::vae::kl::{AutoencoderKL, AutoencoderKLConfig};
use crate::models::vae::tiny::{AutoencoderTiny, AutoencoderTinyConfig};
use crate::models::vae::Autoencoder;
use crate::pipelines::{conditioning, GenerateRequest, LcmPipeline, LoadOptions, PipelineKind};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};
use std::time::Instant;

const UNET_CONFIG: &str = include_str!("../tests/fixtures/real_configs/sd15/unet/config.json");
const VAE_CONFIG: &str = include_str!("../tests/fixtures/real_configs/sd15/vae/config.json");
const TEXT_ENCODER_CONFIG: &str = include_str!("../tests/fixtures/real_configs/sd15/text_encoder/config.json");
/// The CLIP ViT-L/14 BPE vocabulary SD1.5 uses (the tiny fixtures carry the real files).
const VOCAB: &str = include_str!("../tests/fixtures/models/tiny-sd/tokenizer/vocab.json");
const MERGES: &str = include_str!("../tests/fixtures/models/tiny-sd/tokenizer/merges.txt");
const TOKENIZER_CONFIG: &str = include_str!("../tests/fixtures/models/tiny-sd/tokenizer/tokenizer_config.json");
const SPECIAL_TOKENS: &str = include_str!("../tests/fixtures/models/tiny-sd/tokenizer/special_tokens_map.json");
const SDXL_UNET_CONFIG: &str = include_str!("../tests/fixtures/real_configs/sdxl/unet/config.json");
const SDXL_VAE_CONFIG: &str = include_str!("../tests/fixtures/real_configs/sdxl/vae/config.json");
const TAESD_CONFIG: &str = include_str!("../tests/fixtures/vaes/real_configs/taesd/config.json");
const TAESDXL_CONFIG: &str = include_str!("../tests/fixtures/vaes/real_configs/taesdxl/config.json");
const SDXL_TEXT_ENCODER_CONFIG: &str = include_str!("../tests/fixtures/real_configs/sdxl/text_encoder/config.json");
const SDXL_TEXT_ENCODER_2_CONFIG: &str = include_str!("../tests/fixtures/real_configs/sdxl/text_encoder_2/config.json");
/// SDXL's tokenizers: the same vocabulary and merges as SD1.5's, the second padding with `!`
/// (the tiny fixture carries the real stabilityai/stable-diffusion-xl-base-1.0 files).
const SDXL_TOKENIZER_CONFIG: &str = include_str!("../tests/fixtures/models/tiny-sdxl/tokenizer/tokenizer_config.json");
const SDXL_SPECIAL_TOKENS: &str = include_str!("../tests/fixtures/models/tiny-sdxl/tokenizer/special_tokens_map.json");
const SDXL_TOKENIZER_2_CONFIG: &str =
    include_str!("../tests/fixtures/models/tiny-sdxl/tokenizer_2/tokenizer_config.json");
const SDXL_SPECIAL_TOKENS_2: &str =
    include_str!("../tests/fixtures/models/tiny-sdxl/tokenizer_2/special_tokens_map.json");
const MOTION_ADAPTER_CONFIG: &str =
    include_str!("../tests/fixtures/real_configs/guoyww__animatediff-motion-adapter-v1-5-2/config.json");
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
const SDXL_MODEL_INDEX: &str = r#"{
  "_class_name": "StableDiffusionXLPipeline",
  "_diffusers_version": "0.42.1",
  "add_watermarker": false,
  "force_zeros_for_empty_prompt": true,
  "feature_extractor": [null, null],
  "image_encoder": [null, null],
  "scheduler": ["diffusers", "LCMScheduler"],
  "text_encoder": ["transformers", "CLIPTextModel"],
  "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
  "tokenizer": ["transformers", "CLIPTokenizer"],
  "tokenizer_2": ["transformers", "CLIPTokenizer"],
  "unet": ["diffusers", "UNet2DConditionModel"],
  "vae": ["diffusers", "AutoencoderKL"]
}"#;

/// Which architecture `lcm bench` times.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BenchModel {
    Sd15,
    Sdxl,
    AnimateDiff,
}

impl std::str::FromStr for BenchModel {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "sd15" => Ok(Self::Sd15),
            "sdxl" => Ok(Self::Sdxl),
            "animatediff" => Ok(Self::AnimateDiff),
            _ => Err(format!("unknown model `{s}`: sd15, sdxl or animatediff")),
        }
    }
}

impl BenchModel {
    /// Image size when `--size` is not given: the model's native one.
    pub fn default_size(self) -> usize {
        match self {
            Self::Sdxl => 1024,
            Self::Sd15 | Self::AnimateDiff => 512,
        }
    }

    /// The folder `lcm bench` writes when `--dir` is not given (AnimateDiff uses the SD1.5
    /// folder, with the motion adapter in its `motion_adapter/` subfolder).
    pub fn default_dir(self) -> PathBuf {
        std::env::temp_dir().join(match self {
            Self::Sdxl => "lcm-bench-sdxl",
            Self::Sd15 | Self::AnimateDiff => "lcm-bench-sd15",
        })
    }

    fn description(self) -> &'static str {
        match self {
            Self::Sd15 => "SD1.5 architecture, random weights",
            Self::Sdxl => "SDXL architecture, random weights",
            Self::AnimateDiff => "AnimateDiff (SD1.5 + motion adapter v1-5-2), random weights",
        }
    }
}

/// Whether the random-weight folder `model` needs is complete in `dir` (so [`write_folder`] will
/// not write anything).
pub fn folder_complete(model: BenchModel, dir: &Path) -> bool {
    dir.join("model_index.json").is_file()
        && (model != BenchModel::AnimateDiff || dir.join("motion_adapter/config.json").is_file())
}

/// Write the random-weight folder `model` needs (skipping what is there already).
pub fn write_folder(model: BenchModel, dir: &Path) -> Result<()> {
    match model {
        BenchModel::Sd15 => write_sd15_folder(dir),
        BenchModel::Sdxl => write_sdxl_folder(dir),
        BenchModel::AnimateDiff => {
            write_sd15_folder(dir)?;
            write_motion_adapter_folder(&dir.join("motion_adapter"))
        }
    }
}

fn write(path: &Path, text: &str) -> Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

fn save_weights(record: &crate::loaders::weights::RecordedWeights, path: &Path) -> Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    let map = record.lock().map_err(|_| anyhow::anyhow!("weight record poisoned"))?;
    candle_core::safetensors::save(&map, path).with_context(|| format!("cannot write {}", path.display()))
}

/// Write the random-weight SD1.5 folder (unless `dir/model_index.json` exists already).
pub fn write_sd15_folder(dir: &Path) -> Result<()> {
    if dir.join("model_index.json").is_file() {
        return Ok(());
    }
    write(&dir.join("unet/config.json"), UNET_CONFIG)?;
    write(&dir.join("vae/config.json"), VAE_CONFIG)?;
    write(&dir.join("text_encoder/config.json"), TEXT_ENCODER_CONFIG)?;
    write_tokenizer(&dir.join("tokenizer"), TOKENIZER_CONFIG, SPECIAL_TOKENS)?;
    write(&dir.join("scheduler/scheduler_config.json"), SCHEDULER_CONFIG)?;

    save_random(dir, "unet/diffusion_pytorch_model.safetensors", 1, |vb| {
        UNet2DConditionModel::new(vb, &serde_json::from_str::<UNet2DConditionConfig>(UNET_CONFIG)?)?;
        Ok(())
    })?;
    save_random(dir, "vae/diffusion_pytorch_model.safetensors", 2, |vb| {
        AutoencoderKL::new(vb, &serde_json::from_str::<AutoencoderKLConfig>(VAE_CONFIG)?)?;
        Ok(())
    })?;
    save_random(dir, "text_encoder/model.safetensors", 3, |vb| {
        ClipTextModel::new(vb, &serde_json::from_str::<ClipTextConfig>(TEXT_ENCODER_CONFIG)?)?;
        Ok(())
    })?;
    // Last, so an interrupted write is not mistaken for a finished folder.
    write(&dir.join("model_index.json"), MODEL_INDEX)
}

/// Build one component on recording random weights and save them to `dir/file`; the weights
/// are dropped before the next component, so only one is ever in memory.
fn save_random(
    dir: &Path,
    file: &str,
    seed: u64,
    build: impl FnOnce(candle_nn::VarBuilder<'static>) -> Result<()>,
) -> Result<()> {
    let (vb, rec) = recording_random_var_builder(seed, &Device::Cpu);
    build(vb)?;
    save_weights(&rec, &dir.join(file))
}

fn write_tokenizer(dir: &Path, config: &str, special_tokens: &str) -> Result<()> {
    write(&dir.join("vocab.json"), VOCAB)?;
    write(&dir.join("merges.txt"), MERGES)?;
    write(&dir.join("tokenizer_config.json"), config)?;
    write(&dir.join("special_tokens_map.json"), special_tokens)
}

/// Write the random-weight SDXL folder (real stabilityai/stable-diffusion-xl-base-1.0 configs,
/// LCMScheduler; ~14 GB in f32) unless `dir/model_index.json` exists already.
pub fn write_sdxl_folder(dir: &Path) -> Result<()> {
    if dir.join("model_index.json").is_file() {
        return Ok(());
    }
    write(&dir.join("unet/config.json"), SDXL_UNET_CONFIG)?;
    write(&dir.join("vae/config.json"), SDXL_VAE_CONFIG)?;
    write(&dir.join("text_encoder/config.json"), SDXL_TEXT_ENCODER_CONFIG)?;
    write(&dir.join("text_encoder_2/config.json"), SDXL_TEXT_ENCODER_2_CONFIG)?;
    write_tokenizer(&dir.join("tokenizer"), SDXL_TOKENIZER_CONFIG, SDXL_SPECIAL_TOKENS)?;
    write_tokenizer(&dir.join("tokenizer_2"), SDXL_TOKENIZER_2_CONFIG, SDXL_SPECIAL_TOKENS_2)?;
    write(&dir.join("scheduler/scheduler_config.json"), SCHEDULER_CONFIG)?;

    save_random(dir, "unet/diffusion_pytorch_model.safetensors", 11, |vb| {
        UNet2DConditionModel::new(vb, &serde_json::from_str::<UNet2DConditionConfig>(SDXL_UNET_CONFIG)?)?;
        Ok(())
    })?;
    save_random(dir, "vae/diffusion_pytorch_model.safetensors", 12, |vb| {
        AutoencoderKL::new(vb, &serde_json::from_str::<AutoencoderKLConfig>(SDXL_VAE_CONFIG)?)?;
        Ok(())
    })?;
    save_random(dir, "text_encoder/model.safetensors", 13, |vb| {
        ClipTextModel::new(vb, &serde_json::from_str::<ClipTextConfig>(SDXL_TEXT_ENCODER_CONFIG)?)?;
        Ok(())
    })?;
    save_random(dir, "text_encoder_2/model.safetensors", 14, |vb| {
        ClipTextModelWithProjection::new(vb, &serde_json::from_str::<ClipTextConfig>(SDXL_TEXT_ENCODER_2_CONFIG)?)?;
        Ok(())
    })?;
    write(&dir.join("model_index.json"), SDXL_MODEL_INDEX)
}

/// Write a random-weight `MotionAdapter` folder (the real guoyww/animatediff-motion-adapter-v1-5-2
/// config) unless `dir/config.json` exists already.
pub fn write_motion_adapter_folder(dir: &Path) -> Result<()> {
    if dir.join("config.json").is_file() {
        return Ok(());
    }
    let dev = Device::Cpu;
    // The modules take their shapes from the UNet they attach to: SD1.5's, random, not kept.
    let unet = UNet2DConditionModel::new(
        crate::loaders::weights::random_var_builder(1, DType::F32, &dev),
        &serde_json::from_str::<UNet2DConditionConfig>(UNET_CONFIG)?,
    )?;
    let config: MotionAdapterConfig = serde_json::from_str(MOTION_ADAPTER_CONFIG)?;
    save_random(dir, "diffusion_pytorch_model.safetensors", 4, |vb| {
        MotionModules::new(vb, &config, &unet)?;
        Ok(())
    })?;
    drop(unet);
    // Last, so an interrupted write is not mistaken for a finished folder.
    write(&dir.join("config.json"), MOTION_ADAPTER_CONFIG)
}

/// One tensor of a key listing (`name [d0,d1,...] DTYPE` lines, as in
/// `tests/fixtures/single_file/*_keys.txt.gz`).
#[derive(Clone, Debug, PartialEq)]
pub struct ListedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: String,
}

/// Parse a key listing; `#` lines are comments.
pub fn parse_key_listing(text: &str) -> Result<Vec<ListedTensor>> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty() && !l.starts_with('#')) {
        let mut parts = line.split_whitespace();
        let (Some(name), Some(shape), Some(dtype)) = (parts.next(), parts.next(), parts.next()) else {
            bail!("key listing line `{line}` is not `name [shape] DTYPE`")
        };
        let dims = shape.trim_start_matches('[').trim_end_matches(']');
        let shape = if dims.is_empty() {
            Vec::new()
        } else {
            dims.split(',')
                .map(|d| d.parse::<usize>())
                .collect::<std::result::Result<_, _>>()
                .with_context(|| format!("bad shape in `{line}`"))?
        };
        out.push(ListedTensor { name: name.to_string(), shape, dtype: dtype.to_string() });
    }
    Ok(out)
}

/// Write a safetensors file holding every tensor of `listing` with deterministic random values
/// (full-size single-file checkpoints for tests, without committing gigabytes). Float tensors
/// are stored as `float_dtype` (`F16` halves the disk), matrices and kernels uniform in
/// ±sqrt(3 / fan_in), 1-D `weight`s 1 ± 0.1, other 1-D tensors ±0.1, scalars 0; `position_ids`
/// count up as in real files. Written as it is generated: memory stays small.
pub fn write_random_checkpoint(listing: &[ListedTensor], path: &Path, seed: u64, float_dtype: &str) -> Result<()> {
    use std::io::Write;
    let stored = |t: &ListedTensor| if t.dtype.starts_with('F') { float_dtype.to_string() } else { t.dtype.clone() };
    let size = |dtype: &str| -> Result<usize> {
        Ok(match dtype {
            "F16" | "BF16" => 2,
            "F32" | "I32" => 4,
            "I64" | "F64" => 8,
            other => bail!("cannot write dtype {other}"),
        })
    };
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for t in listing {
        let dtype = stored(t);
        let len = t.shape.iter().product::<usize>() * size(&dtype)?;
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": dtype, "shape": t.shape, "data_offsets": [offset, offset + len]}),
        );
        offset += len;
    }
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut head = serde_json::to_vec(&header)?;
    while head.len() % 8 != 0 {
        head.push(b' ');
    }
    let file = std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 22, file);
    out.write_all(&(head.len() as u64).to_le_bytes())?;
    out.write_all(&head)?;
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut uniform = move || {
        // xorshift64: fast enough for billions of values.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    };
    let mut buf: Vec<u8> = Vec::new();
    for t in listing {
        let n: usize = t.shape.iter().product();
        let dtype = stored(t);
        buf.clear();
        if !t.dtype.starts_with('F') {
            let width = size(&dtype)?;
            for i in 0..n {
                let v = if t.name.ends_with("position_ids") {
                    (i % t.shape.last().copied().unwrap_or(1)) as u64
                } else {
                    0
                };
                buf.extend_from_slice(&v.to_le_bytes()[..width]);
            }
        } else {
            // base + scale * uniform; scalars (scale 0) draw nothing.
            let (base, scale) = match t.shape.len() {
                0 => (0.0, 0.0),
                1 if t.name.ends_with("weight") => (1.0, 0.1),
                1 => (0.0, 0.1),
                _ => (0.0, (3.0 / t.shape[1..].iter().product::<usize>().max(1) as f32).sqrt()),
            };
            for _ in 0..n {
                let v = if scale == 0.0 { base } else { base + scale * uniform() };
                match dtype.as_str() {
                    "F16" => buf.extend_from_slice(&half::f16::from_f32(v).to_le_bytes()),
                    "BF16" => buf.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
                    "F32" => buf.extend_from_slice(&v.to_le_bytes()),
                    other => bail!("cannot write floats as {other}"),
                }
            }
        }
        out.write_all(&buf)?;
    }
    out.flush()?;
    Ok(())
}

/// The benchmark's settings.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub model: BenchModel,
    pub size: usize,
    /// AnimateDiff: frames per clip.
    pub frames: usize,
    pub steps: usize,
    pub warmup: usize,
    pub runs: usize,
    /// Precision the weights are kept in (`--dtype`).
    pub dtype: crate::loaders::weights::WeightDType,
    /// Where it runs (`--device`); on a GPU the computation is in `dtype` too.
    pub device: Device,
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
    /// `sd15`, `sdxl` or `animatediff` (what `benches/bench_diffusers.py` builds).
    pub kind: BenchModel,
    pub model: String,
    /// The model folder (AnimateDiff: the SD1.5 folder; the adapter is in `motion_adapter/`).
    pub dir: PathBuf,
    pub size: usize,
    /// AnimateDiff: frames per clip; `null` for images.
    pub frames: Option<usize>,
    pub steps: usize,
    /// Precision of the weights (`f32`, `f16`, `bf16`).
    pub dtype: String,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// The activations' dtype: f32 on the CPU, `dtype` on a GPU.
    pub compute_dtype: String,
    pub threads: usize,
    /// The CPU kernels' instruction-set path (`avx2`, `avx512`, ...; `LCM_CPU_PATH` picks a
    /// lower one); `-` off the CPU.
    pub cpu_path: String,
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
        opts.device.synchronize()?;
        let t = Instant::now();
        f()?;
        // GPU work is queued: a stage ends when the device has finished it.
        opts.device.synchronize()?;
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

/// Matrix-multiply rate of this machine through the same op the models use (CPU: f32
/// activations times weights in `--dtype`).
pub fn gemm_gflops(opts: &BenchOptions) -> Result<f64> {
    // The GPU's rate in the dtype the models compute in there (f16 / bf16 tensor cores).
    let (n, dtype) = if opts.device.is_cpu() { (2048, DType::F32) } else { (8192, opts.dtype.dtype()) };
    let a = Tensor::randn(0f32, 1.0, (n, n), &opts.device)?.to_dtype(dtype)?;
    // The weight operand as the models keep theirs (CPU: bf16 weights multiply in bf16 where
    // the CPU path has bf16 products).
    let b = Tensor::randn(0f32, 1.0, (n, n), &opts.device)?.to_dtype(opts.dtype.dtype())?;
    // Always warmed up and a median of at least 5: the rate is the yardstick for every stage.
    let opts = BenchOptions { warmup: opts.warmup.max(1), runs: opts.runs.max(5), ..opts.clone() };
    let (s, _, flops) = time(&opts, || {
        crate::ops::linear(&a, &b, None)?;
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

/// Size of the `*.safetensors` files in `dir`'s component folders `components`, MB.
fn safetensors_mb(dir: &Path, components: &[&str]) -> f64 {
    let mut total = 0.0;
    for c in components {
        let Ok(entries) = std::fs::read_dir(dir.join(c)) else { continue };
        for e in entries.filter_map(|e| e.ok()) {
            if e.path().extension().and_then(|x| x.to_str()) == Some("safetensors") {
                total += e.metadata().map_or(0.0, |m| m.len() as f64 / 1048576.0);
            }
        }
    }
    total
}

/// Records stages with their FLOP rates.
struct Stages {
    gemm: f64,
    list: Vec<Stage>,
}

impl Stages {
    fn add(&mut self, name: &str, r: (f64, Vec<f64>, u64)) {
        let gflop = r.2 as f64 / 1e9;
        self.list.push(Stage {
            name: name.into(),
            seconds: r.0,
            runs: r.1,
            gflop,
            gflops: gflop / r.0,
            gemm_fraction: gflop / r.0 / self.gemm,
        });
    }
}

const PROMPT: &str = "a photograph of an astronaut riding a horse";

/// Time every stage of the model in `dir` (as [`write_folder`] wrote it for `opts.model`).
pub fn run(dir: &Path, opts: &BenchOptions) -> Result<BenchReport> {
    if opts.size == 0 || !opts.size.is_multiple_of(8) {
        bail!("the size must be a positive multiple of 8, got {}", opts.size);
    }
    let gemm = gemm_gflops(opts)?;
    let mut stages = Stages { gemm, list: Vec::new() };
    let dir_str = dir.to_str().context("folder path is not UTF-8")?;
    let frames = match opts.model {
        BenchModel::Sd15 | BenchModel::Sdxl => {
            // The SD1.5 folder is a Stable Diffusion one whatever its model_index says.
            let pipeline = (opts.model == BenchModel::Sd15).then_some(PipelineKind::StableDiffusion);
            let mut pipe = LcmPipeline::load(
                dir_str,
                &LoadOptions { dtype: opts.dtype, device: opts.device.clone().into(), pipeline, ..Default::default() },
            )?;
            time_image_stages(&mut pipe, opts, &mut stages)?;
            None
        }
        BenchModel::AnimateDiff => {
            let adapter = dir.join("motion_adapter");
            let load = LoadOptions {
                motion_adapter: Some(adapter.to_str().context("folder path is not UTF-8")?.into()),
                dtype: opts.dtype,
                device: opts.device.clone().into(),
                ..Default::default()
            };
            let pipe = LcmPipeline::load(dir_str, &load)?;
            time_animation_stages(&pipe, opts, &mut stages)?;
            Some(opts.frames)
        }
    };
    let mut components = vec!["unet", "vae", "text_encoder", "text_encoder_2"];
    if opts.model == BenchModel::AnimateDiff {
        components.push("motion_adapter");
    }
    let weights_mb = safetensors_mb(dir, &components);
    Ok(BenchReport {
        kind: opts.model,
        model: opts.model.description().into(),
        dir: dir.to_path_buf(),
        size: opts.size,
        frames,
        steps: opts.steps,
        dtype: opts.dtype.to_string(),
        device: crate::device::name(&opts.device),
        compute_dtype: format!("{:?}", opts.dtype.precision(&opts.device).compute).to_lowercase(),
        threads: threads(),
        cpu_path: if opts.device.is_cpu() { crate::kernels::CpuPath::current().name().into() } else { "-".into() },
        gemm_gflops: gemm,
        stages: stages.list,
        peak_rss_mb: peak_rss_mb(),
        weights_mb,
    })
}

/// The whole image (or clip of `frames`) the benchmark times: the bench prompt, seed 0, no CFG.
fn bench_request(opts: &BenchOptions, frames: Option<usize>) -> GenerateRequest {
    GenerateRequest {
        prompt: PROMPT.into(),
        num_inference_steps: opts.steps,
        guidance_scale: Some(1.0),
        width: Some(opts.size),
        height: Some(opts.size),
        seed: 0,
        num_frames: frames,
        ..Default::default()
    }
}

/// SD1.5 / SDXL: text encoding (SDXL: both encoders), one UNet step at batch 1 and 2, VAE decode,
/// the whole text-to-image.
fn time_image_stages(pipe: &mut LcmPipeline, opts: &BenchOptions, stages: &mut Stages) -> Result<()> {
    let req = bench_request(opts, None);
    // Sizes that cannot fit in memory are refused before any stage allocates.
    pipe.plan(&req)?;
    let c = &pipe.components;
    let (dev, dt) = (c.device().clone(), c.compute_dtype());
    let size = (opts.size, opts.size);
    let lat = opts.size / pipe.vae_scale_factor();
    stages.add(
        "text encoding",
        time(opts, || {
            conditioning::encode_text(c, PROMPT, None, false, 1, size, &dev)?;
            Ok(())
        })?,
    );
    let text1 = conditioning::encode_text(c, PROMPT, None, false, 1, size, &dev)?;
    // Batch 2 as under CFG: [negative, prompt] with their SDXL pooled embeddings and ids.
    let text2 = conditioning::encode_text(c, PROMPT, None, true, 1, size, &dev)?;
    let x1 = Tensor::randn(0f32, 1.0, (1, c.vae.latent_channels(), lat, lat), &dev)?.to_dtype(dt)?;
    let x2 = Tensor::cat(&[&x1, &x1], 0)?;
    let cond1 = UNetConditioning { added_cond: text1.added_cond.clone(), ..Default::default() };
    let cond2 = UNetConditioning { added_cond: text2.added_cond.clone(), ..Default::default() };
    stages.add(
        "UNet step, batch 1",
        time(opts, || {
            c.unet.forward(&x1, 999.0, &text1.prompt_embeds, &cond1)?;
            Ok(())
        })?,
    );
    stages.add(
        "UNet step, batch 2 (CFG)",
        time(opts, || {
            c.unet.forward(&x2, 999.0, &text2.prompt_embeds, &cond2)?;
            Ok(())
        })?,
    );
    stages.add(
        "VAE decode",
        time(opts, || {
            c.vae.decode(&x1)?;
            Ok(())
        })?,
    );
    // The tiny autoencoder `--vae madebyollin/taesd(xl)` / `--preview` decode with (real config,
    // random weights: the speed does not depend on them).
    let tiny_config = if opts.model == BenchModel::Sdxl { TAESDXL_CONFIG } else { TAESD_CONFIG };
    let tiny = AutoencoderTiny::new(
        random_var_builder(5, dt, &dev),
        &serde_json::from_str::<AutoencoderTinyConfig>(tiny_config)?,
    )?;
    stages.add(
        "tiny VAE decode (TAESD)",
        time(opts, || {
            tiny.decode(&x1)?;
            Ok(())
        })?,
    );
    stages.add(
        &format!("text-to-image, {} LCM steps", opts.steps),
        time(opts, || {
            pipe.generate(&req, |_, _| {})?;
            Ok(())
        })?,
    );
    // The fast mode's whole image: the same with the tiny autoencoder (`--vae madebyollin/taesd`).
    pipe.components.vae = Autoencoder::Tiny(tiny);
    stages.add(
        &format!("text-to-image, {} LCM steps, tiny VAE", opts.steps),
        time(opts, || {
            pipe.generate(&req, |_, _| {})?;
            Ok(())
        })?,
    );
    Ok(())
}

/// AnimateDiff: one UNet step over the whole clip, the frame-by-frame VAE decode, the whole
/// animation (guidance 1: no CFG, as with LCM-LoRA).
fn time_animation_stages(pipe: &LcmPipeline, opts: &BenchOptions, stages: &mut Stages) -> Result<()> {
    let c = &pipe.components;
    let (dev, dt) = (c.device().clone(), c.compute_dtype());
    let f = opts.frames;
    if f == 0 {
        bail!("--frames must be at least 1");
    }
    let req = bench_request(opts, Some(f));
    pipe.plan(&req)?;
    let lat = opts.size / pipe.vae_scale_factor();
    let text = conditioning::encode_text(c, PROMPT, None, false, 1, (opts.size, opts.size), &dev)?;
    let ehs = crate::ops::repeat_interleave(&text.prompt_embeds, f)?;
    let x = Tensor::randn(0f32, 1.0, (1, c.vae.latent_channels(), f, lat, lat), &dev)?.to_dtype(dt)?;
    let cond = UNetConditioning { num_frames: Some(f), ..Default::default() };
    stages.add(
        &format!("UNet step, {f} frames"),
        time(opts, || {
            c.unet.forward_frames(&x, 999.0, &ehs, &cond)?;
            Ok(())
        })?,
    );
    stages.add(
        &format!("VAE decode, {f} frames one by one"),
        time(opts, || {
            for k in 0..f {
                c.vae.decode(&x.narrow(2, k, 1)?.squeeze(2)?)?;
            }
            Ok(())
        })?,
    );
    stages.add(
        &format!("animation, {f} frames, {} LCM steps", opts.steps),
        time(opts, || {
            pipe.animate(&req, |_, _| {})?;
            Ok(())
        })?,
    );
    Ok(())
}

impl BenchReport {
    /// A table for people.
    pub fn table(&self) -> String {
        let frames = self.frames.map_or(String::new(), |f| format!(", {f} frames"));
        let mut s = format!(
            "{} at {}x{}{frames} on {}, {} weights ({} compute), {} threads, CPU path {}; GEMM ({} weights) {:.1} GFLOP/s\n{:<40} {:>9} {:>9} {:>9} {:>8}\n",
            self.model, self.size, self.size, self.device, self.dtype, self.compute_dtype, self.threads, self.cpu_path, self.dtype, self.gemm_gflops, "stage", "seconds", "GFLOP", "GFLOP/s", "% GEMM"
        );
        for st in &self.stages {
            s.push_str(&format!(
                "{:<40} {:>9.3} {:>9.1} {:>9.1} {:>7.0}%\n",
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
