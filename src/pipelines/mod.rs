//! Generation pipelines. One denoising loop ([`LcmPipeline::generate`]) serves both diffusers
//! pipelines LCM is used with:
//! - `LatentConsistencyModelPipeline` (LCM-distilled UNets): never classifier-free guidance;
//!   the guidance scale enters through the UNet's guidance embedding (`time_cond_proj_dim`).
//! - `StableDiffusionPipeline` with `LCMScheduler` (the LCM-LoRA path): classifier-free
//!   guidance with a negative prompt when `guidance_scale > 1` and the UNet has no guidance
//!   embedding.
pub mod adapters;
pub mod components;
pub mod conditioning;
pub mod control;
pub mod start_latents;

pub use adapters::{LoraReport, LoraSpec};
pub use components::{LoadOptions, StableDiffusionComponents};
pub use control::{AdapterInput, ControlNetInput, Named};
pub use crate::loaders::weights::WeightDType;

use crate::image_io::{postprocess, RgbImage};
use crate::image_processor::{default_size, Image8};
use crate::models::autoencoder::Autoencoder;
use crate::models::controlnet::ControlNetModel;
use crate::models::t2i_adapter::T2IAdapter;
use crate::models::unet_2d_condition::UNetConditioning;
use control::{ControlRequest, ControlState};
use crate::random::{HalfRandn, TorchGenerator};
use start_latents::InpaintState;
use crate::schedulers::{LcmScheduler, TimestepRequest};
use anyhow::{bail, Result};
use candle_core::Tensor;

/// Which diffusers pipeline's semantics to follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PipelineKind {
    /// `LatentConsistencyModelPipeline`.
    LatentConsistencyModel,
    /// `StableDiffusionPipeline` with the scheduler swapped for `LCMScheduler`.
    StableDiffusion,
    /// `StableDiffusionXLPipeline` with `LCMScheduler` (SDXL, SSD-1B).
    StableDiffusionXL,
    /// `AnimateDiffPipeline` with `LCMScheduler`: a UNet with motion modules, videos of
    /// `num_frames` frames; CFG whenever `guidance_scale > 1` (no guidance embedding).
    AnimateDiff,
}

impl PipelineKind {
    /// An error naming the class when a `model_index.json` `_class_name` is a pipeline we do
    /// not run (another architecture: SD3, Flux, Kandinsky, upscalers, ...), instead of running
    /// its files as Stable Diffusion.
    pub fn check_class_name(name: &str) -> Result<()> {
        const FAMILIES: [&str; 4] = ["LatentConsistencyModel", "StableDiffusionXL", "StableDiffusion", "AnimateDiff"];
        const OTHER_ARCHITECTURES: [&str; 6] =
            ["StableDiffusion3", "StableDiffusionUpscale", "StableDiffusionLatentUpscale", "StableDiffusionDepth2Img", "StableDiffusionGLIGEN", "StableDiffusionLDM3D"];
        let supported = name.is_empty() || FAMILIES.iter().any(|f| name.starts_with(f));
        if !supported || OTHER_ARCHITECTURES.iter().any(|o| name.starts_with(o)) {
            bail!(
                "the model is a `{}`, which lcm does not run (it runs LatentConsistencyModel, StableDiffusion, StableDiffusionXL and AnimateDiff pipelines)",
                name.chars().take(80).collect::<String>()
            );
        }
        Ok(())
    }

    /// The pipeline a `model_index.json` `_class_name` asks for (see [`Self::check_class_name`]).
    pub fn from_class_name(name: &str) -> Self {
        if name.starts_with("LatentConsistencyModel") {
            Self::LatentConsistencyModel
        } else if name.starts_with("StableDiffusionXL") {
            Self::StableDiffusionXL
        } else {
            Self::StableDiffusion
        }
    }

    /// diffusers' default `guidance_scale` for this pipeline.
    pub fn default_guidance_scale(self) -> f64 {
        match self {
            Self::LatentConsistencyModel => 8.5,
            Self::StableDiffusion => 7.5,
            Self::StableDiffusionXL => 5.0,
            Self::AnimateDiff => 7.5,
        }
    }

    pub fn diffusers_name(self) -> &'static str {
        match self {
            Self::LatentConsistencyModel => "LatentConsistencyModelPipeline",
            Self::StableDiffusion => "StableDiffusionPipeline",
            Self::StableDiffusionXL => "StableDiffusionXLPipeline",
            Self::AnimateDiff => "AnimateDiffPipeline",
        }
    }
}

/// One finished denoising step, as `callback_on_step_end` sees it.
pub struct Step<'a> {
    /// 0-based step number, of `total`.
    pub index: usize,
    pub total: usize,
    pub timestep: i64,
    /// The latents the next step starts from.
    pub latents: &'a Tensor,
    /// The scheduler's prediction of the clean latents at this step (LCM's `denoised`).
    pub denoised: &'a Tensor,
    /// AnimateDiff: frames per video (latents are `[n, c, frames, h, w]`).
    pub num_frames: Option<usize>,
}

/// What to generate. Field names follow diffusers' pipeline arguments.
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub num_inference_steps: usize,
    /// `None`: the pipeline's default (8.5 for LCM models, 7.5 otherwise).
    pub guidance_scale: Option<f64>,
    /// `None`: the UNet's `sample_size` times the VAE scale factor.
    pub width: Option<usize>,
    pub height: Option<usize>,
    /// `generator=torch.manual_seed(seed)`.
    pub seed: u64,
    pub num_images_per_prompt: usize,
    pub original_inference_steps: Option<usize>,
    /// Custom timesteps instead of `num_inference_steps`.
    pub timesteps: Option<Vec<i64>>,
    /// Image-to-image: the init image (with `mask_image`: inpainting).
    pub image: Option<Image8>,
    /// Inpainting: white areas are repainted.
    pub mask_image: Option<Image8>,
    /// How much of the init image to replace, in (0, 1]; `None`: the pipeline's default.
    pub strength: Option<f64>,
    /// One entry per ControlNet of the pipeline, in order (`image`,
    /// `controlnet_conditioning_scale`, `control_guidance_start` / `_end`).
    pub controlnet: Vec<ControlNetInput>,
    /// ControlNet `guess_mode` (forced on by `global_pool_conditions` ControlNets).
    pub guess_mode: bool,
    /// One entry per T2I-Adapter of the pipeline, in order (`image`, `adapter_conditioning_scale`).
    pub adapter: Vec<AdapterInput>,
    /// The fraction of the steps (from the first) that get the adapters' features.
    pub adapter_conditioning_factor: f64,
    /// AnimateDiff: frames per video (`None`: diffusers' default, 16). Needs a motion adapter.
    pub num_frames: Option<usize>,
    /// Which PyTorch's float16 / bfloat16 noise to reproduce when the model computes in half
    /// precision (it changed between versions); `None`: `LCM_TORCH_HALF_RANDN`, else PyTorch 2.15.
    pub half_randn: Option<HalfRandn>,
}

impl Default for GenerateRequest {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: None,
            num_inference_steps: 4,
            guidance_scale: None,
            width: None,
            height: None,
            seed: 0,
            num_images_per_prompt: 1,
            original_inference_steps: None,
            timesteps: None,
            image: None,
            mask_image: None,
            strength: None,
            controlnet: Vec::new(),
            guess_mode: false,
            adapter: Vec::new(),
            adapter_conditioning_factor: 1.0,
            num_frames: None,
            half_randn: None,
        }
    }
}

/// What a request asks for, like diffusers' AutoPipeline: an image selects image-to-image, an
/// image and a mask select inpainting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    TextToImage,
    ImageToImage,
    Inpainting,
}

impl GenerateRequest {
    pub fn task(&self) -> Task {
        match (&self.image, &self.mask_image) {
            (None, _) => Task::TextToImage,
            (Some(_), None) => Task::ImageToImage,
            (Some(_), Some(_)) => Task::Inpainting,
        }
    }
}

/// A loaded model ready to generate.
pub struct LcmPipeline {
    pub components: StableDiffusionComponents,
    pub kind: PipelineKind,
    /// ControlNets, run in this order (`MultiControlNetModel`).
    pub controlnets: Vec<Named<ControlNetModel>>,
    /// T2I-Adapters (`MultiAdapter`).
    pub t2i_adapters: Vec<Named<T2IAdapter>>,
    /// `LoadOptions::dtype`, as loaded (`weight_dtype`); the networks' own dtypes and device are
    /// `components.precision()` and `components.device()`.
    dtype: WeightDType,
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
        let kind = if components.motion.is_some() {
            PipelineKind::AnimateDiff
        } else {
            PipelineKind::from_class_name(&components.pipeline_class)
        };
        Ok(Self { components, kind, controlnets: Vec::new(), t2i_adapters: Vec::new(), dtype: opts.dtype })
    }

    /// Add a ControlNet (`controlnet=` / a list of them). diffusers has no LCM-specific
    /// ControlNet pipeline, so an LCM model then follows `StableDiffusionControlNetPipeline`,
    /// as in diffusers' LCM guide.
    pub fn add_controlnet(&mut self, controlnet: Named<ControlNetModel>) -> Result<()> {
        control::check_controlnet_fits(&controlnet.name, &controlnet.model, &self.components.unet_config)?;
        self.controlnets.push(controlnet);
        self.leave_lcm_kind();
        Ok(())
    }

    /// Load and add a ControlNet from a folder or hub repo id.
    pub fn load_controlnet(&mut self, source: &str, variant: Option<&str>) -> Result<()> {
        let cn = control::load_controlnet_with(source, variant, self.components.precision(), self.components.device())?;
        self.add_controlnet(cn)
    }

    /// Add a T2I-Adapter (`adapter=`; several act as `MultiAdapter`). Its fit to the UNet is
    /// checked when generating, where the feature sizes are known.
    pub fn add_t2i_adapter(&mut self, adapter: Named<T2IAdapter>) {
        self.t2i_adapters.push(adapter);
        self.leave_lcm_kind();
    }

    /// Load and add a T2I-Adapter from a folder or hub repo id.
    pub fn load_t2i_adapter(&mut self, source: &str, variant: Option<&str>) -> Result<()> {
        let ad = control::load_t2i_adapter_with(source, variant, self.components.precision(), self.components.device())?;
        self.add_t2i_adapter(ad);
        Ok(())
    }

    /// The precision the weights are kept in.
    pub fn weight_dtype(&self) -> WeightDType {
        self.dtype
    }

    fn leave_lcm_kind(&mut self) {
        if self.kind == PipelineKind::LatentConsistencyModel {
            self.kind = PipelineKind::StableDiffusion;
        }
    }

    fn has_control(&self) -> bool {
        !self.controlnets.is_empty() || !self.t2i_adapters.is_empty()
    }

    /// Load LoRAs (`load_lora_weights`); each is active at its spec's weight.
    pub fn load_loras(&mut self, specs: &[LoraSpec]) -> Result<Vec<LoraReport>> {
        self.components.load_loras(specs)
    }

    /// `set_adapters(names, adapter_weights)`: change adapter weights without reloading the base.
    pub fn set_adapters(&mut self, names_and_weights: &[(&str, f64)]) -> Result<()> {
        self.components.set_adapters(names_and_weights)
    }

    /// `delete_adapters(name)`.
    pub fn delete_adapter(&mut self, name: &str) -> Result<()> {
        self.components.delete_adapter(name)
    }

    /// Follow another diffusers pipeline's semantics than the folder's own.
    pub fn with_kind(mut self, kind: PipelineKind) -> Self {
        self.kind = kind;
        self
    }

    pub fn vae_scale_factor(&self) -> usize {
        self.components.vae.vae_scale_factor()
    }

    /// Default output size: the UNet's `sample_size` times the VAE scale factor.
    pub fn default_size(&self) -> (usize, usize) {
        let s = self.components.unet_config.sample_size * self.vae_scale_factor();
        (s, s)
    }

    pub fn guidance_scale(&self, req: &GenerateRequest) -> f64 {
        req.guidance_scale.unwrap_or(self.kind.default_guidance_scale())
    }

    /// Whether classifier-free guidance runs (two UNet passes per step).
    pub fn uses_cfg(&self, guidance_scale: f64) -> bool {
        if self.kind == PipelineKind::AnimateDiff {
            // AnimateDiffPipeline never passes a guidance embedding, even to LCM-distilled UNets.
            return guidance_scale > 1.0;
        }
        self.kind != PipelineKind::LatentConsistencyModel
            && guidance_scale > 1.0
            && self.components.unet_config.time_cond_proj_dim.is_none()
    }

    /// diffusers' default `strength` for the task and pipeline.
    pub fn strength(&self, req: &GenerateRequest) -> f64 {
        req.strength.unwrap_or(match (req.task(), self.kind) {
            (Task::TextToImage, _) => 1.0,
            // StableDiffusionXLControlNetImg2ImgPipeline defaults to 0.8 like the SD ones.
            (Task::ImageToImage, PipelineKind::StableDiffusionXL) if self.controlnets.is_empty() => 0.3,
            (Task::ImageToImage, _) => 0.8,
            (Task::Inpainting, PipelineKind::StableDiffusionXL) => 0.9999,
            (Task::Inpainting, _) => 1.0,
        })
    }

    /// The output size: given, else the first control image's (ControlNet: rounded down to the
    /// VAE factor; T2I-Adapter: to the adapter's downscale factor), else (image-to-image) the init
    /// image's (rounded down to the VAE factor), else (text-to-image, inpainting) the UNet's default.
    pub fn output_size(&self, req: &GenerateRequest) -> Result<(usize, usize)> {
        let f = self.vae_scale_factor();
        for (v, what) in [(req.width, "width"), (req.height, "height")] {
            if let Some(v) = v.filter(|v| *v == 0 || v % f != 0) {
                bail!("{what} must be a positive multiple of {f} (the VAE scale factor), got {v}");
            }
        }
        let adapter_factor = self.t2i_adapters.iter().map(|a| a.model.downscale_factor()).max();
        if let Some(af) = adapter_factor {
            for (v, what) in [(req.width, "width"), (req.height, "height")] {
                if let Some(v) = v.filter(|v| v % af != 0) {
                    bail!("{what} must be a multiple of {af} (the T2I-Adapter's downscale factor), got {v}");
                }
            }
        }
        let control_image = match (req.controlnet.first(), req.adapter.first()) {
            (Some(c), _) if !self.controlnets.is_empty() => Some((&c.image, f)),
            (_, Some(a)) if adapter_factor.is_some() => Some((&a.image, adapter_factor.unwrap_or(f))),
            _ => None,
        };
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
            bail!("the {} image is smaller than the scale factor ({f} pixels)", if control_image.is_some() { "control" } else { "init" });
        }
        Ok((w, h))
    }

    /// A lower estimate of the memory a request's activations take, in bytes: the UNet's widest
    /// activations for every image (and frame, and CFG half) at once, or the decoder's
    /// full-resolution buffers for the images decoded together, whichever is larger, plus the
    /// decoded images. Computed in floating point, so absurd sizes cannot overflow.
    pub fn activation_bytes(&self, req: &GenerateRequest, (w, h): (usize, usize)) -> f64 {
        let c = &self.components;
        let video = self.num_frames(req);
        let (images, frames) = (req.num_images_per_prompt as f64, video.unwrap_or(1) as f64);
        let cfg = if self.uses_cfg(self.guidance_scale(req)) { 2.0 } else { 1.0 };
        let pixels = w as f64 * h as f64;
        let f = self.vae_scale_factor() as f64;
        let unet_channels = c.unet_config.block_out_channels.first().copied().unwrap_or(320) as f64;
        let bytes = c.compute_dtype().size_in_bytes() as f64;
        // A block's input, output and intermediates.
        let unet = images * frames * cfg * pixels / (f * f) * unet_channels * 8.0 * bytes;
        // Frames are decoded one by one, still images together. At full resolution a resnet
        // block holds its input, the norm's, the convolutions' and the residual sum, and a 3x3
        // convolution's Winograd tiles 2.25 times its input: 8 buffers (a 8192² image on a
        // 16-channel decoder peaked above 24 GB, 8 buffers' worth is 34 GB).
        let decoded_together = if video.is_some() { 1.0 } else { images };
        let decode = decoded_together * pixels * c.vae.full_resolution_channels() as f64 * 8.0 * bytes;
        // The f32 decoded tensor and the 8-bit images.
        let outputs = images * frames * pixels * (3.0 * 4.0 + 3.0);
        unet.max(decode) + outputs
    }

    /// Refuses, before anything is allocated, a request whose activations cannot fit in the
    /// memory this machine has free.
    fn check_memory(&self, req: &GenerateRequest, size: (usize, usize)) -> Result<()> {
        let need = self.activation_bytes(req, size);
        let Some(available) = crate::device::available_memory(self.components.device()) else { return Ok(()) };
        if need > available as f64 {
            let gb = |b: f64| b / 1e9;
            let what = match self.num_frames(req) {
                Some(f) => format!("{} video(s) of {f} frames", req.num_images_per_prompt),
                None => format!("{} image(s)", req.num_images_per_prompt),
            };
            bail!(
                "{what} of {}x{} need about {:.1} GB of memory for the activations, more than the {:.1} GB available; lower the size or the count",
                size.0,
                size.1,
                gb(need),
                gb(available as f64)
            );
        }
        Ok(())
    }

    /// Every check of a request, before any compute; the output size.
    pub fn validate(&self, req: &GenerateRequest) -> Result<(usize, usize)> {
        let (w, h) = self.output_size(req)?;
        if req.num_inference_steps == 0 && req.timesteps.is_none() {
            bail!("the number of steps must be at least 1");
        }
        if req.num_images_per_prompt == 0 {
            bail!("the number of images must be at least 1");
        }
        let g = self.guidance_scale(req);
        if !g.is_finite() {
            bail!("guidance scale must be a finite number, got {g}");
        }
        let s = self.strength(req);
        if !(s > 0.0 && s <= 1.0) {
            bail!("strength must be in (0, 1], got {s}");
        }
        // A mask of another size than the image is resized to the output size, as diffusers'
        // mask processor does.
        if let Some(f) = self.num_frames(req) {
            if self.components.unet.motion.is_none() {
                bail!("video generation (num_frames) needs a motion adapter");
            }
            if f == 0 {
                bail!("the number of frames must be at least 1");
            }
            let max = self.components.unet.motion.as_ref().map_or(usize::MAX, |m| m.max_frames());
            if f > max {
                bail!("{f} frames exceed the motion adapter's motion_max_seq_length {max}");
            }
            if req.task() != Task::TextToImage || self.has_control() {
                bail!("AnimateDiff here is text-to-video only (no init image, mask, ControlNet or T2I-Adapter)");
            }
        } else if self.components.unet.motion.is_some() {
            bail!("this UNet carries motion modules: use the AnimateDiff pipeline (num_frames)");
        }
        if self.kind == PipelineKind::LatentConsistencyModel && self.has_control() {
            bail!("LatentConsistencyModelPipeline has no ControlNet / T2I-Adapter variant in diffusers; use the StableDiffusion pipeline");
        }
        if req.controlnet.len() != self.controlnets.len() {
            bail!("{} ControlNet(s) but {} control image(s); give one image per ControlNet", self.controlnets.len(), req.controlnet.len());
        }
        if req.adapter.len() != self.t2i_adapters.len() {
            bail!("{} T2I-Adapter(s) but {} adapter image(s); give one image per adapter", self.t2i_adapters.len(), req.adapter.len());
        }
        for c in &req.controlnet {
            if !(c.conditioning_scale.is_finite() && c.guidance_start.is_finite() && c.guidance_end.is_finite()) {
                bail!("ControlNet scale and guidance start/end must be finite numbers");
            }
            if !(0.0 <= c.guidance_start && c.guidance_start < c.guidance_end && c.guidance_end <= 1.0) {
                bail!(
                    "control guidance start ({}) must be smaller than end ({}), both in [0, 1]",
                    c.guidance_start, c.guidance_end
                );
            }
        }
        if req.adapter.iter().any(|a| !a.conditioning_scale.is_finite()) {
            bail!("adapter scale must be a finite number");
        }
        match req.task() {
            Task::Inpainting if self.has_control() => bail!("inpainting with a ControlNet or T2I-Adapter is not supported yet"),
            Task::ImageToImage if !self.t2i_adapters.is_empty() => {
                bail!("T2I-Adapters work with text-to-image only (diffusers has no adapter image-to-image pipeline)")
            }
            _ => {}
        }
        let (unet_in, latent) = (self.components.unet_config.in_channels, self.components.vae.latent_channels());
        let inpaint_unet = unet_in == 2 * latent + 1;
        match req.task() {
            Task::Inpainting if unet_in == latent || inpaint_unet => {}
            Task::Inpainting => bail!("this UNet takes {unet_in} input channels; inpainting needs {latent} or {}", 2 * latent + 1),
            _ if inpaint_unet => bail!(
                "this is an inpainting UNet ({unet_in} input channels): give --image and --mask-image, or use a {latent}-channel UNet"
            ),
            _ if unet_in != latent => bail!("this UNet takes {unet_in} input channels but the VAE has {latent} latent channels"),
            _ => {}
        }
        self.check_memory(req, (w, h))?;
        Ok((w, h))
    }

    /// Frames per video when this is an AnimateDiff generation.
    pub fn num_frames(&self, req: &GenerateRequest) -> Option<usize> {
        match (self.kind, req.num_frames) {
            (PipelineKind::AnimateDiff, f) => Some(f.unwrap_or(16)),
            (_, f) => f,
        }
    }

    /// AnimateDiff: `num_images_per_prompt` videos of `num_frames` frames each.
    pub fn animate(&self, req: &GenerateRequest, on_step: impl FnMut(usize, usize)) -> Result<Vec<Vec<RgbImage>>> {
        let frames = self.num_frames(req).unwrap_or(16);
        let images = self.generate(req, on_step)?;
        Ok(images.chunks(frames.max(1)).map(|c| c.to_vec()).collect())
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
        mut on_step: impl FnMut(&Step) -> Result<()>,
    ) -> Result<Vec<RgbImage>> {
        let (width, height) = self.validate(req)?;
        let c = &self.components;
        let device = c.device();
        let n = req.num_images_per_prompt;
        let task = req.task();
        let guidance_scale = self.guidance_scale(req);
        let cfg = self.uses_cfg(guidance_scale);
        let strength = self.strength(req);
        // LatentConsistencyModel(Img2Img)Pipeline shortens the schedule inside `set_timesteps`;
        // the Stable Diffusion pipelines cut the full schedule (`get_timesteps`), and so does
        // inpainting, which has no LCM-specific pipeline.
        let lcm_semantics = self.kind == PipelineKind::LatentConsistencyModel && task != Task::Inpainting;

        let mut scheduler = LcmScheduler::new(c.scheduler_config.clone())?;
        scheduler.set_timesteps(&TimestepRequest {
            num_inference_steps: if req.timesteps.is_some() { None } else { Some(req.num_inference_steps) },
            original_inference_steps: req.original_inference_steps,
            timesteps: req.timesteps.clone(),
            strength: (lcm_semantics && task == Task::ImageToImage).then_some(strength),
        })?;
        let mut timesteps = scheduler.timesteps().to_vec();
        if task != Task::TextToImage && !lcm_semantics {
            let total = scheduler.num_inference_steps();
            let init = ((total as f64 * strength) as usize).min(total);
            let t_start = total - init;
            timesteps = timesteps[t_start.min(timesteps.len())..].to_vec();
            scheduler.set_begin_index(t_start);
        }
        if timesteps.is_empty() {
            bail!("strength {strength} leaves no denoising step out of {}; raise --strength or --steps", req.num_inference_steps);
        }

        let text = conditioning::encode_text(c, &req.prompt, req.negative_prompt.as_deref(), cfg, n, (height, width), device)?;
        let frames = self.num_frames(req);
        let prompt_embeds = match frames {
            // AnimateDiffPipeline: `prompt_embeds.repeat_interleave(num_frames, dim=0)`.
            Some(f) => crate::ops::repeat_interleave(&text.prompt_embeds, f)?,
            None => text.prompt_embeds,
        };
        let mut unet_cond = UNetConditioning { added_cond: text.added_cond, num_frames: frames, ..Default::default() };
        if let (Some(dim), false) = (c.unet_config.time_cond_proj_dim, self.kind == PipelineKind::AnimateDiff) {
            let w = vec![(guidance_scale - 1.0) as f32; n];
            // `get_guidance_scale_embedding(w).to(dtype=latents.dtype)`
            unet_cond.timestep_cond = Some(conditioning::guidance_scale_embedding(&w, dim, device)?.to_dtype(c.compute_dtype())?);
        }

        let f = self.vae_scale_factor();
        let mut generator = TorchGenerator::manual_seed(req.seed);
        if let Some(mode) = req.half_randn {
            generator = generator.with_half_randn(mode);
        }
        // diffusers draws every random tensor on the CPU generator in the model's dtype.
        let dtype = c.compute_dtype();
        let latent_channels = c.vae.latent_channels();
        let mut inpaint = None;
        let mut latents = match (&req.image, &req.mask_image) {
            (None, _) => {
                // Video latents are drawn as [b, c, frames, h, w] (diffusers' order) and stay so;
                // the UNet sees them with the frames folded into the batch.
                let shape: Vec<usize> = [n, latent_channels].into_iter().chain(frames).chain([height / f, width / f]).collect();
                (generator.randn_on(shape, dtype, device)? * scheduler.init_noise_sigma())?
            }
            (Some(image), None) => start_latents::image_to_image(
                &c.vae, &scheduler, image, (width, height), n, timesteps[0], &mut generator, (device, dtype),
            )?,
            (Some(image), Some(mask)) => {
                let (latents, state) = start_latents::inpaint(
                    &c.vae, &scheduler, image, mask, (width, height), n, strength,
                    (latent_channels, c.unet_config.in_channels), timesteps[0], &mut generator, (device, dtype),
                )?;
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

        let control = ControlState::prepare(
            &self.controlnets,
            &self.t2i_adapters,
            &c.unet,
            &ControlRequest {
                controlnet: &req.controlnet,
                adapter: &req.adapter,
                adapter_conditioning_factor: req.adapter_conditioning_factor,
                guess_mode: req.guess_mode,
            },
            (width, height),
            f,
            n,
            cfg,
            timesteps.len(),
            device,
        )?;

        let mut denoised = latents.clone();
        for (i, &t) in timesteps.iter().enumerate() {
            let mut model_in = if cfg { Tensor::cat(&[&latents, &latents], 0)? } else { latents.clone() };
            let cond = control.conditioning(i, timesteps.len(), t as f64, &model_in, &latents, &prompt_embeds, &unet_cond, cfg)?;
            if let Some(x) = &extra_channels {
                model_in = Tensor::cat(&[&model_in, x], 1)?;
            }
            let pred = match frames {
                Some(_) => c.unet.forward_frames(&model_in, t as f64, &prompt_embeds, &cond)?,
                None => c.unet.forward(&model_in, t as f64, &prompt_embeds, &cond)?,
            };
            let pred = if cfg {
                let (uncond, text) = (pred.narrow(0, 0, n)?, pred.narrow(0, n, n)?);
                (&uncond + ((&text - &uncond)? * guidance_scale)?)?
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
            on_step(&Step { index: i, total: timesteps.len(), timestep: t, latents: &latents, denoised: &denoised, num_frames: frames })?;
        }

        // LatentConsistencyModel pipelines decode `denoised`; the Stable Diffusion ones decode
        // the (possibly blended) `prev_sample`, which is `denoised` after the last LCM step.
        let final_latents = if lcm_semantics { &denoised } else { &latents };
        self.decode_latents(&c.vae, final_latents, frames)
    }

    /// Scaled latents (`[n, c, h, w]`, or `[n, c, frames, h, w]` with `num_frames`) -> images
    /// through `vae`: the pipeline's own autoencoder for results, a tiny one for previews.
    pub fn decode_latents(&self, vae: &Autoencoder, latents: &Tensor, num_frames: Option<usize>) -> Result<Vec<RgbImage>> {
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

    /// The AUTOMATIC1111-style `parameters` text for image `index` of a request.
    pub fn parameters_text(&self, req: &GenerateRequest, index: usize) -> String {
        let (w, h) = self.output_size(req).unwrap_or(self.default_size());
        let mut s = req.prompt.clone();
        if let Some(neg) = req.negative_prompt.as_deref().filter(|n| !n.is_empty()) {
            s.push_str(&format!("\nNegative prompt: {neg}"));
        }
        s.push_str(&format!(
            "\nSteps: {}, Sampler: LCM, CFG scale: {}, Seed: {}, Size: {w}x{h}, Model: {}",
            req.timesteps.as_ref().map_or(req.num_inference_steps, |t| t.len()),
            self.guidance_scale(req),
            req.seed,
            self.components.name,
        ));
        if req.task() != Task::TextToImage {
            s.push_str(&format!(", Denoising strength: {}", self.strength(req)));
        }
        if req.num_images_per_prompt > 1 {
            s.push_str(&format!(", Batch size: {}, Batch pos: {}", req.num_images_per_prompt, index));
        }
        if let Some(o) = req.original_inference_steps {
            s.push_str(&format!(", Original inference steps: {o}"));
        }
        for (cn, input) in self.controlnets.iter().zip(&req.controlnet) {
            s.push_str(&format!(
                ", ControlNet: {} (scale {}, start {}, end {})",
                cn.name, input.conditioning_scale, input.guidance_start, input.guidance_end
            ));
        }
        for (ad, input) in self.t2i_adapters.iter().zip(&req.adapter) {
            s.push_str(&format!(", T2I-Adapter: {} (scale {})", ad.name, input.conditioning_scale));
        }
        s.push_str(&format!(", Pipeline: {}", self.kind.diffusers_name()));
        s
    }
}
