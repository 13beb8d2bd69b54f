//! Text and guidance conditioning: prompt embeddings, classifier-free-guidance pairs and the
//! guidance-scale embedding of LCM-distilled UNets.

use crate::models::clip_text_model::ClipTextModel;
use crate::models::clip_tokenizer::ClipTokenizer;
use crate::models::unet::AddedCond;
use crate::ops::repeat_interleave;
use crate::pipelines::StableDiffusionComponents;
use anyhow::Result;
use candle_core::{Device, Tensor};

/// Encode prompts into CLIP's last hidden state, `[prompts.len(), 77, hidden]`, tokenized as
/// diffusers' `encode_prompt` does (pad to max length, truncate).
pub fn encode_prompts(
    tokenizer: &ClipTokenizer,
    text_encoder: &ClipTextModel,
    prompts: &[&str],
    device: &Device,
) -> Result<Tensor> {
    let mut ids = Vec::new();
    for p in prompts {
        ids.extend(tokenizer.encode_padded(p)?);
    }
    let len = ids.len() / prompts.len().max(1);
    let ids = Tensor::from_vec(ids, (prompts.len(), len), device)?;
    Ok(text_encoder.forward(&ids)?.last_hidden_state)
}

/// diffusers' `get_guidance_scale_embedding(w, embedding_dim)`: sinusoidal features of
/// `w * 1000`, computed in f32 as PyTorch does.
pub fn guidance_scale_embedding(w: &[f32], dim: usize, device: &Device) -> Result<Tensor> {
    let half = dim / 2;
    let base = 10000f32.ln() / (half as f32 - 1.0);
    let freqs: Vec<f32> = (0..half).map(|i| (i as f32 * -base).exp()).collect();
    let mut out = Vec::with_capacity(w.len() * dim);
    for &wi in w {
        let wi = wi * 1000.0;
        let args: Vec<f32> = freqs.iter().map(|f| wi * f).collect();
        out.extend(args.iter().map(|a| a.sin()));
        out.extend(args.iter().map(|a| a.cos()));
        if dim % 2 == 1 {
            out.push(0.0);
        }
    }
    Ok(Tensor::from_vec(out, (w.len(), dim), device)?)
}

/// What the UNet is conditioned on, batched as the denoising loop runs it
/// (`[negative x n, prompt x n]` with classifier-free guidance, else `[prompt x n]`).
pub struct TextConditioning {
    pub prompt_embeds: Tensor,
    /// SDXL's pooled text embeddings and size/crop ids.
    pub added_cond: Option<AddedCond>,
}

/// diffusers' `encode_prompt` for SD (one CLIP, last hidden state) and SDXL (two CLIPs'
/// penultimate hidden states concatenated, pooled projection of the second, `add_time_ids`).
pub fn encode_text(
    c: &StableDiffusionComponents,
    prompt: &str,
    negative: Option<&str>,
    cfg: bool,
    n: usize,
    (height, width): (usize, usize),
    device: &Device,
) -> Result<TextConditioning> {
    let batch = |neg: Option<Tensor>, pos: &Tensor| -> Result<Tensor> {
        // diffusers' `repeat(1, n, 1).view(b * n, ...)`: the images of one prompt sit together.
        let pos = repeat_interleave(pos, n)?;
        Ok(match neg {
            Some(neg) => Tensor::cat(&[repeat_interleave(&neg, n)?, pos], 0)?,
            None => pos,
        })
    };
    let Some(second) = &c.text_encoder_2 else {
        let texts: Vec<&str> = if cfg { vec![negative.unwrap_or(""), prompt] } else { vec![prompt] };
        let embeds = encode_prompts(&c.tokenizer, &c.text_encoder, &texts, device)?;
        let pos = embeds.narrow(0, embeds.dim(0)? - 1, 1)?;
        let neg = if cfg { Some(embeds.narrow(0, 0, 1)?) } else { None };
        return Ok(TextConditioning { prompt_embeds: batch(neg, &pos)?, added_cond: None });
    };
    let sdxl = |text: &str| -> Result<(Tensor, Tensor)> {
        let ids1 = Tensor::new(c.tokenizer.encode_padded(text)?, device)?.unsqueeze(0)?;
        let h1 = c.text_encoder.forward(&ids1)?.penultimate_hidden_state;
        let ids2 = Tensor::new(second.tokenizer.encode_padded(text)?, device)?.unsqueeze(0)?;
        let out2 = second.model.forward(&ids2)?;
        Ok((Tensor::cat(&[h1, out2.penultimate_hidden_state], 2)?, out2.text_embeds))
    };
    let (pos, pos_pooled) = sdxl(prompt)?;
    let (neg, neg_pooled) = if !cfg {
        (None, None)
    } else if negative.is_none() && c.force_zeros_for_empty_prompt {
        (Some(pos.zeros_like()?), Some(pos_pooled.zeros_like()?))
    } else {
        let (e, p) = sdxl(negative.unwrap_or(""))?;
        (Some(e), Some(p))
    };
    // [original_size, crops_coords_top_left, target_size]; diffusers' defaults.
    let ids = [height, width, 0, 0, height, width].map(|v| v as f32);
    let rows = if cfg { 2 * n } else { n };
    let time_ids = Tensor::new(&ids, device)?.unsqueeze(0)?.repeat((rows, 1))?;
    Ok(TextConditioning {
        prompt_embeds: batch(neg, &pos)?,
        added_cond: Some(AddedCond { text_embeds: batch(neg_pooled, &pos_pooled)?, time_ids }),
    })
}
