//! 3x3 stride-1 convolution by Winograd's F(4x4, 3x3) (Lavin & Gray 2015): each 4x4 output tile
//! costs 36 multiplies per input/output channel pair instead of 144, i.e. 4x fewer FLOPs than the
//! direct convolution. Input tiles (6x6) and kernels (3x3) are moved to the transform domain,
//! where the channel sums become 36 independent GEMMs `[tiles x c_in] · [c_in x c_out]`, and
//! the 36 products go back to 4x4 outputs. In f32 its error stays around 1e-6 relative for
//! the activations of these models, well inside the parity tolerances.
//!
//! Work is split by groups of tile rows: each task transforms its input tiles, runs the 36 GEMMs
//! on one thread with the transformed kernels shared by all tasks, and writes its output rows.

// The transforms index small fixed-size tiles by (row, column); index loops read clearest.
#![allow(clippy::needless_range_loop)]

use super::conv::ConvShape;
use super::gemm::{gemm_single_thread, Arith, PackedB, Strided};
use super::{Elem, SendPtr};
use rayon::prelude::*;

/// Output tile size and input tile size (`T + 3 - 1`).
const T: usize = 4;
const A: usize = 6;
/// At least this many tiles per task, so the GEMMs have rows to work with.
const MIN_TILES_PER_TASK: usize = 96;

/// Whether a convolution of this kernel can take Winograd at some image size.
pub fn may_apply(c_in: usize, c_out: usize, kh: usize, kw: usize, stride: usize, padding: usize) -> bool {
    kh == 3 && kw == 3 && stride == 1 && padding == 1 && c_in >= 16 && c_out >= 16
}

/// Whether Winograd pays for this convolution: 3x3, stride 1, padding 1, enough channels for
/// the GEMMs and enough tiles to amortise transforming the kernels.
pub fn applies(s: &ConvShape) -> bool {
    may_apply(s.c_in, s.c_out, s.kh, s.kw, s.stride, s.padding) && {
        let tiles = s.h.div_ceil(T) * s.w.div_ceil(T);
        // Transforming the kernels costs per channel pair what ~16 tiles save (measured: 640
        // channels on 64 tiles ran at 0.4x the direct convolution, 320 on 256 tiles at 1.5x).
        tiles >= 64 && tiles * 4 >= s.c_in.max(s.c_out)
    }
}

/// `G g Gᵀ` for one 3x3 kernel: the 6x6 transformed kernel.
fn transform_kernel<W: Elem>(g: &[W]) -> [[f32; A]; A] {
    let g: [f32; 9] = std::array::from_fn(|i| g[i].to_f32());
    // G (6x3) rows.
    const G: [[f32; 3]; A] = [
        [1.0 / 4.0, 0.0, 0.0],
        [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
        [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
        [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
        [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
        [0.0, 0.0, 1.0],
    ];
    let mut tmp = [[0f32; 3]; A]; // G g
    for i in 0..A {
        for j in 0..3 {
            tmp[i][j] = (0..3).map(|k| G[i][k] * g[k * 3 + j]).sum();
        }
    }
    let mut u = [[0f32; A]; A];
    for i in 0..A {
        for j in 0..A {
            u[i][j] = (0..3).map(|k| tmp[i][k] * G[j][k]).sum();
        }
    }
    u
}

/// `Bᵀ x` for 6 values -> 6, on `L` lanes at once (input channels).
#[inline(always)]
fn bt<const L: usize>(x: &[[f32; L]; A]) -> [[f32; L]; A] {
    let mut y = [[0f32; L]; A];
    for l in 0..L {
        let (x0, x1, x2, x3, x4, x5) = (x[0][l], x[1][l], x[2][l], x[3][l], x[4][l], x[5][l]);
        y[0][l] = 4.0 * x0 - 5.0 * x2 + x4;
        y[1][l] = -4.0 * (x1 + x2) + x3 + x4;
        y[2][l] = 4.0 * (x1 - x2) - x3 + x4;
        y[3][l] = -2.0 * (x1 - x3) - x2 + x4;
        y[4][l] = 2.0 * (x1 - x3) - x2 + x4;
        y[5][l] = 4.0 * x1 - 5.0 * x3 + x5;
    }
    y
}

/// `Aᵀ x` for 6 values -> 4, on `L` lanes at once (output channels).
#[inline(always)]
fn at<const L: usize>(x: &[[f32; L]; A]) -> [[f32; L]; T] {
    let mut y = [[0f32; L]; T];
    for l in 0..L {
        let (a, b) = (x[1][l] + x[2][l], x[1][l] - x[2][l]);
        let (c, d) = (x[3][l] + x[4][l], x[3][l] - x[4][l]);
        y[0][l] = x[0][l] + a + c;
        y[1][l] = b + 2.0 * d;
        y[2][l] = a + 4.0 * c;
        y[3][l] = b + 8.0 * d + x[5][l];
    }
    y
}

/// The kernels may be half precision: they are widened as they are transformed (per call, into
/// the f32 transform domain, which the GEMMs read).
pub fn conv2d<W: Elem>(x: &[f32], weight: &[W], bias: Option<&[f32]>, s: &ConvShape) -> Vec<f32> {
    let (ci, co, h, w) = (s.c_in, s.c_out, s.h, s.w);
    let (ty, tx) = (h.div_ceil(T), w.div_ceil(T));
    // Kernels in the transform domain, as the 36 right operands `[c_in x c_out]`.
    let mut u = vec![0f32; A * A * ci * co];
    {
        let up = SendPtr(u.as_mut_ptr());
        (0..co).into_par_iter().for_each(|o| {
            for i in 0..ci {
                let k = transform_kernel(&weight[(o * ci + i) * 9..(o * ci + i + 1) * 9]);
                for (xi, row) in k.iter().enumerate() {
                    for (xj, v) in row.iter().enumerate() {
                        // SAFETY: (xi, xj, i, o) is written by the task for `o` only.
                        unsafe { *up.get().add(((xi * A + xj) * ci + i) * co + o) = *v };
                    }
                }
            }
        });
    }
    let packed: Vec<PackedB> = (0..A * A)
        .into_par_iter()
        .map(|xi| {
            PackedB::new(
                ci,
                co,
                &Strided { data: &u[xi * ci * co..(xi + 1) * ci * co], row_stride: co, col_stride: 1 },
                Arith::F32,
            )
        })
        .collect();
    drop(u);

    // Groups of tile rows with enough tiles each for the GEMMs, in a multiple of the thread
    // count so no thread waits for a last, lone group.
    let threads = rayon::current_num_threads().max(1);
    let wanted = ((ty * tx) / MIN_TILES_PER_TASK).max(1);
    let wanted = if s.batch > 1 { wanted } else { wanted.div_ceil(threads) * threads };
    let rows_per_task = ty.div_ceil(wanted.min(ty));
    let groups = ty.div_ceil(rows_per_task);
    let mut y = vec![0f32; s.batch * co * h * w];
    let yp = SendPtr(y.as_mut_ptr());
    (0..s.batch * groups).into_par_iter().for_each(|task| {
        let (b, g) = (task / groups, task % groups);
        let (r0, r1) = (g * rows_per_task, ((g + 1) * rows_per_task).min(ty));
        let tiles = (r1 - r0) * tx;
        let xb = &x[b * ci * h * w..(b + 1) * ci * h * w];
        BUFS.with(|bufs| {
            let (ref mut v, ref mut m, ref mut strip) = *bufs.borrow_mut();
            v.resize(A * A * tiles * ci, 0.0);
            m.resize(A * A * tiles * co, 0.0);
            // The input rows these tiles read, zero-padded, channels last: strip[y][x][c].
            let geo = Geometry { ci, co, h, w, tx, tiles, r0, srows: (r1 - r0) * T + 2, scols: tx * T + 2 };
            strip.resize(geo.srows * geo.scols * ci, 0.0);
            fill_strip(xb, strip, &geo);
            input_transform(strip, v, &geo);
            // The 36 products M[xi] = V[xi] · U[xi]: [tiles x c_out].
            for xi in 0..A * A {
                let a = Strided { data: &v[xi * tiles * ci..(xi + 1) * tiles * ci], row_stride: ci, col_stride: 1 };
                gemm_single_thread(
                    Arith::F32,
                    tiles,
                    co,
                    ci,
                    &a,
                    &packed[xi],
                    &mut m[xi * tiles * co..(xi + 1) * tiles * co],
                    co,
                    false,
                );
            }
            // SAFETY: the output rows of tile rows r0..r1 of image b belong to this task.
            let yb = unsafe { std::slice::from_raw_parts_mut(yp.get().add(b * co * h * w), co * h * w) };
            output_transform(m, yb, bias, &geo);
        });
    });
    y
}

/// Where one task's tiles are: `tiles` tiles from tile row `r0`, `tx` per row; its input strip is
/// `srows x scols` (padding included).
struct Geometry {
    ci: usize,
    co: usize,
    h: usize,
    w: usize,
    tx: usize,
    tiles: usize,
    r0: usize,
    srows: usize,
    scols: usize,
}

/// `fn $name(args)` running `$body(args)` compiled for AVX2 + FMA when the CPU has them (so the
/// 8-lane array loops become vector code) and for the baseline otherwise.
macro_rules! with_avx2 {
    ($name:ident => $body:ident ($($arg:ident : $ty:ty),*)) => {
        fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn fast($($arg: $ty),*) {
                    $body($($arg),*)
                }
                if super::has_avx2_fma() {
                    return unsafe { fast($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

with_avx2!(fill_strip => fill_strip_body(xb: &[f32], strip: &mut [f32], g: &Geometry));
with_avx2!(input_transform => input_transform_body(strip: &[f32], v: &mut [f32], g: &Geometry));
with_avx2!(output_transform => output_transform_body(m: &[f32], y: &mut [f32], bias: Option<&[f32]>, g: &Geometry));

const L: usize = 8;

/// NCHW rows -> channels-last strip, 8 channels at a time (8 sequential reads, one 8-wide write).
#[inline(always)]
fn fill_strip_body(xb: &[f32], strip: &mut [f32], g: &Geometry) {
    let (ci, h, w, scols) = (g.ci, g.h, g.w, g.scols);
    for c0 in (0..ci).step_by(L) {
        let cn = L.min(ci - c0);
        for yy in 0..g.srows {
            let row = &mut strip[yy * scols * ci..(yy + 1) * scols * ci];
            let iy = (g.r0 * T + yy) as isize - 1;
            if iy < 0 || iy >= h as isize {
                for xx in 0..scols {
                    row[xx * ci + c0..xx * ci + c0 + cn].fill(0.0);
                }
                continue;
            }
            let iy = iy as usize;
            row[c0..c0 + cn].fill(0.0);
            for xx in w + 1..scols {
                row[xx * ci + c0..xx * ci + c0 + cn].fill(0.0);
            }
            if cn == L {
                let src: [&[f32]; L] =
                    std::array::from_fn(|k| &xb[((c0 + k) * h + iy) * w..((c0 + k) * h + iy + 1) * w]);
                for x in 0..w {
                    let d = &mut row[(x + 1) * ci + c0..(x + 1) * ci + c0 + L];
                    for k in 0..L {
                        d[k] = src[k][x];
                    }
                }
            } else {
                for k in 0..cn {
                    let src = &xb[((c0 + k) * h + iy) * w..((c0 + k) * h + iy + 1) * w];
                    for (x, val) in src.iter().enumerate() {
                        row[(x + 1) * ci + c0 + k] = *val;
                    }
                }
            }
        }
    }
}

/// Input tiles -> V[xi][tile][c_in], 8 channels at a time.
#[inline(always)]
fn input_transform_body(strip: &[f32], v: &mut [f32], g: &Geometry) {
    let (ci, tiles, scols) = (g.ci, g.tiles, g.scols);
    for t in 0..tiles {
        let (tr, tc) = (t / g.tx, t % g.tx);
        for c0 in (0..ci).step_by(L) {
            let lanes = L.min(ci - c0);
            let mut d = [[[0f32; L]; A]; A];
            for (i, row) in d.iter_mut().enumerate() {
                for (j, e) in row.iter_mut().enumerate() {
                    let at = ((tr * T + i) * scols + tc * T + j) * ci + c0;
                    e[..lanes].copy_from_slice(&strip[at..at + lanes]);
                }
            }
            // Bᵀ d B: columns first, then rows.
            let mut half = [[[0f32; L]; A]; A]; // half[j][i'] = (Bᵀ d)[i'][j]
            for j in 0..A {
                half[j] = bt(&[d[0][j], d[1][j], d[2][j], d[3][j], d[4][j], d[5][j]]);
            }
            for i in 0..A {
                let r = bt(&[half[0][i], half[1][i], half[2][i], half[3][i], half[4][i], half[5][i]]);
                for (j, vals) in r.iter().enumerate() {
                    let at = ((i * A + j) * tiles + t) * ci + c0;
                    v[at..at + lanes].copy_from_slice(&vals[..lanes]);
                }
            }
        }
    }
}

/// M[xi][tile][c_out] -> 4x4 output tiles (+ bias) in `y` (`[c_out, h, w]`), 8 output channels
/// at a time; tiles outer, so the rows being written stay in cache from one tile to the next.
#[inline(always)]
fn output_transform_body(m: &[f32], y: &mut [f32], bias: Option<&[f32]>, g: &Geometry) {
    let (co, tiles, h, w) = (g.co, g.tiles, g.h, g.w);
    for t in 0..tiles {
        let (tr, tc) = (g.r0 + t / g.tx, t % g.tx);
        for o0 in (0..co).step_by(L) {
            let lanes = L.min(co - o0);
            let mut mt = [[[0f32; L]; A]; A];
            for i in 0..A {
                for j in 0..A {
                    let src = &m[((i * A + j) * tiles + t) * co + o0..][..lanes];
                    mt[i][j][..lanes].copy_from_slice(src);
                }
            }
            // Aᵀ M A: columns first, then rows.
            let mut half = [[[0f32; L]; T]; A]; // half[j][i'] = (Aᵀ M)[i'][j]
            for j in 0..A {
                half[j] = at(&[mt[0][j], mt[1][j], mt[2][j], mt[3][j], mt[4][j], mt[5][j]]);
            }
            let mut bvals = [0f32; L];
            if let Some(bv) = bias {
                bvals[..lanes].copy_from_slice(&bv[o0..o0 + lanes]);
            }
            for i in 0..T {
                let oy = tr * T + i;
                if oy >= h {
                    break;
                }
                let out = at(&[half[0][i], half[1][i], half[2][i], half[3][i], half[4][i], half[5][i]]);
                let cols = T.min(w - tc * T);
                for l in 0..lanes {
                    let row = &mut y[((o0 + l) * h + oy) * w + tc * T..][..cols];
                    for (j, o) in row.iter_mut().enumerate() {
                        *o = out[j][l] + bvals[l];
                    }
                }
            }
        }
    }
}

thread_local! {
    static BUFS: std::cell::RefCell<(Vec<f32>, Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_direct_convolution() {
        let mut seed = 11u32;
        let mut rnd = || {
            seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
            (seed >> 8) as f32 / (1 << 24) as f32 - 0.5
        };
        for &(batch, ci, co, h, w) in
            &[(1, 16, 16, 32, 32), (2, 17, 24, 30, 37), (1, 32, 20, 9, 70), (1, 16, 40, 64, 5)]
        {
            let s = ConvShape { batch, c_in: ci, h, w, c_out: co, kh: 3, kw: 3, stride: 1, padding: 1 };
            let x: Vec<f32> = (0..batch * ci * h * w).map(|_| rnd() * 20.0).collect();
            let wt: Vec<f32> = (0..co * ci * 9).map(|_| rnd()).collect();
            let bias: Vec<f32> = (0..co).map(|_| rnd()).collect();
            let want = super::super::conv::conv2d_direct(&x, &wt, Some(&bias), &s, Arith::F32);
            let got = conv2d(&x, &wt, Some(&bias), &s);
            let (mut num, mut den) = (0f64, 0f64);
            for (g, e) in got.iter().zip(&want) {
                num += ((g - e) as f64).powi(2);
                den += (*e as f64).powi(2);
            }
            let rel = (num / den).sqrt();
            assert!(rel < 1e-5, "{batch} {ci} {co} {h} {w}: rel L2 {rel}");
            // Half-precision kernels, widened in the kernel transform: as the direct
            // convolution of the widened kernels.
            let wh: Vec<half::f16> = wt.iter().map(|v| half::f16::from_f32(*v)).collect();
            let wb: Vec<half::bf16> = wt.iter().map(|v| half::bf16::from_f32(*v)).collect();
            let cases = [
                (conv2d(&x, &wh, Some(&bias), &s), wh.iter().map(|v| v.to_f32()).collect::<Vec<_>>()),
                (conv2d(&x, &wb, Some(&bias), &s), wb.iter().map(|v| v.to_f32()).collect::<Vec<_>>()),
            ];
            for (got, widened) in cases {
                let want = super::super::conv::conv2d_direct(&x, &widened, Some(&bias), &s, Arith::F32);
                let (mut num, mut den) = (0f64, 0f64);
                for (g, e) in got.iter().zip(&want) {
                    num += ((g - e) as f64).powi(2);
                    den += (*e as f64).powi(2);
                }
                let rel = (num / den).sqrt();
                assert!(rel < 1e-5, "half {batch} {ci} {co} {h} {w}: rel L2 {rel}");
            }
            // bf16 products (bf16 weights, where the CPU has them): the direct convolution stays
            // within bf16's rounding of the f32 one and does round; 3x3 convolutions keep
            // Winograd in f32.
            let bf16 = Arith::bf16_if(true);
            if bf16 == Arith::Bf16 {
                let widened: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
                let want = super::super::conv::conv2d_direct(&x, &widened, Some(&bias), &s, Arith::F32);
                let got = super::super::conv::conv2d_direct(&x, &wb, Some(&bias), &s, bf16);
                let rel = rel_l2(&got, &want);
                assert!(rel < 5e-3 && rel > 1e-5, "bf16 {batch} {ci} {co} {h} {w}: rel L2 {rel}");
                if applies(&s) {
                    let via = super::super::conv::conv2d(&x, &wb, Some(&bias), &s, bf16);
                    assert!(rel_l2(&via, &want) < 1e-5, "3x3 bf16 convolution not on f32 Winograd");
                }
            }
        }
        if Arith::bf16_if(true) == Arith::F32 {
            println!("skipped: bf16 convolutions (CPU path {})", crate::kernels::CpuPath::current().name());
        }
    }

    fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
        let (mut num, mut den) = (0f64, 0f64);
        for (g, e) in got.iter().zip(want) {
            num += ((g - e) as f64).powi(2);
            den += (*e as f64).powi(2);
        }
        (num / den).sqrt()
    }
}
