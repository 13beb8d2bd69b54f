//! Networks, each built from its diffusers / transformers `config.json`.
pub mod attention;
pub mod blocks;
pub mod clip_text_model;
pub mod clip_tokenizer;
pub mod controlnet;
pub mod embeddings;
pub mod resnet;
pub mod t2i_adapter;
pub mod unet;
pub mod vae;
