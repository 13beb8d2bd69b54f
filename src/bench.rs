//! `lcm bench`: a real architecture (SD1.5, SDXL, or SD1.5 + the AnimateDiff motion adapter
//! v1-5-2) with random weights (the same compute as real ones), written once as a diffusers folder
//! so diffusers can load the very same model (`benches/bench_diffusers.py`), then timed stage by
//! stage with warm-up and the median of several runs. Images: text encoding, one UNet step (batch
//! 1, and batch 2 as under CFG), VAE decode and the whole 4-step LCM text-to-image. AnimateDiff:
//! one UNet step over the clip, the frame-by-frame VAE decode and the whole 4-step animation.
//! With GFLOP/s from the FLOPs the ops count, the machine's FP32 matrix-multiply rate on the same
//! threads, and peak memory.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use lcm::models::unet::UNetConditioning;
use lcm::models::vae::tiny::{AutoencoderTiny, AutoencoderTinyConfig};
use lcm::models::vae::Autoencoder;
use lcm::pipelines::{conditioning, GenerateRequest, LcmPipeline, LoadOptions, PipelineKind};
use lcm::testing::{peak_rss_mb, random_var_builder, RandomModel, TAESDXL_CONFIG, TAESD_CONFIG};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The benchmark's settings.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub model: RandomModel,
    pub size: usize,
    /// AnimateDiff: frames per clip.
    pub frames: usize,
    pub steps: usize,
    pub warmup: usize,
    pub runs: usize,
    /// Precision the weights are kept in (`--dtype`).
    pub dtype: lcm::loaders::weights::WeightDType,
    /// Where it runs (`--device`); on a GPU the computation is in `dtype` too.
    pub device: Device,
}

/// One timed stage.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Stage {
    pub name: String,
    pub seconds: f64,
    pub runs: Vec<f64>,
    pub gflop: f64,
    pub gflops: f64,
    /// Of the measured FP32 matrix-multiply rate.
    pub gemm_fraction: f64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchReport {
    /// `sd15`, `sdxl` or `animatediff` (what `benches/bench_diffusers.py` builds).
    pub kind: RandomModel,
    pub model: String,
    /// The model folder (AnimateDiff: the SD1.5 folder; the adapter is in `motion_adapter/`).
    pub dir: PathBuf,
    pub size: usize,
    /// AnimateDiff: frames per clip; `null` for images.
    pub frames: Option<usize>,
    pub steps: usize,
    /// Precision of the weights (`f32`, `f16`, `bf16`).
    pub dtype: String,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// The activations' dtype: f32 on the CPU, `dtype` on a GPU.
    pub compute_dtype: String,
    pub threads: usize,
    /// The CPU kernels' instruction-set path (`avx2`, `avx512`, ...; `LCM_CPU_PATH` picks a
    /// lower one); `-` off the CPU.
    pub cpu_path: String,
    pub gemm_gflops: f64,
    pub stages: Vec<Stage>,
    pub peak_rss_mb: f64,
    pub weights_mb: f64,
}

/// Median seconds of `runs` runs after `warmup`, and the FLOPs of one run.
fn time(opts: &BenchOptions, mut f: impl FnMut() -> Result<()>) -> Result<(f64, Vec<f64>, u64)> {
    for _ in 0..opts.warmup {
        f()?;
    }
    let mut runs = Vec::new();
    let mut flops = 0;
    for _ in 0..opts.runs.max(1) {
        lcm::ops::flops::take();
        lcm::ops::profile::take();
        opts.device.synchronize()?;
        let t = Instant::now();
        f()?;
        // GPU work is queued: a stage ends when the device has finished it.
        opts.device.synchronize()?;
        runs.push(t.elapsed().as_secs_f64());
        flops = lcm::ops::flops::take();
        if lcm::ops::profile::enabled() {
            let kinds = lcm::ops::profile::take();
            let other = runs.last().unwrap() - kinds.iter().map(|k| k.1).sum::<f64>();
            let parts: Vec<String> = kinds.iter().map(|(k, s)| format!("{k} {s:.3}")).collect();
            eprintln!("  profile: {}, other {other:.3} s", parts.join(", "));
        }
    }
    let mut sorted = runs.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    Ok((sorted[sorted.len() / 2], runs, flops))
}

/// Matrix-multiply rate of this machine through the same op the models use (CPU: f32
/// activations times weights in `--dtype`).
pub fn gemm_gflops(opts: &BenchOptions) -> Result<f64> {
    // The GPU's rate in the dtype the models compute in there (f16 / bf16 tensor cores).
    let (n, dtype) = if opts.device.is_cpu() { (2048, DType::F32) } else { (8192, opts.dtype.dtype()) };
    let a = Tensor::randn(0f32, 1.0, (n, n), &opts.device)?.to_dtype(dtype)?;
    // The weight operand as the models keep theirs (CPU: bf16 weights multiply in bf16 where
    // the CPU path has bf16 products).
    let b = Tensor::randn(0f32, 1.0, (n, n), &opts.device)?.to_dtype(opts.dtype.dtype())?;
    // Always warmed up and a median of at least 5: the rate is the yardstick for every stage.
    let opts = BenchOptions { warmup: opts.warmup.max(1), runs: opts.runs.max(5), ..opts.clone() };
    let (s, _, flops) = time(&opts, || {
        lcm::ops::linear(&a, &b, None)?;
        Ok(())
    })?;
    Ok(flops as f64 / s / 1e9)
}

fn threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Size of the `*.safetensors` files in `dir`'s component folders `components`, MB.
fn safetensors_mb(dir: &Path, components: &[&str]) -> f64 {
    let mut total = 0.0;
    for c in components {
        let Ok(entries) = std::fs::read_dir(dir.join(c)) else { continue };
        for e in entries.filter_map(|e| e.ok()) {
            if e.path().extension().and_then(|x| x.to_str()) == Some("safetensors") {
                total += e.metadata().map_or(0.0, |m| m.len() as f64 / 1048576.0);
            }
        }
    }
    total
}

/// Records stages with their FLOP rates.
struct Stages {
    gemm: f64,
    list: Vec<Stage>,
}

impl Stages {
    fn add(&mut self, name: &str, r: (f64, Vec<f64>, u64)) {
        let gflop = r.2 as f64 / 1e9;
        self.list.push(Stage {
            name: name.into(),
            seconds: r.0,
            runs: r.1,
            gflop,
            gflops: gflop / r.0,
            gemm_fraction: gflop / r.0 / self.gemm,
        });
    }
}

const PROMPT: &str = "a photograph of an astronaut riding a horse";

/// Time every stage of the model in `dir` (as [`write_folder`] wrote it for `opts.model`).
pub fn run(dir: &Path, opts: &BenchOptions) -> Result<BenchReport> {
    if opts.size == 0 || !opts.size.is_multiple_of(8) {
        bail!("the size must be a positive multiple of 8, got {}", opts.size);
    }
    let gemm = gemm_gflops(opts)?;
    let mut stages = Stages { gemm, list: Vec::new() };
    let dir_str = dir.to_str().context("folder path is not UTF-8")?;
    let frames = match opts.model {
        RandomModel::Sd15 | RandomModel::Sdxl => {
            // The SD1.5 folder is a Stable Diffusion one whatever its model_index says.
            let pipeline = (opts.model == RandomModel::Sd15).then_some(PipelineKind::StableDiffusion);
            let mut pipe = LcmPipeline::load(
                dir_str,
                &LoadOptions { dtype: opts.dtype, device: opts.device.clone().into(), pipeline, ..Default::default() },
            )?;
            time_image_stages(&mut pipe, opts, &mut stages)?;
            None
        }
        RandomModel::AnimateDiff => {
            let adapter = dir.join("motion_adapter");
            let load = LoadOptions {
                motion_adapter: Some(adapter.to_str().context("folder path is not UTF-8")?.into()),
                dtype: opts.dtype,
                device: opts.device.clone().into(),
                ..Default::default()
            };
            let pipe = LcmPipeline::load(dir_str, &load)?;
            time_animation_stages(&pipe, opts, &mut stages)?;
            Some(opts.frames)
        }
    };
    let mut components = vec!["unet", "vae", "text_encoder", "text_encoder_2"];
    if opts.model == RandomModel::AnimateDiff {
        components.push("motion_adapter");
    }
    let weights_mb = safetensors_mb(dir, &components);
    Ok(BenchReport {
        kind: opts.model,
        model: opts.model.description().into(),
        dir: dir.to_path_buf(),
        size: opts.size,
        frames,
        steps: opts.steps,
        dtype: opts.dtype.to_string(),
        device: lcm::device::name(&opts.device),
        compute_dtype: format!("{:?}", opts.dtype.precision(&opts.device).compute).to_lowercase(),
        threads: threads(),
        cpu_path: if opts.device.is_cpu() { lcm::kernels::CpuPath::current().name().into() } else { "-".into() },
        gemm_gflops: gemm,
        stages: stages.list,
        peak_rss_mb: peak_rss_mb(),
        weights_mb,
    })
}

/// The whole image (or clip of `frames`) the benchmark times: the bench prompt, seed 0, no CFG.
fn bench_request(opts: &BenchOptions, frames: Option<usize>) -> GenerateRequest {
    GenerateRequest {
        prompt: PROMPT.into(),
        num_inference_steps: opts.steps,
        guidance_scale: Some(1.0),
        width: Some(opts.size),
        height: Some(opts.size),
        seed: 0,
        num_frames: frames,
        ..Default::default()
    }
}

/// SD1.5 / SDXL: text encoding (SDXL: both encoders), one UNet step at batch 1 and 2, VAE decode,
/// the whole text-to-image.
fn time_image_stages(pipe: &mut LcmPipeline, opts: &BenchOptions, stages: &mut Stages) -> Result<()> {
    let req = bench_request(opts, None);
    // Sizes that cannot fit in memory are refused before any stage allocates.
    pipe.plan(&req)?;
    let c = &pipe.components;
    let (dev, dt) = (c.device().clone(), c.compute_dtype());
    let size = (opts.size, opts.size);
    let lat = opts.size / pipe.vae_scale_factor();
    stages.add(
        "text encoding",
        time(opts, || {
            conditioning::encode_text(c, PROMPT, None, false, 1, size, &dev)?;
            Ok(())
        })?,
    );
    let text1 = conditioning::encode_text(c, PROMPT, None, false, 1, size, &dev)?;
    // Batch 2 as under CFG: [negative, prompt] with their SDXL pooled embeddings and ids.
    let text2 = conditioning::encode_text(c, PROMPT, None, true, 1, size, &dev)?;
    let x1 = Tensor::randn(0f32, 1.0, (1, c.vae.latent_channels(), lat, lat), &dev)?.to_dtype(dt)?;
    let x2 = Tensor::cat(&[&x1, &x1], 0)?;
    let cond1 = UNetConditioning { added_cond: text1.added_cond.clone(), ..Default::default() };
    let cond2 = UNetConditioning { added_cond: text2.added_cond.clone(), ..Default::default() };
    stages.add(
        "UNet step, batch 1",
        time(opts, || {
            c.unet.forward(&x1, 999.0, &text1.prompt_embeds, &cond1)?;
            Ok(())
        })?,
    );
    stages.add(
        "UNet step, batch 2 (CFG)",
        time(opts, || {
            c.unet.forward(&x2, 999.0, &text2.prompt_embeds, &cond2)?;
            Ok(())
        })?,
    );
    stages.add(
        "VAE decode",
        time(opts, || {
            c.vae.decode(&x1)?;
            Ok(())
        })?,
    );
    // The tiny autoencoder `--vae madebyollin/taesd(xl)` / `--preview` decode with (real config,
    // random weights: the speed does not depend on them).
    let tiny_config = if opts.model == RandomModel::Sdxl { TAESDXL_CONFIG } else { TAESD_CONFIG };
    let tiny = AutoencoderTiny::new(
        random_var_builder(5, dt, &dev),
        &serde_json::from_str::<AutoencoderTinyConfig>(tiny_config)?,
    )?;
    stages.add(
        "tiny VAE decode (TAESD)",
        time(opts, || {
            tiny.decode(&x1)?;
            Ok(())
        })?,
    );
    stages.add(
        &format!("text-to-image, {} LCM steps", opts.steps),
        time(opts, || {
            pipe.generate(&req, |_, _| {})?;
            Ok(())
        })?,
    );
    // The fast mode's whole image: the same with the tiny autoencoder (`--vae madebyollin/taesd`).
    pipe.components.vae = Autoencoder::Tiny(tiny);
    stages.add(
        &format!("text-to-image, {} LCM steps, tiny VAE", opts.steps),
        time(opts, || {
            pipe.generate(&req, |_, _| {})?;
            Ok(())
        })?,
    );
    Ok(())
}

/// AnimateDiff: one UNet step over the whole clip, the frame-by-frame VAE decode, the whole
/// animation (guidance 1: no CFG, as with LCM-LoRA).
fn time_animation_stages(pipe: &LcmPipeline, opts: &BenchOptions, stages: &mut Stages) -> Result<()> {
    let c = &pipe.components;
    let (dev, dt) = (c.device().clone(), c.compute_dtype());
    let f = opts.frames;
    if f == 0 {
        bail!("--frames must be at least 1");
    }
    let req = bench_request(opts, Some(f));
    pipe.plan(&req)?;
    let lat = opts.size / pipe.vae_scale_factor();
    let text = conditioning::encode_text(c, PROMPT, None, false, 1, (opts.size, opts.size), &dev)?;
    let ehs = lcm::ops::repeat_interleave(&text.prompt_embeds, f)?;
    let x = Tensor::randn(0f32, 1.0, (1, c.vae.latent_channels(), f, lat, lat), &dev)?.to_dtype(dt)?;
    let cond = UNetConditioning { num_frames: Some(f), ..Default::default() };
    stages.add(
        &format!("UNet step, {f} frames"),
        time(opts, || {
            c.unet.forward_frames(&x, 999.0, &ehs, &cond)?;
            Ok(())
        })?,
    );
    stages.add(
        &format!("VAE decode, {f} frames one by one"),
        time(opts, || {
            for k in 0..f {
                c.vae.decode(&x.narrow(2, k, 1)?.squeeze(2)?)?;
            }
            Ok(())
        })?,
    );
    stages.add(
        &format!("animation, {f} frames, {} LCM steps", opts.steps),
        time(opts, || {
            pipe.animate(&req, |_, _| {})?;
            Ok(())
        })?,
    );
    Ok(())
}

impl BenchReport {
    /// A table for people.
    pub fn table(&self) -> String {
        let frames = self.frames.map_or(String::new(), |f| format!(", {f} frames"));
        let mut s = format!(
            "{} at {}x{}{frames} on {}, {} weights ({} compute), {} threads, CPU path {}; GEMM ({} weights) {:.1} GFLOP/s\n{:<40} {:>9} {:>9} {:>9} {:>8}\n",
            self.model, self.size, self.size, self.device, self.dtype, self.compute_dtype, self.threads, self.cpu_path, self.dtype, self.gemm_gflops, "stage", "seconds", "GFLOP", "GFLOP/s", "% GEMM"
        );
        for st in &self.stages {
            s.push_str(&format!(
                "{:<40} {:>9.3} {:>9.1} {:>9.1} {:>7.0}%\n",
                st.name,
                st.seconds,
                st.gflop,
                st.gflops,
                100.0 * st.gemm_fraction
            ));
        }
        s.push_str(&format!("peak RSS {:.0} MB (weights on disk {:.0} MB)\n", self.peak_rss_mb, self.weights_mb));
        s
    }
}
