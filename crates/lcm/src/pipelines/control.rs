//! Spatial control for the denoising loop: ControlNets (diffusers'
//! `StableDiffusion[XL]ControlNet[Img2Img]Pipeline`, several at once as `MultiControlNetModel`)
//! and T2I-Adapters (`StableDiffusion[XL]AdapterPipeline`, several as `MultiAdapter`).
//! The models belong to the pipeline; the images and scales to each request.

use crate::config::{check_class_name, read_config};
use crate::image_processor::{preprocess_control_image, Image8};
use crate::loaders::model_index::resolve_component;
use crate::loaders::weights::{self, Precision};
use crate::models::controlnet::{ControlNetCond, ControlNetConfig, ControlNetModel, ControlNetOutput};
use crate::models::t2i_adapter::T2IAdapter;
use crate::models::unet::{AddedCond, UNet2DConditionConfig, UNet2DConditionModel, UNetConditioning};
use crate::ops::tile_batch;
use crate::pipelines::components::display_name;
use crate::pipelines::GenerationPlan;
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

/// One T2I-Adapter's conditioning: `image` and `adapter_conditioning_scale`.
#[derive(Clone, Debug)]
pub struct AdapterInput {
    pub image: Image8,
    pub conditioning_scale: f64,
}

impl AdapterInput {
    pub fn new(image: Image8) -> Self {
        Self { image, conditioning_scale: 1.0 }
    }
}

/// A model loaded from `source`, with the name it is shown under.
#[derive(Clone, Debug)]
pub struct Named<T> {
    pub name: String,
    pub model: T,
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

/// `T2IAdapter.from_pretrained(source)`.
pub fn load_t2i_adapter(source: &str, variant: Option<&str>, device: &Device) -> Result<Named<T2IAdapter>> {
    load_t2i_adapter_with(source, variant, DType::F32, device)
}

/// [`load_t2i_adapter`] with the weights in `precision` (see [`Precision`]).
pub fn load_t2i_adapter_with(
    source: &str,
    variant: Option<&str>,
    precision: impl Into<Precision>,
    device: &Device,
) -> Result<Named<T2IAdapter>> {
    let dir = resolve_component(source, "adapter", variant)?;
    let model = T2IAdapter::load_with(&dir, variant, precision, device)?;
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

/// What the loop needs from the control models for one generation, prepared once.
pub(crate) struct ControlState<'a> {
    controlnets: Vec<PreparedControlNet<'a>>,
    /// Weighted sum of the adapters' features, batch-expanded like the latents.
    adapter_residuals: Option<Vec<Tensor>>,
    /// Steps (from the first) that get the adapter residuals: `adapter_conditioning_factor`.
    adapter_steps: usize,
    guess_mode: bool,
    num_steps: usize,
    /// Classifier-free guidance: the UNet's batch is doubled.
    cfg: bool,
}

struct PreparedControlNet<'a> {
    model: &'a ControlNetModel,
    image: Tensor,
    input: &'a ControlNetInput,
}

/// Settings of a request that the control models read.
pub(crate) struct ControlRequest<'a> {
    pub controlnet: &'a [ControlNetInput],
    pub adapter: &'a [AdapterInput],
    pub adapter_conditioning_factor: f64,
    pub guess_mode: bool,
}

/// diffusers' `controlnet_keep[i]`: whether step `i` of `total` lies in `[start, end]`.
pub fn controlnet_keep(i: usize, total: usize, start: f64, end: f64) -> bool {
    let (i, total) = (i as f64, total as f64);
    !(i / total < start || (i + 1.0) / total > end)
}

impl<'a> ControlState<'a> {
    pub fn prepare(
        controlnets: &'a [Named<ControlNetModel>],
        adapters: &'a [Named<T2IAdapter>],
        unet: &UNet2DConditionModel,
        req: &ControlRequest<'a>,
        plan: &GenerationPlan,
    ) -> Result<Self> {
        let (width, height, device) = (plan.width, plan.height, &plan.device);
        let (n, cfg, num_steps) = (plan.batch, plan.do_classifier_free_guidance, plan.timesteps.len());
        let guess_mode = req.guess_mode || controlnets.iter().any(|c| c.model.config.global_pool_conditions);
        let batch_copies = if cfg && !guess_mode { 2 * n } else { n };
        let mut prepared = Vec::new();
        for (cn, input) in controlnets.iter().zip(req.controlnet) {
            let ch = cn.model.config.conditioning_channels;
            let image = preprocess_control_image(&input.image, width, height, ch, device)?;
            prepared.push(PreparedControlNet { model: &cn.model, image: tile_batch(&image, batch_copies)?, input });
        }

        let mut adapter_residuals: Option<Vec<Tensor>> = None;
        let (lh, lw) = plan.latent_size();
        let expected = unet.down.intrablock_shapes(lh, lw);
        for (ad, input) in adapters.iter().zip(req.adapter) {
            let image = preprocess_control_image(&input.image, width, height, ad.model.config.in_channels, device)?;
            let features = ad.model.forward(&image).with_context(|| format!("T2I-Adapter {}", ad.name))?;
            for (i, f) in features.iter().enumerate().take(expected.len()) {
                if f.dims()[1..] != expected[i] {
                    bail!(
                        "T2I-Adapter {} was built for another base model: its feature {i} is {:?}, this UNet's down block {i} needs {:?}",
                        ad.name,
                        &f.dims()[1..],
                        expected[i]
                    )
                }
            }
            let scaled =
                features.iter().map(|f| f * input.conditioning_scale).collect::<candle_core::Result<Vec<_>>>()?;
            adapter_residuals = Some(match adapter_residuals {
                None => scaled,
                Some(acc) => {
                    if acc.len() != scaled.len() {
                        bail!(
                            "the T2I-Adapters give different numbers of features ({} and {}) and cannot be combined",
                            acc.len(),
                            scaled.len()
                        )
                    }
                    acc.iter().zip(&scaled).map(|(a, b)| a + b).collect::<candle_core::Result<Vec<_>>>()?
                }
            });
        }
        let adapter_residuals = match adapter_residuals {
            Some(r) => Some(
                r.iter()
                    .map(|f| tile_batch(f, if cfg { 2 * n } else { n }))
                    .collect::<candle_core::Result<Vec<_>>>()?,
            ),
            None => None,
        };
        let f = req.adapter_conditioning_factor;
        let adapter_steps = (num_steps as f64 * f) as usize;
        Ok(Self { controlnets: prepared, adapter_residuals, adapter_steps, guess_mode, num_steps, cfg })
    }

    /// The UNet conditioning for step `i`: `base` plus the control residuals. `model_in` is the
    /// UNet's latent input (doubled under CFG), `latents` the undoubled ones, `prompt_embeds` the
    /// UNet's text states.
    pub fn conditioning(
        &self,
        i: usize,
        t: f64,
        model_in: &Tensor,
        latents: &Tensor,
        prompt_embeds: &Tensor,
        base: &UNetConditioning,
    ) -> Result<UNetConditioning> {
        let (total, cfg) = (self.num_steps, self.cfg);
        let mut cond = base.clone();
        // Guess mode under CFG: the ControlNets see only the conditional half; the unconditional
        // half gets zero residuals.
        let half = cfg && self.guess_mode;
        let (cn_in, cn_text, cn_added) = if half {
            let n = latents.dim(0)?;
            let added = base.added_cond.as_ref().map(|a| -> candle_core::Result<AddedCond> {
                Ok(AddedCond { text_embeds: a.text_embeds.narrow(0, n, n)?, time_ids: a.time_ids.narrow(0, n, n)? })
            });
            (latents.clone(), prompt_embeds.narrow(0, n, n)?, added.transpose()?)
        } else {
            (model_in.clone(), prompt_embeds.clone(), base.added_cond.clone())
        };
        let cn_cond = UNetConditioning { added_cond: cn_added, ..Default::default() };
        let mut total_out: Option<ControlNetOutput> = None;
        for cn in &self.controlnets {
            let keep = controlnet_keep(i, total, cn.input.guidance_start, cn.input.guidance_end);
            let scale = cn.input.conditioning_scale * if keep { 1.0 } else { 0.0 };
            if scale == 0.0 {
                continue; // zero residuals change nothing
            }
            let control = ControlNetCond { image: &cn.image, conditioning_scale: scale, guess_mode: self.guess_mode };
            let out = cn.model.forward(&cn_in, t, &cn_text, control, &cn_cond)?;
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
            out.apply_to(&mut cond);
        }
        if let Some(r) = self.adapter_residuals.as_ref().filter(|_| i < self.adapter_steps) {
            cond.down_intrablock_additional_residuals = Some(r.clone());
        }
        Ok(cond)
    }
}
