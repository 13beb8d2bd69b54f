//! `TorchGenerator` reproduces `torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s))`
//! bit for bit, including successive calls on one generator.
use crate::common;

use lcm::random::{HalfRandn, TorchGenerator};

#[test]
fn randn_streams_match_torch_exactly() {
    let refs = common::reference("rng.safetensors");
    let listing = common::reference_json("rng.json");
    let cases = listing["tensors"].as_array().unwrap();
    assert!(cases.len() >= 10);
    let mut gen: Option<(u64, TorchGenerator)> = None;
    for case in cases {
        let seed = case["seed"].as_u64().unwrap();
        let call = case["call"].as_u64().unwrap();
        if call == 0 {
            gen = Some((seed, TorchGenerator::manual_seed(seed)));
        }
        let (s, g) = gen.as_mut().unwrap();
        assert_eq!(*s, seed);
        let shape: Vec<usize> =
            case["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        let got = g.randn(shape.iter().product());
        let want = common::to_vec_f32(&refs[case["name"].as_str().unwrap()]);
        let mismatches = got.iter().zip(&want).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        assert_eq!(mismatches, 0, "{}: {mismatches} of {} values differ", case["name"], want.len());
    }
}

#[test]
fn randn_tensor_has_the_requested_shape() {
    let t = TorchGenerator::manual_seed(0).randn_tensor((2, 4, 3, 5)).unwrap();
    assert_eq!(t.dims(), &[2, 4, 3, 5]);
}

/// diffusers' fp16 / bf16 pipelines draw noise with `torch.randn(..., dtype=torch.float16)` on
/// the CPU generator: `randn_on` in those dtypes gives the same values and leaves the generator
/// where PyTorch's does (later calls agree too), also when sizes are not multiples of 16 — for
/// both ways PyTorch has drawn them (2.15: `HalfRandn::Blocked`, 2.11: `HalfRandn::HalfMath`).
#[test]
fn half_precision_draws_match_torch_exactly() {
    for (version, mode) in [("2.15", HalfRandn::Blocked), ("2.11", HalfRandn::HalfMath)] {
        half_draws_match(&format!("rng_half_torch{version}"), mode);
    }
}

fn half_draws_match(stem: &str, mode: HalfRandn) {
    let refs = common::reference(&format!("{stem}.safetensors"));
    let listing = common::reference_json(&format!("{stem}.json"));
    let cases = listing["tensors"].as_array().unwrap();
    assert!(cases.len() >= 10);
    let mut gen: Option<(u64, TorchGenerator)> = None;
    let mut tails = 0;
    for case in cases {
        let seed = case["seed"].as_u64().unwrap();
        if case["call"].as_u64().unwrap() == 0 {
            gen = Some((seed, TorchGenerator::manual_seed(seed).with_half_randn(mode)));
        }
        let (s, g) = gen.as_mut().unwrap();
        assert_eq!(*s, seed);
        let shape: Vec<usize> =
            case["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        let dtype = match case["dtype"].as_str().unwrap() {
            "float16" => candle_core::DType::F16,
            "bfloat16" => candle_core::DType::BF16,
            other => panic!("{other}"),
        };
        let name = case["name"].as_str().unwrap();
        let want = &refs[name];
        assert_eq!(want.dtype(), dtype, "{name}");
        let got = g.randn_on(shape.clone(), dtype, &candle_core::Device::Cpu).unwrap();
        assert_eq!(got.dtype(), dtype);
        assert_eq!(got.dims(), want.dims());
        let (got, want) = (common::to_vec_f32(&got), common::to_vec_f32(want));
        let mismatches = got.iter().zip(&want).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        assert_eq!(mismatches, 0, "{stem} {name}: {mismatches} of {} values differ", want.len());
        let n: usize = shape.iter().product();
        if n > 16 && !n.is_multiple_of(16) {
            tails += 1;
        }
    }
    assert!(tails >= 4, "the cases must cover sizes that are not multiples of 16");
}

/// The f16 path is not f32 rounded: with a tail, values differ (the test above would pass
/// vacuously if both were the same code).
#[test]
fn half_precision_draws_differ_from_rounded_f32_where_torch_does() {
    let a = TorchGenerator::manual_seed(3).with_half_randn(HalfRandn::Blocked).randn_half(84, candle_core::DType::F16);
    let b: Vec<f32> =
        TorchGenerator::manual_seed(3).randn(84).iter().map(|v| half::f16::from_f32(*v).to_f32()).collect();
    assert_eq!(a[..64], b[..64]);
    assert!(a[68..].iter().zip(&b[68..]).filter(|(x, y)| x != y).count() > 8);
}

/// The two PyTorch versions' half-precision draws really differ (so each reference tests its own
/// mode), and `LCM_TORCH_HALF_RANDN` is not needed for the default.
#[test]
fn half_precision_modes_differ() {
    let a = TorchGenerator::manual_seed(0).with_half_randn(HalfRandn::Blocked).randn_half(64, candle_core::DType::F16);
    let b = TorchGenerator::manual_seed(0).with_half_randn(HalfRandn::HalfMath).randn_half(64, candle_core::DType::F16);
    assert!(a.iter().zip(&b).filter(|(x, y)| x != y).count() > 16);
    assert_eq!(HalfRandn::default(), HalfRandn::Blocked);
}
