//! The benchmark's FLOP accounting: each matrix-multiply-shaped op counts 2 FLOPs per
//! multiply-add (in its own binary: the counter is process-wide, so the other test here touches
//! no op).
use candle_core::{Device, Tensor};
use lcm::ops;

#[test]
fn ops_count_flops_as_two_per_multiply_add() {
    let dev = Device::Cpu;
    ops::flops::take();
    let x = Tensor::zeros((3, 5, 7), candle_core::DType::F32, &dev).unwrap();
    let w = Tensor::zeros((11, 7), candle_core::DType::F32, &dev).unwrap();
    ops::linear(&x, &w, None).unwrap();
    assert_eq!(ops::flops::take(), 2 * 15 * 7 * 11);
    // conv: 2 * N * Cout * Hout * Wout * Cin * kh * kw, stride 2, padding 1: 9x7 -> 5x4
    let x = Tensor::zeros((2, 3, 9, 7), candle_core::DType::F32, &dev).unwrap();
    let k = Tensor::zeros((4, 3, 3, 3), candle_core::DType::F32, &dev).unwrap();
    let y = ops::conv2d(&x, &k, None, 2, 1).unwrap();
    assert_eq!(y.dims(), &[2, 4, 5, 4]);
    assert_eq!(ops::flops::take(), 2 * 2 * 4 * 5 * 4 * 3 * 9);
    // attention: QK^T and PV, 2 * 2 * b*h * lq * lk * d
    let q = Tensor::zeros((2, 3, 6, 8), candle_core::DType::F32, &dev).unwrap();
    let kv = Tensor::zeros((2, 3, 10, 8), candle_core::DType::F32, &dev).unwrap();
    ops::attention(&q, &kv, &kv, 0.1, false, q.dtype()).unwrap();
    assert_eq!(ops::flops::take(), 4 * 6 * 6 * 10 * 8);
    assert_eq!(ops::flops::take(), 0);
}

/// `lcm bench --model`: names, and each model's native size (touches no op counter).
#[test]
fn bench_models_parse_with_native_sizes() {
    use lcm::testing::RandomModel;
    let parse = |s: &str| s.parse::<RandomModel>();
    assert_eq!(parse("sd15").unwrap().default_size(), 512);
    assert_eq!(parse("SDXL").unwrap().default_size(), 1024);
    assert_eq!(parse("animatediff").unwrap().default_size(), 512);
    assert_eq!(parse("animatediff").unwrap().default_dir(), parse("sd15").unwrap().default_dir());
    assert!(parse("sd2").unwrap_err().contains("sd15, sdxl or animatediff"));
}
