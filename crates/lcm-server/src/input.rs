//! Turning what clients send into engine inputs: base64 and data URLs, images decoded with
//! limits, names that can only be names, `<lora:name:weight>` prompts, random seeds.

use crate::error::{ApiError, Shape};
use base64::Engine as _;
use lcm::image_processor::Image8;
use std::io::Cursor;

/// Plain base64 or a `data:image/...;base64,` URL; whitespace is ignored.
pub fn decode_base64(shape: Shape, field: &str, text: &str) -> Result<Vec<u8>, ApiError> {
    let payload = match text.strip_prefix("data:") {
        Some(rest) => rest.split_once(',').map(|(_, b)| b).unwrap_or(""),
        None => text,
    };
    let clean: String = payload.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    engine
        .decode(clean.as_bytes())
        .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(clean.trim_end_matches('=')))
        .map_err(|e| ApiError::bad(shape, format!("{field}: not valid base64 ({e})")).param(field))
}

/// Decode an uploaded image, refusing before any allocation one whose size exceeds the limit.
pub fn decode_image(
    shape: Shape,
    field: &str,
    bytes: &[u8],
    max_pixels: usize,
) -> Result<image::DynamicImage, ApiError> {
    let bad = |msg: String| ApiError::bad(shape, format!("{field}: {msg}")).param(field);
    let reader = image::ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|e| bad(e.to_string()))?;
    if reader.format().is_none() {
        return Err(bad("not an image (PNG, JPEG, WebP, BMP or TIFF expected)".into()));
    }
    let (w, h) = reader.into_dimensions().map_err(|e| bad(format!("cannot read the image ({e})")))?;
    if (w as usize).saturating_mul(h as usize) > max_pixels || w == 0 || h == 0 {
        return Err(bad(format!("a {w}x{h} image exceeds this server's limit of {max_pixels} pixels")));
    }
    let mut reader =
        image::ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|e| bad(e.to_string()))?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(w);
    limits.max_image_height = Some(h);
    // Decoded buffer (up to 16 bits x 4 channels) plus the decoder's own working memory.
    limits.max_alloc = Some((max_pixels as u64) * 8 * 2 + (64 << 20));
    reader.limits(limits);
    reader.decode().map_err(|e| bad(format!("cannot decode the image ({e})")))
}

/// As `Image8::read` makes it from a file: grayscale stays grayscale (PIL's "L"), everything
/// else becomes RGB (alpha dropped), so an upload gives the pixels the same file gives `lcm
/// generate`.
pub fn to_image8(img: &image::DynamicImage) -> Image8 {
    let (width, height) = (img.width() as usize, img.height() as usize);
    match img {
        image::DynamicImage::ImageLuma8(_)
        | image::DynamicImage::ImageLumaA8(_)
        | image::DynamicImage::ImageLuma16(_)
        | image::DynamicImage::ImageLumaA16(_) => {
            Image8 { width, height, channels: 1, pixels: img.to_luma8().into_raw() }
        }
        _ => Image8 { width, height, channels: 3, pixels: img.to_rgb8().into_raw() },
    }
}

/// base64 -> decoded image.
pub fn image_from_base64(shape: Shape, field: &str, text: &str, max_pixels: usize) -> Result<Image8, ApiError> {
    let bytes = decode_base64(shape, field, text)?;
    Ok(to_image8(&decode_image(shape, field, &bytes, max_pixels)?))
}

/// OpenAI's mask: fully transparent pixels mark the area to repaint. The engine's mask is white
/// where it repaints.
pub fn alpha_mask(shape: Shape, img: &image::DynamicImage) -> Result<Image8, ApiError> {
    if !img.color().has_alpha() {
        return Err(ApiError::bad(shape, "mask: needs an alpha channel (transparent = the area to edit)").param("mask"));
    }
    let rgba = img.to_rgba8();
    let pixels = rgba.pixels().map(|p| if p[3] == 0 { 255 } else { 0 }).collect();
    Ok(Image8 { width: img.width() as usize, height: img.height() as usize, channels: 1, pixels })
}

/// A name a client may use: never a path (`..`, separators, absolute, drive letters).
pub fn check_name(shape: Shape, what: &str, name: &str) -> Result<(), ApiError> {
    let pathlike = name.is_empty()
        || name.contains(['/', '\\', '\0'])
        || name.contains("..")
        || name.starts_with('~')
        || name.chars().nth(1) == Some(':');
    if pathlike {
        return Err(ApiError::bad(
            shape,
            format!("{what} `{}` is not a name: use one of the names this server lists", name.escape_debug()),
        ));
    }
    Ok(())
}

/// Look a name up among `names`: 400 for a path, 404 for a name not loaded.
pub fn find<'a>(
    shape: Shape,
    what: &str,
    name: &str,
    names: impl Iterator<Item = &'a String> + Clone,
) -> Result<usize, ApiError> {
    check_name(shape, what, name)?;
    names.clone().position(|n| n == name).ok_or_else(|| {
        let known: Vec<&str> = names.map(String::as_str).collect();
        ApiError::new(
            shape,
            axum::http::StatusCode::NOT_FOUND,
            format!(
                "no {what} named `{}` (this server has: {})",
                name.escape_debug(),
                if known.is_empty() { "none".into() } else { known.join(", ") }
            ),
        )
    })
}

/// AUTOMATIC1111's `<lora:name:weight>` tags: removed from the prompt, returned as (name, weight).
pub fn extract_lora_tags(shape: Shape, prompt: &str) -> Result<(String, Vec<(String, f64)>), ApiError> {
    let mut out = String::new();
    let mut loras = Vec::new();
    let mut rest = prompt;
    while let Some(start) = rest.find("<lora:") {
        let Some(len) = rest[start..].find('>') else { break };
        out.push_str(&rest[..start]);
        let body = &rest[start + 6..start + len];
        let (name, weight) = match body.split_once(':') {
            Some((n, w)) => {
                // A1111 also allows `<lora:name:te_weight:unet_weight>`; the first weight applies.
                let w = w.split(':').next().unwrap_or("1");
                let w: f64 = w
                    .trim()
                    .parse()
                    .map_err(|_| ApiError::bad(shape, format!("<lora:{body}>: `{w}` is not a weight")))?;
                (n, w)
            }
            None => (body, 1.0),
        };
        if !weight.is_finite() {
            return Err(ApiError::bad(shape, format!("<lora:{body}>: the weight must be finite")));
        }
        loras.push((name.trim().to_string(), weight));
        rest = &rest[start + len + 1..];
    }
    out.push_str(rest);
    Ok((out.trim().to_string(), loras))
}

/// A seed as `lcm generate` picks one when none is given.
pub fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    // Small enough for JavaScript clients to keep exact.
    h.finish() % (1 << 32)
}

/// Random hexadecimal id.
pub fn new_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    let a = h.finish();
    h.write_u64(a);
    format!("{a:016x}{:08x}", h.finish() as u32)
}

/// A Gaussian blur of a mask (AUTOMATIC1111's `mask_blur`, a standard deviation in pixels).
pub fn blur_mask(mask: &Image8, sigma: f64) -> Image8 {
    let m = mask.to_grayscale();
    if sigma <= 0.0 {
        return m;
    }
    let r = (sigma * 3.0).ceil() as isize;
    let kernel: Vec<f64> = (-r..=r).map(|x| (-(x * x) as f64 / (2.0 * sigma * sigma)).exp()).collect();
    let total: f64 = kernel.iter().sum();
    let (w, h) = (m.width as isize, m.height as isize);
    let pass = |src: &[f64], horizontal: bool| -> Vec<f64> {
        let mut out = vec![0.0; src.len()];
        for y in 0..h {
            for x in 0..w {
                let mut acc = 0.0;
                for (k, kv) in kernel.iter().enumerate() {
                    let d = k as isize - r;
                    let (sx, sy) = if horizontal { ((x + d).clamp(0, w - 1), y) } else { (x, (y + d).clamp(0, h - 1)) };
                    acc += kv * src[(sy * w + sx) as usize];
                }
                out[(y * w + x) as usize] = acc / total;
            }
        }
        out
    };
    let src: Vec<f64> = m.pixels.iter().map(|&v| v as f64).collect();
    let blurred = pass(&pass(&src, true), false);
    Image8 {
        width: m.width,
        height: m.height,
        channels: 1,
        pixels: blurred.iter().map(|v| v.round().clamp(0.0, 255.0) as u8).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_tags() {
        let (p, l) = extract_lora_tags(Shape::A1111, "a cat <lora:style:0.5>, <lora:other>").unwrap();
        assert_eq!(p, "a cat ,");
        assert_eq!(l, vec![("style".to_string(), 0.5), ("other".to_string(), 1.0)]);
        assert!(extract_lora_tags(Shape::A1111, "<lora:x:heavy>").is_err());
    }

    #[test]
    fn names() {
        for bad in ["../x", "/etc/passwd", "a/b", "C:\\x", "..", ""] {
            assert!(check_name(Shape::Native, "model", bad).is_err(), "{bad}");
        }
        assert!(check_name(Shape::Native, "model", "tiny-sd").is_ok());
    }

    #[test]
    fn base64_forms() {
        assert_eq!(decode_base64(Shape::Native, "x", "data:image/png;base64,aGk=").unwrap(), b"hi");
        assert_eq!(decode_base64(Shape::Native, "x", "aGk").unwrap(), b"hi");
        assert!(decode_base64(Shape::Native, "x", "!!!").is_err());
    }
}
