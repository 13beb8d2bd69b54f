//! The KL autoencoder that maps images to Stable Diffusion latents and back (diffusers
//! `autoencoders/autoencoder_kl.py`), built from its `config.json`.

use crate::config::read_config;
use crate::models::vae::blocks::{Decoder, Encoder, VaeParams};
use crate::nn::{Activation, Conv2d};
use anyhow::{bail, Context};
use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;
use std::path::Path;

pub use crate::models::vae::blocks::DiagonalGaussian;

/// diffusers' `AutoencoderKL` config; absent keys take diffusers' defaults, unknown keys are ignored.
#[derive(Clone, Debug, Deserialize)]
pub struct AutoencoderKLConfig {
    #[serde(default = "d_3")]
    pub in_channels: usize,
    #[serde(default = "d_3")]
    pub out_channels: usize,
    #[serde(default = "d_down")]
    pub down_block_types: Vec<String>,
    #[serde(default = "d_up")]
    pub up_block_types: Vec<String>,
    #[serde(default = "d_boc")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_1")]
    pub layers_per_block: usize,
    #[serde(default = "d_silu")]
    pub act_fn: String,
    #[serde(default = "d_4")]
    pub latent_channels: usize,
    #[serde(default = "d_32")]
    pub norm_num_groups: usize,
    #[serde(default)]
    pub sample_size: Option<serde_json::Value>,
    #[serde(default = "d_scaling")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default)]
    pub latents_mean: Option<Vec<f64>>,
    #[serde(default)]
    pub latents_std: Option<Vec<f64>>,
    /// The pipeline runs the VAE in f32 when the model is f16 (SDXL's VAE overflows in f16).
    #[serde(default = "d_true", deserialize_with = "crate::config::null_false")]
    pub force_upcast: bool,
    #[serde(default = "d_true", deserialize_with = "crate::config::null_false")]
    pub use_quant_conv: bool,
    #[serde(default = "d_true", deserialize_with = "crate::config::null_false")]
    pub use_post_quant_conv: bool,
    #[serde(default = "d_true", deserialize_with = "crate::config::null_false")]
    pub mid_block_add_attention: bool,
}

fn d_3() -> usize {
    3
}
fn d_1() -> usize {
    1
}
fn d_4() -> usize {
    4
}
fn d_32() -> usize {
    32
}
fn d_true() -> bool {
    true
}
fn d_silu() -> String {
    "silu".into()
}
fn d_scaling() -> f64 {
    0.18215
}
fn d_boc() -> Vec<usize> {
    vec![64]
}
fn d_down() -> Vec<String> {
    vec!["DownEncoderBlock2D".into()]
}
fn d_up() -> Vec<String> {
    vec!["UpDecoderBlock2D".into()]
}

impl Default for AutoencoderKLConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("the empty config takes every default")
    }
}

impl AutoencoderKLConfig {
    /// Read `vae/config.json`.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        read_config(path)
    }
}

#[derive(Clone, Debug)]
pub struct AutoencoderKL {
    pub config: AutoencoderKLConfig,
    pub encoder: Encoder,
    pub decoder: Decoder,
    pub quant_conv: Option<Conv2d>,
    pub post_quant_conv: Option<Conv2d>,
    /// The activations' dtype (the `VarBuilder`'s).
    pub dtype: DType,
}

impl AutoencoderKL {
    /// Build the model from `config`, taking the weights from `vb` by diffusers' names.
    pub fn new(vb: VarBuilder, config: &AutoencoderKLConfig) -> anyhow::Result<Self> {
        let c = config;
        let dtype = vb.dtype();
        let n = c.block_out_channels.len();
        if n == 0 || c.block_out_channels.contains(&0) {
            bail!("vae config: block_out_channels {:?} must be non-empty and positive", c.block_out_channels)
        }
        if c.down_block_types.len() != n {
            bail!(
                "vae config: down_block_types has {} entries but block_out_channels has {n}",
                c.down_block_types.len()
            )
        }
        if c.up_block_types.len() != n {
            bail!("vae config: up_block_types has {} entries but block_out_channels has {n}", c.up_block_types.len())
        }
        if let Some(t) = c.down_block_types.iter().find(|t| t.as_str() != "DownEncoderBlock2D") {
            bail!("vae config: down block type `{t}` is not supported (supported: DownEncoderBlock2D)")
        }
        if let Some(t) = c.up_block_types.iter().find(|t| t.as_str() != "UpDecoderBlock2D") {
            bail!("vae config: up block type `{t}` is not supported (supported: UpDecoderBlock2D)")
        }
        if c.latent_channels == 0 {
            bail!("vae config: latent_channels must be positive")
        }
        let p = VaeParams {
            block_out_channels: c.block_out_channels.clone(),
            layers_per_block: c.layers_per_block,
            norm_num_groups: c.norm_num_groups,
            act: Activation::from_name(&c.act_fn).context("vae config: act_fn")?,
            mid_block_add_attention: c.mid_block_add_attention,
        };
        let encoder = Encoder::new(vb.pp("encoder"), c.in_channels, c.latent_channels, &p)?;
        let decoder = Decoder::new(vb.pp("decoder"), c.latent_channels, c.out_channels, &p)?;
        let l = c.latent_channels;
        let quant_conv =
            if c.use_quant_conv { Some(Conv2d::new(vb.pp("quant_conv"), 2 * l, 2 * l, 1, 1, 0)?) } else { None };
        let post_quant_conv =
            if c.use_post_quant_conv { Some(Conv2d::new(vb.pp("post_quant_conv"), l, l, 1, 1, 0)?) } else { None };
        Ok(Self { config: c.clone(), encoder, decoder, quant_conv, post_quant_conv, dtype })
    }

    /// Image in `[-1, 1]`, `[b, in_channels, H, W]` -> latent posterior (unscaled).
    pub fn encode(&self, x: &Tensor) -> Result<DiagonalGaussian> {
        let h = self.encoder.forward(x)?;
        let h = match &self.quant_conv {
            Some(q) => q.forward(&h)?,
            None => h,
        };
        DiagonalGaussian::from_moments(&h)
    }

    /// Unscaled latent `[b, latent_channels, h, w]` -> image (nominally `[-1, 1]`).
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(q) => q.forward(z)?,
            None => z.clone(),
        };
        self.decoder.forward(&z)
    }

    /// Latents are multiplied by this before denoising and divided by it before decoding.
    pub fn scaling_factor(&self) -> f64 {
        self.config.scaling_factor
    }

    pub fn shift_factor(&self) -> Option<f64> {
        self.config.shift_factor
    }

    /// Pixels per latent pixel: `2^(len(block_out_channels) - 1)`.
    pub fn vae_scale_factor(&self) -> usize {
        let n = self.config.block_out_channels.len().saturating_sub(1);
        1usize.checked_shl(n as u32).unwrap_or(usize::MAX)
    }
}
