//! Layers with PyTorch names and semantics, loaded from a `VarBuilder` by diffusers' weight
//! names. Every forward goes through [`crate::ops`].

use crate::kernels::gemm::{Arith, PackedB, Strided, TiledA};
use crate::kernels::int8::{Int8Matrix, Side};
use crate::loaders::weights::quantized_layers;
use crate::ops;
use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;
use std::sync::Arc;

/// Which activation a config names (`act_fn`, `hidden_act`, `resnet_act_fn`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Silu,
    Gelu,
    GeluTanh,
    QuickGelu,
    Relu,
}

impl Activation {
    pub fn from_name(name: &str) -> Result<Self> {
        Ok(match name {
            "silu" | "swish" => Self::Silu,
            "gelu" => Self::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_tanh" => Self::GeluTanh,
            "quick_gelu" => Self::QuickGelu,
            "relu" => Self::Relu,
            other => candle_core::bail!("unsupported activation function `{other}`"),
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Silu => ops::silu(x),
            Self::Gelu => ops::gelu(x),
            Self::GeluTanh => ops::gelu_tanh(x),
            Self::QuickGelu => ops::quick_gelu(x),
            Self::Relu => x.relu(),
        }
    }
}

/// A linear or convolution layer's weight: a tensor, or (`--dtype int8` on the CPU) 8-bit
/// values with a scale per output channel, stored in the layout the 8-bit kernel reads.
#[derive(Clone, Debug)]
pub enum Weight {
    Float(Tensor),
    Int8(Arc<Int8Weight>),
    /// bf16 weights on the `amx-bf16` CPU path: rounded and laid out once at load as the AMX
    /// kernel reads them (no product packs them again), in place of the tensor.
    Tiles(Arc<TiledWeight>),
}

#[derive(Debug)]
pub struct TiledWeight {
    pub operand: TiledOperand,
    /// The float weight's shape (`[out, in]`, `[out, in, kh, kw]`).
    pub dims: Vec<usize>,
}

/// Which side of its products a packed weight is.
#[derive(Debug)]
pub enum TiledOperand {
    /// A linear layer's `Wᵀ` (`in x out`), as bf16 pair panels.
    Right(PackedB),
    /// A convolution's kernel (`out x in*kh*kw`), as AMX tiles.
    Left(TiledA),
    /// A 3x3 stride-1 convolution's kernel, as the tiles of the convolution that reads its
    /// input windows in place (`kernels::amx_conv`).
    #[cfg(target_arch = "x86_64")]
    Conv3x3(crate::kernels::amx_conv::ConvTiles),
}

/// Whether bf16 weights are packed once at load (the CPU path multiplies on AMX tiles).
fn tiles_for(w: &Tensor) -> bool {
    w.dtype() == DType::BF16
        && w.device().is_cpu()
        && crate::kernels::CpuPath::current() >= crate::kernels::CpuPath::AmxBf16
}

#[derive(Debug)]
pub struct Int8Weight {
    pub matrix: Int8Matrix,
    /// The float weight's shape (`[out, in]`, `[out, in, kh, kw]`).
    pub dims: Vec<usize>,
}

impl Weight {
    /// `w` as a layer built from `vb` keeps it: quantized when the weights backend says this
    /// model's layers are 8-bit, as the operand `side` of its products.
    pub fn from_loaded(w: Tensor, vb: &VarBuilder, side: Side) -> Result<Self> {
        if !quantized_layers(vb) || !w.device().is_cpu() {
            if side == Side::Right && w.rank() == 2 && tiles_for(&w) {
                let (out, inp) = w.dims2()?;
                let v = w.flatten_all()?.to_vec1::<half::bf16>()?;
                let wt = Strided { data: &v[..], row_stride: 1, col_stride: inp };
                let operand = TiledOperand::Right(PackedB::new(inp, out, &wt, Arith::Bf16));
                return Ok(Self::Tiles(Arc::new(TiledWeight { operand, dims: vec![out, inp] })));
            }
            return Ok(Self::Float(w));
        }
        let dims = w.dims().to_vec();
        let (rows, depth): (usize, usize) = (dims[0], dims[1..].iter().product());
        // Convolutions with few output channels (ControlNet's conditioning embedding, a UNet's
        // `conv_in`) stay float: the 8-bit kernel quantizes each image block once for all output
        // channels, and below ~256 of them that costs more than it saves (128->128 3x3 at 256²:
        // 120 against 440 GFLOP/s on f32 Winograd).
        if side == Side::Left && (rows < 256 || depth < 64) {
            return Ok(Self::Float(w));
        }
        let w = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(Self::Int8(Arc::new(Int8Weight { matrix: Int8Matrix::quantize(&w, rows, depth, side), dims })))
    }

    /// A convolution's bf16 kernel packed once when every product with it runs on AMX tiles:
    /// 3x3 stride-1 ones by the convolution that reads its windows in place
    /// (`kernels::amx_conv`), others direct (`kernels::conv::amx_direct_always`); otherwise itself.
    pub fn for_conv(self, stride: usize, padding: usize) -> Result<Self> {
        let Self::Float(w) = &self else { return Ok(self) };
        let dims = w.dims().to_vec();
        let [c_out, c_in, k, kw] = dims[..] else { return Ok(self) };
        if !tiles_for(w) || k != kw {
            return Ok(self);
        }
        #[cfg(target_arch = "x86_64")]
        if crate::kernels::amx_conv::applies(c_in, c_out, k, stride, padding) {
            let v = w.flatten_all()?.to_vec1::<half::bf16>()?;
            let operand = TiledOperand::Conv3x3(crate::kernels::amx_conv::ConvTiles::new(&v, c_out, c_in));
            return Ok(Self::Tiles(Arc::new(TiledWeight { operand, dims })));
        }
        if !crate::kernels::conv::amx_direct_always(c_in, c_out, k, stride, padding) {
            return Ok(self);
        }
        let v = w.flatten_all()?.to_vec1::<half::bf16>()?;
        let operand = TiledOperand::Left(TiledA::new(&v, c_out, c_in * k * k));
        Ok(Self::Tiles(Arc::new(TiledWeight { operand, dims })))
    }

    pub fn dims(&self) -> &[usize] {
        match self {
            Self::Float(t) => t.dims(),
            Self::Int8(q) => &q.dims,
            Self::Tiles(t) => &t.dims,
        }
    }

    /// The dtype of the float weight, or of the activations an 8-bit one takes (f32).
    pub fn dtype(&self) -> DType {
        match self {
            Self::Float(t) => t.dtype(),
            Self::Int8(_) => DType::F32,
            Self::Tiles(_) => DType::BF16,
        }
    }
}

impl From<Tensor> for Weight {
    fn from(t: Tensor) -> Self {
        Self::Float(t)
    }
}

#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Weight,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(vb: VarBuilder, in_features: usize, out_features: usize, bias: bool) -> Result<Self> {
        let weight = vb.get((out_features, in_features), "weight")?;
        let bias = if bias { Some(vb.get(out_features, "bias")?) } else { None };
        Ok(Self { weight: Weight::from_loaded(weight, &vb, Side::Right)?, bias })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.weight {
            Weight::Float(w) => ops::linear(x, w, self.bias.as_ref()),
            Weight::Int8(q) => ops::linear_int8(x, &q.matrix, self.bias.as_ref()),
            Weight::Tiles(t) => ops::linear_tiled(x, t, self.bias.as_ref()),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Conv2d {
    pub weight: Weight,
    pub bias: Option<Tensor>,
    pub stride: usize,
    pub padding: usize,
}

impl Conv2d {
    /// A square-kernel convolution with bias, as every diffusers conv in these models is.
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let weight = vb.get((out_channels, in_channels, kernel, kernel), "weight")?;
        let bias = Some(vb.get(out_channels, "bias")?);
        let weight = Weight::from_loaded(weight, &vb, Side::Left)?.for_conv(stride, padding)?;
        Ok(Self { weight, bias, stride, padding })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.weight {
            Weight::Float(w) => ops::conv2d(x, w, self.bias.as_ref(), self.stride, self.padding),
            Weight::Int8(q) => ops::conv2d_int8(x, &q.matrix, &q.dims, self.bias.as_ref(), self.stride, self.padding),
            Weight::Tiles(t) => ops::conv2d_tiled(x, t, self.bias.as_ref(), self.stride, self.padding),
        }
    }
}

#[derive(Clone, Debug)]
pub struct GroupNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub num_groups: usize,
    pub eps: f64,
}

impl GroupNorm {
    pub fn new(vb: VarBuilder, num_groups: usize, channels: usize, eps: f64) -> Result<Self> {
        if num_groups == 0 || !channels.is_multiple_of(num_groups) {
            candle_core::bail!("group norm: {channels} channels cannot be split into {num_groups} groups")
        }
        Ok(Self { weight: vb.get(channels, "weight")?, bias: vb.get(channels, "bias")?, num_groups, eps })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::group_norm(x, self.num_groups, &self.weight, &self.bias, self.eps)
    }

    /// `act(norm(x))`, fused when the activation is SiLU.
    pub fn forward_act(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        match act {
            Activation::Silu => ops::group_norm_silu(x, self.num_groups, &self.weight, &self.bias, self.eps),
            other => other.forward(&self.forward(x)?),
        }
    }
}

#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub eps: f64,
}

impl LayerNorm {
    pub fn new(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        Ok(Self { weight: vb.get(size, "weight")?, bias: Some(vb.get(size, "bias")?), eps })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::layer_norm(x, &self.weight, self.bias.as_ref(), self.eps)
    }
}
