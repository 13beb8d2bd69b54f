//! End-to-end: the library's pipelines give diffusers' images (within 2/255 per pixel) for every
//! case in tests/fixtures/reference/pipelines.json.
use crate::common;

use lcm::pipelines::{GenerateRequest, LcmPipeline, LoadOptions, PipelineKind};

fn kind(name: &str) -> PipelineKind {
    match name {
        "LatentConsistencyModelPipeline" => PipelineKind::LatentConsistencyModel,
        "StableDiffusionPipeline" => PipelineKind::StableDiffusion,
        other => panic!("unknown pipeline {other}"),
    }
}

pub fn request_for(case: &serde_json::Value) -> GenerateRequest {
    GenerateRequest {
        prompt: case["prompt"].as_str().unwrap().to_string(),
        negative_prompt: case["negative_prompt"].as_str().map(String::from),
        num_inference_steps: case["num_inference_steps"].as_u64().unwrap() as usize,
        guidance_scale: case["guidance_scale"].as_f64(),
        width: Some(case["width"].as_u64().unwrap() as usize),
        height: Some(case["height"].as_u64().unwrap() as usize),
        seed: case["seed"].as_u64().unwrap(),
        num_images_per_prompt: case["num_images_per_prompt"].as_u64().unwrap() as usize,
        original_inference_steps: case["original_inference_steps"].as_u64().map(|v| v as usize),
        timesteps: None,
        ..Default::default()
    }
}

#[test]
fn pipelines_match_diffusers() {
    let listing = common::reference_json("pipelines.json");
    let refs = common::reference("pipelines.safetensors");
    let cases = listing["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    let fx = common::fixtures();
    let mut worst = 0u8;
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let opts = LoadOptions {
            unet: case["unet_override"].as_str().map(|u| fx.join(u).to_string_lossy().into_owned()),
            ..Default::default()
        };
        let model = fx.join(case["model"].as_str().unwrap());
        let opts = LoadOptions { pipeline: Some(kind(case["pipeline"].as_str().unwrap())), ..opts };
        let pipe = LcmPipeline::load(model.to_str().unwrap(), &opts).unwrap();
        let req = request_for(case);
        assert_eq!(
            pipe.plan(&req).unwrap().do_classifier_free_guidance,
            case["classifier_free_guidance_used"].as_bool().unwrap(),
            "{name}: classifier-free guidance"
        );
        let mut steps = 0;
        let images = pipe.generate(&req, |_, _| steps += 1).unwrap();
        assert_eq!(steps, case["timesteps"].as_array().unwrap().len(), "{name}");
        let want = refs[name].flatten_all().unwrap().to_vec1::<u8>().unwrap();
        let got: Vec<u8> = images.iter().flat_map(|i| i.pixels.iter().copied()).collect();
        assert_eq!(got.len(), want.len(), "{name}: size");
        let max = got.iter().zip(&want).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
        worst = worst.max(max);
        assert!(max <= 2, "{name}: max pixel difference {max}/255");
    }
    eprintln!("worst pixel difference over all cases: {worst}/255");
}

#[test]
fn pipeline_kind_follows_model_index() {
    let fx = common::fixtures().join("models");
    let lcm = LcmPipeline::load(fx.join("tiny-lcm").to_str().unwrap(), &LoadOptions::default()).unwrap();
    assert_eq!(lcm.kind(), PipelineKind::LatentConsistencyModel);
    let sd = LcmPipeline::load(fx.join("tiny-sd").to_str().unwrap(), &LoadOptions::default()).unwrap();
    assert_eq!(sd.kind(), PipelineKind::StableDiffusion);
    assert_eq!(sd.default_size(), (32, 32));
}

#[test]
fn bad_requests_are_errors() {
    let fx = common::fixtures().join("models");
    let pipe = LcmPipeline::load(fx.join("tiny-lcm").to_str().unwrap(), &LoadOptions::default()).unwrap();
    let ok = GenerateRequest { prompt: "x".into(), ..Default::default() };
    for bad in [
        GenerateRequest { width: Some(33), ..ok.clone() },
        GenerateRequest { height: Some(0), ..ok.clone() },
        GenerateRequest { num_inference_steps: 0, ..ok.clone() },
        GenerateRequest { num_images_per_prompt: 0, ..ok.clone() },
        GenerateRequest { num_inference_steps: 51, ..ok.clone() },
        GenerateRequest { guidance_scale: Some(f64::NAN), ..ok.clone() },
    ] {
        assert!(pipe.generate(&bad, |_, _| {}).is_err(), "{bad:?}");
    }
}
