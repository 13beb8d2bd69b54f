//! The conditional UNet of Stable Diffusion 1.x/2.x, SDXL, SSD-1B and their LCM-distilled
//! variants (diffusers `unets/unet_2d_condition.py`), built from its `config.json`.

pub mod conditioning;
pub mod config;
pub mod down_path;
pub mod motion;

pub use conditioning::{AddedCond, Timestep, UNetConditioning};
pub use config::{TransformerLayers, UNet2DConditionConfig};

use crate::config::PerBlock;
use crate::models::blocks::{CrossAttnParams, CrossAttnUpBlock2D, UpBlock2D};
use crate::nn::{Activation, Conv2d, GroupNorm};
use anyhow::bail;
use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;
use down_path::{layers_of, BlockHooks, BlockSettings, NoHooks, Place, UNetDownPath};
use motion::MotionModules;

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

#[derive(Clone, Debug)]
pub struct UNet2DConditionModel {
    pub config: UNet2DConditionConfig,
    /// Time embedding, `conv_in`, down blocks and mid block (shared with the ControlNet).
    pub down: UNetDownPath,
    pub up_blocks: Vec<UpBlock>,
    pub conv_norm_out: GroupNorm,
    pub conv_act: Activation,
    pub conv_out: Conv2d,
    /// AnimateDiff motion modules (`UNetMotionModel`), attached with [`Self::with_motion`].
    pub motion: Option<MotionModules>,
    num_upsamplers: usize,
}

impl UNet2DConditionModel {
    /// Build the model from `config`, taking the weights from `vb` by diffusers' names.
    pub fn new(vb: VarBuilder, config: &UNet2DConditionConfig) -> anyhow::Result<Self> {
        let c = config;
        if c.num_attention_heads.is_some() {
            // diffusers raises here too: the key's meaning is taken by `attention_head_dim`.
            bail!("unet config: `num_attention_heads` is not supported by UNet2DConditionModel; set `attention_head_dim` (it is the number of heads)")
        }
        let s = BlockSettings::from_config(c)?;
        let n = s.n;
        if c.up_block_types.len() != n {
            bail!("unet config: down_block_types has {n} entries but up_block_types has {}", c.up_block_types.len())
        }
        let reverse_transformer_layers: Vec<PerBlock<usize>> = match &c.reverse_transformer_layers_per_block {
            None => {
                if s.transformer_layers.iter().any(|t| matches!(t, PerBlock::Each(_))) {
                    bail!("unet config: per-attention transformer_layers_per_block lists need reverse_transformer_layers_per_block")
                }
                s.transformer_layers.iter().rev().cloned().collect()
            }
            Some(v) if v.len() == n => v.clone(),
            Some(v) => bail!(
                "unet config: reverse_transformer_layers_per_block has {} entries but up_block_types has {n}",
                v.len()
            ),
        };
        let down = UNetDownPath::new(&vb, c, &s)?;
        let (boc, rp, groups, act) = (&c.block_out_channels, &s.resnet, s.groups, s.act);
        let ch0 = boc[0];
        let rev_boc: Vec<usize> = boc.iter().rev().copied().collect();
        let rev = |v: &Vec<usize>| -> Vec<usize> { v.iter().rev().copied().collect() };
        let (rev_heads, rev_cross, rev_lpb) = (rev(&s.heads), rev(&s.cross_dims), rev(&s.layers_per_block));
        let rev_only_cross: Vec<bool> = s.only_cross.iter().rev().copied().collect();
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
                    vb,
                    input_channel,
                    prev_output_channel,
                    output_channel,
                    nl,
                    !is_final,
                    rp,
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
                        vb,
                        input_channel,
                        prev_output_channel,
                        output_channel,
                        nl,
                        !is_final,
                        rp,
                        &ap,
                    )?)
                }
                other => bail!(
                    "unet config: up block type `{other}` is not supported (supported: UpBlock2D, CrossAttnUpBlock2D)"
                ),
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
            down,
            up_blocks,
            conv_norm_out,
            conv_act: act,
            conv_out,
            motion: None,
            num_upsamplers,
        })
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
        let emb = self.down.time_embed(&sample, timestep.into(), cond)?;
        let ehs = encoder_hidden_states;

        let x = self.down.conv_in.forward(&sample)?;

        let is_controlnet =
            cond.mid_block_additional_residual.is_some() && cond.down_block_additional_residuals.is_some();
        // diffusers still accepts T2I-Adapter residuals passed as `down_block_additional_residuals`
        // without a mid residual (deprecated) and treats them as intrablock residuals.
        let intrablock = match (&cond.down_intrablock_additional_residuals, &cond.mid_block_additional_residual) {
            (Some(r), _) => Some(r),
            (None, None) => cond.down_block_additional_residuals.as_ref(),
            (None, Some(_)) => None,
        };
        let mut intrablock = intrablock.map(|r| r.iter()).into_iter().flatten();
        let motion_hooks;
        let hooks: &dyn BlockHooks = match (&self.motion, cond.num_frames) {
            (Some(m), Some(frames)) => {
                motion_hooks = m.hooks(frames);
                &motion_hooks
            }
            (Some(_), None) => {
                candle_core::bail!("this UNet has motion modules: give `num_frames` (frames folded into the batch)")
            }
            (None, _) => &NoHooks,
        };
        let (mut x, mut skips) = self.down.down(x, &emb, ehs, &mut intrablock, hooks)?;

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

        if self.down.mid_block.is_some() {
            x = self.down.mid(x, &emb, ehs, hooks)?;
            // A T2I-Adapter feature left over after the down blocks goes to the mid block output
            // when its shape fits.
            if let Some(extra) = intrablock.next() {
                if extra.shape() == x.shape() {
                    x = (x + extra)?;
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
            let hook = |j: usize, x: Tensor| hooks.after_layer(Place::Up(i), j, x);
            x = match block {
                UpBlock::Up(b) => b.forward(&x, &block_skips, Some(&emb), upsample_size, Some(&hook))?,
                UpBlock::CrossAttn(b) => b.forward(&x, &block_skips, Some(&emb), ehs, upsample_size, Some(&hook))?,
            };
        }

        let x = self.conv_norm_out.forward_act(&x, self.conv_act)?;
        self.conv_out.forward(&x)
    }

    /// `UNetMotionModel.forward`: `sample` `[b, c, frames, h, w]`, `encoder_hidden_states` one
    /// row per frame (`[b * frames, seq, d]`, as AnimateDiffPipeline repeats them); per-video
    /// conditioning (`timestep_cond`, `added_cond`) is repeated per frame. Returns `[b, c, frames, h, w]`.
    pub fn forward_frames(
        &self,
        sample: &Tensor,
        timestep: impl Into<Timestep>,
        encoder_hidden_states: &Tensor,
        cond: &UNetConditioning,
    ) -> Result<Tensor> {
        let (b, c, f, h, w) = sample.dims5()?;
        let folded = sample.permute((0, 2, 1, 3, 4))?.contiguous()?.reshape((b * f, c, h, w))?;
        let per_frame = |t: &Tensor| crate::ops::repeat_interleave(t, f);
        let cond = UNetConditioning {
            timestep_cond: cond.timestep_cond.as_ref().map(per_frame).transpose()?,
            added_cond: match &cond.added_cond {
                Some(a) => {
                    Some(AddedCond { text_embeds: per_frame(&a.text_embeds)?, time_ids: per_frame(&a.time_ids)? })
                }
                None => None,
            },
            num_frames: Some(f),
            ..cond.clone()
        };
        let timestep = match timestep.into() {
            Timestep::Tensor(t) if t.rank() == 1 && t.dim(0)? == b => Timestep::Tensor(per_frame(&t)?),
            t => t,
        };
        let out = self.forward(&folded, timestep, encoder_hidden_states, &cond)?;
        let oc = out.dim(1)?;
        out.reshape((b, f, oc, h, w))?.permute((0, 2, 1, 3, 4))?.contiguous()
    }

    /// Attach AnimateDiff motion modules, making this diffusers' `UNetMotionModel.from_unet2d`.
    pub fn with_motion(mut self, motion: MotionModules) -> Self {
        self.motion = Some(motion);
        self
    }

    /// The dtype the weights were loaded in.
    pub fn dtype(&self) -> DType {
        self.down.conv_in.weight.dtype()
    }
}
