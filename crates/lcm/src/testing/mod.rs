//! Tools for tests, benchmarks and examples, not needed to generate: real architectures with
//! deterministic random weights (as [`candle_nn::VarBuilder`]s, or written once as diffusers
//! folders that diffusers loads too), and key listings of real checkpoints turned into
//! random-valued single files.

use crate::loaders::single_file::Architecture;
use crate::models::clip_text_model::{ClipTextConfig, ClipTextModel, ClipTextModelWithProjection};
use crate::models::unet::motion::{MotionAdapterConfig, MotionModules};
use crate::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::models::vae::kl::{AutoencoderKL, AutoencoderKLConfig};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const MOTION_ADAPTER_CONFIG: &str = include_str!("configs/motion_adapter_v1-5-2.json");
/// madebyollin/taesd and madebyollin/taesdxl.
pub const TAESD_CONFIG: &str = include_str!("configs/taesd.json");
pub const TAESDXL_CONFIG: &str = include_str!("configs/taesdxl.json");
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

/// A real architecture with random weights (the same compute as real ones): what `lcm bench`
/// times and diffusers loads from the same folder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RandomModel {
    Sd15,
    Sdxl,
    AnimateDiff,
}

impl std::str::FromStr for RandomModel {
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

impl RandomModel {
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

    pub fn description(self) -> &'static str {
        match self {
            Self::Sd15 => "SD1.5 architecture, random weights",
            Self::Sdxl => "SDXL architecture, random weights",
            Self::AnimateDiff => "AnimateDiff (SD1.5 + motion adapter v1-5-2), random weights",
        }
    }
}

/// Whether the random-weight folder `model` needs is complete in `dir` (so [`write_folder`] will
/// not write anything).
pub fn folder_complete(model: RandomModel, dir: &Path) -> bool {
    dir.join("model_index.json").is_file()
        && (model != RandomModel::AnimateDiff || dir.join("motion_adapter/config.json").is_file())
}

/// Write the random-weight folder `model` needs (skipping what is there already).
pub fn write_folder(model: RandomModel, dir: &Path) -> Result<()> {
    match model {
        RandomModel::Sd15 => write_sd15_folder(dir),
        RandomModel::Sdxl => write_sdxl_folder(dir),
        RandomModel::AnimateDiff => {
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

fn save_weights(record: &RecordedWeights, path: &Path) -> Result<()> {
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
    // The real runwayml/stable-diffusion-v1-5 configs, as single-file loading uses them.
    let c = Architecture::Sd15.configs();
    write(&dir.join("unet/config.json"), c.unet)?;
    write(&dir.join("vae/config.json"), c.vae)?;
    write(&dir.join("text_encoder/config.json"), c.text_encoder)?;
    write_tokenizer(&dir.join("tokenizer"), c.tokenizer)?;
    write(&dir.join("scheduler/scheduler_config.json"), SCHEDULER_CONFIG)?;

    save_random(dir, "unet/diffusion_pytorch_model.safetensors", 1, |vb| {
        UNet2DConditionModel::new(vb, &serde_json::from_str::<UNet2DConditionConfig>(c.unet)?)?;
        Ok(())
    })?;
    save_random(dir, "vae/diffusion_pytorch_model.safetensors", 2, |vb| {
        AutoencoderKL::new(vb, &serde_json::from_str::<AutoencoderKLConfig>(c.vae)?)?;
        Ok(())
    })?;
    save_random(dir, "text_encoder/model.safetensors", 3, |vb| {
        ClipTextModel::new(vb, &serde_json::from_str::<ClipTextConfig>(c.text_encoder)?)?;
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

/// CLIP's vocabulary and merges (the same for every Stable Diffusion tokenizer) with a
/// `tokenizer_config.json` and `special_tokens_map.json`.
fn write_tokenizer(dir: &Path, (config, special_tokens): (&str, &str)) -> Result<()> {
    write(&dir.join("vocab.json"), &crate::models::clip_tokenizer::clip_vocab_json())?;
    write(&dir.join("merges.txt"), crate::models::clip_tokenizer::CLIP_BPE_MERGES)?;
    write(&dir.join("tokenizer_config.json"), config)?;
    write(&dir.join("special_tokens_map.json"), special_tokens)
}

/// Write the random-weight SDXL folder (real stabilityai/stable-diffusion-xl-base-1.0 configs,
/// LCMScheduler; ~14 GB in f32) unless `dir/model_index.json` exists already.
pub fn write_sdxl_folder(dir: &Path) -> Result<()> {
    if dir.join("model_index.json").is_file() {
        return Ok(());
    }
    let c = Architecture::Sdxl.configs();
    let (Some(text_encoder_2), Some(tokenizer_2)) = (c.text_encoder_2, c.tokenizer_2) else {
        bail!("the built-in SDXL configs have no second text encoder")
    };
    write(&dir.join("unet/config.json"), c.unet)?;
    write(&dir.join("vae/config.json"), c.vae)?;
    write(&dir.join("text_encoder/config.json"), c.text_encoder)?;
    write(&dir.join("text_encoder_2/config.json"), text_encoder_2)?;
    write_tokenizer(&dir.join("tokenizer"), c.tokenizer)?;
    write_tokenizer(&dir.join("tokenizer_2"), tokenizer_2)?;
    write(&dir.join("scheduler/scheduler_config.json"), SCHEDULER_CONFIG)?;

    save_random(dir, "unet/diffusion_pytorch_model.safetensors", 11, |vb| {
        UNet2DConditionModel::new(vb, &serde_json::from_str::<UNet2DConditionConfig>(c.unet)?)?;
        Ok(())
    })?;
    save_random(dir, "vae/diffusion_pytorch_model.safetensors", 12, |vb| {
        AutoencoderKL::new(vb, &serde_json::from_str::<AutoencoderKLConfig>(c.vae)?)?;
        Ok(())
    })?;
    save_random(dir, "text_encoder/model.safetensors", 13, |vb| {
        ClipTextModel::new(vb, &serde_json::from_str::<ClipTextConfig>(c.text_encoder)?)?;
        Ok(())
    })?;
    save_random(dir, "text_encoder_2/model.safetensors", 14, |vb| {
        ClipTextModelWithProjection::new(vb, &serde_json::from_str::<ClipTextConfig>(text_encoder_2)?)?;
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
        random_var_builder(1, DType::F32, &dev),
        &serde_json::from_str::<UNet2DConditionConfig>(Architecture::Sd15.configs().unet)?,
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

/// A `VarBuilder` that makes up deterministic random weights for whatever a model asks for:
/// uniform in ±sqrt(3 / fan_in) for matrices and kernels, ones for 1-D weights (norm scales),
/// zeros for 1-D biases. For building real architectures without their weights (tests,
/// benchmarks).
pub fn random_var_builder(seed: u64, dtype: DType, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(
        Box::new(RandomWeights { state: std::sync::atomic::AtomicU64::new(seed | 1), record: None }),
        dtype,
        device.clone(),
    )
}

/// Weights a [`recording_random_var_builder`] handed out, by name (to save as a safetensors file).
pub type RecordedWeights = Arc<std::sync::Mutex<std::collections::HashMap<String, Tensor>>>;

/// [`random_var_builder`] that also records every weight it makes, so a randomly initialised
/// model can be written out as a diffusers folder (benchmarks).
pub fn recording_random_var_builder(seed: u64, device: &Device) -> (VarBuilder<'static>, RecordedWeights) {
    let record: RecordedWeights = Default::default();
    let backend = RandomWeights { state: std::sync::atomic::AtomicU64::new(seed | 1), record: Some(record.clone()) };
    (VarBuilder::from_backend(Box::new(backend), DType::F32, device.clone()), record)
}

struct RandomWeights {
    state: std::sync::atomic::AtomicU64,
    record: Option<RecordedWeights>,
}

impl SimpleBackend for RandomWeights {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.make(&s, name, dev)?;
        if let Some(r) = &self.record {
            r.lock()
                .map_err(|_| candle_core::Error::Msg("weight record poisoned".into()))?
                .insert(name.to_string(), t.clone());
        }
        t.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights need a shape for {name}")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

impl RandomWeights {
    fn make(&self, s: &Shape, name: &str, dev: &Device) -> candle_core::Result<Tensor> {
        let dims = s.dims();
        if dims.len() == 1 {
            let v = if name.ends_with("weight") { 1.0f32 } else { 0.0 };
            return Tensor::full(v, s, dev);
        }
        let fan_in: usize = dims[1..].iter().product();
        let bound = (3.0 / fan_in as f32).sqrt();
        let mut x = self.state.fetch_add(0x9E37_79B9_7F4A_7C15, std::sync::atomic::Ordering::Relaxed) | 1;
        let data: Vec<f32> = (0..s.elem_count())
            .map(|_| {
                // xorshift64: fast enough to fill billions of weights.
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * bound
            })
            .collect();
        Tensor::from_vec(data, s.clone(), dev)
    }
}

/// The process's peak resident set (Linux `VmHWM`), MB.
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(String::from))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<f64>().ok()))
        .map_or(f64::NAN, |kb| kb / 1024.0)
}
