//! T2I-Adapters as a control source: diffusers' `StableDiffusion[XL]AdapterPipeline`, several at
//! once as `MultiAdapter` (features summed).

use super::{ControlSource, ControlStep, Named, PreparedControl, NO_INPAINTING};
use crate::error::{invalid, Error};
use crate::image_processor::{preprocess_control_image, Image8};
use crate::loaders::model_index::resolve_component;
use crate::loaders::weights::Precision;
use crate::models::t2i_adapter::T2IAdapter;
use crate::models::unet::{UNet2DConditionModel, UNetConditioning};
use crate::ops::tile_batch;
use crate::pipelines::components::display_name;
use crate::pipelines::{GenerateRequest, GenerationPlan, Task};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

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

/// The pipeline's T2I-Adapters, their scaled features summed (`MultiAdapter`); each takes the
/// request's `adapter` input of the same index. Their fit to the UNet is checked when
/// generating, where the feature sizes are known. Dereferences to the models.
#[derive(Clone, Debug, Default)]
pub struct T2IAdapters(Vec<Named<T2IAdapter>>);

impl T2IAdapters {
    pub(crate) fn add(&mut self, adapter: Named<T2IAdapter>) {
        self.0.push(adapter);
    }

    /// The largest downscale factor: the output size must be a multiple of it.
    fn downscale_factor(&self) -> Option<usize> {
        self.0.iter().map(|a| a.model.downscale_factor()).max()
    }
}

impl std::ops::Deref for T2IAdapters {
    type Target = [Named<T2IAdapter>];

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl ControlSource for T2IAdapters {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn check_request(req: &GenerateRequest) -> Result<(), Error> {
        if req.adapter.iter().any(|a| !a.conditioning_scale.is_finite()) {
            invalid!("adapter scale must be a finite number");
        }
        let f = req.adapter_conditioning_factor;
        if !(0.0..=1.0).contains(&f) {
            invalid!("adapter conditioning factor must be in [0, 1], got {f}");
        }
        Ok(())
    }

    fn check_inputs(&self, req: &GenerateRequest) -> Result<(), Error> {
        if req.adapter.len() != self.0.len() {
            invalid!(
                "{} T2I-Adapter(s) but {} adapter image(s); give one image per adapter",
                self.0.len(),
                req.adapter.len()
            );
        }
        Ok(())
    }

    fn check_task(&self, task: Task) -> Result<(), Error> {
        match task {
            _ if self.0.is_empty() => Ok(()),
            Task::Inpainting => invalid!("{NO_INPAINTING}"),
            Task::ImageToImage => {
                invalid!("T2I-Adapters work with text-to-image only (diffusers has no adapter image-to-image pipeline)")
            }
            Task::TextToImage => Ok(()),
        }
    }

    fn size_multiple(&self) -> Option<(usize, &'static str)> {
        self.downscale_factor().map(|f| (f, "the T2I-Adapter's downscale factor"))
    }

    /// The first adapter image, rounded down to the adapters' downscale factor.
    fn size_image<'r>(&self, req: &'r GenerateRequest, _vae_scale_factor: usize) -> Option<(&'r Image8, usize)> {
        req.adapter.first().zip(self.downscale_factor()).map(|(a, f)| (&a.image, f))
    }

    /// The adapters' features, computed once: each scaled, summed, batch-expanded like the UNet's
    /// input.
    fn prepare<'a>(
        &'a self,
        req: &'a GenerateRequest,
        unet: &UNet2DConditionModel,
        plan: &GenerationPlan,
    ) -> Result<Option<Box<dyn PreparedControl + 'a>>> {
        let (width, height, device) = (plan.width, plan.height, &plan.device);
        let (n, cfg, num_steps) = (plan.batch, plan.do_classifier_free_guidance, plan.timesteps.len());
        let mut residuals: Option<Vec<Tensor>> = None;
        let (lh, lw) = plan.latent_size();
        let expected = unet.down.intrablock_shapes(lh, lw);
        for (ad, input) in self.0.iter().zip(&req.adapter) {
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
            residuals = Some(match residuals {
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
        let Some(residuals) = residuals else { return Ok(None) };
        let copies = if cfg { 2 * n } else { n };
        let residuals = residuals.iter().map(|f| tile_batch(f, copies)).collect::<candle_core::Result<Vec<_>>>()?;
        // `adapter_conditioning_factor`: the steps (from the first) that get the features.
        let steps = (num_steps as f64 * req.adapter_conditioning_factor) as usize;
        Ok(Some(Box::new(PreparedAdapters { residuals, steps })))
    }

    fn describe(&self, req: &GenerateRequest, text: &mut String) {
        for (ad, input) in self.0.iter().zip(&req.adapter) {
            text.push_str(&format!(", T2I-Adapter: {} (scale {})", ad.name, input.conditioning_scale));
        }
    }
}

struct PreparedAdapters {
    /// The summed features, batch-expanded.
    residuals: Vec<Tensor>,
    /// Steps (from the first) that get them.
    steps: usize,
}

impl PreparedControl for PreparedAdapters {
    /// `down_intrablock_additional_residuals`, for the first `steps` steps.
    fn apply(&self, step: &ControlStep, cond: &mut UNetConditioning) -> Result<()> {
        if step.index < self.steps {
            cond.down_intrablock_additional_residuals = Some(self.residuals.clone());
        }
        Ok(())
    }
}
