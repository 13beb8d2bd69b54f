//! Turning decoded VAE output into 8-bit images and writing PNGs with generation metadata.

use crate::image_processor::Image8;
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use std::path::{Path, PathBuf};

/// An 8-bit RGB image, row-major, 3 bytes per pixel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

/// diffusers' `VaeImageProcessor.postprocess(..., output_type="pil")`: `[-1, 1]` NCHW floats to
/// 8-bit images via `(x / 2 + 0.5).clamp(0, 1)`, then `(x * 255).round()` (ties to even, as numpy).
pub fn postprocess(decoded: &Tensor) -> Result<Vec<RgbImage>> {
    let (n, c, h, w) = decoded.dims4()?;
    if c != 3 {
        bail!("expected 3 image channels from the VAE, got {c}");
    }
    let data: Vec<f32> = decoded.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?;
    let mut out = Vec::with_capacity(n);
    for b in 0..n {
        let mut pixels = vec![0u8; h * w * 3];
        for ch in 0..3 {
            let plane = &data[(b * 3 + ch) * h * w..(b * 3 + ch + 1) * h * w];
            for (i, &v) in plane.iter().enumerate() {
                let v = (v / 2.0 + 0.5).clamp(0.0, 1.0);
                pixels[i * 3 + ch] = (v * 255.0).round_ties_even() as u8;
            }
        }
        out.push(RgbImage { width: w, height: h, pixels });
    }
    Ok(out)
}

/// The output file names for `count` images: the given name for one image, otherwise
/// numbered files next to it (`out.png` -> `out-1.png`, `out-2.png`, ...).
pub fn numbered_paths(path: &Path, count: usize) -> Vec<PathBuf> {
    if count == 1 {
        return vec![path.to_path_buf()];
    }
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("image");
    let ext = path.extension().and_then(|s| s.to_str()).unwrap_or("png");
    (1..=count).map(|i| path.with_file_name(format!("{stem}-{i}.{ext}"))).collect()
}

/// Write a PNG carrying an A1111-style `parameters` text chunk. Refuses to replace an existing
/// file unless `overwrite`.
/// Create an output file; an existing one is replaced only with `overwrite`.
fn create_output(path: &Path, overwrite: bool) -> Result<std::fs::File> {
    let file = if overwrite {
        std::fs::File::create(path)
    } else {
        std::fs::OpenOptions::new().write(true).create_new(true).open(path)
    };
    file.map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => {
            anyhow::anyhow!("{} already exists; pass --overwrite to replace it", path.display())
        }
        _ => anyhow::anyhow!("cannot create {}: {e}", path.display()),
    })
}

pub fn write_png(path: &Path, image: &RgbImage, parameters: Option<&str>, overwrite: bool) -> Result<()> {
    let file = create_output(path, overwrite)?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), image.width as u32, image.height as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    if let Some(p) = parameters {
        enc.add_text_chunk("parameters".to_string(), p.to_string())?;
    }
    let mut writer = enc.write_header().with_context(|| format!("cannot write {}", path.display()))?;
    writer.write_image_data(&image.pixels).with_context(|| format!("cannot write {}", path.display()))?;
    writer.finish().with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Read a PNG's `parameters` text chunk (what A1111-compatible tools read).
pub fn read_png_parameters(path: &Path) -> Result<Option<String>> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let reader = png::Decoder::new(std::io::BufReader::new(file)).read_info()?;
    let info = reader.info();
    Ok(info
        .uncompressed_latin1_text
        .iter()
        .find(|t| t.keyword == "parameters")
        .map(|t| t.text.clone())
        .or_else(|| info.utf8_text.iter().find(|t| t.keyword == "parameters").and_then(|t| t.get_text().ok())))
}

/// Read an image file (through [`Image8::read`]) as RGB; grayscale is expanded.
pub fn read_png(path: &Path) -> Result<RgbImage> {
    let img = Image8::read(path)?;
    let pixels = match img.channels {
        1 => img.pixels.iter().flat_map(|&g| [g, g, g]).collect(),
        _ => img.pixels,
    };
    Ok(RgbImage { width: img.width, height: img.height, pixels })
}

/// Write an animated GIF as diffusers' `export_to_gif` does: every frame shown `1000 / fps` ms,
/// looping forever (frames quantized to a 256-colour palette each). Refuses to replace an
/// existing file unless `overwrite`.
pub fn write_gif(path: &Path, frames: &[RgbImage], fps: u32, overwrite: bool) -> Result<()> {
    use image::codecs::gif::{GifEncoder, Repeat};
    use image::{Delay, Frame, RgbaImage};
    if frames.is_empty() {
        bail!("no frames to write to {}", path.display());
    }
    let file = create_output(path, overwrite)?;
    let mut enc = GifEncoder::new_with_speed(std::io::BufWriter::new(file), 10);
    enc.set_repeat(Repeat::Infinite).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    let delay = Delay::from_numer_denom_ms(1000 / fps.max(1), 1);
    for f in frames {
        let rgba: Vec<u8> = f.pixels.chunks(3).flat_map(|p| [p[0], p[1], p[2], 255]).collect();
        let img = RgbaImage::from_raw(f.width as u32, f.height as u32, rgba)
            .ok_or_else(|| anyhow::anyhow!("frame buffer does not match its size"))?;
        enc.encode_frame(Frame::from_parts(img, 0, 0, delay))
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    }
    Ok(())
}
