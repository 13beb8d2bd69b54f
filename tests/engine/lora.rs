//! LoRA key layouts: every key of the real LoRA listings maps onto the real models' weights, and
//! LoRAs for another base model are refused with a clear error.
use crate::common;

use candle_core::{DType, Tensor};
use lcm::loaders::lora::{LoraComponent, LoraFile, WeightIndex};
use std::collections::HashMap;

/// `name [d0,d1,...] DTYPE` lines of a `keys.txt` listing.
fn listing(rel: &str) -> Vec<(String, Vec<usize>)> {
    common::read_keys(&common::fixtures().join("real_configs").join(rel)).into_iter().collect()
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
    let err = lora.deltas_for(LoraComponent::Unet, &Listed::new("sd15/unet/keys.txt")).expect_err("must fail");
    assert!(err.to_string().contains("another base model"), "{err}");
}

mod parity {
    use super::common;
    use lcm::pipelines::{GenerateRequest, LcmPipeline, LoadOptions, LoraSpec, PipelineKind};

    /// `fuse_lora(lora_scale=k)` multiplies every adapter weight by k.
    /// The tiny SD1.5 model through `StableDiffusionPipeline`, as the references were made.
    fn sd_options() -> LoadOptions {
        LoadOptions { pipeline: Some(PipelineKind::StableDiffusion), ..Default::default() }
    }

    fn specs(case: &serde_json::Value) -> Vec<LoraSpec> {
        common::lora_specs(case, case["fuse_lora_scale"].as_f64().unwrap_or(1.0))
    }

    fn request(case: &serde_json::Value) -> GenerateRequest {
        GenerateRequest {
            prompt: case["prompt"].as_str().unwrap().to_string(),
            negative_prompt: case["negative_prompt"].as_str().map(String::from),
            num_inference_steps: case["num_inference_steps"].as_u64().unwrap() as usize,
            guidance_scale: case["guidance_scale"].as_f64(),
            width: case["width"].as_u64().map(|v| v as usize),
            height: case["height"].as_u64().map(|v| v as usize),
            seed: case["seed"].as_u64().unwrap(),
            num_images_per_prompt: case["num_images_per_prompt"].as_u64().unwrap_or(1) as usize,
            original_inference_steps: None,
            timesteps: None,
            ..Default::default()
        }
    }

    fn max_diff(images: &[lcm::image_io::RgbImage], want: &[u8]) -> u8 {
        let got: Vec<u8> = images.iter().flat_map(|i| i.pixels.iter().copied()).collect();
        assert_eq!(got.len(), want.len());
        got.iter().zip(want).map(|(a, b)| a.abs_diff(*b)).max().unwrap()
    }

    /// Every case: LoRAs fused at load give diffusers' (unfused PEFT) images within 2/255.
    #[test]
    fn lora_pipelines_match_diffusers() {
        let listing = common::reference_json("lora_pipelines.json");
        let refs = common::reference("lora_pipelines.safetensors");
        let cases = listing["cases"].as_array().unwrap();
        assert!(cases.len() >= 10);
        let model = common::fixtures().join("models/tiny-sd");
        let mut worst = 0;
        for case in cases {
            let name = case["name"].as_str().unwrap();
            let opts =
                LoadOptions { loras: specs(case), pipeline: Some(PipelineKind::StableDiffusion), ..Default::default() };
            let pipe = LcmPipeline::load(model.to_str().unwrap(), &opts).unwrap();
            for r in &pipe.components.lora_reports {
                if name.starts_with("partial") {
                    // Like diffusers: the 6 valid modules apply, the 12 unknown tensors are
                    // reported (diffusers logs "unexpected keys").
                    assert_eq!((r.matched_modules, r.unmatched_keys.len()), (6, 12), "{name}");
                    assert!(r.warning().unwrap().contains("12 of its keys match nothing"), "{:?}", r.warning());
                } else {
                    assert!(r.unmatched_keys.is_empty(), "{name}: {:?}", r.warning());
                }
            }
            let images = pipe.generate(&request(case), |_, _| {}).unwrap();
            let want = refs[case["tensor"].as_str().unwrap_or(name)].flatten_all().unwrap().to_vec1::<u8>().unwrap();
            let d = max_diff(&images, &want);
            worst = worst.max(d);
            assert!(d <= 2, "{name}: max pixel difference {d}/255");
        }
        eprintln!("worst pixel difference over all LoRA cases: {worst}/255");
    }

    /// Loading adapters one by one and weighting them with `set_adapters` gives the same images
    /// as loading them with their weights; deleting an adapter gives the image without it.
    #[test]
    fn set_adapters_and_delete_without_reloading() {
        let listing = common::reference_json("lora_pipelines.json");
        let refs = common::reference("lora_pipelines.safetensors");
        let cases = listing["cases"].as_array().unwrap();
        let both = cases.iter().find(|c| c["loras"].as_array().unwrap().len() == 2).expect("a two-adapter case");
        let model = common::fixtures().join("models/tiny-sd");
        let mut pipe = LcmPipeline::load(model.to_str().unwrap(), &sd_options()).unwrap();
        let mut specs = specs(both);
        let weights: Vec<f64> = specs.iter().map(|s| s.weight).collect();
        for (i, s) in specs.iter_mut().enumerate() {
            s.weight = 1.0;
            s.adapter_name = Some(format!("a{i}"));
        }
        pipe.load_loras(&specs).unwrap();
        pipe.set_adapters(&[("a0", weights[0]), ("a1", weights[1])]).unwrap();
        let want = refs[both["tensor"].as_str().unwrap()].flatten_all().unwrap().to_vec1::<u8>().unwrap();
        let d = max_diff(&pipe.generate(&request(both), |_, _| {}).unwrap(), &want);
        assert!(d <= 2, "set_adapters: {d}/255");

        assert!(pipe.set_adapters(&[("nope", 1.0)]).is_err());
        pipe.delete_adapter("a0").unwrap();
        pipe.delete_adapter("a1").unwrap();
        let plain = LcmPipeline::load(model.to_str().unwrap(), &sd_options()).unwrap();
        let a = pipe.generate(&request(both), |_, _| {}).unwrap();
        let b = plain.generate(&request(both), |_, _| {}).unwrap();
        assert_eq!(a, b, "after deleting every adapter the base model is back");
    }
}

/// The fused weights equal diffusers' `fuse_lora()` weights (kohya LoCon: 3x3 conv, attention
/// linear, text encoder linear).
#[test]
fn fused_weights_equal_diffusers_fuse_lora() {
    use lcm::loaders::weights::ComponentWeights;
    let refs = common::reference("lora_unet_deltas.safetensors");
    let lora = LoraFile::read(&common::fixtures().join("loras/kohya/style_lora.safetensors")).unwrap();
    let models = common::fixtures().join("models/tiny-sd");
    let mut checked = 0;
    for (name, want) in &refs {
        let (comp, dir, weight) = if let Some(w) = name.strip_prefix("unet.") {
            (LoraComponent::Unet, "unet", w)
        } else {
            (LoraComponent::TextEncoder, "text_encoder", name.strip_prefix("text_encoder.").unwrap())
        };
        let weights = ComponentWeights::open(&models.join(dir), None).unwrap();
        let (deltas, _) = lora.deltas_for(comp, &weights).unwrap();
        let vb = weights.var_builder(Some(std::sync::Arc::new(deltas)), DType::F32, &candle_core::Device::Cpu);
        let got = vb.get(want.shape(), weight).unwrap();
        let err = common::rel_l2(&got, want);
        assert!(err < 1e-6, "{name}: rel err {err}");
        checked += 1;
    }
    assert!(checked >= 3);
}
