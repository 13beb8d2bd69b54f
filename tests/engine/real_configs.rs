//! The real UNet configs of the models the project targets (SD1.5, SD1.5 inpainting, LCM
//! Dreamshaper, SDXL, SSD-1B, LCM-SDXL, LCM-SSD-1B) build at full size with random weights and
//! run one denoising step at a small latent size.
use crate::common;

use candle_core::{DType, Device, Tensor};
use lcm::models::unet::{AddedCond, UNet2DConditionConfig, UNet2DConditionModel, UNetConditioning};

fn run_one_step(model: &str) {
    let path = common::fixtures().join("real_configs").join(model).join("unet/config.json");
    let cfg: UNet2DConditionConfig = lcm::config::read_config(&path).unwrap();
    let dev = Device::Cpu;
    let vb = lcm::testing::random_var_builder(1, DType::F32, &dev);
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
