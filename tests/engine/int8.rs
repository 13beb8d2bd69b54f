//! 8-bit weights (`--dtype int8`): the UNet's linear and convolution weights quantized per
//! output channel at load, multiplied in 8 bits (AVX512-VNNI) or dequantized to f32 elsewhere.
//! The images stay within a bounded drift of the f32 ones; every CPU path is checked by the CLI
//! test in `tests/cli.rs`.
use crate::common;

use candle_core::{DType, Device, Tensor};
use lcm::kernels::int8::Int8Path;
use lcm::loaders::weights::{ComponentWeights, Precision, WeightDType};
use lcm::nn::{Conv2d, Linear, Weight};
use lcm::pipelines::{GenerateRequest, LcmPipeline, LoadOptions};
use std::collections::HashMap;

/// Bounds on the 8-bit image's drift from the f32 one (out of 255), about twice what the tiny
/// LCM shows (see the test's output).
const MAX_DRIFT: u8 = 16;
const MEAN_DRIFT: f64 = 2.0;

fn images(dtype: WeightDType) -> Vec<Vec<u8>> {
    let model = common::fixtures().join("models/tiny-lcm");
    let pipe = LcmPipeline::load(model.to_str().unwrap(), &LoadOptions { dtype, ..Default::default() }).unwrap();
    assert_eq!(pipe.weight_dtype(), dtype);
    let base =
        GenerateRequest { prompt: "a photo of a cat".into(), num_inference_steps: 4, seed: 0, ..Default::default() };
    [
        GenerateRequest { width: Some(32), height: Some(32), ..base.clone() },
        GenerateRequest {
            prompt: "an oil painting of a lighthouse".into(),
            width: Some(64),
            height: Some(64),
            seed: 3,
            num_images_per_prompt: 2,
            ..base
        },
    ]
    .iter()
    .map(|r| pipe.generate(r, |_, _| {}).unwrap().iter().flat_map(|i| i.pixels.iter().copied()).collect())
    .collect()
}

#[test]
fn int8_images_drift_boundedly_from_f32() {
    let (full, int8) = (images(WeightDType::F32), images(WeightDType::Int8));
    let (mut max, mut sum, mut sq, mut n) = (0u8, 0f64, 0f64, 0usize);
    for (a, b) in full.iter().zip(&int8) {
        assert_eq!(a.len(), b.len());
        for (p, q) in a.iter().zip(b) {
            let d = p.abs_diff(*q);
            max = max.max(d);
            sum += d as f64;
            sq += (d as f64).powi(2);
            n += 1;
        }
    }
    let mean = sum / n as f64;
    let psnr = 10.0 * (255f64.powi(2) / (sq / n as f64)).log10();
    eprintln!("int8 vs f32 ({:?}): max {max}/255, mean {mean:.3}, PSNR {psnr:.1} dB", Int8Path::current());
    assert!(max > 0, "the 8-bit image is the f32 one: nothing was quantized");
    assert!(max <= MAX_DRIFT && mean <= MEAN_DRIFT, "int8 drift: max {max}, mean {mean:.3}");
}

/// Random layer weights written to a safetensors file and loaded the way a model loads them.
fn layer_weights(tensors: &[(&str, Vec<usize>)]) -> (tempfile::TempDir, ComponentWeights) {
    let dir = tempfile::tempdir().unwrap();
    let mut map = HashMap::new();
    for (i, (name, shape)) in tensors.iter().enumerate() {
        let t = Tensor::randn(0f32, 0.05, shape.as_slice(), &Device::Cpu).unwrap();
        map.insert(name.to_string(), (t + i as f64 * 0.01).unwrap());
    }
    let path = dir.path().join("w.safetensors");
    candle_core::safetensors::save(&map, &path).unwrap();
    let weights = ComponentWeights::open_files(&[path]).unwrap();
    (dir, weights)
}

fn rel_l2(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
    let n = b.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
    (d / n).sqrt()
}

/// A wide convolution and a linear layer built with 8-bit precision keep 8-bit weights and
/// stay within 8-bit rounding of the float layers; a narrow convolution stays float.
#[test]
fn layers_load_as_8_bit_and_match_the_float_ones() {
    let (_dir, w) = layer_weights(&[
        ("conv.weight", vec![256, 64, 3, 3]),
        ("conv.bias", vec![256]),
        ("small.weight", vec![32, 64, 3, 3]),
        ("small.bias", vec![32]),
        ("lin.weight", vec![96, 80]),
        ("lin.bias", vec![96]),
    ]);
    let int8 = Precision { compute: DType::F32, weights: DType::F32, int8: true };
    let (vq, vf) = (w.var_builder(None, int8, &Device::Cpu), w.var_builder(None, int8.float(), &Device::Cpu));
    let x = Tensor::randn(0f32, 1.0, (2, 64, 9, 7), &Device::Cpu).unwrap();
    for (name, c_out) in [("conv", 256), ("small", 32)] {
        let (q, f) = (
            Conv2d::new(vq.pp(name), 64, c_out, 3, 1, 1).unwrap(),
            Conv2d::new(vf.pp(name), 64, c_out, 3, 1, 1).unwrap(),
        );
        assert_eq!(matches!(q.weight, Weight::Int8(_)), c_out == 256, "{name}");
        assert!(matches!(f.weight, Weight::Float(_)));
        assert_eq!(q.weight.dims(), &[c_out, 64, 3, 3]);
        let (yq, yf) = (q.forward(&x).unwrap(), f.forward(&x).unwrap());
        let e = rel_l2(&yq, &yf);
        assert!(e < 2e-2, "{name}: relative error {e}");
        assert_eq!(e == 0.0, c_out != 256, "{name}: relative error {e}");
    }
    let (q, f) = (Linear::new(vq.pp("lin"), 80, 96, true).unwrap(), Linear::new(vf.pp("lin"), 80, 96, true).unwrap());
    assert!(matches!(q.weight, Weight::Int8(_)));
    let x = Tensor::randn(0f32, 1.0, (3, 5, 80), &Device::Cpu).unwrap();
    let (yq, yf) = (q.forward(&x).unwrap(), f.forward(&x).unwrap());
    assert_eq!(yq.dims(), &[3, 5, 96]);
    let e = rel_l2(&yq, &yf);
    assert!(e > 0.0 && e < 2e-2, "linear: relative error {e}");
    // A wrong input width is an error, not a read past the weight.
    assert!(q.forward(&Tensor::zeros((2, 79), DType::F32, &Device::Cpu).unwrap()).is_err());
}
