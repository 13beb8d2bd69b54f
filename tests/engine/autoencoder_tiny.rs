//! AutoencoderTiny (TAESD): parity with diffusers on the random tiny models of
//! tests/fixtures/vaes/ (make_vae_fixtures.py), the real TAESD / TAESDXL configs build and ask for
//! exactly the weights diffusers has, and bad configs / inputs are errors.

use crate::common;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use lcm::loaders::weights::safetensors_files;
use lcm::models::vae::kl::{AutoencoderKL, AutoencoderKLConfig};
use lcm::models::vae::tiny::{AutoencoderTiny, AutoencoderTinyConfig};
use lcm::testing::{random_var_builder, recording_random_var_builder};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

const TOL: f64 = 1e-4;

fn vaes() -> PathBuf {
    common::fixtures().join("vaes")
}

fn reference() -> HashMap<String, Tensor> {
    let path = vaes().join("reference/modules.safetensors");
    candle_core::safetensors::load(&path, &Device::Cpu).unwrap()
}

fn check(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let err = common::rel_l2(got, want);
    println!("{what}: rel L2 {err:.3e}");
    assert!(err < TOL, "{what}: rel L2 {err:.3e} >= {TOL:e}");
}

/// The weight names and shapes the model asks for.
fn requested(cfg: &AutoencoderTinyConfig) -> BTreeMap<String, Vec<usize>> {
    let (vb, rec) = recording_random_var_builder(1, &Device::Cpu);
    AutoencoderTiny::new(vb, cfg).unwrap();
    let rec = rec.lock().unwrap();
    rec.iter().map(|(k, v)| (k.clone(), v.dims().to_vec())).collect()
}

fn file_tensors(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(&safetensors_files(dir, None).unwrap()[0], &Device::Cpu).unwrap()
}

/// Load a fixture folder, checking that the model uses every tensor of the file and nothing else.
fn load(name: &str, cfg: Option<AutoencoderTinyConfig>) -> AutoencoderTiny {
    let dir = vaes().join(name);
    let cfg = cfg.unwrap_or_else(|| AutoencoderTinyConfig::from_file(&dir.join("config.json")).unwrap());
    let tensors = file_tensors(&dir);
    let keys = tensors.iter().map(|(k, v)| (k.clone(), v.dims().to_vec())).collect();
    common::assert_same_keys(name, &requested(&cfg), &keys);
    AutoencoderTiny::new(VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu), &cfg).unwrap()
}

fn parity(name: &str) {
    let vae = load(name, None);
    let r = reference();
    check(&format!("{name} encode"), &vae.encode(&r["image"]).unwrap(), &r[&format!("{name}.latents")]);
    check(&format!("{name} decode"), &vae.decode(&r["z"]).unwrap(), &r[&format!("{name}.decoded")]);
    check(&format!("{name} decode b2"), &vae.decode(&r["z_b2"]).unwrap(), &r[&format!("{name}.decoded_b2")]);
}

/// relu, encoder 4 wide / decoder 8 wide, 2 stages each (/2, x2), the pipeline's tiny VAE.
#[test]
fn parity_taesd_tiny() {
    parity("taesd-tiny");
    let vae = load("taesd-tiny", None);
    assert_eq!(vae.vae_scale_factor(), 2);
    assert_eq!(vae.decoder_upscale(), 2);
    assert_eq!((vae.scaling_factor(), vae.shift_factor()), (1.0, Some(0.0)));
}

/// mish, 3 encoder stages (/4) with (1, 2, 1) blocks, 2 decoder stages with 3x upsampling and
/// (2, 1) blocks, other latent magnitude / shift / scaling / shift factors.
#[test]
fn parity_taesd_alt() {
    parity("taesd-alt");
    let vae = load("taesd-alt", None);
    let r = reference();
    let lat = &r["taesd-alt.latents"];
    check("taesd-alt scale_latents", &vae.scale_latents(lat).unwrap(), &r["taesd-alt.scaled"]);
    check("taesd-alt unscale_latents", &vae.unscale_latents(&r["taesd-alt.scaled"]).unwrap(), &r["taesd-alt.unscaled"]);
    // pipelines compute 2^(stages - 1) even though this decoder enlarges 3x
    assert_eq!((vae.vae_scale_factor(), vae.decoder_upscale()), (2, 3));
    assert_eq!((vae.scaling_factor(), vae.shift_factor()), (0.75, Some(0.1)));
    assert_eq!(vae.config.block_out_channels(), &[6, 6]);
}

/// The same weights under other `act_fn`s (including "GELU", which diffusers lower-cases).
#[test]
fn parity_taesd_alt_activations() {
    let r = reference();
    let base = AutoencoderTinyConfig::from_file(&vaes().join("taesd-alt/config.json")).unwrap();
    for act in ["silu", "GELU", "relu"] {
        let vae = load("taesd-alt", Some(AutoencoderTinyConfig { act_fn: act.into(), ..base.clone() }));
        check(
            &format!("taesd-alt act {act} encode"),
            &vae.encode(&r["image"]).unwrap(),
            &r[&format!("taesd-alt.act_{act}.latents")],
        );
        check(
            &format!("taesd-alt act {act} decode"),
            &vae.decode(&r["z"]).unwrap(),
            &r[&format!("taesd-alt.act_{act}.decoded")],
        );
    }
}

/// The replacement AutoencoderKL of the VAE pipeline references (widths 4 -> 8, 4 groups).
#[test]
fn parity_kl_alt() {
    let dir = vaes().join("kl-alt");
    let cfg = AutoencoderKLConfig::from_file(&dir.join("config.json")).unwrap();
    let vae = AutoencoderKL::new(VarBuilder::from_tensors(file_tensors(&dir), DType::F32, &Device::Cpu), &cfg).unwrap();
    let r = reference();
    check("kl-alt decode", &vae.decode(&r["z"]).unwrap(), &r["kl-alt.decoded"]);
    assert_eq!((vae.vae_scale_factor(), vae.scaling_factor()), (2, 0.13025));
}

/// madebyollin/taesd and madebyollin/taesdxl: full size, random weights, exactly diffusers' weight
/// names and shapes, and a small encode / decode.
#[test]
fn real_configs_build_and_run() {
    let dev = Device::Cpu;
    for name in ["taesd", "taesdxl"] {
        let dir = vaes().join("real_configs").join(name);
        let cfg = AutoencoderTinyConfig::from_file(&dir.join("config.json")).unwrap();
        let keys = dir.join("keys.txt");
        common::assert_same_keys(&keys.display().to_string(), &requested(&cfg), &common::read_keys(&keys));
        let vae = AutoencoderTiny::new(random_var_builder(3, DType::F32, &dev), &cfg).unwrap();
        assert_eq!(vae.vae_scale_factor(), 8, "{name}");
        assert_eq!(vae.decoder_upscale(), 8, "{name}");
        assert_eq!((vae.scaling_factor(), vae.shift_factor()), (1.0, Some(0.0)), "{name}");
        assert!(!vae.config.force_upcast);
        let z = Tensor::randn(0f32, 1.0, (1, 4, 3, 5), &dev).unwrap();
        let img = vae.decode(&z).unwrap();
        assert_eq!(img.dims(), &[1, 3, 24, 40], "{name}");
        let v = common::to_vec_f32(&img);
        assert!(v.iter().all(|x| x.is_finite()) && v.iter().any(|x| *x != v[0]), "{name}");
        // odd sizes round up at each of the 3 stride-2 convs: 20 -> 10 -> 5 -> 3, 27 -> 14 -> 7 -> 4
        let x = Tensor::rand(-1f32, 1.0, (2, 3, 20, 27), &dev).unwrap();
        assert_eq!(vae.encode(&x).unwrap().dims(), &[2, 4, 3, 4], "{name}");
        // the empty config is TAESD's
        let d = AutoencoderTinyConfig::default();
        assert_eq!(d.block_out_channels(), &[64; 4]);
        assert_eq!(
            (d.encoder_block_out_channels, d.decoder_block_out_channels, d.num_encoder_blocks, d.num_decoder_blocks),
            (
                cfg.encoder_block_out_channels.clone(),
                cfg.decoder_block_out_channels.clone(),
                cfg.num_encoder_blocks.clone(),
                cfg.num_decoder_blocks.clone()
            )
        );
        assert_eq!(
            (d.act_fn, d.latent_magnitude, d.latent_shift, d.scaling_factor),
            (cfg.act_fn.clone(), 3.0, 0.5, 1.0)
        );
    }
}

fn tiny_config() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(vaes().join("taesd-tiny/config.json")).unwrap()).unwrap()
}

fn build_err(v: serde_json::Value) -> String {
    let cfg: AutoencoderTinyConfig = serde_json::from_value(v).unwrap();
    match AutoencoderTiny::new(random_var_builder(1, DType::F32, &Device::Cpu), &cfg) {
        Ok(_) => panic!("config was accepted"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn bad_configs_are_errors() {
    let set = |k: &str, v: serde_json::Value| {
        let mut c = tiny_config();
        c[k] = v;
        build_err(c)
    };
    assert!(set("num_encoder_blocks", serde_json::json!([1, 1, 1])).contains("num_encoder_blocks"));
    assert!(set("decoder_block_out_channels", serde_json::json!([8])).contains("num_decoder_blocks"));
    assert!(set("encoder_block_out_channels", serde_json::json!([4, 8])).contains("must all be equal"));
    assert!(set("act_fn", serde_json::json!("tanh")).contains("tanh"));
    assert!(set("upsample_fn", serde_json::json!("bilinear")).contains("bilinear"));
    assert!(set("latent_channels", serde_json::json!(0)).contains("latent_channels"));
}

#[test]
fn bad_inputs_are_errors() {
    let vae = load("taesd-tiny", None);
    let dev = Device::Cpu;
    let e = vae.encode(&Tensor::zeros((1, 4, 8, 8), DType::F32, &dev).unwrap()).unwrap_err().to_string();
    assert!(e.contains("[batch, 3, h, w]"), "{e}");
    let e = vae.decode(&Tensor::zeros((1, 3, 4, 4), DType::F32, &dev).unwrap()).unwrap_err().to_string();
    assert!(e.contains("[batch, 4, h, w]"), "{e}");
    assert!(vae.decode(&Tensor::zeros((4, 4, 4), DType::F32, &dev).unwrap()).is_err());
    assert!(vae.encode(&Tensor::zeros((1, 3, 0, 4), DType::F32, &dev).unwrap()).is_err());
}

#[test]
fn wrong_or_missing_weight_is_an_error_naming_it() {
    let dir = vaes().join("taesd-tiny");
    let cfg = AutoencoderTinyConfig::from_file(&dir.join("config.json")).unwrap();
    let mut tensors = file_tensors(&dir);
    // the decoder's second conv of its first block (layers.0 conv, layers.1 act, layers.2 block)
    let name = "decoder.layers.2.conv.2.weight";
    tensors.insert(name.to_string(), Tensor::zeros((8, 8, 1, 1), DType::F32, &Device::Cpu).unwrap());
    let e = format!(
        "{:#}",
        AutoencoderTiny::new(VarBuilder::from_tensors(tensors.clone(), DType::F32, &Device::Cpu), &cfg).unwrap_err()
    );
    assert!(e.contains(name), "{e}");
    tensors.remove(name);
    let e = format!(
        "{:#}",
        AutoencoderTiny::new(VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu), &cfg).unwrap_err()
    );
    assert!(e.contains(name), "{e}");
}
