//! Helpers shared by the parity tests.
#![allow(dead_code)]

use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn reference(name: &str) -> HashMap<String, Tensor> {
    let path = fixtures().join("reference").join(name);
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot load {}: {e}", path.display()))
}

pub fn reference_json(name: &str) -> serde_json::Value {
    let path = fixtures().join("reference").join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

pub fn to_vec_f32(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_dtype(candle_core::DType::F32).unwrap().to_vec1().unwrap()
}

/// ||a - b|| / ||b||.
pub fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let (a, b) = (to_vec_f32(a), to_vec_f32(b));
    let num: f64 = a.iter().zip(&b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// The LoRAs of a reference case (`loras: [{path, weight_name, adapter_name, weight |
/// adapter_weight}]`, paths relative to tests/fixtures), each weight times `scale`.
pub fn lora_specs(case: &serde_json::Value, scale: f64) -> Vec<lcm::pipelines::LoraSpec> {
    case["loras"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| lcm::pipelines::LoraSpec {
            source: fixtures().join(l["path"].as_str().unwrap()).to_string_lossy().into_owned(),
            weight_name: l["weight_name"].as_str().map(String::from),
            adapter_name: l["adapter_name"].as_str().map(String::from),
            weight: l["weight"].as_f64().or(l["adapter_weight"].as_f64()).unwrap_or(1.0) * scale,
        })
        .collect()
}
