//! Same-process A/B of weight precisions on an `lcm bench` folder: the model loaded with f32,
//! f16 and bf16 weights side by side, then UNet steps (batch 1) and VAE decodes timed in
//! interleaved rounds, so a noisy machine's drift hits every precision alike. Prints each
//! round's seconds and the ratios to f32.
//!
//! `cargo run --release --example half_weights_ab -- /tmp/lcm-bench-sd15 [ROUNDS] [SIZE]`

use candle_core::{Device, Tensor};
use lcm::models::unet::UNetConditioning;
use lcm::pipelines::{conditioning, LcmPipeline, LoadOptions, WeightDType};
use std::time::Instant;

#[global_allocator]
static ALLOC: lcm::alloc::CachingAllocator = lcm::alloc::CachingAllocator;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = args.get(1).map(String::as_str).unwrap_or("/tmp/lcm-bench-sd15");
    let rounds: usize = args.get(2).map_or(Ok(2), |s| s.parse())?;
    let size: usize = args.get(3).map_or(Ok(512), |s| s.parse())?;
    let dtypes = [WeightDType::F32, WeightDType::F16, WeightDType::BF16];
    let pipes: Vec<LcmPipeline> = dtypes
        .iter()
        .map(|&dtype| LcmPipeline::load(dir, &LoadOptions { dtype, ..Default::default() }))
        .collect::<anyhow::Result<_>>()?;
    let dev = Device::Cpu;
    let c0 = &pipes[0].components;
    let lat = size / pipes[0].vae_scale_factor();
    let x = Tensor::randn(0f32, 1.0, (1, c0.vae.latent_channels(), lat, lat), &dev)?;
    let text: Vec<_> = pipes
        .iter()
        .map(|p| {
            conditioning::encode_text(
                &p.components,
                "a photograph of an astronaut riding a horse",
                None,
                false,
                1,
                (size, size),
                &dev,
            )
        })
        .collect::<anyhow::Result<_>>()?;
    let mut unet = vec![Vec::new(); dtypes.len()];
    let mut vae = vec![Vec::new(); dtypes.len()];
    // Round 0 warms up (allocator cache, page faults) and is not counted.
    for round in 0..=rounds {
        for (i, p) in pipes.iter().enumerate() {
            let c = &p.components;
            let cond = UNetConditioning { added_cond: text[i].added_cond.clone(), ..Default::default() };
            let t = Instant::now();
            c.unet.forward(&x, 999.0, &text[i].prompt_embeds, &cond)?.sum_all()?.to_scalar::<f32>()?;
            let u = t.elapsed().as_secs_f64();
            let t = Instant::now();
            c.vae.decode(&x)?.sum_all()?.to_scalar::<f32>()?;
            let v = t.elapsed().as_secs_f64();
            eprintln!("round {round} {}: UNet step {u:.3} s, VAE decode {v:.3} s", dtypes[i]);
            if round > 0 {
                unet[i].push(u);
                vae[i].push(v);
            }
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    for (i, d) in dtypes.iter().enumerate() {
        let ru: Vec<String> = unet[i].iter().zip(&unet[0]).map(|(a, b)| format!("{:.3}", a / b)).collect();
        let rv: Vec<String> = vae[i].iter().zip(&vae[0]).map(|(a, b)| format!("{:.3}", a / b)).collect();
        println!(
            "{d}: UNet step mean {:.3} s (per-round ratio to f32 {}), VAE decode mean {:.3} s (ratio {})",
            mean(&unet[i]),
            ru.join(" / "),
            mean(&vae[i]),
            rv.join(" / ")
        );
    }
    Ok(())
}
