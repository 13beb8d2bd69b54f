//! Turning decoded VAE output into 8-bit images and writing PNGs with generation metadata.

use crate::image_processor::Image8;
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use std::path::{Path, PathBuf};

/// An 8-bit RGB image, row-major, 3 bytes per pixel: what a pipeline outputs. Inputs are
/// [`Image8`] (grayscale or RGB, as files come); the two convert into each other, so an output can
/// be fed back as an init or control image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

impl From<RgbImage> for Image8 {
    fn from(img: RgbImage) -> Self {
        Image8 { width: img.width, height: img.height, channels: 3, pixels: img.pixels }
    }
}

impl From<Image8> for RgbImage {
    /// Grayscale images are expanded to RGB.
    fn from(img: Image8) -> Self {
        let img = img.to_rgb();
        RgbImage { width: img.width, height: img.height, pixels: img.pixels }
    }
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

/// The formats outputs are written in, chosen by the file's extension as PIL's `Image.save`
/// does (PNG carries the A1111 `parameters` text; JPEG at PIL's default quality 75; WebP
/// lossless; GIF for one image or an animation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFormat {
    Png,
    Jpeg,
    WebP,
    Gif,
}

impl OutputFormat {
    /// The format `path`'s extension names; an unknown or missing extension is an error, so
    /// nothing is generated for an output that cannot be written.
    pub fn for_path(path: &Path) -> Result<Self> {
        const KNOWN: &str = "use .png, .jpg, .jpeg, .webp or .gif";
        let ext = path.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase());
        Ok(match ext.as_deref() {
            Some("png") => Self::Png,
            Some("jpg" | "jpeg") => Self::Jpeg,
            Some("webp") => Self::WebP,
            Some("gif") => Self::Gif,
            Some(other) => bail!("cannot write {}: unknown image extension .{other} ({KNOWN})", path.display()),
            None => bail!("cannot write {}: no file extension ({KNOWN})", path.display()),
        })
    }
}

/// Checks, before any compute, that every output can be written: a known image extension, an
/// existing folder, and (without `overwrite`) no file of that name already there.
pub fn check_outputs(paths: &[PathBuf], overwrite: bool) -> Result<()> {
    for p in paths {
        OutputFormat::for_path(p)?;
        let dir = folder_of(p);
        if !dir.is_dir() {
            bail!("cannot write {}: folder {} does not exist", p.display(), dir.display());
        }
        if p.is_dir() {
            bail!("cannot write {}: it is a folder", p.display());
        }
        if !overwrite && p.exists() {
            bail!("{} already exists; pass --overwrite to replace it", p.display());
        }
    }
    Ok(())
}

fn folder_of(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Write an image in the format its extension names (see [`OutputFormat`]); PNGs carry an
/// A1111-style `parameters` text chunk. Written atomically ([`write_atomic`]): refuses to replace
/// an existing file unless `overwrite`.
pub fn write_image(path: &Path, image: &RgbImage, parameters: Option<&str>, overwrite: bool) -> Result<()> {
    let bytes = encode_image(image, OutputFormat::for_path(path)?, parameters)
        .with_context(|| format!("cannot write {}", path.display()))?;
    write_atomic(path, &bytes, overwrite)
}

/// [`write_image`] for a `.png` path (kept for library users).
pub fn write_png(path: &Path, image: &RgbImage, parameters: Option<&str>, overwrite: bool) -> Result<()> {
    write_image(path, image, parameters, overwrite)
}

/// The file's bytes, encoded in memory: an encoding failure never touches the file system.
pub fn encode_image(image: &RgbImage, format: OutputFormat, parameters: Option<&str>) -> Result<Vec<u8>> {
    use image::ImageEncoder;
    if image.pixels.len() != image.width * image.height * 3 {
        bail!("image buffer does not match its size {}x{}", image.width, image.height);
    }
    let (w, h) = (image.width as u32, image.height as u32);
    let mut out = Vec::new();
    match format {
        OutputFormat::Png => {
            let mut enc = png::Encoder::new(&mut out, w, h);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            if let Some(p) = parameters {
                // Latin-1 text as `tEXt`, anything else as UTF-8 `iTXt` (what PIL's `PngInfo`
                // and AUTOMATIC1111 do), so a prompt in any language can be written.
                if p.chars().all(|c| (c as u32) < 256) {
                    enc.add_text_chunk("parameters".to_string(), p.to_string())?;
                } else {
                    enc.add_itxt_chunk("parameters".to_string(), p.to_string())?;
                }
            }
            let mut writer = enc.write_header()?;
            writer.write_image_data(&image.pixels)?;
            writer.finish()?;
        }
        OutputFormat::Jpeg => {
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 75).write_image(
                &image.pixels,
                w,
                h,
                image::ExtendedColorType::Rgb8,
            )?;
        }
        OutputFormat::WebP => {
            image::codecs::webp::WebPEncoder::new_lossless(&mut out).write_image(
                &image.pixels,
                w,
                h,
                image::ExtendedColorType::Rgb8,
            )?;
        }
        OutputFormat::Gif => out = encode_gif(std::slice::from_ref(image), 1)?,
    }
    Ok(out)
}

/// Writes `bytes` to `path` so that, whatever happens (an error, Ctrl+C, a kill), `path` holds
/// either what it held before or all of `bytes`: they go to a temporary file in the same folder,
/// are flushed to disk, and the file is renamed into place. Without `overwrite` the rename refuses
/// to replace an existing file (two runs racing for one name cannot clobber each other). After an
/// error the temporary file is removed.
pub fn write_atomic(path: &Path, bytes: &[u8], overwrite: bool) -> Result<()> {
    use std::io::Write;
    let fail = |e: &dyn std::fmt::Display| anyhow::anyhow!("cannot write {}: {e}", path.display());
    let mut builder = tempfile::Builder::new();
    builder.prefix(".lcm-").suffix(".tmp");
    #[cfg(unix)]
    {
        // What `File::create` gives under the usual umask (a temporary file is owner-only).
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o644));
    }
    let mut tmp = builder.tempfile_in(folder_of(path)).map_err(|e| fail(&e))?;
    tmp.write_all(bytes).map_err(|e| fail(&e))?;
    tmp.as_file().sync_all().map_err(|e| fail(&e))?;
    let persisted = if overwrite { tmp.persist(path) } else { tmp.persist_noclobber(path) };
    match persisted {
        Ok(_) => Ok(()),
        Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => {
            bail!("{} already exists; pass --overwrite to replace it", path.display())
        }
        Err(e) => Err(fail(&e.error)),
    }
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
/// looping forever (frames quantized to a 256-colour palette each). Written atomically; refuses
/// to replace an existing file unless `overwrite`.
pub fn write_gif(path: &Path, frames: &[RgbImage], fps: u32, overwrite: bool) -> Result<()> {
    if frames.is_empty() {
        bail!("no frames to write to {}", path.display());
    }
    let bytes = encode_gif(frames, fps).with_context(|| format!("cannot write {}", path.display()))?;
    write_atomic(path, &bytes, overwrite)
}

/// The bytes [`write_gif`] writes, encoded in memory.
pub fn encode_gif(frames: &[RgbImage], fps: u32) -> Result<Vec<u8>> {
    use image::codecs::gif::{GifEncoder, Repeat};
    use image::{Delay, Frame, RgbaImage};
    let mut out = Vec::new();
    {
        let mut enc = GifEncoder::new_with_speed(&mut out, 10);
        enc.set_repeat(Repeat::Infinite)?;
        let delay = Delay::from_numer_denom_ms(1000 / fps.max(1), 1);
        for f in frames {
            let rgba: Vec<u8> = f.pixels.chunks(3).flat_map(|p| [p[0], p[1], p[2], 255]).collect();
            let img = RgbaImage::from_raw(f.width as u32, f.height as u32, rgba)
                .ok_or_else(|| anyhow::anyhow!("frame buffer does not match its size"))?;
            enc.encode_frame(Frame::from_parts(img, 0, 0, delay))?;
        }
    }
    Ok(out)
}
