//! diffusers' `LCMScheduler`: multi-step latent consistency sampling.
//!
//! The arithmetic is done element by element in f32, in the same order as PyTorch evaluates
//! diffusers' tensor expressions, so results agree with diffusers to the last bit or two.

use crate::random::TorchGenerator;
use anyhow::{bail, Result};
use candle_core::Tensor;
use serde::Deserialize;

fn d_num_train_timesteps() -> usize {
    1000
}
fn d_beta_start() -> f64 {
    0.00085
}
fn d_beta_end() -> f64 {
    0.012
}
fn d_original_inference_steps() -> usize {
    50
}
fn d_one() -> f64 {
    1.0
}
fn d_true() -> bool {
    true
}
fn d_dynamic_thresholding_ratio() -> f64 {
    0.995
}
fn d_timestep_spacing() -> String {
    "leading".into()
}
fn d_timestep_scaling() -> f64 {
    10.0
}

/// `LCMScheduler`'s config. Like `LCMScheduler.from_config(other_scheduler.config)`, it reads
/// any diffusers scheduler config: keys it does not know are ignored, missing ones take
/// `LCMScheduler`'s defaults.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct LcmSchedulerConfig {
    #[serde(default = "d_num_train_timesteps")]
    pub num_train_timesteps: usize,
    #[serde(default = "d_beta_start")]
    pub beta_start: f64,
    #[serde(default = "d_beta_end")]
    pub beta_end: f64,
    #[serde(default)]
    pub beta_schedule: BetaSchedule,
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    #[serde(default = "d_original_inference_steps")]
    pub original_inference_steps: usize,
    #[serde(default)]
    pub clip_sample: bool,
    #[serde(default = "d_one")]
    pub clip_sample_range: f64,
    #[serde(default = "d_true")]
    pub set_alpha_to_one: bool,
    #[serde(default)]
    pub steps_offset: usize,
    #[serde(default)]
    pub prediction_type: PredictionType,
    #[serde(default)]
    pub thresholding: bool,
    #[serde(default = "d_dynamic_thresholding_ratio")]
    pub dynamic_thresholding_ratio: f64,
    #[serde(default = "d_one")]
    pub sample_max_value: f64,
    #[serde(default = "d_timestep_spacing")]
    pub timestep_spacing: String,
    #[serde(default = "d_timestep_scaling")]
    pub timestep_scaling: f64,
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
}

impl Default for LcmSchedulerConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("all fields have defaults")
    }
}

/// What the UNet predicts (`prediction_type`).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
pub enum PredictionType {
    #[default]
    #[serde(rename = "epsilon")]
    Epsilon,
    #[serde(rename = "v_prediction")]
    VPrediction,
    #[serde(rename = "sample")]
    Sample,
}

/// How the betas run over the training timesteps (`beta_schedule`; `trained_betas` overrides it).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
pub enum BetaSchedule {
    #[serde(rename = "linear")]
    Linear,
    #[default]
    #[serde(rename = "scaled_linear")]
    ScaledLinear,
    /// Glide's cosine schedule.
    #[serde(rename = "squaredcos_cap_v2")]
    SquaredcosCapV2,
}

impl std::str::FromStr for BetaSchedule {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        serde_json::from_value(serde_json::Value::String(s.to_string()))
            .map_err(|_| format!("unknown beta schedule `{s}`: linear, scaled_linear or squaredcos_cap_v2"))
    }
}

/// What the pipeline asks of `set_timesteps` (diffusers' keyword arguments).
#[derive(Clone, Debug, Default)]
pub struct TimestepRequest {
    pub num_inference_steps: Option<usize>,
    pub original_inference_steps: Option<usize>,
    pub timesteps: Option<Vec<i64>>,
    /// 1.0 for text-to-image.
    pub strength: Option<f64>,
}

#[derive(Clone, Debug)]
pub struct LcmScheduler {
    pub config: LcmSchedulerConfig,
    prediction: PredictionType,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    timesteps: Vec<i64>,
    num_inference_steps: usize,
    step_index: Option<usize>,
    begin_index: Option<usize>,
}

/// `torch.linspace(start, end, steps, dtype=torch.float32)` (CPU kernel arithmetic).
fn linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps).map(|i| if i < half { start + step * i as f32 } else { end - step * (steps - i - 1) as f32 }).collect()
}

/// `betas_for_alpha_bar(n)` with the cosine transform ("squaredcos_cap_v2"), in f64 like Python.
fn betas_for_alpha_bar(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2);
    (0..n)
        .map(|i| {
            let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// `torch.cumprod` on float32 (PyTorch accumulates in double on CPU).
fn cumprod(v: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    v.iter()
        .map(|&x| {
            acc *= x as f64;
            acc as f32
        })
        .collect()
}

/// diffusers' `rescale_zero_terminal_snr` (arXiv 2305.08891, algorithm 1).
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let mut sqrt: Vec<f32> = cumprod(&alphas).iter().map(|a| a.sqrt()).collect();
    let (first, last) = (sqrt[0], sqrt[sqrt.len() - 1]);
    let scale = first / (first - last);
    for s in sqrt.iter_mut() {
        *s -= last;
        *s *= scale;
    }
    let bar: Vec<f32> = sqrt.iter().map(|s| s * s).collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(1.0 - bar[0]);
    for i in 1..bar.len() {
        out.push(1.0 - bar[i] / bar[i - 1]);
    }
    out
}

impl LcmScheduler {
    pub fn new(config: LcmSchedulerConfig) -> Result<Self> {
        let n = config.num_train_timesteps;
        if n == 0 {
            bail!("scheduler config: num_train_timesteps must be positive");
        }
        let prediction = config.prediction_type;
        let mut betas = match (&config.trained_betas, config.beta_schedule) {
            (Some(b), _) => b.iter().map(|&x| x as f32).collect(),
            (None, BetaSchedule::Linear) => linspace_f32(config.beta_start, config.beta_end, n),
            (None, BetaSchedule::ScaledLinear) => {
                linspace_f32(config.beta_start.sqrt(), config.beta_end.sqrt(), n).iter().map(|b| b * b).collect()
            }
            (None, BetaSchedule::SquaredcosCapV2) => betas_for_alpha_bar(n),
        };
        if betas.len() != n {
            bail!("scheduler config: trained_betas has {} values, expected {n}", betas.len());
        }
        if config.rescale_betas_zero_snr {
            betas = rescale_zero_terminal_snr(&betas);
        }
        let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
        let alphas_cumprod = cumprod(&alphas);
        let final_alpha_cumprod = if config.set_alpha_to_one { 1.0 } else { alphas_cumprod[0] };
        Ok(Self {
            config,
            prediction,
            alphas_cumprod,
            final_alpha_cumprod,
            timesteps: (0..n as i64).rev().collect(),
            num_inference_steps: 0,
            step_index: None,
            begin_index: None,
        })
    }

    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    pub fn timesteps(&self) -> &[i64] {
        &self.timesteps
    }

    pub fn num_inference_steps(&self) -> usize {
        self.num_inference_steps
    }

    /// The initial noise scale (`init_noise_sigma`): always 1 for LCM.
    pub fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    /// `set_begin_index` (image-to-image pipelines start part way into the schedule).
    pub fn set_begin_index(&mut self, index: usize) {
        self.begin_index = Some(index);
    }

    /// diffusers' `set_timesteps(num_inference_steps, original_inference_steps=, timesteps=, strength=)`.
    pub fn set_timesteps(&mut self, req: &TimestepRequest) -> Result<()> {
        let n_train = self.config.num_train_timesteps;
        let strength = req.strength.unwrap_or(1.0);
        if !(strength > 0.0 && strength <= 1.0) {
            bail!("strength must be in (0, 1], got {strength}");
        }
        let original_steps = req.original_inference_steps.unwrap_or(self.config.original_inference_steps);
        if original_steps == 0 {
            bail!("original_inference_steps must be positive");
        }
        if original_steps > n_train {
            bail!(
                "original_inference_steps {original_steps} cannot be larger than the scheduler's num_train_timesteps {n_train}"
            );
        }
        let k = (n_train / original_steps) as i64;
        let origin_len = (original_steps as f64 * strength) as i64;
        let origin: Vec<i64> = (1..=origin_len).map(|i| i * k - 1).collect();
        let timesteps = match (&req.timesteps, req.num_inference_steps) {
            (None, None) => bail!("pass either a number of inference steps or custom timesteps"),
            (Some(_), Some(_)) => bail!("pass only one of a number of inference steps and custom timesteps"),
            (Some(custom), None) => {
                if custom.is_empty() {
                    bail!("custom timesteps must not be empty");
                }
                if custom.windows(2).any(|w| w[1] >= w[0]) {
                    bail!("custom timesteps must be in descending order");
                }
                if custom[0] >= n_train as i64 || *custom.last().unwrap() < 0 {
                    bail!("custom timesteps must lie in [0, {})", n_train);
                }
                self.num_inference_steps = custom.len();
                let init = ((custom.len() as f64 * strength) as usize).min(custom.len());
                let t_start = custom.len().saturating_sub(init);
                custom[t_start..].to_vec()
            }
            (None, Some(n)) => {
                if n == 0 {
                    bail!("the number of inference steps must be at least 1");
                }
                if n > n_train {
                    bail!("{n} inference steps cannot be more than the scheduler's num_train_timesteps {n_train}");
                }
                if (origin.len() / n) < 1 {
                    bail!(
                        "original_inference_steps x strength ({original_steps} x {strength}) is smaller than the {n} inference steps; use fewer steps or a higher strength"
                    );
                }
                if n > original_steps {
                    bail!("{n} inference steps cannot be more than original_inference_steps {original_steps}");
                }
                self.num_inference_steps = n;
                let reversed: Vec<i64> = origin.iter().rev().copied().collect();
                let step = reversed.len() as f64 / n as f64;
                (0..n).map(|i| reversed[(i as f64 * step).floor() as usize]).collect()
            }
        };
        self.timesteps = timesteps;
        self.step_index = None;
        self.begin_index = None;
        Ok(())
    }

    fn index_for_timestep(&self, t: i64) -> Result<usize> {
        let hits: Vec<usize> = self.timesteps.iter().enumerate().filter(|(_, &v)| v == t).map(|(i, _)| i).collect();
        match hits.len() {
            0 => bail!("timestep {t} is not in the scheduler's schedule"),
            1 => Ok(hits[0]),
            _ => Ok(hits[1]),
        }
    }

    /// `c_skip`, `c_out` of the consistency boundary condition (`timestep` in f32 as PyTorch).
    pub fn boundary_condition_scalings(&self, timestep: i64) -> (f32, f32) {
        let sigma_data2 = 0.5f32 * 0.5f32;
        let scaled = timestep as f32 * self.config.timestep_scaling as f32;
        let s2 = scaled * scaled;
        (sigma_data2 / (s2 + sigma_data2), scaled / (s2 + sigma_data2).sqrt())
    }

    /// One LCM step: returns `(prev_sample, denoised)`. Draws fresh noise from `generator`
    /// except at the last step, as diffusers does.
    pub fn step(
        &mut self,
        model_output: &Tensor,
        timestep: i64,
        sample: &Tensor,
        generator: &mut TorchGenerator,
    ) -> Result<(Tensor, Tensor)> {
        if self.num_inference_steps == 0 {
            bail!("set_timesteps must be called before step");
        }
        let step_index = match (self.step_index, self.begin_index) {
            (Some(i), _) => i,
            (None, Some(b)) => b,
            (None, None) => self.index_for_timestep(timestep)?,
        };
        let prev_t = self.timesteps.get(step_index + 1).copied().unwrap_or(timestep);
        let cumprod_at = |t: i64| -> Result<f32> {
            self.alphas_cumprod
                .get(t as usize)
                .copied()
                .ok_or_else(|| anyhow::anyhow!("timestep {t} is outside the scheduler's range"))
        };
        let alpha_t = cumprod_at(timestep)?;
        let alpha_prev = if prev_t >= 0 { cumprod_at(prev_t)? } else { self.final_alpha_cumprod };
        let (beta_t, beta_prev) = (1.0 - alpha_t, 1.0 - alpha_prev);
        let (c_skip, c_out) = self.boundary_condition_scalings(timestep);

        let shape = sample.shape().clone();
        let x: Vec<f32> = sample.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1()?;
        let m: Vec<f32> = model_output.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1()?;
        if x.len() != m.len() {
            bail!("model output shape {:?} does not match sample shape {:?}", model_output.shape(), shape);
        }
        let (sa, sb) = (alpha_t.sqrt(), beta_t.sqrt());
        let mut x0: Vec<f32> = match self.prediction {
            PredictionType::Epsilon => x.iter().zip(&m).map(|(x, m)| (x - sb * m) / sa).collect(),
            PredictionType::Sample => m.clone(),
            PredictionType::VPrediction => x.iter().zip(&m).map(|(x, m)| sa * x - sb * m).collect(),
        };
        if self.config.thresholding {
            self.threshold(&mut x0, shape.dims()[0]);
        } else if self.config.clip_sample {
            let r = self.config.clip_sample_range as f32;
            x0.iter_mut().for_each(|v| *v = v.clamp(-r, r));
        }
        let denoised: Vec<f32> = x0.iter().zip(&x).map(|(p, x)| c_out * p + c_skip * x).collect();
        let prev: Vec<f32> = if step_index + 1 != self.num_inference_steps {
            // `randn_tensor(..., dtype=denoised.dtype)`: f16 / bf16 draw differently.
            let noise = generator.randn_as(denoised.len(), sample.dtype());
            let (pa, pb) = (alpha_prev.sqrt(), beta_prev.sqrt());
            denoised.iter().zip(&noise).map(|(d, n)| pa * d + pb * n).collect()
        } else {
            denoised.clone()
        };
        self.step_index = Some(step_index + 1);
        let dev = sample.device();
        Ok((
            Tensor::from_vec(prev, shape.clone(), dev)?.to_dtype(sample.dtype())?,
            Tensor::from_vec(denoised, shape, dev)?.to_dtype(sample.dtype())?,
        ))
    }

    /// Dynamic thresholding (Imagen): per sample, clamp to the `ratio` quantile of |x0|.
    fn threshold(&self, x0: &mut [f32], batch: usize) {
        let per = x0.len() / batch.max(1);
        for chunk in x0.chunks_mut(per) {
            let mut abs: Vec<f32> = chunk.iter().map(|v| v.abs()).collect();
            abs.sort_by(|a, b| a.total_cmp(b));
            let pos = self.config.dynamic_thresholding_ratio * (abs.len() - 1) as f64;
            let (lo, frac) = (pos.floor() as usize, (pos - pos.floor()) as f32);
            let hi = (lo + 1).min(abs.len() - 1);
            let q = abs[lo] + (abs[hi] - abs[lo]) * frac;
            let s = q.clamp(1.0, self.config.sample_max_value as f32);
            chunk.iter_mut().for_each(|v| *v = v.clamp(-s, s) / s);
        }
    }

    /// Forward diffusion `sqrt(a_t) x0 + sqrt(1 - a_t) noise` (image-to-image start latents).
    pub fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: i64) -> Result<Tensor> {
        let a = *self
            .alphas_cumprod
            .get(timestep as usize)
            .ok_or_else(|| anyhow::anyhow!("timestep {timestep} is outside the scheduler's range"))?;
        let (sa, sb) = (a.sqrt(), (1.0 - a).sqrt());
        let f32s = |t: &Tensor| t.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>();
        let (x, n) = (f32s(original)?, f32s(noise)?);
        let out: Vec<f32> = x.iter().zip(&n).map(|(x, n)| sa * x + sb * n).collect();
        Ok(Tensor::from_vec(out, original.shape().clone(), original.device())?.to_dtype(original.dtype())?)
    }
}
