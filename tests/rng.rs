//! `TorchGenerator` reproduces `torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s))`
//! bit for bit, including successive calls on one generator.
mod common;

use lcm::random::TorchGenerator;

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
        let shape: Vec<usize> = case["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
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
