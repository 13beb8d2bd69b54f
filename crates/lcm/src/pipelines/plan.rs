//! A request resolved once against a loaded pipeline: every default filled in, every check done,
//! the schedule set. The denoising loop, the PNG parameters and the memory estimate all read the
//! same [`GenerationPlan`]; nothing is recomputed.

use super::{GenerateRequest, LcmPipeline, PipelineKind, Task};
use crate::error::{invalid, Error};
use crate::image_processor::default_size;
use crate::schedulers::{LcmScheduler, TimestepRequest};
use candle_core::{DType, Device};

/// Everything a generation needs to know besides the request's images and prompts.
#[derive(Clone, Debug)]
pub struct GenerationPlan {
    /// The diffusers pipeline whose semantics apply (an LCM model with a ControlNet follows the
    /// Stable Diffusion ControlNet pipeline).
    pub kind: PipelineKind,
    pub task: Task,
    /// Output size in pixels.
    pub width: usize,
    pub height: usize,
    /// Images (AnimateDiff: videos) per prompt.
    pub batch: usize,
    /// AnimateDiff: frames per video.
    pub num_frames: Option<usize>,
    pub guidance_scale: f64,
    /// Two UNet passes per step (unconditional and conditional).
    pub do_classifier_free_guidance: bool,
    /// Passed to the UNet as `timestep_cond` (LCM-distilled UNets outside AnimateDiff).
    pub guidance_embedding: Option<usize>,
    pub strength: f64,
    /// `LatentConsistencyModel(Img2Img)Pipeline` semantics: strength shortens the schedule inside
    /// `set_timesteps` and the result is the last step's `denoised`; otherwise the Stable Diffusion
    /// pipelines cut the full schedule (`get_timesteps`) and decode the last `prev_sample`.
    pub lcm_semantics: bool,
    /// The scheduler, its timesteps set (and begin index, for a cut schedule).
    pub scheduler: LcmScheduler,
    pub timesteps: Vec<i64>,
    /// The VAE's pixels per latent.
    pub vae_scale_factor: usize,
    pub device: Device,
    /// The activations' dtype (and the random draws').
    pub dtype: DType,
}

impl GenerationPlan {
    /// `(height, width)` of the latents.
    pub fn latent_size(&self) -> (usize, usize) {
        (self.height / self.vae_scale_factor, self.width / self.vae_scale_factor)
    }

    /// Rows of the UNet's batch: images (times frames), doubled under classifier-free guidance.
    pub fn unet_batch(&self) -> usize {
        self.batch * if self.do_classifier_free_guidance { 2 } else { 1 }
    }
}

impl LcmPipeline {
    /// Resolve and check a request against this pipeline, before any compute: the output size,
    /// guidance, strength, schedule and task, and whether the activations fit in memory.
    pub fn plan(&self, req: &GenerateRequest) -> Result<GenerationPlan, Error> {
        req.check()?;
        let c = &self.components;
        let kind = self.kind();
        let task = req.task();
        let has_control = self.has_control();
        if self.pipeline_forced && self.components.kind == PipelineKind::LatentConsistencyModel && has_control {
            invalid!(
                "LatentConsistencyModelPipeline has no ControlNet / T2I-Adapter variant in diffusers; use the StableDiffusion pipeline"
            );
        }
        self.check_parts(req, kind, task, has_control)?;
        let (width, height) = self.output_size(req)?;
        let guidance_scale = req.guidance_scale.unwrap_or(kind.default_guidance_scale());
        let unet_config = &c.unet_config;
        // AnimateDiffPipeline never passes a guidance embedding, even to LCM-distilled UNets.
        let guidance_embedding = unet_config.time_cond_proj_dim.filter(|_| kind != PipelineKind::AnimateDiff);
        let do_classifier_free_guidance = match kind {
            PipelineKind::AnimateDiff => guidance_scale > 1.0,
            PipelineKind::LatentConsistencyModel => false,
            _ => guidance_scale > 1.0 && guidance_embedding.is_none(),
        };
        let strength = req.strength.unwrap_or(match (task, kind) {
            (Task::TextToImage, _) => 1.0,
            // StableDiffusionXLControlNetImg2ImgPipeline defaults to 0.8 like the SD ones.
            (Task::ImageToImage, PipelineKind::StableDiffusionXL) if self.controlnets.is_empty() => 0.3,
            (Task::ImageToImage, _) => 0.8,
            (Task::Inpainting, PipelineKind::StableDiffusionXL) => 0.9999,
            (Task::Inpainting, _) => 1.0,
        });
        let num_frames = match kind {
            PipelineKind::AnimateDiff => Some(req.num_frames.unwrap_or(16)),
            _ => req.num_frames,
        };
        // Inpainting has no LCM-specific pipeline.
        let lcm_semantics = kind == PipelineKind::LatentConsistencyModel && task != Task::Inpainting;

        let request_error =
            |e: anyhow::Error| Error::InvalidRequest(crate::loaders::weights::one_line(&format!("{e:#}")));
        let mut scheduler = LcmScheduler::new(c.scheduler_config.clone()).map_err(request_error)?;
        scheduler
            .set_timesteps(&TimestepRequest {
                num_inference_steps: if req.timesteps.is_some() { None } else { Some(req.num_inference_steps) },
                original_inference_steps: req.original_inference_steps,
                timesteps: req.timesteps.clone(),
                strength: (lcm_semantics && task == Task::ImageToImage).then_some(strength),
            })
            .map_err(request_error)?;
        let mut timesteps = scheduler.timesteps().to_vec();
        if task != Task::TextToImage && !lcm_semantics {
            let total = scheduler.num_inference_steps();
            let init = ((total as f64 * strength) as usize).min(total);
            let t_start = total - init;
            timesteps = timesteps[t_start.min(timesteps.len())..].to_vec();
            scheduler.set_begin_index(t_start);
        }
        if timesteps.is_empty() {
            invalid!(
                "strength {strength} leaves no denoising step out of {}; raise the strength or the steps",
                req.num_inference_steps
            );
        }
        let plan = GenerationPlan {
            kind,
            task,
            width,
            height,
            batch: req.num_images_per_prompt,
            num_frames,
            guidance_scale,
            do_classifier_free_guidance,
            guidance_embedding,
            strength,
            lcm_semantics,
            scheduler,
            timesteps,
            vae_scale_factor: self.vae_scale_factor(),
            device: c.device().clone(),
            dtype: c.compute_dtype(),
        };
        self.check_memory(&plan)?;
        Ok(plan)
    }

    /// Whether the loaded parts can do what the request asks: counts of control images, motion
    /// modules, the UNet's input channels for the task.
    fn check_parts(
        &self,
        req: &GenerateRequest,
        kind: PipelineKind,
        task: Task,
        has_control: bool,
    ) -> Result<(), Error> {
        let motion = self.components.unet.motion.as_ref();
        if kind == PipelineKind::AnimateDiff || req.num_frames.is_some() {
            let Some(m) = motion else { invalid!("video generation (num_frames) needs a motion adapter") };
            let f = req.num_frames.unwrap_or(16);
            if f > m.max_frames() {
                invalid!("{f} frames exceed the motion adapter's motion_max_seq_length {}", m.max_frames());
            }
            if task != Task::TextToImage || has_control {
                invalid!("AnimateDiff here is text-to-video only (no init image, mask, ControlNet or T2I-Adapter)");
            }
        } else if motion.is_some() {
            invalid!("this UNet carries motion modules: use the AnimateDiff pipeline (num_frames)");
        }
        // Every source's input counts first, then the tasks they refuse.
        let sources = self.control_sources();
        for source in sources {
            source.check_inputs(req)?;
        }
        for source in sources {
            source.check_task(task)?;
        }
        let (unet_in, latent) = (self.components.unet_config.in_channels, self.components.vae.latent_channels());
        let inpaint_unet = unet_in == 2 * latent + 1;
        match task {
            Task::Inpainting if unet_in == latent || inpaint_unet => {}
            Task::Inpainting => {
                invalid!("this UNet takes {unet_in} input channels; inpainting needs {latent} or {}", 2 * latent + 1)
            }
            _ if inpaint_unet => invalid!(
                "this is an inpainting UNet ({unet_in} input channels): give an image and a mask image, or use a {latent}-channel UNet"
            ),
            _ if unet_in != latent => {
                invalid!("this UNet takes {unet_in} input channels but the VAE has {latent} latent channels")
            }
            _ => {}
        }
        Ok(())
    }

    /// The output size: given, else the first control image's (ControlNet: rounded down to the
    /// VAE factor; T2I-Adapter: to the adapter's downscale factor), else (image-to-image) the init
    /// image's (rounded down to the VAE factor), else (text-to-image, inpainting) the UNet's default.
    fn output_size(&self, req: &GenerateRequest) -> Result<(usize, usize), Error> {
        let f = self.vae_scale_factor();
        for (v, what) in [(req.width, "width"), (req.height, "height")] {
            if let Some(v) = v.filter(|v| *v == 0 || v % f != 0) {
                invalid!("{what} must be a positive multiple of {f} (the VAE scale factor), got {v}");
            }
        }
        let sources = self.control_sources();
        for (m, why) in sources.iter().filter_map(|s| s.size_multiple()) {
            for (v, what) in [(req.width, "width"), (req.height, "height")] {
                if let Some(v) = v.filter(|v| v % m != 0) {
                    invalid!("{what} must be a multiple of {m} ({why}), got {v}");
                }
            }
        }
        let control_image = sources.iter().find_map(|s| s.size_image(req, f));
        let (w, h) = match (control_image, &req.image) {
            (Some((img, factor)), _) => default_size(img, req.width, req.height, factor),
            // The inpainting pipelines (SD and SDXL) default to the UNet's size, not the image's
            // (`height = height or unet.config.sample_size * vae_scale_factor`).
            (None, Some(img)) if req.task() != Task::Inpainting => default_size(img, req.width, req.height, f),
            (None, _) => {
                let (dw, dh) = self.default_size();
                (req.width.unwrap_or(dw), req.height.unwrap_or(dh))
            }
        };
        if w == 0 || h == 0 {
            let what = if control_image.is_some() { "control" } else { "init" };
            invalid!("the {what} image is smaller than the scale factor ({f} pixels)");
        }
        Ok((w, h))
    }

    /// A lower estimate of the memory a plan's activations take, in bytes: the UNet's widest
    /// activations for every image (and frame, and CFG half) at once, or the decoder's
    /// full-resolution buffers for the images decoded together, whichever is larger, plus the
    /// decoded images. Computed in floating point, so absurd sizes cannot overflow.
    pub fn activation_bytes(&self, plan: &GenerationPlan) -> f64 {
        let c = &self.components;
        let (images, frames) = (plan.batch as f64, plan.num_frames.unwrap_or(1) as f64);
        let cfg = if plan.do_classifier_free_guidance { 2.0 } else { 1.0 };
        let pixels = plan.width as f64 * plan.height as f64;
        let f = plan.vae_scale_factor as f64;
        let unet_channels = c.unet_config.block_out_channels.first().copied().unwrap_or(320) as f64;
        let bytes = plan.dtype.size_in_bytes() as f64;
        // A block's input, output and intermediates.
        let unet = images * frames * cfg * pixels / (f * f) * unet_channels * 8.0 * bytes;
        // Frames are decoded one by one, still images together. At full resolution a resnet
        // block holds its input, the norm's, the convolutions' and the residual sum, and a 3x3
        // convolution's Winograd tiles 2.25 times its input: 8 buffers (a 8192² image on a
        // 16-channel decoder peaked above 24 GB, 8 buffers' worth is 34 GB).
        let decoded_together = if plan.num_frames.is_some() { 1.0 } else { images };
        let decode = decoded_together * pixels * c.vae.full_resolution_channels() as f64 * 8.0 * bytes;
        // The f32 decoded tensor and the 8-bit images.
        let outputs = images * frames * pixels * (3.0 * 4.0 + 3.0);
        unet.max(decode) + outputs
    }

    /// Refuses, before anything is allocated, a plan whose activations cannot fit in the memory
    /// this machine has free.
    fn check_memory(&self, plan: &GenerationPlan) -> Result<(), Error> {
        let need = self.activation_bytes(plan);
        let Some(available) = crate::device::available_memory(&plan.device) else { return Ok(()) };
        if need > available as f64 {
            let what = match plan.num_frames {
                Some(f) => format!("{} video(s) of {f} frames", plan.batch),
                None => format!("{} image(s)", plan.batch),
            };
            return Err(Error::TooLarge(format!(
                "{what} of {}x{} need about {:.1} GB of memory for the activations, more than the {:.1} GB available; lower the size or the count",
                plan.width,
                plan.height,
                need / 1e9,
                available as f64 / 1e9
            )));
        }
        Ok(())
    }
}
