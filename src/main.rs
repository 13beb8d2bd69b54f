//! `lcm`: the command-line front end over the `lcm` library.

mod bench;

use anyhow::{bail, Context, Result};

/// Freed large tensors are reused instead of page-faulted in again (see `lcm::alloc`).
#[global_allocator]
static ALLOC: lcm::alloc::CachingAllocator = lcm::alloc::CachingAllocator;

use clap::{Parser, Subcommand, ValueEnum};
use lcm::image_io::{check_outputs, numbered_paths, write_gif, write_image};
use lcm::image_processor::Image8;
use lcm::loaders::model_index::resolve_component;
use lcm::models::vae::Autoencoder;
use lcm::pipelines::components::load_vae;
use lcm::pipelines::WeightDType;
use lcm::pipelines::{
    AdapterInput, ControlNetInput, GenerateRequest, LcmPipeline, LoadOptions, LoraSpec, PipelineKind, Step,
};
use lcm::schedulers::BetaSchedule;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "lcm", version, about = "Latent Consistency Model image generation, seed-for-seed equal to diffusers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum PipelineArg {
    /// Follow the model's model_index.json.
    Auto,
    /// diffusers' LatentConsistencyModelPipeline (no classifier-free guidance).
    Lcm,
    /// diffusers' StableDiffusionPipeline with LCMScheduler (CFG when guidance > 1).
    Sd,
    /// diffusers' StableDiffusionXLPipeline with LCMScheduler.
    Sdxl,
}

/// Which model to load and what to fuse into it (shared by `generate` and `animate`).
#[derive(clap::Args)]
struct ModelArgs {
    /// Diffusers folder, Hugging Face hub repo id, or single-file checkpoint (.safetensors in
    /// the original SD / SDXL layout); an existing path is always a path.
    #[arg(long, default_value = "SimianLuo/LCM_Dreamshaper_v7")]
    model: String,
    /// Weight variant, e.g. fp16 picks *.fp16.safetensors.
    #[arg(long)]
    variant: Option<String>,
    /// Precision the weights are kept in: f32, f16, bf16 or int8 (any stored files are
    /// converted). On the CPU activations stay f32: f16 / bf16 halve the weights' memory, bf16
    /// multiplies in bf16 where the CPU has AVX512-BF16; int8 (CPU only) quantizes the UNet's
    /// layers to 8 bits per output channel (the fast mode, with --vae a tiny autoencoder). On a
    /// GPU everything runs in this dtype, as diffusers' torch_dtype. Default: f32 on the CPU,
    /// f16 on a GPU.
    #[arg(long)]
    dtype: Option<WeightDType>,
    /// Where to run: cpu, cuda or cuda:N (needs a build with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Replace the model's UNet (folder or hub id), e.g. an LCM-distilled UNet.
    #[arg(long)]
    unet: Option<String>,
    /// LoRA to fuse in: a .safetensors file, a folder or a hub repo id, with an optional
    /// weight (SOURCE@0.8); repeat for several, like diffusers' set_adapters.
    #[arg(long = "lora", value_name = "SOURCE[@WEIGHT]")]
    loras: Vec<String>,
    /// Replace the autoencoder (folder or hub id), like diffusers' `vae=`: an AutoencoderKL
    /// (e.g. madebyollin/sdxl-vae-fp16-fix) or an AutoencoderTiny (madebyollin/taesd, taesdxl).
    #[arg(long)]
    vae: Option<String>,
}

/// Prompt, schedule and seed (shared by `generate` and `animate`).
#[derive(clap::Args)]
struct SamplingArgs {
    #[arg(long)]
    prompt: String,
    #[arg(long)]
    negative_prompt: Option<String>,
    #[arg(long, default_value_t = 4)]
    steps: usize,
    /// Default: the pipeline's (8.5 LatentConsistencyModelPipeline, 7.5 StableDiffusion and
    /// AnimateDiff, 5.0 SDXL).
    #[arg(long)]
    guidance_scale: Option<f64>,
    /// Default: the UNet's sample_size times the VAE scale factor (image-to-image: the input
    /// image's size; ControlNet: the control image's).
    #[arg(long)]
    width: Option<usize>,
    #[arg(long)]
    height: Option<usize>,
    /// Same as `generator=torch.manual_seed(SEED)`; random when not given.
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long)]
    original_inference_steps: Option<usize>,
    /// Custom descending timesteps, e.g. 999,759,499,259 (instead of --steps).
    #[arg(long, value_delimiter = ',')]
    timesteps: Option<Vec<i64>>,
    /// Replace existing output files.
    #[arg(long)]
    overwrite: bool,
}

// Parsed once per process: the size difference between subcommands does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Text-to-image, image-to-image and inpainting, with LoRAs, ControlNets and T2I-Adapters.
    Generate(GenerateArgs),
    /// Fetch a model (pipeline repo, LoRA, VAE, ControlNet, ...) from the Hugging Face hub into
    /// the standard cache ahead of time, as diffusers' from_pretrained would.
    Download(DownloadArgs),
    /// Text-to-video with an AnimateDiff motion adapter (AnimateDiffPipeline + LCMScheduler).
    Animate(AnimateArgs),
    /// Benchmark: a real architecture (SD1.5, SDXL, AnimateDiff) with random weights, stage by
    /// stage (see BENCHMARKS.md; benches/bench_diffusers.py times diffusers on the same folder).
    Bench(BenchArgs),
    /// Canny edge map of an image, as OpenCV's cv2.Canny(image, low, high) in diffusers' guide.
    Canny(CannyArgs),
    /// A resident HTTP service: the native job API, AUTOMATIC1111's /sdapi/v1 and OpenAI's
    /// Images API on one queue (see README).
    Serve(ServeArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// [NAME=]SOURCE: a diffusers folder, hub repo id or single file, loaded at start; requests
    /// name it by NAME (default: the folder, file stem or repo name). The first is the default.
    #[arg(long = "model", value_name = "[NAME=]SOURCE", required = true)]
    models: Vec<String>,
    /// LoRAs: every .safetensors file of this folder, named by file stem.
    #[arg(long, value_name = "DIR")]
    lora_dir: Option<PathBuf>,
    /// [NAME=]SOURCE of a ControlNet requests may use; repeat for several.
    #[arg(long = "controlnet", value_name = "[NAME=]SOURCE")]
    controlnets: Vec<String>,
    /// [NAME=]SOURCE of a T2I-Adapter requests may use; repeat for several.
    #[arg(long = "adapter", value_name = "[NAME=]SOURCE")]
    adapters: Vec<String>,
    /// [NAME=]SOURCE of an AnimateDiff motion adapter: served as one more model over the first
    /// --model, for requests with frames.
    #[arg(long, value_name = "[NAME=]SOURCE")]
    motion_adapter: Option<String>,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 7860)]
    port: u16,
    /// Required for a --host other machines can reach; clients send it as Bearer, or as the
    /// password of HTTP Basic.
    #[arg(long, conflicts_with = "api_key_file")]
    api_key: Option<String>,
    /// A file holding the key (its first line), so it does not show in the process list.
    #[arg(long, value_name = "FILE")]
    api_key_file: Option<PathBuf>,
    /// Serve a non-loopback --host without a key.
    #[arg(long)]
    insecure_no_auth: bool,
    /// A browser origin allowed to call the API (CORS); repeat for several. None by default.
    #[arg(long = "cors-origin", value_name = "ORIGIN")]
    cors_origins: Vec<String>,
    /// Jobs that may wait behind the running one; more are answered 429.
    #[arg(long, default_value_t = 16)]
    queue: usize,
    /// A tiny autoencoder (e.g. madebyollin/taesd) for the step previews; without it, step
    /// events carry no image.
    #[arg(long, value_name = "SOURCE")]
    preview_vae: Option<String>,
    /// Also write every output image here (ID-K.png).
    #[arg(long, value_name = "DIR")]
    output_dir: Option<PathBuf>,
    /// Precision the weights are kept in (as for `generate`).
    #[arg(long)]
    dtype: Option<WeightDType>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Largest request body, in MiB (JSON with base64 images, uploads).
    #[arg(long, default_value_t = 50)]
    max_body_mb: usize,
    /// Largest output, in pixels (width x height).
    #[arg(long, default_value_t = 2048 * 2048)]
    max_pixels: usize,
    #[arg(long, default_value_t = 50)]
    max_steps: usize,
    /// Most images (or videos) one request may ask for.
    #[arg(long, default_value_t = 8)]
    max_images: usize,
    #[arg(long, default_value_t = 32)]
    max_frames: usize,
    /// Largest uploaded image, in pixels, checked before it is decoded.
    #[arg(long, default_value_t = 4096 * 4096)]
    max_input_pixels: usize,
    /// Seconds finished jobs and their images are kept.
    #[arg(long, default_value_t = 600)]
    job_ttl: u64,
}

#[derive(clap::Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[arg(long, default_value_t = 1)]
    num_images: usize,
    /// Output image, in the format its extension names (.png with the generation parameters,
    /// .jpg/.jpeg, .webp, .gif); several images become NAME-1.png, NAME-2.png, ...
    #[arg(long, short, default_value = "output.png")]
    output: PathBuf,
    #[arg(long, value_enum, default_value = "auto")]
    pipeline: PipelineArg,
    /// Init image: selects image-to-image (with --mask-image: inpainting). Without
    /// --width/--height the output takes its size, rounded down to the VAE factor.
    #[arg(long)]
    image: Option<PathBuf>,
    /// Inpainting mask (white = repaint), same size as --image.
    #[arg(long)]
    mask_image: Option<PathBuf>,
    /// How much of the init image to replace, in (0, 1]. Default: diffusers' per pipeline
    /// (0.8 image-to-image, 1.0 inpainting; SDXL 0.3 and 0.9999).
    #[arg(long)]
    strength: Option<f64>,
    #[command(flatten)]
    control: ControlArgs,
    /// Write each step's predicted image to DIR/step-NN.png, decoded by a tiny autoencoder.
    #[arg(long, value_name = "DIR")]
    preview: Option<PathBuf>,
    /// The tiny autoencoder for --preview (default madebyollin/taesd, madebyollin/taesdxl for
    /// SDXL).
    #[arg(long, value_name = "SOURCE", requires = "preview")]
    preview_vae: Option<String>,
}

#[derive(clap::Args)]
struct DownloadArgs {
    /// Hub repo id, e.g. SimianLuo/LCM_Dreamshaper_v7.
    repo: String,
    /// Weight variant, e.g. fp16.
    #[arg(long)]
    variant: Option<String>,
}

#[derive(clap::Args)]
struct AnimateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// MotionAdapter folder or hub id, e.g. guoyww/animatediff-motion-adapter-v1-5-2.
    #[arg(long)]
    motion_adapter: String,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Frames per video (AnimateDiffPipeline's default 16).
    #[arg(long, default_value_t = 16)]
    frames: usize,
    /// Videos to make from the prompt (num_videos_per_prompt).
    #[arg(long, default_value_t = 1)]
    num_videos: usize,
    /// `.gif`: an animated GIF as diffusers' export_to_gif (looping, --fps); another image
    /// extension (`.png`, `.jpg`, `.webp`): one numbered file per frame (NAME-1.png, ...).
    #[arg(long, short, default_value = "animation.gif")]
    output: PathBuf,
    #[arg(long, default_value_t = 10)]
    fps: u32,
    /// Override the scheduler's beta_schedule, as diffusers' LCM guide does for AnimateDiff
    /// (`LCMScheduler.from_config(config, beta_schedule="linear")`).
    #[arg(long)]
    beta_schedule: Option<BetaSchedule>,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// sd15, sdxl (text-to-image) or animatediff (SD1.5 + motion adapter v1-5-2).
    #[arg(long, default_value = "sd15")]
    model: lcm::testing::RandomModel,
    /// Where the random-weight diffusers folder is written once and reused (default
    /// $TMPDIR/lcm-bench-sd15, or lcm-bench-sdxl; AnimateDiff adds DIR/motion_adapter).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Image size (default: 512, SDXL 1024).
    #[arg(long)]
    size: Option<usize>,
    /// AnimateDiff: frames per clip.
    #[arg(long, default_value_t = 16)]
    frames: usize,
    #[arg(long, default_value_t = 4)]
    steps: usize,
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Precision the weights are kept in: f32, f16, bf16 or int8 (as for `generate`;
    /// default: f32 on the CPU, f16 on a GPU).
    #[arg(long)]
    dtype: Option<WeightDType>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Print JSON (for benches/bench_diffusers.py) instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct CannyArgs {
    input: PathBuf,
    output: PathBuf,
    #[arg(long, default_value_t = 100.0)]
    low: f64,
    #[arg(long, default_value_t = 200.0)]
    high: f64,
    /// Replace an existing output file.
    #[arg(long)]
    overwrite: bool,
}

/// ControlNet and T2I-Adapter options of `generate`.
#[derive(clap::Args)]
struct ControlArgs {
    /// ControlNet (folder or hub id); repeat for several. Each needs a --control-image.
    #[arg(long = "controlnet", value_name = "SOURCE")]
    controlnets: Vec<String>,
    /// Control image for each --controlnet, in the same order. Without --width/--height the
    /// output takes the first one's size (rounded down to the VAE factor).
    #[arg(long = "control-image", value_name = "PATH")]
    control_images: Vec<PathBuf>,
    /// controlnet_conditioning_scale: one value for all ControlNets or one per ControlNet.
    #[arg(long = "controlnet-scale", value_name = "F")]
    controlnet_scales: Vec<f64>,
    /// control_guidance_start (fraction of the steps), one or one per ControlNet. Default 0.
    #[arg(long = "control-guidance-start", value_name = "F")]
    control_guidance_start: Vec<f64>,
    /// control_guidance_end (fraction of the steps), one or one per ControlNet. Default 1.
    #[arg(long = "control-guidance-end", value_name = "F")]
    control_guidance_end: Vec<f64>,
    /// ControlNet guess mode: under CFG the ControlNets only see the conditional half.
    #[arg(long)]
    guess_mode: bool,
    /// T2I-Adapter (folder or hub id); repeat for several. Each needs an --adapter-image.
    #[arg(long = "adapter", value_name = "SOURCE")]
    adapters: Vec<String>,
    /// Image for each --adapter, in the same order.
    #[arg(long = "adapter-image", value_name = "PATH")]
    adapter_images: Vec<PathBuf>,
    /// adapter_conditioning_scale: one value for all adapters or one per adapter.
    #[arg(long = "adapter-scale", value_name = "F")]
    adapter_scales: Vec<f64>,
    /// adapter_conditioning_factor: the fraction of the steps that get the adapters' features.
    #[arg(long, value_name = "F", default_value_t = 1.0)]
    adapter_conditioning_factor: f64,
    /// Turn every control and adapter image into its Canny edge map first.
    #[arg(long)]
    canny: bool,
    #[arg(long, default_value_t = 100.0)]
    canny_low: f64,
    #[arg(long, default_value_t = 200.0)]
    canny_high: f64,
}

/// One value per unit: none given = `default` for all, one = the same for all, else one each.
fn per_unit(values: &[f64], n: usize, default: f64, flag: &str) -> Result<Vec<f64>> {
    if let Some(v) = values.iter().find(|v| !v.is_finite()) {
        bail!("{flag} must be a finite number, got {v}");
    }
    match values.len() {
        0 => Ok(vec![default; n]),
        1 => Ok(vec![values[0]; n]),
        k if k == n => Ok(values.to_vec()),
        k => bail!("{k} values for {flag} but {n} models; give one value or one per model"),
    }
}

fn read_control_image(path: &std::path::Path, args: &ControlArgs) -> Result<Image8> {
    let img = Image8::read(path)?;
    if args.canny {
        lcm::canny::canny(&img, args.canny_low, args.canny_high)
    } else {
        Ok(img)
    }
}

impl ControlArgs {
    /// Flags that only make sense with a ControlNet or T2I-Adapter, and one image per model.
    fn check(&self) -> Result<()> {
        let (n, m) = (self.controlnets.len(), self.adapters.len());
        if self.control_images.len() != n {
            bail!("{n} --controlnet but {} --control-image; give one image per ControlNet", self.control_images.len());
        }
        if self.adapter_images.len() != m {
            bail!("{m} --adapter but {} --adapter-image; give one image per adapter", self.adapter_images.len());
        }
        let controlnet_flags = !(self.controlnet_scales.is_empty()
            && self.control_guidance_start.is_empty()
            && self.control_guidance_end.is_empty()
            && !self.guess_mode);
        if n == 0 && controlnet_flags {
            bail!("--controlnet-scale, --control-guidance-start/-end and --guess-mode need --controlnet");
        }
        if m == 0 && !self.adapter_scales.is_empty() {
            bail!("--adapter-scale needs --adapter");
        }
        Ok(())
    }

    /// The request's control inputs: each image read (and turned into edges with `--canny`),
    /// each scale given once for all models or once per model.
    fn inputs(&self) -> Result<(Vec<ControlNetInput>, Vec<AdapterInput>)> {
        self.check()?;
        let (n, m) = (self.controlnets.len(), self.adapters.len());
        let scales = per_unit(&self.controlnet_scales, n, 1.0, "--controlnet-scale")?;
        let starts = per_unit(&self.control_guidance_start, n, 0.0, "--control-guidance-start")?;
        let ends = per_unit(&self.control_guidance_end, n, 1.0, "--control-guidance-end")?;
        let mut controlnet = Vec::with_capacity(n);
        for (i, path) in self.control_images.iter().enumerate() {
            controlnet.push(ControlNetInput {
                image: read_control_image(path, self)?,
                conditioning_scale: scales[i],
                guidance_start: starts[i],
                guidance_end: ends[i],
            });
        }
        let ascales = per_unit(&self.adapter_scales, m, 1.0, "--adapter-scale")?;
        let mut adapter = Vec::with_capacity(m);
        for (i, path) in self.adapter_images.iter().enumerate() {
            adapter.push(AdapterInput { image: read_control_image(path, self)?, conditioning_scale: ascales[i] });
        }
        Ok((controlnet, adapter))
    }
}

impl SamplingArgs {
    /// The request fields these flags set (the rest default).
    fn request(&self) -> GenerateRequest {
        let seed = self.seed.unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
        });
        GenerateRequest {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            num_inference_steps: self.steps,
            guidance_scale: self.guidance_scale,
            width: self.width,
            height: self.height,
            seed,
            original_inference_steps: self.original_inference_steps,
            timesteps: self.timesteps.clone(),
            ..Default::default()
        }
    }
}

/// `--device` (an unknown name is a one-line error before anything is loaded) and the dtype,
/// which defaults to the device's (f16 on a GPU, as diffusers' guide loads models).
fn parse_device_dtype(device: &str, dtype: Option<WeightDType>) -> Result<(candle_core::Device, WeightDType)> {
    let device = lcm::device::parse(device)?;
    let dtype = dtype.unwrap_or(lcm::device::default_dtype(&device));
    Ok((device, dtype))
}

fn load_pipeline(m: &ModelArgs, motion_adapter: Option<String>, pipeline: Option<PipelineKind>) -> Result<LcmPipeline> {
    let (device, dtype) = parse_device_dtype(&m.device, m.dtype)?;
    let loras = m.loras.iter().map(|l| LoraSpec::parse(l)).collect::<Result<Vec<_>>>()?;
    let opts = LoadOptions {
        variant: m.variant.clone(),
        unet: m.unet.clone(),
        loras,
        motion_adapter,
        dtype,
        vae: m.vae.clone(),
        device: device.into(),
        compute_dtype: None,
        pipeline,
    };
    let pipe = LcmPipeline::load(&m.model, &opts)?;
    for warning in pipe.components.lora_reports.iter().filter_map(|r| r.warning()) {
        eprintln!("warning: {warning}");
    }
    Ok(pipe)
}

/// Run `f` with a progress bar fed by its per-step callback.
fn with_progress<T>(f: impl FnOnce(&mut dyn FnMut(usize, usize)) -> Result<T>) -> Result<T> {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} steps {elapsed}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message("denoising");
    let out = f(&mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    });
    bar.finish_and_clear();
    out
}

/// `--preview DIR`: every step's predicted clean image (`denoised`) through a tiny autoencoder.
struct Previews {
    dir: PathBuf,
    vae: Autoencoder,
    num_images: usize,
    overwrite: bool,
}

impl Previews {
    fn load(dir: &Path, source: Option<&str>, pipe: &LcmPipeline, num_images: usize, overwrite: bool) -> Result<Self> {
        let source = source.unwrap_or(if pipe.kind() == PipelineKind::StableDiffusionXL {
            "madebyollin/taesdxl"
        } else {
            "madebyollin/taesd"
        });
        let c = &pipe.components;
        let vae = load_vae(&resolve_component(source, "vae", None)?, pipe.kind(), c.precision(), c.device())
            .map_err(|e| anyhow::anyhow!("--preview-vae {source}: {e:#}"))?;
        if vae.latent_channels() != pipe.components.vae.latent_channels() {
            bail!(
                "--preview-vae {source} has {} latent channels, the model {}",
                vae.latent_channels(),
                pipe.components.vae.latent_channels()
            );
        }
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Self { dir: dir.to_path_buf(), vae, num_images, overwrite })
    }

    /// `DIR/step-NN.png` (several images: `step-NN-1.png`, ...).
    fn paths(&self, step: usize) -> Vec<PathBuf> {
        numbered_paths(&self.dir.join(format!("step-{:02}.png", step + 1)), self.num_images)
    }

    /// Refuse to start when earlier previews would be overwritten without --overwrite.
    fn check(dir: &Path, overwrite: bool) -> Result<()> {
        if dir.exists() && !dir.is_dir() {
            bail!("--preview {} is not a folder", dir.display());
        }
        if !overwrite && dir.is_dir() {
            let taken = std::fs::read_dir(dir)?.filter_map(|e| e.ok()).map(|e| e.path()).find(|p| {
                p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("step-") && n.ends_with(".png"))
            });
            if let Some(p) = taken {
                bail!("{} already exists; pass --overwrite to replace previews", p.display());
            }
        }
        Ok(())
    }

    fn write(&self, pipe: &LcmPipeline, step: &Step) -> Result<()> {
        let images = pipe.decode_latents(&self.vae, step.denoised, step.num_frames)?;
        for (img, path) in images.iter().zip(self.paths(step.index)) {
            write_image(&path, img, None, self.overwrite)?;
        }
        Ok(())
    }
}

fn canny(args: CannyArgs) -> Result<()> {
    let CannyArgs { input, output, low, high, overwrite } = args;
    check_outputs(std::slice::from_ref(&output), overwrite)?;
    let img = Image8::read(&input)?;
    let edges = lcm::canny::canny(&img, low, high)?;
    write_image(&output, &edges.into(), None, overwrite)?;
    eprintln!("wrote {}", output.display());
    Ok(())
}

fn bench(args: BenchArgs) -> Result<()> {
    let BenchArgs { model, dir, size, frames, steps, warmup, runs, dtype, device, json } = args;
    let (device, dtype) = parse_device_dtype(&device, dtype)?;
    let size = size.unwrap_or(model.default_size());
    if size == 0 || !size.is_multiple_of(8) || steps == 0 || runs == 0 || frames == 0 {
        bail!("--size must be a positive multiple of 8, --steps, --runs and --frames at least 1");
    }
    let dir = dir.unwrap_or_else(|| model.default_dir());
    eprintln!("model folder: {}", dir.display());
    if !lcm::testing::folder_complete(model, &dir) {
        eprintln!("writing random weights once; this run's peak RSS includes that, rerun for a clean figure");
    }
    lcm::testing::write_folder(model, &dir)?;
    let opts = bench::BenchOptions { model, size, frames, steps, warmup, runs, dtype, device };
    let report = bench::run(&dir, &opts)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

fn download(args: DownloadArgs) -> Result<()> {
    let dir = lcm::loaders::hub::download(&args.repo, args.variant.as_deref())?;
    eprintln!("downloaded {} to {}", args.repo, dir.display());
    Ok(())
}

/// Everything that can be checked before the model loads is (the request's own checks, the
/// outputs' names, the images); the rest when the request is planned against the model, still
/// before any compute.
fn generate(args: GenerateArgs) -> Result<()> {
    let GenerateArgs {
        model,
        sampling,
        num_images,
        output,
        pipeline,
        image,
        mask_image,
        strength,
        control,
        preview,
        preview_vae,
    } = args;
    let overwrite = sampling.overwrite;
    control.check()?;
    let mut req = GenerateRequest {
        num_images_per_prompt: num_images,
        strength,
        guess_mode: control.guess_mode,
        adapter_conditioning_factor: control.adapter_conditioning_factor,
        ..sampling.request()
    };
    req.image = image.as_deref().map(Image8::read).transpose()?;
    req.mask_image = mask_image.as_deref().map(Image8::read).transpose()?;
    req.check()?;
    // The outputs' names are checked now (extension, folder); whether numbered files already
    // exist, once the request is planned (their count is then bounded).
    check_outputs(&numbered_paths(&output, num_images.min(64)), overwrite)?;
    if let Some(dir) = &preview {
        Previews::check(dir, overwrite)?;
    }
    (req.controlnet, req.adapter) = control.inputs()?;

    let pipeline = match pipeline {
        PipelineArg::Auto => None,
        PipelineArg::Lcm => Some(PipelineKind::LatentConsistencyModel),
        PipelineArg::Sd => Some(PipelineKind::StableDiffusion),
        PipelineArg::Sdxl => Some(PipelineKind::StableDiffusionXL),
    };
    let mut pipe = load_pipeline(&model, None, pipeline)?;
    for source in &control.controlnets {
        pipe.load_controlnet(source, None)?;
    }
    for source in &control.adapters {
        pipe.load_t2i_adapter(source, None)?;
    }
    let plan = pipe.plan(&req)?;
    let paths = numbered_paths(&output, num_images);
    check_outputs(&paths, overwrite)?;
    let previews = match &preview {
        Some(dir) => Some(Previews::load(dir, preview_vae.as_deref(), &pipe, num_images, overwrite)?),
        None => None,
    };
    let images = with_progress(|on_step| {
        pipe.run(&plan, &req, |step| {
            on_step(step.index + 1, step.total);
            match &previews {
                Some(p) => p.write(&pipe, step),
                None => Ok(()),
            }
        })
    })?;
    for (i, (img, path)) in images.iter().zip(&paths).enumerate() {
        write_image(path, img, Some(&pipe.parameters_text(&plan, &req, i)), overwrite)?;
        eprintln!("wrote {} (seed {})", path.display(), req.seed);
    }
    Ok(())
}

fn animate(args: AnimateArgs) -> Result<()> {
    let AnimateArgs { model, motion_adapter, sampling, frames, num_videos, output, fps, beta_schedule } = args;
    let overwrite = sampling.overwrite;
    let req = GenerateRequest { num_images_per_prompt: num_videos, num_frames: Some(frames), ..sampling.request() };
    req.check()?;
    if fps == 0 {
        bail!("--fps must be at least 1");
    }
    // .gif: one animated GIF per video; another image format: one file per frame.
    let gif = lcm::image_io::OutputFormat::for_path(&output)? == lcm::image_io::OutputFormat::Gif;
    let frame_paths = |count: usize| -> Vec<PathBuf> {
        let videos = numbered_paths(&output, count);
        let frames_of = |v: &PathBuf| numbered_paths(v, frames.max(2)).into_iter().take(frames).collect::<Vec<_>>();
        videos.iter().flat_map(|v| if gif { vec![v.clone()] } else { frames_of(v) }).collect()
    };
    // The first output's name now; all of them once the request is planned (their count is
    // then bounded).
    let first_video = numbered_paths(&output, num_videos.min(2)).remove(0);
    let first = if gif { first_video } else { numbered_paths(&first_video, 2).remove(0) };
    check_outputs(&[first], overwrite)?;
    let mut pipe = load_pipeline(&model, Some(motion_adapter), None)?;
    if let Some(b) = beta_schedule {
        pipe.components.scheduler_config.beta_schedule = b;
    }
    let plan = pipe.plan(&req)?;
    let per_video = if gif { 1 } else { frames };
    let all_paths = frame_paths(num_videos);
    check_outputs(&all_paths, overwrite)?;
    let images = with_progress(|on_step| {
        pipe.run(&plan, &req, |step| {
            on_step(step.index + 1, step.total);
            Ok(())
        })
    })?;
    for (i, (clip, paths)) in images.chunks(frames).zip(all_paths.chunks(per_video)).enumerate() {
        if gif {
            write_gif(&paths[0], clip, fps, overwrite)?;
            eprintln!("wrote {} ({} frames, seed {})", paths[0].display(), clip.len(), req.seed);
        } else {
            for (img, path) in clip.iter().zip(paths) {
                write_image(path, img, Some(&pipe.parameters_text(&plan, &req, i)), overwrite)?;
            }
            let (first, last) = (paths[0].display(), paths[paths.len() - 1].display());
            eprintln!("wrote {} frames {first} .. {last} (seed {})", clip.len(), req.seed);
        }
    }
    Ok(())
}

fn serve(args: ServeArgs) -> Result<()> {
    use lcm_server::config::{Limits, NamedSource, ServerConfig};
    let api_key = match (&args.api_key, &args.api_key_file) {
        (Some(k), _) => Some(k.clone()),
        (None, Some(f)) => {
            let text = std::fs::read_to_string(f).with_context(|| format!("--api-key-file {}", f.display()))?;
            Some(text.lines().next().unwrap_or("").trim().to_string())
        }
        (None, None) => None,
    };
    let config = ServerConfig {
        models: args.models.iter().map(|m| NamedSource::parse(m)).collect(),
        lora_dir: args.lora_dir,
        controlnets: args.controlnets.iter().map(|m| NamedSource::parse(m)).collect(),
        adapters: args.adapters.iter().map(|m| NamedSource::parse(m)).collect(),
        motion_adapter: args.motion_adapter.as_deref().map(NamedSource::parse),
        preview_vae: args.preview_vae,
        output_dir: args.output_dir,
        dtype: args.dtype,
        device: args.device,
        host: args.host,
        port: args.port,
        api_keys: api_key.into_iter().collect(),
        insecure_no_auth: args.insecure_no_auth,
        cors_origins: args.cors_origins,
        queue: args.queue,
        limits: Limits {
            max_body_bytes: args.max_body_mb.saturating_mul(1 << 20),
            max_pixels: args.max_pixels,
            max_steps: args.max_steps,
            max_images: args.max_images,
            max_frames: args.max_frames,
            max_input_pixels: args.max_input_pixels,
        },
        job_ttl: std::time::Duration::from_secs(args.job_ttl),
    };
    lcm_server::run(config)
}

fn main() -> ExitCode {
    // Errors are reported as one line: keep candle from capturing backtraces into their text.
    // SAFETY: no other thread exists yet.
    unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "0") };
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        eprintln!("error: internal error: {}", msg.replace('\n', " "));
    }));
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // Help and version go to stdout as clap writes them; a bad flag is one line, as every
        // other error.
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let text = e.render().to_string();
            eprintln!("{}", text.lines().next().unwrap_or("error: invalid arguments"));
            return ExitCode::from(2);
        }
    };
    if let Err(e) = lcm::kernels::CpuPath::check_env() {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        Command::Generate(args) => generate(args),
        Command::Animate(args) => animate(args),
        Command::Bench(args) => bench(args),
        Command::Download(args) => download(args),
        Command::Canny(args) => canny(args),
        Command::Serve(args) => serve(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = format!("{e:#}");
            eprintln!("error: {}", msg.split_whitespace().collect::<Vec<_>>().join(" "));
            ExitCode::FAILURE
        }
    }
}
