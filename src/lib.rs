//! Latent Consistency Model image generation on candle, seed-for-seed equal to diffusers.
pub mod config;
pub mod device;
pub mod loaders;
pub mod models;
pub mod nn;
pub mod ops;
pub mod kernels;
pub mod alloc;
pub mod random;
pub mod schedulers;
pub mod image_io;
pub mod pipelines;
pub mod image_processor;
pub mod canny;
pub mod benchmark;

/// The README's Rust examples, compiled by `cargo test` so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
