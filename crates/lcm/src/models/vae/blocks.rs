//! The encoder and decoder of the KL autoencoder (diffusers `autoencoders/vae.py`).

use crate::models::blocks::{DownEncoderBlock2D, ResnetParams, UNetMidBlock2D, UpDecoderBlock2D};
use crate::models::resnet::TimeEmbeddingNorm;
use crate::nn::{Activation, Conv2d, GroupNorm};
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

/// Construction parameters shared by [`Encoder`] and [`Decoder`].
#[derive(Clone, Debug)]
pub struct VaeParams {
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub norm_num_groups: usize,
    pub act: Activation,
    pub mid_block_add_attention: bool,
}

impl VaeParams {
    fn resnet_params(&self) -> ResnetParams {
        // diffusers hard-codes eps 1e-6 for every VAE norm.
        ResnetParams {
            temb_channels: None,
            groups: self.norm_num_groups,
            eps: 1e-6,
            act: self.act,
            time_embedding_norm: TimeEmbeddingNorm::Default,
            output_scale_factor: 1.0,
        }
    }

    fn last_channels(&self) -> Result<usize> {
        match self.block_out_channels.last() {
            Some(&c) if c > 0 && !self.block_out_channels.contains(&0) => Ok(c),
            _ => candle_core::bail!(
                "vae: block_out_channels {:?} must be non-empty and positive",
                self.block_out_channels
            ),
        }
    }

    /// The mid block: resnet, single-head self-attention over pixels, resnet.
    fn mid_block(&self, vb: VarBuilder) -> Result<UNetMidBlock2D> {
        let c = self.last_channels()?;
        UNetMidBlock2D::new(vb, c, 1, self.mid_block_add_attention, c, &self.resnet_params())
    }
}

/// Image `[b, in_channels, H, W]` -> moments `[b, 2 * latent_channels, H / f, W / f]` (`double_z`).
#[derive(Clone, Debug)]
pub struct Encoder {
    pub conv_in: Conv2d,
    pub down_blocks: Vec<DownEncoderBlock2D>,
    pub mid_block: UNetMidBlock2D,
    pub conv_norm_out: GroupNorm,
    pub conv_act: Activation,
    pub conv_out: Conv2d,
}

impl Encoder {
    pub fn new(vb: VarBuilder, in_channels: usize, out_channels: usize, p: &VaeParams) -> Result<Self> {
        let last = p.last_channels()?;
        let boc = &p.block_out_channels;
        let rp = p.resnet_params();
        let conv_in = Conv2d::new(vb.pp("conv_in"), in_channels, boc[0], 3, 1, 1)?;
        let mut down_blocks = Vec::with_capacity(boc.len());
        let mut output_channel = boc[0];
        for (i, &ch) in boc.iter().enumerate() {
            let input_channel = output_channel;
            output_channel = ch;
            let add_downsample = i + 1 != boc.len();
            // padding 0: Downsample2D pads right/bottom by one pixel itself.
            down_blocks.push(DownEncoderBlock2D::new(
                vb.pp("down_blocks").pp(i),
                input_channel,
                output_channel,
                p.layers_per_block,
                add_downsample,
                0,
                &rp,
            )?);
        }
        let mid_block = p.mid_block(vb.pp("mid_block"))?;
        let conv_norm_out = GroupNorm::new(vb.pp("conv_norm_out"), p.norm_num_groups, last, 1e-6)?;
        // diffusers' encoder always uses SiLU here, whatever act_fn says.
        let conv_act = Activation::Silu;
        let conv_out = Conv2d::new(vb.pp("conv_out"), last, 2 * out_channels, 3, 1, 1)?;
        Ok(Self { conv_in, down_blocks, mid_block, conv_norm_out, conv_act, conv_out })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.conv_in.forward(x)?;
        for b in &self.down_blocks {
            x = b.forward(&x)?;
        }
        let x = self.mid_block.forward(&x, None)?;
        let x = self.conv_norm_out.forward_act(&x, self.conv_act)?;
        self.conv_out.forward(&x)
    }
}

/// Latent `[b, latent_channels, h, w]` -> image `[b, out_channels, h * f, w * f]`.
#[derive(Clone, Debug)]
pub struct Decoder {
    pub conv_in: Conv2d,
    pub mid_block: UNetMidBlock2D,
    pub up_blocks: Vec<UpDecoderBlock2D>,
    pub conv_norm_out: GroupNorm,
    pub conv_act: Activation,
    pub conv_out: Conv2d,
}

impl Decoder {
    pub fn new(vb: VarBuilder, in_channels: usize, out_channels: usize, p: &VaeParams) -> Result<Self> {
        let last = p.last_channels()?;
        let rp = p.resnet_params();
        let conv_in = Conv2d::new(vb.pp("conv_in"), in_channels, last, 3, 1, 1)?;
        let mid_block = p.mid_block(vb.pp("mid_block"))?;
        let rev: Vec<usize> = p.block_out_channels.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(rev.len());
        let mut output_channel = rev[0];
        for (i, &ch) in rev.iter().enumerate() {
            let prev_output_channel = output_channel;
            output_channel = ch;
            let add_upsample = i + 1 != rev.len();
            up_blocks.push(UpDecoderBlock2D::new(
                vb.pp("up_blocks").pp(i),
                prev_output_channel,
                output_channel,
                p.layers_per_block + 1,
                add_upsample,
                &rp,
            )?);
        }
        let conv_norm_out = GroupNorm::new(vb.pp("conv_norm_out"), p.norm_num_groups, rev[rev.len() - 1], 1e-6)?;
        let conv_act = Activation::Silu;
        let conv_out = Conv2d::new(vb.pp("conv_out"), rev[rev.len() - 1], out_channels, 3, 1, 1)?;
        Ok(Self { conv_in, mid_block, up_blocks, conv_norm_out, conv_act, conv_out })
    }

    pub fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let x = self.conv_in.forward(z)?;
        let mut x = self.mid_block.forward(&x, None)?;
        for b in &self.up_blocks {
            x = b.forward(&x)?;
        }
        let x = self.conv_norm_out.forward_act(&x, self.conv_act)?;
        self.conv_out.forward(&x)
    }
}

/// The encoder's posterior, a diagonal Gaussian (diffusers `DiagonalGaussianDistribution`).
#[derive(Clone, Debug)]
pub struct DiagonalGaussian {
    pub mean: Tensor,
    /// Clamped to `[-30, 20]`.
    pub logvar: Tensor,
}

impl DiagonalGaussian {
    /// Split encoder moments `[b, 2c, h, w]` into mean and (clamped) log-variance.
    pub fn from_moments(moments: &Tensor) -> Result<Self> {
        let c2 = moments.dim(1)?;
        if c2 % 2 != 0 {
            candle_core::bail!("posterior moments need an even channel count, got {c2}")
        }
        let c = c2 / 2;
        let mean = moments.narrow(1, 0, c)?.contiguous()?;
        let logvar = moments.narrow(1, c, c)?.clamp(-30f32, 20f32)?;
        Ok(Self { mean, logvar })
    }

    pub fn mode(&self) -> &Tensor {
        &self.mean
    }

    pub fn std(&self) -> Result<Tensor> {
        (&self.logvar * 0.5)?.exp()
    }

    /// `mean + std * noise`; `noise` is standard normal with the mean's shape (the caller draws it,
    /// so its random stream can match diffusers').
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        &self.mean + self.std()?.mul(noise)?
    }
}
