//! Loading the parts of a Stable Diffusion model (tokenizer, text encoder, UNet, VAE,
//! scheduler config) from a diffusers folder or hub repo, with optional replacements.

use crate::config::read_config;
use crate::loaders::{hub, model_index::standalone_component_dir, weights, ModelIndex, ModelSource};
use crate::models::autoencoder_kl::{AutoencoderKL, AutoencoderKLConfig};
use crate::models::clip_text_model::{ClipTextConfig, ClipTextModel};
use crate::models::clip_tokenizer::ClipTokenizer;
use crate::models::unet_2d_condition::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::schedulers::LcmSchedulerConfig;
use anyhow::{Context, Result};
use candle_core::{DType, Device};
use std::path::{Path, PathBuf};

/// How to load a model: like `from_pretrained(..., variant=, unet=)`.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// `fp16` picks `*.fp16.safetensors`, as diffusers' `variant="fp16"`.
    pub variant: Option<String>,
    /// Replace the UNet (folder or hub id), e.g. an LCM-distilled UNet in a base model.
    pub unet: Option<String>,
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
}

const PIPELINE_FOLDERS: &[&str] = &["unet", "vae", "text_encoder", "tokenizer", "scheduler"];

/// A local pipeline folder for `arg`: the path itself, or a hub snapshot in the HF cache.
fn pipeline_root(arg: &str, variant: Option<&str>, skip_unet: bool) -> Result<PathBuf> {
    match ModelSource::parse(arg)? {
        ModelSource::Local(p) => Ok(p),
        ModelSource::Hub(id) => {
            let folders: Vec<&str> =
                PIPELINE_FOLDERS.iter().copied().filter(|f| !(skip_unet && *f == "unet")).collect();
            hub::snapshot(&id, &folders, variant)
        }
    }
}

fn unet_dir(arg: &str, variant: Option<&str>) -> Result<PathBuf> {
    let root = match ModelSource::parse(arg)? {
        ModelSource::Local(p) => p,
        ModelSource::Hub(id) => hub::snapshot(&id, &[], variant)?,
    };
    standalone_component_dir(&root, "unet", "config.json")
}

impl StableDiffusionComponents {
    pub fn load(model: &str, opts: &LoadOptions, device: &Device) -> Result<Self> {
        let variant = opts.variant.as_deref();
        let root = pipeline_root(model, variant, opts.unet.is_some())?;
        let index = ModelIndex::read(&root)?;
        let dtype = DType::F32;

        let tokenizer_dir = index.component_dir("tokenizer", None)?;
        let tokenizer = ClipTokenizer::from_dir(&tokenizer_dir)?;

        let te_dir = index.component_dir("text_encoder", Some("config.json"))?;
        let te_config: ClipTextConfig = read_config(&te_dir.join("config.json"))?;
        let te_vb = weights::load_component(&te_dir, variant, dtype, device)?;
        let text_encoder = ClipTextModel::new(te_vb, &te_config).context("text_encoder")?;

        let unet_dir = match &opts.unet {
            Some(arg) => unet_dir(arg, variant)?,
            None => index.component_dir("unet", Some("config.json"))?,
        };
        let unet_config: UNet2DConditionConfig = read_config(&unet_dir.join("config.json"))?;
        let unet_vb = weights::load_component(&unet_dir, variant, dtype, device)?;
        let unet = UNet2DConditionModel::new(unet_vb, &unet_config).context("unet")?;

        let vae_dir = index.component_dir("vae", Some("config.json"))?;
        let vae_config: AutoencoderKLConfig = read_config(&vae_dir.join("config.json"))?;
        let vae_vb = weights::load_component(&vae_dir, variant, dtype, device)?;
        let vae = AutoencoderKL::new(vae_vb, &vae_config).context("vae")?;

        let sched_dir = index.component_dir("scheduler", Some("scheduler_config.json"))?;
        let scheduler_config: LcmSchedulerConfig = read_config(&sched_dir.join("scheduler_config.json"))?;

        Ok(Self {
            name: display_name(model),
            pipeline_class: index.class_name,
            tokenizer,
            text_encoder,
            unet,
            unet_config,
            vae,
            vae_config,
            scheduler_config,
        })
    }
}

fn display_name(model: &str) -> String {
    let p = Path::new(model);
    if p.exists() {
        p.file_name().and_then(|n| n.to_str()).unwrap_or(model).to_string()
    } else {
        model.to_string()
    }
}
