//! diffusers' `UNet2DConditionModel` config (`config.json`), shared by the UNet, the ControlNet
//! (its down half) and the motion modules.

use crate::config::{read_config, PerBlock};
use serde::{Deserialize, Deserializer};
use std::path::Path;

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
/// [`UNet2DConditionModel::new`](super::UNet2DConditionModel::new), never silently ignored.
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
    #[serde(default, deserialize_with = "crate::config::null_false")]
    pub center_input_sample: bool,
    #[serde(default = "d_true", deserialize_with = "crate::config::null_false")]
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
    #[serde(default, deserialize_with = "crate::config::null_false")]
    pub dual_cross_attention: bool,
    #[serde(default, deserialize_with = "crate::config::null_false")]
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
    #[serde(default, deserialize_with = "crate::config::null_false")]
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
    ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"].map(String::from).to_vec()
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
