//! Benchmark: one UNet denoising step of a real architecture (random weights) at a real size.
//! `cargo bench --bench unet_step -- [sd15|sdxl|...] [latent] [batch]`; compare with
//! `benches/unet_step_torch.py` on the same machine. Results go in BENCHMARKS.md.

use candle_core::{DType, Device, Tensor};
use lcm::models::unet::{AddedCond, UNet2DConditionConfig, UNet2DConditionModel, UNetConditioning};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let model = args.first().map(String::as_str).unwrap_or("sd15");
    let latent: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(64);
    let batch: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(1);
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/real_configs").join(model).join("unet");
    let cfg: UNet2DConditionConfig = lcm::config::read_config(&dir.join("config.json"))?;
    let raw: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
    let dev = Device::Cpu;
    let t = Instant::now();
    let unet = UNet2DConditionModel::new(lcm::testing::random_var_builder(1, DType::F32, &dev), &cfg)?;
    eprintln!("built {model} UNet in {:.1}s", t.elapsed().as_secs_f64());
    let cross = raw["cross_attention_dim"].as_u64().unwrap_or(768) as usize;
    let x = Tensor::randn(0f32, 1.0, (batch, cfg.in_channels, latent, latent), &dev)?;
    let ehs = Tensor::randn(0f32, 1.0, (batch, 77, cross), &dev)?;
    let mut cond = UNetConditioning::default();
    if raw["addition_embed_type"] == "text_time" {
        let td = raw["addition_time_embed_dim"].as_u64().unwrap() as usize;
        let pooled = raw["projection_class_embeddings_input_dim"].as_u64().unwrap() as usize - 6 * td;
        cond.added_cond = Some(AddedCond {
            text_embeds: Tensor::randn(0f32, 1.0, (batch, pooled), &dev)?,
            time_ids: Tensor::ones((batch, 6), DType::F32, &dev)?,
        });
    }
    if let Some(d) = cfg.time_cond_proj_dim {
        cond.timestep_cond = Some(Tensor::randn(0f32, 1.0, (batch, d), &dev)?);
    }
    let mut times = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let y = unet.forward(&x, 999.0, &ehs, &cond)?;
        y.sum_all()?.to_scalar::<f32>()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.total_cmp(b));
    println!("{model} UNet step, latent {latent}x{latent}, batch {batch}: median {:.2}s (runs {:?})", times[1], times);
    Ok(())
}
