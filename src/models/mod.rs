//! Networks, each built from its diffusers / transformers `config.json`.
pub mod attention;
pub mod autoencoder;
pub mod autoencoder_kl;
pub mod autoencoder_tiny;
pub mod clip_text_model;
pub mod clip_tokenizer;
pub mod controlnet;
pub mod embeddings;
pub mod motion_adapter;
pub mod resnet;
pub mod t2i_adapter;
pub mod unet_2d_blocks;
pub mod unet_2d_condition;
pub mod unet_down_path;
pub mod vae;
