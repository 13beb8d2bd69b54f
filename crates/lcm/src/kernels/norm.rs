//! Group normalization (PyTorch `nn.GroupNorm`) in two passes over each group (mean, then
//! variance of the centred values, as PyTorch does) and one write, with the SiLU that usually
//! follows fused into the write.

use super::{silu_inplace, SendPtr};
use rayon::prelude::*;

/// `x` is `[batch, channels, spatial...]` flattened; `spatial` = product of the trailing dims.
#[allow(clippy::too_many_arguments)]
pub fn group_norm(
    x: &[f32],
    batch: usize,
    channels: usize,
    spatial: usize,
    groups: usize,
    weight: &[f32],
    bias: &[f32],
    eps: f32,
    silu: bool,
) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    let per_group = channels / groups;
    let n = per_group * spatial;
    let yp = SendPtr(y.as_mut_ptr());
    (0..batch * groups).into_par_iter().for_each(|bg| {
        let g = bg % groups;
        let xs = &x[bg * n..(bg + 1) * n];
        let mean = (sum(xs) / n as f64) as f32;
        let var = (sum_sq_dev(xs, mean) / n as f64) as f32;
        let rstd = 1.0 / (var + eps).sqrt();
        // SAFETY: each (batch, group) task writes its own contiguous range.
        let ys = unsafe { std::slice::from_raw_parts_mut(yp.get().add(bg * n), n) };
        for (c, (xr, yr)) in xs.chunks_exact(spatial).zip(ys.chunks_exact_mut(spatial)).enumerate() {
            let ch = g * per_group + c;
            let (scale, shift) = (rstd * weight[ch], bias[ch] - mean * rstd * weight[ch]);
            for (o, &v) in yr.iter_mut().zip(xr) {
                *o = v * scale + shift;
            }
            if silu {
                silu_inplace(yr);
            }
        }
    });
    y
}

/// `Σ (x - mean)²`.
fn sum_sq_dev(x: &[f32], mean: f32) -> f64 {
    blocked_sum(x, |v| (v - mean) * (v - mean))
}

fn sum(x: &[f32]) -> f64 {
    blocked_sum(x, |v| v)
}

/// `Σ f(x)`: eight f32 lanes within blocks of 1024 (vectorised), f64 across blocks.
#[inline(always)]
fn blocked_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    x.chunks(1024)
        .map(|c| {
            let mut lanes = [0f32; 8];
            let mut it = c.chunks_exact(8);
            for v in &mut it {
                for i in 0..8 {
                    lanes[i] += f(v[i]);
                }
            }
            lanes.iter().map(|&l| l as f64).sum::<f64>() + it.remainder().iter().map(|&l| f(l) as f64).sum::<f64>()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    #[test]
    fn matches_naive() {
        let (b, c, s, g) = (2, 6, 13, 3);
        let x: Vec<f32> = (0..b * c * s).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
        let w: Vec<f32> = (0..c).map(|i| 0.5 + i as f32 * 0.1).collect();
        let bias: Vec<f32> = (0..c).map(|i| i as f32 * -0.2).collect();
        for silu in [false, true] {
            let y = super::group_norm(&x, b, c, s, g, &w, &bias, 1e-5, silu);
            let n = c / g * s;
            for bg in 0..b * g {
                let xs = &x[bg * n..(bg + 1) * n];
                let m = xs.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
                let v = xs.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / n as f64;
                for i in 0..n {
                    let ch = (bg % g) * (c / g) + i / s;
                    let mut want = (xs[i] as f64 - m) / (v + 1e-5).sqrt() * w[ch] as f64 + bias[ch] as f64;
                    if silu {
                        want /= 1.0 + (-want).exp();
                    }
                    assert!((y[bg * n + i] as f64 - want).abs() < 1e-5, "{} vs {want}", y[bg * n + i]);
                }
            }
        }
    }
}
