//! 2-D convolution (NCHW, PyTorch `nn.Conv2d` with symmetric zero padding, no dilation or
//! groups) as one GEMM per image: `Y[co, pixels] = W[co, ci*kh*kw] · col[ci*kh*kw, pixels]`.
//! The im2col matrix is never built: the GEMM's B packer reads it straight from the image,
//! copying contiguous runs of input rows into the packed panels.

use super::gemm::{gemm, Arith, PackA, PackB, Strided, NR};
use super::Elem;

/// Shape of one convolution.
#[derive(Clone, Copy, Debug)]
pub struct ConvShape {
    pub batch: usize,
    pub c_in: usize,
    pub h: usize,
    pub w: usize,
    pub c_out: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub padding: usize,
}

impl ConvShape {
    pub fn out_hw(&self) -> (usize, usize) {
        (
            (self.h + 2 * self.padding - self.kh) / self.stride + 1,
            (self.w + 2 * self.padding - self.kw) / self.stride + 1,
        )
    }
}

/// `y = conv(x, weight) + bias`; `x` is `[batch, c_in, h, w]`, `weight` `[c_out, c_in, kh, kw]`,
/// the result `[batch, c_out, ho, wo]`. The weight may be half precision (widened as packed).
pub fn conv2d<W: Elem>(x: &[f32], weight: &[W], bias: Option<&[f32]>, s: &ConvShape, arith: Arith) -> Vec<f32> {
    // Winograd in f32 even for bf16 products: its transforms amplify bf16's rounding about
    // tenfold (2.5e-2 relative error against 3e-3 for the direct convolution), and it does 4x
    // fewer multiplies, more than `vdpbf16ps`'s 2x rate gives back; not AMX's (`amx_direct`).
    if super::winograd::applies(s) && !amx_direct(s, arith) {
        return super::winograd::conv2d(x, weight, bias, s);
    }
    conv2d_direct(x, weight, bias, s, arith)
}

/// The direct convolution (implicit-im2col GEMM), for every shape.
pub fn conv2d_direct<W: Elem>(x: &[f32], weight: &[W], bias: Option<&[f32]>, s: &ConvShape, arith: Arith) -> Vec<f32> {
    let a = Strided { data: weight, row_stride: s.c_in * s.kh * s.kw, col_stride: 1 };
    conv2d_packed(x, &a, bias, s, arith)
}

/// The direct convolution with the weight (`[c_out, c_in*kh*kw]`) as any left operand, e.g.
/// one packed once at load ([`super::gemm::TiledA`]).
pub fn conv2d_packed(x: &[f32], weight: &dyn PackA, bias: Option<&[f32]>, s: &ConvShape, arith: Arith) -> Vec<f32> {
    let (ho, wo) = s.out_hw();
    let (pixels, depth) = (ho * wo, s.c_in * s.kh * s.kw);
    per_image(x, bias, s, |_, yb, b| gemm(arith, s.c_out, pixels, depth, weight, b, yb, pixels, bias.is_some()))
}

/// Whether every bf16 convolution with this weight (`[c_out, c_in, k, k]`, `stride`, `padding`)
/// runs direct on AMX tiles, whatever the image size: its weight is then worth packing once at
/// load ([`super::gemm::TiledA`]).
pub fn amx_direct_always(c_in: usize, c_out: usize, k: usize, stride: usize, padding: usize) -> bool {
    super::CpuPath::current() >= super::CpuPath::AmxBf16
        && (c_out >= 256 || !super::winograd::may_apply(c_in, c_out, k, k, stride, padding))
}

/// AMX tiles multiply fast enough for the direct bf16 convolution to beat f32 Winograd where
/// its packing of the input is shared by enough output channels (`cargo bench --bench kernels
/// -- conv`: 320->320 at 64x64 570 vs 230 GFLOP/s, 128->128 at 256x256 290 vs 330).
fn amx_direct(s: &ConvShape, arith: Arith) -> bool {
    arith == Arith::Bf16 && s.c_out >= 256 && super::CpuPath::current() >= super::CpuPath::AmxBf16
}

/// The output of a convolution built image by image: `f(image, output, im2col)` for each image
/// of the batch, with its output block (`[c_out, pixels]`) filled with the bias and the image
/// read as its im2col matrix (`[c_in*kh*kw, pixels]`; a 1x1 stride-1 convolution's is the image).
pub(super) fn per_image(
    x: &[f32],
    bias: Option<&[f32]>,
    s: &ConvShape,
    mut f: impl FnMut(&[f32], &mut [f32], &dyn PackB),
) -> Vec<f32> {
    let (ho, wo) = s.out_hw();
    let pixels = ho * wo;
    let mut y = vec![0f32; s.batch * s.c_out * pixels];
    for (xb, yb) in x.chunks_exact(s.c_in * s.h * s.w).zip(y.chunks_exact_mut(s.c_out * pixels)) {
        if let Some(bias) = bias {
            for (row, b) in yb.chunks_exact_mut(pixels).zip(bias) {
                row.fill(*b);
            }
        }
        if s.kh == 1 && s.kw == 1 && s.stride == 1 && s.padding == 0 {
            f(xb, yb, &Strided { data: xb, row_stride: pixels, col_stride: 1 });
        } else {
            f(xb, yb, &ImplicitIm2col { x: xb, s, wo });
        }
    }
    y
}

/// The im2col matrix of one image, `[c_in*kh*kw, ho*wo]`, read on demand.
pub(super) struct ImplicitIm2col<'a> {
    pub(super) x: &'a [f32],
    pub(super) s: &'a ConvShape,
    pub(super) wo: usize,
}

/// A run of output pixels on one output row: panel columns `col..col+len` are pixels
/// `(oy, ox..ox+len)`.
#[derive(Clone, Copy)]
struct Run {
    col: usize,
    oy: usize,
    ox: usize,
    len: usize,
}

impl PackB for ImplicitIm2col<'_> {
    fn pack_b(&self, p0: usize, kc: usize, j0: usize, nc: usize, dst: &mut [f32]) {
        let s = self.s;
        let (h, w, stride, pad) = (s.h as isize, s.w as isize, s.stride as isize, s.padding as isize);
        let khw = s.kh * s.kw;
        let panels = nc.div_ceil(NR);
        // The output-row runs of every panel, found once for the whole block.
        let mut runs: Vec<(usize, Run)> = Vec::with_capacity(panels + panels / 2 + 2);
        for panel in 0..panels {
            let c0 = j0 + panel * NR;
            let cols = NR.min(j0 + nc - c0);
            let mut col = 0;
            while col < cols {
                let (oy, ox) = ((c0 + col) / self.wo, (c0 + col) % self.wo);
                let len = (self.wo - ox).min(cols - col);
                runs.push((panel, Run { col, oy, ox, len }));
                col += len;
            }
            if cols < NR {
                let out = &mut dst[panel * kc * NR..(panel + 1) * kc * NR];
                for p in 0..kc {
                    out[p * NR + cols..(p + 1) * NR].fill(0.0);
                }
            }
        }
        let (mut ci, mut ky, mut kx) = (p0 / khw, (p0 % khw) / s.kw, p0 % s.kw);
        for p in 0..kc {
            let plane = &self.x[ci * s.h * s.w..(ci + 1) * s.h * s.w];
            for &(panel, r) in &runs {
                let base = (panel * kc + p) * NR + r.col;
                let d = &mut dst[base..base + r.len];
                let iy = r.oy as isize * stride + ky as isize - pad;
                if iy < 0 || iy >= h {
                    d.fill(0.0);
                    continue;
                }
                let row = &plane[iy as usize * s.w..(iy as usize + 1) * s.w];
                let ix0 = r.ox as isize * stride + kx as isize - pad;
                if stride == 1 && ix0 >= 0 && ix0 + r.len as isize <= w {
                    d.copy_from_slice(&row[ix0 as usize..ix0 as usize + r.len]);
                } else {
                    for (t, v) in d.iter_mut().enumerate() {
                        let ix = ix0 + t as isize * stride;
                        *v = if ix >= 0 && ix < w { row[ix as usize] } else { 0.0 };
                    }
                }
            }
            kx += 1;
            if kx == s.kw {
                kx = 0;
                ky += 1;
                if ky == s.kh {
                    ky = 0;
                    ci += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], wt: &[f32], bias: &[f32], s: &ConvShape) -> Vec<f32> {
        let (ho, wo) = s.out_hw();
        let mut y = vec![0f32; s.batch * s.c_out * ho * wo];
        for b in 0..s.batch {
            for co in 0..s.c_out {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let mut acc = bias[co] as f64;
                        for ci in 0..s.c_in {
                            for ky in 0..s.kh {
                                for kx in 0..s.kw {
                                    let iy = (oy * s.stride + ky) as isize - s.padding as isize;
                                    let ix = (ox * s.stride + kx) as isize - s.padding as isize;
                                    if iy >= 0 && ix >= 0 && (iy as usize) < s.h && (ix as usize) < s.w {
                                        acc += x[((b * s.c_in + ci) * s.h + iy as usize) * s.w + ix as usize] as f64
                                            * wt[((co * s.c_in + ci) * s.kh + ky) * s.kw + kx] as f64;
                                    }
                                }
                            }
                        }
                        y[((b * s.c_out + co) * ho + oy) * wo + ox] = acc as f32;
                    }
                }
            }
        }
        y
    }

    #[test]
    fn matches_naive() {
        let mut seed = 7u32;
        let mut rnd = || {
            seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
            (seed >> 8) as f32 / (1 << 24) as f32 - 0.5
        };
        let shapes = [
            (2, 3, 5, 7, 4, 3, 1, 1),
            (1, 8, 9, 9, 5, 3, 2, 1),
            (1, 4, 8, 6, 20, 1, 1, 0),
            (2, 5, 1, 1, 3, 3, 1, 1),
            (1, 16, 17, 33, 7, 3, 1, 1),
            (1, 6, 10, 11, 9, 3, 2, 0),
        ];
        for &(batch, c_in, h, w, c_out, k, stride, padding) in &shapes {
            let s = ConvShape { batch, c_in, h, w, c_out, kh: k, kw: k, stride, padding };
            let x: Vec<f32> = (0..batch * c_in * h * w).map(|_| rnd()).collect();
            let wt: Vec<f32> = (0..c_out * c_in * k * k).map(|_| rnd()).collect();
            let bias: Vec<f32> = (0..c_out).map(|_| rnd()).collect();
            let want = naive(&x, &wt, &bias, &s);
            let got = conv2d(&x, &wt, Some(&bias), &s, Arith::F32);
            assert_eq!(got.len(), want.len());
            for (g, e) in got.iter().zip(&want) {
                assert!((g - e).abs() < 1e-4, "{s:?}: {g} vs {e}");
            }
            // Half-precision kernels: the same against the reference on their widened values.
            let wh: Vec<half::f16> = wt.iter().map(|v| half::f16::from_f32(*v)).collect();
            let wb: Vec<half::bf16> = wt.iter().map(|v| half::bf16::from_f32(*v)).collect();
            let want_h = naive(&x, &wh.iter().map(|v| v.to_f32()).collect::<Vec<_>>(), &bias, &s);
            let want_b = naive(&x, &wb.iter().map(|v| v.to_f32()).collect::<Vec<_>>(), &bias, &s);
            for (got, want) in [
                (conv2d(&x, &wh, Some(&bias), &s, Arith::F32), want_h),
                (conv2d(&x, &wb, Some(&bias), &s, Arith::F32), want_b),
            ] {
                for (g, e) in got.iter().zip(&want) {
                    assert!((g - e).abs() < 1e-4, "half {s:?}: {g} vs {e}");
                }
            }
        }
    }
}
