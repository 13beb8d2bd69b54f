//! Any bytes as each `config.json` / `scheduler_config.json` / `model_index.json` we read: parse,
//! validate, and for the scheduler set its timesteps as a request would.
#![no_main]
mod common;
use lcm::models::vae::{kl::AutoencoderKLConfig, tiny::AutoencoderTinyConfig};
use lcm::models::{clip_text_model::ClipTextConfig, unet::UNet2DConditionConfig};
use lcm::schedulers::{LcmScheduler, LcmSchedulerConfig, TimestepRequest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<UNet2DConditionConfig>(data);
    let _ = serde_json::from_slice::<AutoencoderKLConfig>(data);
    let _ = serde_json::from_slice::<AutoencoderTinyConfig>(data);
    let _ = serde_json::from_slice::<ClipTextConfig>(data);
    if let Ok(config) = serde_json::from_slice::<LcmSchedulerConfig>(data) {
        if let Ok(mut s) = LcmScheduler::new(config) {
            for steps in [1, 4, 8] {
                let _ = s.set_timesteps(&TimestepRequest {
                    num_inference_steps: Some(steps),
                    original_inference_steps: None,
                    timesteps: None,
                    strength: Some(1.0),
                });
            }
        }
    }
    let index = common::scratch("model_index.json", data);
    let _ = lcm::loaders::ModelIndex::read(index.parent().unwrap());
});
