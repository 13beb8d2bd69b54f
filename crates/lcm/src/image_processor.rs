//! diffusers' `VaeImageProcessor` for inputs: PIL's Lanczos resize (reproduced exactly, in
//! PIL's fixed-point arithmetic), grayscale conversion, `[0, 255] -> [-1, 1]` normalization and
//! mask binarization.

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use std::path::Path;

/// An 8-bit image with 1 (grayscale, PIL "L") or 3 (RGB) interleaved channels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image8 {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub pixels: Vec<u8>,
}

impl Image8 {
    /// Read PNG, JPEG, WebP, BMP or TIFF. Grayscale files stay grayscale (as PIL's "L");
    /// everything else becomes RGB (alpha dropped).
    pub fn read(path: &Path) -> Result<Self> {
        let img = image::ImageReader::open(path)
            .with_context(|| format!("cannot open image {}", path.display()))?
            .with_guessed_format()
            .with_context(|| format!("cannot read image {}", path.display()))?
            .decode()
            .map_err(|e| anyhow::anyhow!("cannot decode image {}: {e}", path.display()))?;
        let (width, height) = (img.width() as usize, img.height() as usize);
        Ok(match img {
            image::DynamicImage::ImageLuma8(_) | image::DynamicImage::ImageLumaA8(_) => {
                Self { width, height, channels: 1, pixels: img.to_luma8().into_raw() }
            }
            image::DynamicImage::ImageLuma16(_) | image::DynamicImage::ImageLumaA16(_) => {
                Self { width, height, channels: 1, pixels: img.to_luma8().into_raw() }
            }
            _ => Self { width, height, channels: 3, pixels: img.to_rgb8().into_raw() },
        })
    }

    /// PIL's `convert("RGB")`: grayscale replicated to three channels.
    pub fn to_rgb(&self) -> Self {
        if self.channels == 3 {
            return self.clone();
        }
        let pixels = self.pixels.iter().flat_map(|&v| [v, v, v]).collect();
        Self { width: self.width, height: self.height, channels: 3, pixels }
    }

    /// PIL's `convert("L")`: ITU-R 601-2 luma in PIL's fixed-point rounding.
    pub fn to_grayscale(&self) -> Self {
        if self.channels == 1 {
            return self.clone();
        }
        let pixels = self
            .pixels
            .chunks(3)
            .map(|p| ((p[0] as u32 * 19595 + p[1] as u32 * 38470 + p[2] as u32 * 7471 + 0x8000) >> 16) as u8)
            .collect();
        Self { width: self.width, height: self.height, channels: 1, pixels }
    }

    /// PIL's `Image.resize((width, height), Image.LANCZOS)`: two separable passes, each
    /// rounded to 8 bits. Pillow 13 runs the vertical pass first when the height shrinks by
    /// more than twice the width grows (`2 (w' - w) > h' - h`, h' < h), else the horizontal
    /// one (rule checked against Pillow on hundreds of random sizes).
    pub fn resize_lanczos(&self, width: usize, height: usize) -> Self {
        if (width, height) == (self.width, self.height) {
            return self.clone();
        }
        let (dw, dh) = (width as i64 - self.width as i64, height as i64 - self.height as i64);
        if dh < 0 && 2 * dw > dh {
            return self.resample_vertical(height).resample_horizontal(width);
        }
        self.resample_horizontal(width).resample_vertical(height)
    }

    fn resample_horizontal(&self, width: usize) -> Self {
        if width == self.width {
            return self.clone();
        }
        let c = self.channels;
        let co = Coeffs::new(self.width, width);
        let mut out = vec![0u8; self.height * width * c];
        for y in 0..self.height {
            let src = &self.pixels[y * self.width * c..(y + 1) * self.width * c];
            for (xx, &(xmin, n)) in co.bounds.iter().enumerate() {
                let k = &co.k[xx * co.ksize..];
                for ch in 0..c {
                    let mut ss: i32 = 1 << (PRECISION_BITS - 1);
                    for x in 0..n {
                        ss += src[(x + xmin) * c + ch] as i32 * k[x];
                    }
                    out[(y * width + xx) * c + ch] = clip8(ss);
                }
            }
        }
        Self { width, height: self.height, channels: c, pixels: out }
    }

    fn resample_vertical(&self, height: usize) -> Self {
        if height == self.height {
            return self.clone();
        }
        let (c, w) = (self.channels, self.width);
        let co = Coeffs::new(self.height, height);
        let mut out = vec![0u8; height * w * c];
        for (yy, &(ymin, n)) in co.bounds.iter().enumerate() {
            let k = &co.k[yy * co.ksize..];
            for xx in 0..w {
                for ch in 0..c {
                    let mut ss: i32 = 1 << (PRECISION_BITS - 1);
                    for (y, &ky) in k[..n].iter().enumerate() {
                        ss += self.pixels[((y + ymin) * w + xx) * c + ch] as i32 * ky;
                    }
                    out[(yy * w + xx) * c + ch] = clip8(ss);
                }
            }
        }
        Self { width: w, height, channels: c, pixels: out }
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

fn clip8(v: i32) -> u8 {
    if v >= (1 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

fn lanczos(x: f64) -> f64 {
    let sinc = |x: f64| if x == 0.0 { 1.0 } else { (x * std::f64::consts::PI).sin() / (x * std::f64::consts::PI) };
    if (-3.0..3.0).contains(&x) {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}

/// PIL's `precompute_coeffs` + `normalize_coeffs_8bpc` for one axis.
struct Coeffs {
    ksize: usize,
    /// Per output pixel: first input pixel and count.
    bounds: Vec<(usize, usize)>,
    k: Vec<i32>,
}

impl Coeffs {
    fn new(in_size: usize, out_size: usize) -> Self {
        let scale = in_size as f64 / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = 3.0 * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let mut bounds = Vec::with_capacity(out_size);
        let mut k = vec![0i32; out_size * ksize];
        for xx in 0..out_size {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
            let w: Vec<f64> = (0..xmax).map(|x| lanczos((x as f64 + xmin as f64 - center + 0.5) * ss)).collect();
            let ww: f64 = w.iter().sum();
            for (x, &wx) in w.iter().enumerate() {
                let v = if ww != 0.0 { wx / ww } else { wx };
                let f = v * (1u32 << PRECISION_BITS) as f64;
                k[xx * ksize + x] = if v < 0.0 { (-0.5 + f) as i32 } else { (0.5 + f) as i32 };
            }
            bounds.push((xmin, xmax));
        }
        Self { ksize, bounds, k }
    }
}

/// diffusers' `get_default_height_width`: the image's size unless given, rounded down to a
/// multiple of the VAE scale factor.
pub fn default_size(
    image: &Image8,
    width: Option<usize>,
    height: Option<usize>,
    vae_scale_factor: usize,
) -> (usize, usize) {
    let (w, h) = (width.unwrap_or(image.width), height.unwrap_or(image.height));
    (w - w % vae_scale_factor, h - h % vae_scale_factor)
}

/// `image_processor.preprocess(image, height, width)`: resized, `[1, 3, h, w]` in `[-1, 1]`.
pub fn preprocess_image(image: &Image8, width: usize, height: usize, device: &Device) -> Result<Tensor> {
    // Grayscale becomes RGB, as diffusers' `load_image` converts every image.
    let r = image.to_rgb().resize_lanczos(width, height);
    let mut data = vec![0f32; 3 * width * height];
    for (i, p) in r.pixels.chunks(3).enumerate() {
        for ch in 0..3 {
            data[ch * width * height + i] = 2.0 * (p[ch] as f32 / 255.0) - 1.0;
        }
    }
    Ok(Tensor::from_vec(data, (1, 3, height, width), device)?)
}

/// `mask_processor.preprocess(mask, height, width)`: resized, grayscale, binarized at 0.5,
/// `[1, 1, h, w]` of zeros and ones.
pub fn preprocess_mask(mask: &Image8, width: usize, height: usize, device: &Device) -> Result<Tensor> {
    let r = mask.resize_lanczos(width, height).to_grayscale();
    let data: Vec<f32> = r.pixels.iter().map(|&v| if v as f32 / 255.0 < 0.5 { 0.0 } else { 1.0 }).collect();
    Ok(Tensor::from_vec(data, (1, 1, height, width), device)?)
}

/// A ControlNet / T2I-Adapter conditioning image: converted to `channels` (3: RGB as the
/// ControlNet pipelines' `do_convert_rgb`, 1: grayscale), Lanczos-resized to `width x height`,
/// `[1, channels, h, w]` in `[0, 1]` (no normalisation).
pub fn preprocess_control_image(
    image: &Image8,
    width: usize,
    height: usize,
    channels: usize,
    device: &Device,
) -> Result<Tensor> {
    let converted = match channels {
        1 => image.to_grayscale(),
        3 => image.to_rgb(),
        c => bail!("control images have 1 or 3 channels, the model asks for {c}"),
    };
    let r = converted.resize_lanczos(width, height);
    let plane = width * height;
    let mut data = vec![0f32; channels * plane];
    for (i, p) in r.pixels.chunks(channels).enumerate() {
        for (ch, &v) in p.iter().enumerate() {
            data[ch * plane + i] = v as f32 / 255.0;
        }
    }
    Ok(Tensor::from_vec(data, (1, channels, height, width), device)?)
}
