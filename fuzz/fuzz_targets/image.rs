//! Any bytes as an init, mask or control image: decoding (with the decoders' limits: image bombs
//! are refused), conversion and resizing.
#![no_main]
mod common;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = common::scratch("image", data);
    let Ok(img) = lcm::image_processor::Image8::read(&path) else { return };
    let rgb = img.to_rgb();
    assert_eq!(rgb.pixels.len(), rgb.width * rgb.height * 3);
    if rgb.width > 0 && rgb.height > 0 {
        let small = rgb.resize_lanczos(8, 8);
        assert_eq!(small.pixels.len(), 8 * 8 * 3);
        let _ = lcm::canny::canny(&small, 100.0, 200.0);
    }
});
