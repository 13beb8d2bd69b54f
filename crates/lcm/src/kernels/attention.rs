//! Scaled dot-product attention without the full score matrix: each task takes one head and a
//! block of queries, computes that block's scores against all keys (one GEMM), turns them into
//! unnormalised probabilities in place, multiplies by the values (a second GEMM) and divides
//! each row by its sum. Keys and values are packed once per head and shared by all blocks.

use super::gemm::{gemm_single_thread, Arith, PackedB, Strided};
use super::{exp_sub_inplace, SendPtr};
use rayon::prelude::*;

/// Most queries per task: the score block (`QUERY_BLOCK x keys`) stays in L2 for 4096 keys.
const QUERY_BLOCK: usize = 64;

/// Queries per task: a multiple of the micro-kernel's rows (6 for the f32 and `vdpbf16ps`
/// kernels, 32 for AMX tiles, whose edge blocks waste the rows they lack).
fn query_block(arith: Arith) -> usize {
    if arith == Arith::Bf16 && super::CpuPath::current() >= super::CpuPath::AmxBf16 {
        64
    } else {
        48
    }
}

/// `q [heads, lq, d]`, `k [heads, lk, d]`, `v [heads, lk, dv]` (row-major, `heads` = batch x
/// heads); returns `[heads, lq, dv]`. `causal`: query `i` sees keys `0..=i` only.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    heads: usize,
    lq: usize,
    lk: usize,
    d: usize,
    dv: usize,
    scale: f32,
    causal: bool,
    arith: Arith,
) -> Vec<f32> {
    let mut out = vec![0f32; heads * lq * dv];
    if lk == 0 || lq == 0 || heads == 0 {
        return out;
    }
    #[cfg(target_arch = "x86_64")]
    if tiles::applies(arith, lq, lk) {
        tiles::attention(q, k, v, heads, lq, lk, d, dv, scale, causal, &mut out);
        return out;
    }
    gemm_path(q, k, v, heads, lq, lk, d, dv, scale, causal, arith, &mut out);
    out
}

/// Any CPU path: the score block by the GEMM driver, laid out by its packers.
#[allow(clippy::too_many_arguments)]
fn gemm_path(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    heads: usize,
    lq: usize,
    lk: usize,
    d: usize,
    dv: usize,
    scale: f32,
    causal: bool,
    arith: Arith,
    out: &mut [f32],
) {
    // Kᵀ ([d, lk]) and V ([lk, dv]) of every head, packed once.
    let packed: Vec<(PackedB, PackedB)> = (0..heads)
        .into_par_iter()
        .map(|h| {
            let kh = &k[h * lk * d..(h + 1) * lk * d];
            let vh = &v[h * lk * dv..(h + 1) * lk * dv];
            (
                PackedB::new(d, lk, &Strided { data: kh, row_stride: 1, col_stride: d }, arith),
                PackedB::new(lk, dv, &Strided { data: vh, row_stride: dv, col_stride: 1 }, arith),
            )
        })
        .collect();
    let block = query_block(arith);
    let blocks = lq.div_ceil(block);
    let outp = SendPtr(out.as_mut_ptr());
    (0..heads * blocks).into_par_iter().for_each(|task| {
        let (h, b) = (task / blocks, task % blocks);
        let q0 = b * block;
        let rows = block.min(lq - q0);
        let (kt, vp) = &packed[h];
        SCORES.with(|scores| {
            let mut scores = scores.borrow_mut();
            scores.resize(rows * lk, 0.0);
            let qb = Strided { data: &q[(h * lq + q0) * d..(h * lq + q0 + rows) * d], row_stride: d, col_stride: 1 };
            gemm_single_thread(arith, rows, lk, d, &qb, kt, &mut scores, lk, false);
            let mut sums = [0f32; QUERY_BLOCK];
            for (r, row) in scores.chunks_exact_mut(lk).enumerate() {
                let visible = if causal { (q0 + r + 1).min(lk) } else { lk };
                let (seen, masked) = row.split_at_mut(visible);
                let max = super::max(seen);
                // exp(scale * (s - max)): softmax of the scaled scores, unnormalised.
                sums[r] = exp_sub_inplace(seen, max, scale);
                masked.fill(0.0);
            }
            // SAFETY: task (h, b) alone writes rows q0..q0+rows of head h.
            let o = unsafe { std::slice::from_raw_parts_mut(outp.get().add((h * lq + q0) * dv), rows * dv) };
            let pb = Strided { data: &scores, row_stride: lk, col_stride: 1 };
            gemm_single_thread(arith, rows, dv, lk, &pb, vp, o, dv, false);
            for (row, s) in o.chunks_exact_mut(dv).zip(&sums) {
                let inv = 1.0 / s;
                row.iter_mut().for_each(|x| *x *= inv);
            }
        });
    });
}

/// bf16 products on AMX tiles, each task 32 queries of one head: `Q·Kᵀ` and `P·V` by the
/// 32x32 tile kernel, with every operand laid out once as tiles (K and V per head; Q and the
/// probabilities per task, rounded straight into tiles) — the GEMM path would pad the depth of
/// `Q·Kᵀ` and the width of `P·V` to 32 and lay the probabilities out in four passes.
#[cfg(target_arch = "x86_64")]
mod tiles {
    use super::super::amx::{configure_tiles, release_tiles, tile_32x32};
    use super::super::gemm::{bf16_bits, round_pairs, Arith, TILE as T};
    use super::super::{CpuPath, SendPtr};
    use rayon::prelude::*;

    /// Queries per task: the rows of one tile-kernel call.
    const ROWS: usize = 2 * T;
    /// `u32` pairs per tile (16 rows of 16).
    const TT: usize = T * T;

    /// bf16 products on `amx-bf16`, with enough queries and keys to fill tiles (AnimateDiff's
    /// attention across 16 frames stays on the GEMM path, which pads less).
    pub(super) fn applies(arith: Arith, lq: usize, lk: usize) -> bool {
        arith == Arith::Bf16 && CpuPath::current() >= CpuPath::AmxBf16 && lq >= ROWS && lk >= 2 * ROWS
    }

    thread_local! {
        /// Q as tiles, the f32 scores, the probabilities as tiles.
        #[allow(clippy::type_complexity)]
        static BUFS: std::cell::RefCell<(Vec<u32>, Vec<f32>, Vec<u32>)> =
            const { std::cell::RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
    }

    /// `exp(scale * (x - max))` of a row's first `visible` scores (zero past them) rounded to
    /// bf16 straight into P's tile rows (one per 32 keys, a tile apart); returns their f32 sum.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn exp_rounded(row: &[f32], visible: usize, scale: f32, dst: &mut [u32]) -> f32 {
        use super::super::x86::{exp16, lanes16, max16};
        use std::arch::x86_64::*;
        let max = max16(&row[..visible]);
        let (s, b) = (_mm512_set1_ps(scale), _mm512_set1_ps(-max * scale));
        let mut acc = _mm512_setzero_ps();
        for (t, vals) in row.chunks_exact(2 * T).enumerate() {
            let base = t * 2 * T;
            let (k0, k1) = (lanes16(visible.saturating_sub(base)), lanes16(visible.saturating_sub(base + T)));
            let lo = _mm512_maskz_mov_ps(k0, exp16(_mm512_fmadd_ps(_mm512_loadu_ps(vals.as_ptr()), s, b)));
            let hi = _mm512_maskz_mov_ps(k1, exp16(_mm512_fmadd_ps(_mm512_loadu_ps(vals.as_ptr().add(T)), s, b)));
            acc = _mm512_add_ps(acc, _mm512_add_ps(lo, hi));
            // Values 2q and 2q+1 in pair q: the row's order, lower half from `lo`.
            let pairs = _mm512_cvtne2ps_pbh(hi, lo);
            _mm512_storeu_si512(
                dst[t * TT..][..T].as_mut_ptr().cast(),
                std::mem::transmute::<__m512bh, __m512i>(pairs),
            );
        }
        _mm512_reduce_add_ps(acc)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        heads: usize,
        lq: usize,
        lk: usize,
        d: usize,
        dv: usize,
        scale: f32,
        causal: bool,
        out: &mut [f32],
    ) {
        // Depth steps of Q·Kᵀ (32 values each), keys padded to whole steps of P·V (32 keys), the
        // key tiles (16 keys: the columns of Q·Kᵀ) and the column tiles of P·V.
        let dq = d.div_ceil(2 * T);
        let keys = lk.div_ceil(2 * T) * 2 * T;
        let nch = keys / (2 * T);
        let ktiles = keys / T;
        let vtiles = dv.div_ceil(T);
        // Per head: Kᵀ as B tiles `[key tile][depth step]`, V as B tiles `[column tile][key step]`
        // (each tile 16 pair rows of 16 columns), zero past the keys and the depth.
        let kv: Vec<(Vec<u32>, Vec<u32>)> = (0..heads)
            .into_par_iter()
            .map(|h| {
                let (kh, vh) = (&k[h * lk * d..][..lk * d], &v[h * lk * dv..][..lk * dv]);
                let mut kt = vec![0u32; ktiles * dq * TT];
                for (key, row) in kh.chunks_exact(d).enumerate() {
                    let (j, n) = (key / T, key % T);
                    for (p, pair) in row.chunks(2).enumerate() {
                        let hi = pair.get(1).map_or(0, |&x| bf16_bits(x));
                        kt[(j * dq + p / T) * TT + (p % T) * T + n] = bf16_bits(pair[0]) | (hi << 16);
                    }
                }
                let mut vt = vec![0u32; vtiles * nch * TT];
                for (key, row) in vh.chunks_exact(dv).enumerate() {
                    let (t, p, shift) = (key / (2 * T), (key % (2 * T)) / 2, 16 * (key % 2));
                    for (c, &x) in row.iter().enumerate() {
                        vt[((c / T) * nch + t) * TT + p * T + c % T] |= bf16_bits(x) << shift;
                    }
                }
                (kt, vt)
            })
            .collect();
        let blocks = lq.div_ceil(ROWS);
        let outp = SendPtr(out.as_mut_ptr());
        (0..heads * blocks).into_par_iter().for_each(|task| {
            let (h, b) = (task / blocks, task % blocks);
            let q0 = b * ROWS;
            let rows = ROWS.min(lq - q0);
            let (kt, vt) = &kv[h];
            BUFS.with(|bufs| {
                let (ref mut qa, ref mut s, ref mut pa) = *bufs.borrow_mut();
                // Q's rows as A tiles `[row tile][depth step]`, zero past the rows and the depth.
                qa.clear();
                qa.resize(2 * dq * TT, 0);
                for r in 0..rows {
                    let row = &q[(h * lq + q0 + r) * d..][..d];
                    for (c, vals) in row.chunks(2 * T).enumerate() {
                        round_pairs(vals, &mut qa[((r / T) * dq + c) * TT + (r % T) * T..][..vals.len().div_ceil(2)]);
                    }
                }
                s.resize(ROWS * keys, 0.0);
                pa.resize(2 * nch * TT, 0);
                // SAFETY: `applies` checked AMX; the tiles hold `dq` / `nch` steps each, C's
                // blocks lie inside `s` (32 x keys) and inside this task's rows of `out`.
                unsafe {
                    configure_tiles();
                    for j in (0..ktiles).step_by(2) {
                        let b0 = kt.as_ptr().add(j * dq * TT);
                        tile_32x32(
                            dq,
                            qa.as_ptr(),
                            b0,
                            b0.add(dq * TT),
                            s.as_mut_ptr().add(j * T),
                            keys,
                            false,
                            ROWS,
                            2 * T,
                        );
                    }
                }
                // exp(scale * (s - max)) per row, rounded into P's tiles `[row tile][key step]`.
                let mut sums = [0f32; ROWS];
                for (r, row) in s.chunks_exact(keys).enumerate() {
                    let visible = match r < rows {
                        true if causal => (q0 + r + 1).min(lk),
                        true => lk,
                        false => 0,
                    };
                    let dst = &mut pa[(r / T) * nch * TT + (r % T) * T..];
                    // SAFETY: AMX implies AVX512-BF16; `dst` holds the row's `nch` tile rows.
                    sums[r] = unsafe { exp_rounded(row, visible, scale, dst) };
                }
                // SAFETY: task (h, b) alone writes rows q0..q0+rows of head h.
                let o = unsafe { outp.get().add((h * lq + q0) * dv) };
                unsafe {
                    for c in (0..vtiles).step_by(2) {
                        let b0 = vt.as_ptr().add(c * nch * TT);
                        let b1 = if c + 1 < vtiles { b0.add(nch * TT) } else { b0 };
                        tile_32x32(nch, pa.as_ptr(), b0, b1, o.add(c * T), dv, false, rows, (2 * T).min(dv - c * T));
                    }
                    release_tiles();
                }
                let o = unsafe { std::slice::from_raw_parts_mut(o, rows * dv) };
                for (row, s) in o.chunks_exact_mut(dv).zip(&sums) {
                    let inv = 1.0 / s;
                    row.iter_mut().for_each(|x| *x *= inv);
                }
            });
        });
    }
}

thread_local! {
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AMX path against the GEMM path in bf16: the same rounded operands, so only the order
    /// of the f32 sums differs.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn tiles_match_gemm_path() {
        let mut seed = 7u32;
        let mut rnd = || {
            seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
            (seed >> 8) as f32 / (1 << 24) as f32 * 4.0 - 2.0
        };
        let mut ran = 0;
        for &(heads, lq, lk, d, dv, causal) in &[
            (2, 70, 130, 33, 17, false),
            (3, 96, 77, 40, 40, false),
            (1, 64, 64, 64, 64, true),
            (2, 33, 200, 80, 80, true),
            (1, 40, 96, 8, 48, false),
        ] {
            if !tiles::applies(Arith::Bf16, lq, lk) {
                continue;
            }
            ran += 1;
            let q: Vec<f32> = (0..heads * lq * d).map(|_| rnd()).collect();
            let k: Vec<f32> = (0..heads * lk * d).map(|_| rnd()).collect();
            let v: Vec<f32> = (0..heads * lk * dv).map(|_| rnd()).collect();
            let mut want = vec![0f32; heads * lq * dv];
            gemm_path(&q, &k, &v, heads, lq, lk, d, dv, 0.2, causal, Arith::Bf16, &mut want);
            let mut got = vec![f32::NAN; heads * lq * dv];
            tiles::attention(&q, &k, &v, heads, lq, lk, d, dv, 0.2, causal, &mut got);
            let num: f64 = got.iter().zip(&want).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
            let den: f64 = want.iter().map(|y| (*y as f64).powi(2)).sum();
            assert!((num / den).sqrt() < 1e-5, "{heads} {lq} {lk} {d} {dv}: rel L2 {}", (num / den).sqrt());
        }
        if ran == 0 {
            println!("skipped: AMX attention (CPU path {})", crate::kernels::CpuPath::current().name());
        }
    }

    #[test]
    fn matches_naive_softmax() {
        let mut seed = 3u32;
        let mut rnd = || {
            seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
            (seed >> 8) as f32 / (1 << 24) as f32 * 4.0 - 2.0
        };
        for &(heads, lq, lk, d, dv, causal) in
            &[(2, 5, 7, 3, 4, false), (3, 100, 77, 40, 40, false), (2, 77, 77, 64, 64, true), (1, 1, 300, 8, 17, false)]
        {
            let q: Vec<f32> = (0..heads * lq * d).map(|_| rnd()).collect();
            let k: Vec<f32> = (0..heads * lk * d).map(|_| rnd()).collect();
            let v: Vec<f32> = (0..heads * lk * dv).map(|_| rnd()).collect();
            let scale = 0.3f32;
            let got = attention(&q, &k, &v, heads, lq, lk, d, dv, scale, causal, Arith::F32);
            // bf16 products, where the CPU has them: within bf16's rounding, and rounded.
            if Arith::bf16_if(true) == Arith::Bf16 {
                let b = attention(&q, &k, &v, heads, lq, lk, d, dv, scale, causal, Arith::Bf16);
                let num: f64 = b.iter().zip(&got).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
                let den: f64 = got.iter().map(|y| (*y as f64).powi(2)).sum();
                let rel = (num / den).sqrt();
                assert!(rel < 2e-2 && rel > 1e-5, "bf16 {heads} {lq} {lk} {d}: rel L2 {rel}");
            } else {
                println!("skipped: bf16 attention (CPU path {})", crate::kernels::CpuPath::current().name());
            }
            for h in 0..heads {
                for i in 0..lq {
                    let n = if causal { i + 1 } else { lk };
                    let s: Vec<f64> = (0..n)
                        .map(|j| {
                            (0..d).map(|t| q[(h * lq + i) * d + t] as f64 * k[(h * lk + j) * d + t] as f64).sum::<f64>()
                                * scale as f64
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for c in 0..dv {
                        let want: f64 = (0..n).map(|j| e[j] / z * v[(h * lk + j) * dv + c] as f64).sum();
                        let g = got[(h * lq + i) * dv + c] as f64;
                        assert!((g - want).abs() < 1e-5, "{heads} {lq} {lk} {d}: {g} vs {want}");
                    }
                }
            }
        }
    }
}
