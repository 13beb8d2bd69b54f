//! Where denoising starts: pure noise (text-to-image), the encoded init image noised to the
//! first timestep (image-to-image), or that plus the mask inputs (inpainting). The random draws
//! happen in diffusers' order: image latent sample, noise, masked-image latent sample.

use super::GenerationPlan;
use crate::image_processor::{preprocess_image, preprocess_mask, Image8};
use crate::models::vae::Autoencoder;
use crate::ops::tile_batch;
use crate::random::TorchGenerator;
use anyhow::Result;
use candle_core::Tensor;

/// Inpainting inputs carried through the loop.
pub struct InpaintState {
    /// Binarized mask at latent resolution, `[n, 1, h, w]`.
    pub mask: Tensor,
    /// Latents of the image with the masked area blanked, `[n, c, h, w]` (9-channel UNets).
    pub masked_image_latents: Tensor,
    /// Clean image latents and the start noise, for 4-channel UNets' blending after each step.
    pub image_latents: Option<Tensor>,
    pub noise: Tensor,
}

/// `F.interpolate(mask, size)` with the default nearest mode.
fn nearest_resize(mask: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (_, _, ih, iw) = mask.dims4()?;
    let src: Vec<f32> = mask.flatten_all()?.to_vec1()?;
    let idx = |o: usize, out: usize, inp: usize| -> usize {
        if out == inp {
            o
        } else {
            (((o as f32) * (inp as f32 / out as f32)).floor() as usize).min(inp - 1)
        }
    };
    let mut out = Vec::with_capacity(h * w);
    for y in 0..h {
        for x in 0..w {
            out.push(src[idx(y, h, ih) * iw + idx(x, w, iw)]);
        }
    }
    Ok(Tensor::from_vec(out, (1, 1, h, w), mask.device())?)
}

/// Image-to-image: `add_noise(encode(image) * scaling, noise, first timestep)`.
pub fn image_to_image(
    vae: &Autoencoder,
    plan: &GenerationPlan,
    image: &Image8,
    generator: &mut TorchGenerator,
) -> Result<Tensor> {
    let (device, dtype) = (&plan.device, plan.dtype);
    let init = preprocess_image(image, plan.width, plan.height, device)?;
    let latents = tile_batch(&vae.encode_scaled(&init, generator)?, plan.batch)?.to_dtype(dtype)?;
    let noise = generator.randn_on(latents.shape().clone(), dtype, device)?;
    plan.scheduler.add_noise(&latents, &noise, plan.timesteps[0])
}

/// Inpainting: start latents plus the mask inputs (diffusers' `prepare_latents` then
/// `prepare_mask_latents`). A UNet of `unet_in_channels` equal to the latents' blends the
/// unmasked area back after each step; a 9-channel one sees the mask inputs instead.
pub fn inpaint(
    vae: &Autoencoder,
    plan: &GenerationPlan,
    image: &Image8,
    mask_image: &Image8,
    unet_in_channels: usize,
    generator: &mut TorchGenerator,
) -> Result<(Tensor, InpaintState)> {
    let (device, dtype, n) = (&plan.device, plan.dtype, plan.batch);
    let (width, height) = (plan.width, plan.height);
    let (scheduler, first_timestep) = (&plan.scheduler, plan.timesteps[0]);
    let latent_channels = vae.latent_channels();
    let init = preprocess_image(image, width, height, device)?;
    let is_strength_max = plan.strength == 1.0;
    let blends = unet_in_channels == latent_channels;
    let image_latents = if blends || !is_strength_max {
        Some(tile_batch(&vae.encode_scaled(&init, generator)?, n)?.to_dtype(dtype)?)
    } else {
        None
    };
    let (lh, lw) = plan.latent_size();
    let noise = generator.randn_on((n, latent_channels, lh, lw), dtype, device)?;
    let latents = match (&image_latents, is_strength_max) {
        (Some(img), false) => scheduler.add_noise(img, &noise, first_timestep)?,
        _ => (&noise * scheduler.init_noise_sigma())?,
    };
    let mask_condition = preprocess_mask(mask_image, width, height, device)?;
    // Keep where the mask is below 0.5: `init_image * (mask < 0.5)`.
    let keep = mask_condition.lt(0.5)?.to_dtype(candle_core::DType::F32)?;
    let masked_image = init.broadcast_mul(&keep)?;
    let masked_image_latents = tile_batch(&vae.encode_scaled(&masked_image, generator)?, n)?.to_dtype(dtype)?;
    let mask = tile_batch(&nearest_resize(&mask_condition, lh, lw)?, n)?.to_dtype(dtype)?;
    let state =
        InpaintState { mask, masked_image_latents, image_latents: if blends { image_latents } else { None }, noise };
    Ok((latents, state))
}
