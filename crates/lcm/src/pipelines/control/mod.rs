//! Spatial control for the denoising loop: ControlNets (diffusers'
//! `StableDiffusion[XL]ControlNet[Img2Img]Pipeline`, several at once as `MultiControlNetModel`)
//! and T2I-Adapters (`StableDiffusion[XL]AdapterPipeline`, several as `MultiAdapter`).
//! The models belong to the pipeline; the images and scales to each request.
//!
//! Each kind of control is one source, in its own file: `controlnet.rs` ([`ControlNets`]) and
//! `t2i_adapter.rs` ([`T2IAdapters`]). A source is all the pipeline's models of its kind, since
//! diffusers combines them per kind (summed residuals, summed features). The pipeline sees the
//! sources only through the `ControlSource` trait: checking a request, the output size,
//! preparing a generation, the residuals of each step, the PNG `parameters` text.
//!
//! A new source is one file here (its request input, its loader, a type implementing
//! `ControlSource`) plus its wiring: a `mod` and `pub use` below; its field in
//! [`GenerateRequest`] (diffusers' argument name, with its default) and its `check_request` call
//! in [`GenerateRequest::check`]; its field in [`LcmPipeline`](super::LcmPipeline), an entry in
//! `LcmPipeline::control_sources`, and the `add_*` / `load_*` methods.

mod controlnet;
mod t2i_adapter;

pub use controlnet::{
    check_controlnet_fits, controlnet_keep, load_controlnet, load_controlnet_with, ControlNetInput, ControlNets,
};
pub use t2i_adapter::{load_t2i_adapter, load_t2i_adapter_with, AdapterInput, T2IAdapters};

use crate::error::Error;
use crate::image_processor::Image8;
use crate::models::unet::{UNet2DConditionModel, UNetConditioning};
use crate::pipelines::{GenerateRequest, GenerationPlan, Task};
use anyhow::Result;
use candle_core::Tensor;

/// A model loaded from `source`, with the name it is shown under.
#[derive(Clone, Debug)]
pub struct Named<T> {
    pub name: String,
    pub model: T,
}

/// The task restriction the ControlNets and T2I-Adapters share, in one wording.
const NO_INPAINTING: &str = "inpainting with a ControlNet or T2I-Adapter is not supported yet";

/// One kind of control, with all the pipeline's models of that kind.
///
/// A trait rather than an enum of sources: each source keeps its checks, its prepared tensors
/// and its step in its own file, and the pipeline runs them all alike in one order
/// (`LcmPipeline::control_sources`); an enum would add an arm to a match in every step for each
/// new source. Every method is called whether or not the source holds models, so a source
/// without models must pass the checks (bar a request that gives it inputs) and add nothing.
pub(crate) trait ControlSource {
    /// Whether the pipeline holds no model of this kind.
    fn is_empty(&self) -> bool;

    /// The checks on this source's request inputs that need no model (finite scales, ranges),
    /// run by [`GenerateRequest::check`] before anything is loaded.
    fn check_request(req: &GenerateRequest) -> Result<(), Error>
    where
        Self: Sized;

    /// The request's inputs against the loaded models (one input per model). Run for every
    /// source before any [`Self::check_task`].
    fn check_inputs(&self, req: &GenerateRequest) -> Result<(), Error>;

    /// Refuses a task that diffusers has no pipeline for with this kind of control.
    fn check_task(&self, task: Task) -> Result<(), Error>;

    /// A factor the output width and height must be multiples of besides the VAE's, and what it
    /// is (for the message).
    fn size_multiple(&self) -> Option<(usize, &'static str)> {
        None
    }

    /// The image the output size defaults to, and the factor its size is rounded down to; the
    /// first source that has one decides.
    fn size_image<'r>(&self, req: &'r GenerateRequest, vae_scale_factor: usize) -> Option<(&'r Image8, usize)>;

    /// What the denoising loop needs from this source for one generation, computed once;
    /// `None` when it adds nothing.
    fn prepare<'a>(
        &'a self,
        req: &'a GenerateRequest,
        unet: &UNet2DConditionModel,
        plan: &GenerationPlan,
    ) -> Result<Option<Box<dyn PreparedControl + 'a>>>;

    /// Appends this source's part of the AUTOMATIC1111 `parameters` text.
    fn describe(&self, req: &GenerateRequest, text: &mut String);
}

/// A source prepared for one generation.
pub(crate) trait PreparedControl {
    /// Adds this source's residuals for `step` to the UNet conditioning `cond`.
    fn apply(&self, step: &ControlStep, cond: &mut UNetConditioning) -> Result<()>;
}

/// One denoising step, as the control sources see it.
pub(crate) struct ControlStep<'a> {
    /// 0-based step number.
    pub index: usize,
    pub timestep: f64,
    /// The UNet's latent input (doubled under classifier-free guidance).
    pub model_in: &'a Tensor,
    /// The latents, undoubled.
    pub latents: &'a Tensor,
    /// The UNet's text states.
    pub prompt_embeds: &'a Tensor,
    /// The UNet conditioning without control.
    pub base: &'a UNetConditioning,
}

/// What the loop needs from the control sources for one generation, prepared once.
pub(crate) struct ControlState<'a> {
    sources: Vec<Box<dyn PreparedControl + 'a>>,
}

impl<'a> ControlState<'a> {
    pub fn prepare(
        sources: &[&'a dyn ControlSource],
        req: &'a GenerateRequest,
        unet: &UNet2DConditionModel,
        plan: &GenerationPlan,
    ) -> Result<Self> {
        let mut prepared = Vec::new();
        for source in sources {
            prepared.extend(source.prepare(req, unet, plan)?);
        }
        Ok(Self { sources: prepared })
    }

    /// The UNet conditioning for `step`: its base plus every source's residuals.
    pub fn conditioning(&self, step: &ControlStep) -> Result<UNetConditioning> {
        let mut cond = step.base.clone();
        for source in &self.sources {
            source.apply(step, &mut cond)?;
        }
        Ok(cond)
    }
}
