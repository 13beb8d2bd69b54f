//! Text and guidance conditioning: prompt embeddings, classifier-free-guidance pairs and the
//! guidance-scale embedding of LCM-distilled UNets.

use crate::models::clip_text_model::ClipTextModel;
use crate::models::clip_tokenizer::ClipTokenizer;
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

/// Repeat each row `n` times in place (`repeat(1, n, 1).view(b * n, ...)` in diffusers), so
/// the images of one prompt sit next to each other.
pub fn repeat_rows(x: &Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(x.clone());
    }
    let rows: Vec<Tensor> = (0..x.dim(0)?)
        .flat_map(|i| std::iter::repeat_n(i, n))
        .map(|i| x.narrow(0, i, 1))
        .collect::<candle_core::Result<_>>()?;
    Ok(Tensor::cat(&rows, 0)?)
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
