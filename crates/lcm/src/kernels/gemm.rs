//! Single-precision matrix multiply, `C = A·B` or `C += A·B`, in the BLIS structure: B is
//! packed into `KC x NR` column panels and A into `MR x KC` row panels sized for the caches, and
//! a register-blocked micro-kernel (6x16 with AVX2 + FMA: 12 accumulators) does all the
//! arithmetic. Both operands come through packers, so transposed operands cost nothing extra
//! and a convolution can hand in its input as an implicit im2col matrix (see `conv.rs`).

use super::{parallel_chunks, parallel_pieces, Elem, SendPtr};

/// Rows of the micro-tile (A panel height).
pub const MR: usize = 6;
/// Columns of the micro-tile (B panel width): two AVX registers.
pub const NR: usize = 16;
/// Most depth of one packed block: A block `MC x KC` stays in L2, one B panel `KC x NR` in L1.
const KC: usize = 256;
/// The same for bf16 pair panels (half the bytes per value): twice as deep, so C is loaded and
/// stored half as often (the AMX kernel's products are fast enough for C's traffic to count).
const KC_PAIRS: usize = 512;

/// The depth of the blocks `k` is cut into: equal blocks of at most `KC` (`KC_PAIRS` for bf16
/// pair panels), with no thin last block, which would load and store C for little arithmetic.
pub(super) fn block_depth(k: usize, pairs: bool) -> usize {
    if pairs {
        // Whole AMX depth steps (32 values) where `k` allows, so stored pair panels are whole
        // tiles (only the last block of a `k` that is no multiple of 32 is partial).
        return k.div_ceil(k.div_ceil(KC_PAIRS).max(1)).next_multiple_of(32).min(k).max(1);
    }
    k.div_ceil(k.div_ceil(KC).max(1)).max(1)
}
const MC: usize = 144;
/// Width of one packed B block (lives in L2/L3).
pub const NC: usize = 1024;

/// How a product multiplies: in f32, or with both operands rounded to bf16 (to nearest even)
/// and the products summed in f32, on the CPU's bf16 dot-product instructions (twice the f32
/// rate, half the bytes per packed value).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arith {
    F32,
    Bf16,
}

impl Arith {
    /// bf16 products when `bf16` is asked for (weights kept in bf16) and the CPU path has them;
    /// f32 otherwise.
    pub fn bf16_if(bf16: bool) -> Arith {
        if bf16 && super::CpuPath::current() >= super::CpuPath::Avx512Bf16 {
            Arith::Bf16
        } else {
            Arith::F32
        }
    }
}

/// Something that can write blocks of the left operand `A` (`m x k`) as `MR`-row panels.
pub trait PackA: Sync {
    /// Write rows `i0..i0+mc`, depth `p0..p0+kc` as `ceil(mc/MR)` panels, each `kc * MR`
    /// values (`dst[p * MR + r]`), zero-padded past `mc`.
    fn pack_a(&self, i0: usize, mc: usize, p0: usize, kc: usize, dst: &mut [f32]);

    /// Rows from `i0`, depth block `p0..p0 + kc` already packed, if stored packed.
    fn packed(&self, _i0: usize, _p0: usize, _kc: usize) -> Option<&[f32]> {
        None
    }

    /// The same as bf16 pairs, if stored so.
    fn packed_pairs(&self, _i0: usize, _p0: usize, _kc: usize) -> Option<&[u32]> {
        None
    }

    /// Whether [`PackA::bf16_rows`] writes the operand directly.
    fn has_bf16_rows(&self) -> bool {
        false
    }

    /// Rows from `i0` (a multiple of 32), depth block `p0..p0 + kc`, if stored in the AMX
    /// driver's tile layout (see [`TiledA`]).
    fn tiles(&self, _i0: usize, _p0: usize, _kc: usize) -> Option<&[u32]> {
        None
    }

    /// Rows `i0..i0+mc`, depth `p0..p0+kc` rounded to bf16 as rows of pairs `stride` apart
    /// (`dst[r * stride + q]` holds values `2q` (low half) and `2q + 1` of row `r`), zero from
    /// depth `kc` to `2 * stride`: the layout AMX tiles load. False (nothing written) when this
    /// operand has no direct way; the AMX driver then turns its panels into rows.
    fn bf16_rows(&self, _i0: usize, _mc: usize, _p0: usize, _kc: usize, _stride: usize, _dst: &mut [u32]) -> bool {
        false
    }
}

/// Something that can write blocks of the right operand `B` (`k x n`) as `NR`-column panels.
pub trait PackB: Sync {
    /// Write depth `p0..p0+kc`, columns `j0..j0+nc` as `ceil(nc/NR)` panels, each `kc * NR`
    /// values (`dst[p * NR + c]`), zero-padded past `nc`.
    fn pack_b(&self, p0: usize, kc: usize, j0: usize, nc: usize, dst: &mut [f32]);

    /// The block already packed, if this operand is stored packed (see [`PackedB`]).
    fn packed(&self, _p0: usize, _kc: usize, _j0: usize) -> Option<&[f32]> {
        None
    }

    /// The block already packed as bf16 pairs (see [`to_pairs`]), if stored so.
    fn packed_pairs(&self, _p0: usize, _kc: usize, _j0: usize) -> Option<&[u32]> {
        None
    }
}

/// An operand packed once in the driver's layout: every depth block's panels (`unit` = `MR`
/// rows or `NR` columns each) of the whole `len`-wide side, in f32 or, for [`Arith::Bf16`], as
/// the bf16 pair panels the bf16 kernel reads (half the bytes).
struct Panels {
    k: usize,
    len: usize,
    unit: usize,
    data: Vec<f32>,
    pairs: Vec<u32>,
}

impl Panels {
    /// `pack(p0, kc, dst)` writes depth block `p0..p0 + kc` of the whole side.
    fn new(k: usize, len: usize, unit: usize, arith: Arith, pack: impl Fn(usize, usize, &mut [f32]) + Sync) -> Self {
        let width = len.div_ceil(unit) * unit;
        let kb = block_depth(k, arith == Arith::Bf16);
        // Blocks are independent: pack them in parallel when there are several.
        use rayon::prelude::*;
        if arith == Arith::Bf16 {
            // Blocks of kb.div_ceil(2) pairs (a last block of odd depth is zero-padded).
            let mut pairs = vec![0u32; k.div_ceil(kb) * kb.div_ceil(2) * width];
            pairs.par_chunks_mut(kb.div_ceil(2) * width).enumerate().for_each(|(i, block)| {
                let kc = kb.min(k - i * kb);
                let mut f = vec![0f32; kc * width];
                pack(i * kb, kc, &mut f);
                to_pairs(&f, kc, unit, block);
            });
            return Self { k, len, unit, data: Vec::new(), pairs };
        }
        let mut data = vec![0f32; k * width];
        data.par_chunks_mut(kb * width).enumerate().for_each(|(i, block)| pack(i * kb, kb.min(k - i * kb), block));
        Self { k, len, unit, data, pairs: Vec::new() }
    }

    /// Where block `p0`, panel `at` starts, in values of the block's layout (`depth_of` maps a
    /// depth to its packed depth: itself, or its pairs).
    fn offset(&self, p0: usize, kc: usize, at: usize, depth_of: impl Fn(usize) -> usize) -> usize {
        // Blocks start at multiples of the block depth and panels at multiples of the unit, as
        // the driver asks.
        let kb = block_depth(self.k, !self.pairs.is_empty());
        debug_assert!(p0.is_multiple_of(kb) && at.is_multiple_of(self.unit) && kc == kb.min(self.k - p0));
        let width = self.len.div_ceil(self.unit) * self.unit;
        (p0 / kb) * depth_of(kb) * width + at * depth_of(kc)
    }

    fn f32_at(&self, p0: usize, kc: usize, at: usize) -> Option<&[f32]> {
        (!self.data.is_empty()).then(|| &self.data[self.offset(p0, kc, at, |d| d)..])
    }

    fn pairs_at(&self, p0: usize, kc: usize, at: usize) -> Option<&[u32]> {
        (!self.pairs.is_empty()).then(|| &self.pairs[self.offset(p0, kc, at, |d| d.div_ceil(2))..])
    }

    fn copy(&self, p0: usize, kc: usize, at: usize, count: usize, dst: &mut [f32]) {
        let src = self.f32_at(p0, kc, at).expect("a block packed in f32, aligned");
        let len = count.div_ceil(self.unit) * self.unit * kc;
        dst[..len].copy_from_slice(&src[..len]);
    }
}

/// A right operand packed once, for a matrix that several products share (attention's keys and
/// values across query blocks, Winograd's kernels across tiles, a linear layer's bf16 weight on
/// AMX).
pub struct PackedB(Panels);

impl std::fmt::Debug for PackedB {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedB({}x{})", self.0.k, self.0.len)
    }
}

impl PackedB {
    pub fn new(k: usize, n: usize, b: &dyn PackB, arith: Arith) -> Self {
        Self(Panels::new(k, n, NR, arith, |p0, kc, dst| b.pack_b(p0, kc, 0, n, dst)))
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.0.k, self.0.len)
    }
}

impl PackB for PackedB {
    fn pack_b(&self, p0: usize, kc: usize, j0: usize, nc: usize, dst: &mut [f32]) {
        self.0.copy(p0, kc, j0, nc, dst)
    }

    fn packed(&self, p0: usize, kc: usize, j0: usize) -> Option<&[f32]> {
        self.0.f32_at(p0, kc, j0)
    }

    fn packed_pairs(&self, p0: usize, kc: usize, j0: usize) -> Option<&[u32]> {
        self.0.pairs_at(p0, kc, j0)
    }
}

/// A left operand packed once, shared by the column chunks of one product (each chunk would
/// otherwise pack all of A again).
struct PackedA(Panels);

impl PackedA {
    fn new(m: usize, k: usize, a: &dyn PackA, arith: Arith) -> Self {
        Self(Panels::new(k, m, MR, arith, |p0, kc, dst| a.pack_a(0, m, p0, kc, dst)))
    }
}

impl PackA for PackedA {
    fn pack_a(&self, i0: usize, mc: usize, p0: usize, kc: usize, dst: &mut [f32]) {
        self.0.copy(p0, kc, i0, mc, dst)
    }

    fn packed(&self, i0: usize, p0: usize, kc: usize) -> Option<&[f32]> {
        self.0.f32_at(p0, kc, i0)
    }

    fn packed_pairs(&self, i0: usize, p0: usize, kc: usize) -> Option<&[u32]> {
        self.0.pairs_at(p0, kc, i0)
    }
}

/// Rows per tile, and pairs per tile row (64 bytes) in AMX's tile layout.
pub(super) const TILE: usize = 16;

/// Rows of pairs (`stride` apart, in 16-row groups) as tiles: each group's depth steps one
/// after another, each 16 rows of 16 pairs (1 KiB, contiguous: the prefetchers follow it).
pub(super) fn as_tiles(rows: &[u32], stride: usize, dst: &mut [u32]) {
    for (group, out) in rows.chunks_exact(TILE * stride).zip(dst.chunks_exact_mut(TILE * stride)) {
        for (t, tile) in out.chunks_exact_mut(TILE * TILE).enumerate() {
            for (r, o) in tile.chunks_exact_mut(TILE).enumerate() {
                o.copy_from_slice(&group[r * stride + t * TILE..][..TILE]);
            }
        }
    }
}

/// A left operand (a convolution's weight, `m x k`) rounded to bf16 once and stored as the AMX
/// driver reads it: per depth block, the rows (padded with zeros to a multiple of 32) as tiles
/// (each group of 16 rows one 1 KiB tile per 32 depths, the depth padded with zeros to whole
/// tiles). Made at load for weights kept in bf16 where the CPU path is `amx-bf16`, so no
/// product rounds them again.
pub struct TiledA {
    m: usize,
    k: usize,
    data: Vec<u32>,
}

impl std::fmt::Debug for TiledA {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TiledA({}x{})", self.m, self.k)
    }
}

thread_local! {
    /// One group of rows of pairs, on its way into tiles.
    static ROWS: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl TiledA {
    /// `w`: `m x k`, row-major. Groups of 32 rows are laid out in parallel (activations are
    /// tiled per product, so this is on the hot path too).
    pub fn new<T: Elem>(w: &[T], m: usize, k: usize) -> Self {
        use rayon::prelude::*;
        let a = Strided { data: w, row_stride: k, col_stride: 1 };
        let (kb, mp) = (block_depth(k, true), m.next_multiple_of(2 * TILE));
        let mut data = Vec::new();
        for p0 in (0..k).step_by(kb) {
            let kc = kb.min(k - p0);
            let stride = kc.div_ceil(2).next_multiple_of(TILE);
            let start = data.len();
            data.resize(start + mp * stride, 0);
            data[start..].par_chunks_mut(2 * TILE * stride).enumerate().for_each(|(g, out)| {
                ROWS.with(|rows| {
                    let mut rows = rows.borrow_mut();
                    rows.clear();
                    rows.resize(2 * TILE * stride, 0u32);
                    let r0 = g * 2 * TILE;
                    a.bf16_rows(r0, (2 * TILE).min(m - r0), p0, kc, stride, &mut rows);
                    as_tiles(&rows, stride, out);
                })
            });
        }
        Self { m, k, data }
    }

    /// Where block `p0`'s tiles start, and its depth in pairs.
    fn block(&self, p0: usize) -> (usize, usize) {
        let kb = block_depth(self.k, true);
        let per_block = self.m.next_multiple_of(2 * TILE) * kb.div_ceil(2).next_multiple_of(TILE);
        (p0 / kb * per_block, kb.min(self.k - p0).div_ceil(2).next_multiple_of(TILE))
    }

    /// Value (row `r`, depth `p`), as stored (rounded to bf16).
    fn at(&self, r: usize, p: usize) -> f32 {
        let kb = block_depth(self.k, true);
        let (start, stride) = self.block(p / kb * kb);
        let q = (p % kb) / 2;
        let i = start + (r / TILE) * TILE * stride + (q / TILE) * TILE * TILE + (r % TILE) * TILE + q % TILE;
        let pair = self.data[i];
        f32::from_bits(if p.is_multiple_of(2) { pair << 16 } else { pair & 0xffff_0000 })
    }
}

impl PackA for TiledA {
    /// Unpacked to f32 panels: exact (the stored values are bf16), for drivers other than AMX's.
    fn pack_a(&self, i0: usize, mc: usize, p0: usize, kc: usize, dst: &mut [f32]) {
        for (panel, out) in dst.chunks_mut(kc * MR).take(mc.div_ceil(MR)).enumerate() {
            for p in 0..kc {
                for r in 0..MR {
                    let row = i0 + panel * MR + r;
                    out[p * MR + r] = if row < (i0 + mc).min(self.m) { self.at(row, p0 + p) } else { 0.0 };
                }
            }
        }
    }

    fn tiles(&self, i0: usize, p0: usize, _kc: usize) -> Option<&[u32]> {
        if !i0.is_multiple_of(2 * TILE) {
            return None;
        }
        let (start, stride) = self.block(p0);
        Some(&self.data[start + i0 * stride..])
    }
}

/// f32 to bf16, rounded to nearest even (as PyTorch's conversion), NaN kept a NaN.
#[inline(always)]
pub fn bf16_bits(x: f32) -> u32 {
    let b = x.to_bits();
    if x.is_nan() {
        return (b >> 16) | 0x40;
    }
    (b + 0x7fff + ((b >> 16) & 1)) >> 16
}

/// Packed f32 panels (`kc` deep, `width` wide: `src[p * width + c]`, panel after panel) as bf16
/// pair panels: `dst[q * width + c]` holds values `2q` (low half) and `2q + 1` (high half) of
/// column `c`, the operand layout of `vdpbf16ps`; an odd last depth is paired with zero.
pub fn to_pairs(src: &[f32], kc: usize, width: usize, dst: &mut [u32]) {
    #[inline(always)]
    fn body(src: &[f32], kc: usize, width: usize, dst: &mut [u32]) {
        let kc2 = kc.div_ceil(2);
        for (panel, out) in src.chunks_exact(kc * width).zip(dst.chunks_exact_mut(kc2 * width)) {
            for (q, o) in out.chunks_exact_mut(width).enumerate() {
                let lo = &panel[2 * q * width..][..width];
                if 2 * q + 1 < kc {
                    let hi = &panel[(2 * q + 1) * width..][..width];
                    for ((o, &l), &h) in o.iter_mut().zip(lo).zip(hi) {
                        *o = bf16_bits(l) | (bf16_bits(h) << 16);
                    }
                } else {
                    for (o, &l) in o.iter_mut().zip(lo) {
                        *o = bf16_bits(l);
                    }
                }
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        unsafe fn fast(src: &[f32], kc: usize, width: usize, dst: &mut [u32]) {
            body(src, kc, width, dst)
        }
        if super::CpuPath::current() >= super::CpuPath::Avx512 {
            // SAFETY: AVX-512 F checked.
            return unsafe { fast(src, kc, width, dst) };
        }
    }
    body(src, kc, width, dst)
}

/// A matrix in memory with arbitrary row and column strides (in elements). Its values may be
/// half precision (weights kept in f16 / bf16): the packers widen them to f32 as they copy.
#[derive(Clone, Copy)]
pub struct Strided<'a, T = f32> {
    pub data: &'a [T],
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<T: Elem> Strided<'_, T> {
    #[inline]
    fn at(&self, r: usize, c: usize) -> f32 {
        self.data[r * self.row_stride + c * self.col_stride].to_f32()
    }

    /// The same matrix over f32 values, when the values are f32.
    #[inline]
    fn as_f32(&self) -> Option<Strided<'_, f32>> {
        T::as_f32(self.data).map(|data| Strided { data, row_stride: self.row_stride, col_stride: self.col_stride })
    }
}

impl<T: Elem> PackA for Strided<'_, T> {
    fn pack_a(&self, i0: usize, mc: usize, p0: usize, kc: usize, dst: &mut [f32]) {
        match self.as_f32() {
            Some(f) => f.pack_a_f32(i0, mc, p0, kc, dst),
            None => self.pack_a_widen(i0, mc, p0, kc, dst),
        }
    }

    fn has_bf16_rows(&self) -> bool {
        self.col_stride == 1
    }

    /// Contiguous rows: each row's run rounded pair by pair, one pass (widened first through a
    /// stack buffer when held in half precision).
    fn bf16_rows(&self, i0: usize, mc: usize, p0: usize, kc: usize, stride: usize, dst: &mut [u32]) -> bool {
        if self.col_stride != 1 {
            return false;
        }
        let mut buf = [0f32; WIDEN];
        for (r, out) in dst.chunks_exact_mut(stride).take(mc).enumerate() {
            let row = &self.data[(i0 + r) * self.row_stride + p0..][..kc];
            match T::as_f32(row) {
                Some(f) => round_pairs(f, &mut out[..kc.div_ceil(2)]),
                None => {
                    for q0 in (0..kc).step_by(WIDEN) {
                        let qn = WIDEN.min(kc - q0);
                        T::widen(&row[q0..q0 + qn], &mut buf[..qn]);
                        round_pairs(&buf[..qn], &mut out[q0 / 2..(q0 + qn).div_ceil(2)]);
                    }
                }
            }
            out[kc.div_ceil(2)..].fill(0);
        }
        true
    }
}

/// `dst[q]` = `src[2q]` and `src[2q + 1]` rounded to bf16 (low half first), an odd last value
/// paired with zero.
pub(super) fn round_pairs(src: &[f32], dst: &mut [u32]) {
    #[inline(always)]
    fn body(src: &[f32], dst: &mut [u32]) {
        let mut pairs = src.chunks_exact(2);
        for (o, p) in dst.iter_mut().zip(&mut pairs) {
            *o = bf16_bits(p[0]) | (bf16_bits(p[1]) << 16);
        }
        if let [last] = pairs.remainder() {
            dst[src.len() / 2] = bf16_bits(*last);
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        unsafe fn fast(src: &[f32], dst: &mut [u32]) {
            body(src, dst)
        }
        if super::CpuPath::current() >= super::CpuPath::Avx512 {
            // SAFETY: AVX-512 F checked.
            return unsafe { fast(src, dst) };
        }
    }
    body(src, dst)
}

impl<T: Elem> PackB for Strided<'_, T> {
    fn pack_b(&self, p0: usize, kc: usize, j0: usize, nc: usize, dst: &mut [f32]) {
        match self.as_f32() {
            Some(f) => f.pack_b_f32(p0, kc, j0, nc, dst),
            None => self.pack_b_widen(p0, kc, j0, nc, dst),
        }
    }
}

/// Depth widened at a time by the half-precision packers (one stack buffer per row / column).
const WIDEN: usize = 256;

impl<T: Elem> Strided<'_, T> {
    /// [`PackA::pack_a`] for half-precision values: each row's run of `kc` values is widened
    /// into a buffer (contiguous rows: vector conversion), then interleaved into the panel.
    fn pack_a_widen(&self, i0: usize, mc: usize, p0: usize, kc: usize, dst: &mut [f32]) {
        let mut buf = [[0f32; WIDEN]; MR];
        for (panel, out) in dst.chunks_mut(kc * MR).take(mc.div_ceil(MR)).enumerate() {
            let r0 = i0 + panel * MR;
            let rows = MR.min(i0 + mc - r0);
            for q0 in (0..kc).step_by(WIDEN) {
                let qn = WIDEN.min(kc - q0);
                for (r, b) in buf.iter_mut().enumerate() {
                    let b = &mut b[..qn];
                    if r >= rows {
                        b.fill(0.0);
                    } else if self.col_stride == 1 {
                        T::widen(&self.data[(r0 + r) * self.row_stride + p0 + q0..][..qn], b);
                    } else {
                        for (q, v) in b.iter_mut().enumerate() {
                            *v = self.at(r0 + r, p0 + q0 + q);
                        }
                    }
                }
                for (q, o) in out[q0 * MR..(q0 + qn) * MR].chunks_exact_mut(MR).enumerate() {
                    for r in 0..MR {
                        o[r] = buf[r][q];
                    }
                }
            }
        }
    }

    /// [`PackB::pack_b`] for half-precision values: rows widened straight into the panel, or
    /// (transposed operand, e.g. a linear layer's `Wᵀ`) each column widened into a buffer and
    /// scattered.
    fn pack_b_widen(&self, p0: usize, kc: usize, j0: usize, nc: usize, dst: &mut [f32]) {
        let mut buf = [0f32; WIDEN];
        for (panel, out) in dst.chunks_mut(kc * NR).take(nc.div_ceil(NR)).enumerate() {
            let c0 = j0 + panel * NR;
            let cols = NR.min(j0 + nc - c0);
            if self.col_stride == 1 {
                for p in 0..kc {
                    let o = &mut out[p * NR..p * NR + NR];
                    T::widen(&self.data[(p0 + p) * self.row_stride + c0..][..cols], &mut o[..cols]);
                    o[cols..].fill(0.0);
                }
                continue;
            }
            if cols < NR {
                out[..kc * NR].fill(0.0);
            }
            for c in 0..cols {
                for q0 in (0..kc).step_by(WIDEN) {
                    let qn = WIDEN.min(kc - q0);
                    if self.row_stride == 1 {
                        T::widen(&self.data[(c0 + c) * self.col_stride + p0 + q0..][..qn], &mut buf[..qn]);
                    } else {
                        for (q, v) in buf[..qn].iter_mut().enumerate() {
                            *v = self.at(p0 + q0 + q, c0 + c);
                        }
                    }
                    for (q, v) in buf[..qn].iter().enumerate() {
                        out[(q0 + q) * NR + c] = *v;
                    }
                }
            }
        }
    }
}

impl Strided<'_, f32> {
    fn pack_a_f32(&self, i0: usize, mc: usize, p0: usize, kc: usize, dst: &mut [f32]) {
        for (panel, out) in dst.chunks_mut(kc * MR).take(mc.div_ceil(MR)).enumerate() {
            let r0 = i0 + panel * MR;
            let rows = MR.min(i0 + mc - r0);
            if self.col_stride == 1 && rows == MR {
                let rs: [&[f32]; MR] = std::array::from_fn(|r| &self.data[(r0 + r) * self.row_stride + p0..][..kc]);
                for (p, o) in out.chunks_exact_mut(MR).enumerate() {
                    for r in 0..MR {
                        o[r] = rs[r][p];
                    }
                }
            } else {
                for p in 0..kc {
                    for r in 0..MR {
                        out[p * MR + r] = if r < rows { self.at(r0 + r, p0 + p) } else { 0.0 };
                    }
                }
            }
        }
    }

    fn pack_b_f32(&self, p0: usize, kc: usize, j0: usize, nc: usize, dst: &mut [f32]) {
        for (panel, out) in dst.chunks_mut(kc * NR).take(nc.div_ceil(NR)).enumerate() {
            let c0 = j0 + panel * NR;
            let cols = NR.min(j0 + nc - c0);
            if self.col_stride == 1 {
                for p in 0..kc {
                    let src = &self.data[(p0 + p) * self.row_stride + c0..][..cols];
                    let o = &mut out[p * NR..p * NR + NR];
                    o[..cols].copy_from_slice(src);
                    o[cols..].fill(0.0);
                }
            } else {
                // Transposed operand: read each column contiguously, scatter into the panel.
                if cols < NR {
                    out[..kc * NR].fill(0.0);
                }
                for c in 0..cols {
                    let col = &self.data[(c0 + c) * self.col_stride + p0 * self.row_stride..];
                    if self.row_stride == 1 {
                        for (p, v) in col[..kc].iter().enumerate() {
                            out[p * NR + c] = *v;
                        }
                    } else {
                        for p in 0..kc {
                            out[p * NR + c] = col[p * self.row_stride];
                        }
                    }
                }
            }
        }
    }
}

/// `C (m x n, row stride ldc) = A·B`, or `C += A·B` when `accumulate`, on rayon's threads,
/// multiplying as `arith` says. `c` must hold `(m - 1) * ldc + n` values.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    arith: Arith,
    m: usize,
    n: usize,
    k: usize,
    a: &dyn PackA,
    b: &dyn PackB,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    gemm_on(MicroKernel::current(arith), m, n, k, a, b, c, ldc, accumulate)
}

/// [`gemm`] with a given micro-kernel (the tests run every path the CPU has).
#[allow(clippy::too_many_arguments)]
fn gemm_on(
    tile: MicroKernel,
    m: usize,
    n: usize,
    k: usize,
    a: &dyn PackA,
    b: &dyn PackB,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    if trivial(m, n, k, c, ldc, accumulate) {
        return;
    }
    let cp = SendPtr(c.as_mut_ptr());
    // Split the larger output dimension into chunks the thread pool shares out; each chunk
    // is an independent single-threaded GEMM writing its own part of C.
    let work = 2 * m * n * k;
    // Chunks in whole micro-tiles, so only the last chunk ends in a partial tile.
    // Few rows: split the columns, so each thread packs only its own part of B (a row split
    // would stream all of B through every thread for little arithmetic per value).
    // AMX: rows of A are rounded into tiles by the thread that multiplies them, so a column
    // split rounds all of A in every thread; a row split shares B packed once (k x n values,
    // through memory), measured better where A's copies would outweigh B (`threads * m >= n`:
    // 2048^3 700 vs 460 GFLOP/s) or B is stored packed, worse for a convolution's wide input
    // (320->320 3x3 at 64x64: 440 vs 620).
    let b_stored = b.packed_pairs(0, block_depth(k, true).min(k), 0).is_some();
    let amx_rows = tile.amx && m >= 4 * tile.rows && (b_stored || rayon::current_num_threads() * m >= n);
    if !amx_rows && (n >= m || m < 4 * MC) {
        // bf16: several chunks would each pack and round all of A, which costs as much as a
        // chunk's arithmetic: round it once for all of them (2048^3: 380 -> 720 GFLOP/s). f32
        // re-packs per chunk, measured faster (2048^3: 390 vs 310 GFLOP/s with a shared copy).
        let shared;
        let a: &dyn PackA = if tile.pairs
            && parallel_pieces(n, tile.cols, work) > 1
            && a.packed_pairs(0, 0, block_depth(k, true).min(k)).is_none()
            && !(tile.amx && (a.has_bf16_rows() || a.tiles(0, 0, block_depth(k, true).min(k)).is_some()))
        {
            shared = PackedA::new(m, k, a, tile.arith());
            &shared
        } else {
            a
        };
        parallel_chunks(n, tile.cols, work, |j0, nc| unsafe {
            gemm_serial(tile, m, nc, k, 0, j0, a, b, cp.get(), ldc, accumulate)
        });
    } else if b.packed(0, block_depth(k, false).min(k), 0).is_some() || b_stored || work < 4 * 2 * k * n {
        parallel_chunks(m, tile.rows, work, |i0, mc| unsafe {
            gemm_serial(tile, mc, n, k, i0, 0, a, b, cp.get(), ldc, accumulate)
        });
    } else {
        // Every row chunk needs all of B: pack it once for all of them.
        let packed = PackedB::new(k, n, b, tile.arith());
        parallel_chunks(m, tile.rows, work, |i0, mc| unsafe {
            gemm_serial(tile, mc, n, k, i0, 0, a, &packed, cp.get(), ldc, accumulate)
        });
    }
}

/// [`gemm`] on the calling thread only, for callers that already run many products in parallel.
#[allow(clippy::too_many_arguments)]
pub fn gemm_single_thread(
    arith: Arith,
    m: usize,
    n: usize,
    k: usize,
    a: &dyn PackA,
    b: &dyn PackB,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    if trivial(m, n, k, c, ldc, accumulate) {
        return;
    }
    unsafe { gemm_serial(MicroKernel::current(arith), m, n, k, 0, 0, a, b, c.as_mut_ptr(), ldc, accumulate) }
}

/// Checks C's size and handles the products with nothing to multiply (an empty C, or `k == 0`,
/// where C becomes zero unless accumulating); true when nothing is left to do.
fn trivial(m: usize, n: usize, k: usize, c: &mut [f32], ldc: usize, accumulate: bool) -> bool {
    if m == 0 || n == 0 {
        return true;
    }
    assert!(c.len() >= (m - 1) * ldc + n, "gemm: output too small");
    if k == 0 && !accumulate {
        for i in 0..m {
            c[i * ldc..i * ldc + n].fill(0.0);
        }
    }
    k == 0
}

thread_local! {
    /// Packing buffers: A and B panels in f32, and as bf16 pairs for the bf16 kernel.
    #[allow(clippy::type_complexity)]
    static PACK: std::cell::RefCell<(Vec<f32>, Vec<f32>, Vec<u32>, Vec<u32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new(), Vec::new(), Vec::new())) };
}

/// One thread's share: rows `i_base..i_base+m`, columns `j_base..j_base+n` of the product.
///
/// # Safety
/// `c` points at C's element (0, 0); the caller guarantees no other thread writes this block.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_serial(
    kernel: MicroKernel,
    m: usize,
    n: usize,
    k: usize,
    i_base: usize,
    j_base: usize,
    a: &dyn PackA,
    b: &dyn PackB,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if kernel.amx {
        return super::amx::gemm_serial(m, n, k, i_base, j_base, a, b, c, ldc, accumulate);
    }
    PACK.with(|bufs| {
        let (ref mut abuf, ref mut bbuf, ref mut apairs, ref mut bpairs) = *bufs.borrow_mut();
        let nc_max = NC.min(n.div_ceil(NR) * NR);
        let mc_max = MC.min(m.div_ceil(MR) * MR);
        let kb = block_depth(k, kernel.pairs);
        let kc_max = kb;
        if bbuf.len() < nc_max * kc_max {
            bbuf.resize(nc_max * kc_max, 0.0);
        }
        if abuf.len() < mc_max * kc_max {
            abuf.resize(mc_max * kc_max, 0.0);
        }
        if kernel.pairs {
            apairs.resize(mc_max * kc_max.div_ceil(2), 0);
            bpairs.resize(nc_max * kc_max.div_ceil(2), 0);
        }
        for jc in (0..n).step_by(NC) {
            let nc = NC.min(n - jc);
            for pc in (0..k).step_by(kb) {
                let kc = kb.min(k - pc);
                // A value's place in a panel: `kc` deep, or `kc / 2` pairs deep for bf16.
                let depth = if kernel.pairs { kc.div_ceil(2) } else { kc };
                let jb = j_base + jc;
                let bpacked = block(
                    kernel.pairs,
                    b.packed_pairs(pc, kc, jb),
                    b.packed(pc, kc, jb),
                    kc,
                    NR,
                    nc,
                    bbuf,
                    bpairs,
                    |d| b.pack_b(pc, kc, jb, nc, d),
                );
                let acc = accumulate || pc > 0;
                for ic in (0..m).step_by(MC) {
                    let mc = MC.min(m - ic);
                    let ib = i_base + ic;
                    let apacked = block(
                        kernel.pairs,
                        a.packed_pairs(ib, pc, kc),
                        a.packed(ib, pc, kc),
                        kc,
                        MR,
                        mc,
                        abuf,
                        apairs,
                        |d| a.pack_a(ib, mc, pc, kc, d),
                    );
                    for jr in (0..nc).step_by(kernel.cols) {
                        let nr = kernel.cols.min(nc - jr);
                        let bp = bpacked.add(jr * depth);
                        for ir in (0..mc).step_by(kernel.rows) {
                            let mr = kernel.rows.min(mc - ir);
                            let ap = apacked.add(ir * depth);
                            let cptr = c.add((i_base + ic + ir) * ldc + j_base + jc + jr);
                            (kernel.f)(kc, ap, bp, cptr, ldc, acc, mr, nr);
                        }
                    }
                }
            }
        }
    })
}

/// `(kc, a, b, c, ldc, accumulate, mr, nr)`: `C[..mr, ..nr] (+)= A·B` over depth `kc`, where A
/// is `ceil(mr / MR)` packed panels `kc * MR` apart from `a` and B `ceil(nr / NR)` panels
/// `kc * NR` apart from `b` (no panel past those is read).
/// Where the kernel reads one operand's block of `count` rows / columns (`unit` per panel):
/// the operand's stored bf16 pairs or f32 panels, or `pack` into `buf`; a bf16 kernel (`pairs`)
/// gets f32 panels rounded into `pairs_buf`.
#[allow(clippy::too_many_arguments)]
pub(super) fn block(
    pairs: bool,
    stored_pairs: Option<&[u32]>,
    stored: Option<&[f32]>,
    kc: usize,
    unit: usize,
    count: usize,
    buf: &mut [f32],
    pairs_buf: &mut [u32],
    pack: impl FnOnce(&mut [f32]),
) -> *const f32 {
    if let (true, Some(p)) = (pairs, stored_pairs) {
        return p.as_ptr().cast();
    }
    let f: &[f32] = match stored {
        Some(p) => p,
        None => {
            pack(&mut *buf);
            &*buf
        }
    };
    if !pairs {
        return f.as_ptr();
    }
    to_pairs(&f[..count.div_ceil(unit) * unit * kc], kc, unit, pairs_buf);
    pairs_buf.as_ptr().cast()
}

type Kernel = unsafe fn(usize, *const f32, *const f32, *mut f32, usize, bool, usize, usize);

/// A micro-kernel and the largest tile it computes (a whole number of packed panels, so every
/// path shares one packing layout).
/// A bf16 kernel (`pairs`) reads bf16 pair panels (see [`to_pairs`]) through the same pointers.
#[derive(Clone, Copy)]
struct MicroKernel {
    rows: usize,
    cols: usize,
    f: Kernel,
    pairs: bool,
    /// The AMX driver (`amx.rs`) takes the whole product instead of `f`.
    amx: bool,
}

impl MicroKernel {
    fn current(arith: Arith) -> Self {
        Self::for_path(super::CpuPath::current(), arith)
    }

    fn arith(&self) -> Arith {
        if self.pairs {
            Arith::Bf16
        } else {
            Arith::F32
        }
    }

    /// `arith` is honoured where `path` has it (callers ask through [`Arith::bf16_if`]).
    fn for_path(path: super::CpuPath, arith: Arith) -> Self {
        use super::CpuPath;
        #[cfg(target_arch = "x86_64")]
        if arith == Arith::Bf16 && path >= CpuPath::Avx512Bf16 {
            let amx = path >= CpuPath::AmxBf16;
            let rows = if amx { 32 } else { 2 * MR };
            return MicroKernel { rows, cols: 2 * NR, f: x86::kernel_bf16_12x32, pairs: true, amx };
        }
        let (rows, cols, f): (usize, usize, Kernel) = match path {
            CpuPath::Portable => (MR, NR, kernel_generic),
            #[cfg(target_arch = "x86_64")]
            CpuPath::Avx2 => (MR, NR, x86::kernel_6x16),
            #[cfg(target_arch = "x86_64")]
            CpuPath::Avx512 | CpuPath::Avx512Bf16 | CpuPath::AmxBf16 => (2 * MR, 2 * NR, x86::kernel_12x32),
            #[cfg(not(target_arch = "x86_64"))]
            _ => (MR, NR, kernel_generic),
        };
        MicroKernel { rows, cols, f, pairs: false, amx: false }
    }
}

/// Portable micro-kernel (any CPU without AVX2/FMA).
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_generic(
    kc: usize,
    ap: *const f32,
    bp: *const f32,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    mr: usize,
    nr: usize,
) {
    let mut acc = [[0f32; NR]; MR];
    for p in 0..kc {
        let a = std::slice::from_raw_parts(ap.add(p * MR), MR);
        let b = std::slice::from_raw_parts(bp.add(p * NR), NR);
        for r in 0..MR {
            for j in 0..NR {
                acc[r][j] += a[r] * b[j];
            }
        }
    }
    store_tile(&acc, c, ldc, accumulate, mr, nr);
}

#[inline]
unsafe fn store_tile(acc: &[[f32; NR]; MR], c: *mut f32, ldc: usize, accumulate: bool, mr: usize, nr: usize) {
    for (r, row) in acc.iter().enumerate().take(mr) {
        let out = std::slice::from_raw_parts_mut(c.add(r * ldc), nr);
        if accumulate {
            for (o, v) in out.iter_mut().zip(row) {
                *o += v;
            }
        } else {
            out.copy_from_slice(&row[..nr]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{store_tile, MR, NR};
    use std::arch::x86_64::*;

    /// `$tile::<AP, BP>(args)` with as many A and B panels (1 or 2 each) as the `mr x nr` tile
    /// covers: the 12x32 kernels' edges read no panel past the packed ones.
    macro_rules! by_panels {
        ($tile:ident($kc:expr, $ap:expr, $bp:expr, $c:expr, $ldc:expr, $acc:expr, $mr:expr, $nr:expr)) => {
            match ($mr > MR, $nr > NR) {
                (true, true) => $tile::<2, 2>($kc, $ap, $bp, $c, $ldc, $acc, $mr, $nr),
                (true, false) => $tile::<2, 1>($kc, $ap, $bp, $c, $ldc, $acc, $mr, $nr),
                (false, true) => $tile::<1, 2>($kc, $ap, $bp, $c, $ldc, $acc, $mr, $nr),
                (false, false) => $tile::<1, 1>($kc, $ap, $bp, $c, $ldc, $acc, $mr, $nr),
            }
        };
    }

    /// AVX-512: up to 12x32 (two A panels by two B panels): 24 zmm accumulators, 2 B loads and
    /// 12 broadcasts per depth step; the same multiply-add chain per element as the 6x16 kernel.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn kernel_12x32(
        kc: usize,
        ap: *const f32,
        bp: *const f32,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
        mr: usize,
        nr: usize,
    ) {
        by_panels!(tile_512(kc, ap, bp, c, ldc, accumulate, mr, nr))
    }

    /// `AP` A panels by `BP` B panels; edges stored through lane masks.
    #[inline]
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile_512<const AP: usize, const BP: usize>(
        kc: usize,
        ap: *const f32,
        bp: *const f32,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
        mr: usize,
        nr: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; 2 * MR];
        let (a0, a1) = (ap, ap.add(kc * MR * (AP - 1)));
        let (b0p, b1p) = (bp, bp.add(kc * NR * (BP - 1)));
        for p in 0..kc {
            let b0 = _mm512_loadu_ps(b0p.add(p * NR));
            let b1 = _mm512_loadu_ps(b1p.add(p * NR));
            for (r, acc_r) in acc.iter_mut().enumerate().take(MR * AP) {
                let a = if r < MR { *a0.add(p * MR + r) } else { *a1.add(p * MR + r - MR) };
                let a = _mm512_set1_ps(a);
                acc_r[0] = _mm512_fmadd_ps(a, b0, acc_r[0]);
                if BP == 2 {
                    acc_r[1] = _mm512_fmadd_ps(a, b1, acc_r[1]);
                }
            }
        }
        store_512::<AP, BP>(&acc, c, ldc, accumulate, mr, nr);
    }

    /// Writes (or adds) the first `mr x nr` values of a 12x32 accumulator tile to C, masking
    /// the columns past `nr`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn store_512<const AP: usize, const BP: usize>(
        acc: &[[__m512; 2]; 2 * MR],
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
        mr: usize,
        nr: usize,
    ) {
        for (r, acc_r) in acc.iter().enumerate().take(MR * AP) {
            if r >= mr {
                break;
            }
            for (h, v) in acc_r.iter().enumerate().take(BP) {
                let cols = nr.saturating_sub(h * NR).min(NR);
                if cols == 0 {
                    break;
                }
                let mask: __mmask16 = if cols == NR { 0xffff } else { (1u16 << cols) - 1 };
                let out = c.add(r * ldc + h * NR);
                let v = if accumulate { _mm512_add_ps(_mm512_maskz_loadu_ps(mask, out), *v) } else { *v };
                _mm512_mask_storeu_ps(out, mask, v);
            }
        }
    }

    /// AVX512-BF16: up to 12x32 over bf16 pair panels (`ap`, `bp` point at `u32` pairs, panels
    /// `ceil(kc / 2) * MR` / `* NR` apart): each `vdpbf16ps` adds two depths' products.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn kernel_bf16_12x32(
        kc: usize,
        ap: *const f32,
        bp: *const f32,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
        mr: usize,
        nr: usize,
    ) {
        let (ap, bp) = (ap.cast::<u32>(), bp.cast::<u32>());
        by_panels!(tile_bf16(kc, ap, bp, c, ldc, accumulate, mr, nr))
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile_bf16<const AP: usize, const BP: usize>(
        kc: usize,
        ap: *const u32,
        bp: *const u32,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
        mr: usize,
        nr: usize,
    ) {
        let kc2 = kc.div_ceil(2);
        let mut acc = [[_mm512_setzero_ps(); 2]; 2 * MR];
        let (a0, a1) = (ap, ap.add(kc2 * MR * (AP - 1)));
        let (b0p, b1p) = (bp, bp.add(kc2 * NR * (BP - 1)));
        for q in 0..kc2 {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b0p.add(q * NR).cast()));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b1p.add(q * NR).cast()));
            for (r, acc_r) in acc.iter_mut().enumerate().take(MR * AP) {
                let a = if r < MR { *a0.add(q * MR + r) } else { *a1.add(q * MR + r - MR) };
                let a: __m512bh = std::mem::transmute(_mm512_set1_epi32(a as i32));
                acc_r[0] = _mm512_dpbf16_ps(acc_r[0], a, b0);
                if BP == 2 {
                    acc_r[1] = _mm512_dpbf16_ps(acc_r[1], a, b1);
                }
            }
        }
        store_512::<AP, BP>(&acc, c, ldc, accumulate, mr, nr);
    }

    /// 6x16 tile: 12 ymm accumulators, 2 B loads and 1 broadcast per row per depth step.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn kernel_6x16(
        kc: usize,
        mut ap: *const f32,
        mut bp: *const f32,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
        mr: usize,
        nr: usize,
    ) {
        let mut c00 = _mm256_setzero_ps();
        let mut c01 = _mm256_setzero_ps();
        let mut c10 = _mm256_setzero_ps();
        let mut c11 = _mm256_setzero_ps();
        let mut c20 = _mm256_setzero_ps();
        let mut c21 = _mm256_setzero_ps();
        let mut c30 = _mm256_setzero_ps();
        let mut c31 = _mm256_setzero_ps();
        let mut c40 = _mm256_setzero_ps();
        let mut c41 = _mm256_setzero_ps();
        let mut c50 = _mm256_setzero_ps();
        let mut c51 = _mm256_setzero_ps();
        macro_rules! step {
            () => {{
                let b0 = _mm256_loadu_ps(bp);
                let b1 = _mm256_loadu_ps(bp.add(8));
                let a = _mm256_broadcast_ss(&*ap);
                c00 = _mm256_fmadd_ps(a, b0, c00);
                c01 = _mm256_fmadd_ps(a, b1, c01);
                let a = _mm256_broadcast_ss(&*ap.add(1));
                c10 = _mm256_fmadd_ps(a, b0, c10);
                c11 = _mm256_fmadd_ps(a, b1, c11);
                let a = _mm256_broadcast_ss(&*ap.add(2));
                c20 = _mm256_fmadd_ps(a, b0, c20);
                c21 = _mm256_fmadd_ps(a, b1, c21);
                let a = _mm256_broadcast_ss(&*ap.add(3));
                c30 = _mm256_fmadd_ps(a, b0, c30);
                c31 = _mm256_fmadd_ps(a, b1, c31);
                let a = _mm256_broadcast_ss(&*ap.add(4));
                c40 = _mm256_fmadd_ps(a, b0, c40);
                c41 = _mm256_fmadd_ps(a, b1, c41);
                let a = _mm256_broadcast_ss(&*ap.add(5));
                c50 = _mm256_fmadd_ps(a, b0, c50);
                c51 = _mm256_fmadd_ps(a, b1, c51);
                ap = ap.add(MR);
                bp = bp.add(NR);
            }};
        }
        let mut p = 0;
        while p + 4 <= kc {
            step!();
            step!();
            step!();
            step!();
            p += 4;
        }
        while p < kc {
            step!();
            p += 1;
        }
        let rows = [[c00, c01], [c10, c11], [c20, c21], [c30, c31], [c40, c41], [c50, c51]];
        if mr == MR && nr == NR {
            for (r, [lo, hi]) in rows.iter().enumerate() {
                let out = c.add(r * ldc);
                if accumulate {
                    _mm256_storeu_ps(out, _mm256_add_ps(_mm256_loadu_ps(out), *lo));
                    _mm256_storeu_ps(out.add(8), _mm256_add_ps(_mm256_loadu_ps(out.add(8)), *hi));
                } else {
                    _mm256_storeu_ps(out, *lo);
                    _mm256_storeu_ps(out.add(8), *hi);
                }
            }
        } else {
            let mut acc = [[0f32; NR]; MR];
            for (r, [lo, hi]) in rows.iter().enumerate() {
                _mm256_storeu_ps(acc[r].as_mut_ptr(), *lo);
                _mm256_storeu_ps(acc[r].as_mut_ptr().add(8), *hi);
            }
            store_tile(&acc, c, ldc, accumulate, mr, nr);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Uniform values in [-0.5, 0.5) from a seeded linear congruential generator.
    fn uniform(mut seed: u32) -> impl FnMut() -> f32 {
        move || {
            seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
            (seed >> 8) as f32 / (1 << 24) as f32 - 0.5
        }
    }

    fn naive(m: usize, n: usize, k: usize, a: &Strided, b: &Strided) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for p in 0..k {
                    s += a.at(i, p) as f64 * b.at(p, j) as f64;
                }
                c[i * n + j] = s as f32;
            }
        }
        c
    }

    /// Half-precision operands (weights kept in f16 / bf16) in every layout: the packed panels
    /// equal the f32 packers' on the widened values exactly, and products match an f64
    /// reference computed from the half values.
    #[test]
    fn half_precision_packers_widen_exactly() {
        fn check<T: Elem>(from: fn(f32) -> T, name: &str) {
            let mut rnd = uniform(5);
            // k = 600: depth blocks of 300 (> WIDEN), so the widening buffers wrap.
            for &(m, n, k) in &[(1, 1, 1), (7, 17, 3), (13, 40, 300), (77, 33, 600), (6, 16, 256), (100, 1030, 20)] {
                let ah: Vec<T> = (0..m * k).map(|_| from(rnd())).collect();
                let bh: Vec<T> = (0..k * n).map(|_| from(rnd())).collect();
                let aw: Vec<f32> = ah.iter().map(|v| v.to_f32()).collect();
                let bw: Vec<f32> = bh.iter().map(|v| v.to_f32()).collect();
                for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                    let (ars, acs) = if ta { (1, m) } else { (k, 1) };
                    let (brs, bcs) = if tb { (1, k) } else { (n, 1) };
                    let a = Strided { data: &ah[..], row_stride: ars, col_stride: acs };
                    let b = Strided { data: &bh[..], row_stride: brs, col_stride: bcs };
                    let af = Strided { data: &aw[..], row_stride: ars, col_stride: acs };
                    let bf = Strided { data: &bw[..], row_stride: brs, col_stride: bcs };
                    // Packers, on an interior block and on the whole matrix.
                    for (i0, mc, p0, kc) in [(0, m, 0, k), (m / 3, m - m / 3, k / 4, k - k / 4)] {
                        let len = mc.div_ceil(MR) * MR * kc;
                        let (mut x, mut y) = (vec![f32::NAN; len], vec![f32::NAN; len]);
                        a.pack_a(i0, mc, p0, kc, &mut x);
                        af.pack_a(i0, mc, p0, kc, &mut y);
                        assert!(
                            x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()),
                            "{name} pack_a {m}x{k} {ta}"
                        );
                    }
                    for (p0, kc, j0, nc) in [(0, k, 0, n), (k / 4, k - k / 4, n / 3, n - n / 3)] {
                        let len = nc.div_ceil(NR) * NR * kc;
                        let (mut x, mut y) = (vec![f32::NAN; len], vec![f32::NAN; len]);
                        b.pack_b(p0, kc, j0, nc, &mut x);
                        bf.pack_b(p0, kc, j0, nc, &mut y);
                        assert!(
                            x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()),
                            "{name} pack_b {k}x{n} {tb}"
                        );
                    }
                    // Products against f64 on the half values (both operands half, or one).
                    let want = naive(m, n, k, &af, &bf);
                    let mut c = vec![0f32; m * n];
                    gemm(Arith::F32, m, n, k, &a, &b, &mut c, n, false);
                    let mut c2 = vec![0f32; m * n];
                    gemm(Arith::F32, m, n, k, &af, &b, &mut c2, n, false);
                    for ((x, y), w) in c.iter().zip(&c2).zip(&want) {
                        assert!(
                            (x - w).abs() < 1e-4 && (y - w).abs() < 1e-4,
                            "{name} {m}x{n}x{k} {ta} {tb}: {x} {y} vs {w}"
                        );
                    }
                }
            }
        }
        check(half::f16::from_f32, "f16");
        check(half::bf16::from_f32, "bf16");
    }

    /// Every micro-kernel the CPU has computes the same products: the vector paths bit for bit
    /// alike (the same multiply-add chain per element), edges through a strided C that keeps
    /// the values between its rows, and all within 1e-4 of f64. Paths the CPU lacks are named.
    #[test]
    fn every_cpu_path_gives_the_same_products() {
        use crate::kernels::CpuPath;
        let mut rnd = uniform(9);
        for path in CpuPath::ALL.into_iter().filter(|p| !p.supported()) {
            println!("skipped: CPU path {} (this CPU lacks it)", path.name());
        }
        let paths: Vec<CpuPath> = CpuPath::ALL.into_iter().filter(|p| p.supported()).collect();
        for &(m, n, k) in
            &[(1, 1, 1), (5, 7, 3), (12, 32, 64), (13, 33, 300), (25, 70, 513), (150, 1100, 40), (600, 96, 90)]
        {
            let av: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
            let bv: Vec<f32> = (0..k * n).map(|_| rnd()).collect();
            let a = Strided { data: &av[..], row_stride: k, col_stride: 1 };
            let b = Strided { data: &bv[..], row_stride: 1, col_stride: k };
            let want = naive(m, n, k, &a, &b);
            let ldc = n + 5;
            let start: Vec<f32> = (0..m * ldc).map(|_| rnd()).collect();
            let mut vector_result: Option<Vec<f32>> = None;
            for &path in &paths {
                for accumulate in [false, true] {
                    let mut c = start.clone();
                    gemm_on(MicroKernel::for_path(path, Arith::F32), m, n, k, &a, &b, &mut c, ldc, accumulate);
                    for i in 0..m {
                        for j in 0..ldc {
                            let (got, old) = (c[i * ldc + j], start[i * ldc + j]);
                            if j >= n {
                                assert_eq!(got.to_bits(), old.to_bits(), "{} wrote past the row", path.name());
                                continue;
                            }
                            let w = want[i * n + j] + if accumulate { old } else { 0.0 };
                            assert!((got - w).abs() < 1e-4, "{} {m}x{n}x{k}: {got} vs {w}", path.name());
                        }
                    }
                    if path != CpuPath::Portable && !accumulate {
                        match &vector_result {
                            None => vector_result = Some(c),
                            Some(r) => assert!(
                                r.iter().zip(&c).all(|(x, y)| x.to_bits() == y.to_bits()),
                                "{} differs from the other vector paths ({m}x{n}x{k})",
                                path.name()
                            ),
                        }
                    }
                }
            }
        }
    }

    /// f32 -> bf16 rounds to nearest even as `half` (PyTorch's rule) for every f32 class.
    #[test]
    fn bf16_rounding_is_round_to_nearest_even() {
        let mut seed = 11u32;
        let specials = [
            0.0f32,
            -0.0,
            1.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MIN_POSITIVE,
            1e-40,
            f32::MAX,
            1.003_906_3,
            1.011_718_8,
        ];
        let randoms = (0..200_000).map(|_| {
            seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
            f32::from_bits(seed)
        });
        for x in specials.into_iter().chain(randoms) {
            let want = half::bf16::from_f32(x);
            let got = half::bf16::from_bits(bf16_bits(x) as u16);
            assert!(got.to_bits() == want.to_bits() || (x.is_nan() && got.is_nan()), "{x:e}: {got} vs {want}");
        }
    }

    /// bf16 products: every layout and edge equals f64 on the bf16-rounded operands (products of
    /// bf16 values are exact in f32, so only the f32 sums differ), and differs from the f32
    /// product (the operands really were rounded).
    #[test]
    fn bf16_products_match_f64_on_rounded_operands() {
        use crate::kernels::CpuPath;
        for path in [CpuPath::Avx512Bf16, CpuPath::AmxBf16] {
            if !path.supported() {
                println!("skipped: CPU path {} (this CPU lacks it)", path.name());
                continue;
            }
            if CpuPath::current() < path {
                println!("skipped: CPU path {} (LCM_CPU_PATH={})", path.name(), CpuPath::current().name());
                continue;
            }
            bf16_products_on(path);
        }
    }

    fn bf16_products_on(path: crate::kernels::CpuPath) {
        let tile = MicroKernel::for_path(path, Arith::Bf16);
        let name = path.name();
        let mut rnd = uniform(13);
        let round = |v: &[f32]| -> Vec<f32> { v.iter().map(|x| f32::from_bits(bf16_bits(*x) << 16)).collect() };
        // (30, 2000, 301): column chunks sharing A packed once (odd depth); (700, 96, 90): row
        // chunks sharing B packed once; (64, 64, 512) and (200, 96, 640): whole 32x32 tiles and
        // depths of whole 16-pair steps; the rest edges of every kind.
        for &(m, n, k) in &[
            (1, 1, 1),
            (5, 7, 3),
            (12, 32, 64),
            (13, 33, 301),
            (25, 70, 513),
            (64, 64, 512),
            (200, 96, 640),
            (150, 1100, 40),
            (30, 2000, 301),
            (700, 96, 90),
        ] {
            let av: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
            let bv: Vec<f32> = (0..k * n).map(|_| rnd()).collect();
            let (ar, br) = (round(&av), round(&bv));
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let (ars, acs) = if ta { (1, m) } else { (k, 1) };
                let (brs, bcs) = if tb { (1, k) } else { (n, 1) };
                let a = Strided { data: &av[..], row_stride: ars, col_stride: acs };
                let b = Strided { data: &bv[..], row_stride: brs, col_stride: bcs };
                let want = naive(
                    m,
                    n,
                    k,
                    &Strided { data: &ar[..], row_stride: ars, col_stride: acs },
                    &Strided { data: &br[..], row_stride: brs, col_stride: bcs },
                );
                let ldc = n + 3;
                let start: Vec<f32> = (0..m * ldc).map(|_| rnd()).collect();
                let mut c = start.clone();
                gemm_on(tile, m, n, k, &a, &b, &mut c, ldc, true);
                let mut f = vec![0f32; m * n];
                gemm(Arith::F32, m, n, k, &a, &b, &mut f, n, false);
                let mut differs = false;
                for i in 0..m {
                    for j in 0..ldc {
                        let (got, old) = (c[i * ldc + j], start[i * ldc + j]);
                        if j >= n {
                            assert_eq!(got.to_bits(), old.to_bits(), "{name}: wrote past the row");
                            continue;
                        }
                        let w = want[i * n + j] + old;
                        assert!((got - w).abs() < 1e-4, "{name} {m}x{n}x{k} {ta} {tb}: {got} vs {w}");
                        differs |= (got - old - f[i * n + j]).abs() > 1e-6;
                    }
                }
                assert!(differs || k == 1 && m * n < 4, "{name} {m}x{n}x{k}: equal to the f32 product");
            }
            // Operands packed once (attention, Winograd, shared A) give the same as packing per call.
            let b = Strided { data: &bv[..], row_stride: n, col_stride: 1 };
            let a = Strided { data: &av[..], row_stride: k, col_stride: 1 };
            let packed = PackedB::new(k, n, &b, Arith::Bf16);
            let packed_a = PackedA::new(m, k, &a, Arith::Bf16);
            let (mut x, mut y, mut z) = (vec![0f32; m * n], vec![0f32; m * n], vec![0f32; m * n]);
            unsafe {
                gemm_serial(tile, m, n, k, 0, 0, &a, &packed, x.as_mut_ptr(), n, false);
                gemm_serial(tile, m, n, k, 0, 0, &a, &b, y.as_mut_ptr(), n, false);
                gemm_serial(tile, m, n, k, 0, 0, &packed_a, &b, z.as_mut_ptr(), n, false);
            }
            assert!(x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()), "{name}: PackedB {m}x{n}x{k}");
            assert!(z.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()), "{name}: PackedA {m}x{n}x{k}");
            // A left operand stored as AMX tiles: the same values unpacked, the same products.
            let tiled = TiledA::new(&av, m, k);
            let ar = round(&av);
            let rounded = Strided { data: &ar[..], row_stride: k, col_stride: 1 };
            let (mut p1, mut p2) = (vec![0f32; 6 * k], vec![0f32; 6 * k]);
            for i0 in (0..m).step_by(6) {
                let mc = 6.min(m - i0);
                tiled.pack_a(i0, mc, 0, k, &mut p1);
                rounded.pack_a(i0, mc, 0, k, &mut p2);
                assert!(p1 == p2, "{name}: TiledA unpacks rows {i0}.. of {m}x{k}");
            }
            let mut t = vec![0f32; m * n];
            unsafe { gemm_serial(tile, m, n, k, 0, 0, &tiled, &b, t.as_mut_ptr(), n, false) };
            assert!(t.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()), "{name}: TiledA {m}x{n}x{k}");
        }
    }

    #[test]
    fn matches_naive_on_odd_shapes_and_strides() {
        let mut rnd = uniform(1);
        for &(m, n, k) in &[(1, 1, 1), (7, 17, 3), (13, 40, 300), (77, 33, 513), (6, 16, 256), (100, 1030, 20)] {
            let av: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
            let bv: Vec<f32> = (0..k * n).map(|_| rnd()).collect();
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let a = if ta {
                    Strided { data: &av, row_stride: 1, col_stride: m }
                } else {
                    Strided { data: &av, row_stride: k, col_stride: 1 }
                };
                let b = if tb {
                    Strided { data: &bv, row_stride: 1, col_stride: k }
                } else {
                    Strided { data: &bv, row_stride: n, col_stride: 1 }
                };
                let want = naive(m, n, k, &a, &b);
                let mut c = vec![1f32; m * n];
                gemm(Arith::F32, m, n, k, &a, &b, &mut c, n, true);
                for (x, y) in c.iter().zip(&want) {
                    assert!((x - 1.0 - y).abs() < 1e-4, "{m}x{n}x{k} {ta} {tb}: {x} vs {y}");
                }
                gemm(Arith::F32, m, n, k, &a, &b, &mut c, n, false);
                for (x, y) in c.iter().zip(&want) {
                    assert!((x - y).abs() < 1e-4);
                }
            }
        }
    }
}
