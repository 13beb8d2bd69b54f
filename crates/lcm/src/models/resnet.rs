//! Residual block and resampling layers shared by the UNet and the VAE (diffusers `resnet.py`,
//! `downsampling.py`, `upsampling.py`).

use crate::nn::{Activation, Conv2d, GroupNorm, Linear};
use crate::ops;
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

/// How `ResnetBlock2D` injects the time embedding (`resnet_time_scale_shift`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeEmbeddingNorm {
    /// `norm2(h + temb)`.
    Default,
    /// `norm2(h) * (1 + scale) + shift`, `time_emb_proj` producing `2 * out_channels`.
    ScaleShift,
}

impl TimeEmbeddingNorm {
    pub fn from_name(name: &str) -> anyhow::Result<Self> {
        match name {
            "default" => Ok(Self::Default),
            "scale_shift" => Ok(Self::ScaleShift),
            other => {
                anyhow::bail!("resnet_time_scale_shift `{other}` is not supported (supported: default, scale_shift)")
            }
        }
    }
}

/// Construction parameters of [`ResnetBlock2D`] (the subset of diffusers' arguments these models use).
#[derive(Clone, Debug)]
pub struct ResnetBlock2DConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    /// `None`: no `time_emb_proj` (the VAE).
    pub temb_channels: Option<usize>,
    pub groups: usize,
    pub groups_out: Option<usize>,
    pub eps: f64,
    pub act: Activation,
    pub time_embedding_norm: TimeEmbeddingNorm,
    pub output_scale_factor: f64,
}

impl ResnetBlock2DConfig {
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        temb_channels: Option<usize>,
        groups: usize,
        eps: f64,
        act: Activation,
    ) -> Self {
        Self {
            in_channels,
            out_channels,
            temb_channels,
            groups,
            groups_out: None,
            eps,
            act,
            time_embedding_norm: TimeEmbeddingNorm::Default,
            output_scale_factor: 1.0,
        }
    }
}

#[derive(Clone, Debug)]
pub struct ResnetBlock2D {
    pub norm1: GroupNorm,
    pub conv1: Conv2d,
    pub time_emb_proj: Option<Linear>,
    pub norm2: GroupNorm,
    pub conv2: Conv2d,
    /// 1x1 projection of the input when the channel count changes.
    pub conv_shortcut: Option<Conv2d>,
    pub act: Activation,
    pub time_embedding_norm: TimeEmbeddingNorm,
    pub output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn new(vb: VarBuilder, cfg: &ResnetBlock2DConfig) -> Result<Self> {
        let (cin, cout) = (cfg.in_channels, cfg.out_channels);
        let norm1 = GroupNorm::new(vb.pp("norm1"), cfg.groups, cin, cfg.eps)?;
        let conv1 = Conv2d::new(vb.pp("conv1"), cin, cout, 3, 1, 1)?;
        let time_emb_proj = match cfg.temb_channels {
            Some(t) => {
                let n = match cfg.time_embedding_norm {
                    TimeEmbeddingNorm::Default => cout,
                    TimeEmbeddingNorm::ScaleShift => 2 * cout,
                };
                Some(Linear::new(vb.pp("time_emb_proj"), t, n, true)?)
            }
            None => None,
        };
        let norm2 = GroupNorm::new(vb.pp("norm2"), cfg.groups_out.unwrap_or(cfg.groups), cout, cfg.eps)?;
        let conv2 = Conv2d::new(vb.pp("conv2"), cout, cout, 3, 1, 1)?;
        let conv_shortcut =
            if cin != cout { Some(Conv2d::new(vb.pp("conv_shortcut"), cin, cout, 1, 1, 0)?) } else { None };
        Ok(Self {
            norm1,
            conv1,
            time_emb_proj,
            norm2,
            conv2,
            conv_shortcut,
            act: cfg.act,
            time_embedding_norm: cfg.time_embedding_norm,
            output_scale_factor: cfg.output_scale_factor,
        })
    }

    pub fn forward(&self, input: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let h = self.norm1.forward_act(input, self.act)?;
        let mut h = self.conv1.forward(&h)?;
        let temb = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(t)) => {
                let t = proj.forward(&self.act.forward(t)?)?;
                let (b, c) = t.dims2()?;
                Some(t.reshape((b, c, 1, 1))?)
            }
            _ => None,
        };
        h = match (self.time_embedding_norm, temb) {
            (TimeEmbeddingNorm::Default, Some(t)) => self.norm2.forward_act(&h.broadcast_add(&t)?, self.act)?,
            (TimeEmbeddingNorm::Default, None) => self.norm2.forward_act(&h, self.act)?,
            (TimeEmbeddingNorm::ScaleShift, Some(t)) => {
                let c = t.dim(1)? / 2;
                let (scale, shift) = (t.narrow(1, 0, c)?, t.narrow(1, c, c)?);
                let h = self.norm2.forward(&h)?.broadcast_mul(&(scale + 1.0)?)?.broadcast_add(&shift)?;
                self.act.forward(&h)?
            }
            (TimeEmbeddingNorm::ScaleShift, None) => {
                candle_core::bail!("resnet with scale_shift time embedding needs a time embedding")
            }
        };
        let h = self.conv2.forward(&h)?;
        let x = match &self.conv_shortcut {
            Some(c) => c.forward(input)?,
            None => input.clone(),
        };
        let out = ops::add(&x, &h)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }
}

/// Stride-2 3x3 convolution (`downsamplers.0.conv`). With `padding == 0` (the VAE encoder) the
/// input is first padded by one pixel on the right and bottom only, as diffusers does.
#[derive(Clone, Debug)]
pub struct Downsample2D {
    pub conv: Conv2d,
    pub padding: usize,
}

impl Downsample2D {
    pub fn new(vb: VarBuilder, channels: usize, out_channels: usize, padding: usize) -> Result<Self> {
        Ok(Self { conv: Conv2d::new(vb.pp("conv"), channels, out_channels, 3, 2, padding)?, padding })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.padding == 0 {
            let x = x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
            self.conv.forward(&x)
        } else {
            self.conv.forward(x)
        }
    }
}

/// Nearest-neighbour upsampling (2x, or to the size of the matching skip connection) followed
/// by a 3x3 convolution (`upsamplers.0.conv`).
#[derive(Clone, Debug)]
pub struct Upsample2D {
    pub conv: Conv2d,
}

impl Upsample2D {
    pub fn new(vb: VarBuilder, channels: usize, out_channels: usize) -> Result<Self> {
        Ok(Self { conv: Conv2d::new(vb.pp("conv"), channels, out_channels, 3, 1, 1)? })
    }

    pub fn forward(&self, x: &Tensor, output_size: Option<(usize, usize)>) -> Result<Tensor> {
        let x = match output_size {
            None => ops::upsample_nearest2x(x)?,
            Some((h, w)) => ops::upsample_nearest(x, h, w)?,
        };
        self.conv.forward(&x)
    }
}
