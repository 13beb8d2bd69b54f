//! Any bytes as a `.safetensors` weight file: header parsing, offsets, dtypes and every tensor's
//! read must answer with an error, never a panic, a huge allocation or a read past the file.
#![no_main]
mod common;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = common::scratch("w.safetensors", data);
    let Ok(weights) = lcm::loaders::weights::ComponentWeights::open_files(&[path]) else { return };
    let vb = weights.var_builder(None, candle_core::DType::F32, &candle_core::Device::Cpu);
    for name in weights.names().iter().take(64) {
        let _ = weights.shape(name);
        let _ = vb.get_unchecked(name);
    }
});
