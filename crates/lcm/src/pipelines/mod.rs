//! Generation pipelines: one denoising loop ([`LcmPipeline::generate`]) for every diffusers
//! pipeline LCM is used with ([`PipelineKind`]): `LatentConsistencyModelPipeline` (LCM-distilled
//! UNets, guidance through the UNet's guidance embedding), and the Stable Diffusion, SDXL and
//! AnimateDiff pipelines with `LCMScheduler` (classifier-free guidance when `guidance_scale > 1`),
//! each for text-to-image, image-to-image and inpainting, with ControlNets and T2I-Adapters.
//!
//! A call goes: [`GenerateRequest`] -> [`LcmPipeline::plan`] (every default and check, once) ->
//! the numbered steps of [`LcmPipeline::generate_with_callback`], as in diffusers' `__call__`.
pub mod components;
pub mod conditioning;
pub mod control;
pub mod kind;
pub mod lora_set;
pub mod plan;
pub mod request;
pub mod start_latents;

pub use crate::loaders::weights::WeightDType;
pub use components::{LoadOptions, StableDiffusionComponents};
pub use control::{AdapterInput, ControlNetInput, ControlNets, Named, T2IAdapters};
pub use kind::PipelineKind;
pub use lora_set::{LoraReport, LoraSpec};
pub use plan::GenerationPlan;
pub use request::{GenerateRequest, Step, Task};

use crate::image_io::{postprocess, RgbImage};
use crate::models::controlnet::ControlNetModel;
use crate::models::t2i_adapter::T2IAdapter;
use crate::models::unet::UNetConditioning;
use crate::models::vae::Autoencoder;
use crate::random::TorchGenerator;
use anyhow::Result;
use candle_core::Tensor;
use control::{ControlSource, ControlState, ControlStep};
use start_latents::InpaintState;

/// A loaded model ready to generate.
pub struct LcmPipeline {
    pub components: StableDiffusionComponents,
    /// ControlNets, run in this order (`MultiControlNetModel`).
    pub controlnets: ControlNets,
    /// T2I-Adapters (`MultiAdapter`).
    pub t2i_adapters: T2IAdapters,
    /// Whether the pipeline was asked for (`LoadOptions::pipeline`), so that adding a ControlNet
    /// to an LCM model asked to run as `LatentConsistencyModelPipeline` is an error.
    pipeline_forced: bool,
}

impl LcmPipeline {
    /// Load a diffusers folder or hub repo id; the pipeline kind follows its `model_index.json`.
    ///
    /// ```no_run
    /// use lcm::pipelines::{GenerateRequest, LcmPipeline, LoadOptions};
    /// let pipe = LcmPipeline::load("SimianLuo/LCM_Dreamshaper_v7", &LoadOptions::default())?;
    /// let request = GenerateRequest { prompt: "a red fox in snow".into(), seed: 0, ..Default::default() };
    /// let images = pipe.generate(&request, |_step, _total| {})?;
    /// lcm::image_io::write_png("fox.png".as_ref(), &images[0], None, false)?;
    /// # anyhow::Ok(())
    /// ```
    pub fn load(model: &str, opts: &LoadOptions) -> Result<Self> {
        let components = StableDiffusionComponents::load(model, opts)?;
        let pipeline_forced = components.kind_requested;
        Ok(Self {
            components,
            controlnets: ControlNets::default(),
            t2i_adapters: T2IAdapters::default(),
            pipeline_forced,
        })
    }

    /// The diffusers pipeline whose semantics apply: the model's, except that an LCM model with
    /// control models follows `StableDiffusion(ControlNet|Adapter)Pipeline`, as diffusers' LCM
    /// guide does (diffusers has no LCM-specific ControlNet pipeline).
    pub fn kind(&self) -> PipelineKind {
        let kind = self.components.kind;
        if kind == PipelineKind::LatentConsistencyModel && self.has_control() && !self.pipeline_forced {
            PipelineKind::StableDiffusion
        } else {
            kind
        }
    }

    /// Add a ControlNet (`controlnet=` / a list of them).
    pub fn add_controlnet(&mut self, controlnet: Named<ControlNetModel>) -> Result<()> {
        self.controlnets.add(controlnet, &self.components.unet_config)
    }

    /// Load and add a ControlNet from a folder or hub repo id.
    pub fn load_controlnet(&mut self, source: &str, variant: Option<&str>) -> Result<()> {
        let cn = control::load_controlnet_with(source, variant, self.components.precision(), self.components.device())?;
        self.add_controlnet(cn)
    }

    /// Add a T2I-Adapter (`adapter=`; several act as `MultiAdapter`). Its fit to the UNet is
    /// checked when generating, where the feature sizes are known.
    pub fn add_t2i_adapter(&mut self, adapter: Named<T2IAdapter>) {
        self.t2i_adapters.add(adapter);
    }

    /// Load and add a T2I-Adapter from a folder or hub repo id.
    pub fn load_t2i_adapter(&mut self, source: &str, variant: Option<&str>) -> Result<()> {
        let ad =
            control::load_t2i_adapter_with(source, variant, self.components.precision(), self.components.device())?;
        self.add_t2i_adapter(ad);
        Ok(())
    }

    /// The precision the weights are kept in.
    pub fn weight_dtype(&self) -> WeightDType {
        self.components.weight_dtype
    }

    /// Every control source, in the order they are checked, prepared and described.
    fn control_sources(&self) -> [&dyn ControlSource; 2] {
        [&self.controlnets, &self.t2i_adapters]
    }

    fn has_control(&self) -> bool {
        self.control_sources().iter().any(|s| !s.is_empty())
    }

    /// Load LoRAs (`load_lora_weights`); each is active at its spec's weight.
    pub fn load_loras(&mut self, specs: &[LoraSpec]) -> Result<Vec<LoraReport>> {
        self.components.load_loras(specs)
    }

    /// `set_adapters(names, adapter_weights)`: change LoRA weights without reloading the base.
    pub fn set_adapters(&mut self, names_and_weights: &[(&str, f64)]) -> Result<()> {
        self.components.set_adapters(names_and_weights)
    }

    /// `delete_adapters(name)`.
    pub fn delete_adapter(&mut self, name: &str) -> Result<()> {
        self.components.delete_adapter(name)
    }

    pub fn vae_scale_factor(&self) -> usize {
        self.components.vae.vae_scale_factor()
    }

    /// Default output size: the UNet's `sample_size` times the VAE scale factor.
    pub fn default_size(&self) -> (usize, usize) {
        let s = self.components.unet_config.sample_size * self.vae_scale_factor();
        (s, s)
    }

    /// AnimateDiff: `num_images_per_prompt` videos of `num_frames` frames each.
    pub fn animate(&self, req: &GenerateRequest, mut on_step: impl FnMut(usize, usize)) -> Result<Vec<Vec<RgbImage>>> {
        let plan = self.plan(req)?;
        let frames = plan.num_frames.unwrap_or(1);
        let images = self.run(&plan, req, |step| {
            on_step(step.index + 1, step.total);
            Ok(())
        })?;
        Ok(images.chunks(frames).map(|c| c.to_vec()).collect())
    }

    /// Generate `num_images_per_prompt` images (AnimateDiff: that many videos, their frames in
    /// order, video after video); `on_step(done, total)` is called after each denoising step.
    pub fn generate(&self, req: &GenerateRequest, mut on_step: impl FnMut(usize, usize)) -> Result<Vec<RgbImage>> {
        self.generate_with_callback(req, |step| {
            on_step(step.index + 1, step.total);
            Ok(())
        })
    }

    /// [`generate`](Self::generate) with diffusers' `callback_on_step_end`: `on_step` sees each
    /// step's latents and predicted clean latents (`denoised`), e.g. to write previews with
    /// [`decode_latents`](Self::decode_latents) through a tiny autoencoder; an error stops the
    /// generation.
    pub fn generate_with_callback(
        &self,
        req: &GenerateRequest,
        on_step: impl FnMut(&Step) -> Result<()>,
    ) -> Result<Vec<RgbImage>> {
        let plan = self.plan(req)?;
        self.run(&plan, req, on_step)
    }

    /// Run a planned request: diffusers' `__call__` from step 3 on.
    pub fn run(
        &self,
        plan: &GenerationPlan,
        req: &GenerateRequest,
        mut on_step: impl FnMut(&Step) -> Result<()>,
    ) -> Result<Vec<RgbImage>> {
        let c = &self.components;
        let (device, dtype) = (&plan.device, plan.dtype);
        let (n, cfg, frames) = (plan.batch, plan.do_classifier_free_guidance, plan.num_frames);
        let mut scheduler = plan.scheduler.clone();
        let timesteps = &plan.timesteps;

        // 3. Encode the prompt (and the negative one under CFG); SDXL's pooled embeddings and
        // time ids.
        let size = (plan.height, plan.width);
        let text = conditioning::encode_text(c, &req.prompt, req.negative_prompt.as_deref(), cfg, n, size, device)?;
        let prompt_embeds = match frames {
            // AnimateDiffPipeline: `prompt_embeds.repeat_interleave(num_frames, dim=0)`.
            Some(f) => crate::ops::repeat_interleave(&text.prompt_embeds, f)?,
            None => text.prompt_embeds,
        };
        let mut unet_cond = UNetConditioning { added_cond: text.added_cond, num_frames: frames, ..Default::default() };
        // 4. LCM's guidance embedding: `get_guidance_scale_embedding(w).to(dtype=latents.dtype)`.
        if let Some(dim) = plan.guidance_embedding {
            let w = vec![(plan.guidance_scale - 1.0) as f32; n];
            unet_cond.timestep_cond = Some(conditioning::guidance_scale_embedding(&w, dim, device)?.to_dtype(dtype)?);
        }

        // 5. Start latents. diffusers draws every random tensor on the CPU generator in the
        // model's dtype.
        let mut generator = TorchGenerator::manual_seed(req.seed);
        if let Some(mode) = req.half_randn {
            generator = generator.with_half_randn(mode);
        }
        let latent_channels = c.vae.latent_channels();
        let (lh, lw) = plan.latent_size();
        let mut inpaint = None;
        let mut latents = match (&req.image, &req.mask_image) {
            (None, _) => {
                // Video latents are drawn as [b, c, frames, h, w] (diffusers' order) and stay so;
                // the UNet sees them with the frames folded into the batch.
                let shape: Vec<usize> = [n, latent_channels].into_iter().chain(frames).chain([lh, lw]).collect();
                (generator.randn_on(shape, dtype, device)? * scheduler.init_noise_sigma())?
            }
            (Some(image), None) => start_latents::image_to_image(&c.vae, plan, image, &mut generator)?,
            (Some(image), Some(mask)) => {
                let (latents, state) =
                    start_latents::inpaint(&c.vae, plan, image, mask, c.unet_config.in_channels, &mut generator)?;
                inpaint = Some(state);
                latents
            }
        };
        // 9-channel inpainting UNets also see the mask and the masked image's latents.
        let extra_channels = match &inpaint {
            Some(s) if c.unet_config.in_channels != latent_channels => {
                let x = Tensor::cat(&[&s.mask, &s.masked_image_latents], 1)?;
                Some(if cfg { Tensor::cat(&[&x, &x], 0)? } else { x })
            }
            _ => None,
        };

        // 6. Control images (ControlNets) and features (T2I-Adapters).
        let control = ControlState::prepare(&self.control_sources(), req, &c.unet, plan)?;

        // 7. Denoising loop.
        let mut denoised = latents.clone();
        for (i, &t) in timesteps.iter().enumerate() {
            let mut model_in = if cfg { Tensor::cat(&[&latents, &latents], 0)? } else { latents.clone() };
            let cond = control.conditioning(&ControlStep {
                index: i,
                timestep: t as f64,
                model_in: &model_in,
                latents: &latents,
                prompt_embeds: &prompt_embeds,
                base: &unet_cond,
            })?;
            if let Some(x) = &extra_channels {
                model_in = Tensor::cat(&[&model_in, x], 1)?;
            }
            let pred = match frames {
                Some(_) => c.unet.forward_frames(&model_in, t as f64, &prompt_embeds, &cond)?,
                None => c.unet.forward(&model_in, t as f64, &prompt_embeds, &cond)?,
            };
            let pred = if cfg {
                let (uncond, text) = (pred.narrow(0, 0, n)?, pred.narrow(0, n, n)?);
                (&uncond + ((&text - &uncond)? * plan.guidance_scale)?)?
            } else {
                pred
            };
            (latents, denoised) = scheduler.step(&pred, t, &latents, &mut generator)?;
            // 4-channel inpainting: keep the unmasked area from the (re-noised) original.
            if let Some(InpaintState { mask, image_latents: Some(orig), noise, .. }) = &inpaint {
                let proper = match timesteps.get(i + 1) {
                    Some(&next) => scheduler.add_noise(orig, noise, next)?,
                    None => orig.clone(),
                };
                latents = ((mask.ones_like()? - mask)?.broadcast_mul(&proper)? + mask.broadcast_mul(&latents)?)?;
            }
            on_step(&Step {
                index: i,
                total: timesteps.len(),
                timestep: t,
                latents: &latents,
                denoised: &denoised,
                num_frames: frames,
            })?;
        }

        // 8. Decode. LatentConsistencyModel pipelines decode `denoised`; the Stable Diffusion ones
        // decode the (possibly blended) `prev_sample`, which is `denoised` after the last LCM step.
        let final_latents = if plan.lcm_semantics { &denoised } else { &latents };
        self.decode_latents(&c.vae, final_latents, frames)
    }

    /// Scaled latents (`[n, c, h, w]`, or `[n, c, frames, h, w]` with `num_frames`) -> images
    /// through `vae`: the pipeline's own autoencoder for results, a tiny one for previews.
    pub fn decode_latents(
        &self,
        vae: &Autoencoder,
        latents: &Tensor,
        num_frames: Option<usize>,
    ) -> Result<Vec<RgbImage>> {
        let scale = Tensor::new(vae.scaling_factor() as f32, latents.device())?.to_dtype(latents.dtype())?;
        let z = latents.broadcast_div(&scale)?;
        let z = match vae.shift_factor() {
            Some(s) => (z + s)?,
            None => z,
        };
        match num_frames {
            // Frame by frame, so memory does not grow with the clip length.
            Some(nf) => {
                let n = z.dim(0)?;
                let mut out = Vec::with_capacity(n * nf);
                for v in 0..n {
                    for k in 0..nf {
                        let frame = z.narrow(0, v, 1)?.narrow(2, k, 1)?.squeeze(2)?;
                        out.extend(postprocess(&vae.decode(&frame)?)?);
                    }
                }
                Ok(out)
            }
            None => postprocess(&vae.decode(&z)?),
        }
    }

    /// The AUTOMATIC1111-style `parameters` text for image `index` of a planned request.
    pub fn parameters_text(&self, plan: &GenerationPlan, req: &GenerateRequest, index: usize) -> String {
        let mut s = req.prompt.clone();
        if let Some(neg) = req.negative_prompt.as_deref().filter(|n| !n.is_empty()) {
            s.push_str(&format!("\nNegative prompt: {neg}"));
        }
        s.push_str(&format!(
            "\nSteps: {}, Sampler: LCM, CFG scale: {}, Seed: {}, Size: {}x{}, Model: {}",
            req.timesteps.as_ref().map_or(req.num_inference_steps, |t| t.len()),
            plan.guidance_scale,
            req.seed,
            plan.width,
            plan.height,
            self.components.name,
        ));
        if plan.task != Task::TextToImage {
            s.push_str(&format!(", Denoising strength: {}", plan.strength));
        }
        if plan.batch > 1 {
            s.push_str(&format!(", Batch size: {}, Batch pos: {}", plan.batch, index));
        }
        if let Some(o) = req.original_inference_steps {
            s.push_str(&format!(", Original inference steps: {o}"));
        }
        for source in self.control_sources() {
            source.describe(req, &mut s);
        }
        s.push_str(&format!(", Pipeline: {}", plan.kind.diffusers_name()));
        s
    }
}
