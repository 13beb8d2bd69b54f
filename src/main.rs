//! `lcm`: the command-line front end over the `lcm` library.

use anyhow::{bail, Result};
use clap::{Parser, Subcommand, ValueEnum};
use lcm::image_io::{numbered_paths, write_png};
use lcm::image_processor::Image8;
use lcm::pipelines::{AdapterInput, ControlNetInput, GenerateRequest, LcmPipeline, LoadOptions, LoraSpec, PipelineKind};
use std::path::PathBuf;
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

#[derive(Subcommand)]
enum Command {
    /// Text-to-image.
    Generate {
        /// Diffusers folder or Hugging Face hub repo id (an existing path is always a path).
        #[arg(long, default_value = "SimianLuo/LCM_Dreamshaper_v7")]
        model: String,
        #[arg(long)]
        prompt: String,
        #[arg(long)]
        negative_prompt: Option<String>,
        #[arg(long, default_value_t = 4)]
        steps: usize,
        /// Default: 8.5 for LatentConsistencyModelPipeline, 7.5 for StableDiffusionPipeline.
        #[arg(long)]
        guidance_scale: Option<f64>,
        /// Default: the UNet's sample_size times the VAE scale factor.
        #[arg(long)]
        width: Option<usize>,
        #[arg(long)]
        height: Option<usize>,
        /// Same as `generator=torch.manual_seed(SEED)`; random when not given.
        #[arg(long)]
        seed: Option<u64>,
        #[arg(long, default_value_t = 1)]
        num_images: usize,
        #[arg(long)]
        original_inference_steps: Option<usize>,
        /// Custom descending timesteps, e.g. 999,759,499,259 (instead of --steps).
        #[arg(long, value_delimiter = ',')]
        timesteps: Option<Vec<i64>>,
        /// Output PNG; several images become NAME-1.png, NAME-2.png, ...
        #[arg(long, short, default_value = "output.png")]
        output: PathBuf,
        /// Replace existing output files.
        #[arg(long)]
        overwrite: bool,
        /// Weight variant, e.g. fp16 picks *.fp16.safetensors.
        #[arg(long)]
        variant: Option<String>,
        /// Replace the model's UNet (folder or hub id), e.g. an LCM-distilled UNet.
        #[arg(long)]
        unet: Option<String>,
        #[arg(long, value_enum, default_value = "auto")]
        pipeline: PipelineArg,
        /// LoRA to fuse in: a .safetensors file, a folder or a hub repo id, with an optional
        /// weight (SOURCE@0.8); repeat for several, like diffusers' set_adapters.
        #[arg(long = "lora", value_name = "SOURCE[@WEIGHT]")]
        loras: Vec<String>,
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
    },
    /// Canny edge map of an image, as OpenCV's cv2.Canny(image, low, high) in diffusers' guide.
    Canny {
        input: PathBuf,
        output: PathBuf,
        #[arg(long, default_value_t = 100.0)]
        low: f64,
        #[arg(long, default_value_t = 200.0)]
        high: f64,
        /// Replace an existing output file.
        #[arg(long)]
        overwrite: bool,
    },
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
    fn inputs(&self) -> Result<(Vec<ControlNetInput>, Vec<AdapterInput>)> {
        let (n, m) = (self.controlnets.len(), self.adapters.len());
        if self.control_images.len() != n {
            bail!("{n} --controlnet but {} --control-image; give one image per ControlNet", self.control_images.len());
        }
        if self.adapter_images.len() != m {
            bail!("{m} --adapter but {} --adapter-image; give one image per adapter", self.adapter_images.len());
        }
        if n == 0 && !(self.controlnet_scales.is_empty() && self.control_guidance_start.is_empty() && self.control_guidance_end.is_empty() && !self.guess_mode) {
            bail!("--controlnet-scale, --control-guidance-start/-end and --guess-mode need --controlnet");
        }
        if m == 0 && !self.adapter_scales.is_empty() {
            bail!("--adapter-scale needs --adapter");
        }
        if !(0.0..=1.0).contains(&self.adapter_conditioning_factor) {
            bail!("--adapter-conditioning-factor must be in [0, 1], got {}", self.adapter_conditioning_factor);
        }
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

fn canny_command(input: &std::path::Path, output: &std::path::Path, low: f64, high: f64, overwrite: bool) -> Result<()> {
    if output.exists() && !overwrite {
        bail!("{} already exists; pass --overwrite to replace it", output.display());
    }
    let img = Image8::read(input)?;
    let edges = lcm::canny::canny(&img, low, high)?.to_rgb();
    let rgb = lcm::image_io::RgbImage { width: edges.width, height: edges.height, pixels: edges.pixels };
    write_png(output, &rgb, None, overwrite)?;
    eprintln!("wrote {}", output.display());
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Canny { input, output, low, high, overwrite } => canny_command(&input, &output, low, high, overwrite),
        Command::Generate {
            model,
            prompt,
            negative_prompt,
            steps,
            guidance_scale,
            width,
            height,
            seed,
            num_images,
            original_inference_steps,
            timesteps,
            output,
            overwrite,
            variant,
            unet,
            pipeline,
            loras,
            image,
            mask_image,
            strength,
            control,
        } => {
            if mask_image.is_some() && image.is_none() {
                bail!("--mask-image needs --image (the picture to inpaint)");
            }
            if let Some(s) = strength.filter(|s| !(*s > 0.0 && *s <= 1.0)) {
                bail!("--strength must be in (0, 1], got {s}");
            }
            if strength.is_some() && image.is_none() {
                bail!("--strength needs --image");
            }
            let image = image.as_deref().map(Image8::read).transpose()?;
            let (controlnet_inputs, adapter_inputs) = control.inputs()?;
            if matches!(pipeline, PipelineArg::Lcm) && !(control.controlnets.is_empty() && control.adapters.is_empty()) {
                bail!("--pipeline lcm has no ControlNet / T2I-Adapter variant in diffusers; use --pipeline sd (the default with --controlnet)");
            }
            let mask_image = mask_image.as_deref().map(Image8::read).transpose()?;
            if steps == 0 {
                bail!("--steps must be at least 1");
            }
            if num_images == 0 {
                bail!("--num-images must be at least 1");
            }
            let paths = numbered_paths(&output, num_images);
            if !overwrite {
                if let Some(p) = paths.iter().find(|p| p.exists()) {
                    bail!("{} already exists; pass --overwrite to replace it", p.display());
                }
            }
            let seed = seed.unwrap_or_else(|| {
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
            });
            let loras = loras.iter().map(|l| LoraSpec::parse(l)).collect::<Result<Vec<_>>>()?;
            let opts = LoadOptions { variant, unet, loras };
            let mut pipe = LcmPipeline::load(&model, &opts)?;
            for warning in pipe.components.lora_reports.iter().filter_map(|r| r.warning()) {
                eprintln!("warning: {warning}");
            }
            pipe = match pipeline {
                PipelineArg::Auto => pipe,
                PipelineArg::Lcm => pipe.with_kind(PipelineKind::LatentConsistencyModel),
                PipelineArg::Sd => pipe.with_kind(PipelineKind::StableDiffusion),
                PipelineArg::Sdxl => pipe.with_kind(PipelineKind::StableDiffusionXL),
            };
            for source in &control.controlnets {
                pipe.load_controlnet(source, None)?;
            }
            for source in &control.adapters {
                pipe.load_t2i_adapter(source, None)?;
            }
            let req = GenerateRequest {
                prompt,
                negative_prompt,
                num_inference_steps: steps,
                guidance_scale,
                width,
                height,
                seed,
                num_images_per_prompt: num_images,
                original_inference_steps,
                timesteps,
                image,
                mask_image,
                strength,
                controlnet: controlnet_inputs,
                guess_mode: control.guess_mode,
                adapter: adapter_inputs,
                adapter_conditioning_factor: control.adapter_conditioning_factor,
            };
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} steps {elapsed}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar.set_message("denoising");
            let images = pipe.generate(&req, |done, total| {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
            })?;
            bar.finish_and_clear();
            for (i, (img, path)) in images.iter().zip(&paths).enumerate() {
                write_png(path, img, Some(&pipe.parameters_text(&req, i)), overwrite)?;
                eprintln!("wrote {} (seed {seed})", path.display());
            }
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    // Errors are reported as one line: keep candle from capturing backtraces into their text.
    // SAFETY: no other thread exists yet.
    unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "0") };
    std::panic::set_hook(Box::new(|info| {
        let msg = info.payload().downcast_ref::<&str>().map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        eprintln!("error: internal error: {}", msg.replace('\n', " "));
    }));
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = format!("{e:#}");
            eprintln!("error: {}", msg.split_whitespace().collect::<Vec<_>>().join(" "));
            ExitCode::FAILURE
        }
    }
}
