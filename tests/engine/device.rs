//! The pipelines on a device in half precision, against diffusers' float16 (and two bfloat16)
//! images (tests/fixtures/make_half_fixtures.py: `dtype=torch.float16`, CPU generator), made with
//! PyTorch 2.15 and 2.11.
//!
//! The device is `LCM_TEST_DEVICE` (`cpu` by default, `cuda` / `cuda:N` in a `--features cuda`
//! build: scripts/device-check.sh runs this file on the GPU). On the CPU the networks compute in
//! f16 through candle's generic ops (`LoadOptions::compute_dtype`), the code path a GPU takes;
//! our f32 kernels are not used.
use crate::common;

use candle_core::DType;
use lcm::image_processor::Image8;
use lcm::loaders::weights::WeightDType;
use lcm::pipelines::{ControlNetInput, GenerateRequest, LcmPipeline, LoadOptions, PipelineKind};
use lcm::random::HalfRandn;

/// Largest and mean per-pixel difference from diffusers' f16 image, out of 255. Both sides round
/// every intermediate to f16 (11 significant bits), in different orders (fused kernels,
/// accumulation order), so they drift apart more than two f32 computations do (2/255); most
/// pixels must still agree within a level.
const F16_TOL: (u8, f64) = (6, 0.6);
/// bf16 keeps 8 significant bits: diffusers' own bf16 images are up to 4/255 (mean 0.74) from its
/// f32 ones on these models, so two bf16 computations may differ about twice as much.
const BF16_TOL: (u8, f64) = (12, 1.5);

fn device() -> candle_core::Device {
    let name = std::env::var("LCM_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    lcm::device::parse(&name).unwrap()
}

fn kind(class: &str) -> PipelineKind {
    match class {
        "LatentConsistencyModelPipeline" | "LatentConsistencyModelImg2ImgPipeline" => {
            PipelineKind::LatentConsistencyModel
        }
        "AnimateDiffPipeline" => PipelineKind::AnimateDiff,
        c if c.starts_with("StableDiffusionXL") => PipelineKind::StableDiffusionXL,
        c if c.starts_with("StableDiffusion") => PipelineKind::StableDiffusion,
        other => panic!("unknown pipeline {other}"),
    }
}

fn request(case: &serde_json::Value) -> GenerateRequest {
    let fx = common::fixtures();
    let kw = &case["kw"];
    let image = |k: &str| kw[k].as_str().map(|p| Image8::read(&fx.join(p)).unwrap());
    let size = |k: &str| kw[k].as_u64().map(|v| v as usize);
    // A ControlNet pipeline's `image` is the control image.
    let control = case["controlnet"].is_string();
    GenerateRequest {
        controlnet: match (control, image("image")) {
            (true, Some(img)) => vec![ControlNetInput {
                conditioning_scale: kw["controlnet_conditioning_scale"].as_f64().unwrap_or(1.0),
                ..ControlNetInput::new(img)
            }],
            _ => Vec::new(),
        },
        num_frames: size("num_frames"),
        prompt: kw["prompt"].as_str().unwrap().into(),
        negative_prompt: kw["negative_prompt"].as_str().map(String::from),
        num_inference_steps: kw["num_inference_steps"].as_u64().unwrap() as usize,
        guidance_scale: kw["guidance_scale"].as_f64(),
        width: size("width"),
        height: size("height"),
        seed: kw["seed"].as_u64().unwrap(),
        num_images_per_prompt: kw["num_images_per_prompt"].as_u64().unwrap_or(1) as usize,
        image: if control { None } else { image("image") },
        mask_image: image("mask_image"),
        strength: kw["strength"].as_f64(),
        ..Default::default()
    }
}

/// diffusers with PyTorch 2.15 and with PyTorch 2.11, whose CPU generators draw fp16 noise
/// differently (`HalfRandn`; with 2.11 diffusers' own fp16 and f32 images differ everywhere).
#[test]
fn half_precision_pipelines_match_diffusers_float16() {
    for (version, mode) in [("2.15", HalfRandn::Blocked), ("2.11", HalfRandn::HalfMath)] {
        pipelines_match(&format!("half_pipelines_torch{version}"), mode);
    }
}

fn pipelines_match(stem: &str, mode: HalfRandn) {
    let listing = common::reference_json(&format!("{stem}.json"));
    let refs = common::reference(&format!("{stem}.safetensors"));
    let cases = listing["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    let fx = common::fixtures();
    let device = device();
    let mut report = Vec::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let (dtype, weights, tol) = match case["dtype"].as_str().unwrap_or("float16") {
            "float16" => (DType::F16, WeightDType::F16, F16_TOL),
            "bfloat16" => (DType::BF16, WeightDType::BF16, BF16_TOL),
            other => panic!("{name}: dtype {other}"),
        };
        if dtype == DType::BF16 && device.is_cpu() {
            // candle's CPU backend has no bf16 matmul: these cases run on a GPU only.
            report.push(format!("{name}: skipped (bf16 compute needs a GPU)"));
            continue;
        }
        let opts = LoadOptions {
            dtype: weights,
            compute_dtype: Some(dtype),
            device: device.clone().into(),
            ..Default::default()
        };
        let model = fx.join(case["model"].as_str().unwrap());
        let path = |k: &str| case[k].as_str().map(|p| fx.join(p).to_string_lossy().into_owned());
        let pipeline = Some(kind(case["cls"].as_str().unwrap()));
        let opts = LoadOptions { motion_adapter: path("motion_adapter"), pipeline, ..opts };
        let mut pipe = LcmPipeline::load(model.to_str().unwrap(), &opts).unwrap();
        if let Some(cn) = path("controlnet") {
            pipe.load_controlnet(&cn, None).unwrap();
        }
        assert_eq!(pipe.components.compute_dtype(), dtype);
        // SDXL's autoencoder (force_upcast) runs in f32 as diffusers' upcast_vae does; others in
        // the model's dtype.
        let upcast = pipe.kind() == PipelineKind::StableDiffusionXL;
        assert_eq!(pipe.components.vae.dtype(), if upcast { DType::F32 } else { dtype }, "{name}");
        let req = GenerateRequest { half_randn: Some(mode), ..request(case) };
        let images = pipe.generate(&req, |_, _| {}).unwrap();
        let want = refs[name].flatten_all().unwrap().to_vec1::<u8>().unwrap();
        let got: Vec<u8> = images.iter().flat_map(|i| i.pixels.iter().copied()).collect();
        assert_eq!(got.len(), want.len(), "{name}: size");
        let max = got.iter().zip(&want).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
        let mean = got.iter().zip(&want).map(|(a, b)| a.abs_diff(*b) as f64).sum::<f64>() / got.len() as f64;
        report.push(format!(
            "{name}: max {max}/255, mean {mean:.3}/255 (diffusers {dtype:?} vs f32: max {})",
            case["diffusers_f16_vs_f32_max"]
        ));
        assert!(
            max <= tol.0 && mean <= tol.1,
            "{stem} {name} on {}: max {max}/255, mean {mean:.3}/255",
            lcm::device::name(&device)
        );
    }
    eprintln!("{} vs diffusers in the same dtype ({stem}):\n  {}", lcm::device::name(&device), report.join("\n  "));
}

/// diffusers' `upcast_vae` rule: only SDXL pipelines, only when the config asks (an fp16-fix VAE
/// says `force_upcast: false`), only for a half-precision model.
#[test]
fn vae_upcast_follows_force_upcast_in_sdxl_pipelines_only() {
    use lcm::loaders::weights::Precision;
    use lcm::pipelines::components::vae_precision;
    let half = Precision::from(DType::F16);
    let upcast = Precision::from(DType::F32);
    assert_eq!(vae_precision(PipelineKind::StableDiffusionXL, true, half), upcast);
    assert_eq!(vae_precision(PipelineKind::StableDiffusionXL, false, half), half);
    assert_eq!(vae_precision(PipelineKind::StableDiffusion, true, half), half);
    assert_eq!(vae_precision(PipelineKind::AnimateDiff, true, half), half);
    let bf16 = Precision::from(DType::BF16);
    assert_eq!(vae_precision(PipelineKind::StableDiffusionXL, true, bf16), upcast);
    // CPU: f32 activations with half weights are already f32 compute: nothing to upcast.
    let cpu_half_weights = Precision { compute: DType::F32, weights: DType::F16, int8: false };
    assert_eq!(vae_precision(PipelineKind::StableDiffusionXL, true, cpu_half_weights), cpu_half_weights);

    // A replacement SDXL VAE with force_upcast false (fp16-fix) stays in f16 through LoadOptions.
    let fx = common::fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let vae = tmp.path().join("vae-fp16-fix");
    std::fs::create_dir_all(&vae).unwrap();
    let src = fx.join("models/tiny-sdxl/vae");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    config["force_upcast"] = serde_json::Value::Bool(false);
    std::fs::write(vae.join("config.json"), config.to_string()).unwrap();
    std::fs::copy(src.join("diffusion_pytorch_model.safetensors"), vae.join("diffusion_pytorch_model.safetensors"))
        .unwrap();
    let opts = LoadOptions {
        dtype: WeightDType::F16,
        compute_dtype: Some(DType::F16),
        vae: Some(vae.to_string_lossy().into_owned()),
        ..Default::default()
    };
    let pipe = LcmPipeline::load(fx.join("models/tiny-sdxl").to_str().unwrap(), &opts).unwrap();
    assert_eq!(pipe.kind(), PipelineKind::StableDiffusionXL);
    assert_eq!(pipe.components.vae.dtype(), DType::F16);
}
