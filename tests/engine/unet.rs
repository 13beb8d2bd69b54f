//! UNet2DConditionModel: parity with diffusers on the fixture models, every real config builds
//! and asks for exactly the weights of the real checkpoint, and bad configs / weights are errors.

use crate::common;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use lcm::loaders::weights::{load_component, safetensors_files};
use lcm::models::unet::{AddedCond, UNet2DConditionConfig, UNet2DConditionModel, UNetConditioning};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

const TOL: f64 = 1e-4;

/// A weight source that records every name and shape a model asks for. `inner`: serve the real
/// tensors of these files; `None`: serve zeros as a broadcast scalar, so even SDXL-sized models
/// cost no memory.
struct Recorder {
    inner: Option<MmapedSafetensors>,
    seen: Mutex<BTreeMap<String, Vec<usize>>>,
}

impl Recorder {
    fn zeros() -> Self {
        Self { inner: None, seen: Mutex::new(BTreeMap::new()) }
    }
    fn files(files: &[PathBuf]) -> Self {
        let inner = unsafe { MmapedSafetensors::multi(files) }.unwrap();
        Self { inner: Some(inner), seen: Mutex::new(BTreeMap::new()) }
    }
}

impl SimpleBackend for Recorder {
    fn get(&self, s: Shape, name: &str, h: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let prev = self.seen.lock().unwrap().insert(name.to_string(), s.dims().to_vec());
        assert!(prev.is_none(), "weight {name} requested twice");
        match &self.inner {
            Some(st) => SimpleBackend::get(st, s, name, h, dtype, dev),
            None => Tensor::zeros((), dtype, dev)?.broadcast_as(s),
        }
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("unexpected unchecked get of {name}")
    }
    fn contains_tensor(&self, name: &str) -> bool {
        match &self.inner {
            Some(st) => st.get(name).is_ok(),
            None => true,
        }
    }
}

/// Build a UNet through a [`Recorder`]; returns the model and the weights it requested.
fn build_recorded(rec: Recorder, cfg: &UNet2DConditionConfig) -> (UNet2DConditionModel, BTreeMap<String, Vec<usize>>) {
    let rec = std::sync::Arc::new(rec);
    struct Shared(std::sync::Arc<Recorder>);
    impl SimpleBackend for Shared {
        fn get(&self, s: Shape, n: &str, h: candle_nn::Init, d: DType, dev: &Device) -> candle_core::Result<Tensor> {
            self.0.get(s, n, h, d, dev)
        }
        fn get_unchecked(&self, n: &str, d: DType, dev: &Device) -> candle_core::Result<Tensor> {
            self.0.get_unchecked(n, d, dev)
        }
        fn contains_tensor(&self, n: &str) -> bool {
            self.0.contains_tensor(n)
        }
    }
    let vb = VarBuilder::from_backend(Box::new(Shared(rec.clone())), DType::F32, Device::Cpu);
    let model = UNet2DConditionModel::new(vb, cfg).unwrap_or_else(|e| panic!("build failed: {e:#}"));
    let seen = rec.seen.lock().unwrap().clone();
    (model, seen)
}

fn file_keys(dir: &Path) -> BTreeMap<String, Vec<usize>> {
    let st = unsafe { MmapedSafetensors::multi(&safetensors_files(dir, None).unwrap()) }.unwrap();
    st.tensors().into_iter().map(|(n, v)| (n, v.shape().to_vec())).collect()
}

/// Load a UNet folder, checking that the model uses every tensor of the file and nothing else.
fn load_unet(dir: &Path) -> UNet2DConditionModel {
    let cfg = UNet2DConditionConfig::from_file(&dir.join("config.json")).unwrap();
    let files = safetensors_files(dir, None).unwrap();
    let (model, seen) = build_recorded(Recorder::files(&files), &cfg);
    common::assert_same_keys(&dir.display().to_string(), &seen, &file_keys(dir));
    model
}

fn check(what: &str, got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let err = common::rel_l2(got, want);
    println!("{what}: rel L2 {err:.3e}");
    assert!(err < TOL, "{what}: rel L2 {err:.3e} >= {TOL:e}");
    err
}

// ---------------------------------------------------------------------------------------------
// Parity with diffusers: tests/fixtures (make_fixtures.py)

fn parity_main_fixture(case: &str, folder: &str) {
    let model = load_unet(&common::fixtures().join(folder));
    let r = common::reference(&format!("unet_{case}.safetensors"));
    let cond = UNetConditioning { timestep_cond: r.get("timestep_cond").cloned(), ..Default::default() };
    let out = model.forward(&r["sample"], &r["timestep"], &r["encoder_hidden_states"], &cond).unwrap();
    check(&format!("unet_{case}"), &out, &r["out"]);
}

#[test]
fn parity_tiny_sd() {
    parity_main_fixture("tiny-sd", "models/tiny-sd/unet");
}

#[test]
fn parity_tiny_lcm() {
    parity_main_fixture("tiny-lcm", "models/tiny-lcm/unet");
}

#[test]
fn parity_tiny_sd2() {
    parity_main_fixture("tiny-sd2", "models/tiny-sd2/unet");
}

#[test]
fn parity_inpaint9() {
    parity_main_fixture("inpaint9", "models/unets/inpaint9");
}

#[test]
fn parity_odd_latent_size() {
    parity_main_fixture("odd", "models/unets/odd");
}

#[test]
fn parity_sd2style() {
    parity_main_fixture("sd2style", "models/unets/sd2style");
}

#[test]
fn parity_lcm_cond() {
    parity_main_fixture("lcm_cond", "models/unets/lcm_cond");
}

// ---------------------------------------------------------------------------------------------
// Parity with diffusers: tests/fixtures/unet_extra (make_unet_extra.py)

fn extra(case: &str) -> (UNet2DConditionModel, HashMap<String, Tensor>) {
    let root = common::fixtures().join("unet_extra");
    let model = load_unet(&root.join("models").join(case));
    let path = root.join("reference").join(format!("{case}.safetensors"));
    (model, candle_core::safetensors::load(path, &Device::Cpu).unwrap())
}

fn conditioning(r: &HashMap<String, Tensor>, tag: &str) -> UNetConditioning {
    let added_cond = r
        .get(&format!("text_embeds_{tag}"))
        .map(|t| AddedCond { text_embeds: t.clone(), time_ids: r[&format!("time_ids_{tag}")].clone() });
    UNetConditioning {
        timestep_cond: r.get(&format!("timestep_cond_{tag}")).cloned(),
        added_cond,
        ..Default::default()
    }
}

fn parity_extra(case: &str) {
    let (model, r) = extra(case);
    for tag in ["even", "odd"] {
        let out = model
            .forward(
                &r[&format!("sample_{tag}")],
                &r[&format!("timestep_{tag}")],
                &r[&format!("encoder_hidden_states_{tag}")],
                &conditioning(&r, tag),
            )
            .unwrap();
        check(&format!("{case} {tag}"), &out, &r[&format!("out_{tag}")]);
    }
}

#[test]
fn parity_extra_sd() {
    parity_extra("sd");
}

/// SDXL layout with `text_time` added embeddings and an LCM guidance embedding.
#[test]
fn parity_extra_sdxl() {
    parity_extra("sdxl");
}

/// SSD-1B layout: single-resnet mid block, asymmetric up-path transformer depths.
#[test]
fn parity_extra_ssd() {
    parity_extra("ssd");
}

/// only_cross_attention, scale_shift resnets, flip_sin_to_cos false, freq_shift 1, per-block
/// layers, mid_block_scale_factor, time_embedding_act_fn, timestep_post_act, conv_in_kernel 1,
/// no mid block, cross_attention_dim list, center_input_sample, time_embedding_dim.
#[test]
fn parity_extra_misc() {
    parity_extra("misc");
}

/// One (fractional) timestep per sample.
#[test]
fn parity_per_sample_timesteps() {
    let (model, r) = extra("sd");
    let out = model
        .forward(&r["sample_pertime"], &r["timestep_pertime"], &r["encoder_hidden_states_pertime"], &Default::default())
        .unwrap();
    check("sd per-sample timesteps", &out, &r["out_pertime"]);
}

fn residuals(r: &HashMap<String, Tensor>, prefix: &str) -> Vec<Tensor> {
    (0..).map_while(|i| r.get(&format!("{prefix}_{i}")).cloned()).collect()
}

/// ControlNet (down + mid residuals) and T2I-Adapter (intrablock residuals), with diffusers'
/// placement: into the skips, after the mid block, inside/after each down block.
fn parity_residuals(case: &str) {
    let (model, r) = extra(case);
    let base = conditioning(&r, "res");
    let run = |cond: &UNetConditioning| {
        model.forward(&r["sample_res"], &r["timestep_res"], &r["encoder_hidden_states_res"], cond).unwrap()
    };
    let control = UNetConditioning {
        down_block_additional_residuals: Some(residuals(&r, "down_block_res")),
        mid_block_additional_residual: Some(r["mid_block_res"].clone()),
        ..base.clone()
    };
    check(&format!("{case} controlnet"), &run(&control), &r["out_controlnet"]);
    let adapter =
        UNetConditioning { down_intrablock_additional_residuals: Some(residuals(&r, "adapter_res")), ..base.clone() };
    check(&format!("{case} t2i-adapter"), &run(&adapter), &r["out_adapter"]);
    // diffusers' deprecated form: adapter residuals in `down_block_additional_residuals` alone.
    let legacy = UNetConditioning { down_block_additional_residuals: Some(residuals(&r, "adapter_res")), ..base };
    check(&format!("{case} t2i-adapter (legacy argument)"), &run(&legacy), &r["out_adapter"]);
}

#[test]
fn parity_residuals_sd() {
    parity_residuals("sd");
}

#[test]
fn parity_residuals_sdxl() {
    parity_residuals("sdxl");
}

// ---------------------------------------------------------------------------------------------
// Real configs build and request exactly the real checkpoints' weights

fn real_configs() -> PathBuf {
    common::fixtures().join("real_configs")
}

#[test]
fn real_unet_configs_build_with_exact_weight_names() {
    let mut checked = 0;
    let mut models: Vec<_> = std::fs::read_dir(real_configs()).unwrap().map(|e| e.unwrap().path()).collect();
    models.sort();
    for model in models {
        let dir = model.join("unet");
        if !dir.join("config.json").exists() {
            continue;
        }
        let cfg = UNet2DConditionConfig::from_file(&dir.join("config.json")).unwrap();
        let (_, seen) = build_recorded(Recorder::zeros(), &cfg);
        let keys = dir.join("keys.txt");
        if keys.exists() {
            common::assert_same_keys(&keys.display().to_string(), &seen, &common::read_keys(&keys));
            println!("{}: {} weights match keys.txt", dir.display(), seen.len());
        } else {
            println!("{}: builds ({} weights; no keys.txt)", dir.display(), seen.len());
        }
        checked += 1;
    }
    // sd15, sd15-inpainting, lcm-dreamshaper-v7, sdxl, ssd-1b, lcm-sdxl, lcm-ssd-1b
    assert!(checked >= 7, "only {checked} real UNet configs found");
}

/// SD 2.x (no real config in the reference set): per-block head counts with 64-wide heads,
/// 1024-wide text states, linear projections.
#[test]
fn sd2_config_builds() {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(real_configs().join("sd15/unet/config.json")).unwrap()).unwrap();
    v["attention_head_dim"] = serde_json::json!([5, 10, 20, 20]);
    v["cross_attention_dim"] = serde_json::json!(1024);
    v["use_linear_projection"] = serde_json::json!(true);
    v["upcast_attention"] = serde_json::json!(true);
    let cfg: UNet2DConditionConfig = serde_json::from_value(v).unwrap();
    let (_, seen) = build_recorded(Recorder::zeros(), &cfg);
    assert_eq!(seen["down_blocks.0.attentions.0.proj_in.weight"], vec![320, 320]);
    assert_eq!(seen["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"], vec![320, 1024]);
}

#[test]
fn absent_keys_take_diffusers_defaults() {
    let cfg: UNet2DConditionConfig = serde_json::from_str(r#"{"some_unknown_key": 1}"#).unwrap();
    assert_eq!(cfg.block_out_channels, vec![320, 640, 1280, 1280]);
    assert_eq!(cfg.cross_attention_dim, lcm::config::PerBlock::One(1280));
    assert_eq!(cfg.mid_block_type.as_deref(), Some("UNetMidBlock2DCrossAttn"));
    assert!(cfg.flip_sin_to_cos);
    // An explicit null mid block means none (diffusers skips it).
    let cfg: UNet2DConditionConfig = serde_json::from_str(r#"{"mid_block_type": null}"#).unwrap();
    assert_eq!(cfg.mid_block_type, None);
}

// ---------------------------------------------------------------------------------------------
// Errors, not panics

fn tiny_sd_config() -> serde_json::Value {
    let text = std::fs::read_to_string(common::fixtures().join("models/tiny-sd/unet/config.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn build_err(v: serde_json::Value) -> String {
    let cfg: UNet2DConditionConfig = serde_json::from_value(v).unwrap();
    let vb = VarBuilder::from_backend(Box::new(Recorder::zeros()), DType::F32, Device::Cpu);
    match UNet2DConditionModel::new(vb, &cfg) {
        Ok(_) => panic!("config was accepted"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn bad_configs_are_errors() {
    let mut v = tiny_sd_config();
    v["attention_head_dim"] = serde_json::json!([8, 8, 8]);
    let e = build_err(v);
    assert!(e.contains("attention_head_dim"), "{e}");

    let mut v = tiny_sd_config();
    v["block_out_channels"] = serde_json::json!([16, 32, 32]);
    let e = build_err(v);
    assert!(e.contains("block_out_channels") && e.contains("down_block_types"), "{e}");

    let mut v = tiny_sd_config();
    v["up_block_types"] = serde_json::json!(["UpBlock2D"]);
    assert!(build_err(v).contains("up_block_types"));

    let mut v = tiny_sd_config();
    v["transformer_layers_per_block"] = serde_json::json!([1, 2, 3]);
    assert!(build_err(v).contains("transformer_layers_per_block"));

    let mut v = tiny_sd_config();
    v["transformer_layers_per_block"] = serde_json::json!([[1, 1], 1]);
    assert!(build_err(v).contains("reverse_transformer_layers_per_block"));

    let mut v = tiny_sd_config();
    v["layers_per_block"] = serde_json::json!([]);
    assert!(build_err(v).contains("layers_per_block"));

    let mut v = tiny_sd_config();
    v["down_block_types"] = serde_json::json!([]);
    v["up_block_types"] = serde_json::json!([]);
    v["block_out_channels"] = serde_json::json!([]);
    assert!(build_err(v).contains("down_block_types"));

    let mut v = tiny_sd_config();
    v["attention_head_dim"] = serde_json::json!(0);
    assert!(build_err(v).contains("attention heads"));

    let mut v = tiny_sd_config();
    v["norm_num_groups"] = serde_json::json!(5);
    assert!(build_err(v).contains("groups"));

    for (key, value, needle) in [
        ("class_embed_type", serde_json::json!("timestep"), "class_embed_type"),
        ("dual_cross_attention", serde_json::json!(true), "dual_cross_attention"),
        ("addition_embed_type", serde_json::json!("text"), "addition_embed_type"),
        ("resnet_time_scale_shift", serde_json::json!("spatial"), "resnet_time_scale_shift"),
        ("mid_block_type", serde_json::json!("UNetMidBlock2DSimpleCrossAttn"), "mid_block_type"),
        ("time_embedding_type", serde_json::json!("fourier"), "time_embedding_type"),
        ("num_attention_heads", serde_json::json!(8), "num_attention_heads"),
        ("act_fn", serde_json::json!("nonsense"), "act_fn"),
    ] {
        let mut v = tiny_sd_config();
        v[key] = value;
        let e = build_err(v);
        assert!(e.contains(needle), "{key}: {e}");
    }
    let mut v = tiny_sd_config();
    v["down_block_types"][0] = serde_json::json!("AttnDownBlock2D");
    assert!(build_err(v).contains("AttnDownBlock2D"));

    // A wrongly typed value is a parse error naming the key.
    let bad = serde_json::from_str::<UNet2DConditionConfig>(r#"{"layers_per_block": "two"}"#).unwrap_err();
    assert!(bad.to_string().contains("layers_per_block") || bad.to_string().contains("untagged"), "{bad}");
}

#[test]
fn wrong_weight_shape_is_an_error_naming_the_weight() {
    let dir = common::fixtures().join("models/tiny-sd/unet");
    let cfg = UNet2DConditionConfig::from_file(&dir.join("config.json")).unwrap();
    let mut tensors = candle_core::safetensors::load(&safetensors_files(&dir, None).unwrap()[0], &Device::Cpu).unwrap();
    let name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight";
    let shape = tensors[name].dims().to_vec();
    tensors.insert(name.to_string(), Tensor::zeros((shape[0], shape[1] + 1), DType::F32, &Device::Cpu).unwrap());
    let vb = VarBuilder::from_tensors(tensors.clone(), DType::F32, &Device::Cpu);
    let e = format!("{:#}", UNet2DConditionModel::new(vb, &cfg).unwrap_err());
    assert!(e.contains(name), "{e}");

    tensors.remove(name);
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let e = format!("{:#}", UNet2DConditionModel::new(vb, &cfg).unwrap_err());
    assert!(e.contains(name), "{e}");
}

#[test]
fn bad_inputs_are_errors() {
    let dir = common::fixtures().join("models/tiny-lcm/unet");
    let cfg = UNet2DConditionConfig::from_file(&dir.join("config.json")).unwrap();
    let model = UNet2DConditionModel::new(load_component(&dir, None, DType::F32, &Device::Cpu).unwrap(), &cfg).unwrap();
    let dev = Device::Cpu;
    let x = Tensor::zeros((2, 4, 8, 8), DType::F32, &dev).unwrap();
    let ehs = Tensor::zeros((2, 5, 16), DType::F32, &dev).unwrap();
    // three timesteps for a batch of two
    let t = Tensor::new(&[1f32, 2., 3.], &dev).unwrap();
    assert!(model.forward(&x, &t, &ehs, &Default::default()).is_err());
    // a ControlNet residual list of the wrong length
    let cond = UNetConditioning {
        down_block_additional_residuals: Some(vec![x.clone()]),
        mid_block_additional_residual: Some(x.clone()),
        ..Default::default()
    };
    assert!(model.forward(&x, 10.0, &ehs, &cond).is_err());
    // the SDXL added conditioning is required when the config asks for it
    let (sdxl, _) = extra("sdxl");
    let e = sdxl.forward(&x, 10.0, &ehs, &Default::default()).unwrap_err().to_string();
    assert!(e.contains("added_cond"), "{e}");
}
