//! The tiny distilled autoencoder TAESD / TAESDXL (diffusers `autoencoders/autoencoder_tiny.py`,
//! with `EncoderTiny` / `DecoderTiny` from `vae.py` and `AutoencoderTinyBlock` from
//! `unet_2d_blocks.py`), built from its `config.json`. Plain convolutions and residual blocks, no
//! norms, no attention; the latents are deterministic (no posterior).

use crate::config::read_config;
use crate::nn::{Activation, Conv2d};
use crate::ops;
use anyhow::bail;
use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;
use std::path::Path;

/// diffusers' `AutoencoderTiny` config; absent keys take diffusers' defaults (those of TAESD),
/// unknown keys are ignored.
#[derive(Clone, Debug, Deserialize)]
pub struct AutoencoderTinyConfig {
    #[serde(default = "d_3")]
    pub in_channels: usize,
    #[serde(default = "d_3")]
    pub out_channels: usize,
    #[serde(default = "d_64x4")]
    pub encoder_block_out_channels: Vec<usize>,
    #[serde(default = "d_64x4")]
    pub decoder_block_out_channels: Vec<usize>,
    #[serde(default = "d_relu")]
    pub act_fn: String,
    #[serde(default = "d_nearest")]
    pub upsample_fn: String,
    #[serde(default = "d_4")]
    pub latent_channels: usize,
    #[serde(default = "d_2")]
    pub upsampling_scaling_factor: usize,
    #[serde(default = "d_enc_blocks")]
    pub num_encoder_blocks: Vec<usize>,
    #[serde(default = "d_dec_blocks")]
    pub num_decoder_blocks: Vec<usize>,
    #[serde(default = "d_magnitude")]
    pub latent_magnitude: f64,
    #[serde(default = "d_shift")]
    pub latent_shift: f64,
    /// diffusers overwrites this with `false` whatever the file says ([`AutoencoderTiny::new`]
    /// does the same).
    #[serde(default, deserialize_with = "crate::config::null_false")]
    pub force_upcast: bool,
    #[serde(default = "d_1")]
    pub scaling_factor: f64,
    #[serde(default = "d_zero")]
    pub shift_factor: Option<f64>,
    /// Not a constructor argument: diffusers registers `decoder_block_out_channels` under this
    /// name, and the pipelines read their VAE scale factor from it. [`AutoencoderTiny::new`] sets
    /// it the same way.
    #[serde(default)]
    pub block_out_channels: Option<Vec<usize>>,
}

fn d_3() -> usize {
    3
}
fn d_4() -> usize {
    4
}
fn d_2() -> usize {
    2
}
fn d_1() -> f64 {
    1.0
}
fn d_zero() -> Option<f64> {
    Some(0.0)
}
fn d_magnitude() -> f64 {
    3.0
}
fn d_shift() -> f64 {
    0.5
}
fn d_relu() -> String {
    "relu".into()
}
fn d_nearest() -> String {
    "nearest".into()
}
fn d_64x4() -> Vec<usize> {
    vec![64; 4]
}
fn d_enc_blocks() -> Vec<usize> {
    vec![1, 3, 3, 3]
}
fn d_dec_blocks() -> Vec<usize> {
    vec![3, 3, 3, 1]
}

impl Default for AutoencoderTinyConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("the empty config takes every default")
    }
}

impl AutoencoderTinyConfig {
    /// Read `vae/config.json` (or a TAESD folder's `config.json`).
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        read_config(path)
    }

    /// What the pipelines read as `vae.config.block_out_channels`: the decoder's widths.
    pub fn block_out_channels(&self) -> &[usize] {
        self.block_out_channels.as_deref().unwrap_or(&self.decoder_block_out_channels)
    }
}

/// The activations diffusers' `get_activation` knows (names compared lower-cased, as it does).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TinyActivation {
    Common(Activation),
    /// `x * tanh(softplus(x))`; not in [`Activation`] because only these blocks accept it.
    Mish,
}

impl TinyActivation {
    pub fn from_name(name: &str) -> Result<Self> {
        Ok(match name.to_ascii_lowercase().as_str() {
            "swish" | "silu" => Self::Common(Activation::Silu),
            "gelu" => Self::Common(Activation::Gelu),
            "relu" => Self::Common(Activation::Relu),
            "mish" => Self::Mish,
            other => {
                candle_core::bail!("unsupported act_fn `{other}` (diffusers accepts swish, silu, mish, gelu, relu)")
            }
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Common(a) => a.forward(x),
            Self::Mish => {
                // softplus(x) = max(x, 0) + ln(1 + e^-|x|): no overflow for large |x|
                let sp = (x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
                x * sp.tanh()?
            }
        }
    }
}

/// `AutoencoderTinyBlock` with equal in / out widths (the only kind EncoderTiny / DecoderTiny
/// build, so the skip is the identity): `relu(conv(act(conv(act(conv(x))))) + x)`.
#[derive(Clone, Debug)]
pub struct TinyBlock {
    pub convs: [Conv2d; 3],
    pub act: TinyActivation,
}

impl TinyBlock {
    pub fn new(vb: VarBuilder, channels: usize, act: TinyActivation) -> Result<Self> {
        let conv = |i: usize| Conv2d::new(vb.pp("conv").pp(i), channels, channels, 3, 1, 1);
        Ok(Self { convs: [conv(0)?, conv(2)?, conv(4)?], act })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.act.forward(&self.convs[0].forward(x)?)?;
        let h = self.act.forward(&self.convs[1].forward(&h)?)?;
        let h = self.convs[2].forward(&h)?;
        // `fuse` is a plain ReLU whatever act_fn says
        ops::add(&h, x)?.relu()
    }
}

/// One entry of the `layers` Sequential of `EncoderTiny` / `DecoderTiny`, in order.
#[derive(Clone, Debug)]
pub enum TinyLayer {
    Conv(Conv2d),
    Block(TinyBlock),
    Act(TinyActivation),
    /// Nearest-neighbour upsampling by this integer factor.
    Upsample(usize),
}

impl TinyLayer {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Conv(c) => c.forward(x),
            Self::Block(b) => b.forward(x),
            Self::Act(a) => a.forward(x),
            Self::Upsample(2) => ops::upsample_nearest2x(x),
            // integer factor: each pixel repeated s x s times, exactly what `nn.Upsample` picks
            Self::Upsample(s) => {
                let (n, c, h, w) = x.dims4()?;
                x.reshape((n, c, h, 1, w, 1))?.broadcast_as((n, c, h, *s, w, *s))?.reshape((n, c, h * s, w * s))
            }
        }
    }
}

/// Diffusers' `nn.Sequential` indices are the weight names (`layers.N.weight`,
/// `layers.N.conv.K.weight`); weightless layers still take an index.
struct LayersBuilder<'a> {
    vb: VarBuilder<'a>,
    layers: Vec<TinyLayer>,
}

impl<'a> LayersBuilder<'a> {
    fn next(&self) -> VarBuilder<'a> {
        self.vb.pp(self.layers.len())
    }

    fn conv(&mut self, c_in: usize, c_out: usize, stride: usize, bias: bool) -> Result<()> {
        let vb = self.next();
        let conv = if bias {
            Conv2d::new(vb, c_in, c_out, 3, stride, 1)?
        } else {
            Conv2d { weight: vb.get((c_out, c_in, 3, 3), "weight")?.into(), bias: None, stride, padding: 1 }
        };
        self.layers.push(TinyLayer::Conv(conv));
        Ok(())
    }

    fn blocks(&mut self, n: usize, channels: usize, act: TinyActivation) -> Result<()> {
        for _ in 0..n {
            let b = TinyBlock::new(self.next(), channels, act)?;
            self.layers.push(TinyLayer::Block(b));
        }
        Ok(())
    }
}

/// Image in `[-1, 1]` `[b, in_channels, H, W]` -> latents `[b, latent_channels, H / 2^(n-1), W / 2^(n-1)]`
/// (each stage after the first halves the size, rounding up).
#[derive(Clone, Debug)]
pub struct EncoderTiny {
    pub layers: Vec<TinyLayer>,
    pub in_channels: usize,
}

impl EncoderTiny {
    pub fn new(vb: VarBuilder, c: &AutoencoderTinyConfig, act: TinyActivation) -> Result<Self> {
        let mut b = LayersBuilder { vb: vb.pp("layers"), layers: Vec::new() };
        let widths = &c.encoder_block_out_channels;
        for (i, (&ch, &n)) in widths.iter().zip(&c.num_encoder_blocks).enumerate() {
            if i == 0 {
                b.conv(c.in_channels, ch, 1, true)?;
            } else {
                b.conv(ch, ch, 2, false)?;
            }
            b.blocks(n, ch, act)?;
        }
        b.conv(widths[widths.len() - 1], c.latent_channels, 1, true)?;
        Ok(Self { layers: b.layers, in_channels: c.in_channels })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        check_input("encode", x, self.in_channels)?;
        // TAESD works on images in [0, 1]
        let mut x = x.affine(0.5, 0.5)?;
        for l in &self.layers {
            x = l.forward(&x)?;
        }
        Ok(x)
    }
}

/// Latents `[b, latent_channels, h, w]` -> image `[b, out_channels, h * s^(n-1), w * s^(n-1)]`,
/// nominally in `[-1, 1]` (not clamped), `s` = `upsampling_scaling_factor`.
#[derive(Clone, Debug)]
pub struct DecoderTiny {
    pub layers: Vec<TinyLayer>,
    pub in_channels: usize,
}

impl DecoderTiny {
    pub fn new(vb: VarBuilder, c: &AutoencoderTinyConfig, act: TinyActivation) -> Result<Self> {
        let mut b = LayersBuilder { vb: vb.pp("layers"), layers: Vec::new() };
        let widths = &c.decoder_block_out_channels;
        b.conv(c.latent_channels, widths[0], 1, true)?;
        b.layers.push(TinyLayer::Act(act));
        for (i, (&ch, &n)) in widths.iter().zip(&c.num_decoder_blocks).enumerate() {
            let last = i + 1 == widths.len();
            b.blocks(n, ch, act)?;
            if !last {
                b.layers.push(TinyLayer::Upsample(c.upsampling_scaling_factor));
            }
            // only the final conv (to out_channels) has a bias
            b.conv(ch, if last { c.out_channels } else { ch }, 1, last)?;
        }
        Ok(Self { layers: b.layers, in_channels: c.latent_channels })
    }

    pub fn forward(&self, z: &Tensor) -> Result<Tensor> {
        check_input("decode", z, self.in_channels)?;
        // soft clamp of the latents to (-3, 3)
        let mut x = ((z / 3.0)?.tanh()? * 3.0)?;
        for l in &self.layers {
            x = l.forward(&x)?;
        }
        // TAESD outputs [0, 1]; diffusers' convention is [-1, 1]
        x.affine(2.0, -1.0)
    }
}

/// The first conv would not check the channel count (the CPU kernel reads the weight by the
/// input's width), so check it here.
fn check_input(what: &str, x: &Tensor, channels: usize) -> Result<()> {
    match x.dims() {
        &[_, c, h, w] if c == channels && h > 0 && w > 0 => Ok(()),
        d => candle_core::bail!("tiny autoencoder {what}: expected [batch, {channels}, h, w], got {d:?}"),
    }
}

#[derive(Clone, Debug)]
pub struct AutoencoderTiny {
    pub config: AutoencoderTinyConfig,
    pub encoder: EncoderTiny,
    pub decoder: DecoderTiny,
    /// The activations' dtype (the `VarBuilder`'s).
    pub dtype: DType,
}

impl AutoencoderTiny {
    /// Build the model from `config`, taking the weights from `vb` by diffusers' names.
    pub fn new(vb: VarBuilder, config: &AutoencoderTinyConfig) -> anyhow::Result<Self> {
        let c = config;
        let dtype = vb.dtype();
        for (side, widths, blocks) in [
            ("encoder", &c.encoder_block_out_channels, &c.num_encoder_blocks),
            ("decoder", &c.decoder_block_out_channels, &c.num_decoder_blocks),
        ] {
            if widths.len() != blocks.len() {
                bail!(
                    "tiny vae config: {side}_block_out_channels has {} entries but num_{side}_blocks has {}",
                    widths.len(),
                    blocks.len()
                )
            }
            if widths.is_empty() || widths.contains(&0) {
                bail!("tiny vae config: {side}_block_out_channels {widths:?} must be non-empty and positive")
            }
            // Each stage's first conv / block takes its own width, not the previous stage's, so
            // diffusers can only run models whose stages all have one width.
            if widths.iter().any(|&w| w != widths[0]) {
                bail!("tiny vae config: {side}_block_out_channels {widths:?} must all be equal (diffusers cannot run other widths)")
            }
        }
        if c.in_channels == 0 || c.out_channels == 0 || c.latent_channels == 0 {
            bail!("tiny vae config: in_channels, out_channels and latent_channels must be positive")
        }
        if c.upsampling_scaling_factor == 0 {
            bail!("tiny vae config: upsampling_scaling_factor must be positive")
        }
        // For an integer factor, "nearest-exact" picks the same source pixels as "nearest".
        if !matches!(c.upsample_fn.as_str(), "nearest" | "nearest-exact") {
            bail!(
                "tiny vae config: upsample_fn `{}` is not supported (supported: nearest, nearest-exact)",
                c.upsample_fn
            )
        }
        let act = TinyActivation::from_name(&c.act_fn).map_err(|e| anyhow::anyhow!("tiny vae config: {e}"))?;
        let encoder = EncoderTiny::new(vb.pp("encoder"), c, act)?;
        let decoder = DecoderTiny::new(vb.pp("decoder"), c, act)?;
        let mut config = c.clone();
        // what diffusers' __init__ registers
        config.block_out_channels = Some(c.decoder_block_out_channels.clone());
        config.force_upcast = false;
        Ok(Self { config, encoder, decoder, dtype })
    }

    /// Image in `[-1, 1]` -> latents (diffusers' `encode(x).latents`; unscaled, as the
    /// pipelines' `scaling_factor` of TAESD is 1).
    pub fn encode(&self, x: &Tensor) -> Result<Tensor> {
        self.encoder.forward(x)
    }

    /// Latents -> image, nominally in `[-1, 1]` (diffusers' `decode(z).sample`).
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        self.decoder.forward(z)
    }

    /// Raw latents -> `[0, 1]` (TAESD's 8-bit latent storage): `clamp(x / (2 m) + shift, 0, 1)`.
    pub fn scale_latents(&self, x: &Tensor) -> Result<Tensor> {
        let m = self.config.latent_magnitude;
        (x / (2.0 * m))?.affine(1.0, self.config.latent_shift)?.clamp(0f32, 1f32)
    }

    /// `[0, 1]` -> raw latents: `(x - shift) * 2 m`.
    pub fn unscale_latents(&self, x: &Tensor) -> Result<Tensor> {
        (x - self.config.latent_shift)? * (2.0 * self.config.latent_magnitude)
    }

    /// Latents are multiplied by this before denoising and divided by it before decoding.
    pub fn scaling_factor(&self) -> f64 {
        self.config.scaling_factor
    }

    pub fn shift_factor(&self) -> Option<f64> {
        self.config.shift_factor
    }

    /// The pipelines' `vae_scale_factor`: `2^(len(block_out_channels) - 1)`, whatever the
    /// upsampling factor (diffusers computes it the same way for every VAE).
    pub fn vae_scale_factor(&self) -> usize {
        let n = self.config.block_out_channels().len().saturating_sub(1);
        1usize.checked_shl(n as u32).unwrap_or(usize::MAX)
    }

    /// How much the decoder actually enlarges: `upsampling_scaling_factor^(stages - 1)`.
    pub fn decoder_upscale(&self) -> usize {
        let n = self.config.decoder_block_out_channels.len().saturating_sub(1);
        self.config.upsampling_scaling_factor.saturating_pow(n as u32)
    }
}
