//! What a UNet call is conditioned on besides the sample and the text states: the timestep and
//! diffusers' optional `forward` arguments.

use candle_core::Tensor;

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
    /// AnimateDiff: the batch holds `num_frames` consecutive frames per video (needed when
    /// motion modules are attached).
    pub num_frames: Option<usize>,
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
