//! LoRA key layouts: every key of the real LoRA listings maps onto the real models' weights, and
//! LoRAs for another base model are refused with a clear error.
mod common;

use candle_core::{DType, Tensor};
use lcm::loaders::lora::{LoraComponent, LoraFile, WeightIndex};
use std::collections::HashMap;

/// `name [d0,d1,...] DTYPE` lines of a `keys.txt` listing.
fn listing(rel: &str) -> Vec<(String, Vec<usize>)> {
    let path = common::fixtures().join("real_configs").join(rel);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let mut parts = l.split_whitespace();
            let name = parts.next().unwrap().to_string();
            let dims = parts.next().unwrap().trim_matches(|c| c == '[' || c == ']');
            let shape = if dims.is_empty() { vec![] } else { dims.split(',').map(|d| d.parse().unwrap()).collect() };
            (name, shape)
        })
        .collect()
}

struct Listed {
    names: Vec<String>,
    shapes: HashMap<String, Vec<usize>>,
}

impl Listed {
    fn new(rel: &str) -> Self {
        let l = listing(rel);
        Self { names: l.iter().map(|(n, _)| n.clone()).collect(), shapes: l.into_iter().collect() }
    }
}

impl WeightIndex for Listed {
    fn names(&self) -> &[String] {
        &self.names
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.shapes.get(name).cloned()
    }
}

/// A LoRA file with the listing's names and shapes (cheap broadcast zeros, not real weights).
fn lora_from_listing(rel: &str) -> LoraFile {
    let tensors: HashMap<String, Tensor> = listing(rel)
        .into_iter()
        .map(|(n, s)| {
            let t = if s.is_empty() {
                Tensor::new(8f32, &candle_core::Device::Cpu).unwrap()
            } else {
                Tensor::zeros((), DType::F32, &candle_core::Device::Cpu).unwrap().broadcast_as(s).unwrap()
            };
            (n, t)
        })
        .collect();
    LoraFile::from_tensors(rel, tensors, HashMap::new()).unwrap()
}

fn module_count(rel: &str, prefix: &str) -> usize {
    listing(rel).iter().filter(|(n, _)| n.starts_with(prefix) && n.ends_with(".lora_down.weight")).count()
}

#[test]
fn every_lcm_lora_sdv1_5_key_maps_to_the_real_sd15_unet() {
    let rel = "loras/latent-consistency__lcm-lora-sdv1-5/keys.txt";
    let lora = lora_from_listing(rel);
    assert_eq!(lora.components(), vec![LoraComponent::Unet]);
    let unet = Listed::new("sd15/unet/keys.txt");
    let (deltas, unmatched) = lora.deltas_for(LoraComponent::Unet, &unet).unwrap();
    assert!(unmatched.is_empty(), "unmatched: {unmatched:?}");
    let applied: usize = deltas.by_weight.values().map(Vec::len).sum();
    assert_eq!(applied, module_count(rel, "lora_unet_"));
    assert_eq!(applied, lora.num_modules());
    assert!(applied > 250, "{applied}");
    // The listing's `.alpha` scalars are given the value 8 here: scale = alpha / rank = 8 / 64.
    assert!(deltas.by_weight.values().flatten().all(|d| (d.scale - 0.125).abs() < 1e-12));
}

#[test]
fn every_typical_kohya_key_maps_to_the_real_sd15_unet_and_text_encoder() {
    let rel = "loras/kohya-ss__typical-sd15-lora/keys.txt";
    let lora = lora_from_listing(rel);
    let unet = Listed::new("sd15/unet/keys.txt");
    let te = Listed::new("sd15/text_encoder/keys.txt");
    let (u, un) = lora.deltas_for(LoraComponent::Unet, &unet).unwrap();
    let (t, tn) = lora.deltas_for(LoraComponent::TextEncoder, &te).unwrap();
    assert!(un.is_empty() && tn.is_empty(), "{un:?} {tn:?}");
    assert_eq!(u.by_weight.len(), module_count(rel, "lora_unet_"));
    assert_eq!(t.by_weight.len(), module_count(rel, "lora_te_"));
    assert!(t.by_weight.keys().all(|k| k.starts_with("text_model.encoder.layers.")));
}

#[test]
fn text_encoder_loras_map_onto_the_unprefixed_transformers5_layout_too() {
    let lora = lora_from_listing("loras/kohya-ss__typical-sd15-lora/keys.txt");
    let mut te = Listed::new("sd15/text_encoder/keys.txt");
    te.names = te.names.iter().map(|n| n.trim_start_matches("text_model.").to_string()).collect();
    te.shapes = te.shapes.into_iter().map(|(k, v)| (k.trim_start_matches("text_model.").to_string(), v)).collect();
    let (t, tn) = lora.deltas_for(LoraComponent::TextEncoder, &te).unwrap();
    assert!(tn.is_empty());
    assert!(t.by_weight.keys().all(|k| k.starts_with("encoder.layers.")));
}

#[test]
fn every_lcm_lora_sdxl_key_maps_to_the_real_sdxl_unet() {
    let lora = lora_from_listing("loras/latent-consistency__lcm-lora-sdxl/keys.txt");
    let (_, unmatched) = lora.deltas_for(LoraComponent::Unet, &Listed::new("sdxl/unet/keys.txt")).unwrap();
    assert!(unmatched.is_empty(), "unmatched: {:?}", &unmatched[..unmatched.len().min(5)]);
}

#[test]
fn sdxl_lora_on_sd15_says_it_is_for_another_base_model() {
    let lora = lora_from_listing("loras/latent-consistency__lcm-lora-sdxl/keys.txt");
    let err = lora.deltas_for(LoraComponent::Unet, &Listed::new("sd15/unet/keys.txt")).err().expect("must fail");
    assert!(err.to_string().contains("another base model"), "{err}");
}
