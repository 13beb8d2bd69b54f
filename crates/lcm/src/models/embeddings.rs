//! Timestep embeddings (diffusers `embeddings.py`: `Timesteps`, `TimestepEmbedding`).

use crate::nn::{Activation, Linear};
use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;

/// Sinusoidal projection of (possibly fractional) timesteps, diffusers `get_timestep_embedding`.
#[derive(Clone, Debug)]
pub struct Timesteps {
    pub num_channels: usize,
    pub flip_sin_to_cos: bool,
    pub downscale_freq_shift: f64,
    pub scale: f64,
    pub max_period: f64,
}

impl Timesteps {
    pub fn new(num_channels: usize, flip_sin_to_cos: bool, downscale_freq_shift: f64) -> Self {
        Self { num_channels, flip_sin_to_cos, downscale_freq_shift, scale: 1.0, max_period: 10000.0 }
    }

    /// `timesteps`: 1-D, any dtype. Returns `[n, num_channels]` f32.
    pub fn forward(&self, timesteps: &Tensor) -> Result<Tensor> {
        if timesteps.rank() != 1 {
            candle_core::bail!("Timesteps expects a 1-D tensor, got shape {:?}", timesteps.dims())
        }
        // Computed on the host in f32 in the same order as diffusers (torch float32 ops), so the
        // large arguments (t up to 999) round the same way; the tensor is tiny.
        let ts = timesteps.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let half = self.num_channels / 2;
        let denom = (half as f64 - self.downscale_freq_shift) as f32;
        let neg_log = -(self.max_period.ln()) as f32;
        let freqs: Vec<f32> = (0..half).map(|i| ((neg_log * i as f32) / denom).exp()).collect();
        let scale = self.scale as f32;
        let mut out = Vec::with_capacity(ts.len() * self.num_channels);
        for &t in &ts {
            let args = freqs.iter().map(|&f| scale * (t * f));
            let (sin, cos): (Vec<f32>, Vec<f32>) = args.map(|a| (a.sin(), a.cos())).unzip();
            if self.flip_sin_to_cos {
                out.extend_from_slice(&cos);
                out.extend_from_slice(&sin);
            } else {
                out.extend_from_slice(&sin);
                out.extend_from_slice(&cos);
            }
            if self.num_channels % 2 == 1 {
                out.push(0.0);
            }
        }
        Tensor::from_vec(out, (ts.len(), self.num_channels), timesteps.device())
    }
}

/// `linear_1 -> act -> linear_2 (-> post_act)`, with the optional `cond_proj` that LCM uses to add
/// the guidance-scale embedding (`timestep_cond`) to the projected timesteps.
#[derive(Clone, Debug)]
pub struct TimestepEmbedding {
    pub linear_1: Linear,
    pub act: Activation,
    pub linear_2: Linear,
    pub cond_proj: Option<Linear>,
    pub post_act: Option<Activation>,
}

impl TimestepEmbedding {
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        time_embed_dim: usize,
        act_fn: &str,
        out_dim: Option<usize>,
        post_act_fn: Option<&str>,
        cond_proj_dim: Option<usize>,
    ) -> Result<Self> {
        let linear_1 = Linear::new(vb.pp("linear_1"), in_channels, time_embed_dim, true)?;
        let cond_proj = match cond_proj_dim {
            Some(d) => Some(Linear::new(vb.pp("cond_proj"), d, in_channels, false)?),
            None => None,
        };
        let linear_2 = Linear::new(vb.pp("linear_2"), time_embed_dim, out_dim.unwrap_or(time_embed_dim), true)?;
        Ok(Self {
            linear_1,
            act: Activation::from_name(act_fn)?,
            linear_2,
            cond_proj,
            post_act: post_act_fn.map(Activation::from_name).transpose()?,
        })
    }

    pub fn forward(&self, sample: &Tensor, condition: Option<&Tensor>) -> Result<Tensor> {
        let sample = match (condition, &self.cond_proj) {
            (Some(c), Some(p)) => (sample + p.forward(c)?)?,
            (Some(_), None) => candle_core::bail!(
                "a timestep condition was given but this model has no `time_embedding.cond_proj` \
                 (config `time_cond_proj_dim` is null)"
            ),
            (None, _) => sample.clone(),
        };
        let x = self.act.forward(&self.linear_1.forward(&sample)?)?;
        let x = self.linear_2.forward(&x)?;
        match &self.post_act {
            Some(a) => a.forward(&x),
            None => Ok(x),
        }
    }
}
