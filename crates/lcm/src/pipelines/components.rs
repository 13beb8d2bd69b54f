//! Loading the parts of a Stable Diffusion model (tokenizer, text encoder, UNet, VAE,
//! scheduler config) from a diffusers folder or hub repo, with optional replacements.

use crate::config::{read_config, PerBlock};
use crate::loaders::lora::{LoraComponent, WeightIndex};
use crate::loaders::single_file::{self, Component, SingleFile};
use crate::loaders::weights::{ComponentWeights, Precision, WeightDType};
use crate::loaders::{hub, model_index::resolve_component, ModelIndex, ModelSource};
use crate::models::clip_text_model::{ClipTextConfig, ClipTextModel, ClipTextModelWithProjection};
use crate::models::clip_tokenizer::ClipTokenizer;
use crate::models::unet::motion::{read_motion_config, MotionAdapterConfig, MotionModules};
use crate::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::models::vae::kl::{AutoencoderKL, AutoencoderKLConfig};
use crate::models::vae::Autoencoder;
use crate::pipelines::lora_set::{LoraReport, LoraSet, LoraSpec};
use crate::pipelines::PipelineKind;
use crate::schedulers::LcmSchedulerConfig;
use anyhow::{Context, Result};
use candle_core::{DType, Device};
use std::path::{Path, PathBuf};

/// How to load a model: like `from_pretrained(..., variant=, unet=, torch_dtype=).to(device)`.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Where the networks run (`lcm::device::parse("cuda:0")`); CPU by default.
    pub device: DeviceChoice,
    /// The activations' dtype. Default: f32 on the CPU (our kernels widen half-precision
    /// weights), the weights' dtype (`dtype`) on a GPU, as diffusers computes in `torch_dtype`.
    pub compute_dtype: Option<DType>,
    /// `fp16` picks `*.fp16.safetensors`, as diffusers' `variant="fp16"`.
    pub variant: Option<String>,
    /// Replace the UNet (folder or hub id), e.g. an LCM-distilled UNet in a base model.
    pub unet: Option<String>,
    /// LoRAs fused into the UNet and text encoder at load (`load_lora_weights` + `set_adapters`).
    pub loras: Vec<LoraSpec>,
    /// AnimateDiff `MotionAdapter` (folder or hub id): the UNet becomes `UNetMotionModel`.
    /// Loaded before the LoRAs, so motion LoRAs find its weights.
    pub motion_adapter: Option<String>,
    /// Replace the autoencoder (folder or hub id), as `pipeline(vae=...)`: an `AutoencoderKL`
    /// (e.g. an fp16-fix SDXL VAE) or an `AutoencoderTiny` (TAESD / TAESDXL).
    pub vae: Option<String>,
    /// The precision the weights are kept in (`--dtype`), whatever the files store. On the
    /// CPU the activations stay f32: f16 / bf16 halve the weights' memory.
    pub dtype: WeightDType,
    /// Follow another diffusers pipeline than the model's `model_index.json` names, as
    /// instantiating another pipeline class on the same folder does (e.g. an LCM folder through
    /// `StableDiffusionPipeline`). `None`: the folder's (AnimateDiff with a motion adapter).
    pub pipeline: Option<PipelineKind>,
}

/// A `candle_core::Device` that defaults to the CPU (so `LoadOptions` can be `Default`).
#[derive(Clone, Debug)]
pub struct DeviceChoice(pub Device);

impl Default for DeviceChoice {
    fn default() -> Self {
        Self(Device::Cpu)
    }
}

impl From<Device> for DeviceChoice {
    fn from(d: Device) -> Self {
        Self(d)
    }
}

impl LoadOptions {
    /// The weights' and activations' dtypes on `device`.
    pub fn precision(&self, device: &Device) -> Precision {
        let p = self.dtype.precision(device);
        Precision { compute: self.compute_dtype.unwrap_or(p.compute), ..p }
    }
}

/// The autoencoder's precision: diffusers' SDXL pipelines run an `AutoencoderKL` whose config
/// sets `force_upcast` in float32 when the model is in float16 / bfloat16 (`upcast_vae`); the
/// SD1.x / SD2.x and AnimateDiff pipelines keep it in the model's dtype.
pub fn vae_precision(pipeline: PipelineKind, force_upcast: bool, p: Precision) -> Precision {
    // Autoencoders are never 8-bit: the decoded pixels are the output.
    let p = p.float();
    if pipeline == PipelineKind::StableDiffusionXL && force_upcast && p.compute != DType::F32 {
        Precision::from(DType::F32)
    } else {
        p
    }
}

/// An autoencoder folder for `kind`'s pipeline (the model's replacement `vae`, or a tiny one for
/// previews), at the precision that pipeline runs it in ([`vae_precision`]).
pub fn load_vae(dir: &Path, kind: PipelineKind, precision: Precision, device: &Device) -> Result<Autoencoder> {
    Autoencoder::load_with(dir, None, |force_upcast| vae_precision(kind, force_upcast, precision), device)
}

/// Every network a Stable Diffusion pipeline needs, loaded.
pub struct StableDiffusionComponents {
    pub name: String,
    /// The pipeline whose semantics apply, resolved once at load ([`PipelineKind::resolve`]).
    pub kind: PipelineKind,
    /// Whether `kind` was asked for (`LoadOptions::pipeline`) rather than read from the model.
    pub kind_requested: bool,
    /// The precision the weights are kept in, as asked (`LoadOptions::dtype`).
    pub weight_dtype: WeightDType,
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    pub unet: UNet2DConditionModel,
    pub unet_config: UNet2DConditionConfig,
    /// The model's autoencoder, or the `vae` replacing it (`LoadOptions::vae`).
    pub vae: Autoencoder,
    pub scheduler_config: LcmSchedulerConfig,
    pub text_encoder_config: ClipTextConfig,
    /// SDXL: the second text encoder; `None` for SD1.x / SD2.x.
    pub text_encoder_2: Option<SecondTextEncoder>,
    pub force_zeros_for_empty_prompt: bool,
    /// Loaded LoRAs and what loading them matched.
    pub loras: LoraSet,
    pub lora_reports: Vec<LoraReport>,
    /// AnimateDiff: the motion adapter whose modules the UNet carries.
    pub motion: Option<MotionAdapterWeights>,
    text_encoder_weights: ComponentWeights,
    unet_weights: ComponentWeights,
    precision: Precision,
    device: Device,
}

/// A loaded `MotionAdapter`: its config and weight files (LoRAs are fused into them
/// like into the UNet's).
pub struct MotionAdapterWeights {
    pub name: String,
    pub config: MotionAdapterConfig,
    weights: ComponentWeights,
}

/// The UNet's weight names plus the motion adapter's, as one index for LoRA matching: motion
/// LoRAs name `unet.down_blocks.0.motion_modules...`.
struct UnetIndex<'a> {
    unet: &'a ComponentWeights,
    motion: Option<&'a ComponentWeights>,
    names: Vec<String>,
}

impl<'a> UnetIndex<'a> {
    fn new(unet: &'a ComponentWeights, motion: Option<&'a MotionAdapterWeights>) -> Self {
        let motion = motion.map(|m| &m.weights);
        let mut names = unet.names().to_vec();
        if let Some(m) = motion {
            names.extend(m.names().iter().cloned());
        }
        Self { unet, motion, names }
    }
}

impl WeightIndex for UnetIndex<'_> {
    fn names(&self) -> &[String] {
        &self.names
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.unet.shape(name).or_else(|| self.motion.and_then(|m| m.shape(name)))
    }
}

/// SDXL's second text encoder (`CLIPTextModelWithProjection`) with its tokenizer.
pub struct SecondTextEncoder {
    pub tokenizer: ClipTokenizer,
    pub model: ClipTextModelWithProjection,
    pub config: ClipTextConfig,
    weights: ComponentWeights,
}

/// A local pipeline folder for `arg`: the path itself, or a hub snapshot in the HF cache.
fn pipeline_root(arg: &str, variant: Option<&str>, skip_unet: bool) -> Result<PathBuf> {
    match ModelSource::parse(arg)? {
        ModelSource::Local(p) => Ok(p),
        ModelSource::Hub(id) => {
            let folders: Vec<&str> =
                hub::PIPELINE_FOLDERS.iter().copied().filter(|f| !(skip_unet && *f == "unet")).collect();
            hub::snapshot(&id, &folders, variant, "model_index.json")
        }
    }
}

/// What a model source provides before anything is built: configs, tokenizers and weight
/// files (with diffusers' names), from a diffusers folder or a single-file checkpoint.
struct ModelParts {
    pipeline_class: String,
    force_zeros_for_empty_prompt: bool,
    tokenizer: ClipTokenizer,
    text_encoder: (ClipTextConfig, ComponentWeights),
    text_encoder_2: Option<(ClipTokenizer, ClipTextConfig, ComponentWeights)>,
    unet: (UNet2DConditionConfig, ComponentWeights),
    vae: (AutoencoderKLConfig, ComponentWeights),
    scheduler: LcmSchedulerConfig,
}

/// The parts of a diffusers pipeline folder (or hub repo).
fn folder_parts(model: &str, opts: &LoadOptions) -> Result<ModelParts> {
    let variant = opts.variant.as_deref();
    let root = pipeline_root(model, variant, opts.unet.is_some())?;
    let index = ModelIndex::read(&root)?;
    PipelineKind::check_class_name(&index.class_name)
        .with_context(|| format!("{}", root.join("model_index.json").display()))?;
    let tokenizer = ClipTokenizer::from_dir(index.component_dir("tokenizer", None)?)?;
    let text_encoder = component_parts(&index.component_dir("text_encoder", Some("config.json"))?, variant)?;
    let text_encoder_2 = if index.has("text_encoder_2") {
        let (config, weights) = component_parts(&index.component_dir("text_encoder_2", Some("config.json"))?, variant)?;
        let tokenizer = ClipTokenizer::from_dir(index.component_dir("tokenizer_2", None)?)?;
        Some((tokenizer, config, weights))
    } else {
        None
    };
    let unet = match &opts.unet {
        // Replaced below; the pipeline's own UNet is not read (nor downloaded).
        Some(arg) => component_parts(&resolve_component(arg, "unet", variant)?, variant)?,
        None => component_parts(&index.component_dir("unet", Some("config.json"))?, variant)?,
    };
    let vae = component_parts(&index.component_dir("vae", Some("config.json"))?, variant)?;
    let sched_dir = index.component_dir("scheduler", Some("scheduler_config.json"))?;
    Ok(ModelParts {
        pipeline_class: index.class_name,
        force_zeros_for_empty_prompt: index.force_zeros_for_empty_prompt,
        tokenizer,
        text_encoder,
        text_encoder_2,
        unet,
        vae,
        scheduler: read_config(&sched_dir.join("scheduler_config.json"))?,
    })
}

/// A component folder's config and weights.
fn component_parts<C: serde::de::DeserializeOwned>(dir: &Path, variant: Option<&str>) -> Result<(C, ComponentWeights)> {
    Ok((read_config(&dir.join("config.json"))?, ComponentWeights::open(dir, variant)?))
}

/// The parts of a single-file checkpoint: its weights renamed, with the configs and tokenizers
/// diffusers' `from_single_file` would fetch for its architecture.
fn single_file_parts(path: &Path) -> Result<ModelParts> {
    let file = SingleFile::open(path)?;
    let configs = file.arch.configs();
    let unet_config: UNet2DConditionConfig = builtin_config("unet", configs.unet)?;
    let vae_config: AutoencoderKLConfig = builtin_config("vae", configs.vae)?;
    // diffusers' converter reads `layers_per_block` as one number.
    let layers_per_block = match &unet_config.layers_per_block {
        PerBlock::One(n) => *n,
        PerBlock::Each(v) => v.first().copied().unwrap_or(0),
    };
    let loaded = |what: &str, c: Component, lpb: usize, up: usize| {
        file.component(c, lpb, up).with_context(|| format!("{}: {what}", path.display()))
    };
    let text_encoder_2 = match (configs.text_encoder_2, configs.tokenizer_2) {
        (Some(config), Some((tok, special))) => Some((
            ClipTokenizer::embedded(tok, special)?,
            builtin_config("text_encoder_2", config)?,
            loaded("text_encoder_2", Component::TextEncoder2, 0, 0)?,
        )),
        _ => None,
    };
    let index: serde_json::Value = builtin_config("model_index", configs.model_index)?;
    Ok(ModelParts {
        pipeline_class: index["_class_name"].as_str().unwrap_or_default().to_string(),
        force_zeros_for_empty_prompt: index["force_zeros_for_empty_prompt"].as_bool().unwrap_or(true),
        tokenizer: ClipTokenizer::embedded(configs.tokenizer.0, configs.tokenizer.1)?,
        text_encoder: (
            builtin_config("text_encoder", configs.text_encoder)?,
            loaded("text_encoder", Component::TextEncoder, 0, 0)?,
        ),
        text_encoder_2,
        unet: (unet_config.clone(), loaded("unet", Component::Unet, layers_per_block, 0)?),
        vae: (vae_config.clone(), loaded("vae", Component::Vae, 0, vae_config.up_block_types.len())?),
        scheduler: builtin_config("scheduler", configs.scheduler)?,
    })
}

fn builtin_config<T: serde::de::DeserializeOwned>(what: &str, text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| anyhow::anyhow!("built-in {what} config: {e}"))
}

/// Whether a model argument names one checkpoint file rather than a folder or hub repo.
fn is_single_file(model: &str) -> bool {
    let p = Path::new(model);
    p.is_file() || (!p.is_dir() && (model.ends_with(".safetensors") || single_file::is_pickle(p)))
}

impl StableDiffusionComponents {
    /// The activations' dtype (f32 on the CPU unless `LoadOptions::compute_dtype` says
    /// otherwise; the weights' dtype on a GPU).
    pub fn compute_dtype(&self) -> DType {
        self.precision.compute
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The weights' and activations' dtypes every network of this pipeline is built with
    /// (ControlNets and T2I-Adapters added later too).
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Load a pipeline from a diffusers folder, a hub repo id, or a single-file checkpoint
    /// (`.safetensors` in the original layout), on `opts.device`.
    pub fn load(model: &str, opts: &LoadOptions) -> Result<Self> {
        let device = &opts.device.0;
        let variant = opts.variant.as_deref();
        let single_file = is_single_file(model);
        let mut parts = if single_file { single_file_parts(Path::new(model))? } else { folder_parts(model, opts)? };
        // A folder's `--unet` is resolved by `folder_parts` (so the hub download skips the
        // pipeline's own UNet); a single file's is swapped in here.
        if let (Some(arg), true) = (&opts.unet, single_file) {
            parts.unet = component_parts(&resolve_component(arg, "unet", variant)?, variant)?;
        }
        let ModelParts {
            pipeline_class,
            force_zeros_for_empty_prompt,
            tokenizer,
            text_encoder,
            text_encoder_2: second,
            unet,
            vae,
            scheduler,
        } = parts;
        let (te_config, text_encoder_weights) = text_encoder;
        let (unet_config, unet_weights) = unet;
        let (vae_config, vae_weights) = vae;
        let precision = opts.precision(device);
        if opts.dtype == WeightDType::Int8 && !device.is_cpu() {
            anyhow::bail!("dtype int8 runs on the CPU only; on a GPU use f16 or bf16");
        }
        let kind = PipelineKind::resolve(&pipeline_class, opts.pipeline, opts.motion_adapter.is_some())?;
        let vae = match &opts.vae {
            // A replacement autoencoder has its own files; the model's variant need not exist there.
            Some(arg) => load_vae(&resolve_component(arg, "vae", None)?, kind, precision, device)
                .with_context(|| format!("--vae {arg}"))?,
            None => {
                let p = vae_precision(kind, vae_config.force_upcast, precision);
                Autoencoder::Kl(
                    AutoencoderKL::new(vae_weights.var_builder(None, p, device), &vae_config).context("vae")?,
                )
            }
        };

        let motion = match &opts.motion_adapter {
            Some(source) => {
                let dir = resolve_component(source, "motion_adapter", None)?;
                let config = read_motion_config(&dir)?;
                let weights = ComponentWeights::open(&dir, None)?;
                Some(MotionAdapterWeights { name: display_name(source), config, weights })
            }
            None => None,
        };

        // LoRAs are matched first so the networks are built once, with the updates fused in.
        let mut loras = LoraSet::default();
        let mut reports = Vec::new();
        let unet_index = UnetIndex::new(&unet_weights, motion.as_ref());
        for spec in &opts.loras {
            let mut targets: Vec<(LoraComponent, &dyn WeightIndex)> =
                vec![(LoraComponent::Unet, &unet_index), (LoraComponent::TextEncoder, &text_encoder_weights)];
            if let Some((_, _, w)) = &second {
                targets.push((LoraComponent::TextEncoder2, w));
            }
            reports.push(loras.add(spec, &targets)?);
        }
        let text_encoder = build_text_encoder(&text_encoder_weights, &te_config, &loras, precision, device)?;
        drop(unet_index);
        let unet = build_unet(&unet_weights, &unet_config, motion.as_ref(), &loras, precision, device)?;
        let text_encoder_2 = match second {
            Some((tokenizer, config, weights)) => {
                let model = build_text_encoder_2(&weights, &config, &loras, precision, device)?;
                Some(SecondTextEncoder { tokenizer, model, config, weights })
            }
            None => None,
        };

        Ok(Self {
            name: display_name(model),
            kind,
            kind_requested: opts.pipeline.is_some(),
            weight_dtype: opts.dtype,
            tokenizer,
            text_encoder,
            text_encoder_config: te_config,
            text_encoder_weights,
            text_encoder_2,
            force_zeros_for_empty_prompt,
            unet,
            unet_config,
            unet_weights,
            vae,
            scheduler_config: scheduler,
            loras,
            lora_reports: reports,
            motion,
            precision,
            device: device.clone(),
        })
    }

    /// Load more LoRAs (active at their weights, like `load_lora_weights`) and rebuild.
    pub fn load_loras(&mut self, specs: &[LoraSpec]) -> Result<Vec<LoraReport>> {
        let mut reports = Vec::new();
        let unet_index = UnetIndex::new(&self.unet_weights, self.motion.as_ref());
        for spec in specs {
            let mut targets: Vec<(LoraComponent, &dyn WeightIndex)> =
                vec![(LoraComponent::Unet, &unet_index), (LoraComponent::TextEncoder, &self.text_encoder_weights)];
            if let Some(t2) = &self.text_encoder_2 {
                targets.push((LoraComponent::TextEncoder2, &t2.weights));
            }
            reports.push(self.loras.add(spec, &targets)?);
        }
        drop(unet_index);
        self.rebuild()?;
        Ok(reports)
    }

    /// `set_adapters(names, adapter_weights)`: only these adapters, at these weights.
    pub fn set_adapters(&mut self, names_and_weights: &[(&str, f64)]) -> Result<()> {
        self.loras.set_active(names_and_weights)?;
        self.rebuild()
    }

    /// `delete_adapters(name)`.
    pub fn delete_adapter(&mut self, name: &str) -> Result<()> {
        self.loras.remove(name)?;
        self.rebuild()
    }

    /// Rebuild the adapted networks from the base weight files (re-read, normally from the page
    /// cache).
    fn rebuild(&mut self) -> Result<()> {
        let p = self.precision;
        self.text_encoder =
            build_text_encoder(&self.text_encoder_weights, &self.text_encoder_config, &self.loras, p, &self.device)?;
        self.unet =
            build_unet(&self.unet_weights, &self.unet_config, self.motion.as_ref(), &self.loras, p, &self.device)?;
        if let Some(t2) = &mut self.text_encoder_2 {
            t2.model = build_text_encoder_2(&t2.weights, &t2.config, &self.loras, p, &self.device)?;
        }
        Ok(())
    }
}

fn build_text_encoder(
    w: &ComponentWeights,
    cfg: &ClipTextConfig,
    loras: &LoraSet,
    precision: Precision,
    device: &Device,
) -> Result<ClipTextModel> {
    // Text encoders stay in floating point in 8-bit mode: they run once per prompt.
    let vb = w.var_builder(loras.combined(LoraComponent::TextEncoder), precision.float(), device);
    ClipTextModel::new(vb, cfg).context("text_encoder")
}

fn build_text_encoder_2(
    w: &ComponentWeights,
    cfg: &ClipTextConfig,
    loras: &LoraSet,
    precision: Precision,
    device: &Device,
) -> Result<ClipTextModelWithProjection> {
    let vb = w.var_builder(loras.combined(LoraComponent::TextEncoder2), precision.float(), device);
    ClipTextModelWithProjection::new(vb, cfg).context("text_encoder_2")
}

fn build_unet(
    w: &ComponentWeights,
    cfg: &UNet2DConditionConfig,
    motion: Option<&MotionAdapterWeights>,
    loras: &LoraSet,
    precision: Precision,
    device: &Device,
) -> Result<UNet2DConditionModel> {
    let deltas = loras.combined(LoraComponent::Unet);
    let vb = w.var_builder(deltas.clone(), precision, device);
    let unet = UNet2DConditionModel::new(vb, cfg).context("unet")?;
    Ok(match motion {
        Some(m) => {
            let vb = m.weights.var_builder(deltas, precision, device);
            let modules =
                MotionModules::new(vb, &m.config, &unet).with_context(|| format!("motion adapter {}", m.name))?;
            unet.with_motion(modules)
        }
        None => unet,
    })
}

/// How a model source is shown (PNG parameters, reports): a path's last component, else the id.
pub(crate) fn display_name(model: &str) -> String {
    let p = Path::new(model);
    if p.exists() {
        p.file_name().and_then(|n| n.to_str()).unwrap_or(model).to_string()
    } else {
        model.to_string()
    }
}
