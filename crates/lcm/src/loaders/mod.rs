//! Resolving and loading models: local diffusers folders, the Hugging Face hub cache, weights.
pub mod hub;
pub mod lora;
pub mod model_index;
pub mod weights;

pub use hub::ModelSource;
pub use model_index::ModelIndex;
pub mod single_file;
