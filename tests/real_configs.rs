//! The real UNet configs of the models the project targets (SD1.5, SD1.5 inpainting, LCM
//! Dreamshaper, SDXL, SSD-1B, LCM-SDXL, LCM-SSD-1B) build at full size with random weights and
//! run one denoising step at a small latent size.
mod common;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use lcm::models::unet_2d_condition::{AddedCond, UNet2DConditionConfig, UNet2DConditionModel, UNetConditioning};
use std::sync::atomic::{AtomicU64, Ordering};

/// Fast deterministic random weights: uniform in ±sqrt(3 / fan_in) for matrices and kernels,
/// ones for norm scales, zeros for biases.
struct RandomWeights {
    state: AtomicU64,
}

impl SimpleBackend for RandomWeights {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let dims = s.dims();
        let n = s.elem_count();
        if dims.len() == 1 {
            let v = if name.ends_with("weight") { 1.0 } else { 0.0 };
            return Tensor::full(v as f32, s, dev)?.to_dtype(dtype);
        }
        let fan_in: usize = dims[1..].iter().product();
        let bound = (3.0 / fan_in as f32).sqrt();
        let mut x = self.state.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed) | 1;
        let data: Vec<f32> = (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * bound
            })
            .collect();
        Tensor::from_vec(data, s, dev)?.to_dtype(dtype)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("no shape for {name}")
    }
    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

fn run_one_step(model: &str) {
    let path = common::fixtures().join("real_configs").join(model).join("unet/config.json");
    let cfg: UNet2DConditionConfig = lcm::config::read_config(&path).unwrap();
    let dev = Device::Cpu;
    let vb = VarBuilder::from_backend(Box::new(RandomWeights { state: AtomicU64::new(1) }), DType::F32, dev.clone());
    let unet = UNet2DConditionModel::new(vb, &cfg).unwrap_or_else(|e| panic!("{model}: {e:#}"));
    let raw: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let cross = raw["cross_attention_dim"].as_u64().unwrap() as usize;
    let sample = Tensor::randn(0f32, 1.0, (1, cfg.in_channels, 8, 8), &dev).unwrap();
    let ehs = Tensor::randn(0f32, 1.0, (1, 77, cross), &dev).unwrap();
    let mut cond = UNetConditioning::default();
    if raw["addition_embed_type"] == "text_time" {
        let time_dim = raw["addition_time_embed_dim"].as_u64().unwrap() as usize;
        let pooled = raw["projection_class_embeddings_input_dim"].as_u64().unwrap() as usize - 6 * time_dim;
        cond.added_cond = Some(AddedCond {
            text_embeds: Tensor::randn(0f32, 1.0, (1, pooled), &dev).unwrap(),
            time_ids: Tensor::new(&[[1024f32, 1024., 0., 0., 1024., 1024.]], &dev).unwrap(),
        });
    }
    if let Some(d) = cfg.time_cond_proj_dim {
        cond.timestep_cond = Some(Tensor::randn(0f32, 1.0, (1, d), &dev).unwrap());
    }
    let out = unet.forward(&sample, 999.0, &ehs, &cond).unwrap_or_else(|e| panic!("{model}: {e:#}"));
    assert_eq!(out.dims(), &[1, 4, 8, 8], "{model}");
    let v = common::to_vec_f32(&out);
    assert!(v.iter().all(|x| x.is_finite()), "{model}: non-finite output");
    assert!(v.iter().any(|x| *x != 0.0), "{model}: all-zero output");
}

/// One test, models one after another, so at most one full-size UNet (SDXL: ~10 GB in f32) is
/// in memory at a time.
#[test]
fn real_unet_configs_run_one_step() {
    for model in ["sd15", "sd15-inpainting", "lcm-dreamshaper-v7", "ssd-1b", "lcm-ssd-1b", "sdxl", "lcm-sdxl"] {
        let t = std::time::Instant::now();
        run_one_step(model);
        eprintln!("{model}: built and ran one step in {:.1}s", t.elapsed().as_secs_f64());
    }
}
