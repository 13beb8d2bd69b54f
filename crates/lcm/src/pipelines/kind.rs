//! Which diffusers pipeline a model follows: its defaults (guidance, strength) and its semantics
//! (guidance embedding or classifier-free guidance, how strength shortens the schedule).

use crate::error::invalid;
use anyhow::{bail, Result};

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
        const OTHER_ARCHITECTURES: [&str; 6] = [
            "StableDiffusion3",
            "StableDiffusionUpscale",
            "StableDiffusionLatentUpscale",
            "StableDiffusionDepth2Img",
            "StableDiffusionGLIGEN",
            "StableDiffusionLDM3D",
        ];
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
        } else if name.starts_with("AnimateDiff") {
            Self::AnimateDiff
        } else {
            Self::StableDiffusion
        }
    }

    /// The one place a loaded model's pipeline is decided: the one asked for (`requested`, as
    /// instantiating another diffusers pipeline class on the same folder), else a motion
    /// adapter's AnimateDiff, else the folder's `_class_name`.
    pub fn resolve(class_name: &str, requested: Option<Self>, has_motion_adapter: bool) -> Result<Self> {
        match (requested, has_motion_adapter) {
            (Some(k), true) if k != Self::AnimateDiff => {
                invalid!("a motion adapter runs in the AnimateDiff pipeline, not {}", k.diffusers_name())
            }
            (Some(Self::AnimateDiff), false) => invalid!("the AnimateDiff pipeline needs a motion adapter"),
            (Some(k), _) => Ok(k),
            (None, true) => Ok(Self::AnimateDiff),
            (None, false) => match Self::from_class_name(class_name) {
                // An AnimateDiff folder without its motion adapter runs its base model.
                Self::AnimateDiff => Ok(Self::StableDiffusion),
                k => Ok(k),
            },
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
