//! Any tensor listing (`name d0,d1,...` per line) as the keys of a single-file checkpoint
//! (architecture detection and the renaming of each component) and of a LoRA file (its key
//! formats mapped onto the same listing as the base weights).
#![no_main]
use candle_core::{DType, Device, Tensor};
use lcm::loaders::lora::{LoraComponent, LoraFile, WeightIndex};
use lcm::loaders::single_file::{map_listing, Architecture, Component};
use libfuzzer_sys::fuzz_target;
use std::collections::HashMap;

struct Listing(Vec<String>, HashMap<String, Vec<usize>>);

impl WeightIndex for Listing {
    fn names(&self) -> &[String] {
        &self.0
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.1.get(name).cloned()
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut listing: Vec<(String, Vec<usize>)> = Vec::new();
    for line in text.lines().take(256) {
        let mut parts = line.split_whitespace();
        let (Some(name), dims) = (parts.next(), parts.next().unwrap_or("")) else { continue };
        // Small tensors only: the shapes, not the sizes, are what is under test.
        let shape: Vec<usize> = dims
            .trim_matches(|c| c == '[' || c == ']')
            .split(',')
            .filter_map(|d| d.parse().ok())
            .map(|d: usize| d % 65)
            .take(4)
            .collect();
        listing.push((name.to_string(), shape));
    }
    let shapes: HashMap<String, Vec<usize>> = listing.iter().cloned().collect();
    if let Ok(arch) = Architecture::detect(|n| shapes.get(n).cloned()) {
        for c in [Component::Unet, Component::Vae, Component::TextEncoder, Component::TextEncoder2] {
            let _ = map_listing(arch, c, &listing, 2, 4);
        }
    }
    let tensors: HashMap<String, Tensor> = shapes
        .iter()
        .filter_map(|(n, s)| Some((n.clone(), Tensor::zeros(s.as_slice(), DType::F32, &Device::Cpu).ok()?)))
        .collect();
    if let Ok(lora) = LoraFile::from_tensors("fuzz", tensors, HashMap::new()) {
        let index = Listing(listing.iter().map(|(n, _)| n.clone()).collect(), shapes);
        for c in [LoraComponent::Unet, LoraComponent::TextEncoder, LoraComponent::TextEncoder2] {
            let _ = lora.deltas_for(c, &index);
        }
    }
});
