//! AnimateDiff (diffusers `unets/unet_motion_model.py`): the `MotionAdapter`'s temporal
//! transformers, attached to an SD1.5 UNet's blocks to make `UNetMotionModel`. Frames are folded
//! into the batch (`[b * f, c, h, w]`, frame-major within each video); each motion module attends
//! across the frames at every pixel.

use crate::config::{read_config, PerBlock};
use crate::models::attention::{Attention, AttentionConfig, FeedForward};
use crate::models::unet::down_path::{BlockHooks, DownBlock, MidBlock, Place};
use crate::models::unet::{UNet2DConditionConfig, UNet2DConditionModel, UpBlock};
use crate::nn::{GroupNorm, LayerNorm, Linear};
use anyhow::{bail, Context};
use candle_core::{Device, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;
use std::path::Path;

/// `transformer_layers_per_block`-style value: one depth, one per block, or one per layer.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Depths {
    One(usize),
    Each(Vec<PerBlock<usize>>),
}

/// `MotionAdapter`'s config (diffusers' defaults for absent keys).
#[derive(Clone, Debug, Deserialize)]
pub struct MotionAdapterConfig {
    #[serde(default = "d_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_two")]
    pub motion_layers_per_block: PerBlock<usize>,
    #[serde(default = "d_depth")]
    pub motion_transformer_layers_per_block: Depths,
    #[serde(default = "d_one")]
    pub motion_mid_block_layers_per_block: usize,
    #[serde(default = "d_one_block")]
    pub motion_transformer_layers_per_mid_block: PerBlock<usize>,
    #[serde(default = "d_heads")]
    pub motion_num_attention_heads: PerBlock<usize>,
    /// The adapter's own GroupNorm groups; `UNetMotionModel` uses the UNet's `norm_num_groups`.
    #[serde(default = "d_groups")]
    pub motion_norm_num_groups: usize,
    #[serde(default = "d_seq")]
    pub motion_max_seq_length: usize,
    #[serde(default = "d_true", deserialize_with = "crate::config::null_false")]
    pub use_motion_mid_block: bool,
    /// SparseCtrl / PIA inputs: not supported.
    #[serde(default)]
    pub conv_in_channels: Option<usize>,
    /// Older configs: only `geglu` exists in diffusers.
    #[serde(default)]
    pub motion_activation_fn: Option<String>,
    #[serde(default)]
    pub motion_attention_bias: Option<bool>,
    #[serde(default)]
    pub motion_cross_attention_dim: Option<usize>,
}

fn d_channels() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn d_two() -> PerBlock<usize> {
    PerBlock::One(2)
}
fn d_depth() -> Depths {
    Depths::One(1)
}
fn d_one() -> usize {
    1
}
fn d_one_block() -> PerBlock<usize> {
    PerBlock::One(1)
}
fn d_heads() -> PerBlock<usize> {
    PerBlock::One(8)
}
fn d_groups() -> usize {
    32
}
fn d_seq() -> usize {
    32
}
fn d_true() -> bool {
    true
}

impl MotionAdapterConfig {
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        read_config(path)
    }
}

/// `SinusoidalPositionalEmbedding`'s table `[max_seq_length, dim]`, computed in f32 as PyTorch does.
fn sinusoidal_table(dim: usize, max_len: usize, device: &Device) -> Result<Tensor> {
    let c = (-(10000f64.ln()) / dim as f64) as f32;
    let div: Vec<f32> = (0..dim).step_by(2).map(|i| (i as f32 * c).exp()).collect();
    let mut pe = vec![0f32; max_len * dim];
    for p in 0..max_len {
        for (k, d) in div.iter().enumerate() {
            let a = p as f32 * d;
            pe[p * dim + 2 * k] = a.sin();
            if 2 * k + 1 < dim {
                pe[p * dim + 2 * k + 1] = a.cos();
            }
        }
    }
    Tensor::from_vec(pe, (max_len, dim), device)
}

/// `BasicTransformerBlock` as the motion modules build it: two self-attentions over the frames
/// (`double_self_attention`), each after the positional embedding, then a GEGLU feed-forward.
#[derive(Clone, Debug)]
pub struct TemporalTransformerBlock {
    pub norm1: LayerNorm,
    pub attn1: Attention,
    pub norm2: LayerNorm,
    pub attn2: Attention,
    pub norm3: LayerNorm,
    pub ff: FeedForward,
    pub pos_embed: Tensor,
}

impl TemporalTransformerBlock {
    fn new(vb: VarBuilder, dim: usize, heads: usize, max_seq_length: usize) -> Result<Self> {
        let cfg = AttentionConfig::new(dim, None, heads, dim / heads);
        Ok(Self {
            norm1: LayerNorm::new(vb.pp("norm1"), dim, 1e-5)?,
            attn1: Attention::new(vb.pp("attn1"), &cfg)?,
            norm2: LayerNorm::new(vb.pp("norm2"), dim, 1e-5)?,
            attn2: Attention::new(vb.pp("attn2"), &cfg)?,
            norm3: LayerNorm::new(vb.pp("norm3"), dim, 1e-5)?,
            ff: FeedForward::new(vb.pp("ff"), dim, dim * 4)?,
            pos_embed: sinusoidal_table(dim, max_seq_length, vb.device())?.to_dtype(vb.dtype())?,
        })
    }

    /// `x`: `[pixels, frames, dim]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let frames = x.dim(1)?;
        let pe = self.pos_embed.narrow(0, 0, frames)?;
        let n = self.norm1.forward(x)?.broadcast_add(&pe)?;
        let x = (self.attn1.forward(&n, None)? + x)?;
        let n = self.norm2.forward(&x)?.broadcast_add(&pe)?;
        let x = (self.attn2.forward(&n, None)? + x)?;
        self.ff.forward(&self.norm3.forward(&x)?)? + x
    }
}

/// `AnimateDiffTransformer3D`: GroupNorm over each video, then a transformer over the frames at
/// every pixel, added back to the input.
#[derive(Clone, Debug)]
pub struct AnimateDiffTransformer3D {
    pub norm: GroupNorm,
    pub proj_in: Linear,
    pub transformer_blocks: Vec<TemporalTransformerBlock>,
    pub proj_out: Linear,
    pub max_seq_length: usize,
}

impl AnimateDiffTransformer3D {
    fn new(
        vb: VarBuilder,
        channels: usize,
        heads: usize,
        layers: usize,
        groups: usize,
        max_seq_length: usize,
    ) -> anyhow::Result<Self> {
        if heads == 0 || !channels.is_multiple_of(heads) {
            bail!("motion adapter config: {channels} channels do not split into {heads} attention heads");
        }
        if groups == 0 || !channels.is_multiple_of(groups) {
            bail!("motion adapter: {channels} channels do not split into {groups} groups (the UNet's norm_num_groups)");
        }
        let inner = heads * (channels / heads);
        Ok(Self {
            norm: GroupNorm::new(vb.pp("norm"), groups, channels, 1e-6)?,
            proj_in: Linear::new(vb.pp("proj_in"), channels, inner, true)?,
            transformer_blocks: (0..layers)
                .map(|i| TemporalTransformerBlock::new(vb.pp("transformer_blocks").pp(i), inner, heads, max_seq_length))
                .collect::<Result<Vec<_>>>()?,
            proj_out: Linear::new(vb.pp("proj_out"), inner, channels, true)?,
            max_seq_length,
        })
    }

    /// `x`: `[b * frames, c, h, w]`.
    pub fn forward(&self, x: &Tensor, frames: usize) -> Result<Tensor> {
        let (bf, c, h, w) = x.dims4()?;
        if frames == 0 || bf % frames != 0 {
            candle_core::bail!("a batch of {bf} is not a whole number of {frames}-frame videos")
        }
        if frames > self.max_seq_length {
            candle_core::bail!(
                "{frames} frames exceed the motion adapter's motion_max_seq_length {}",
                self.max_seq_length
            )
        }
        let b = bf / frames;
        // [b, f, c, h, w] -> [b, c, f, h, w]: GroupNorm statistics span the frames of a video.
        let v = x.reshape((b, frames, c, h, w))?.permute((0, 2, 1, 3, 4))?.contiguous()?;
        let v = self.norm.forward(&v.reshape((b, c, frames * h, w))?)?.reshape((b, c, frames, h, w))?;
        // -> [b, h, w, f, c] -> [b*h*w, f, c]
        let t = v.permute((0, 3, 4, 2, 1))?.contiguous()?.reshape((b * h * w, frames, c))?;
        let mut t = self.proj_in.forward(&t)?;
        for block in &self.transformer_blocks {
            t = block.forward(&t)?;
        }
        let t = self.proj_out.forward(&t)?;
        // [b, h, w, f, c] -> [b, f, c, h, w]
        let y = t.reshape((b, h, w, frames, c))?.permute((0, 3, 4, 1, 2))?.contiguous()?.reshape((bf, c, h, w))?;
        y + x
    }
}

/// The motion modules of a `MotionAdapter`, shaped for one UNet: one per resnet/attention layer
/// of each down and up block (and of the mid block when the adapter has one).
#[derive(Clone, Debug)]
pub struct MotionModules {
    pub down: Vec<Vec<AnimateDiffTransformer3D>>,
    pub mid: Option<Vec<AnimateDiffTransformer3D>>,
    pub up: Vec<Vec<AnimateDiffTransformer3D>>,
}

fn expand_depths(d: &Depths, n: usize, layers: &[usize]) -> anyhow::Result<Vec<Vec<usize>>> {
    Ok(match d {
        Depths::One(k) => layers.iter().map(|&l| vec![*k; l]).collect(),
        Depths::Each(v) if v.len() == n => v
            .iter()
            .zip(layers)
            .map(|(e, &l)| match e {
                PerBlock::One(k) => Ok(vec![*k; l]),
                PerBlock::Each(v) if v.len() == l => Ok(v.clone()),
                PerBlock::Each(v) => {
                    bail!("motion adapter config: {} transformer depths for a block of {l} motion layers", v.len())
                }
            })
            .collect::<anyhow::Result<Vec<_>>>()?,
        Depths::Each(v) => {
            bail!("motion adapter config: motion_transformer_layers_per_block has {} entries for {n} blocks", v.len())
        }
    })
}

impl MotionModules {
    /// Build the modules of an adapter for `unet` (weights under the adapter's names:
    /// `down_blocks.{i}.motion_modules.{j}`, `mid_block.motion_modules.{j}`, `up_blocks.{i}...`).
    pub fn new(vb: VarBuilder, config: &MotionAdapterConfig, unet: &UNet2DConditionModel) -> anyhow::Result<Self> {
        let c = config;
        let u: &UNet2DConditionConfig = &unet.config;
        let n = c.block_out_channels.len();
        if c.block_out_channels != u.block_out_channels {
            bail!(
                "the motion adapter was made for block_out_channels {:?} but the UNet has {:?} (AnimateDiff adapters fit SD1.5-shaped UNets)",
                c.block_out_channels,
                u.block_out_channels
            )
        }
        if c.conv_in_channels.is_some() {
            bail!("motion adapter config: conv_in_channels (SparseCtrl / PIA) is not supported")
        }
        if let Some(a) = c.motion_activation_fn.as_deref().filter(|a| *a != "geglu") {
            bail!("motion adapter config: motion_activation_fn `{a}` is not supported (geglu)")
        }
        if c.motion_attention_bias == Some(true) || c.motion_cross_attention_dim.is_some() {
            bail!("motion adapter config: motion_attention_bias / motion_cross_attention_dim are not supported")
        }
        let groups = u.norm_num_groups.unwrap_or(32);
        let heads = c.motion_num_attention_heads.expand(n, "motion_num_attention_heads")?;
        let layers = c.motion_layers_per_block.expand(n, "motion_layers_per_block")?;
        let depths = expand_depths(&c.motion_transformer_layers_per_block, n, &layers)?;
        let seq = c.motion_max_seq_length;

        let mut down = Vec::with_capacity(n);
        for (i, block) in unet.down.down_blocks.iter().enumerate() {
            let unet_layers = match block {
                DownBlock::Down(b) => b.resnets.len(),
                DownBlock::CrossAttn(b) => b.resnets.len(),
            };
            if unet_layers != layers[i] {
                bail!(
                    "the motion adapter has {} motion layers in down block {i}, the UNet {unet_layers} layers",
                    layers[i]
                )
            }
            let vb = vb.pp("down_blocks").pp(i).pp("motion_modules");
            down.push(
                (0..layers[i])
                    .map(|j| {
                        AnimateDiffTransformer3D::new(
                            vb.pp(j),
                            c.block_out_channels[i],
                            heads[i],
                            depths[i][j],
                            groups,
                            seq,
                        )
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?,
            );
        }
        let mid = if c.use_motion_mid_block {
            let attentions = match &unet.down.mid_block {
                Some(MidBlock::CrossAttn(m)) => m.attentions.len(),
                _ => {
                    bail!("the motion adapter has a mid-block motion module but the UNet's mid block has no attention")
                }
            };
            let k = c.motion_mid_block_layers_per_block;
            if k != attentions {
                bail!("the motion adapter has {k} mid-block motion layers, the UNet's mid block {attentions}")
            }
            let d = c.motion_transformer_layers_per_mid_block.expand(k, "motion_transformer_layers_per_mid_block")?;
            let vb = vb.pp("mid_block").pp("motion_modules");
            let ch = c.block_out_channels[n - 1];
            Some(
                (0..k)
                    .map(|j| AnimateDiffTransformer3D::new(vb.pp(j), ch, heads[n - 1], d[j], groups, seq))
                    .collect::<anyhow::Result<Vec<_>>>()?,
            )
        } else {
            None
        };
        let rev = |v: &[usize]| v.iter().rev().copied().collect::<Vec<_>>();
        let up_layers: Vec<usize> = rev(&layers).iter().map(|l| l + 1).collect();
        let rev_depths = match &c.motion_transformer_layers_per_block {
            Depths::One(k) => Depths::One(*k),
            Depths::Each(v) => Depths::Each(v.iter().rev().cloned().collect()),
        };
        let up_depths = expand_depths(&rev_depths, n, &up_layers)?;
        let mut up = Vec::with_capacity(n);
        for (i, block) in unet.up_blocks.iter().enumerate() {
            let r = n - 1 - i;
            let unet_layers = match block {
                UpBlock::Up(b) => b.resnets.len(),
                UpBlock::CrossAttn(b) => b.resnets.len(),
            };
            if unet_layers != layers[r] + 1 {
                bail!(
                    "the motion adapter has {} motion layers in up block {i}, the UNet {unet_layers} layers",
                    layers[r] + 1
                )
            }
            let vb = vb.pp("up_blocks").pp(i).pp("motion_modules");
            up.push(
                (0..unet_layers)
                    .map(|j| {
                        AnimateDiffTransformer3D::new(
                            vb.pp(j),
                            c.block_out_channels[r],
                            heads[r],
                            up_depths[i][j],
                            groups,
                            seq,
                        )
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?,
            );
        }
        Ok(Self { down, mid, up })
    }

    /// The most frames the positional embeddings cover (`motion_max_seq_length`).
    pub fn max_frames(&self) -> usize {
        self.down
            .iter()
            .chain(&self.up)
            .chain(self.mid.iter())
            .flatten()
            .map(|m| m.max_seq_length)
            .min()
            .unwrap_or(usize::MAX)
    }

    /// The hooks that run these modules inside the UNet for `frames`-frame videos.
    pub fn hooks(&self, frames: usize) -> MotionHooks<'_> {
        MotionHooks { modules: self, frames }
    }
}

/// [`MotionModules`] bound to a frame count, run after each block layer.
pub struct MotionHooks<'a> {
    modules: &'a MotionModules,
    frames: usize,
}

impl BlockHooks for MotionHooks<'_> {
    fn after_layer(&self, place: Place, layer: usize, x: Tensor) -> Result<Tensor> {
        let m = match place {
            Place::Down(i) => self.modules.down.get(i).and_then(|b| b.get(layer)),
            Place::Mid => self.modules.mid.as_ref().and_then(|b| b.get(layer)),
            Place::Up(i) => self.modules.up.get(i).and_then(|b| b.get(layer)),
        };
        match m {
            Some(m) => m.forward(&x, self.frames),
            None => Ok(x),
        }
    }
}

/// Read a `MotionAdapter` folder's config.
pub fn read_motion_config(dir: &Path) -> anyhow::Result<MotionAdapterConfig> {
    crate::config::check_class_name(dir, "MotionAdapter")?;
    MotionAdapterConfig::from_file(&dir.join("config.json")).context("motion adapter")
}
