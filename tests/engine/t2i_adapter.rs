//! T2IAdapter: parity with diffusers on the fixture adapters (full, full gray, light, full XL;
//! even and odd sizes, batch 2), the real TencentARC configs build and ask for exactly diffusers'
//! weights, and bad configs / inputs are errors.
//! Fixtures: tests/fixtures/make_t2i_adapter_fixtures.py.

use crate::common;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use lcm::models::t2i_adapter::{avg_pool2x2_ceil, pixel_unshuffle, T2IAdapter, T2IAdapterConfig};
use lcm::testing::random_var_builder;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

const TOL: f64 = 1e-4;
const ADAPTERS: [&str; 4] = ["full_sd", "full_sd_gray", "light_sd", "full_xl"];

fn adapter_dir(name: &str) -> PathBuf {
    common::fixtures().join("adapters").join(name)
}

fn real_config(name: &str) -> (PathBuf, T2IAdapterConfig) {
    let dir = common::fixtures().join("real_configs").join(name);
    let cfg = T2IAdapterConfig::from_file(&dir.join("config.json")).unwrap();
    (dir, cfg)
}

/// Random weights, recording every name and shape requested.
#[derive(Clone)]
struct Recorder(Arc<Mutex<BTreeMap<String, Vec<usize>>>>);

impl SimpleBackend for Recorder {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let prev = self.0.lock().unwrap().insert(name.to_string(), s.dims().to_vec());
        assert!(prev.is_none(), "weight {name} requested twice");
        random_var_builder(7, dtype, dev).get(s, name)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("unexpected unchecked get of {name}")
    }
    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

fn build_recorded(cfg: &T2IAdapterConfig) -> (T2IAdapter, BTreeMap<String, Vec<usize>>) {
    let rec = Recorder(Arc::new(Mutex::new(BTreeMap::new())));
    let vb = VarBuilder::from_backend(Box::new(rec.clone()), DType::F32, Device::Cpu);
    let model = T2IAdapter::new(vb, cfg).unwrap();
    let seen = rec.0.lock().unwrap().clone();
    (model, seen)
}

fn file_keys(dir: &std::path::Path) -> BTreeMap<String, Vec<usize>> {
    let st = candle_core::safetensors::load(dir.join("diffusion_pytorch_model.safetensors"), &Device::Cpu).unwrap();
    st.into_iter().map(|(k, v)| (k, v.dims().to_vec())).collect()
}

/// The control image of a reference case: U8 pixels / 255.
fn case_input(refs: &std::collections::HashMap<String, Tensor>, case: &str) -> Tensor {
    (refs[&format!("{case}.input")].to_dtype(DType::F32).unwrap() / 255.0).unwrap()
}

fn cases(refs: &std::collections::HashMap<String, Tensor>) -> Vec<String> {
    let mut cases: Vec<String> = refs.keys().filter_map(|k| k.strip_suffix(".input").map(String::from)).collect();
    cases.sort();
    cases
}

fn scalar_i64(t: &Tensor) -> usize {
    t.to_dtype(DType::I64).unwrap().to_scalar::<i64>().unwrap() as usize
}

#[test]
fn fixture_adapters_match_diffusers() {
    let mut worst_all = 0f64;
    for name in ADAPTERS {
        let dir = adapter_dir(name);
        // The model asks for exactly the tensors diffusers saved.
        let cfg = T2IAdapterConfig::from_file(&dir.join("config.json")).unwrap();
        let (_, seen) = build_recorded(&cfg);
        common::assert_same_keys(name, &seen, &file_keys(&dir));

        let model = T2IAdapter::load(&dir).unwrap();
        let refs = common::reference(&format!("t2i_adapter_{name}.safetensors"));
        assert_eq!(model.total_downscale_factor(), scalar_i64(&refs["total_downscale_factor"]), "{name}");
        assert_eq!(model.downscale_factor(), scalar_i64(&refs["downscale_factor"]), "{name}");
        let cases = cases(&refs);
        assert!(cases.len() >= 2, "{name}: cases {cases:?}");
        for case in cases {
            let feats = model.forward(&case_input(&refs, &case)).unwrap();
            let n_ref = refs.keys().filter(|k| k.starts_with(&format!("{case}.feature."))).count();
            assert_eq!(feats.len(), n_ref, "{name} {case}: number of features");
            let mut worst = 0f64;
            for (i, f) in feats.iter().enumerate() {
                let want = &refs[&format!("{case}.feature.{i}")];
                assert_eq!(f.dims(), want.dims(), "{name} {case} feature {i}: shape");
                let err = common::rel_l2(f, want);
                assert!(err < TOL, "{name} {case} feature {i}: rel L2 {err:.3e} >= {TOL:e}");
                worst = worst.max(err);
            }
            println!("{name} {case}: {} features, worst rel L2 {worst:.3e}", feats.len());
            worst_all = worst_all.max(worst);
        }
    }
    println!("worst rel L2 over all cases: {worst_all:.3e}");
}

/// Half-precision weights: the input is cast to the weights' dtype and the result stays close.
#[test]
fn f16_weights_run_close_to_f32() {
    let dir = adapter_dir("full_xl");
    let model = T2IAdapter::load_with(&dir, None, DType::F16, &Device::Cpu).unwrap();
    assert_eq!(model.dtype(), DType::F16);
    let refs = common::reference("t2i_adapter_full_xl.safetensors");
    for case in cases(&refs) {
        let feats = model.forward(&case_input(&refs, &case)).unwrap();
        for (i, f) in feats.iter().enumerate() {
            assert_eq!(f.dtype(), DType::F16);
            let err = common::rel_l2(f, &refs[&format!("{case}.feature.{i}")]);
            assert!(err < 1e-2, "full_xl f16 {case} feature {i}: rel L2 {err:.3e}");
        }
    }
}

/// The real TencentARC configs build at full size with random weights, ask for diffusers'
/// weight names and shapes (`keys.txt`, listed by diffusers from the config), and give one
/// feature per block with the sizes the SD1.5 / SDXL UNets expect.
#[test]
fn real_configs_build_and_run() {
    // (model, input channels, feature shapes for a 64x64 input)
    let sd15: &[[usize; 4]] = &[[1, 320, 8, 8], [1, 640, 4, 4], [1, 1280, 2, 2], [1, 1280, 1, 1]];
    let sdxl: &[[usize; 4]] = &[[1, 320, 4, 4], [1, 640, 4, 4], [1, 1280, 2, 2], [1, 1280, 2, 2]];
    for (name, in_ch, shapes, total) in
        [("TencentARC__t2iadapter_canny_sd15v2", 1, sd15, 64), ("TencentARC__t2i-adapter-canny-sdxl-1.0", 3, sdxl, 32)]
    {
        let (dir, cfg) = real_config(name);
        assert_eq!(cfg.in_channels, in_ch, "{name}");
        let (_, seen) = build_recorded(&cfg);
        common::assert_same_keys(name, &seen, &common::read_keys(&dir.join("keys.txt")));

        let model = T2IAdapter::new(random_var_builder(3, DType::F32, &Device::Cpu), &cfg).unwrap();
        assert_eq!(model.total_downscale_factor(), total, "{name}");
        let x = Tensor::rand(0f32, 1.0, (1, in_ch, 64, 64), &Device::Cpu).unwrap();
        let feats = model.forward(&x).unwrap();
        let got: Vec<Vec<usize>> = feats.iter().map(|f| f.dims().to_vec()).collect();
        let want: Vec<Vec<usize>> = shapes.iter().map(|s| s.to_vec()).collect();
        assert_eq!(got, want, "{name}");
        for f in &feats {
            let v = common::to_vec_f32(f);
            assert!(v.iter().all(|x| x.is_finite()) && v.iter().any(|x| *x != 0.0), "{name}");
        }
        // With 3 channels the sd15 canny adapter (in_channels 1) refuses the input.
        if in_ch == 1 {
            let err = model.forward(&Tensor::zeros((1, 3, 64, 64), DType::F32, &Device::Cpu).unwrap()).unwrap_err();
            assert!(err.to_string().contains("3 channels"), "{err}");
        }
    }
}

#[test]
fn config_defaults_are_diffusers() {
    let cfg: T2IAdapterConfig = serde_json::from_str("{}").unwrap();
    assert_eq!(cfg.in_channels, 3);
    assert_eq!(cfg.channels, vec![320, 640, 1280, 1280]);
    assert_eq!(cfg.num_res_blocks, 2);
    assert_eq!(cfg.downscale_factor, 8);
    assert_eq!(cfg.adapter_type, "full_adapter");
    // The upstream sd15v2 canny config predates `downscale_factor`.
    let cfg: T2IAdapterConfig =
        serde_json::from_str(r#"{"_class_name": "T2IAdapter", "in_channels": 1, "extra": 5}"#).unwrap();
    assert_eq!(cfg.downscale_factor, 8);
    assert_eq!(cfg.class_name.as_deref(), Some("T2IAdapter"));
}

fn tiny(adapter_type: &str, channels: Vec<usize>) -> T2IAdapterConfig {
    T2IAdapterConfig {
        class_name: None,
        in_channels: 3,
        channels,
        num_res_blocks: 1,
        downscale_factor: 2,
        adapter_type: adapter_type.into(),
    }
}

fn build_err(cfg: &T2IAdapterConfig) -> String {
    let err = T2IAdapter::new(random_var_builder(1, DType::F32, &Device::Cpu), cfg).unwrap_err();
    format!("{err:#}")
}

#[test]
fn bad_configs_are_errors() {
    let e = build_err(&tiny("controlnet", vec![8, 16]));
    assert!(e.contains("unsupported adapter_type `controlnet`"), "{e}");
    let e = build_err(&tiny("full_adapter", vec![]));
    assert!(e.contains("channels"), "{e}");
    let e = build_err(&tiny("full_adapter", vec![8, 0]));
    assert!(e.contains("channels"), "{e}");
    let e = build_err(&T2IAdapterConfig { downscale_factor: 0, ..tiny("full_adapter", vec![8]) });
    assert!(e.contains("downscale_factor"), "{e}");
    let e = build_err(&tiny("light_adapter", vec![8, 2]));
    assert!(e.contains("at least 4"), "{e}");
    let e = build_err(&tiny("full_adapter_xl", vec![8, 16, 16, 32]));
    assert!(e.contains("channels[3] == channels[2]"), "{e}");
    // Each error message is one line.
    assert!(!e.contains('\n'), "{e}");
}

#[test]
fn bad_inputs_are_errors() {
    let model = T2IAdapter::load(&adapter_dir("full_xl")).unwrap();
    let dev = Device::Cpu;
    // 30 is even but not a multiple of the downscale factor 4 (diffusers' PixelUnshuffle raises too).
    for (h, w) in [(30, 32), (32, 18), (0, 32)] {
        let x = Tensor::zeros((1, 3, h, w), DType::F32, &dev).unwrap();
        let e = model.forward(&x).unwrap_err().to_string();
        assert!(e.contains("downscale_factor 4"), "{h}x{w}: {e}");
        assert!(!e.contains('\n'), "{e}");
    }
    let e = model.forward(&Tensor::zeros((1, 1, 32, 32), DType::F32, &dev).unwrap()).unwrap_err().to_string();
    assert!(e.contains("input has 1 channels, the adapter expects 3"), "{e}");
    let e = model.forward(&Tensor::zeros((3, 32, 32), DType::F32, &dev).unwrap()).unwrap_err().to_string();
    assert!(e.contains("[batch, channels, height, width]"), "{e}");
}

#[test]
fn load_errors() {
    // A folder of another model class.
    let e = format!("{:#}", T2IAdapter::load(&common::fixtures().join("models/tiny-sd/vae")).unwrap_err());
    assert!(e.contains("not a `T2IAdapter`"), "{e}");
    // A folder without config.json.
    let e = format!("{:#}", T2IAdapter::load(&common::fixtures().join("adapters")).unwrap_err());
    assert!(e.contains("config.json"), "{e}");
    // Weights that do not fit the config: a config from one fixture, weights of another.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(adapter_dir("full_sd_gray").join("config.json"), tmp.path().join("config.json")).unwrap();
    std::fs::copy(
        adapter_dir("full_sd").join("diffusion_pytorch_model.safetensors"),
        tmp.path().join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    let e = format!("{:#}", T2IAdapter::load(tmp.path()).unwrap_err());
    assert!(e.contains("adapter.conv_in.weight"), "{e}");
}

#[test]
fn pixel_unshuffle_matches_pytorch() {
    // torch.nn.PixelUnshuffle(2)(torch.arange(16.).reshape(1, 1, 4, 4))
    let x = Tensor::arange(0f32, 16., &Device::Cpu).unwrap().reshape((1, 1, 4, 4)).unwrap();
    let y = pixel_unshuffle(&x, 2).unwrap();
    assert_eq!(y.dims(), &[1, 4, 2, 2]);
    let want = [0., 2., 8., 10., 1., 3., 9., 11., 4., 6., 12., 14., 5., 7., 13., 15.];
    assert_eq!(common::to_vec_f32(&y), want);
    // Channels stay outermost: channel c of the input gives output channels c*r*r .. (c+1)*r*r.
    let x = Tensor::arange(0f32, 2. * 3. * 6., &Device::Cpu).unwrap().reshape((1, 2, 3, 6)).unwrap();
    let y = pixel_unshuffle(&x, 3).unwrap();
    assert_eq!(y.dims(), &[1, 18, 1, 2]);
    let v = common::to_vec_f32(&y);
    // out[c*9 + i*3 + j, 0, w] = in[c, i, w*3 + j]
    for c in 0..2 {
        for i in 0..3 {
            for j in 0..3 {
                for w in 0..2 {
                    assert_eq!(v[(c * 9 + i * 3 + j) * 2 + w], (c * 18 + i * 6 + w * 3 + j) as f32);
                }
            }
        }
    }
}

#[test]
fn avg_pool_ceil_mode_matches_pytorch() {
    // torch.nn.AvgPool2d(2, 2, ceil_mode=True)(torch.arange(9.).reshape(1, 1, 3, 3))
    // = [[2.0, 3.5], [6.5, 8.0]]: partial windows are divided by the pixels inside them.
    let x = Tensor::arange(0f32, 9., &Device::Cpu).unwrap().reshape((1, 1, 3, 3)).unwrap();
    let y = avg_pool2x2_ceil(&x).unwrap();
    assert_eq!(y.dims(), &[1, 1, 2, 2]);
    assert_eq!(common::to_vec_f32(&y), [2.0, 3.5, 6.5, 8.0]);
    // Even sizes are a plain 2x2 mean; a 1x1 input stays as it is.
    let x = Tensor::arange(0f32, 8., &Device::Cpu).unwrap().reshape((1, 2, 2, 2)).unwrap();
    assert_eq!(common::to_vec_f32(&avg_pool2x2_ceil(&x).unwrap()), [1.5, 5.5]);
    let x = Tensor::new(&[[[[7f32]]]], &Device::Cpu).unwrap();
    assert_eq!(common::to_vec_f32(&avg_pool2x2_ceil(&x).unwrap()), [7.0]);
}
