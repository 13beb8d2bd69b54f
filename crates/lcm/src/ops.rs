//! The small set of tensor operations every model goes through.
//!
//! Model code never calls candle's kernels directly for the hot paths (convolution, matmul,
//! attention, normalization): it calls these functions, so replacing a kernel with a faster one
//! later is a change to this file only.

use crate::kernels;
use crate::kernels::gemm::Strided;
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

/// Wall time spent in each kind of op, when `LCM_PROFILE` is set (for finding where a model's
/// time goes; `lcm bench` prints it). Off by default: one relaxed load per op.
pub mod profile {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    use std::time::Instant;

    /// The kinds of op timed, in report order.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum OpKind {
        Linear,
        Conv2d,
        Attention,
        GroupNorm,
        LayerNorm,
        Activation,
        Upsample,
    }

    impl OpKind {
        pub const ALL: [OpKind; 7] = [
            OpKind::Linear,
            OpKind::Conv2d,
            OpKind::Attention,
            OpKind::GroupNorm,
            OpKind::LayerNorm,
            OpKind::Activation,
            OpKind::Upsample,
        ];

        pub fn name(self) -> &'static str {
            match self {
                OpKind::Linear => "linear",
                OpKind::Conv2d => "conv2d",
                OpKind::Attention => "attention",
                OpKind::GroupNorm => "group_norm",
                OpKind::LayerNorm => "layer_norm",
                OpKind::Activation => "activation",
                OpKind::Upsample => "upsample",
            }
        }
    }

    static NANOS: [AtomicU64; 7] = [const { AtomicU64::new(0) }; 7];

    pub fn enabled() -> bool {
        static ON: OnceLock<bool> = OnceLock::new();
        *ON.get_or_init(|| std::env::var_os("LCM_PROFILE").is_some())
    }

    pub(crate) struct Timer(usize, Option<Instant>);
    impl Drop for Timer {
        fn drop(&mut self) {
            if let Some(t) = self.1 {
                NANOS[self.0].fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
            }
        }
    }
    pub(crate) fn timer(kind: OpKind) -> Timer {
        Timer(kind as usize, enabled().then(Instant::now))
    }

    /// Seconds per kind since the last call, in [`OpKind::ALL`] order.
    pub fn take() -> Vec<(&'static str, f64)> {
        OpKind::ALL.iter().zip(&NANOS).map(|(k, n)| (k.name(), n.swap(0, Ordering::Relaxed) as f64 * 1e-9)).collect()
    }
}

/// `x @ weight.T + bias` over the last dimension (PyTorch `nn.Linear` semantics).
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let _t = profile::timer(profile::OpKind::Linear);
    let dims = x.dims();
    let in_features = dims[dims.len() - 1];
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let out_features = weight.dim(0)?;
    flops::add(2 * rows * in_features * out_features);
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().unwrap() = out_features;
    if let (Some(xs), Some(ws)) = (cpu_f32(x)?, cpu_weight(weight)?) {
        let b = bias_f32(bias)?;
        let b = b.as_deref();
        let y = with_weight!(ws, w => {
            if rows <= 4 {
                // A few rows (time embeddings, pooled text): dot products against W's rows
                // beat packing W for a GEMM.
                kernels::gemv_rows(&xs, rows, in_features, &w, out_features, b)
            } else {
                // Our GEMM: y = x · Wᵀ with Wᵀ read through strides (half-precision W widened
                // as it is packed), bias written first and accumulated onto.
                let mut y = match b {
                    Some(b) => b.repeat(rows),
                    None => vec![0f32; rows * out_features],
                };
                let a = Strided { data: &xs, row_stride: in_features, col_stride: 1 };
                let wt = Strided { data: &w, row_stride: 1, col_stride: in_features };
                kernels::gemm::gemm(products(weight), rows, out_features, in_features, &a, &wt, &mut y, out_features, b.is_some());
                y
            }
        });
        return Tensor::from_vec(y, out_dims, x.device());
    }
    let y = x.reshape((rows, in_features))?.matmul(&like(weight, x)?.t()?)?;
    let y = match bias {
        Some(b) => y.broadcast_add(&like(b, x)?)?,
        None => y,
    };
    y.reshape(out_dims)
}

/// [`linear`] with 8-bit weights (CPU f32 activations).
pub fn linear_int8(x: &Tensor, weight: &kernels::int8::Int8Matrix, bias: Option<&Tensor>) -> Result<Tensor> {
    let _t = profile::timer(profile::OpKind::Linear);
    let dims = x.dims();
    let in_features = dims[dims.len() - 1];
    if in_features != weight.depth() {
        candle_core::bail!("linear: input has {in_features} features but the weight expects {}", weight.depth());
    }
    let rows: usize = dims[..dims.len() - 1].iter().product();
    flops::add(2 * rows * in_features * weight.rows());
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().unwrap() = weight.rows();
    let Some(xs) = cpu_f32(&x.to_dtype(DType::F32)?)? else { candle_core::bail!("8-bit layers run on the CPU only") };
    let b = bias_f32(bias)?;
    let y = kernels::int8::linear(&xs, rows, weight, b.as_deref());
    Tensor::from_vec(y, out_dims, x.device())?.to_dtype(x.dtype())
}

/// [`linear`] with a weight packed at load for AMX tiles (CPU f32 activations).
pub fn linear_tiled(x: &Tensor, weight: &crate::nn::TiledWeight, bias: Option<&Tensor>) -> Result<Tensor> {
    let _t = profile::timer(profile::OpKind::Linear);
    let (crate::nn::TiledOperand::Right(wt), &[out_features, in_features]) = (&weight.operand, &weight.dims[..]) else {
        candle_core::bail!("linear: a weight packed for a convolution")
    };
    let dims = x.dims();
    if dims.last() != Some(&in_features) {
        candle_core::bail!("linear: input of shape {dims:?} but the weight expects {in_features} features");
    }
    let rows: usize = dims[..dims.len() - 1].iter().product();
    flops::add(2 * rows * in_features * out_features);
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().unwrap() = out_features;
    let Some(xs) = cpu_f32(&x.to_dtype(DType::F32)?)? else {
        candle_core::bail!("packed bf16 layers run on the CPU only")
    };
    let b = bias_f32(bias)?;
    let mut y = match b.as_deref() {
        Some(b) => b.repeat(rows),
        None => vec![0f32; rows * out_features],
    };
    let a = Strided { data: &xs, row_stride: in_features, col_stride: 1 };
    let arith = kernels::gemm::Arith::Bf16;
    if out_features > kernels::gemm::NC {
        // Several blocks of columns: the activations rounded into tiles once for all of them,
        // where the driver would round its rows again for each (1024x640->5120: 970 -> 1150
        // GFLOP/s; with one block the extra pass costs more than it saves).
        let a = kernels::gemm::TiledA::new(&xs, rows, in_features);
        kernels::gemm::gemm(arith, rows, out_features, in_features, &a, wt, &mut y, out_features, b.is_some());
    } else {
        kernels::gemm::gemm(arith, rows, out_features, in_features, &a, wt, &mut y, out_features, b.is_some());
    }
    Tensor::from_vec(y, out_dims, x.device())?.to_dtype(x.dtype())
}

/// [`conv2d`] with a kernel packed at load for AMX tiles (CPU f32 activations).
pub fn conv2d_tiled(
    x: &Tensor,
    weight: &crate::nn::TiledWeight,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let _t = profile::timer(profile::OpKind::Conv2d);
    let (batch, c_in, h, w) = x.dims4()?;
    let &[c_out, w_in, kh, kw] = &weight.dims[..] else {
        candle_core::bail!("conv2d: a weight packed for a linear layer")
    };
    if c_in != w_in {
        candle_core::bail!("conv2d: input has {c_in} channels but the kernel {:?} expects {w_in}", weight.dims);
    }
    let shape = kernels::conv::ConvShape { batch, c_in, h, w, c_out, kh, kw, stride, padding };
    let (ho, wo) = shape.out_hw();
    flops::add(2 * batch * c_out * ho * wo * c_in * kh * kw);
    let Some(xs) = cpu_f32(&x.to_dtype(DType::F32)?)? else {
        candle_core::bail!("packed bf16 layers run on the CPU only")
    };
    let b = bias_f32(bias)?;
    let y = match &weight.operand {
        crate::nn::TiledOperand::Left(a) => {
            kernels::conv::conv2d_packed(&xs, a, b.as_deref(), &shape, kernels::gemm::Arith::Bf16)
        }
        #[cfg(target_arch = "x86_64")]
        crate::nn::TiledOperand::Conv3x3(t) if stride == 1 && padding == 1 => {
            kernels::amx_conv::conv3x3(&xs, t, b.as_deref(), batch, h, w)
        }
        _ => candle_core::bail!("conv2d: a weight packed for another product"),
    };
    Tensor::from_vec(y, (batch, c_out, ho, wo), x.device())?.to_dtype(x.dtype())
}

/// [`conv2d`] with 8-bit weights; `dims`: the float kernel's `[c_out, c_in, kh, kw]`.
pub fn conv2d_int8(
    x: &Tensor,
    weight: &kernels::int8::Int8Matrix,
    dims: &[usize],
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let _t = profile::timer(profile::OpKind::Conv2d);
    let (batch, c_in, h, w) = x.dims4()?;
    let &[c_out, w_in, kh, kw] = dims else { candle_core::bail!("conv2d: kernel of shape {dims:?}") };
    if c_in != w_in {
        candle_core::bail!("conv2d: input has {c_in} channels but the kernel {dims:?} expects {w_in}");
    }
    let shape = kernels::conv::ConvShape { batch, c_in, h, w, c_out, kh, kw, stride, padding };
    let (ho, wo) = shape.out_hw();
    flops::add(2 * batch * c_out * ho * wo * c_in * kh * kw);
    let Some(xs) = cpu_f32(&x.to_dtype(DType::F32)?)? else { candle_core::bail!("8-bit layers run on the CPU only") };
    let b = bias_f32(bias)?;
    let y = kernels::int8::conv2d(&xs, weight, b.as_deref(), &shape);
    Tensor::from_vec(y, (batch, c_out, ho, wo), x.device())?.to_dtype(x.dtype())
}

/// How our kernels multiply by a weight: bf16 weights in bf16 where the CPU has bf16 products
/// (diffusers' `torch_dtype=torch.bfloat16`, with f32 sums and f32 activations between layers),
/// everything else in f32.
fn products(weight: &Tensor) -> kernels::gemm::Arith {
    kernels::gemm::Arith::bf16_if(weight.dtype() == DType::BF16)
}

/// `t` in `x`'s dtype (weights kept in another precision than the activations, on candle's
/// paths).
fn like(t: &Tensor, x: &Tensor) -> Result<Tensor> {
    t.to_dtype(x.dtype())
}

/// A CPU bias as f32 values (converted when held in another dtype).
fn bias_f32(bias: Option<&Tensor>) -> Result<Option<CpuSlice>> {
    match bias {
        Some(b) => cpu_f32(&b.to_dtype(DType::F32)?),
        None => Ok(None),
    }
}

/// A weight's values on the CPU in the precision they are kept in, for our kernels (which
/// widen f16 / bf16 to f32 as they pack); `None` for other devices and dtypes.
enum CpuWeight {
    F32(CpuSlice<f32>),
    F16(CpuSlice<half::f16>),
    BF16(CpuSlice<half::bf16>),
}

/// `$body` with `$w` bound to the weight's values in their own element type.
macro_rules! with_weight {
    ($weight:expr, $w:ident => $body:expr) => {
        match $weight {
            CpuWeight::F32($w) => $body,
            CpuWeight::F16($w) => $body,
            CpuWeight::BF16($w) => $body,
        }
    };
}
use with_weight;

fn cpu_weight(t: &Tensor) -> Result<Option<CpuWeight>> {
    Ok(match t.dtype() {
        DType::F32 => cpu_slice(t)?.map(CpuWeight::F32),
        DType::F16 => cpu_slice(t)?.map(CpuWeight::F16),
        DType::BF16 => cpu_slice(t)?.map(CpuWeight::BF16),
        _ => None,
    })
}

/// The values of a CPU f32 tensor in row-major order, or `None` for other devices and dtypes,
/// which stay on candle's kernels.
fn cpu_f32(t: &Tensor) -> Result<Option<CpuSlice>> {
    cpu_slice::<f32>(t)
}

/// The values of a CPU tensor of element type `T` in row-major order, or `None` for other
/// devices and dtypes.
fn cpu_slice<T: candle_core::WithDType>(t: &Tensor) -> Result<Option<CpuSlice<T>>> {
    if !t.device().is_cpu() || t.dtype() != T::DTYPE {
        return Ok(None);
    }
    let tensor = t.contiguous()?;
    let (ptr, len) = {
        let (storage, layout) = tensor.storage_and_layout();
        let (start, end) = layout.contiguous_offsets().expect("contiguous tensor");
        match &*storage {
            candle_core::Storage::Cpu(cpu) => match T::cpu_storage_as_slice(cpu) {
                Ok(v) => (v[start..end].as_ptr(), end - start),
                Err(_) => return Ok(None),
            },
            _ => return Ok(None),
        }
    };
    Ok(Some(CpuSlice { _tensor: tensor, ptr, len }))
}

/// A borrowed view of a CPU tensor's values; holding the tensor keeps its storage alive,
/// and candle never mutates a tensor's storage in place behind our back.
struct CpuSlice<T = f32> {
    _tensor: Tensor,
    ptr: *const T,
    len: usize,
}

impl<T> std::ops::Deref for CpuSlice<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: ptr/len come from the live storage of `_tensor`, which this struct owns.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

/// 2-D convolution, NCHW, PyTorch `nn.Conv2d` semantics (symmetric zero padding).
pub fn conv2d(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, stride: usize, padding: usize) -> Result<Tensor> {
    let _t = profile::timer(profile::OpKind::Conv2d);
    let (batch, c_in, h, w) = x.dims4()?;
    let (c_out, w_in, kh, kw) = weight.dims4()?;
    // Groups are not supported here, so the input must have the kernel's channel count (our CPU
    // kernel would otherwise read the input by the kernel's width: garbage, not an error).
    if c_in != w_in {
        candle_core::bail!("conv2d: input has {c_in} channels but the kernel {:?} expects {w_in}", weight.dims());
    }
    if let (Some(xs), Some(ws)) = (cpu_f32(x)?, cpu_weight(weight)?) {
        let shape = kernels::conv::ConvShape { batch, c_in, h, w, c_out, kh, kw, stride, padding };
        let (ho, wo) = shape.out_hw();
        flops::add(2 * batch * c_out * ho * wo * c_in * kh * kw);
        let b = bias_f32(bias)?;
        let y = with_weight!(ws, w => kernels::conv::conv2d(&xs, &w, b.as_deref(), &shape, products(weight)));
        return Tensor::from_vec(y, (batch, c_out, ho, wo), x.device());
    }
    let weight = &like(weight, x)?;
    let (c, w) = (c_in, w);
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
        Some(b) => y.broadcast_add(&like(b, &y)?.reshape((1, b.dim(0)?, 1, 1))?),
        None => Ok(y),
    }
}

/// Group normalization over NC... tensors (PyTorch `nn.GroupNorm`).
pub fn group_norm(x: &Tensor, num_groups: usize, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    group_norm_act(x, num_groups, weight, bias, eps, false)
}

/// `silu(group_norm(x))`, one pass on the CPU (the pair every ResNet block starts with).
pub fn group_norm_silu(x: &Tensor, num_groups: usize, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    group_norm_act(x, num_groups, weight, bias, eps, true)
}

fn group_norm_act(
    x: &Tensor,
    num_groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let _t = profile::timer(profile::OpKind::GroupNorm);
    let shape = x.dims().to_vec();
    let (b, c) = (shape[0], shape[1]);
    if let (Some(xs), Some(ws), Some(bs)) = (cpu_f32(x)?, cpu_f32(weight)?, cpu_f32(bias)?) {
        let spatial = shape[2..].iter().product();
        let y = kernels::norm::group_norm(&xs, b, c, spatial, num_groups, &ws, &bs, eps as f32, silu);
        return Tensor::from_vec(y, shape, x.device());
    }
    let group_size = shape[2..].iter().product::<usize>() * c / num_groups;
    let dtype = x.dtype();
    let xg = x.reshape((b, num_groups, group_size))?.to_dtype(DType::F32)?;
    let mean = (xg.sum_keepdim(2)? / group_size as f64)?;
    let xc = xg.broadcast_sub(&mean)?;
    let var = (xc.sqr()?.sum_keepdim(2)? / group_size as f64)?;
    let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    let mut wshape = vec![1; shape.len()];
    wshape[1] = c;
    let y = xn
        .to_dtype(dtype)?
        .reshape(shape)?
        .broadcast_mul(&like(weight, x)?.reshape(wshape.clone())?)?
        .broadcast_add(&like(bias, x)?.reshape(wshape)?)?;
    if silu {
        y.silu()
    } else {
        Ok(y)
    }
}

/// Layer normalization over the last dimension (PyTorch `nn.LayerNorm`).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let _t = profile::timer(profile::OpKind::LayerNorm);
    if let (Some(xs), Some(ws)) = (cpu_f32(x)?, cpu_f32(weight)?) {
        let b = bias.map(cpu_f32).transpose()?.flatten();
        let y = kernels::layer_norm(&xs, x.dim(D::Minus1)?, &ws, b.as_deref(), eps as f32);
        return Tensor::from_vec(y, x.dims(), x.device());
    }
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let n = x.dim(D::Minus1)? as f64;
    let mean = (x.sum_keepdim(D::Minus1)? / n)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = (xc.sqr()?.sum_keepdim(D::Minus1)? / n)?;
    let y = xc.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dtype)?;
    let y = y.broadcast_mul(&like(weight, &y)?)?;
    match bias {
        Some(b) => y.broadcast_add(&like(b, &y)?),
        None => Ok(y),
    }
}

/// Scaled dot-product attention: q `[b, heads, lq, d]`, k/v `[b, heads, lk, d]`.
/// `causal` masks future positions (CLIP's text encoder). `weights`: the dtype of the layer's
/// projection weight, which sets the products' precision as for every product of the model.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, causal: bool, weights: DType) -> Result<Tensor> {
    let _t = profile::timer(profile::OpKind::Attention);
    let (lq, d) = (q.dim(D::Minus2)?, q.dim(D::Minus1)?);
    let batch_heads: usize = q.dims()[..q.rank() - 2].iter().product();
    let (lk, dv) = (k.dim(D::Minus2)?, v.dim(D::Minus1)?);
    flops::add(2 * batch_heads * lq * lk * (d + dv));
    if let (Some(qs), Some(ks), Some(vs)) = (cpu_f32(q)?, cpu_f32(k)?, cpu_f32(v)?) {
        let out = kernels::attention::attention(
            &qs,
            &ks,
            &vs,
            batch_heads,
            lq,
            lk,
            d,
            dv,
            scale as f32,
            causal,
            kernels::gemm::Arith::bf16_if(weights == DType::BF16),
        );
        let mut dims = q.dims().to_vec();
        *dims.last_mut().unwrap() = dv;
        return Tensor::from_vec(out, dims, q.device());
    }
    // Other devices / dtypes: q is scaled before the product (a pass over q, not over the much
    // larger score matrix) and kᵀ is read through strides by the batched GEMM (no copy).
    let scores = (q * scale)?.contiguous()?.matmul(&k.contiguous()?.t()?)?;
    let scores = if causal {
        let (lq, lk) = (scores.dim(D::Minus2)?, scores.dim(D::Minus1)?);
        let mask: Vec<f32> =
            (0..lq).flat_map(|i| (0..lk).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })).collect();
        let mask = Tensor::from_vec(mask, (lq, lk), scores.device())?.to_dtype(scores.dtype())?;
        scores.broadcast_add(&mask)?
    } else {
        scores
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    probs.matmul(&v.contiguous()?)
}

pub fn silu(x: &Tensor) -> Result<Tensor> {
    let _t = profile::timer(profile::OpKind::Activation);
    if let Some(xs) = cpu_f32(x)? {
        let mut y = xs.to_vec();
        kernels::silu_inplace(&mut y);
        return Tensor::from_vec(y, x.dims(), x.device());
    }
    x.silu()
}

/// Exact (erf) GELU, PyTorch's default `F.gelu`.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    let _t = profile::timer(profile::OpKind::Activation);
    if let Some(xs) = cpu_f32(x)? {
        let mut y = vec![0f32; xs.len()];
        kernels::gelu_erf(&xs, None, &mut y);
        return Tensor::from_vec(y, x.dims(), x.device());
    }
    x.gelu_erf()
}

/// `hidden * gelu(gate)` (diffusers' GEGLU after its projection), in one pass on the CPU.
pub fn geglu(hidden: &Tensor, gate: &Tensor) -> Result<Tensor> {
    let _t = profile::timer(profile::OpKind::Activation);
    if let (Some(h), Some(g)) = (cpu_f32(hidden)?, cpu_f32(gate)?) {
        if h.len() == g.len() {
            let mut y = vec![0f32; g.len()];
            kernels::gelu_erf(&g, Some(&h), &mut y);
            return Tensor::from_vec(y, gate.dims(), gate.device());
        }
    }
    hidden * gelu(gate)?
}

/// tanh-approximated GELU (`gelu_pytorch_tanh`, `approximate="tanh"`).
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    let _t = profile::timer(profile::OpKind::Activation);
    x.gelu()
}

/// `x * sigmoid(1.702 x)`, CLIP's "quick_gelu".
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    let _t = profile::timer(profile::OpKind::Activation);
    x * candle_nn::ops::sigmoid(&(x * 1.702)?)?
}

/// Nearest-neighbour 2x upsampling (`F.interpolate(scale_factor=2, mode="nearest")`).
pub fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
    let _t = profile::timer(profile::OpKind::Upsample);
    let (n, c, h, w) = x.dims4()?;
    if let Some(xs) = cpu_f32(x)? {
        let y = kernels::upsample_nearest2x(&xs, n * c, h, w);
        return Tensor::from_vec(y, (n, c, 2 * h, 2 * w), x.device());
    }
    x.upsample_nearest2d(h * 2, w * 2)
}

/// Nearest-neighbour upsampling to an explicit size (`F.interpolate(size=(h, w), mode="nearest")`),
/// used when a UNet skip connection is not exactly twice the size of the upsampled input.
pub fn upsample_nearest(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    x.upsample_nearest2d(h, w)
}

/// `a + b` for tensors of the same shape (residual connections), on all threads for CPU f32.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.dims() == b.dims() {
        if let (Some(x), Some(y)) = (cpu_f32(a)?, cpu_f32(b)?) {
            return Tensor::from_vec(kernels::add(&x, &y), a.dims(), a.device());
        }
    }
    a + b
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
