//! The small set of tensor operations every model goes through.
//!
//! Model code never calls candle's kernels directly for the hot paths (convolution, matmul,
//! attention, normalization): it calls these functions, so replacing a kernel with a faster one
//! later is a change to this file only.

use candle_core::{DType, Result, Tensor, D};

/// Floating-point operations of the matrix-multiply-shaped ops (linear, convolution, attention),
/// counted as 2 per multiply-add, for the benchmark's GFLOP/s. Always on: one atomic add per op.
pub mod flops {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNT: AtomicU64 = AtomicU64::new(0);

    pub(crate) fn add(n: usize) {
        COUNT.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// FLOPs counted since the last call.
    pub fn take() -> u64 {
        COUNT.swap(0, Ordering::Relaxed)
    }
}

/// `x @ weight.T + bias` over the last dimension (PyTorch `nn.Linear` semantics).
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims();
    let in_features = dims[dims.len() - 1];
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let out_features = weight.dim(0)?;
    flops::add(2 * rows * in_features * out_features);
    let y = x.reshape((rows, in_features))?.matmul(&weight.t()?)?;
    let y = match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().unwrap() = out_features;
    y.reshape(out_dims)
}

/// 2-D convolution, NCHW, PyTorch `nn.Conv2d` semantics (symmetric zero padding).
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let (_, c, _, w) = x.dims4()?;
    let y = if x.stride()[1..] == [w * c, c, 1] && weight.dim(2)? > 1 {
        // candle <= 0.9.2 CPU conv2d (huggingface/candle#3404): when C == H == W the NCHW
        // strides equal NHWC ones and the tiled kernel reads the input as NHWC. Convolving the
        // transposed image with the transposed kernel gives the transposed result and avoids it.
        x.transpose(2, 3)?.conv2d(&weight.transpose(2, 3)?, padding, stride, 1, 1)?.transpose(2, 3)?
    } else {
        x.conv2d(weight, padding, stride, 1, 1)?
    };
    let (n, co, ho, wo) = y.dims4()?;
    let (_, ci, kh, kw) = weight.dims4()?;
    flops::add(2 * n * co * ho * wo * ci * kh * kw);
    match bias {
        Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?),
        None => Ok(y),
    }
}

/// Group normalization over NC... tensors (PyTorch `nn.GroupNorm`).
pub fn group_norm(
    x: &Tensor,
    num_groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let shape = x.dims().to_vec();
    let (b, c) = (shape[0], shape[1]);
    let group_size = shape[2..].iter().product::<usize>() * c / num_groups;
    let dtype = x.dtype();
    let xg = x.reshape((b, num_groups, group_size))?.to_dtype(DType::F32)?;
    let mean = (xg.sum_keepdim(2)? / group_size as f64)?;
    let xc = xg.broadcast_sub(&mean)?;
    let var = (xc.sqr()?.sum_keepdim(2)? / group_size as f64)?;
    let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    let mut wshape = vec![1; shape.len()];
    wshape[1] = c;
    xn.to_dtype(dtype)?
        .reshape(shape)?
        .broadcast_mul(&weight.reshape(wshape.clone())?)?
        .broadcast_add(&bias.reshape(wshape)?)
}

/// Layer normalization over the last dimension (PyTorch `nn.LayerNorm`).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let n = x.dim(D::Minus1)? as f64;
    let mean = (x.sum_keepdim(D::Minus1)? / n)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = (xc.sqr()?.sum_keepdim(D::Minus1)? / n)?;
    let y = xc.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dtype)?;
    let y = y.broadcast_mul(weight)?;
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// Scaled dot-product attention: q `[b, heads, lq, d]`, k/v `[b, heads, lk, d]`.
/// `causal` masks future positions (CLIP's text encoder).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, causal: bool) -> Result<Tensor> {
    let (lq, d) = (q.dim(D::Minus2)?, q.dim(D::Minus1)?);
    let batch_heads: usize = q.dims()[..q.rank() - 2].iter().product();
    flops::add(4 * batch_heads * lq * k.dim(D::Minus2)? * d);
    let scores = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?;
    let scores = if causal {
        let (lq, lk) = (scores.dim(D::Minus2)?, scores.dim(D::Minus1)?);
        let mask: Vec<f32> = (0..lq)
            .flat_map(|i| (0..lk).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (lq, lk), scores.device())?.to_dtype(scores.dtype())?;
        scores.broadcast_add(&mask)?
    } else {
        scores
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    probs.matmul(&v.contiguous()?)
}

pub fn silu(x: &Tensor) -> Result<Tensor> {
    x.silu()
}

/// Exact (erf) GELU, PyTorch's default `F.gelu`.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    x.gelu_erf()
}

/// tanh-approximated GELU (`gelu_pytorch_tanh`, `approximate="tanh"`).
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    x.gelu()
}

/// `x * sigmoid(1.702 x)`, CLIP's "quick_gelu".
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    x * candle_nn::ops::sigmoid(&(x * 1.702)?)?
}

/// Nearest-neighbour 2x upsampling (`F.interpolate(scale_factor=2, mode="nearest")`).
pub fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    x.upsample_nearest2d(h * 2, w * 2)
}

/// Nearest-neighbour upsampling to an explicit size (`F.interpolate(size=(h, w), mode="nearest")`),
/// used when a UNet skip connection is not exactly twice the size of the upsampled input.
pub fn upsample_nearest(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    x.upsample_nearest2d(h, w)
}

/// `x.repeat(k, 1, ...)` along dim 0: the whole batch `k` times over.
pub fn tile_batch(x: &Tensor, k: usize) -> Result<Tensor> {
    if k == 1 {
        return Ok(x.clone());
    }
    Tensor::cat(&vec![x; k], 0)
}

/// `x.repeat_interleave(k, dim=0)`: each row `k` times in a row.
pub fn repeat_interleave(x: &Tensor, k: usize) -> Result<Tensor> {
    if k == 1 {
        return Ok(x.clone());
    }
    let rows: Vec<Tensor> = (0..x.dim(0)?).map(|i| x.narrow(0, i, 1)).collect::<Result<_>>()?;
    let repeated: Vec<&Tensor> = rows.iter().flat_map(|r| std::iter::repeat_n(r, k)).collect();
    Tensor::cat(&repeated, 0)
}
