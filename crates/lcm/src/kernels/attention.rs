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
                let max = seen.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
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
    out
}

thread_local! {
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[cfg(test)]
mod tests {
    use super::*;

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
