//! AnimateDiff against diffusers: `UNetMotionModel` outputs within 1e-4 (motion adapters with
//! every weight random, the zero-initialised output projections too) and `AnimateDiffPipeline`
//! frames within 2/255 (LCM-LoRA, LCM-LoRA + motion LoRA at [0.55, 1.2], CFG, odd sizes).
use crate::common;

use candle_core::{DType, Device, Tensor};
use lcm::loaders::weights::load_component;
use lcm::models::unet::motion::{read_motion_config, MotionModules};
use lcm::models::unet::{UNet2DConditionConfig, UNet2DConditionModel, UNetConditioning};
use lcm::pipelines::{GenerateRequest, LcmPipeline, LoadOptions, LoraSpec, PipelineKind};

fn motion_unet(unet_dir: &str, adapter_dir: &str) -> UNet2DConditionModel {
    let fx = common::fixtures();
    let dev = Device::Cpu;
    let (ud, ad) = (fx.join(unet_dir), fx.join(adapter_dir));
    let cfg = UNet2DConditionConfig::from_file(&ud.join("config.json")).unwrap();
    let unet = UNet2DConditionModel::new(load_component(&ud, None, DType::F32, &dev).unwrap(), &cfg).unwrap();
    let mcfg = read_motion_config(&ad).unwrap();
    let modules = MotionModules::new(load_component(&ad, None, DType::F32, &dev).unwrap(), &mcfg, &unet).unwrap();
    unet.with_motion(modules)
}

#[test]
fn unet_motion_model_matches_diffusers() {
    let listing = common::reference_json("animatediff_modules.json");
    let r = common::reference("animatediff_modules.safetensors");
    let mut worst: f64 = 0.0;
    for case in listing["cases"].as_array().unwrap() {
        let key = case["key"].as_str().unwrap();
        let unet = motion_unet(case["unet"].as_str().unwrap(), case["motion_adapter"].as_str().unwrap());
        let t = |k: &str| r[&format!("{key}.{k}")].to_dtype(DType::F32).unwrap();
        let cond = UNetConditioning {
            timestep_cond: case["timestep_cond_shape"].as_array().map(|_| t("timestep_cond")),
            ..Default::default()
        };
        let out = unet
            .forward_frames(&t("sample"), case["timestep"].as_f64().unwrap(), &t("encoder_hidden_states"), &cond)
            .unwrap_or_else(|e| panic!("{key}: {e:#}"));
        let e = common::rel_l2(&out, &t("out"));
        eprintln!("{key}: rel L2 {e:e}");
        worst = worst.max(e);
        assert!(e < 1e-4, "{key}: rel L2 {e}");
        // The motion modules matter: the plain UNet per frame gives something else.
        let (b, c, f, h, w) = t("sample").dims5().unwrap();
        let mut plain = unet.clone();
        plain.motion = None;
        let folded =
            t("sample").permute((0, 2, 1, 3, 4)).unwrap().contiguous().unwrap().reshape((b * f, c, h, w)).unwrap();
        let cond_plain = UNetConditioning {
            timestep_cond: cond.timestep_cond.as_ref().map(|x| lcm::ops::repeat_interleave(x, f).unwrap()),
            ..Default::default()
        };
        let p = plain
            .forward(&folded, case["timestep"].as_f64().unwrap(), &t("encoder_hidden_states"), &cond_plain)
            .unwrap();
        let p = p.reshape((b, f, c, h, w)).unwrap().permute((0, 2, 1, 3, 4)).unwrap();
        assert!(common::rel_l2(&p, &t("out")) > 0.05, "{key}: motion modules have no effect");
    }
    eprintln!("worst UNetMotionModel rel L2: {worst:e}");
}

#[test]
fn animatediff_pipelines_match_diffusers() {
    let listing = common::reference_json("animatediff_pipelines.json");
    let refs = common::reference("animatediff_pipelines.safetensors");
    let fx = common::fixtures();
    let mut worst = 0;
    let mut ran = 0;
    for case in listing["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let loras: Vec<LoraSpec> = case["loras"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                let path = fx.join(l["path"].as_str().unwrap()).join(l["weight_name"].as_str().unwrap());
                let mut spec = LoraSpec::parse(path.to_str().unwrap()).unwrap();
                spec.adapter_name = Some(l["adapter_name"].as_str().unwrap().into());
                spec
            })
            .collect();
        let opts = LoadOptions {
            loras,
            motion_adapter: Some(
                fx.join("motion_adapters").join(case["motion_adapter"].as_str().unwrap()).to_string_lossy().into(),
            ),
            ..Default::default()
        };
        let mut pipe = LcmPipeline::load(fx.join(case["model"].as_str().unwrap()).to_str().unwrap(), &opts).unwrap();
        assert_eq!(pipe.kind(), PipelineKind::AnimateDiff);
        if let Some(sa) = case["set_adapters"].as_array() {
            let names: Vec<&str> = sa[0].as_array().unwrap().iter().map(|n| n.as_str().unwrap()).collect();
            let weights: Vec<f64> = sa[1].as_array().unwrap().iter().map(|w| w.as_f64().unwrap()).collect();
            let pairs: Vec<(&str, f64)> = names.into_iter().zip(weights).collect();
            pipe.set_adapters(&pairs).unwrap();
        }
        pipe.components.scheduler_config.beta_schedule = lcm::schedulers::BetaSchedule::Linear;
        let g = case["guidance_scale"].as_f64().unwrap();
        let req = GenerateRequest {
            prompt: case["prompt"].as_str().unwrap().into(),
            negative_prompt: case["negative_prompt"].as_str().map(String::from),
            num_inference_steps: case["num_inference_steps"].as_u64().unwrap() as usize,
            guidance_scale: Some(g),
            width: case["width"].as_u64().map(|v| v as usize),
            height: case["height"].as_u64().map(|v| v as usize),
            seed: case["seed"].as_u64().unwrap(),
            num_frames: Some(case["num_frames"].as_u64().unwrap() as usize),
            ..Default::default()
        };
        assert_eq!(pipe.plan(&req).unwrap().do_classifier_free_guidance, case["cfg"].as_bool().unwrap(), "{name}: cfg");
        let mut steps = 0;
        let clips = pipe.animate(&req, |_, _| steps += 1).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert_eq!(steps, case["timesteps"].as_array().unwrap().len(), "{name}");
        assert_eq!(clips.len(), 1);
        let shape: Vec<usize> =
            case["output_shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        assert_eq!(clips[0].len(), shape[0], "{name}: frames");
        assert_eq!((clips[0][0].height, clips[0][0].width), (shape[1], shape[2]), "{name}: size");
        let got: Vec<u8> = clips[0].iter().flat_map(|i| i.pixels.iter().copied()).collect();
        let want = refs[name].flatten_all().unwrap().to_vec1::<u8>().unwrap();
        assert_eq!(got.len(), want.len(), "{name}");
        let d = got.iter().zip(&want).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
        eprintln!("{name}: max diff {d}/255");
        assert!(d <= 2, "{name}: max pixel difference {d}/255");
        worst = worst.max(d);
        ran += 1;
    }
    assert!(ran >= 3, "{ran}");
    eprintln!("worst AnimateDiff frame difference: {worst}/255 over {ran} cases");
}

/// The real guoyww motion adapter config builds on the real SD1.5 UNet config and runs 2 frames
/// at a small latent size; every key of the real zoom-in motion LoRA maps onto its weights.
#[test]
fn real_motion_adapter_config_builds_and_motion_lora_keys_map() {
    let dir = common::fixtures().join("real_configs");
    let dev = Device::Cpu;
    let ucfg = UNet2DConditionConfig::from_file(&dir.join("sd15/unet/config.json")).unwrap();
    let unet = UNet2DConditionModel::new(lcm::testing::random_var_builder(1, DType::F32, &dev), &ucfg).unwrap();
    let mcfg = read_motion_config(&dir.join("guoyww__animatediff-motion-adapter-v1-5-2")).unwrap();
    // A VarMap records every weight name (and shape) the modules ask for.
    let varmap = candle_nn::VarMap::new();
    let modules =
        MotionModules::new(candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &dev), &mcfg, &unet).unwrap();
    assert_eq!(
        (modules.down.iter().map(Vec::len).sum::<usize>(), modules.up.iter().map(Vec::len).sum::<usize>()),
        (8, 12)
    );
    assert_eq!(modules.mid.as_ref().map(Vec::len), Some(1));
    let unet = unet.with_motion(modules);
    let sample = Tensor::randn(0f32, 1.0, (1, 4, 2, 8, 8), &dev).unwrap();
    let ehs = Tensor::zeros((2, 3, 768), DType::F32, &dev).unwrap();
    let out = unet.forward_frames(&sample, 999.0, &ehs, &UNetConditioning::default()).unwrap();
    assert_eq!(out.dims(), &[1, 4, 2, 8, 8]);

    struct Names(Vec<String>, std::collections::HashMap<String, Vec<usize>>);
    impl lcm::loaders::lora::WeightIndex for Names {
        fn names(&self) -> &[String] {
            &self.0
        }
        fn shape(&self, name: &str) -> Option<Vec<usize>> {
            self.1.get(name).cloned()
        }
    }
    let shapes: std::collections::HashMap<String, Vec<usize>> =
        varmap.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.dims().to_vec())).collect();
    let index = Names(shapes.keys().cloned().collect(), shapes);
    let listing = common::read_keys(&dir.join("loras/guoyww__animatediff-motion-lora-zoom-in/keys.txt"));
    let tensors = listing
        .into_iter()
        .map(|(n, s)| (n, Tensor::zeros((), DType::F32, &dev).unwrap().broadcast_as(s).unwrap()))
        .collect();
    let lora = lcm::loaders::lora::LoraFile::from_tensors("zoom-in", tensors, Default::default()).unwrap();
    let (deltas, unmatched) = lora.deltas_for(lcm::loaders::lora::LoraComponent::Unet, &index).unwrap();
    assert!(unmatched.is_empty(), "unmatched: {unmatched:?}");
    // 21 motion modules x 2 attentions x q/k/v/out
    assert_eq!(deltas.by_weight.values().map(Vec::len).sum::<usize>(), 21 * 2 * 4);
}

/// A converted motion LoRA repo (`diffusion_pytorch_model.safetensors`, as guoyww's) resolves
/// from the Hugging Face cache without naming the file, as diffusers guesses it.
#[test]
fn motion_lora_repo_resolves_from_the_hf_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let commit = "fedcba9876543210fedcba9876543210fedcba98";
    let repo = tmp.path().join("hub/models--guoyww--animatediff-motion-lora-tiny");
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    let file = common::fixtures().join("loras/motion_like/diffusion_pytorch_model.safetensors");
    std::fs::copy(&file, snap.join("diffusion_pytorch_model.safetensors")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    std::env::set_var("HF_HUB_CACHE", tmp.path().join("hub"));
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let got = lcm::loaders::lora::resolve_source("guoyww/animatediff-motion-lora-tiny", None).unwrap();
    assert_eq!(std::fs::read(got).unwrap(), std::fs::read(file).unwrap());
    let e = lcm::loaders::lora::resolve_source("guoyww/not-cached", None).unwrap_err().to_string();
    assert!(e.contains("not in the Hugging Face cache"), "{e}");
}
