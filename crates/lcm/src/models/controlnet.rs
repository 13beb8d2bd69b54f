//! diffusers' `ControlNetModel` (`controlnets/controlnet.py`): a trained copy of the UNet's down
//! path that also sees a conditioning image, whose outputs go through zero-initialised 1x1
//! convolutions and are added to the UNet's skip connections and mid block.

use crate::config::read_config;
use crate::models::unet::down_path::{BlockSettings, NoHooks, UNetDownPath};
use crate::models::unet::{Timestep, UNet2DConditionConfig, UNetConditioning};
use crate::nn::{Activation, Conv2d};
use anyhow::bail;
use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;
use std::path::Path;

/// `ControlNetModel`'s config: the UNet's keys for its down half plus the conditioning ones.
#[derive(Clone, Debug, Deserialize)]
pub struct ControlNetConfig {
    #[serde(flatten)]
    pub unet: UNet2DConditionConfig,
    #[serde(default = "d_conditioning_channels")]
    pub conditioning_channels: usize,
    /// The conditioning image's channels are flipped for `bgr`.
    #[serde(default)]
    pub controlnet_conditioning_channel_order: ChannelOrder,
    #[serde(default = "d_embedding_channels")]
    pub conditioning_embedding_out_channels: Vec<usize>,
    /// Shuffle-style ControlNets: residuals averaged over space (and guess mode forced on).
    #[serde(default, deserialize_with = "crate::config::null_false")]
    pub global_pool_conditions: bool,
}

fn d_conditioning_channels() -> usize {
    3
}
fn d_embedding_channels() -> Vec<usize> {
    vec![16, 32, 96, 256]
}

/// A ControlNet call's control arguments (diffusers' `controlnet_cond`, `conditioning_scale`,
/// `guess_mode`).
#[derive(Clone, Copy, Debug)]
pub struct ControlNetCond<'a> {
    /// `[b, conditioning_channels, H, W]` in [0, 1], `H, W` the latent size times the VAE factor.
    pub image: &'a Tensor,
    pub conditioning_scale: f64,
    /// Scales the residuals from 0.1 (first) to 1.0 (mid block).
    pub guess_mode: bool,
}

/// `controlnet_conditioning_channel_order`.
#[derive(Clone, Copy, Debug, Default, serde::Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ChannelOrder {
    #[default]
    Rgb,
    Bgr,
}

impl ControlNetConfig {
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        read_config(path)
    }
}

/// `ControlNetConditioningEmbedding`: the conditioning image (pixel space) down to latent size.
#[derive(Clone, Debug)]
pub struct ConditioningEmbedding {
    pub conv_in: Conv2d,
    /// Pairs of (3x3, 3x3 stride 2) convolutions.
    pub blocks: Vec<Conv2d>,
    pub conv_out: Conv2d,
}

impl ConditioningEmbedding {
    fn new(vb: VarBuilder, out_channels: usize, in_channels: usize, channels: &[usize]) -> anyhow::Result<Self> {
        let Some(&first) = channels.first() else {
            bail!("controlnet config: conditioning_embedding_out_channels is empty")
        };
        let conv_in = Conv2d::new(vb.pp("conv_in"), in_channels, first, 3, 1, 1)?;
        let mut blocks = Vec::new();
        for (i, w) in channels.windows(2).enumerate() {
            blocks.push(Conv2d::new(vb.pp("blocks").pp(2 * i), w[0], w[0], 3, 1, 1)?);
            blocks.push(Conv2d::new(vb.pp("blocks").pp(2 * i + 1), w[0], w[1], 3, 2, 1)?);
        }
        let conv_out = Conv2d::new(vb.pp("conv_out"), channels[channels.len() - 1], out_channels, 3, 1, 1)?;
        Ok(Self { conv_in, blocks, conv_out })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = Activation::Silu.forward(&self.conv_in.forward(x)?)?;
        for b in &self.blocks {
            x = Activation::Silu.forward(&b.forward(&x)?)?;
        }
        self.conv_out.forward(&x)
    }
}

/// The residuals a ControlNet adds to the UNet (`ControlNetOutput`).
#[derive(Clone, Debug)]
pub struct ControlNetOutput {
    /// One per UNet skip connection (the `conv_in` output first).
    pub down_block_res_samples: Vec<Tensor>,
    pub mid_block_res_sample: Tensor,
}

impl ControlNetOutput {
    /// `MultiControlNetModel`: residuals of several ControlNets are summed.
    pub fn sum_with(self, other: &ControlNetOutput) -> Result<Self> {
        if self.down_block_res_samples.len() != other.down_block_res_samples.len() {
            candle_core::bail!(
                "ControlNets with different numbers of residuals ({} and {}) cannot be combined",
                self.down_block_res_samples.len(),
                other.down_block_res_samples.len()
            )
        }
        let down = self
            .down_block_res_samples
            .iter()
            .zip(&other.down_block_res_samples)
            .map(|(a, b)| a + b)
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            down_block_res_samples: down,
            mid_block_res_sample: (&self.mid_block_res_sample + &other.mid_block_res_sample)?,
        })
    }

    /// Into the UNet's conditioning (`down_block_additional_residuals`, `mid_block_additional_residual`).
    pub fn apply_to(self, cond: &mut UNetConditioning) {
        cond.down_block_additional_residuals = Some(self.down_block_res_samples);
        cond.mid_block_additional_residual = Some(self.mid_block_res_sample);
    }
}

#[derive(Clone, Debug)]
pub struct ControlNetModel {
    pub config: ControlNetConfig,
    pub down: UNetDownPath,
    pub controlnet_cond_embedding: ConditioningEmbedding,
    /// Zero convolutions (1x1), one per skip connection.
    pub controlnet_down_blocks: Vec<Conv2d>,
    pub controlnet_mid_block: Conv2d,
}

impl ControlNetModel {
    pub fn new(vb: VarBuilder, config: &ControlNetConfig) -> anyhow::Result<Self> {
        let mut c = config.unet.clone();
        // ControlNetModel reads `num_attention_heads or attention_head_dim` as the head count.
        if let Some(h) = c.num_attention_heads.take() {
            c.attention_head_dim = h;
        }
        if c.time_cond_proj_dim.is_some() {
            bail!("controlnet config: time_cond_proj_dim is not a ControlNetModel option")
        }
        if config.conditioning_channels == 0 {
            bail!("controlnet config: conditioning_channels must be positive")
        }
        let s = BlockSettings::from_config(&c)?;
        let down = UNetDownPath::new(&vb, &c, &s)?;
        let boc = &c.block_out_channels;
        let controlnet_cond_embedding = ConditioningEmbedding::new(
            vb.pp("controlnet_cond_embedding"),
            boc[0],
            config.conditioning_channels,
            &config.conditioning_embedding_out_channels,
        )?;
        let zero_conv = |i: usize, ch: usize| Conv2d::new(vb.pp("controlnet_down_blocks").pp(i), ch, ch, 1, 1, 0);
        let mut controlnet_down_blocks = vec![zero_conv(0, boc[0])?];
        for (i, &ch) in boc.iter().enumerate() {
            let count = s.layers_per_block[i] + usize::from(i + 1 != s.n);
            for _ in 0..count {
                controlnet_down_blocks.push(zero_conv(controlnet_down_blocks.len(), ch)?);
            }
        }
        let last = boc[boc.len() - 1];
        let controlnet_mid_block = Conv2d::new(vb.pp("controlnet_mid_block"), last, last, 1, 1, 0)?;
        Ok(Self {
            config: config.clone(),
            down,
            controlnet_cond_embedding,
            controlnet_down_blocks,
            controlnet_mid_block,
        })
    }

    /// The residuals for `sample` at `timestep` given the conditioning image (`control`).
    /// `cond` supplies SDXL's `added_cond`; `timestep_cond` is not a ControlNet input and is
    /// ignored.
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: impl Into<Timestep>,
        encoder_hidden_states: &Tensor,
        control: ControlNetCond,
        cond: &UNetConditioning,
    ) -> Result<ControlNetOutput> {
        let ControlNetCond { image: controlnet_cond, conditioning_scale, guess_mode } = control;
        let controlnet_cond = if self.config.controlnet_conditioning_channel_order == ChannelOrder::Bgr {
            let c = controlnet_cond.dim(1)?;
            let idx = Tensor::new((0..c as u32).rev().collect::<Vec<_>>(), controlnet_cond.device())?;
            controlnet_cond.index_select(&idx, 1)?
        } else {
            controlnet_cond.clone()
        };
        let cond = UNetConditioning { timestep_cond: None, added_cond: cond.added_cond.clone(), ..Default::default() };
        let emb = self.down.time_embed(sample, timestep.into(), &cond)?;
        let x = self.down.conv_in.forward(sample)?;
        let cond_emb = self.controlnet_cond_embedding.forward(&controlnet_cond.to_dtype(x.dtype())?)?;
        if cond_emb.dims() != x.dims() {
            candle_core::bail!(
                "the control image gives features of shape {:?} but the latents give {:?}; the control image must be the output size",
                cond_emb.dims(),
                x.dims()
            )
        }
        let x = (x + cond_emb)?;
        let (x, skips) = self.down.down(x, &emb, encoder_hidden_states, &mut std::iter::empty(), &NoHooks)?;
        let x = self.down.mid(x, &emb, encoder_hidden_states, &NoHooks)?;

        if skips.len() != self.controlnet_down_blocks.len() {
            candle_core::bail!(
                "controlnet: {} skip connections for {} zero convolutions",
                skips.len(),
                self.controlnet_down_blocks.len()
            )
        }
        let mut down = skips
            .iter()
            .zip(&self.controlnet_down_blocks)
            .map(|(s, conv)| conv.forward(s))
            .collect::<Result<Vec<_>>>()?;
        let mut mid = self.controlnet_mid_block.forward(&x)?;

        let guess = guess_mode && !self.config.global_pool_conditions;
        let n = down.len();
        // torch.logspace(-1, 0, n + 1) in f32, times the conditioning scale.
        let scale_of = |i: usize| -> f64 {
            if guess {
                let e = -1.0f32 + i as f32 * (1.0f32 / n as f32);
                10f32.powf(e) as f64 * conditioning_scale
            } else {
                conditioning_scale
            }
        };
        for (i, d) in down.iter_mut().enumerate() {
            *d = (&*d * scale_of(i))?;
        }
        mid = (mid * scale_of(n))?;
        if self.config.global_pool_conditions {
            for d in down.iter_mut() {
                *d = d.mean_keepdim(3)?.mean_keepdim(2)?;
            }
            mid = mid.mean_keepdim(3)?.mean_keepdim(2)?;
        }
        Ok(ControlNetOutput { down_block_res_samples: down, mid_block_res_sample: mid })
    }

    pub fn dtype(&self) -> DType {
        self.down.conv_in.weight.dtype()
    }
}
