//! Loading the parts of a Stable Diffusion model (tokenizer, text encoder, UNet, VAE,
//! scheduler config) from a diffusers folder or hub repo, with optional replacements.

use crate::config::read_config;
use crate::loaders::lora::{LoraComponent, WeightIndex};
use crate::loaders::weights::{self, ComponentWeights, Precision, WeightDType};
use crate::loaders::{hub, model_index::resolve_component, ModelIndex, ModelSource};
use crate::pipelines::adapters::{AdapterSet, LoraReport, LoraSpec};
use crate::models::autoencoder_kl::{AutoencoderKL, AutoencoderKLConfig};
use crate::models::clip_text_model::{ClipTextConfig, ClipTextModel, ClipTextModelWithProjection};
use crate::models::clip_tokenizer::ClipTokenizer;
use crate::models::motion_adapter::{read_motion_config, MotionAdapterConfig, MotionModules};
use crate::models::unet_2d_condition::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::schedulers::LcmSchedulerConfig;
use anyhow::{Context, Result};
use candle_core::Device;
use std::path::{Path, PathBuf};

/// How to load a model: like `from_pretrained(..., variant=, unet=)`.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// `fp16` picks `*.fp16.safetensors`, as diffusers' `variant="fp16"`.
    pub variant: Option<String>,
    /// Replace the UNet (folder or hub id), e.g. an LCM-distilled UNet in a base model.
    pub unet: Option<String>,
    /// LoRAs fused into the UNet and text encoder at load (`load_lora_weights` + `set_adapters`).
    pub loras: Vec<LoraSpec>,
    /// AnimateDiff `MotionAdapter` (folder or hub id): the UNet becomes `UNetMotionModel`.
    /// Loaded before the LoRAs, so motion LoRAs find its weights.
    pub motion_adapter: Option<String>,
    /// The precision the weights are kept in (`--dtype`), whatever the files store. On the
    /// CPU the activations stay f32: f16 / bf16 halve the weights' memory.
    pub dtype: WeightDType,
}

/// Every network a Stable Diffusion pipeline needs, loaded.
pub struct StableDiffusionComponents {
    pub name: String,
    pub pipeline_class: String,
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    pub unet: UNet2DConditionModel,
    pub unet_config: UNet2DConditionConfig,
    pub vae: AutoencoderKL,
    pub vae_config: AutoencoderKLConfig,
    pub scheduler_config: LcmSchedulerConfig,
    pub text_encoder_config: ClipTextConfig,
    /// SDXL: the second text encoder; `None` for SD1.x / SD2.x.
    pub text_encoder_2: Option<SecondTextEncoder>,
    pub force_zeros_for_empty_prompt: bool,
    /// Loaded LoRA adapters and what loading them matched.
    pub adapters: AdapterSet,
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

const PIPELINE_FOLDERS: &[&str] =
    &["unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler"];

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
                PIPELINE_FOLDERS.iter().copied().filter(|f| !(skip_unet && *f == "unet")).collect();
            hub::snapshot(&id, &folders, variant, "model_index.json")
        }
    }
}

impl StableDiffusionComponents {
    pub fn load(model: &str, opts: &LoadOptions, device: &Device) -> Result<Self> {
        let variant = opts.variant.as_deref();
        let root = pipeline_root(model, variant, opts.unet.is_some())?;
        let index = ModelIndex::read(&root)?;
        let precision = opts.dtype.precision(device);

        let tokenizer_dir = index.component_dir("tokenizer", None)?;
        let tokenizer = ClipTokenizer::from_dir(&tokenizer_dir)?;

        let te_dir = index.component_dir("text_encoder", Some("config.json"))?;
        let te_config: ClipTextConfig = read_config(&te_dir.join("config.json"))?;
        let text_encoder_weights = ComponentWeights::open(&te_dir, variant)?;

        let second = if index.has("text_encoder_2") {
            let dir = index.component_dir("text_encoder_2", Some("config.json"))?;
            let config: ClipTextConfig = read_config(&dir.join("config.json"))?;
            let weights = ComponentWeights::open(&dir, variant)?;
            let tokenizer = ClipTokenizer::from_dir(&index.component_dir("tokenizer_2", None)?)?;
            Some((tokenizer, config, weights))
        } else {
            None
        };

        let unet_dir = match &opts.unet {
            Some(arg) => resolve_component(arg, "unet", variant)?,
            None => index.component_dir("unet", Some("config.json"))?,
        };
        let unet_config: UNet2DConditionConfig = read_config(&unet_dir.join("config.json"))?;
        let unet_weights = ComponentWeights::open(&unet_dir, variant)?;

        let vae_dir = index.component_dir("vae", Some("config.json"))?;
        let vae_config: AutoencoderKLConfig = read_config(&vae_dir.join("config.json"))?;
        let vae_vb = weights::load_component(&vae_dir, variant, precision, device)?;
        let vae = AutoencoderKL::new(vae_vb, &vae_config).context("vae")?;

        let motion = match &opts.motion_adapter {
            Some(source) => {
                let dir = resolve_component(source, "motion_adapter", None)?;
                let config = read_motion_config(&dir)?;
                let weights = ComponentWeights::open(&dir, None)?;
                Some(MotionAdapterWeights { name: display_name(source), config, weights })
            }
            None => None,
        };

        let sched_dir = index.component_dir("scheduler", Some("scheduler_config.json"))?;
        let scheduler_config: LcmSchedulerConfig = read_config(&sched_dir.join("scheduler_config.json"))?;

        // LoRAs are matched first so the networks are built once, with the updates fused in.
        let mut adapters = AdapterSet::default();
        let mut reports = Vec::new();
        let unet_index = UnetIndex::new(&unet_weights, motion.as_ref());
        for spec in &opts.loras {
            let mut targets: Vec<(LoraComponent, &dyn WeightIndex)> =
                vec![(LoraComponent::Unet, &unet_index), (LoraComponent::TextEncoder, &text_encoder_weights)];
            if let Some((_, _, w)) = &second {
                targets.push((LoraComponent::TextEncoder2, w));
            }
            reports.push(adapters.add(spec, &targets)?);
        }
        let text_encoder = build_text_encoder(&text_encoder_weights, &te_config, &adapters, precision, device)?;
        drop(unet_index);
        let unet = build_unet(&unet_weights, &unet_config, motion.as_ref(), &adapters, precision, device)?;
        let text_encoder_2 = match second {
            Some((tokenizer, config, weights)) => {
                let model = build_text_encoder_2(&weights, &config, &adapters, precision, device)?;
                Some(SecondTextEncoder { tokenizer, model, config, weights })
            }
            None => None,
        };

        Ok(Self {
            name: display_name(model),
            pipeline_class: index.class_name,
            tokenizer,
            text_encoder,
            text_encoder_config: te_config,
            text_encoder_weights,
            text_encoder_2,
            force_zeros_for_empty_prompt: index.force_zeros_for_empty_prompt,
            unet,
            unet_config,
            unet_weights,
            vae,
            vae_config,
            scheduler_config,
            adapters,
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
            reports.push(self.adapters.add(spec, &targets)?);
        }
        drop(unet_index);
        self.rebuild()?;
        Ok(reports)
    }

    /// `set_adapters(names, adapter_weights)`: only these adapters, at these weights.
    pub fn set_adapters(&mut self, names_and_weights: &[(&str, f64)]) -> Result<()> {
        self.adapters.set_active(names_and_weights)?;
        self.rebuild()
    }

    /// `delete_adapters(name)`.
    pub fn delete_adapter(&mut self, name: &str) -> Result<()> {
        self.adapters.remove(name)?;
        self.rebuild()
    }

    /// Rebuild the adapted networks from the base weight files (re-read, normally from the page
    /// cache).
    fn rebuild(&mut self) -> Result<()> {
        let p = self.precision;
        self.text_encoder = build_text_encoder(&self.text_encoder_weights, &self.text_encoder_config, &self.adapters, p, &self.device)?;
        self.unet = build_unet(&self.unet_weights, &self.unet_config, self.motion.as_ref(), &self.adapters, p, &self.device)?;
        if let Some(t2) = &mut self.text_encoder_2 {
            t2.model = build_text_encoder_2(&t2.weights, &t2.config, &self.adapters, p, &self.device)?;
        }
        Ok(())
    }
}

fn build_text_encoder(w: &ComponentWeights, cfg: &ClipTextConfig, adapters: &AdapterSet, precision: Precision, device: &Device) -> Result<ClipTextModel> {
    let vb = w.var_builder(adapters.combined(LoraComponent::TextEncoder), precision, device);
    ClipTextModel::new(vb, cfg).context("text_encoder")
}

fn build_text_encoder_2(
    w: &ComponentWeights,
    cfg: &ClipTextConfig,
    adapters: &AdapterSet,
    precision: Precision,
    device: &Device,
) -> Result<ClipTextModelWithProjection> {
    let vb = w.var_builder(adapters.combined(LoraComponent::TextEncoder2), precision, device);
    ClipTextModelWithProjection::new(vb, cfg).context("text_encoder_2")
}

fn build_unet(
    w: &ComponentWeights,
    cfg: &UNet2DConditionConfig,
    motion: Option<&MotionAdapterWeights>,
    adapters: &AdapterSet,
    precision: Precision,
    device: &Device,
) -> Result<UNet2DConditionModel> {
    let deltas = adapters.combined(LoraComponent::Unet);
    let vb = w.var_builder(deltas.clone(), precision, device);
    let unet = UNet2DConditionModel::new(vb, cfg).context("unet")?;
    Ok(match motion {
        Some(m) => {
            let vb = m.weights.var_builder(deltas, precision, device);
            let modules = MotionModules::new(vb, &m.config, &unet).with_context(|| format!("motion adapter {}", m.name))?;
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
