//! Image-to-image and inpainting against diffusers' Img2Img / Inpaint pipelines (SD1.5 and SDXL
//! shapes, LCM UNets and LCM-LoRA, 9- and 4-channel inpainting, non-square inputs that need
//! resizing): images within 2/255; preprocessing (PIL Lanczos resize, masks) exact.
use crate::common;

use lcm::image_processor::{preprocess_image, preprocess_mask, Image8};
use lcm::pipelines::{GenerateRequest, LcmPipeline, LoadOptions, PipelineKind};

fn kind(name: &str) -> PipelineKind {
    if name.starts_with("LatentConsistencyModel") {
        PipelineKind::LatentConsistencyModel
    } else if name.starts_with("StableDiffusionXL") {
        PipelineKind::StableDiffusionXL
    } else {
        PipelineKind::StableDiffusion
    }
}

#[test]
fn img2img_and_inpaint_pipelines_match_diffusers() {
    let listing = common::reference_json("img2img_pipelines.json");
    let refs = common::reference("img2img_pipelines.safetensors");
    let fx = common::fixtures();
    let mut ran = 0;
    let mut worst = 0;
    for case in listing["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        if !case["extra_call_kwargs"].as_object().unwrap().is_empty() {
            continue; // explicit SDXL size/aesthetic conditioning is not exposed
        }
        let loras = common::lora_specs(case, 1.0);
        let opts = LoadOptions {
            unet: case["unet_override"].as_str().map(|u| fx.join(u).to_string_lossy().into_owned()),
            loras,
            ..Default::default()
        };
        let model = fx.join(case["model"].as_str().unwrap());
        let opts = LoadOptions { pipeline: Some(kind(case["pipeline"].as_str().unwrap())), ..opts };
        let pipe = LcmPipeline::load(model.to_str().unwrap(), &opts).unwrap();
        let g = case["guidance_scale"].as_f64().unwrap();
        let is_inpaint = !case["mask"].is_null();
        // diffusers' inpainting pipelines default to the UNet's size; pass the size they used.
        let size = |k: &str| case[k].as_u64().or(if is_inpaint { case[&format!("output_{k}")].as_u64() } else { None });
        let req = GenerateRequest {
            prompt: case["prompt"].as_str().unwrap().into(),
            negative_prompt: case["negative_prompt"].as_str().map(String::from),
            num_inference_steps: case["num_inference_steps"].as_u64().unwrap() as usize,
            guidance_scale: Some(g),
            width: size("width").map(|v| v as usize),
            height: size("height").map(|v| v as usize),
            seed: case["seed"].as_u64().unwrap(),
            num_images_per_prompt: case["num_images_per_prompt"].as_u64().unwrap() as usize,
            image: Some(Image8::read(&fx.join(case["image"].as_str().unwrap())).unwrap()),
            mask_image: case["mask"].as_str().map(|m| Image8::read(&fx.join(m)).unwrap()),
            strength: case["strength"].as_f64(),
            ..Default::default()
        };
        let cfg = pipe.plan(&req).unwrap().do_classifier_free_guidance;
        assert_eq!(cfg, case["classifier_free_guidance_used"].as_bool().unwrap(), "{name}: cfg");
        let mut steps = 0;
        let images = pipe.generate(&req, |_, _| steps += 1).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert_eq!(steps, case["timesteps"].as_array().unwrap().len(), "{name}: steps");
        assert_eq!(
            (images[0].width as u64, images[0].height as u64),
            (case["output_width"].as_u64().unwrap(), case["output_height"].as_u64().unwrap()),
            "{name}"
        );
        let got: Vec<u8> = images.iter().flat_map(|i| i.pixels.iter().copied()).collect();
        let want = refs[case["tensor"].as_str().unwrap()].flatten_all().unwrap().to_vec1::<u8>().unwrap();
        assert_eq!(got.len(), want.len(), "{name}");
        let d = got.iter().zip(&want).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
        eprintln!("{name}: max diff {d}");
        worst = worst.max(d);
        ran += 1;
        assert!(d <= 2, "{name}: max pixel difference {d}/255");
    }
    assert!(ran >= 18, "{ran}");
    eprintln!("worst img2img/inpaint pixel difference: {worst}/255 over {ran} cases");
}

/// PIL's Lanczos resize, normalization, grayscale conversion and binarization, exactly.
#[test]
fn preprocessing_matches_vae_image_processor_exactly() {
    let refs = common::reference("img2img_preprocess.safetensors");
    let dev = candle_core::Device::Cpu;
    let mut checked = 0;
    for (key, want) in &refs {
        let mut parts = key.splitn(3, '.');
        let (kind, image, size) = (parts.next().unwrap(), parts.next().unwrap(), parts.next());
        let Some((h, w)) = size.and_then(|s| s.split_once('x')) else { continue };
        let (Ok(h), Ok(w)) = (h.parse::<usize>(), w.parse::<usize>()) else { continue };
        let img = Image8::read(&common::fixtures().join(format!("images/{image}.png"))).unwrap();
        match kind {
            "resized_u8" | "mask_resized_u8" => {
                let mut r = img.resize_lanczos(w, h);
                if kind == "mask_resized_u8" {
                    r = r.to_grayscale();
                }
                assert_eq!(r.pixels, want.flatten_all().unwrap().to_vec1::<u8>().unwrap(), "{key}");
            }
            "init" => {
                let got = preprocess_image(&img, w, h, &dev).unwrap();
                let d = common::max_abs_diff(&common::to_vec_f32(&got), &common::to_vec_f32(want));
                assert!(d <= 1e-6, "{key}: max abs diff {d}");
            }
            "mask" => {
                let got = preprocess_mask(&img, w, h, &dev).unwrap();
                assert_eq!(common::to_vec_f32(&got), common::to_vec_f32(want), "{key}");
            }
            _ => continue,
        }
        checked += 1;
    }
    assert!(checked >= 15, "{checked}");
}
