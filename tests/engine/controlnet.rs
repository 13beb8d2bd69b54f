//! ControlNet and T2I-Adapter against diffusers: `ControlNetModel` residuals within 1e-4
//! (SD1.5-, LCM- and SDXL-shaped tiny ControlNets with every weight random, guess mode, bgr
//! channel order), and the ControlNet / Adapter pipelines (one and two ControlNets, guidance
//! start/end, CFG, LCM UNet, LCM-LoRA, image-to-image, SDXL) within 2/255.
use crate::common;

use candle_core::{Device, Tensor};
use lcm::image_processor::Image8;
use lcm::models::controlnet::{ControlNetCond, ControlNetConfig, ControlNetModel};
use lcm::models::unet::{AddedCond, UNetConditioning};
use lcm::pipelines::control::{controlnet_keep, load_controlnet, load_t2i_adapter};
use lcm::pipelines::{AdapterInput, ControlNetInput, GenerateRequest, LcmPipeline, LoadOptions, PipelineKind};

#[test]
fn controlnet_residuals_match_diffusers() {
    let listing = common::reference_json("controlnet_modules.json");
    let r = common::reference("controlnet_modules.safetensors");
    let fx = common::fixtures();
    let mut worst: f64 = 0.0;
    for case in listing["cases"].as_array().unwrap() {
        let key = case["key"].as_str().unwrap();
        let cn = load_controlnet(fx.join(case["controlnet"].as_str().unwrap()).to_str().unwrap(), None, &Device::Cpu)
            .unwrap()
            .model;
        let t = |k: &str| r[&format!("{key}.{k}")].clone();
        let cond = if case["sdxl"].as_bool().unwrap() {
            UNetConditioning {
                added_cond: Some(AddedCond { text_embeds: t("text_embeds"), time_ids: t("time_ids") }),
                ..Default::default()
            }
        } else {
            UNetConditioning::default()
        };
        let out = cn
            .forward(
                &t("sample"),
                case["timestep"].as_f64().unwrap(),
                &t("ehs"),
                ControlNetCond {
                    image: &t("cond"),
                    conditioning_scale: case["conditioning_scale"].as_f64().unwrap(),
                    guess_mode: case["guess_mode"].as_bool().unwrap(),
                },
                &cond,
            )
            .unwrap();
        let n = case["num_down"].as_u64().unwrap() as usize;
        assert_eq!(out.down_block_res_samples.len(), n, "{key}");
        for (j, d) in out.down_block_res_samples.iter().enumerate() {
            let e = common::rel_l2(d, &t(&format!("down{j}")));
            worst = worst.max(e);
            assert!(e < 1e-4, "{key} down{j}: rel L2 {e}");
        }
        let e = common::rel_l2(&out.mid_block_res_sample, &t("mid"));
        worst = worst.max(e);
        assert!(e < 1e-4, "{key} mid: rel L2 {e}");
    }
    eprintln!("worst ControlNet residual rel L2: {worst:e}");
}

fn kind(name: &str) -> PipelineKind {
    if name.starts_with("StableDiffusionXL") {
        PipelineKind::StableDiffusionXL
    } else {
        PipelineKind::StableDiffusion
    }
}

fn image(name: &str) -> Image8 {
    Image8::read(&common::fixtures().join("images").join(format!("{name}.png"))).unwrap()
}

fn f64s(v: &serde_json::Value) -> Vec<f64> {
    v.as_array().map(|a| a.iter().map(|x| x.as_f64().unwrap()).collect()).unwrap_or_default()
}

/// Load the case's pipeline with its ControlNets / adapter and build its request.
fn setup(case: &serde_json::Value, kind_of: &str) -> (LcmPipeline, GenerateRequest) {
    let fx = common::fixtures();
    let loras = match case["lora"].as_array() {
        Some(l) => vec![lcm::pipelines::LoraSpec::parse(fx.join(l[0].as_str().unwrap()).to_str().unwrap()).unwrap()],
        None => vec![],
    };
    // The SDXL cases ran through the SDXL pipelines whatever the folder says.
    let pipeline = Some(kind(case["cls"].as_str().unwrap())).filter(|k| *k == PipelineKind::StableDiffusionXL);
    let opts = LoadOptions { loras, pipeline, ..Default::default() };
    let model = fx.join(case["model"].as_str().unwrap());
    let mut pipe = LcmPipeline::load(model.to_str().unwrap(), &opts).unwrap();
    let mut req = GenerateRequest {
        prompt: case["prompt"].as_str().unwrap().into(),
        negative_prompt: case["negative_prompt"].as_str().map(String::from),
        num_inference_steps: 4,
        guidance_scale: case["guidance_scale"].as_f64(),
        width: case["width"].as_u64().map(|v| v as usize),
        height: case["height"].as_u64().map(|v| v as usize),
        seed: case["seed"].as_u64().unwrap(),
        num_images_per_prompt: case["num_images_per_prompt"].as_u64().unwrap_or(1) as usize,
        image: case["image"].as_str().map(image),
        strength: case["strength"].as_f64(),
        ..Default::default()
    };
    if kind_of == "controlnet" {
        req.guess_mode = case["guess_mode"].as_bool().unwrap_or(false);
        let nets = case["controlnets"].as_array().unwrap();
        let images = case["control_images"].as_array().unwrap();
        let scales = f64s(&case["scales"]);
        let (starts, ends) = (f64s(&case["start"]), f64s(&case["end"]));
        for (i, cn) in nets.iter().enumerate() {
            let dir = fx.join("controlnets").join(cn.as_str().unwrap());
            pipe.load_controlnet(dir.to_str().unwrap(), None).unwrap();
            req.controlnet.push(ControlNetInput {
                image: image(images[i].as_str().unwrap()),
                conditioning_scale: scales[i],
                guidance_start: starts.get(i).copied().unwrap_or(0.0),
                guidance_end: ends.get(i).copied().unwrap_or(1.0),
            });
        }
    } else {
        let dir = fx.join("adapters").join(case["adapter"].as_str().unwrap());
        pipe.load_t2i_adapter(dir.to_str().unwrap(), None).unwrap();
        req.adapter.push(AdapterInput {
            image: image(case["adapter_image"].as_str().unwrap()),
            conditioning_scale: case["scale"].as_f64().unwrap(),
        });
        req.adapter_conditioning_factor = case["factor"].as_f64().unwrap_or(1.0);
    }
    (pipe, req)
}

fn pixels(images: &[lcm::image_io::RgbImage]) -> Vec<u8> {
    images.iter().flat_map(|i| i.pixels.iter().copied()).collect()
}

fn max_diff(a: &[u8], b: &[u8]) -> u8 {
    a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).max().unwrap()
}

fn check_pipelines(kind_of: &str, min_cases: usize) {
    let listing = common::reference_json(&format!("{kind_of}_pipelines.json"));
    let refs = common::reference(&format!("{kind_of}_pipelines.safetensors"));
    let mut worst = 0;
    let mut ran = 0;
    for case in listing["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let (pipe, req) = setup(case, kind_of);
        assert_eq!(pipe.kind(), kind(case["cls"].as_str().unwrap()), "{name}");
        let images = pipe.generate(&req, |_, _| {}).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let (h, w) =
            (case["output_height"].as_u64().unwrap() as usize, case["output_width"].as_u64().unwrap() as usize);
        assert_eq!((images[0].width, images[0].height), (w, h), "{name}: size");
        let want = refs[name].flatten_all().unwrap().to_vec1::<u8>().unwrap();
        let got = pixels(&images);
        assert_eq!(got.len(), want.len(), "{name}");
        let d = max_diff(&got, &want);
        eprintln!("{name}: max diff {d}/255");
        assert!(d <= 2, "{name}: max pixel difference {d}/255");
        worst = worst.max(d);
        ran += 1;

        // The control input matters: the same request with it switched off is far from the reference.
        let mut off = req.clone();
        for c in &mut off.controlnet {
            c.conditioning_scale = 0.0;
        }
        for a in &mut off.adapter {
            a.conditioning_scale = 0.0;
        }
        let without = pixels(&pipe.generate(&off, |_, _| {}).unwrap());
        let changed = without.iter().zip(&want).filter(|(a, b)| a.abs_diff(**b) > 2).count();
        assert!(
            changed * 10 > want.len(),
            "{name}: only {changed} of {} values depend on the control input",
            want.len()
        );
    }
    assert!(ran >= min_cases, "{ran}");
    eprintln!("worst {kind_of} pipeline difference: {worst}/255 over {ran} cases");
}

#[test]
fn controlnet_pipelines_match_diffusers() {
    check_pipelines("controlnet", 10);
}

#[test]
fn adapter_pipelines_match_diffusers() {
    check_pipelines("adapter", 5);
}

/// diffusers' `controlnet_keep`: `1 - (i / n < start or (i + 1) / n > end)`.
#[test]
fn controlnet_keep_follows_diffusers() {
    let keep = |s, e| (0..4).map(|i| controlnet_keep(i, 4, s, e)).collect::<Vec<_>>();
    assert_eq!(keep(0.0, 1.0), [true, true, true, true]);
    assert_eq!(keep(0.0, 0.5), [true, true, false, false]);
    assert_eq!(keep(0.25, 1.0), [false, true, true, true]);
    assert_eq!(keep(0.3, 0.8), [false, false, true, false]);
    assert_eq!(keep(0.26, 0.74), [false, false, false, false]);
}

#[test]
fn controlnet_for_another_base_model_is_refused() {
    let fx = common::fixtures();
    let mut sd = LcmPipeline::load(fx.join("models/tiny-sd").to_str().unwrap(), &LoadOptions::default()).unwrap();
    let e = sd.load_controlnet(fx.join("controlnets/sdxl").to_str().unwrap(), None).unwrap_err().to_string();
    assert!(e.contains("another base model"), "{e}");
    let e = sd.load_controlnet(fx.join("controlnets/lcm").to_str().unwrap(), None).unwrap_err().to_string();
    assert!(e.contains("another base model"), "{e}");
    // a UNet folder is not a ControlNet
    let e = sd.load_controlnet(fx.join("models/tiny-sd/unet").to_str().unwrap(), None).unwrap_err().to_string();
    assert!(e.contains("not a `ControlNetModel`"), "{e}");
    let e = sd.load_controlnet(fx.join("no/such/controlnet").to_str().unwrap(), None).unwrap_err().to_string();
    assert!(!e.is_empty());
    assert!(sd.controlnets.is_empty());
}

#[test]
fn control_request_errors_are_clear() {
    let fx = common::fixtures();
    let mut pipe = LcmPipeline::load(fx.join("models/tiny-lcm").to_str().unwrap(), &LoadOptions::default()).unwrap();
    assert_eq!(pipe.kind(), PipelineKind::LatentConsistencyModel);
    pipe.load_controlnet(fx.join("controlnets/lcm").to_str().unwrap(), None).unwrap();
    // diffusers' LCM guide runs LCM UNets with ControlNets through StableDiffusionControlNetPipeline
    assert_eq!(pipe.kind(), PipelineKind::StableDiffusion);
    let base = GenerateRequest { prompt: "x".into(), num_inference_steps: 1, ..Default::default() };
    let e = pipe.generate(&base, |_, _| {}).unwrap_err().to_string();
    assert!(e.contains("1 ControlNet(s) but 0 control image(s)"), "{e}");
    let mut req = base.clone();
    let mut c = ControlNetInput::new(image("photo_45x37"));
    c.guidance_start = 0.6;
    c.guidance_end = 0.5;
    req.controlnet.push(c);
    let e = pipe.generate(&req, |_, _| {}).unwrap_err().to_string();
    assert!(e.contains("guidance start"), "{e}");
    req.controlnet[0].guidance_start = 0.0;
    req.mask_image = Some(image("mask_45x37"));
    req.image = Some(image("photo_45x37"));
    let e = pipe.generate(&req, |_, _| {}).unwrap_err().to_string();
    assert!(e.contains("inpainting"), "{e}");
    // a 1x1 control image is smaller than the VAE factor
    let mut req = base.clone();
    req.controlnet.push(ControlNetInput::new(Image8 { width: 1, height: 1, channels: 3, pixels: vec![0; 3] }));
    let e = pipe.generate(&req, |_, _| {}).unwrap_err().to_string();
    assert!(e.contains("smaller"), "{e}");
    // the output takes the control image's size; an explicit size resizes the control image
    let mut req = base.clone();
    req.controlnet.push(ControlNetInput::new(image("photo_50x30")));
    let plan = pipe.plan(&req).unwrap();
    assert_eq!((plan.width, plan.height), (50, 30));
    req.width = Some(16);
    req.height = Some(24);
    let out = pipe.generate(&req, |_, _| {}).unwrap();
    assert_eq!((out[0].width, out[0].height), (16, 24));
}

#[test]
fn adapter_errors_are_clear() {
    let fx = common::fixtures();
    // an SD-shaped adapter on the SDXL UNet: its features do not fit the down blocks
    let mut xl = LcmPipeline::load(fx.join("models/tiny-sdxl").to_str().unwrap(), &LoadOptions::default()).unwrap();
    xl.load_t2i_adapter(fx.join("adapters/full_sd").to_str().unwrap(), None).unwrap();
    let mut req = GenerateRequest { prompt: "x".into(), num_inference_steps: 1, ..Default::default() };
    req.adapter.push(AdapterInput::new(image("photo_45x37")));
    let e = xl.generate(&req, |_, _| {}).unwrap_err().to_string();
    assert!(e.contains("was built for another base model"), "{e}");
    // sizes must be multiples of the adapter's downscale factor; no image-to-image
    let mut sd = LcmPipeline::load(fx.join("models/tiny-sdxl").to_str().unwrap(), &LoadOptions::default()).unwrap();
    sd.load_t2i_adapter(fx.join("adapters/full_xl").to_str().unwrap(), None).unwrap();
    req.width = Some(34);
    let e = sd.generate(&req, |_, _| {}).unwrap_err().to_string();
    assert!(e.contains("downscale factor"), "{e}");
    req.width = None;
    req.image = Some(image("photo_45x37"));
    let e = sd.generate(&req, |_, _| {}).unwrap_err().to_string();
    assert!(e.contains("text-to-image only"), "{e}");
    let e = load_t2i_adapter(fx.join("controlnets/sd").to_str().unwrap(), None, &Device::Cpu).unwrap_err().to_string();
    assert!(!e.is_empty());
}

/// The real ControlNet configs (SD1.5 canny v1.0 and v1.1, SDXL canny) build with random
/// weights and give one residual per skip connection of their base UNet, in its shapes.
#[test]
fn real_controlnet_configs_build() {
    let dir = common::fixtures().join("real_configs");
    let dev = Device::Cpu;
    for (name, skips, sdxl) in [
        ("lllyasviel__sd-controlnet-canny", 12, false),
        ("lllyasviel__control_v11p_sd15_canny", 12, false),
        ("diffusers__controlnet-canny-sdxl-1.0", 9, true),
    ] {
        let config = ControlNetConfig::from_file(&dir.join(name).join("config.json")).unwrap();
        let vb = lcm::testing::random_var_builder(3, candle_core::DType::F32, &dev);
        let cn = ControlNetModel::new(vb, &config).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let (h, w) = (8, 8);
        let sample = Tensor::zeros((1, 4, h, w), candle_core::DType::F32, &dev).unwrap();
        let d = match &config.unet.cross_attention_dim {
            lcm::config::PerBlock::One(d) => *d,
            lcm::config::PerBlock::Each(v) => v[0],
        };
        let ehs = Tensor::zeros((1, 3, d), candle_core::DType::F32, &dev).unwrap();
        let image = Tensor::zeros((1, 3, 8 * h, 8 * w), candle_core::DType::F32, &dev).unwrap();
        let cond = if sdxl {
            UNetConditioning {
                added_cond: Some(AddedCond {
                    text_embeds: Tensor::zeros((1, 1280), candle_core::DType::F32, &dev).unwrap(),
                    time_ids: Tensor::new(&[[64f32, 64., 0., 0., 64., 64.]], &dev).unwrap(),
                }),
                ..Default::default()
            }
        } else {
            UNetConditioning::default()
        };
        let control = ControlNetCond { image: &image, conditioning_scale: 1.0, guess_mode: false };
        let out = cn.forward(&sample, 999.0, &ehs, control, &cond).unwrap();
        assert_eq!(out.down_block_res_samples.len(), skips, "{name}");
        assert_eq!(out.down_block_res_samples[0].dims(), &[1, 320, h, w], "{name}");
        let last = *config.unet.block_out_channels.last().unwrap();
        let f = 1 << (config.unet.block_out_channels.len() - 1);
        assert_eq!(out.mid_block_res_sample.dims(), &[1, last, h / f, w / f], "{name}");
    }
}
