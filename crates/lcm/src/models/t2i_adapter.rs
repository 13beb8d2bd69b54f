//! T2I-Adapter (diffusers `models/adapter.py`, `T2IAdapter`): a small convolutional network that
//! turns a control image (edges, depth, pose, ...) into one feature map per UNet down block,
//! added inside the UNet's down path (`down_intrablock_additional_residuals`).
//!
//! The three architectures of diffusers are supported (`adapter_type`):
//! - `full_adapter` (SD1.5 adapters): pixel-unshuffle, `conv_in`, one `AdapterBlock` per entry of
//!   `channels`, each but the first halving the size;
//! - `full_adapter_xl` (SDXL adapters): the same blocks, but only the third one downsamples;
//! - `light_adapter`: no `conv_in`; `len(channels) + 1` bottleneck blocks, each but the first
//!   halving the size.

use crate::config::read_config;
use crate::loaders::weights;
use crate::nn::Conv2d;
use anyhow::{bail, Context};
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;
use std::path::Path;

/// diffusers' `T2IAdapter` config; absent keys take diffusers' defaults, unknown keys are ignored.
#[derive(Clone, Debug, Deserialize)]
pub struct T2IAdapterConfig {
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    #[serde(default = "d_in_channels")]
    pub in_channels: usize,
    #[serde(default = "d_channels")]
    pub channels: Vec<usize>,
    #[serde(default = "d_num_res_blocks")]
    pub num_res_blocks: usize,
    #[serde(default = "d_downscale_factor")]
    pub downscale_factor: usize,
    #[serde(default = "d_adapter_type")]
    pub adapter_type: String,
}

fn d_in_channels() -> usize {
    3
}
fn d_channels() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn d_num_res_blocks() -> usize {
    2
}
fn d_downscale_factor() -> usize {
    8
}
fn d_adapter_type() -> String {
    "full_adapter".into()
}

impl Default for T2IAdapterConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("the empty config takes every default")
    }
}

impl T2IAdapterConfig {
    /// Read an adapter's `config.json`.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        read_config(path)
    }
}

/// `adapter_type` of the config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdapterType {
    /// `full_adapter`
    Full,
    /// `full_adapter_xl`
    FullXl,
    /// `light_adapter`
    Light,
}

impl AdapterType {
    pub fn from_name(name: &str) -> anyhow::Result<Self> {
        match name {
            "full_adapter" => Ok(Self::Full),
            "full_adapter_xl" => Ok(Self::FullXl),
            "light_adapter" => Ok(Self::Light),
            other => bail!(
                "t2i adapter config: unsupported adapter_type `{other}` (supported: full_adapter, full_adapter_xl, light_adapter)"
            ),
        }
    }
}

/// `x + block2(relu(block1(x)))`. `block1` is 3x3; `block2` is 1x1 in the full adapters
/// (`AdapterResnetBlock`) and 3x3 in the light one (`LightAdapterResnetBlock`).
#[derive(Clone, Debug)]
pub struct AdapterResnetBlock {
    pub block1: Conv2d,
    pub block2: Conv2d,
}

impl AdapterResnetBlock {
    pub fn new(vb: VarBuilder, channels: usize, block2_kernel: usize) -> Result<Self> {
        let block1 = Conv2d::new(vb.pp("block1"), channels, channels, 3, 1, 1)?;
        let block2 = Conv2d::new(vb.pp("block2"), channels, channels, block2_kernel, 1, block2_kernel / 2)?;
        Ok(Self { block1, block2 })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.block1.forward(x)?.relu()?;
        self.block2.forward(&h)? + x
    }
}

/// One stage of the adapter: optional 2x2 average pooling (`ceil_mode=True`), optional 1x1
/// `in_conv`, the residual blocks, optional 1x1 `out_conv` (light adapter only).
///
/// diffusers' `AdapterBlock` (full adapters: `in_conv` only when the channel count changes, no
/// `out_conv`) and `LightAdapterBlock` (`in_conv` to `out_channels / 4`, `out_conv` back up).
#[derive(Clone, Debug)]
pub struct AdapterBlock {
    pub down: bool,
    pub in_conv: Option<Conv2d>,
    pub resnets: Vec<AdapterResnetBlock>,
    pub out_conv: Option<Conv2d>,
}

impl AdapterBlock {
    /// diffusers' `AdapterBlock(in_channels, out_channels, num_res_blocks, down)`.
    pub fn full(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        num_res_blocks: usize,
        down: bool,
    ) -> Result<Self> {
        let in_conv = if in_channels != out_channels {
            Some(Conv2d::new(vb.pp("in_conv"), in_channels, out_channels, 1, 1, 0)?)
        } else {
            None
        };
        let resnets = (0..num_res_blocks)
            .map(|j| AdapterResnetBlock::new(vb.pp("resnets").pp(j), out_channels, 1))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { down, in_conv, resnets, out_conv: None })
    }

    /// diffusers' `LightAdapterBlock(in_channels, out_channels, num_res_blocks, down)`.
    pub fn light(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        num_res_blocks: usize,
        down: bool,
    ) -> Result<Self> {
        let mid = out_channels / 4;
        let in_conv = Conv2d::new(vb.pp("in_conv"), in_channels, mid, 1, 1, 0)?;
        let resnets = (0..num_res_blocks)
            .map(|j| AdapterResnetBlock::new(vb.pp("resnets").pp(j), mid, 3))
            .collect::<Result<Vec<_>>>()?;
        let out_conv = Conv2d::new(vb.pp("out_conv"), mid, out_channels, 1, 1, 0)?;
        Ok(Self { down, in_conv: Some(in_conv), resnets, out_conv: Some(out_conv) })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = if self.down { avg_pool2x2_ceil(x)? } else { x.clone() };
        if let Some(c) = &self.in_conv {
            x = c.forward(&x)?;
        }
        for r in &self.resnets {
            x = r.forward(&x)?;
        }
        match &self.out_conv {
            Some(c) => c.forward(&x),
            None => Ok(x),
        }
    }
}

/// diffusers' `T2IAdapter`, weights under `adapter.` (`adapter.conv_in`, `adapter.body.{i}...`).
#[derive(Clone, Debug)]
pub struct T2IAdapter {
    pub config: T2IAdapterConfig,
    pub adapter_type: AdapterType,
    /// `None` for the light adapter.
    pub conv_in: Option<Conv2d>,
    pub body: Vec<AdapterBlock>,
    dtype: DType,
}

impl T2IAdapter {
    /// Build the adapter from `config`, taking the weights from `vb` by diffusers' names.
    pub fn new(vb: VarBuilder, config: &T2IAdapterConfig) -> anyhow::Result<Self> {
        let c = config;
        let adapter_type = AdapterType::from_name(&c.adapter_type)?;
        if c.channels.is_empty() || c.channels.contains(&0) {
            bail!("t2i adapter config: channels {:?} must be non-empty and positive", c.channels)
        }
        if c.in_channels == 0 {
            bail!("t2i adapter config: in_channels must be positive")
        }
        if c.downscale_factor == 0 {
            bail!("t2i adapter config: downscale_factor must be positive")
        }
        let ch = &c.channels;
        let n = ch.len();
        let unshuffled = c.in_channels * c.downscale_factor * c.downscale_factor;
        let nrb = c.num_res_blocks;
        let vb = vb.pp("adapter");
        let body_vb = vb.pp("body");
        let (conv_in, body) = match adapter_type {
            AdapterType::Full => {
                let conv_in = Conv2d::new(vb.pp("conv_in"), unshuffled, ch[0], 3, 1, 1)?;
                let mut body = vec![AdapterBlock::full(body_vb.pp(0), ch[0], ch[0], nrb, false)?];
                for i in 1..n {
                    body.push(AdapterBlock::full(body_vb.pp(i), ch[i - 1], ch[i], nrb, true)?);
                }
                (Some(conv_in), body)
            }
            AdapterType::FullXl => {
                // diffusers builds block i >= 3 for channels[i] -> channels[i] although it is fed
                // channels[i - 1]; such a config fails in its forward, so refuse it here.
                if let Some(i) = (3..n).find(|&i| ch[i] != ch[i - 1]) {
                    bail!("t2i adapter config: full_adapter_xl needs channels[{i}] == channels[{}], got {ch:?}", i - 1)
                }
                let conv_in = Conv2d::new(vb.pp("conv_in"), unshuffled, ch[0], 3, 1, 1)?;
                let mut body = Vec::with_capacity(n);
                for i in 0..n {
                    let b = body_vb.pp(i);
                    body.push(match i {
                        1 => AdapterBlock::full(b, ch[0], ch[1], nrb, false)?,
                        2 => AdapterBlock::full(b, ch[1], ch[2], nrb, true)?,
                        _ => AdapterBlock::full(b, ch[i], ch[i], nrb, false)?,
                    });
                }
                (Some(conv_in), body)
            }
            AdapterType::Light => {
                if let Some(&bad) = ch.iter().find(|&&x| x < 4) {
                    bail!("t2i adapter config: light_adapter channels must be at least 4 (bottleneck channels / 4), got {bad}")
                }
                let mut body = vec![AdapterBlock::light(body_vb.pp(0), unshuffled, ch[0], nrb, false)?];
                for i in 0..n - 1 {
                    body.push(AdapterBlock::light(body_vb.pp(i + 1), ch[i], ch[i + 1], nrb, true)?);
                }
                body.push(AdapterBlock::light(body_vb.pp(n), ch[n - 1], ch[n - 1], nrb, true)?);
                (None, body)
            }
        };
        Ok(Self { config: c.clone(), adapter_type, conv_in, body, dtype: vb.dtype() })
    }

    /// Load a diffusers adapter folder (`config.json` + `diffusion_pytorch_model.safetensors`)
    /// in float32 on the CPU.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        Self::load_with(dir, None, DType::F32, &Device::Cpu)
    }

    /// Load a diffusers adapter folder with a weight variant (`Some("fp16")`: the
    /// `*.fp16.safetensors` files), converting the weights to `dtype` on `device` (a
    /// [`Precision`](crate::loaders::weights::Precision): kernels in its weight dtype, features
    /// in its compute dtype).
    pub fn load_with(
        dir: &Path,
        variant: Option<&str>,
        dtype: impl Into<crate::loaders::weights::Precision>,
        device: &Device,
    ) -> anyhow::Result<Self> {
        let config = T2IAdapterConfig::from_file(&dir.join("config.json"))?;
        if let Some(class) = config.class_name.as_deref().filter(|c| *c != "T2IAdapter") {
            bail!("{} holds a `{class}`, not a `T2IAdapter`", dir.display())
        }
        let vb = weights::load_component(dir, variant, dtype, device)?;
        Self::new(vb, &config).with_context(|| format!("t2i adapter {}", dir.display()))
    }

    /// Control image `[b, in_channels, H, W]` (values in `[0, 1]`) -> one feature map per block.
    /// `H` and `W` must be multiples of [`Self::downscale_factor`]. The input is cast to the
    /// weights' dtype, as diffusers' adapter pipelines do before calling the adapter.
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let (_, c, h, w) = match x.dims() {
            &[b, c, h, w] => (b, c, h, w),
            d => {
                return Err(input_error(format!(
                    "t2i adapter: expected an input of shape [batch, channels, height, width], got {d:?}"
                )))
            }
        };
        if c != self.config.in_channels {
            return Err(input_error(format!(
                "t2i adapter: input has {c} channels, the adapter expects {} (in_channels)",
                self.config.in_channels
            )));
        }
        let r = self.config.downscale_factor;
        if h % r != 0 || w % r != 0 || h == 0 || w == 0 {
            return Err(input_error(format!(
                "t2i adapter: input size {h}x{w} is not a positive multiple of the adapter's downscale_factor {r}"
            )));
        }
        let x = pixel_unshuffle(&x.to_dtype(self.dtype)?, r)?;
        let mut x = match &self.conv_in {
            Some(conv) => conv.forward(&x)?,
            None => x,
        };
        let mut features = Vec::with_capacity(self.body.len());
        for block in &self.body {
            x = block.forward(&x)?;
            features.push(x.clone());
        }
        Ok(features)
    }

    /// The pixel-unshuffle factor; input height and width must be multiples of it.
    pub fn downscale_factor(&self) -> usize {
        self.config.downscale_factor
    }

    /// How much smaller the last feature map is than the input, as diffusers computes it:
    /// `downscale_factor * 2^(len(channels) - 1)` (full), `downscale_factor * 2` (full XL),
    /// `downscale_factor * 2^len(channels)` (light).
    pub fn total_downscale_factor(&self) -> usize {
        let n = self.config.channels.len() as u32;
        let r = self.config.downscale_factor;
        match self.adapter_type {
            AdapterType::Full => r << (n - 1),
            AdapterType::FullXl => r * 2,
            AdapterType::Light => r << n,
        }
    }

    /// The dtype of the weights (and of the features).
    pub fn dtype(&self) -> DType {
        self.dtype
    }
}

/// A one-line error about the caller's input (no backtrace attached, even with RUST_BACKTRACE set,
/// unlike `candle_core::bail!`).
fn input_error(msg: String) -> candle_core::Error {
    candle_core::Error::Msg(msg)
}

/// `nn.PixelUnshuffle(r)`: `[b, c, H, W]` -> `[b, c*r*r, H/r, W/r]`, output channel
/// `c*r*r + i*r + j` holding input pixels `(h*r + i, w*r + j)`.
pub fn pixel_unshuffle(x: &Tensor, r: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if h % r != 0 || w % r != 0 {
        candle_core::bail!("pixel_unshuffle: size {h}x{w} is not divisible by {r}")
    }
    if r == 1 {
        return Ok(x.clone());
    }
    x.reshape(vec![b, c, h / r, r, w / r, r])?.permute((0, 1, 3, 5, 2, 4))?.reshape((b, c * r * r, h / r, w / r))
}

/// `nn.AvgPool2d(kernel_size=2, stride=2, ceil_mode=True)` (padding 0): the output is
/// `ceil(H/2) x ceil(W/2)`; on odd sizes the last row / column of windows hangs over the edge and
/// PyTorch divides those by the number of pixels actually inside (2 or 1), not by 4.
/// Sums in float32 like PyTorch's kernels do for half types.
pub fn avg_pool2x2_ceil(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (ho, wo) = (h.div_ceil(2), w.div_ceil(2));
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?.pad_with_zeros(2, 0, 2 * ho - h)?.pad_with_zeros(3, 0, 2 * wo - w)?;
    let sum = xf.reshape(vec![b, c, ho, 2, wo, 2])?.sum(5)?.sum(3)?;
    let out = if h % 2 == 0 && w % 2 == 0 {
        (sum * 0.25)?
    } else {
        let rows = |i: usize, n: usize| if 2 * i + 1 < n { 2.0f32 } else { 1.0 };
        let inv: Vec<f32> = (0..ho).flat_map(|i| (0..wo).map(move |j| 1.0 / (rows(i, h) * rows(j, w)))).collect();
        let inv = Tensor::from_vec(inv, (1, 1, ho, wo), x.device())?;
        sum.broadcast_mul(&inv)?
    };
    out.to_dtype(dtype)
}
