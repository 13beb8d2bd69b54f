//! 8-bit products (`--dtype int8`): each weight matrix quantized once, at load, per output
//! channel (symmetric int8, `w[o, k] ≈ scale[o] · q[o, k]`); activations quantized as they
//! arrive (symmetric 8-bit, one scale per token for linear layers and one per image for
//! convolutions, stored offset by 128 as u8, the operand `vpdpbusd` wants unsigned); products
//! summed exactly in i32 per depth block, then one f32 multiply-add per output and block.
//!
//! The integer sums are exact and the f32 steps after them are the same code on every path, so
//! the AVX512-VNNI kernel and the portable one give the same numbers bit for bit. Without VNNI
//! the weights are instead dequantized as they are packed and multiplied by the f32 GEMM (the
//! memory saving stays; the activations are then not rounded).

use super::conv::{per_image, ConvShape};
use super::gemm::{self, Arith, PackA, PackB, Strided};
use super::{parallel_chunks, Elem, SendPtr};

/// Lanes of the activation side's panels when it is the left operand (linear layers' tokens)
/// and of the weight panels of convolutions: the kernel's tile is `MR` x `2 * NR`.
const MR: usize = 12;
/// Lanes of the right operand's panels (output channels of linear layers, pixels of
/// convolutions).
const NR: usize = 16;
/// Depth per block, in quads (4 values share one 32-bit lane of `vpdpbusd`): 512 values, so a
/// 12-row panel is 6 KiB and a pair of 16-column panels 16 KiB, and a block's integer sum
/// (at most 512 · 127 · 127 after the offset is taken out) is exact in f32.
const KQ: usize = 128;
/// Quads of one left-operand row kept together (64 bytes): the rows of an AMX tile. The left
/// panels are `[group][row][G quads][4]`, and every depth is padded to whole groups.
const G: usize = 16;
/// Rows of the left operand packed at once (linear layers): 8 panels, 48 KiB, stay in L2 while
/// the weight panels stream through L1.
const MC: usize = 8 * MR;
/// Columns of the right operand packed at once (convolutions): 128 KiB of u8 quads per block.
const NC: usize = 256;

/// Which operand of its products a quantized weight is: the left one for convolutions
/// (`Y[co, pixels] = W · col`), the right one for linear layers (`Y = X · Wᵀ`, W's rows as
/// columns). It sets the width of the panels the weight is stored in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Left,
    Right,
}

/// A `rows x k` weight matrix in 8 bits, stored as the kernel reads it: panels of `unit` rows,
/// each `[quad][lane][4]` bytes (right operand) or `[group][lane][G quads][4]` (left operand)
/// over the whole depth (zero-padded to whole groups of quads and to whole panels),
/// with the scale and the per-block sum of every row.
pub struct Int8Matrix {
    rows: usize,
    k: usize,
    kq: usize,
    unit: usize,
    data: Vec<i8>,
    scales: Vec<f32>,
    /// `sums[block * rows + row]`: the row's quantized values summed over depth block `block`
    /// (the correction for the activations' +128 offset).
    sums: Vec<i32>,
}

impl std::fmt::Debug for Int8Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Int8Matrix({} x {})", self.rows, self.k)
    }
}

/// `v · inv` rounded to the nearest integer (ties to even) and clamped to ±127: how both weights
/// and activations are rounded. Adding and subtracting 1.5 · 2²³ rounds any |x| < 2²² to an
/// integer in the default rounding mode, in plain adds the compiler vectorizes (`round_ties_even`
/// became a call to `rintf` per value, 6% of an 8-bit UNet step).
#[inline(always)]
fn quantize(v: f32, inv: f32) -> i32 {
    const ROUND: f32 = 12_582_912.0;
    (((v * inv).clamp(-127.0, 127.0) + ROUND) - ROUND) as i32
}

/// The scale of values whose largest magnitude is `max`, and its inverse (0 for all-zero or
/// non-finite values, which then quantize to 0).
fn scale_of(max: f32) -> (f32, f32) {
    let scale = max / 127.0;
    if scale > 0.0 && scale.is_finite() {
        (scale, 1.0 / scale)
    } else {
        (0.0, 0.0)
    }
}

fn max_abs(v: &[f32]) -> f32 {
    vectorized!(max_abs_body(v))
}

/// Runs `$f(args)` (an `#[inline(always)]` function of plain loops) compiled for AVX-512 where
/// the CPU path has it, else as it is: the loops are the same code, so every path gives the
/// same numbers (Rust never fuses a multiply and an add on its own).
macro_rules! vectorized {
    ($f:ident($($arg:expr),*)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
            unsafe fn fast<T>(f: impl FnOnce() -> T) -> T {
                f()
            }
            if super::CpuPath::current() >= super::CpuPath::Avx512 {
                // SAFETY: AVX-512 checked by the CPU path.
                unsafe { fast(#[inline(always)] || $f($($arg),*)) }
            } else {
                $f($($arg),*)
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            $f($($arg),*)
        }
    }};
}
use vectorized;

#[inline(always)]
fn max_abs_body(v: &[f32]) -> f32 {
    // 16 running maxima (independent lanes, so the loop vectorizes).
    let mut m = [0f32; 16];
    let mut chunks = v.chunks_exact(16);
    for c in &mut chunks {
        for (m, x) in m.iter_mut().zip(c) {
            *m = m.max(x.abs());
        }
    }
    for x in chunks.remainder() {
        m[0] = m[0].max(x.abs());
    }
    m.iter().fold(0f32, |a, b| a.max(*b))
}

/// `dst[i] = quantize(src[i], inv) + 128` (the unsigned activation operand).
#[inline(always)]
fn quantize_u8(src: &[f32], inv: f32, dst: &mut [u8]) {
    for (d, v) in dst.iter_mut().zip(src) {
        *d = (quantize(*v, inv) + 128) as u8;
    }
}

impl Int8Matrix {
    /// Quantize `w` (`rows x k`, row-major, any element type our kernels read) per row.
    pub fn quantize<W: Elem>(w: &[W], rows: usize, k: usize, side: Side) -> Self {
        assert_eq!(w.len(), rows * k, "weight size");
        let unit = match side {
            Side::Left => MR,
            Side::Right => NR,
        };
        let kq = k.div_ceil(4).next_multiple_of(G);
        let blocks = kq.div_ceil(KQ).max(1);
        let panel_len = kq * unit * 4;
        let mut data = vec![0i8; rows.div_ceil(unit) * panel_len];
        let mut scales = vec![0f32; rows];
        let mut sums = vec![0i32; blocks * rows];
        // One task per panel (its rows' scales and block sums are written after).
        let mut per_row: Vec<(f32, Vec<i32>)> = vec![(0.0, Vec::new()); rows];
        {
            use rayon::prelude::*;
            data.par_chunks_mut(panel_len.max(1)).zip(per_row.par_chunks_mut(unit)).enumerate().for_each(
                |(panel, (dst, out))| {
                    let mut row = vec![0f32; k];
                    for (lane, o) in out.iter_mut().enumerate() {
                        let i = panel * unit + lane;
                        W::widen(&w[i * k..(i + 1) * k], &mut row);
                        let (scale, inv) = scale_of(max_abs(&row));
                        let mut block_sums = vec![0i32; blocks];
                        for (p, &v) in row.iter().enumerate() {
                            let q = quantize(v, inv);
                            block_sums[p / (4 * KQ)] += q;
                            dst[Self::offset(unit, lane, p)] = q as i8;
                        }
                        *o = (scale, block_sums);
                    }
                },
            );
        }
        for (i, (scale, block_sums)) in per_row.into_iter().enumerate() {
            scales[i] = scale;
            for (b, s) in block_sums.into_iter().enumerate() {
                sums[b * rows + i] = s;
            }
        }
        Self { rows, k, kq, unit, data, scales, sums }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn depth(&self) -> usize {
        self.k
    }

    /// Bytes held (values, scales and sums).
    pub fn bytes(&self) -> usize {
        self.data.len() + 4 * (self.scales.len() + self.sums.len())
    }

    /// Where value `p` of lane `lane` lies in its panel.
    fn offset(unit: usize, lane: usize, p: usize) -> usize {
        if unit == MR {
            (p / (4 * G)) * unit * 4 * G + lane * 4 * G + p % (4 * G)
        } else {
            (p / 4) * unit * 4 + lane * 4 + p % 4
        }
    }

    /// The quantized value at `(i, p)`.
    fn q(&self, i: usize, p: usize) -> i8 {
        self.data[(i / self.unit) * self.kq * self.unit * 4 + Self::offset(self.unit, i % self.unit, p)]
    }

    /// The weight as the f32 values it stands for (`scale · q`), row-major.
    pub fn dequantized(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.k];
        for i in 0..self.rows {
            for p in 0..self.k {
                out[i * self.k + p] = self.q(i, p) as f32 * self.scales[i];
            }
        }
        out
    }

    /// Quads `q0..` of panel `panel`.
    fn panel(&self, panel: usize, q0: usize) -> *const u8 {
        self.data[(panel * self.kq + q0) * self.unit * 4..].as_ptr().cast()
    }
}

/// Whether the 8-bit kernel runs here (AVX512-VNNI, and `LCM_CPU_PATH` not below `avx512`).
fn has_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            super::CpuPath::current() >= super::CpuPath::Avx512 && is_x86_feature_detected!("avx512vnni")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether AMX-INT8 runs here (the CPU path is `amx-bf16` and the CPU has AMX-INT8).
fn has_amx() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::CpuPath::current() >= super::CpuPath::AmxBf16 && super::amx::int8_available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// How the products are computed: the 8-bit kernel (AMX, VNNI or portable), or f32 on dequantized
/// weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Int8Path {
    /// AMX-INT8 tiles (`tdpbusd` / `tdpbsud`), where the CPU path is `amx-bf16`.
    Amx,
    Vnni,
    Portable,
    Dequantized,
}

impl Int8Path {
    pub fn current() -> Self {
        if has_amx() {
            Int8Path::Amx
        } else if has_vnni() {
            Int8Path::Vnni
        } else {
            Int8Path::Dequantized
        }
    }

    /// The paths this CPU can run (for tests comparing them).
    pub fn available() -> Vec<Self> {
        let mut v = vec![Int8Path::Portable, Int8Path::Dequantized];
        if has_vnni() {
            v.push(Int8Path::Vnni);
        }
        if has_amx() {
            v.push(Int8Path::Amx);
        }
        v
    }
}

/// `x · wᵀ + bias` for `x` of `rows x w.depth()` and a weight quantized for [`Side::Right`].
pub fn linear(x: &[f32], rows: usize, w: &Int8Matrix, bias: Option<&[f32]>) -> Vec<f32> {
    linear_on(Int8Path::current(), x, rows, w, bias)
}

pub fn linear_on(path: Int8Path, x: &[f32], rows: usize, w: &Int8Matrix, bias: Option<&[f32]>) -> Vec<f32> {
    assert_eq!(w.unit, NR, "a linear layer's weight is the right operand");
    let (k, n) = (w.k, w.rows);
    let mut y = match bias {
        Some(b) => b.repeat(rows),
        None => vec![0f32; rows * n],
    };
    if rows == 0 || n == 0 || k == 0 {
        return y;
    }
    let a = Strided { data: x, row_stride: k, col_stride: 1 };
    if path == Int8Path::Dequantized {
        gemm::gemm(Arith::F32, rows, n, k, &a, &Dequantized(w), &mut y, n, true);
        return y;
    }
    // One scale per token.
    let (scales, inv): (Vec<f32>, Vec<f32>) = x.chunks_exact(k.max(1)).map(|r| scale_of(max_abs(r))).unzip();
    let yp = SendPtr(y.as_mut_ptr());
    parallel_chunks(rows, MR, 2 * rows * n * k, |i0, mc| {
        #[cfg(target_arch = "x86_64")]
        let _tiles = (path == Int8Path::Amx).then(super::amx::Int8Tiles::configure);
        with_scratch(MC * KQ * 4, |buf| {
            for (block, q0) in (0..w.kq).step_by(KQ).enumerate() {
                let kqb = KQ.min(w.kq - q0);
                for ib in (i0..i0 + mc).step_by(MC) {
                    let mcb = MC.min(i0 + mc - ib);
                    pack_rows(x, k, ib, mcb, q0, kqb, &inv, buf);
                    for jb in (0..n).step_by(2 * NR) {
                        let ncb = (2 * NR).min(n - jb);
                        let b0 = w.panel(jb / NR, q0);
                        let b1 = if ncb > NR { w.panel(jb / NR + 1, q0) } else { b0 };
                        for ip in 0..mcb.div_ceil(MR) {
                            let tile = product(path, kqb, buf[ip * kqb * MR * 4..].as_ptr(), b0, b1, true);
                            let i = ib + ip * MR;
                            let out = Epilogue {
                                rows: MR.min(i0 + mc - i).min(MR),
                                cols: ncb,
                                row_scale: &scales[i..],
                                col_scale: &w.scales[jb..],
                                offset: Offset::Cols(&w.sums[block * n + jb..]),
                            };
                            // SAFETY: rows i.., columns jb.. of this chunk's own rows of y.
                            unsafe { out.add_to(&tile, yp.get().add(i * n + jb), n) };
                        }
                    }
                }
            }
        })
    });
    y
}

/// Convolution with a weight quantized for [`Side::Left`] (`[c_out, c_in * kh * kw]`).
pub fn conv2d(x: &[f32], w: &Int8Matrix, bias: Option<&[f32]>, s: &ConvShape) -> Vec<f32> {
    conv2d_on(Int8Path::current(), x, w, bias, s)
}

pub fn conv2d_on(path: Int8Path, x: &[f32], w: &Int8Matrix, bias: Option<&[f32]>, s: &ConvShape) -> Vec<f32> {
    assert_eq!(w.unit, MR, "a convolution's weight is the left operand");
    let (ho, wo) = s.out_hw();
    let (pixels, depth) = (ho * wo, s.c_in * s.kh * s.kw);
    assert_eq!((w.rows, w.k), (s.c_out, depth), "convolution weight shape");

    per_image(x, bias, s, |xb, yb, b| {
        if path == Int8Path::Dequantized {
            gemm::gemm(Arith::F32, s.c_out, pixels, depth, &Dequantized(w), b, yb, pixels, true);
            return;
        }
        // One scale per image.
        let (scale, inv) = scale_of(max_abs(xb));
        let yp = SendPtr(yb.as_mut_ptr());
        parallel_chunks(pixels, 2 * NR, 2 * s.c_out * pixels * depth, |j0, nc| {
            #[cfg(target_arch = "x86_64")]
            let _tiles = (path == Int8Path::Amx).then(super::amx::Int8Tiles::configure);
            let mut f32_panel = vec![0f32; KQ * 4 * NR];
            let mut u8_panel = vec![0u8; KQ * 4 * NR];
            with_scratch(NC * KQ * 4, |buf| {
                for (block, q0) in (0..w.kq).step_by(KQ).enumerate() {
                    let kqb = KQ.min(w.kq - q0);
                    let (p0, kc) = (q0 * 4, (kqb * 4).min(depth - q0 * 4));
                    for jb in (j0..j0 + nc).step_by(NC) {
                        let ncb = NC.min(j0 + nc - jb);
                        for (jp, panel) in buf.chunks_exact_mut(kqb * NR * 4).take(ncb.div_ceil(NR)).enumerate() {
                            let j = jb + jp * NR;
                            b.pack_b(p0, kc, j, NR.min(jb + ncb - j), &mut f32_panel[..kc * NR]);
                            quantize_panel(&f32_panel[..kc * NR], kqb, inv, &mut u8_panel, panel);
                        }
                        for ip in 0..s.c_out.div_ceil(MR) {
                            let a = w.panel(ip, q0);
                            let i = ip * MR;
                            for jp in (0..ncb).step_by(2 * NR) {
                                let cols = (2 * NR).min(ncb - jp);
                                let b0 = buf[(jp / NR) * kqb * NR * 4..].as_ptr();
                                let b1 = if cols > NR { buf[(jp / NR + 1) * kqb * NR * 4..].as_ptr() } else { b0 };
                                let tile = product(path, kqb, a, b0, b1, false);
                                let out = Epilogue {
                                    rows: MR.min(s.c_out - i),
                                    cols,
                                    row_scale: &w.scales[i..],
                                    col_scale: std::slice::from_ref(&scale),
                                    offset: Offset::Rows(&w.sums[block * s.c_out + i..]),
                                };
                                // SAFETY: output rows i.., pixels jb + jp.. of this chunk's columns.
                                unsafe { out.add_to(&tile, yp.get().add(i * pixels + jb + jp), pixels) };
                            }
                        }
                    }
                }
            });
        });
    })
}

/// Rows `i0..i0 + mc` of `x` (`k` wide), quads `q0..q0 + kqb` (whole groups), as u8 panels of
/// `MR` rows (`[panel][group][row][G quads][4]`); rows past `mc` and depths past `k` read as
/// zero (128).
#[allow(clippy::too_many_arguments)]
fn pack_rows(x: &[f32], k: usize, i0: usize, mc: usize, q0: usize, kqb: usize, inv: &[f32], dst: &mut [u8]) {
    vectorized!(pack_rows_body(x, k, i0, mc, q0, kqb, inv, dst))
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn pack_rows_body(x: &[f32], k: usize, i0: usize, mc: usize, q0: usize, kqb: usize, inv: &[f32], dst: &mut [u8]) {
    let panel_len = kqb * MR * 4;
    let mut row_u8 = vec![128u8; kqb * 4];
    let p_end = k.min((q0 + kqb) * 4);
    for ip in 0..mc.div_ceil(MR) {
        let panel = &mut dst[ip * panel_len..(ip + 1) * panel_len];
        for r in 0..MR {
            if ip * MR + r < mc {
                let i = i0 + ip * MR + r;
                let row = &x[i * k + q0 * 4..i * k + p_end];
                quantize_u8(row, inv[i], &mut row_u8);
                row_u8[row.len()..].fill(128);
            } else {
                row_u8.fill(128);
            }
            for (g, run) in row_u8.chunks_exact(4 * G).enumerate() {
                panel[(g * MR + r) * 4 * G..][..4 * G].copy_from_slice(run);
            }
        }
    }
}

/// One f32 B panel (`kc x NR`, `src[p * NR + c]`) as u8 quads `[quad][col][4]`, depth padded
/// with zeros (128) to `kqb` quads. `tmp`: room for `kqb * 4 * NR` bytes.
fn quantize_panel(src: &[f32], kqb: usize, inv: f32, tmp: &mut [u8], dst: &mut [u8]) {
    vectorized!(quantize_panel_body(src, kqb, inv, tmp, dst))
}

#[inline(always)]
fn quantize_panel_body(src: &[f32], kqb: usize, inv: f32, tmp: &mut [u8], dst: &mut [u8]) {
    let tmp = &mut tmp[..kqb * 4 * NR];
    quantize_u8(src, inv, tmp);
    tmp[src.len()..].fill(128);
    for (q, rows) in tmp.chunks_exact(4 * NR).enumerate() {
        interleave4(rows, &mut dst[q * NR * 4..(q + 1) * NR * 4]);
    }
}

/// Four rows of 16 bytes as 16 columns of 4 (`out[c * 4 + t] = rows[t * 16 + c]`).
#[inline(always)]
fn interleave4(rows: &[u8], out: &mut [u8]) {
    assert!(rows.len() >= 64 && out.len() >= 64);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE2 is part of x86_64; both slices hold 64 bytes (checked above).
    unsafe {
        use std::arch::x86_64::*;
        let r: [__m128i; 4] = std::array::from_fn(|t| _mm_loadu_si128(rows.as_ptr().add(t * 16).cast()));
        let (lo01, hi01) = (_mm_unpacklo_epi8(r[0], r[1]), _mm_unpackhi_epi8(r[0], r[1]));
        let (lo23, hi23) = (_mm_unpacklo_epi8(r[2], r[3]), _mm_unpackhi_epi8(r[2], r[3]));
        let o = out.as_mut_ptr().cast::<__m128i>();
        _mm_storeu_si128(o, _mm_unpacklo_epi16(lo01, lo23));
        _mm_storeu_si128(o.add(1), _mm_unpackhi_epi16(lo01, lo23));
        _mm_storeu_si128(o.add(2), _mm_unpacklo_epi16(hi01, hi23));
        _mm_storeu_si128(o.add(3), _mm_unpackhi_epi16(hi01, hi23));
    }
    #[cfg(not(target_arch = "x86_64"))]
    for c in 0..NR {
        for t in 0..4 {
            out[c * 4 + t] = rows[t * NR + c];
        }
    }
}

/// A per-thread scratch buffer of at least `len` bytes: the packers' buffers are 128 KiB, which
/// the system allocator would map and fault in afresh on every product.
fn with_scratch<T>(len: usize, f: impl FnOnce(&mut [u8]) -> T) -> T {
    use std::cell::RefCell;
    thread_local! {
        static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    }
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < len {
            s.resize(len, 0);
        }
        f(&mut s[..len])
    })
}

/// The integer tile `MR x 2NR`: `Σ_quads A[quad][r][·] · B[quad][c][·]` over `kqb` quads, with the
/// left operand's panel at `a` and the right operand's two panels at `b0`, `b1`. `a_u8`: the
/// left operand holds the (offset, unsigned) activations, else the right one does.
fn product(path: Int8Path, kqb: usize, a: *const u8, b0: *const u8, b1: *const u8, a_u8: bool) -> [[i32; 2 * NR]; MR] {
    let mut tile = [[0i32; 2 * NR]; MR];
    match path {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: VNNI checked by `Int8Path::current`; the panels hold `kqb` quads.
        Int8Path::Amx => unsafe {
            // SAFETY: AMX-INT8 checked by `Int8Path::current`, the tiles configured by the caller
            // (`super::amx::Int8Tiles`); the panels hold `kqb` quads, whole groups.
            super::amx::int8_tile(kqb, a, b0, b1, a_u8, &mut tile)
        },
        Int8Path::Vnni => unsafe {
            if a_u8 {
                x86::tile::<true>(kqb, a, b0, b1, &mut tile)
            } else {
                x86::tile::<false>(kqb, a, b0, b1, &mut tile)
            }
        },
        // SAFETY: as above.
        _ => unsafe { tile_portable(kqb, a, b0, b1, a_u8, &mut tile) },
    }
    tile
}

unsafe fn tile_portable(
    kqb: usize,
    a: *const u8,
    b0: *const u8,
    b1: *const u8,
    a_u8: bool,
    tile: &mut [[i32; 2 * NR]; MR],
) {
    let a = std::slice::from_raw_parts(a, kqb * MR * 4);
    let b = [std::slice::from_raw_parts(b0, kqb * NR * 4), std::slice::from_raw_parts(b1, kqb * NR * 4)];
    let (sa, sb) = if a_u8 { (0, 128) } else { (128, 0) };
    // Read the unsigned side as u8 and the signed side as i8 (the same bytes VNNI sees).
    let val = |byte: u8, unsigned_offset: i32| {
        if unsigned_offset == 0 {
            byte as i32
        } else {
            byte as i8 as i32
        }
    };
    for q in 0..kqb {
        for (r, row) in tile.iter_mut().enumerate() {
            let av: [i32; 4] = std::array::from_fn(|t| val(a[((q / G) * MR * G + r * G + q % G) * 4 + t], sa));
            for (half, bh) in b.iter().enumerate() {
                for c in 0..NR {
                    let bv = &bh[(q * NR + c) * 4..(q * NR + c) * 4 + 4];
                    row[half * NR + c] += (0..4).map(|t| av[t] * val(bv[t], sb)).sum::<i32>();
                }
            }
        }
    }
}

/// Which sums take the activations' +128 offset out: the weight is the right operand (linear:
/// one sum per column) or the left one (convolution: per row).
enum Offset<'a> {
    Cols(&'a [i32]),
    Rows(&'a [i32]),
}

/// Adds a block's integer tile to the f32 output: `c[r][j] += (tile - 128 · sum) · rs[r] · cs[j]`
/// (`cs` of length 1: one scale for every column).
struct Epilogue<'a> {
    rows: usize,
    cols: usize,
    row_scale: &'a [f32],
    col_scale: &'a [f32],
    offset: Offset<'a>,
}

impl Epilogue<'_> {
    /// # Safety
    /// `c` must be valid for `rows` rows of `cols` values, `ldc` apart.
    unsafe fn add_to(&self, tile: &[[i32; 2 * NR]; MR], c: *mut f32, ldc: usize) {
        vectorized!(add_to_body(self, tile, c, ldc))
    }
}

#[inline(always)]
unsafe fn add_to_body(e: &Epilogue, tile: &[[i32; 2 * NR]; MR], c: *mut f32, ldc: usize) {
    for (r, t) in tile.iter().enumerate().take(e.rows) {
        let out = std::slice::from_raw_parts_mut(c.add(r * ldc), e.cols);
        let rs = e.row_scale[r];
        match e.offset {
            // Linear layers: a scale and an offset sum per column.
            Offset::Cols(sums) => {
                for (((o, t), s), cs) in out.iter_mut().zip(t).zip(sums).zip(e.col_scale) {
                    *o += (t - 128 * s) as f32 * (rs * cs);
                }
            }
            // Convolutions: one per row, one scale for the image.
            Offset::Rows(sums) => {
                let (off, f) = (128 * sums[r], rs * e.col_scale[0]);
                for (o, t) in out.iter_mut().zip(t) {
                    *o += (t - off) as f32 * f;
                }
            }
        }
    }
}

/// A quantized weight read as the f32 values it stands for, by the f32 GEMM's packers (CPUs
/// without VNNI): as the left operand for convolutions, as `wᵀ` on the right for linear layers.
struct Dequantized<'a>(&'a Int8Matrix);

impl PackA for Dequantized<'_> {
    fn pack_a(&self, i0: usize, mc: usize, p0: usize, kc: usize, dst: &mut [f32]) {
        let w = self.0;
        for (ip, panel) in dst.chunks_exact_mut(kc * gemm::MR).take(mc.div_ceil(gemm::MR)).enumerate() {
            for r in 0..gemm::MR {
                let i = i0 + ip * gemm::MR + r;
                for p in 0..kc {
                    panel[p * gemm::MR + r] =
                        if ip * gemm::MR + r < mc { w.q(i, p0 + p) as f32 * w.scales[i] } else { 0.0 };
                }
            }
        }
    }
}

impl PackB for Dequantized<'_> {
    fn pack_b(&self, p0: usize, kc: usize, j0: usize, nc: usize, dst: &mut [f32]) {
        let w = self.0;
        for (jp, panel) in dst.chunks_exact_mut(kc * gemm::NR).take(nc.div_ceil(gemm::NR)).enumerate() {
            for c in 0..gemm::NR {
                let j = j0 + jp * gemm::NR + c;
                for p in 0..kc {
                    panel[p * gemm::NR + c] =
                        if jp * gemm::NR + c < nc { w.q(j, p0 + p) as f32 * w.scales[j] } else { 0.0 };
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{G, MR, NR};
    use std::arch::x86_64::*;

    /// The `MR x 2NR` integer tile with `vpdpbusd`: 24 zmm accumulators, two B loads and one
    /// broadcast of 4 bytes per row per quad.
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub(super) unsafe fn tile<const A_U8: bool>(
        kqb: usize,
        a: *const u8,
        b0: *const u8,
        b1: *const u8,
        out: &mut [[i32; 2 * NR]; MR],
    ) {
        let mut acc = [[_mm512_setzero_si512(); 2]; MR];
        for q in 0..kqb {
            let v0 = _mm512_loadu_si512(b0.add(q * NR * 4).cast());
            let v1 = _mm512_loadu_si512(b1.add(q * NR * 4).cast());
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_epi32(a.add(((q / G) * MR * G + r * G + q % G) * 4).cast::<i32>().read_unaligned());
                if A_U8 {
                    acc_r[0] = _mm512_dpbusd_epi32(acc_r[0], x, v0);
                    acc_r[1] = _mm512_dpbusd_epi32(acc_r[1], x, v1);
                } else {
                    acc_r[0] = _mm512_dpbusd_epi32(acc_r[0], v0, x);
                    acc_r[1] = _mm512_dpbusd_epi32(acc_r[1], v1, x);
                }
            }
        }
        for (o, acc_r) in out.iter_mut().zip(&acc) {
            _mm512_storeu_si512(o.as_mut_ptr().cast(), acc_r[0]);
            _mm512_storeu_si512(o.as_mut_ptr().add(NR).cast(), acc_r[1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uniform(mut seed: u32) -> impl FnMut() -> f32 {
        move || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            (seed as f32 / u32::MAX as f32) * 2.0 - 1.0
        }
    }

    fn rel_l2(a: &[f32], b: &[f64]) -> f64 {
        let num: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - y).powi(2)).sum();
        let den: f64 = b.iter().map(|y| y * y).sum();
        (num / den).sqrt()
    }

    /// Runs every path this CPU has: each within 2e-2 relative of `exact`, the integer paths
    /// bit-identical.
    fn check_paths(run: impl Fn(Int8Path) -> Vec<f32>, exact: &[f64], what: &str) {
        let runs: Vec<(Int8Path, Vec<f32>)> = Int8Path::available().into_iter().map(|p| (p, run(p))).collect();
        for (p, y) in &runs {
            let e = rel_l2(y, exact);
            assert!(e < 2e-2, "{p:?} {what}: relative error {e}");
        }
        let ints: Vec<&Vec<f32>> = runs.iter().filter(|(p, _)| *p != Int8Path::Dequantized).map(|(_, y)| y).collect();
        assert!(ints.windows(2).all(|w| w[0] == w[1]), "{what}: integer paths differ");
    }

    /// Every path against f64 on the float weights: within 8-bit rounding (about 1e-2 relative),
    /// the integer paths bit-identical, the weights rounded to their nearest level.
    #[test]
    fn linear_paths_agree_and_stay_near_f64() {
        for &(rows, k, n) in &[(1, 3, 5), (13, 77, 17), (50, 515, 33), (100, 1030, 70)] {
            let mut r = uniform(rows as u32 * 7 + k as u32);
            let x: Vec<f32> = (0..rows * k).map(|_| r()).collect();
            let w: Vec<f32> = (0..n * k).map(|_| r() * 0.1).collect();
            let bias: Vec<f32> = (0..n).map(|_| r()).collect();
            let q = Int8Matrix::quantize(&w, n, k, Side::Right);
            let wd = q.dequantized();
            for (a, b) in w.iter().zip(&wd) {
                assert!((a - b).abs() <= 0.5 * q.scales.iter().cloned().fold(0.0, f32::max) + 1e-7);
            }
            let exact: Vec<f64> = (0..rows * n)
                .map(|o| {
                    let (i, j) = (o / n, o % n);
                    bias[j] as f64 + (0..k).map(|p| x[i * k + p] as f64 * w[j * k + p] as f64).sum::<f64>()
                })
                .collect();
            check_paths(|p| linear_on(p, &x, rows, &q, Some(&bias)), &exact, &format!("{rows}x{k}x{n}"));
        }
    }

    #[test]
    fn conv_paths_agree_and_stay_near_f64() {
        for &(c_in, c_out, h, kern, stride, pad) in
            &[(3, 5, 7, 3, 1, 1), (64, 13, 9, 3, 2, 1), (70, 40, 6, 1, 1, 0), (200, 30, 5, 3, 1, 1)]
        {
            let s = ConvShape { batch: 2, c_in, h, w: h + 1, c_out, kh: kern, kw: kern, stride, padding: pad };
            let mut r = uniform(c_in as u32 * 3 + c_out as u32);
            let x: Vec<f32> = (0..2 * c_in * h * (h + 1)).map(|_| r()).collect();
            let depth = c_in * kern * kern;
            let w: Vec<f32> = (0..c_out * depth).map(|_| r() * 0.1).collect();
            let bias: Vec<f32> = (0..c_out).map(|_| r()).collect();
            let q = Int8Matrix::quantize(&w, c_out, depth, Side::Left);
            let exact: Vec<f64> = super::super::conv::conv2d_direct(&x, &w, Some(&bias), &s, Arith::F32)
                .iter()
                .map(|v| *v as f64)
                .collect();
            check_paths(|p| conv2d_on(p, &x, &q, Some(&bias), &s), &exact, &format!("{s:?}"));
        }
    }

    #[test]
    fn zero_and_bf16_weights_quantize() {
        let q = Int8Matrix::quantize(&[0f32; 8], 2, 4, Side::Left);
        assert!(q.dequantized().iter().all(|v| *v == 0.0));
        let w: Vec<half::bf16> = [1.0f32, -2.0, 0.5, 0.25, 0.0].iter().map(|v| half::bf16::from_f32(*v)).collect();
        let q = Int8Matrix::quantize(&w, 1, 5, Side::Right);
        assert_eq!((q.q(0, 1), q.scales[0]), (-127, 2.0 / 127.0));
        for (a, b) in w.iter().zip(q.dequantized()) {
            assert!((a.to_f32() - b).abs() <= q.scales[0] / 2.0 + 1e-7, "{a} {b}");
        }
    }
}
