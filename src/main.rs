//! `lcm`: the command-line front end over the `lcm` library.

use anyhow::{bail, Result};
use clap::{Parser, Subcommand, ValueEnum};
use lcm::image_io::{numbered_paths, write_png};
use lcm::image_processor::Image8;
use lcm::pipelines::{GenerateRequest, LcmPipeline, LoadOptions, LoraSpec, PipelineKind};
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
    },
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
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
