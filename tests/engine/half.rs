//! Half-precision weights (`--dtype f16|bf16`): on the CPU the weights stay f16 / bf16 in memory
//! (our kernels widen them while packing; bf16 weights are multiplied in bf16 where the CPU has
//! bf16 products), activations stay f32, so images stay within a few levels of the f32 ones;
//! fp16 files load for any dtype.
use crate::common;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use lcm::loaders::weights::{ComponentWeights, Precision, WeightDType};
use lcm::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use lcm::pipelines::{GenerateRequest, LcmPipeline, LoadOptions};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Largest per-pixel difference (out of 255) allowed for f16 weights: the bound.
const F16_TOL: u8 = 3;
/// For bf16 weights: bf16 keeps 8 significant bits (relative rounding up to 2^-9 ≈ 0.2% per
/// weight, vs 2^-12 for f16), so errors are ~8x f16's. Measured on these cases: f16 at most 1/255,
/// bf16 at most 3/255 (see the test's output); 6/255 leaves that margin of 2x.
const BF16_TOL: u8 = 6;

fn tiny_lcm() -> PathBuf {
    common::fixtures().join("models/tiny-lcm")
}

/// The 32x32 and 64x64 requests (64x64 runs the VAE's convolutions through Winograd).
fn requests() -> Vec<GenerateRequest> {
    let base =
        GenerateRequest { prompt: "a photo of a cat".into(), num_inference_steps: 4, seed: 0, ..Default::default() };
    vec![
        GenerateRequest { width: Some(32), height: Some(32), ..base.clone() },
        GenerateRequest {
            prompt: "an oil painting of a lighthouse, stormy sea".into(),
            width: Some(64),
            height: Some(64),
            seed: 3,
            num_images_per_prompt: 2,
            ..base
        },
    ]
}

fn images(model: &Path, opts: &LoadOptions) -> Vec<Vec<u8>> {
    let pipe = LcmPipeline::load(model.to_str().unwrap(), opts).unwrap();
    requests()
        .iter()
        .map(|r| pipe.generate(r, |_, _| {}).unwrap().iter().flat_map(|i| i.pixels.iter().copied()).collect())
        .collect()
}

fn max_diff(a: &[Vec<u8>], b: &[Vec<u8>]) -> u8 {
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            assert_eq!(x.len(), y.len());
            x.iter().zip(y).map(|(p, q)| p.abs_diff(*q)).max().unwrap()
        })
        .max()
        .unwrap()
}

fn opts(dtype: WeightDType) -> LoadOptions {
    LoadOptions { dtype, ..Default::default() }
}

#[test]
fn half_weights_give_the_f32_image() {
    let f32_images = images(&tiny_lcm(), &LoadOptions::default());
    let f16 = max_diff(&images(&tiny_lcm(), &opts(WeightDType::F16)), &f32_images);
    let bf16 = max_diff(&images(&tiny_lcm(), &opts(WeightDType::BF16)), &f32_images);
    eprintln!("max pixel difference vs f32 weights: f16 {f16}/255, bf16 {bf16}/255");
    assert!(f16 <= F16_TOL, "f16 weights: max pixel difference {f16}/255");
    assert!(bf16 <= BF16_TOL, "bf16 weights: max pixel difference {bf16}/255");
    // The same weights in f32 give exactly today's image (the default is plain f32).
    assert_eq!(images(&tiny_lcm(), &opts(WeightDType::F32)), f32_images);
}

#[test]
fn built_models_keep_weights_in_half_precision() {
    let pipe = LcmPipeline::load(tiny_lcm().to_str().unwrap(), &opts(WeightDType::F16)).unwrap();
    assert_eq!(pipe.weight_dtype(), WeightDType::F16);
    assert_eq!(pipe.components.unet.dtype(), DType::F16);
    let pipe = LcmPipeline::load(tiny_lcm().to_str().unwrap(), &opts(WeightDType::BF16)).unwrap();
    assert_eq!(pipe.components.unet.dtype(), DType::BF16);
    let pipe = LcmPipeline::load(tiny_lcm().to_str().unwrap(), &LoadOptions::default()).unwrap();
    assert_eq!(pipe.components.unet.dtype(), DType::F32);
}

/// Name, shape and dtype of each tensor handed out.
type Seen = Arc<Mutex<Vec<(String, Vec<usize>, DType)>>>;

/// Records every tensor a model takes from the real weight loader.
struct Tally {
    inner: VarBuilder<'static>,
    seen: Seen,
}

impl SimpleBackend for Tally {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, _: &Device) -> candle_core::Result<Tensor> {
        let t = self.inner.get_unchecked_dtype(name, dtype)?;
        assert_eq!(t.shape(), &s, "{name}");
        self.seen.lock().unwrap().push((name.into(), s.dims().to_vec(), t.dtype()));
        Ok(t)
    }
    fn get_unchecked(&self, name: &str, dtype: DType, _: &Device) -> candle_core::Result<Tensor> {
        let t = self.inner.get_unchecked_dtype(name, dtype)?;
        self.seen.lock().unwrap().push((name.into(), t.dims().to_vec(), t.dtype()));
        Ok(t)
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

/// The UNet's parameters as built: every matrix and kernel (rank >= 2) in the weight dtype,
/// the 1-D ones (norm scales, biases) in f32; the parameter bytes about halve.
#[test]
fn unet_parameter_bytes_halve() {
    let dir = tiny_lcm().join("unet");
    let cfg: UNet2DConditionConfig =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let weights = ComponentWeights::open(&dir, None).unwrap();
    let build = |weights_dtype: DType| {
        let seen: Seen = Default::default();
        let p = Precision { compute: DType::F32, weights: weights_dtype, int8: false };
        let tally = Tally { inner: weights.var_builder(None, p, &Device::Cpu), seen: seen.clone() };
        UNet2DConditionModel::new(VarBuilder::from_backend(Box::new(tally), DType::F32, Device::Cpu), &cfg).unwrap();
        let seen = seen.lock().unwrap().clone();
        seen
    };
    let bytes = |seen: &[(String, Vec<usize>, DType)]| -> usize {
        seen.iter().map(|(_, s, d)| s.iter().product::<usize>() * d.size_in_bytes()).sum()
    };
    let full = build(DType::F32);
    for dt in [DType::F16, DType::BF16] {
        let half = build(dt);
        assert_eq!(half.len(), full.len());
        for (name, shape, dtype) in &half {
            let want = if shape.len() >= 2 { dt } else { DType::F32 };
            assert_eq!(*dtype, want, "{name} {shape:?}");
        }
        let ratio = bytes(&half) as f64 / bytes(&full) as f64;
        eprintln!("{dt:?}: UNet parameters {} of {} bytes ({ratio:.3})", bytes(&half), bytes(&full));
        assert!(ratio < 0.51, "{dt:?}: parameter bytes ratio {ratio}");
    }
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
    }
}

/// The fixture with its weights also stored as `*.fp16.safetensors` (as hub repos ship them).
fn fp16_copy(tmp: &Path) -> PathBuf {
    let model = tmp.join("tiny-lcm");
    copy_dir(&tiny_lcm(), &model);
    for (comp, file) in
        [("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("text_encoder", "model")]
    {
        let tensors =
            candle_core::safetensors::load(model.join(comp).join(format!("{file}.safetensors")), &Device::Cpu).unwrap();
        let half: std::collections::HashMap<String, Tensor> = tensors
            .into_iter()
            .map(|(k, v)| {
                let v = if v.dtype() == DType::F32 { v.to_dtype(DType::F16).unwrap() } else { v };
                (k, v)
            })
            .collect();
        candle_core::safetensors::save(&half, model.join(comp).join(format!("{file}.fp16.safetensors"))).unwrap();
    }
    model
}

/// fp16 files load for every dtype. Kept as f16 weights they give bit for bit the image of the
/// same files widened to f32 weights (the packers widen exactly and the arithmetic is the same);
/// as f32, f16 or bf16 weights they stay close to the f32 files' image.
#[test]
fn fp16_files_load_for_any_dtype() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fp16_copy(tmp.path());
    let fp16 = |dtype| LoadOptions { variant: Some("fp16".into()), dtype, ..Default::default() };
    let f32_images = images(&tiny_lcm(), &LoadOptions::default());
    let as_f32 = images(&model, &fp16(WeightDType::F32));
    let as_f16 = images(&model, &fp16(WeightDType::F16));
    assert!(
        as_f16 == as_f32,
        "fp16 files: f16 weights differ from the same values in f32 (max {}/255)",
        max_diff(&as_f16, &as_f32)
    );
    let upcast = max_diff(&as_f32, &f32_images);
    let bf16 = max_diff(&images(&model, &fp16(WeightDType::BF16)), &f32_images);
    eprintln!("fp16 files vs f32 files: as f32 and f16 {upcast}/255, as bf16 {bf16}/255");
    assert!(upcast <= F16_TOL, "fp16 files: {upcast}/255");
    assert!(bf16 <= BF16_TOL, "fp16 files as bf16: {bf16}/255");
}

#[test]
fn dtype_names_parse() {
    for (s, d) in [
        ("f32", WeightDType::F32),
        ("FP32", WeightDType::F32),
        ("float32", WeightDType::F32),
        ("f16", WeightDType::F16),
        ("fp16", WeightDType::F16),
        ("float16", WeightDType::F16),
        ("bf16", WeightDType::BF16),
        ("bfloat16", WeightDType::BF16),
        ("int8", WeightDType::Int8),
        ("q8", WeightDType::Int8),
    ] {
        assert_eq!(s.parse::<WeightDType>().unwrap(), d, "{s}");
    }
    let e = "f64".parse::<WeightDType>().unwrap_err();
    assert_eq!(e, "unknown dtype `f64`: f32, f16, bf16 or int8");
    assert_eq!(WeightDType::default(), WeightDType::F32);
}

/// LoRAs fused into half-precision weights (added in f32, then stored as f16): close to the
/// f32 fusion's image for each LoRA fixture case.
#[test]
fn loras_fuse_into_half_weights() {
    let listing = common::reference_json("lora_pipelines.json");
    let model = common::fixtures().join("models/tiny-sd");
    let mut worst = 0;
    for case in listing["cases"].as_array().unwrap().iter().take(4) {
        let loras = common::lora_specs(case, case["fuse_lora_scale"].as_f64().unwrap_or(1.0));
        let request = GenerateRequest {
            prompt: case["prompt"].as_str().unwrap().into(),
            num_inference_steps: case["num_inference_steps"].as_u64().unwrap() as usize,
            guidance_scale: case["guidance_scale"].as_f64(),
            width: case["width"].as_u64().map(|v| v as usize),
            height: case["height"].as_u64().map(|v| v as usize),
            seed: case["seed"].as_u64().unwrap(),
            ..Default::default()
        };
        let run = |dtype| {
            let sd = Some(lcm::pipelines::PipelineKind::StableDiffusion);
            let opts = LoadOptions { loras: loras.clone(), dtype, pipeline: sd, ..Default::default() };
            let pipe = LcmPipeline::load(model.to_str().unwrap(), &opts).unwrap();
            assert_eq!(pipe.components.unet.dtype(), dtype.dtype());
            vec![pipe
                .generate(&request, |_, _| {})
                .unwrap()
                .iter()
                .flat_map(|i| i.pixels.iter().copied())
                .collect::<Vec<u8>>()]
        };
        let d = max_diff(&run(WeightDType::F16), &run(WeightDType::F32));
        assert!(d <= F16_TOL, "{}: f16 weights with LoRA {d}/255", case["name"]);
        worst = worst.max(d);
    }
    eprintln!("LoRA cases, f16 vs f32 weights: worst {worst}/255");
}

/// `--dtype` on the command line: f16 generates an image close to the default's; an unknown
/// name is a one-line error before anything loads.
#[test]
fn cli_dtype_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_lcm();
    let run = |out: &str, dtype: &str| {
        let out = tmp.path().join(out);
        let args = [
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "a photo of a cat",
            "--seed",
            "0",
            "--width",
            "32",
            "--height",
            "32",
            "--dtype",
            dtype,
            "--output",
            out.to_str().unwrap(),
        ];
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_lcm")).args(args).output().unwrap();
        (o, out)
    };
    let (o, f32_png) = run("f32.png", "f32");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (o, f16_png) = run("f16.png", "fp16");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let a = lcm::image_io::read_png(&f32_png).unwrap().pixels;
    let b = lcm::image_io::read_png(&f16_png).unwrap().pixels;
    assert!(max_diff(&[a], &[b]) <= F16_TOL);
    let (o, _) = run("bad.png", "f64");
    let err = String::from_utf8_lossy(&o.stderr);
    // A bad flag value is a usage error (exit 2, as clap's), on one line.
    assert_eq!(o.status.code(), Some(2), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines,
        ["error: invalid value 'f64' for '--dtype <DTYPE>': unknown dtype `f64`: f32, f16, bf16 or int8"]
    );
}

/// bf16 weights where the CPU multiplies in bf16 (AVX512-BF16): our bf16 image is no further from
/// our f32 image than diffusers' `torch_dtype=torch.bfloat16` image is from its float32 one (the
/// reference's `diffusers_f16_vs_f32_*` of the bf16 case, the same call and noise), max and mean.
/// Elsewhere bf16 weights are widened to f32 and the bound holds all the more.
#[test]
fn bf16_products_drift_no_more_than_diffusers_bf16() {
    let path = lcm::kernels::CpuPath::current();
    if path < lcm::kernels::CpuPath::Avx512Bf16 {
        println!("bf16 products not on this CPU path ({}): bf16 weights are widened to f32", path.name());
    }
    let refs = common::reference_json("half_pipelines_torch2.15.json");
    let case = refs["cases"].as_array().unwrap().iter().find(|c| c["name"] == "lcm_t2i_40x24_bf16").unwrap();
    let (max_ref, mean_ref) =
        (case["diffusers_f16_vs_f32_max"].as_u64().unwrap() as u8, case["diffusers_f16_vs_f32_mean"].as_f64().unwrap());
    let kw = &case["kw"];
    let req = GenerateRequest {
        prompt: kw["prompt"].as_str().unwrap().into(),
        num_inference_steps: kw["num_inference_steps"].as_u64().unwrap() as usize,
        guidance_scale: kw["guidance_scale"].as_f64(),
        width: Some(kw["width"].as_u64().unwrap() as usize),
        height: Some(kw["height"].as_u64().unwrap() as usize),
        seed: kw["seed"].as_u64().unwrap(),
        ..Default::default()
    };
    let image = |dtype| {
        let pipe = LcmPipeline::load(tiny_lcm().to_str().unwrap(), &opts(dtype)).unwrap();
        pipe.generate(&req, |_, _| {}).unwrap().remove(0).pixels
    };
    let (full, bf16) = (image(WeightDType::F32), image(WeightDType::BF16));
    let diffs: Vec<u8> = full.iter().zip(&bf16).map(|(a, b)| a.abs_diff(*b)).collect();
    let max = *diffs.iter().max().unwrap();
    let mean = diffs.iter().map(|&d| d as f64).sum::<f64>() / diffs.len() as f64;
    println!("CPU path {}: bf16 vs f32 image max {max}/255, mean {mean:.4}; diffusers bf16 vs f32: max {max_ref}, mean {mean_ref}", path.name());
    assert!(
        full != bf16 || path < lcm::kernels::CpuPath::Avx512Bf16,
        "bf16 products gave the f32 image: not computed in bf16"
    );
    assert!(
        max <= max_ref && mean <= mean_ref,
        "bf16 drift max {max} mean {mean:.4} above diffusers' {max_ref} / {mean_ref}"
    );
}
