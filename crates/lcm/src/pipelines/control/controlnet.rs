//! ControlNets as a control source: diffusers' `StableDiffusion[XL]ControlNet[Img2Img]Pipeline`,
//! several at once as `MultiControlNetModel` (residuals summed).

use super::{ControlSource, ControlStep, Named, PreparedControl, NO_INPAINTING};
use crate::config::{check_class_name, read_config};
use crate::error::{invalid, Error};
use crate::image_processor::{preprocess_control_image, Image8};
use crate::loaders::model_index::resolve_component;
use crate::loaders::weights::{self, Precision};
use crate::models::controlnet::{ControlNetCond, ControlNetConfig, ControlNetModel, ControlNetOutput};
use crate::models::unet::{AddedCond, UNet2DConditionConfig, UNet2DConditionModel, UNetConditioning};
use crate::ops::tile_batch;
use crate::pipelines::components::display_name;
use crate::pipelines::{GenerateRequest, GenerationPlan, Task};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

/// One ControlNet's conditioning for a generation: `image`, `controlnet_conditioning_scale`,
/// `control_guidance_start` / `control_guidance_end` (fractions of the steps it is active in).
#[derive(Clone, Debug)]
pub struct ControlNetInput {
    pub image: Image8,
    pub conditioning_scale: f64,
    pub guidance_start: f64,
    pub guidance_end: f64,
}

impl ControlNetInput {
    /// diffusers' defaults: scale 1.0, active over all steps.
    pub fn new(image: Image8) -> Self {
        Self { image, conditioning_scale: 1.0, guidance_start: 0.0, guidance_end: 1.0 }
    }
}

/// `ControlNetModel.from_pretrained(source)`: a local folder (or a pipeline folder with a
/// `controlnet/` subfolder) or a hub repo id.
pub fn load_controlnet(source: &str, variant: Option<&str>, device: &Device) -> Result<Named<ControlNetModel>> {
    load_controlnet_with(source, variant, DType::F32, device)
}

/// [`load_controlnet`] with the weights in `precision` (see [`Precision`]).
pub fn load_controlnet_with(
    source: &str,
    variant: Option<&str>,
    precision: impl Into<Precision>,
    device: &Device,
) -> Result<Named<ControlNetModel>> {
    let dir = resolve_component(source, "controlnet", variant)?;
    check_class_name(&dir, "ControlNetModel")?;
    let config: ControlNetConfig = read_config(&dir.join("config.json"))?;
    let vb = weights::load_component(&dir, variant, precision, device)?;
    let model = ControlNetModel::new(vb, &config).with_context(|| format!("controlnet {}", dir.display()))?;
    Ok(Named { name: display_name(source), model })
}

/// A ControlNet is a copy of one base model's down path: refuse one made for another base
/// (SD1.5 vs SD2 vs SDXL), whose residuals cannot be added to this UNet's.
pub fn check_controlnet_fits(name: &str, cn: &ControlNetModel, unet: &UNet2DConditionConfig) -> Result<()> {
    let c = &cn.config.unet;
    let n = unet.down_block_types.len();
    let cross = |c: &UNet2DConditionConfig| c.cross_attention_dim.expand(n, "cross_attention_dim").ok();
    let layers = |c: &UNet2DConditionConfig| c.layers_per_block.expand(n, "layers_per_block").ok();
    // Name only what differs: the message stays one short line.
    let mut differs = Vec::new();
    if c.block_out_channels != unet.block_out_channels || c.down_block_types.len() != n {
        differs.push(format!("block_out_channels {:?} vs {:?}", c.block_out_channels, unet.block_out_channels));
    }
    if cross(c) != cross(unet) {
        differs.push(format!("cross_attention_dim {} vs {}", c.cross_attention_dim, unet.cross_attention_dim));
    }
    if layers(c) != layers(unet) {
        differs.push(format!("layers_per_block {} vs {}", c.layers_per_block, unet.layers_per_block));
    }
    if c.addition_embed_type != unet.addition_embed_type {
        let kind = |c: &UNet2DConditionConfig| c.addition_embed_type.clone().unwrap_or_else(|| "none".into());
        differs.push(format!("addition_embed_type {} vs {}", kind(c), kind(unet)));
    }
    if !differs.is_empty() {
        bail!("ControlNet {name} was built for another base model than this UNet ({})", differs.join(", "))
    }
    Ok(())
}

/// diffusers' `controlnet_keep[i]`: whether step `i` of `total` lies in `[start, end]`.
pub fn controlnet_keep(i: usize, total: usize, start: f64, end: f64) -> bool {
    let (i, total) = (i as f64, total as f64);
    !(i / total < start || (i + 1.0) / total > end)
}

/// The pipeline's ControlNets, run in this order with their residuals summed
/// (`MultiControlNetModel`); each takes the request's `controlnet` input of the same index.
/// Dereferences to the models.
#[derive(Clone, Debug, Default)]
pub struct ControlNets(Vec<Named<ControlNetModel>>);

impl ControlNets {
    /// Adds a ControlNet made for `unet` (see [`check_controlnet_fits`]).
    pub(crate) fn add(&mut self, controlnet: Named<ControlNetModel>, unet: &UNet2DConditionConfig) -> Result<()> {
        check_controlnet_fits(&controlnet.name, &controlnet.model, unet)?;
        self.0.push(controlnet);
        Ok(())
    }
}

impl std::ops::Deref for ControlNets {
    type Target = [Named<ControlNetModel>];

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl ControlSource for ControlNets {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn check_request(req: &GenerateRequest) -> Result<(), Error> {
        for c in &req.controlnet {
            if !(c.conditioning_scale.is_finite() && c.guidance_start.is_finite() && c.guidance_end.is_finite()) {
                invalid!("ControlNet scale and guidance start/end must be finite numbers");
            }
            if !(0.0 <= c.guidance_start && c.guidance_start < c.guidance_end && c.guidance_end <= 1.0) {
                invalid!(
                    "control guidance start ({}) must be smaller than end ({}), both in [0, 1]",
                    c.guidance_start,
                    c.guidance_end
                );
            }
        }
        Ok(())
    }

    fn check_inputs(&self, req: &GenerateRequest) -> Result<(), Error> {
        if req.controlnet.len() != self.0.len() {
            invalid!(
                "{} ControlNet(s) but {} control image(s); give one image per ControlNet",
                self.0.len(),
                req.controlnet.len()
            );
        }
        Ok(())
    }

    fn check_task(&self, task: Task) -> Result<(), Error> {
        match task {
            Task::Inpainting if !self.0.is_empty() => invalid!("{NO_INPAINTING}"),
            _ => Ok(()),
        }
    }

    /// The first control image, rounded down to the VAE factor.
    fn size_image<'r>(&self, req: &'r GenerateRequest, vae_scale_factor: usize) -> Option<(&'r Image8, usize)> {
        req.controlnet.first().filter(|_| !self.0.is_empty()).map(|c| (&c.image, vae_scale_factor))
    }

    fn prepare<'a>(
        &'a self,
        req: &'a GenerateRequest,
        _unet: &UNet2DConditionModel,
        plan: &GenerationPlan,
    ) -> Result<Option<Box<dyn PreparedControl + 'a>>> {
        if self.0.is_empty() {
            return Ok(None);
        }
        let (width, height, device) = (plan.width, plan.height, &plan.device);
        let (n, cfg) = (plan.batch, plan.do_classifier_free_guidance);
        let guess_mode = req.guess_mode || self.0.iter().any(|c| c.model.config.global_pool_conditions);
        let batch_copies = if cfg && !guess_mode { 2 * n } else { n };
        let mut controlnets = Vec::new();
        for (cn, input) in self.0.iter().zip(&req.controlnet) {
            let ch = cn.model.config.conditioning_channels;
            let image = preprocess_control_image(&input.image, width, height, ch, device)?;
            controlnets.push(PreparedControlNet { model: &cn.model, image: tile_batch(&image, batch_copies)?, input });
        }
        Ok(Some(Box::new(PreparedControlNets { controlnets, guess_mode, num_steps: plan.timesteps.len(), cfg })))
    }

    fn describe(&self, req: &GenerateRequest, text: &mut String) {
        for (cn, input) in self.0.iter().zip(&req.controlnet) {
            text.push_str(&format!(
                ", ControlNet: {} (scale {}, start {}, end {})",
                cn.name, input.conditioning_scale, input.guidance_start, input.guidance_end
            ));
        }
    }
}

struct PreparedControlNet<'a> {
    model: &'a ControlNetModel,
    /// The control image, batch-expanded like the ControlNets' input.
    image: Tensor,
    input: &'a ControlNetInput,
}

struct PreparedControlNets<'a> {
    controlnets: Vec<PreparedControlNet<'a>>,
    guess_mode: bool,
    num_steps: usize,
    /// Classifier-free guidance: the UNet's batch is doubled.
    cfg: bool,
}

impl PreparedControl for PreparedControlNets<'_> {
    /// `down_block_additional_residuals` and `mid_block_additional_residual`.
    fn apply(&self, step: &ControlStep, cond: &mut UNetConditioning) -> Result<()> {
        let base = step.base;
        // Guess mode under CFG: the ControlNets see only the conditional half; the unconditional
        // half gets zero residuals.
        let half = self.cfg && self.guess_mode;
        let (cn_in, cn_text, cn_added) = if half {
            let n = step.latents.dim(0)?;
            let added = base.added_cond.as_ref().map(|a| -> candle_core::Result<AddedCond> {
                Ok(AddedCond { text_embeds: a.text_embeds.narrow(0, n, n)?, time_ids: a.time_ids.narrow(0, n, n)? })
            });
            (step.latents.clone(), step.prompt_embeds.narrow(0, n, n)?, added.transpose()?)
        } else {
            (step.model_in.clone(), step.prompt_embeds.clone(), base.added_cond.clone())
        };
        let cn_cond = UNetConditioning { added_cond: cn_added, ..Default::default() };
        let mut total_out: Option<ControlNetOutput> = None;
        for cn in &self.controlnets {
            let keep = controlnet_keep(step.index, self.num_steps, cn.input.guidance_start, cn.input.guidance_end);
            let scale = cn.input.conditioning_scale * if keep { 1.0 } else { 0.0 };
            if scale == 0.0 {
                continue; // zero residuals change nothing
            }
            let control = ControlNetCond { image: &cn.image, conditioning_scale: scale, guess_mode: self.guess_mode };
            let out = cn.model.forward(&cn_in, step.timestep, &cn_text, control, &cn_cond)?;
            total_out = Some(match total_out {
                None => out,
                Some(acc) => acc.sum_with(&out)?,
            });
        }
        if let Some(mut out) = total_out {
            if half {
                let zeros_first = |x: &Tensor| Tensor::cat(&[&x.zeros_like()?, x], 0);
                out.down_block_res_samples =
                    out.down_block_res_samples.iter().map(zeros_first).collect::<candle_core::Result<Vec<_>>>()?;
                out.mid_block_res_sample = zeros_first(&out.mid_block_res_sample)?;
            }
            out.apply_to(cond);
        }
        Ok(())
    }
}
