//! The conditional UNet of Stable Diffusion 1.x/2.x, SDXL, SSD-1B and their LCM-distilled
//! variants (diffusers `unets/unet_2d_condition.py`), built from its `config.json`.

use crate::config::{read_config, PerBlock};
use crate::models::embeddings::{TimestepEmbedding, Timesteps};
use crate::models::resnet::TimeEmbeddingNorm;
use crate::models::unet_2d_blocks::{
    CrossAttnDownBlock2D, CrossAttnParams, CrossAttnUpBlock2D, DownBlock2D, ResnetParams, UNetMidBlock2D,
    UNetMidBlock2DCrossAttn, UpBlock2D,
};
use crate::nn::{Activation, Conv2d, GroupNorm};
use anyhow::{bail, Context};
use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Deserializer};
use std::path::Path;

/// `null` in a config reads as `false`, as diffusers' truthiness checks treat `None`.
fn null_false<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(d)?.unwrap_or(false))
}

fn sample_size<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<usize, D::Error> {
    Ok(match Option::<PerBlock<usize>>::deserialize(d)? {
        None => d_sample_size(),
        Some(PerBlock::One(s)) => s,
        Some(PerBlock::Each(v)) => v.first().copied().unwrap_or_else(d_sample_size),
    })
}

/// `transformer_layers_per_block`: one depth for every attention, one per block, or (asymmetric
/// UNets such as SSD-1B) a per-attention list for some blocks.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum TransformerLayers {
    One(usize),
    Each(Vec<PerBlock<usize>>),
}

/// diffusers' `UNet2DConditionModel` config. Absent keys take diffusers' defaults; unknown keys
/// are ignored. Options that change the architecture but are not implemented are rejected by
/// [`UNet2DConditionModel::new`], never silently ignored.
#[derive(Clone, Debug, Deserialize)]
pub struct UNet2DConditionConfig {
    /// Latent size the model was trained at (pipelines default to `sample_size * vae_scale_factor`
    /// pixels). diffusers' default is None; absent or null here it reads as 64 (SD1.5), and a
    /// `[height, width]` list reads as its height.
    #[serde(default = "d_sample_size", deserialize_with = "sample_size")]
    pub sample_size: usize,
    #[serde(default = "d_4")]
    pub in_channels: usize,
    #[serde(default = "d_4")]
    pub out_channels: usize,
    #[serde(default, deserialize_with = "null_false")]
    pub center_input_sample: bool,
    #[serde(default = "d_true", deserialize_with = "null_false")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "d_down_block_types")]
    pub down_block_types: Vec<String>,
    /// `None` (an explicit `null`): no mid block. Absent: `UNetMidBlock2DCrossAttn`.
    #[serde(default = "d_mid_block_type")]
    pub mid_block_type: Option<String>,
    #[serde(default = "d_up_block_types")]
    pub up_block_types: Vec<String>,
    #[serde(default = "d_false_per_block")]
    pub only_cross_attention: PerBlock<bool>,
    #[serde(default = "d_block_out_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_layers_per_block")]
    pub layers_per_block: PerBlock<usize>,
    #[serde(default = "d_1usize")]
    pub downsample_padding: usize,
    #[serde(default = "d_1f64")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "d_silu")]
    pub act_fn: String,
    #[serde(default = "d_norm_num_groups")]
    pub norm_num_groups: Option<usize>,
    #[serde(default = "d_norm_eps")]
    pub norm_eps: f64,
    #[serde(default = "d_cross_attention_dim")]
    pub cross_attention_dim: PerBlock<usize>,
    #[serde(default = "d_transformer_layers")]
    pub transformer_layers_per_block: TransformerLayers,
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<Vec<PerBlock<usize>>>,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    #[serde(default)]
    pub encoder_hid_dim_type: Option<String>,
    /// In this class diffusers uses it as the number of heads (see `num_attention_heads`).
    #[serde(default = "d_attention_head_dim")]
    pub attention_head_dim: PerBlock<usize>,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock<usize>>,
    #[serde(default, deserialize_with = "null_false")]
    pub dual_cross_attention: bool,
    #[serde(default, deserialize_with = "null_false")]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    /// Attention in f32 for f16 models; a no-op here (f32 throughout).
    #[serde(default, deserialize_with = "null_false")]
    pub upcast_attention: bool,
    #[serde(default = "d_default")]
    pub resnet_time_scale_shift: String,
    #[serde(default = "d_positional")]
    pub time_embedding_type: String,
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    #[serde(default)]
    pub time_embedding_act_fn: Option<String>,
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    /// LCM: width of the guidance-scale embedding added through `time_embedding.cond_proj`.
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default = "d_3usize")]
    pub conv_in_kernel: usize,
    #[serde(default = "d_3usize")]
    pub conv_out_kernel: usize,
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default = "d_attention_type")]
    pub attention_type: Option<String>,
    #[serde(default)]
    pub cross_attention_norm: Option<String>,
}

fn d_sample_size() -> usize {
    64
}
fn d_4() -> usize {
    4
}
fn d_true() -> bool {
    true
}
fn d_1usize() -> usize {
    1
}
fn d_3usize() -> usize {
    3
}
fn d_1f64() -> f64 {
    1.0
}
fn d_norm_eps() -> f64 {
    1e-5
}
fn d_norm_num_groups() -> Option<usize> {
    Some(32)
}
fn d_silu() -> String {
    "silu".into()
}
fn d_default() -> String {
    "default".into()
}
fn d_positional() -> String {
    "positional".into()
}
fn d_attention_type() -> Option<String> {
    Some("default".into())
}
fn d_down_block_types() -> Vec<String> {
    ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
        .map(String::from)
        .to_vec()
}
fn d_up_block_types() -> Vec<String> {
    ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"].map(String::from).to_vec()
}
fn d_mid_block_type() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn d_false_per_block() -> PerBlock<bool> {
    PerBlock::One(false)
}
fn d_block_out_channels() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn d_layers_per_block() -> PerBlock<usize> {
    PerBlock::One(2)
}
fn d_cross_attention_dim() -> PerBlock<usize> {
    PerBlock::One(1280)
}
fn d_transformer_layers() -> TransformerLayers {
    TransformerLayers::One(1)
}
fn d_attention_head_dim() -> PerBlock<usize> {
    PerBlock::One(8)
}

impl Default for UNet2DConditionConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("the empty config takes every default")
    }
}

impl UNet2DConditionConfig {
    /// Read `unet/config.json`.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        read_config(path)
    }
}

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

/// One entry of the up path.
#[derive(Clone, Debug)]
pub enum UpBlock {
    Up(UpBlock2D),
    CrossAttn(CrossAttnUpBlock2D),
}

impl UpBlock {
    fn num_resnets(&self) -> usize {
        match self {
            Self::Up(b) => b.resnets.len(),
            Self::CrossAttn(b) => b.resnets.len(),
        }
    }
}

/// SDXL's `added_cond_kwargs` for `addition_embed_type: "text_time"`.
#[derive(Clone, Debug)]
pub struct AddedCond {
    /// Pooled text embedding `[b, d]` of the second text encoder.
    pub text_embeds: Tensor,
    /// `[b, 6]`: original size, crop top-left, target size.
    pub time_ids: Tensor,
}

/// Everything besides the sample, timestep and text states that can steer the UNet. Each field
/// follows diffusers' `UNet2DConditionModel.forward` argument of the same name.
#[derive(Clone, Debug, Default)]
pub struct UNetConditioning {
    /// LCM guidance-scale embedding `[b, time_cond_proj_dim]`, added through `time_embedding.cond_proj`.
    pub timestep_cond: Option<Tensor>,
    /// SDXL `text_embeds` + `time_ids` (required when `addition_embed_type` is `"text_time"`).
    pub added_cond: Option<AddedCond>,
    /// ControlNet: one residual per skip connection (conv_in output included), added to the skips.
    pub down_block_additional_residuals: Option<Vec<Tensor>>,
    /// ControlNet: added to the mid-block output.
    pub mid_block_additional_residual: Option<Tensor>,
    /// T2I-Adapter: added inside the down blocks (and to the mid block output when one is left
    /// over with its shape).
    pub down_intrablock_additional_residuals: Option<Vec<Tensor>>,
}

/// A timestep: one number for the whole batch or a tensor (0-d, `[1]` or `[batch]`).
#[derive(Clone, Debug)]
pub enum Timestep {
    Scalar(f64),
    Tensor(Tensor),
}

impl From<f64> for Timestep {
    fn from(t: f64) -> Self {
        Self::Scalar(t)
    }
}
impl From<f32> for Timestep {
    fn from(t: f32) -> Self {
        Self::Scalar(t as f64)
    }
}
impl From<i64> for Timestep {
    fn from(t: i64) -> Self {
        Self::Scalar(t as f64)
    }
}
impl From<usize> for Timestep {
    fn from(t: usize) -> Self {
        Self::Scalar(t as f64)
    }
}
impl From<Tensor> for Timestep {
    fn from(t: Tensor) -> Self {
        Self::Tensor(t)
    }
}
impl From<&Tensor> for Timestep {
    fn from(t: &Tensor) -> Self {
        Self::Tensor(t.clone())
    }
}

#[derive(Clone, Debug)]
pub struct UNet2DConditionModel {
    pub config: UNet2DConditionConfig,
    pub conv_in: Conv2d,
    pub time_proj: Timesteps,
    pub time_embedding: TimestepEmbedding,
    /// SDXL `text_time`: sinusoidal projection of `time_ids`.
    pub add_time_proj: Option<Timesteps>,
    pub add_embedding: Option<TimestepEmbedding>,
    pub time_embed_act: Option<Activation>,
    pub down_blocks: Vec<DownBlock>,
    pub mid_block: Option<MidBlock>,
    pub up_blocks: Vec<UpBlock>,
    pub conv_norm_out: GroupNorm,
    pub conv_act: Activation,
    pub conv_out: Conv2d,
    num_upsamplers: usize,
}

fn per_block<T: Clone>(v: &PerBlock<T>, n: usize, name: &str) -> anyhow::Result<Vec<T>> {
    v.expand(n, name).map_err(|e| anyhow::anyhow!("unet config: {e} (one per down block)"))
}

/// Per-attention depths of one block, from a `transformer_layers_per_block` entry.
fn layers_of(entry: &PerBlock<usize>, num_layers: usize) -> Vec<usize> {
    match entry {
        PerBlock::One(n) => vec![*n; num_layers],
        PerBlock::Each(v) => v.clone(),
    }
}

impl UNet2DConditionModel {
    /// Build the model from `config`, taking the weights from `vb` by diffusers' names.
    pub fn new(vb: VarBuilder, config: &UNet2DConditionConfig) -> anyhow::Result<Self> {
        let c = config;
        let n = c.down_block_types.len();
        if n == 0 {
            bail!("unet config: down_block_types is empty")
        }
        if c.up_block_types.len() != n {
            bail!(
                "unet config: down_block_types has {n} entries but up_block_types has {}",
                c.up_block_types.len()
            )
        }
        if c.block_out_channels.len() != n {
            bail!(
                "unet config: down_block_types has {n} entries but block_out_channels has {}",
                c.block_out_channels.len()
            )
        }
        if c.num_attention_heads.is_some() {
            // diffusers raises here too: the key's meaning is taken by `attention_head_dim`.
            bail!("unet config: `num_attention_heads` is not supported by UNet2DConditionModel; set `attention_head_dim` (it is the number of heads)")
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
        let time_embedding_norm =
            TimeEmbeddingNorm::from_name(&c.resnet_time_scale_shift).context("unet config")?;
        let act = Activation::from_name(&c.act_fn).context("unet config: act_fn")?;

        let only_cross = per_block(&c.only_cross_attention, n, "only_cross_attention")?;
        let heads = per_block(&c.attention_head_dim, n, "attention_head_dim")?;
        let cross_dims = per_block(&c.cross_attention_dim, n, "cross_attention_dim")?;
        let layers_per_block = per_block(&c.layers_per_block, n, "layers_per_block")?;
        let transformer_layers: Vec<PerBlock<usize>> = match &c.transformer_layers_per_block {
            TransformerLayers::One(v) => vec![PerBlock::One(*v); n],
            TransformerLayers::Each(v) if v.len() == n => v.clone(),
            TransformerLayers::Each(v) => bail!(
                "unet config: transformer_layers_per_block has {} entries but down_block_types has {n}",
                v.len()
            ),
        };
        let reverse_transformer_layers: Vec<PerBlock<usize>> = match &c.reverse_transformer_layers_per_block {
            None => {
                if transformer_layers.iter().any(|t| matches!(t, PerBlock::Each(_))) {
                    bail!("unet config: per-attention transformer_layers_per_block lists need reverse_transformer_layers_per_block")
                }
                transformer_layers.iter().rev().cloned().collect()
            }
            Some(v) if v.len() == n => v.clone(),
            Some(v) => bail!(
                "unet config: reverse_transformer_layers_per_block has {} entries but up_block_types has {n}",
                v.len()
            ),
        };

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

        let time_embed_dim = c.time_embedding_dim.unwrap_or(ch0 * 4);
        let time_proj = Timesteps::new(ch0, c.flip_sin_to_cos, c.freq_shift);
        let time_embedding = TimestepEmbedding::new(
            vb.pp("time_embedding"),
            ch0,
            time_embed_dim,
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
                let emb = TimestepEmbedding::new(
                    vb.pp("add_embedding"),
                    in_dim,
                    time_embed_dim,
                    "silu",
                    None,
                    None,
                    None,
                )?;
                (Some(Timesteps::new(time_dim, c.flip_sin_to_cos, c.freq_shift)), Some(emb))
            }
            Some(other) => return Err(unsupported(&format!("addition_embed_type `{other}`"))),
        };
        let time_embed_act = c
            .time_embedding_act_fn
            .as_deref()
            .map(Activation::from_name)
            .transpose()
            .context("unet config: time_embedding_act_fn")?;

        let rp = ResnetParams {
            temb_channels: Some(time_embed_dim),
            groups,
            eps: c.norm_eps,
            act,
            time_embedding_norm,
            output_scale_factor: 1.0,
        };
        let attn = |i: usize, depths: Vec<usize>| CrossAttnParams {
            num_attention_heads: heads[i],
            cross_attention_dim: cross_dims[i],
            transformer_layers_per_block: depths,
            use_linear_projection: c.use_linear_projection,
            only_cross_attention: only_cross[i],
        };

        let mut down_blocks = Vec::with_capacity(n);
        let mut output_channel = ch0;
        for (i, ty) in c.down_block_types.iter().enumerate() {
            let input_channel = output_channel;
            output_channel = boc[i];
            let add_downsample = i + 1 != n;
            let vb = vb.pp("down_blocks").pp(i);
            let nl = layers_per_block[i];
            let block = match ty.strip_prefix("UNetRes").unwrap_or(ty) {
                "DownBlock2D" => DownBlock::Down(DownBlock2D::new(
                    vb, input_channel, output_channel, nl, add_downsample, c.downsample_padding, &rp,
                )?),
                "CrossAttnDownBlock2D" => DownBlock::CrossAttn(CrossAttnDownBlock2D::new(
                    vb,
                    input_channel,
                    output_channel,
                    nl,
                    add_downsample,
                    c.downsample_padding,
                    &rp,
                    &attn(i, layers_of(&transformer_layers[i], nl)),
                )?),
                other => bail!("unet config: down block type `{other}` is not supported (supported: DownBlock2D, CrossAttnDownBlock2D)"),
            };
            down_blocks.push(block);
        }

        let last = n - 1;
        let mid_rp = ResnetParams { output_scale_factor: c.mid_block_scale_factor, ..rp };
        let mid_block = match c.mid_block_type.as_deref() {
            None => None,
            Some("UNetMidBlock2DCrossAttn") => {
                let mut ap = attn(last, layers_of(&transformer_layers[last], 1));
                ap.only_cross_attention = false;
                Some(MidBlock::CrossAttn(UNetMidBlock2DCrossAttn::new(vb.pp("mid_block"), boc[last], &mid_rp, &ap)?))
            }
            Some("UNetMidBlock2D") => {
                Some(MidBlock::Plain(UNetMidBlock2D::new(vb.pp("mid_block"), boc[last], 0, false, 1, &mid_rp)?))
            }
            Some(other) => bail!("unet config: mid_block_type `{other}` is not supported (supported: UNetMidBlock2DCrossAttn, UNetMidBlock2D, null)"),
        };

        let rev_boc: Vec<usize> = boc.iter().rev().copied().collect();
        let rev = |v: &Vec<usize>| -> Vec<usize> { v.iter().rev().copied().collect() };
        let (rev_heads, rev_cross, rev_lpb) = (rev(&heads), rev(&cross_dims), rev(&layers_per_block));
        let rev_only_cross: Vec<bool> = only_cross.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(n);
        let mut num_upsamplers = 0;
        let mut output_channel = rev_boc[0];
        for (i, ty) in c.up_block_types.iter().enumerate() {
            let is_final = i + 1 == n;
            let prev_output_channel = output_channel;
            output_channel = rev_boc[i];
            let input_channel = rev_boc[(i + 1).min(n - 1)];
            if !is_final {
                num_upsamplers += 1;
            }
            let nl = rev_lpb[i] + 1;
            let vb = vb.pp("up_blocks").pp(i);
            let block = match ty.strip_prefix("UNetRes").unwrap_or(ty) {
                "UpBlock2D" => UpBlock::Up(UpBlock2D::new(
                    vb, input_channel, prev_output_channel, output_channel, nl, !is_final, &rp,
                )?),
                "CrossAttnUpBlock2D" => {
                    let ap = CrossAttnParams {
                        num_attention_heads: rev_heads[i],
                        cross_attention_dim: rev_cross[i],
                        transformer_layers_per_block: layers_of(&reverse_transformer_layers[i], nl),
                        use_linear_projection: c.use_linear_projection,
                        only_cross_attention: rev_only_cross[i],
                    };
                    UpBlock::CrossAttn(CrossAttnUpBlock2D::new(
                        vb, input_channel, prev_output_channel, output_channel, nl, !is_final, &rp, &ap,
                    )?)
                }
                other => bail!("unet config: up block type `{other}` is not supported (supported: UpBlock2D, CrossAttnUpBlock2D)"),
            };
            up_blocks.push(block);
        }

        let conv_norm_out = GroupNorm::new(vb.pp("conv_norm_out"), groups, ch0, c.norm_eps)?;
        let conv_out = Conv2d::new(
            vb.pp("conv_out"),
            ch0,
            c.out_channels,
            c.conv_out_kernel,
            1,
            c.conv_out_kernel.saturating_sub(1) / 2,
        )?;
        Ok(Self {
            config: c.clone(),
            conv_in,
            time_proj,
            time_embedding,
            add_time_proj,
            add_embedding,
            time_embed_act,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_act: act,
            conv_out,
            num_upsamplers,
        })
    }

    /// Timesteps as a `[batch]` tensor.
    fn timesteps(&self, timestep: Timestep, batch: usize, sample: &Tensor) -> Result<Tensor> {
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
    fn time_embed(&self, sample: &Tensor, timestep: Timestep, cond: &UNetConditioning) -> Result<Tensor> {
        let batch = sample.dim(0)?;
        let t = self.timesteps(timestep, batch, sample)?;
        let t_emb = self.time_proj.forward(&t)?.to_dtype(sample.dtype())?;
        let mut emb = self.time_embedding.forward(&t_emb, cond.timestep_cond.as_ref())?;
        if let (Some(proj), Some(add)) = (&self.add_time_proj, &self.add_embedding) {
            let Some(added) = &cond.added_cond else {
                candle_core::bail!("this UNet (addition_embed_type `text_time`) needs `added_cond` (text_embeds and time_ids)")
            };
            let b = added.text_embeds.dim(0)?;
            let time_embeds = proj.forward(&added.time_ids.flatten_all()?)?.reshape((b, ()))?;
            let add_embeds =
                Tensor::cat(&[&added.text_embeds, &time_embeds.to_dtype(added.text_embeds.dtype())?], 1)?
                    .to_dtype(emb.dtype())?;
            emb = emb.broadcast_add(&add.forward(&add_embeds, None)?)?;
        }
        match &self.time_embed_act {
            Some(a) => a.forward(&emb),
            None => Ok(emb),
        }
    }

    /// Predict the noise (or v / x0, per the checkpoint) for `sample` `[b, in_channels, h, w]` at
    /// `timestep`, conditioned on `encoder_hidden_states` `[b, seq, cross_attention_dim]`.
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: impl Into<Timestep>,
        encoder_hidden_states: &Tensor,
        cond: &UNetConditioning,
    ) -> Result<Tensor> {
        let (_, _, h, w) = sample.dims4()?;
        // When the size is not a multiple of the total downsampling, each upsampler is given the
        // size of the skip connection it must match instead of doubling.
        let divisible = |d: usize| d.trailing_zeros() as usize >= self.num_upsamplers;
        let forward_upsample_size = !divisible(h) || !divisible(w);

        let sample = if self.config.center_input_sample { sample.affine(2.0, -1.0)? } else { sample.clone() };
        let emb = self.time_embed(&sample, timestep.into(), cond)?;
        let ehs = encoder_hidden_states;

        let mut x = self.conv_in.forward(&sample)?;

        let is_controlnet =
            cond.mid_block_additional_residual.is_some() && cond.down_block_additional_residuals.is_some();
        // diffusers still accepts T2I-Adapter residuals passed as `down_block_additional_residuals`
        // without a mid residual (deprecated) and treats them as intrablock residuals.
        let intrablock =
            match (&cond.down_intrablock_additional_residuals, &cond.mid_block_additional_residual) {
                (Some(r), _) => Some(r),
                (None, None) => cond.down_block_additional_residuals.as_ref(),
                (None, Some(_)) => None,
            };
        let mut intrablock = intrablock.map(|r| r.iter()).into_iter().flatten();

        let mut skips: Vec<Tensor> = vec![x.clone()];
        for block in &self.down_blocks {
            match block {
                DownBlock::CrossAttn(b) => {
                    let extra = intrablock.next();
                    let (y, states) = b.forward(&x, Some(&emb), ehs, extra)?;
                    x = y;
                    skips.extend(states);
                }
                DownBlock::Down(b) => {
                    let (y, mut states) = b.forward(&x, Some(&emb))?;
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

        if let (Some(extra), true) = (&cond.down_block_additional_residuals, is_controlnet) {
            if extra.len() != skips.len() {
                candle_core::bail!(
                    "down_block_additional_residuals has {} tensors, the UNet has {} skip connections",
                    extra.len(),
                    skips.len()
                )
            }
            for (s, e) in skips.iter_mut().zip(extra) {
                *s = (&*s + e)?;
            }
        }

        if let Some(mid) = &self.mid_block {
            x = match mid {
                MidBlock::CrossAttn(m) => m.forward(&x, Some(&emb), ehs)?,
                MidBlock::Plain(m) => m.forward(&x, Some(&emb))?,
            };
            let mut rest = intrablock.peekable();
            if let Some(extra) = rest.peek() {
                if extra.shape() == x.shape() {
                    x = (x + *extra)?;
                }
            }
        }
        if is_controlnet {
            if let Some(m) = &cond.mid_block_additional_residual {
                x = (x + m)?;
            }
        }

        let n_up = self.up_blocks.len();
        for (i, block) in self.up_blocks.iter().enumerate() {
            let k = block.num_resnets();
            if skips.len() < k {
                candle_core::bail!("up block {i} needs {k} skip connections, {} left", skips.len())
            }
            let block_skips = skips.split_off(skips.len() - k);
            let upsample_size = match (i + 1 < n_up && forward_upsample_size, skips.last()) {
                (true, Some(s)) => {
                    let (_, _, sh, sw) = s.dims4()?;
                    Some((sh, sw))
                }
                _ => None,
            };
            x = match block {
                UpBlock::Up(b) => b.forward(&x, &block_skips, Some(&emb), upsample_size)?,
                UpBlock::CrossAttn(b) => b.forward(&x, &block_skips, Some(&emb), ehs, upsample_size)?,
            };
        }

        let x = self.conv_act.forward(&self.conv_norm_out.forward(&x)?)?;
        self.conv_out.forward(&x)
    }

    /// The dtype the weights were loaded in.
    pub fn dtype(&self) -> DType {
        self.conv_in.weight.dtype()
    }
}
