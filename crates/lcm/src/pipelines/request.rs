//! What a caller asks for: [`GenerateRequest`], with diffusers' argument names, and the checks
//! that need no model ([`GenerateRequest::check`]); the rest is checked against the loaded model
//! when the request is planned ([`crate::pipelines::GenerationPlan`]).

use super::control::{AdapterInput, ControlNetInput, ControlNets, ControlSource, T2IAdapters};
use crate::error::{invalid, Error};
use crate::image_processor::Image8;
use crate::random::HalfRandn;
use candle_core::Tensor;

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
    /// The task the images select (a mask without an image is refused by [`Self::check`]).
    pub fn task(&self) -> Task {
        match (&self.image, &self.mask_image) {
            (None, _) => Task::TextToImage,
            (Some(_), None) => Task::ImageToImage,
            (Some(_), Some(_)) => Task::Inpainting,
        }
    }

    /// The checks that need no model: counts, ranges, arguments that only make sense together.
    /// [`LcmPipeline::plan`](super::LcmPipeline::plan) runs them first; a front end may call them
    /// before loading anything, to fail fast.
    pub fn check(&self) -> Result<(), Error> {
        if self.num_inference_steps == 0 && self.timesteps.is_none() {
            invalid!("the number of steps must be at least 1");
        }
        if self.timesteps.as_ref().is_some_and(|t| t.is_empty()) {
            invalid!("custom timesteps must not be empty");
        }
        if self.num_images_per_prompt == 0 {
            invalid!("the number of images must be at least 1");
        }
        if self.num_frames == Some(0) {
            invalid!("the number of frames must be at least 1");
        }
        if let Some(g) = self.guidance_scale.filter(|g| !g.is_finite()) {
            invalid!("guidance scale must be a finite number, got {g}");
        }
        if self.mask_image.is_some() && self.image.is_none() {
            invalid!("a mask image needs an image (the picture to inpaint)");
        }
        if let Some(s) = self.strength {
            if !(s > 0.0 && s <= 1.0) {
                invalid!("strength must be in (0, 1], got {s}");
            }
            if self.image.is_none() {
                invalid!("strength needs an image (image-to-image or inpainting)");
            }
        }
        // The control sources' own checks, in the order the pipeline runs them.
        ControlNets::check_request(self)?;
        T2IAdapters::check_request(self)?;
        Ok(())
    }
}
