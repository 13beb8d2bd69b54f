//! AutoencoderKL: parity with diffusers on the fixture VAEs, every real config builds and asks
//! for exactly the weights of the real checkpoint, and bad configs / weights are errors.

use crate::common;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use lcm::loaders::weights::safetensors_files;
use lcm::models::vae::kl::{AutoencoderKL, AutoencoderKLConfig};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

const TOL: f64 = 1e-4;

/// Records every weight name and shape requested; serves the real tensors of `inner` or, without
/// it, zeros as a broadcast scalar.
struct Inner {
    inner: Option<MmapedSafetensors>,
    seen: Mutex<BTreeMap<String, Vec<usize>>>,
}

#[derive(Clone)]
struct Recorder(Arc<Inner>);

impl SimpleBackend for Recorder {
    fn get(&self, s: Shape, name: &str, h: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let prev = self.0.seen.lock().unwrap().insert(name.to_string(), s.dims().to_vec());
        assert!(prev.is_none(), "weight {name} requested twice");
        match &self.0.inner {
            Some(st) => SimpleBackend::get(st, s, name, h, dtype, dev),
            None => Tensor::zeros((), dtype, dev)?.broadcast_as(s),
        }
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("unexpected unchecked get of {name}")
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.0.inner.as_ref().is_none_or(|st| st.get(name).is_ok())
    }
}

fn build_recorded(
    inner: Option<MmapedSafetensors>,
    cfg: &AutoencoderKLConfig,
) -> (anyhow::Result<AutoencoderKL>, BTreeMap<String, Vec<usize>>) {
    let rec = Recorder(Arc::new(Inner { inner, seen: Mutex::new(BTreeMap::new()) }));
    let vb = VarBuilder::from_backend(Box::new(rec.clone()), DType::F32, Device::Cpu);
    let model = AutoencoderKL::new(vb, cfg);
    let seen = rec.0.seen.lock().unwrap().clone();
    (model, seen)
}

/// Load a VAE folder, checking that the model uses every tensor of the file and nothing else.
fn load_vae(dir: &Path) -> AutoencoderKL {
    let cfg = AutoencoderKLConfig::from_file(&dir.join("config.json")).unwrap();
    let files = safetensors_files(dir, None).unwrap();
    let st = unsafe { MmapedSafetensors::multi(&files) }.unwrap();
    let file_keys: BTreeMap<_, _> = st.tensors().into_iter().map(|(n, v)| (n, v.shape().to_vec())).collect();
    let (model, seen) = build_recorded(Some(st), &cfg);
    common::assert_same_keys(&dir.display().to_string(), &seen, &file_keys);
    model.unwrap()
}

fn check(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let err = common::rel_l2(got, want);
    println!("{what}: rel L2 {err:.3e}");
    assert!(err < TOL, "{what}: rel L2 {err:.3e} >= {TOL:e}");
}

fn parity_main_fixture(model: &str) {
    let vae = load_vae(&common::fixtures().join("models").join(model).join("vae"));
    let r = common::reference(&format!("vae_{model}.safetensors"));
    let post = vae.encode(&r["image"]).unwrap();
    check(&format!("vae_{model} latent_mean"), &post.mean, &r["latent_mean"]);
    check(&format!("vae_{model} latent_logvar"), &post.logvar, &r["latent_logvar"]);
    assert!(
        Tensor::eq(post.mode(), &post.mean).unwrap().flatten_all().unwrap().min(0).unwrap().to_scalar::<u8>().unwrap()
            == 1
    );
    check(&format!("vae_{model} decoded"), &vae.decode(&r["latents"]).unwrap(), &r["decoded"]);
    check(&format!("vae_{model} decoded_odd"), &vae.decode(&r["latents_odd"]).unwrap(), &r["decoded_odd"]);
}

#[test]
fn parity_tiny_sd() {
    parity_main_fixture("tiny-sd");
}

#[test]
fn parity_tiny_lcm() {
    parity_main_fixture("tiny-lcm");
}

#[test]
fn parity_tiny_sd2() {
    parity_main_fixture("tiny-sd2");
}

fn extra(case: &str) -> (AutoencoderKL, HashMap<String, Tensor>) {
    let root = common::fixtures().join("unet_extra");
    let vae = load_vae(&root.join("models").join(case));
    let path = root.join("reference").join(format!("{case}.safetensors"));
    (vae, candle_core::safetensors::load(path, &Device::Cpu).unwrap())
}

fn parity_extra(case: &str) {
    let (vae, r) = extra(case);
    // even and odd (27x21) images: the encoder's right/bottom padding before each stride-2 conv
    for tag in ["even", "odd"] {
        let post = vae.encode(&r[&format!("image_{tag}")]).unwrap();
        check(&format!("{case} {tag} latent_mean"), &post.mean, &r[&format!("latent_mean_{tag}")]);
        check(&format!("{case} {tag} latent_logvar"), &post.logvar, &r[&format!("latent_logvar_{tag}")]);
    }
    check(&format!("{case} decoded"), &vae.decode(&r["latents"]).unwrap(), &r["decoded"]);
}

/// Three blocks, two resnets per block.
#[test]
fn parity_extra_vae3() {
    parity_extra("vae3");
}

/// No quant_conv / post_quant_conv, no mid-block attention, 3 latent channels.
#[test]
fn parity_extra_vae_plain() {
    parity_extra("vae_plain");
    let (vae, _) = extra("vae_plain");
    assert!(vae.quant_conv.is_none() && vae.post_quant_conv.is_none());
    assert_eq!(vae.shift_factor(), Some(0.1));
}

#[test]
fn scaling_and_sample() {
    let (vae, r) = extra("vae3");
    assert_eq!(vae.scaling_factor(), 0.13025);
    assert_eq!(vae.vae_scale_factor(), 4);
    assert_eq!(vae.shift_factor(), None);
    let post = vae.encode(&r["image_even"]).unwrap();
    // sample(0) is the mean; sample(1) is mean + exp(logvar / 2)
    let zeros = post.mean.zeros_like().unwrap();
    check("sample(0)", &post.sample(&zeros).unwrap(), &post.mean);
    let want = (&post.mean + (&post.logvar * 0.5).unwrap().exp().unwrap()).unwrap();
    check("sample(1)", &post.sample(&zeros.ones_like().unwrap()).unwrap(), &want);
    let cfg: AutoencoderKLConfig = serde_json::from_str("{}").unwrap();
    assert_eq!(cfg.scaling_factor, 0.18215);
}

#[test]
fn real_vae_configs_build_with_exact_weight_names() {
    let root = common::fixtures().join("real_configs");
    let mut dirs: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .flat_map(|m| {
            let m = m.unwrap().path();
            std::fs::read_dir(&m).unwrap().map(|c| c.unwrap().path()).collect::<Vec<_>>()
        })
        .filter(|d| d.file_name().unwrap().to_str().unwrap().starts_with("vae") && d.join("config.json").exists())
        .collect();
    dirs.sort();
    let mut with_keys = 0;
    for dir in &dirs {
        let cfg = AutoencoderKLConfig::from_file(&dir.join("config.json")).unwrap();
        let (model, seen) = build_recorded(None, &cfg);
        let model = model.unwrap_or_else(|e| panic!("{}: {e:#}", dir.display()));
        assert_eq!(model.vae_scale_factor(), 8);
        let keys = dir.join("keys.txt");
        if keys.exists() {
            common::assert_same_keys(&keys.display().to_string(), &seen, &common::read_keys(&keys));
            with_keys += 1;
        }
        println!("{}: {} weights{}", dir.display(), seen.len(), if keys.exists() { ", match keys.txt" } else { "" });
    }
    assert!(dirs.len() >= 5 && with_keys >= 2, "{} VAE configs, {with_keys} with keys", dirs.len());
}

fn tiny_config() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(common::fixtures().join("models/tiny-sd/vae/config.json")).unwrap())
        .unwrap()
}

fn build_err(v: serde_json::Value) -> String {
    let cfg: AutoencoderKLConfig = serde_json::from_value(v).unwrap();
    match build_recorded(None, &cfg).0 {
        Ok(_) => panic!("config was accepted"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn bad_configs_are_errors() {
    let mut v = tiny_config();
    v["up_block_types"] = serde_json::json!(["UpDecoderBlock2D"]);
    assert!(build_err(v).contains("up_block_types"));
    let mut v = tiny_config();
    v["down_block_types"] = serde_json::json!(["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"]);
    assert!(build_err(v).contains("down_block_types"));
    let mut v = tiny_config();
    v["block_out_channels"] = serde_json::json!([]);
    v["down_block_types"] = serde_json::json!([]);
    v["up_block_types"] = serde_json::json!([]);
    assert!(build_err(v).contains("block_out_channels"));
    let mut v = tiny_config();
    v["norm_num_groups"] = serde_json::json!(7);
    assert!(build_err(v).contains("groups"));
    let mut v = tiny_config();
    v["down_block_types"][0] = serde_json::json!("AttnDownEncoderBlock2D");
    assert!(build_err(v).contains("AttnDownEncoderBlock2D"));
}

#[test]
fn wrong_weight_shape_is_an_error_naming_the_weight() {
    let dir = common::fixtures().join("models/tiny-sd/vae");
    let cfg = AutoencoderKLConfig::from_file(&dir.join("config.json")).unwrap();
    let mut tensors = candle_core::safetensors::load(&safetensors_files(&dir, None).unwrap()[0], &Device::Cpu).unwrap();
    let name = "decoder.mid_block.attentions.0.to_q.weight";
    tensors.insert(name.to_string(), Tensor::zeros((3, 3), DType::F32, &Device::Cpu).unwrap());
    let vb = VarBuilder::from_tensors(tensors.clone(), DType::F32, &Device::Cpu);
    let e = format!("{:#}", AutoencoderKL::new(vb, &cfg).unwrap_err());
    assert!(e.contains(name), "{e}");
    tensors.remove(name);
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let e = format!("{:#}", AutoencoderKL::new(vb, &cfg).unwrap_err());
    assert!(e.contains(name), "{e}");
}

/// VAE checkpoints from before diffusers 0.14 name the mid-block attention
/// `query`/`key`/`value`/`proj_attn`; they load and decode the same.
#[test]
fn legacy_attention_names_load() {
    let dir = common::fixtures().join("models/tiny-sd/vae");
    let cfg = AutoencoderKLConfig::from_file(&dir.join("config.json")).unwrap();
    let tensors = candle_core::safetensors::load(&safetensors_files(&dir, None).unwrap()[0], &Device::Cpu).unwrap();
    let renamed: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, v)| {
            let k = k
                .replace("attentions.0.to_q.", "attentions.0.query.")
                .replace("attentions.0.to_k.", "attentions.0.key.")
                .replace("attentions.0.to_v.", "attentions.0.value.")
                .replace("attentions.0.to_out.0.", "attentions.0.proj_attn.");
            (k, v.clone())
        })
        .collect();
    assert!(renamed.contains_key("decoder.mid_block.attentions.0.proj_attn.weight"));
    let new = AutoencoderKL::new(VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu), &cfg).unwrap();
    let old = AutoencoderKL::new(VarBuilder::from_tensors(renamed, DType::F32, &Device::Cpu), &cfg).unwrap();
    let r = common::reference("vae_tiny-sd.safetensors");
    check("legacy names", &old.decode(&r["latents"]).unwrap(), &new.decode(&r["latents"]).unwrap());
}

/// `ops::conv2d` against a direct sum, including C == H == W, where candle 0.9.2's CPU kernel
/// reads NCHW input as NHWC (huggingface/candle#3404; hit by the SD VAE at 512 px).
#[test]
fn conv2d_matches_direct_sum() {
    fn direct(x: &Tensor, k: &Tensor, b: &Tensor, stride: usize, pad: usize) -> Tensor {
        let (n, c, h, w) = x.dims4().unwrap();
        let (o, _, kh, kw) = k.dims4().unwrap();
        let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let kv = k.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let bv = b.to_vec1::<f32>().unwrap();
        let (oh, ow) = ((h + 2 * pad - kh) / stride + 1, (w + 2 * pad - kw) / stride + 1);
        let mut out = vec![0f32; n * o * oh * ow];
        for (i, v) in out.iter_mut().enumerate() {
            let (ni, oi, y, xx) = (i / (o * oh * ow), i / (oh * ow) % o, i / ow % oh, i % ow);
            let mut s = bv[oi] as f64;
            for ci in 0..c {
                for ky in 0..kh {
                    for kx in 0..kw {
                        let (iy, ix) =
                            ((y * stride + ky) as isize - pad as isize, (xx * stride + kx) as isize - pad as isize);
                        if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                            s += xv[((ni * c + ci) * h + iy as usize) * w + ix as usize] as f64
                                * kv[((oi * c + ci) * kh + ky) * kw + kx] as f64;
                        }
                    }
                }
            }
            *v = s as f32;
        }
        Tensor::from_vec(out, (n, o, oh, ow), x.device()).unwrap()
    }
    let dev = Device::Cpu;
    for (c, o, h, w, k, stride, pad) in [
        (8, 16, 8, 8, 3, 1, 1),
        (8, 8, 8, 8, 3, 2, 0),
        (6, 4, 6, 6, 3, 2, 1),
        (8, 16, 8, 9, 3, 1, 1),
        (5, 7, 9, 13, 3, 1, 1),
        (4, 4, 4, 4, 1, 1, 0),
    ] {
        let x = Tensor::randn(0f32, 1., (2, c, h, w), &dev).unwrap();
        let kernel = Tensor::randn(0f32, 1., (o, c, k, k), &dev).unwrap();
        let bias = Tensor::randn(0f32, 1., o, &dev).unwrap();
        let got = lcm::ops::conv2d(&x, &kernel, Some(&bias), stride, pad).unwrap();
        check(
            &format!("conv2d c{c} o{o} {h}x{w} k{k} s{stride} p{pad}"),
            &got,
            &direct(&x, &kernel, &bias, stride, pad),
        );
    }
}
