//! The first half of a conditional UNet: time (and SDXL added) embedding, `conv_in`, the down
//! blocks and the mid block. [`UNet2DConditionModel`](super) adds the up
//! path to it; [`ControlNetModel`](crate::models::controlnet) is a trained copy of it with zero
//! convolutions on its outputs. Weight names are diffusers' (`conv_in`, `down_blocks.{i}`, ...)
//! and the same in both models.

use super::conditioning::{Timestep, UNetConditioning};
use super::config::{TransformerLayers, UNet2DConditionConfig};
use crate::config::PerBlock;
use crate::models::blocks::{
    CrossAttnDownBlock2D, CrossAttnParams, DownBlock2D, ResnetParams, UNetMidBlock2D, UNetMidBlock2DCrossAttn,
};
use crate::models::embeddings::{TimestepEmbedding, Timesteps};
use crate::models::resnet::TimeEmbeddingNorm;
use crate::nn::{Activation, Conv2d};
use anyhow::{bail, Context};
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

/// One entry of the down path.
#[derive(Clone, Debug)]
pub enum DownBlock {
    Down(DownBlock2D),
    CrossAttn(CrossAttnDownBlock2D),
}

/// The mid block (`mid_block_type`).
#[derive(Clone, Debug)]
pub enum MidBlock {
    CrossAttn(UNetMidBlock2DCrossAttn),
    /// `UNetMidBlock2D` as the UNet builds it: a single resnet (SSD-1B).
    Plain(UNetMidBlock2D),
}

/// Per-block settings read once from the config; the up path reads them too.
#[derive(Clone, Debug)]
pub struct BlockSettings {
    pub n: usize,
    pub heads: Vec<usize>,
    pub cross_dims: Vec<usize>,
    pub layers_per_block: Vec<usize>,
    pub only_cross: Vec<bool>,
    pub transformer_layers: Vec<PerBlock<usize>>,
    pub resnet: ResnetParams,
    pub time_embed_dim: usize,
    pub act: Activation,
    pub groups: usize,
}

fn per_block<T: Clone>(v: &PerBlock<T>, n: usize, name: &str) -> anyhow::Result<Vec<T>> {
    v.expand(n, name).map_err(|e| anyhow::anyhow!("unet config: {e} (one per down block)"))
}

/// Per-attention depths of one block, from a `transformer_layers_per_block` entry.
pub fn layers_of(entry: &PerBlock<usize>, num_layers: usize) -> Vec<usize> {
    match entry {
        PerBlock::One(n) => vec![*n; num_layers],
        PerBlock::Each(v) => v.clone(),
    }
}

impl BlockSettings {
    /// Check the options of the down half and expand the per-block ones.
    pub fn from_config(c: &UNet2DConditionConfig) -> anyhow::Result<Self> {
        let n = c.down_block_types.len();
        if n == 0 {
            bail!("unet config: down_block_types is empty")
        }
        if c.block_out_channels.len() != n {
            bail!(
                "unet config: down_block_types has {n} entries but block_out_channels has {}",
                c.block_out_channels.len()
            )
        }
        let unsupported = |what: &str| anyhow::anyhow!("unet config: {what} is not supported");
        if c.dual_cross_attention {
            return Err(unsupported("dual_cross_attention"));
        }
        if let Some(t) = &c.class_embed_type {
            return Err(unsupported(&format!("class_embed_type `{t}`")));
        }
        if c.num_class_embeds.is_some() {
            return Err(unsupported("num_class_embeds (class embeddings)"));
        }
        if c.encoder_hid_dim.is_some() || c.encoder_hid_dim_type.is_some() {
            return Err(unsupported("encoder_hid_dim / encoder_hid_dim_type"));
        }
        if let Some(t) = c.attention_type.as_deref().filter(|t| *t != "default") {
            return Err(unsupported(&format!("attention_type `{t}`")));
        }
        if let Some(t) = &c.cross_attention_norm {
            return Err(unsupported(&format!("cross_attention_norm `{t}`")));
        }
        if c.time_embedding_type != "positional" {
            return Err(unsupported(&format!("time_embedding_type `{}`", c.time_embedding_type)));
        }
        if c.block_out_channels.contains(&0) || c.in_channels == 0 || c.out_channels == 0 {
            bail!(
                "unet config: channel counts must be positive (block_out_channels {:?}, in {}, out {})",
                c.block_out_channels,
                c.in_channels,
                c.out_channels
            )
        }
        if c.conv_in_kernel == 0 || c.conv_out_kernel == 0 {
            bail!("unet config: conv_in_kernel and conv_out_kernel must be positive")
        }
        let Some(groups) = c.norm_num_groups else {
            return Err(unsupported("norm_num_groups: null"));
        };
        let time_embedding_norm = TimeEmbeddingNorm::from_name(&c.resnet_time_scale_shift).context("unet config")?;
        let act = Activation::from_name(&c.act_fn).context("unet config: act_fn")?;
        let transformer_layers: Vec<PerBlock<usize>> = match &c.transformer_layers_per_block {
            TransformerLayers::One(v) => vec![PerBlock::One(*v); n],
            TransformerLayers::Each(v) if v.len() == n => v.clone(),
            TransformerLayers::Each(v) => {
                bail!("unet config: transformer_layers_per_block has {} entries but down_block_types has {n}", v.len())
            }
        };
        let time_embed_dim = c.time_embedding_dim.unwrap_or(c.block_out_channels[0] * 4);
        Ok(Self {
            n,
            heads: per_block(&c.attention_head_dim, n, "attention_head_dim")?,
            cross_dims: per_block(&c.cross_attention_dim, n, "cross_attention_dim")?,
            layers_per_block: per_block(&c.layers_per_block, n, "layers_per_block")?,
            only_cross: per_block(&c.only_cross_attention, n, "only_cross_attention")?,
            transformer_layers,
            resnet: ResnetParams {
                temb_channels: Some(time_embed_dim),
                groups,
                eps: c.norm_eps,
                act,
                time_embedding_norm,
                output_scale_factor: 1.0,
            },
            time_embed_dim,
            act,
            groups,
        })
    }
}

/// Which block a layer belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    Down(usize),
    Mid,
    Up(usize),
}

/// Work done after each layer of the UNet's blocks (AnimateDiff's motion modules).
pub trait BlockHooks {
    fn after_layer(&self, _place: Place, _layer: usize, x: Tensor) -> Result<Tensor> {
        Ok(x)
    }
}

/// No hooks: the plain UNet.
pub struct NoHooks;
impl BlockHooks for NoHooks {}

#[derive(Clone, Debug)]
pub struct UNetDownPath {
    pub conv_in: Conv2d,
    pub time_proj: Timesteps,
    pub time_embedding: TimestepEmbedding,
    /// SDXL `text_time`: sinusoidal projection of `time_ids`.
    pub add_time_proj: Option<Timesteps>,
    pub add_embedding: Option<TimestepEmbedding>,
    pub time_embed_act: Option<Activation>,
    pub down_blocks: Vec<DownBlock>,
    pub mid_block: Option<MidBlock>,
}

impl UNetDownPath {
    pub fn new(vb: &VarBuilder, c: &UNet2DConditionConfig, s: &BlockSettings) -> anyhow::Result<Self> {
        let boc = &c.block_out_channels;
        let ch0 = boc[0];
        let conv_in = Conv2d::new(
            vb.pp("conv_in"),
            c.in_channels,
            ch0,
            c.conv_in_kernel,
            1,
            c.conv_in_kernel.saturating_sub(1) / 2,
        )?;
        let time_proj = Timesteps::new(ch0, c.flip_sin_to_cos, c.freq_shift);
        let time_embedding = TimestepEmbedding::new(
            vb.pp("time_embedding"),
            ch0,
            s.time_embed_dim,
            &c.act_fn,
            None,
            c.timestep_post_act.as_deref(),
            c.time_cond_proj_dim,
        )?;
        let (add_time_proj, add_embedding) = match c.addition_embed_type.as_deref() {
            None => (None, None),
            Some("text_time") => {
                let Some(time_dim) = c.addition_time_embed_dim else {
                    bail!("unet config: addition_embed_type `text_time` needs addition_time_embed_dim")
                };
                let Some(in_dim) = c.projection_class_embeddings_input_dim else {
                    bail!("unet config: addition_embed_type `text_time` needs projection_class_embeddings_input_dim")
                };
                let emb =
                    TimestepEmbedding::new(vb.pp("add_embedding"), in_dim, s.time_embed_dim, "silu", None, None, None)?;
                (Some(Timesteps::new(time_dim, c.flip_sin_to_cos, c.freq_shift)), Some(emb))
            }
            Some(other) => bail!("unet config: addition_embed_type `{other}` is not supported"),
        };
        let time_embed_act = c
            .time_embedding_act_fn
            .as_deref()
            .map(Activation::from_name)
            .transpose()
            .context("unet config: time_embedding_act_fn")?;

        let rp = &s.resnet;
        let attn = |i: usize, depths: Vec<usize>| CrossAttnParams {
            num_attention_heads: s.heads[i],
            cross_attention_dim: s.cross_dims[i],
            transformer_layers_per_block: depths,
            use_linear_projection: c.use_linear_projection,
            only_cross_attention: s.only_cross[i],
        };
        let n = s.n;
        let mut down_blocks = Vec::with_capacity(n);
        let mut output_channel = ch0;
        for (i, ty) in c.down_block_types.iter().enumerate() {
            let input_channel = output_channel;
            output_channel = boc[i];
            let add_downsample = i + 1 != n;
            let vb = vb.pp("down_blocks").pp(i);
            let nl = s.layers_per_block[i];
            let block = match ty.strip_prefix("UNetRes").unwrap_or(ty) {
                "DownBlock2D" => DownBlock::Down(DownBlock2D::new(
                    vb, input_channel, output_channel, nl, add_downsample, c.downsample_padding, rp,
                )?),
                "CrossAttnDownBlock2D" => DownBlock::CrossAttn(CrossAttnDownBlock2D::new(
                    vb,
                    input_channel,
                    output_channel,
                    nl,
                    add_downsample,
                    c.downsample_padding,
                    rp,
                    &attn(i, layers_of(&s.transformer_layers[i], nl)),
                )?),
                other => bail!("unet config: down block type `{other}` is not supported (supported: DownBlock2D, CrossAttnDownBlock2D)"),
            };
            down_blocks.push(block);
        }

        let last = n - 1;
        let mid_rp = ResnetParams { output_scale_factor: c.mid_block_scale_factor, ..*rp };
        let mid_block = match c.mid_block_type.as_deref() {
            None => None,
            Some("UNetMidBlock2DCrossAttn") => {
                let mut ap = attn(last, layers_of(&s.transformer_layers[last], 1));
                ap.only_cross_attention = false;
                Some(MidBlock::CrossAttn(UNetMidBlock2DCrossAttn::new(vb.pp("mid_block"), boc[last], &mid_rp, &ap)?))
            }
            Some("UNetMidBlock2D") => {
                Some(MidBlock::Plain(UNetMidBlock2D::new(vb.pp("mid_block"), boc[last], 0, false, 1, &mid_rp)?))
            }
            Some(other) => bail!("unet config: mid_block_type `{other}` is not supported (supported: UNetMidBlock2DCrossAttn, UNetMidBlock2D, null)"),
        };
        Ok(Self {
            conv_in,
            time_proj,
            time_embedding,
            add_time_proj,
            add_embedding,
            time_embed_act,
            down_blocks,
            mid_block,
        })
    }

    /// Timesteps as a `[batch]` tensor.
    fn timesteps(timestep: Timestep, batch: usize, sample: &Tensor) -> Result<Tensor> {
        let t = match timestep {
            // diffusers makes a float64 tensor of a Python float; the projection then runs in f32.
            Timestep::Scalar(t) => Tensor::new(&[t], sample.device())?,
            Timestep::Tensor(t) => match t.dims() {
                [] => t.reshape(1)?,
                [_] => t,
                d => candle_core::bail!("timestep must be a scalar or 1-D tensor, got shape {d:?}"),
            },
        };
        match t.dim(0)? {
            1 => t.broadcast_as(batch),
            n if n == batch => Ok(t),
            n => candle_core::bail!("{n} timesteps for a batch of {batch}"),
        }
    }

    /// The time embedding `emb` every resnet receives (timestep, LCM guidance, SDXL added cond).
    pub fn time_embed(&self, sample: &Tensor, timestep: Timestep, cond: &UNetConditioning) -> Result<Tensor> {
        let batch = sample.dim(0)?;
        let t = Self::timesteps(timestep, batch, sample)?;
        let t_emb = self.time_proj.forward(&t)?.to_dtype(sample.dtype())?;
        let mut emb = self.time_embedding.forward(&t_emb, cond.timestep_cond.as_ref())?;
        if let (Some(proj), Some(add)) = (&self.add_time_proj, &self.add_embedding) {
            let Some(added) = &cond.added_cond else {
                candle_core::bail!(
                    "this model (addition_embed_type `text_time`) needs `added_cond` (text_embeds and time_ids)"
                )
            };
            let b = added.text_embeds.dim(0)?;
            let time_embeds = proj.forward(&added.time_ids.flatten_all()?)?.reshape((b, ()))?;
            let add_embeds = Tensor::cat(&[&added.text_embeds, &time_embeds.to_dtype(added.text_embeds.dtype())?], 1)?
                .to_dtype(emb.dtype())?;
            emb = emb.broadcast_add(&add.forward(&add_embeds, None)?)?;
        }
        match &self.time_embed_act {
            Some(a) => a.forward(&emb),
            None => Ok(emb),
        }
    }

    /// Run the down blocks on `x` (the `conv_in` output). Returns the last hidden state and the
    /// skip connections (`x` first). T2I-Adapter `intrablock` residuals are taken one per down
    /// block, as diffusers pops them.
    pub fn down(
        &self,
        mut x: Tensor,
        emb: &Tensor,
        ehs: &Tensor,
        intrablock: &mut dyn Iterator<Item = &Tensor>,
        hooks: &dyn BlockHooks,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut skips: Vec<Tensor> = vec![x.clone()];
        for (i, block) in self.down_blocks.iter().enumerate() {
            match block {
                DownBlock::CrossAttn(b) => {
                    let extra = intrablock.next();
                    let (y, states) =
                        b.forward(&x, Some(emb), ehs, extra, Some(&|j, x| hooks.after_layer(Place::Down(i), j, x)))?;
                    x = y;
                    skips.extend(states);
                }
                DownBlock::Down(b) => {
                    let (y, mut states) =
                        b.forward(&x, Some(emb), Some(&|j, x| hooks.after_layer(Place::Down(i), j, x)))?;
                    x = y;
                    if let Some(extra) = intrablock.next() {
                        // diffusers adds in place (`sample += ...`), so the skip connection that
                        // aliases the block output gets the residual too.
                        x = (x + extra)?;
                        if let Some(last) = states.last_mut() {
                            *last = x.clone();
                        }
                    }
                    skips.extend(states);
                }
            }
        }
        Ok((x, skips))
    }

    /// The shapes `[channels, h, w]` T2I-Adapter features must have, one per down block, for
    /// latents of `h x w` (where diffusers adds them: before a cross-attention block's
    /// downsampler, after a plain block's).
    pub fn intrablock_shapes(&self, mut h: usize, mut w: usize) -> Vec<[usize; 3]> {
        let down = |d: usize, pad: usize| if pad == 0 { (d + 1 - 3) / 2 + 1 } else { (d + 2 * pad - 3) / 2 + 1 };
        let mut out = Vec::new();
        for block in &self.down_blocks {
            let (ch, ds) = match block {
                DownBlock::CrossAttn(b) => (&b.resnets, &b.downsamplers),
                DownBlock::Down(b) => (&b.resnets, &b.downsamplers),
            };
            let ch = match ch.last() {
                Some(r) => r.conv2.weight.dims()[0],
                None => continue,
            };
            let (h2, w2) = match ds {
                Some(d) => (down(h, d.padding), down(w, d.padding)),
                None => (h, w),
            };
            out.push(match block {
                DownBlock::CrossAttn(_) => [ch, h, w],
                DownBlock::Down(_) => [ch, h2, w2],
            });
            (h, w) = (h2, w2);
        }
        out
    }

    /// The mid block, if the model has one (`x` unchanged otherwise).
    pub fn mid(&self, x: Tensor, emb: &Tensor, ehs: &Tensor, hooks: &dyn BlockHooks) -> Result<Tensor> {
        match &self.mid_block {
            Some(MidBlock::CrossAttn(m)) => {
                m.forward(&x, Some(emb), ehs, Some(&|j, x| hooks.after_layer(Place::Mid, j, x)))
            }
            Some(MidBlock::Plain(m)) => m.forward(&x, Some(emb)),
            None => Ok(x),
        }
    }
}
