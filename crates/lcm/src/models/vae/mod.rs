//! The autoencoder a pipeline decodes (and encodes) with: diffusers' pipelines take any
//! `AutoencoderKL` or `AutoencoderTiny` as `vae=` and use only what both have.

pub mod blocks;
pub mod kl;
pub mod tiny;

use crate::config::read_config;
use crate::loaders::weights::{ComponentWeights, Precision};
use crate::models::vae::kl::{AutoencoderKL, AutoencoderKLConfig};
use crate::models::vae::tiny::{AutoencoderTiny, AutoencoderTinyConfig};
use crate::random::TorchGenerator;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::path::Path;

// One per pipeline (and one for previews): the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum Autoencoder {
    Kl(AutoencoderKL),
    /// TAESD / TAESDXL: a distilled decoder, far faster on CPU.
    Tiny(AutoencoderTiny),
}

impl Autoencoder {
    /// An autoencoder folder (`config.json` + weights), by its config's `_class_name`, with its
    /// weights kept at `precision` (a `DType`, or `--dtype`'s [`Precision`]).
    pub fn load(dir: &Path, variant: Option<&str>, precision: impl Into<Precision>, device: &Device) -> Result<Self> {
        Self::load_with(dir, variant, |_| precision.into(), device)
    }

    /// [`load`](Self::load) with the precision chosen from the config's `force_upcast` (a
    /// pipeline's rule: SDXL runs such an autoencoder in f32 when the model is in half precision).
    pub fn load_with(
        dir: &Path,
        variant: Option<&str>,
        precision: impl FnOnce(bool) -> Precision,
        device: &Device,
    ) -> Result<Self> {
        let config_path = dir.join("config.json");
        let raw: serde_json::Value = read_config(&config_path)?;
        let class = raw.get("_class_name").and_then(|c| c.as_str()).unwrap_or("AutoencoderKL");
        let weights = ComponentWeights::open(dir, variant)?;
        let what = || format!("autoencoder {}", dir.display());
        Ok(match class {
            "AutoencoderKL" => {
                let config: AutoencoderKLConfig = read_config(&config_path)?;
                let vb = weights.var_builder(None, precision(config.force_upcast), device);
                Self::Kl(AutoencoderKL::new(vb, &config).with_context(what)?)
            }
            "AutoencoderTiny" => {
                let config: AutoencoderTinyConfig = read_config(&config_path)?;
                let vb = weights.var_builder(None, precision(config.force_upcast), device);
                Self::Tiny(AutoencoderTiny::new(vb, &config).with_context(what)?)
            }
            other => bail!("{} holds a `{other}`, not an AutoencoderKL or AutoencoderTiny", dir.display()),
        })
    }

    /// The dtype it computes in (f32 for an upcast SDXL autoencoder in an f16 pipeline).
    pub fn dtype(&self) -> DType {
        match self {
            Self::Kl(v) => v.dtype,
            Self::Tiny(v) => v.dtype,
        }
    }

    pub fn is_tiny(&self) -> bool {
        matches!(self, Self::Tiny(_))
    }

    /// Channels of the decoder's activations at full resolution (its widest buffers per image).
    pub fn full_resolution_channels(&self) -> usize {
        match self {
            Self::Kl(v) => v.config.block_out_channels.first().copied().unwrap_or(128),
            Self::Tiny(v) => v.config.decoder_block_out_channels.last().copied().unwrap_or(64),
        }
    }

    pub fn latent_channels(&self) -> usize {
        match self {
            Self::Kl(v) => v.config.latent_channels,
            Self::Tiny(v) => v.config.latent_channels,
        }
    }

    /// Latents are multiplied by this before denoising and divided by it before decoding.
    pub fn scaling_factor(&self) -> f64 {
        match self {
            Self::Kl(v) => v.scaling_factor(),
            Self::Tiny(v) => v.scaling_factor(),
        }
    }

    /// Added after unscaling; the Stable Diffusion pipelines never shift a tiny autoencoder's
    /// latents.
    pub fn shift_factor(&self) -> Option<f64> {
        match self {
            Self::Kl(v) => v.shift_factor(),
            Self::Tiny(_) => None,
        }
    }

    /// Pixels per latent pixel, as the pipelines compute it.
    pub fn vae_scale_factor(&self) -> usize {
        match self {
            Self::Kl(v) => v.vae_scale_factor(),
            Self::Tiny(v) => v.vae_scale_factor(),
        }
    }

    /// Unscaled latents (any dtype) -> image in `[-1, 1]`, in the autoencoder's dtype.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let z = z.to_dtype(self.dtype())?;
        Ok(match self {
            Self::Kl(v) => v.decode(&z)?,
            Self::Tiny(v) => v.decode(&z)?,
        })
    }

    /// diffusers' `retrieve_latents(vae.encode(x), generator) * scaling_factor`: a sample of
    /// the KL posterior (one random draw from `generator`), or the tiny encoder's latents (no
    /// draw).
    pub fn encode_scaled(&self, x: &Tensor, generator: &mut TorchGenerator) -> Result<Tensor> {
        let x = &x.to_dtype(self.dtype())?;
        let latents = match self {
            Self::Kl(v) => {
                let dist = v.encode(x)?;
                // `randn_tensor(mean.shape, generator, dtype=vae.dtype)`, drawn on the CPU.
                let noise = generator.randn_on(dist.mean.shape().clone(), dist.mean.dtype(), dist.mean.device())?;
                dist.sample(&noise)?
            }
            Self::Tiny(v) => v.encode(x)?,
        };
        Ok((latents * self.scaling_factor())?)
    }
}
