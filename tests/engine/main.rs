//! The engine library's tests, one module per part, in one test binary (one link instead of
//! one per file). Most compare against references diffusers made with the scripts in
//! `tests/fixtures/`.

#[path = "../common/mod.rs"]
mod common;

mod animatediff;
mod autoencoder_tiny;
mod canny;
mod clip;
mod controlnet;
mod device;
mod half;
mod img2img;
mod int8;
mod lora;
mod pipeline;
mod real_configs;
mod rng;
mod scheduler;
mod sdxl;
mod single_file;
mod t2i_adapter;
mod unet;
mod vae;
mod vae_replacement;
