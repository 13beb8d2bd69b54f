//! 3x3 stride-1 convolutions on AMX tiles without im2col: `Y[co, p] = Σ W[co, (ci, ky, kx)] ·
//! X[ci, p + ky·(w+2) + kx]`, with the image laid out once as bf16 channel pairs over its
//! zero-padded plane (`[ci/2][(h+2)·(w+2)]`). Each step of the depth (32 input channels at one
//! of the 9 shifts) is then one B tile read straight from that layout — 16 pair planes at a
//! fixed offset — so the input is rounded and moved once per convolution, where the
//! implicit-im2col GEMM moves it 9 times, and the products pack nothing.
//!
//! Outputs are computed over the padded width (`w + 2` columns per row, the last two
//! discarded): a shift is then one offset for every output position.

use super::gemm::{bf16_bits, TILE as T};
use super::Elem;

/// Output channels per micro-kernel call, and output positions (two tiles each).
const BLOCK: usize = 2 * T;
/// Input channels per depth step (16 pairs, one tile row).
const CHANNELS: usize = 2 * T;

/// A 3x3 kernel (`[c_out, c_in, 3, 3]`) rounded to bf16 and laid out once as the tiles the
/// micro-kernel reads: per block of 32 output channels, its two 16-row halves, each one 1 KiB
/// tile per step; step `s = chunk · 9 + ky · 3 + kx` holds input channels `32·chunk..` at that
/// shift (zero past `c_in`).
pub struct ConvTiles {
    c_out: usize,
    c_in: usize,
    steps: usize,
    data: Vec<u32>,
}

impl std::fmt::Debug for ConvTiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ConvTiles({}x{}x3x3)", self.c_out, self.c_in)
    }
}

/// Whether a bf16 convolution of this shape runs here: 3x3, stride 1, padding 1, whole blocks
/// of output channels, and enough input channels to fill the depth steps, on `amx-bf16`.
pub fn applies(c_in: usize, c_out: usize, k: usize, stride: usize, padding: usize) -> bool {
    super::CpuPath::current() >= super::CpuPath::AmxBf16
        && k == 3
        && stride == 1
        && padding == 1
        && c_out.is_multiple_of(BLOCK)
        && c_in >= CHANNELS
}

impl ConvTiles {
    /// `w`: `[c_out, c_in, 3, 3]`, row-major.
    pub fn new<W: Elem>(w: &[W], c_out: usize, c_in: usize) -> Self {
        assert_eq!(w.len(), c_out * c_in * 9, "ConvTiles: weight of {} values", w.len());
        assert!(c_out.is_multiple_of(BLOCK), "ConvTiles: {c_out} output channels");
        let steps = c_in.div_ceil(CHANNELS) * 9;
        let mut data = vec![0u32; c_out * steps * T];
        let at = |co: usize, ci: usize, k: usize| {
            if ci < c_in {
                bf16_bits(w[(co * c_in + ci) * 9 + k].to_f32())
            } else {
                0
            }
        };
        for co in 0..c_out {
            // The half-block (16 rows) this row is in, and its row.
            let (half, r) = (co / T, co % T);
            for s in 0..steps {
                let (chunk, k) = (s / 9, s % 9);
                let tile = &mut data[(half * steps + s) * T * T + r * T..][..T];
                for (p, v) in tile.iter_mut().enumerate() {
                    let ci = chunk * CHANNELS + 2 * p;
                    *v = at(co, ci, k) | (at(co, ci + 1, k) << 16);
                }
            }
        }
        Self { c_out, c_in, steps, data }
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.c_out, self.c_in)
    }
}

/// `conv(x, w) + bias` for `x` `[batch, c_in, h, w]` (f32); returns `[batch, c_out, h, w]`.
/// Call only where [`applies`] said so.
pub fn conv3x3(x: &[f32], wt: &ConvTiles, bias: Option<&[f32]>, batch: usize, h: usize, w: usize) -> Vec<f32> {
    let (c_out, c_in) = (wt.c_out, wt.c_in);
    let mut y = huge_zeroed::<f32>(batch * c_out * h * w);
    for (xb, yb) in x.chunks_exact(c_in * h * w).zip(y.chunks_exact_mut(c_out * h * w)) {
        image(xb, wt, bias, h, w, yb);
    }
    y
}

fn image(x: &[f32], wt: &ConvTiles, bias: Option<&[f32]>, h: usize, w: usize, y: &mut [f32]) {
    use rayon::prelude::*;
    let (c_out, c_in, steps) = (wt.c_out, wt.c_in, wt.steps);
    let wp = w + 2;
    // Output positions over the padded width, in whole blocks; each plane also holds what the
    // last block reads past the image (two rows and two columns on, at most).
    let positions = (h * wp).div_ceil(BLOCK) * BLOCK;
    let plane = ((h + 2) * wp + BLOCK + 8).div_ceil(T) * T;
    let pairs = steps / 9 * T;
    let mut xq = huge_zeroed(pairs * plane);
    xq.par_chunks_mut(plane).enumerate().for_each(|(q, dst)| {
        let (c0, c1) = (2 * q, 2 * q + 1);
        if c0 >= c_in {
            return;
        }
        for iy in 0..h {
            let lo = &x[(c0 * h + iy) * w..][..w];
            let row = &mut dst[(iy + 1) * wp + 1..][..w];
            match c1 < c_in {
                true => {
                    let hi = &x[(c1 * h + iy) * w..][..w];
                    pack_pairs(lo, hi, row)
                }
                false => row.iter_mut().zip(lo).for_each(|(o, &l)| *o = bf16_bits(l)),
            }
        }
    });
    // Step s reads 16 pair planes from plane 16·chunk, shifted by ky rows and kx columns.
    let offsets: Vec<isize> = (0..steps).map(|s| ((s / 9 * T * plane) + (s % 9 / 3) * wp + s % 3) as isize).collect();
    // Blocks of positions per task: about 256 KiB of input pairs, so a task's rows stay in L2
    // while every block of output channels passes over them.
    let blocks = positions / BLOCK;
    let per_task = (256 * 1024 / (pairs * 4 * BLOCK)).clamp(1, blocks);
    let mut c = huge_zeroed::<f32>(c_out * positions);
    let cp = super::SendPtr(c.as_mut_ptr());
    (0..blocks.div_ceil(per_task)).into_par_iter().for_each(|task| {
        let (b0, b1) = (task * per_task, ((task + 1) * per_task).min(blocks));
        // SAFETY: `applies` checked AMX; the offsets stay inside `xq` (the plane's slack covers
        // the last block's shifts), each task writes its own columns of `c`.
        unsafe {
            super::amx::configure_tiles();
            for cb in 0..c_out / BLOCK {
                let a0 = wt.data.as_ptr().add(2 * cb * steps * T * T);
                for pb in b0..b1 {
                    let p0 = pb * BLOCK;
                    let out = cp.get().add(cb * BLOCK * positions + p0);
                    super::amx::tile_32x32_offsets(
                        steps,
                        a0,
                        xq.as_ptr().add(p0),
                        offsets.as_ptr(),
                        plane * 4,
                        out,
                        positions,
                    );
                }
            }
            super::amx::release_tiles();
        }
    });
    // The valid columns of each row, plus the bias.
    y.par_chunks_mut(h * w).zip(c.par_chunks(positions)).enumerate().for_each(|(co, (dst, src))| {
        let b = bias.map_or(0.0, |b| b[co]);
        for (d, s) in dst.chunks_exact_mut(w).zip(src.chunks_exact(wp)) {
            d.iter_mut().zip(s).for_each(|(d, &s)| *d = s + b);
        }
    });
}

/// A zeroed buffer backed by transparent huge pages where the kernel grants them (also without
/// the caching allocator): each B tile reads 16 rows a plane apart (16 pages with 4 KiB pages),
/// and the large outputs fault in 512 times less often.
fn huge_zeroed<T: Copy + Default>(n: usize) -> Vec<T> {
    let mut v: Vec<T> = Vec::with_capacity(n);
    crate::alloc::advise_huge(v.as_mut_ptr().cast(), n * std::mem::size_of::<T>());
    v.resize(n, T::default());
    v
}

/// `out[i]` = `lo[i]` and `hi[i]` rounded to bf16 as one pair (low half first).
fn pack_pairs(lo: &[f32], hi: &[f32], out: &mut [u32]) {
    #[inline(always)]
    fn body(lo: &[f32], hi: &[f32], out: &mut [u32]) {
        for ((o, &l), &h) in out.iter_mut().zip(lo).zip(hi) {
            *o = bf16_bits(l) | (bf16_bits(h) << 16);
        }
    }
    #[target_feature(enable = "avx512f")]
    unsafe fn fast(lo: &[f32], hi: &[f32], out: &mut [u32]) {
        body(lo, hi, out)
    }
    // SAFETY: AMX implies AVX-512 F.
    unsafe { fast(lo, hi, out) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::conv::{conv2d_direct, ConvShape};
    use crate::kernels::gemm::Arith;

    /// Against the implicit-im2col GEMM in bf16: the same rounded operands, so only the order
    /// of the f32 sums differs.
    #[test]
    fn matches_direct_bf16() {
        let mut seed = 11u32;
        let mut rnd = || {
            seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
            (seed >> 8) as f32 / (1 << 24) as f32 - 0.5
        };
        let mut ran = 0;
        for &(batch, c_in, h, w, c_out) in
            &[(1, 32, 8, 8, 32), (2, 40, 7, 13, 64), (1, 64, 16, 16, 96), (1, 33, 3, 30, 32), (1, 320, 9, 5, 64)]
        {
            if !applies(c_in, c_out, 3, 1, 1) {
                continue;
            }
            ran += 1;
            let x: Vec<f32> = (0..batch * c_in * h * w).map(|_| rnd()).collect();
            let wt: Vec<half::bf16> = (0..c_out * c_in * 9).map(|_| half::bf16::from_f32(rnd())).collect();
            let bias: Vec<f32> = (0..c_out).map(|_| rnd()).collect();
            let s = ConvShape { batch, c_in, h, w, c_out, kh: 3, kw: 3, stride: 1, padding: 1 };
            let want = conv2d_direct(&x, &wt, Some(&bias), &s, Arith::Bf16);
            let got = conv3x3(&x, &ConvTiles::new(&wt, c_out, c_in), Some(&bias), batch, h, w);
            let num: f64 = got.iter().zip(&want).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
            let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
            assert!((num / den).sqrt() < 1e-6, "{batch} {c_in} {h}x{w} {c_out}: rel L2 {}", (num / den).sqrt());
        }
        if ran == 0 {
            println!("skipped: AMX 3x3 convolution (CPU path {})", crate::kernels::CpuPath::current().name());
        }
    }
}
