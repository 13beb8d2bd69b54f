//! Benchmark: AnimateDiff memory and speed versus the number of frames. The real SD1.5 UNet and
//! the real guoyww motion adapter v1-5-2 architectures (random weights) run one denoising step
//! (`forward_frames`, CFG-free, as with LCM-LoRA at guidance 1) per frame count, then the VAE
//! decodes the clip frame by frame; prints time and the process's peak RSS after each count.
//! `cargo bench --bench animatediff -- [latent] [frames...]`, e.g. `-- 32 8 16`.
//! Frame counts run in increasing order, so each peak-RSS line bounds that count's working set.

use candle_core::{DType, Device, Tensor};
use lcm::models::unet::motion::{read_motion_config, MotionModules};
use lcm::models::unet::{UNet2DConditionConfig, UNet2DConditionModel, UNetConditioning};
use lcm::models::vae::kl::{AutoencoderKL, AutoencoderKLConfig};
use lcm::testing::peak_rss_mb;
use lcm::testing::random_var_builder;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let args: Vec<usize> =
        std::env::args().skip(1).filter(|a| !a.starts_with("--")).map(|a| a.parse()).collect::<Result<_, _>>()?;
    let latent = args.first().copied().unwrap_or(32);
    let mut frames: Vec<usize> = args.get(1..).map(|f| f.to_vec()).filter(|f| !f.is_empty()).unwrap_or(vec![8, 16]);
    frames.sort();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/real_configs");
    let dev = Device::Cpu;
    let t = Instant::now();
    let ucfg = UNet2DConditionConfig::from_file(&root.join("sd15/unet/config.json"))?;
    let unet = UNet2DConditionModel::new(random_var_builder(1, DType::F32, &dev), &ucfg)?;
    let mcfg = read_motion_config(&root.join("guoyww__animatediff-motion-adapter-v1-5-2"))?;
    let motion = MotionModules::new(random_var_builder(2, DType::F32, &dev), &mcfg, &unet)?;
    let unet = unet.with_motion(motion);
    let vcfg: AutoencoderKLConfig = lcm::config::read_config(&root.join("sd15/vae/config.json"))?;
    let vae = AutoencoderKL::new(random_var_builder(3, DType::F32, &dev), &vcfg)?;
    println!(
        "built SD1.5 UNet + motion adapter + VAE (random weights) in {:.1}s, peak RSS {:.0} MB",
        t.elapsed().as_secs_f64(),
        peak_rss_mb()
    );
    for f in frames {
        let x = Tensor::randn(0f32, 1.0, (1, 4, f, latent, latent), &dev)?;
        let ehs = Tensor::randn(0f32, 1.0, (f, 77, 768), &dev)?;
        let t = Instant::now();
        let y = unet.forward_frames(&x, 999.0, &ehs, &UNetConditioning::default())?;
        y.sum_all()?.to_scalar::<f32>()?;
        let step = t.elapsed().as_secs_f64();
        let after_step = peak_rss_mb();
        let t = Instant::now();
        for k in 0..f {
            let z = y.narrow(2, k, 1)?.squeeze(2)?;
            vae.decode(&z)?.sum_all()?.to_scalar::<f32>()?;
        }
        let decode = t.elapsed().as_secs_f64();
        println!(
            "frames {f:>3} at {}x{} px: UNet step {step:.1}s (peak RSS {after_step:.0} MB), VAE decode frame by frame {decode:.1}s (peak RSS {:.0} MB)",
            latent * 8,
            latent * 8,
            peak_rss_mb()
        );
    }
    Ok(())
}
