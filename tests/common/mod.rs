//! Helpers shared by the parity tests.
#![allow(dead_code)]

use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;

/// tests/fixtures, or `LCM_FIXTURES` (a test binary built here and run on another machine, as
/// scripts/device-check.sh does, finds the fixtures of the checkout it runs in).
pub fn fixtures() -> PathBuf {
    match std::env::var_os("LCM_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"),
    }
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

/// `name [d0,d1,...] DTYPE` per line; `#` lines are notes.
pub fn read_keys(path: &std::path::Path) -> std::collections::BTreeMap<String, Vec<usize>> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut keys = std::collections::BTreeMap::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let mut parts = line.split_whitespace();
        let name = parts.next().unwrap();
        let shape = parts.next().unwrap().trim_start_matches('[').trim_end_matches(']');
        let dims = shape.split(',').filter(|d| !d.is_empty()).map(|d| d.parse().unwrap()).collect();
        keys.insert(name.to_string(), dims);
    }
    keys
}

/// The weights a model requested equal a file's or listing's names and shapes.
pub fn assert_same_keys(
    what: &str,
    got: &std::collections::BTreeMap<String, Vec<usize>>,
    want: &std::collections::BTreeMap<String, Vec<usize>>,
) {
    let missing: Vec<_> = want.keys().filter(|k| !got.contains_key(*k)).collect();
    let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).collect();
    let shapes: Vec<_> = got
        .iter()
        .filter_map(|(k, s)| want.get(k).filter(|w| *w != s).map(|w| format!("{k}: model {s:?}, file {w:?}")))
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty() && shapes.is_empty(),
        "{what}: weights not requested {missing:?}\nrequested but absent {extra:?}\nshape differences {shapes:?}"
    );
}
