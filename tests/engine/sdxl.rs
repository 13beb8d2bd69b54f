//! SDXL: two text encoders, pooled embeddings and `add_time_ids`, through
//! `StableDiffusionXLPipeline` + `LCMScheduler` semantics; images within 2/255 of diffusers'.
use crate::common;

use lcm::models::unet::{AddedCond, UNet2DConditionConfig, UNet2DConditionModel, UNetConditioning};
use lcm::pipelines::{conditioning, GenerateRequest, LcmPipeline, LoadOptions, LoraSpec, PipelineKind};

fn model_dir() -> String {
    common::fixtures().join("models/tiny-sdxl").to_string_lossy().into_owned()
}

#[test]
fn sdxl_pipelines_match_diffusers() {
    let listing = common::reference_json("sdxl_pipelines.json");
    let refs = common::reference("sdxl_pipelines.safetensors");
    let cases = listing["cases"].as_array().unwrap();
    assert!(cases.len() >= 7);
    let fx = common::fixtures();
    let mut worst = 0;
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let loras = common::lora_specs(case, 1.0);
        let opts = LoadOptions {
            unet: case["unet_override"].as_str().map(|u| fx.join(u).to_string_lossy().into_owned()),
            loras,
            ..Default::default()
        };
        let pipe = LcmPipeline::load(&model_dir(), &opts).unwrap();
        assert_eq!(pipe.kind(), PipelineKind::StableDiffusionXL);
        assert_eq!(pipe.default_size(), (32, 32));
        for r in &pipe.components.lora_reports {
            assert!(r.unmatched_keys.is_empty(), "{name}: {:?}", r.warning());
            assert_eq!(r.matched_modules, 168);
        }
        let g = case["guidance_scale"].as_f64().unwrap();
        let req = GenerateRequest {
            prompt: case["prompt"].as_str().unwrap().into(),
            negative_prompt: case["negative_prompt"].as_str().map(String::from),
            num_inference_steps: case["num_inference_steps"].as_u64().unwrap() as usize,
            guidance_scale: Some(g),
            width: Some(case["width"].as_u64().unwrap() as usize),
            height: Some(case["height"].as_u64().unwrap() as usize),
            seed: case["seed"].as_u64().unwrap(),
            num_images_per_prompt: case["num_images_per_prompt"].as_u64().unwrap() as usize,
            ..Default::default()
        };
        let cfg = pipe.plan(&req).unwrap().do_classifier_free_guidance;
        assert_eq!(cfg, case["classifier_free_guidance_used"].as_bool().unwrap(), "{name}");
        let images = pipe.generate(&req, |_, _| {}).unwrap();
        let got: Vec<u8> = images.iter().flat_map(|i| i.pixels.iter().copied()).collect();
        let want = refs[case["tensor"].as_str().unwrap()].flatten_all().unwrap().to_vec1::<u8>().unwrap();
        assert_eq!(got.len(), want.len(), "{name}");
        let d = got.iter().zip(&want).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
        worst = worst.max(d);
        assert!(d <= 2, "{name}: max pixel difference {d}/255");
    }
    eprintln!("worst SDXL pixel difference: {worst}/255");
}

#[test]
fn sdxl_prompt_encoding_matches_encode_prompt() {
    let refs = common::reference("sdxl_modules.safetensors");
    let listing = common::reference_json("sdxl_modules.json");
    let enc = &listing["encode_prompt"];
    let pipe = LcmPipeline::load(&model_dir(), &LoadOptions::default()).unwrap();
    let dev = candle_core::Device::Cpu;
    let prompt = enc["prompt"].as_str().unwrap();
    let negative = enc["negative_prompt"].as_str().unwrap();
    for (neg, prefix) in [(Some(negative), ""), (None, "zero.")] {
        let t = conditioning::encode_text(&pipe.components, prompt, neg, true, 1, (32, 32), &dev).unwrap();
        let added = t.added_cond.unwrap();
        let (neg_e, pos_e) = (t.prompt_embeds.narrow(0, 0, 1).unwrap(), t.prompt_embeds.narrow(0, 1, 1).unwrap());
        let (neg_p, pos_p) = (added.text_embeds.narrow(0, 0, 1).unwrap(), added.text_embeds.narrow(0, 1, 1).unwrap());
        assert!(common::rel_l2(&pos_e, &refs["prompt_embeds"]) < 1e-4);
        assert!(common::rel_l2(&pos_p, &refs["pooled_prompt_embeds"]) < 1e-4);
        let want_neg = &refs[&format!("{prefix}negative_prompt_embeds")];
        let want_neg_p = &refs[&format!("{prefix}negative_pooled_prompt_embeds")];
        if prefix.is_empty() {
            assert!(common::rel_l2(&neg_e, want_neg) < 1e-4, "negative embeds");
            assert!(common::rel_l2(&neg_p, want_neg_p) < 1e-4, "negative pooled");
        } else {
            assert_eq!(common::to_vec_f32(&neg_e), common::to_vec_f32(want_neg), "zero negative");
            assert_eq!(common::to_vec_f32(&neg_p), common::to_vec_f32(want_neg_p), "zero negative pooled");
        }
        let ids = common::to_vec_f32(&added.time_ids.narrow(0, 1, 1).unwrap());
        assert_eq!(ids, common::to_vec_f32(&refs["add_time_ids"]));
    }
}

#[test]
fn sdxl_unets_match_diffusers() {
    let refs = common::reference("sdxl_modules.safetensors");
    let fx = common::fixtures().join("models");
    for (prefix, dir) in [("unet", fx.join("tiny-sdxl/unet")), ("unet_lcm", fx.join("tiny-sdxl-lcm-unet"))] {
        let cfg: UNet2DConditionConfig = lcm::config::read_config(&dir.join("config.json")).unwrap();
        let vb = lcm::loaders::weights::load_component(&dir, None, candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap();
        let unet = UNet2DConditionModel::new(vb, &cfg).unwrap();
        let r = |k: &str| refs[&format!("{prefix}.{k}")].clone();
        let cond = UNetConditioning {
            added_cond: Some(AddedCond { text_embeds: r("text_embeds"), time_ids: r("time_ids") }),
            timestep_cond: refs.get(&format!("{prefix}.timestep_cond")).cloned(),
            ..Default::default()
        };
        let t = r("timestep");
        let out = unet.forward(&r("sample"), &t, &r("encoder_hidden_states"), &cond).unwrap();
        let err = common::rel_l2(&out, &r("out"));
        assert!(err < 1e-4, "{prefix}: {err}");
    }
}

#[test]
fn real_sdxl_lora_on_sd15_and_sd15_lora_on_sdxl_are_refused() {
    let fx = common::fixtures();
    let sd15 = fx.join("models/tiny-sd");
    let mut pipe = LcmPipeline::load(sd15.to_str().unwrap(), &LoadOptions::default()).unwrap();
    let sdxl_lora = LoraSpec::parse(fx.join("loras/sdxl_lcm_like").to_str().unwrap()).unwrap();
    let err = pipe.load_loras(&[sdxl_lora]).expect_err("SDXL LoRA on SD1.5 must fail").to_string();
    assert!(err.contains("another base model") || err.contains("matches nothing"), "{err}");
}
