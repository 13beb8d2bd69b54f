//! Attention layers (diffusers `attention_processor.Attention`, `attention.BasicTransformerBlock`,
//! `attention.FeedForward` with GEGLU, `transformers/transformer_2d.Transformer2DModel`).

use crate::kernels::int8::Side;
use crate::nn::{GroupNorm, LayerNorm, Linear, Weight};
use crate::ops;
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

/// Construction parameters of [`Attention`] (the subset these models use).
#[derive(Clone, Debug)]
pub struct AttentionConfig {
    pub query_dim: usize,
    /// Width of the key/value input; `None` means self-attention (`query_dim`).
    pub cross_attention_dim: Option<usize>,
    pub heads: usize,
    pub dim_head: usize,
    /// Bias on `to_q`/`to_k`/`to_v` (off in the UNet transformers, on in the VAE).
    pub bias: bool,
    pub out_bias: bool,
    /// A `group_norm` applied to the (4-D) input first, as in the VAE mid-block attention.
    pub norm_num_groups: Option<usize>,
    pub eps: f64,
    pub residual_connection: bool,
    pub rescale_output_factor: f64,
}

impl AttentionConfig {
    pub fn new(query_dim: usize, cross_attention_dim: Option<usize>, heads: usize, dim_head: usize) -> Self {
        Self {
            query_dim,
            cross_attention_dim,
            heads,
            dim_head,
            bias: false,
            out_bias: true,
            norm_num_groups: None,
            eps: 1e-5,
            residual_connection: false,
            rescale_output_factor: 1.0,
        }
    }
}

/// Multi-head scaled dot-product attention with diffusers' weight names
/// (`to_q`, `to_k`, `to_v`, `to_out.0`, optional `group_norm`).
#[derive(Clone, Debug)]
pub struct Attention {
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Linear,
    pub group_norm: Option<GroupNorm>,
    pub heads: usize,
    pub dim_head: usize,
    pub scale: f64,
    pub residual_connection: bool,
    pub rescale_output_factor: f64,
}

impl Attention {
    pub fn new(vb: VarBuilder, cfg: &AttentionConfig) -> Result<Self> {
        if cfg.heads == 0 || cfg.dim_head == 0 {
            candle_core::bail!(
                "attention {}: {} heads of dimension {} is not a valid layout",
                vb.prefix(),
                cfg.heads,
                cfg.dim_head
            )
        }
        let inner = cfg.heads * cfg.dim_head;
        let kv_dim = cfg.cross_attention_dim.unwrap_or(cfg.query_dim);
        let group_norm = match cfg.norm_num_groups {
            Some(g) => Some(GroupNorm::new(vb.pp("group_norm"), g, cfg.query_dim, cfg.eps)?),
            None => None,
        };
        // VAE checkpoints saved before diffusers 0.14 name the mid-block attention
        // query/key/value/proj_attn; diffusers renames them on load, and so do we.
        let legacy = group_norm.is_some() && !vb.contains_tensor("to_q.weight") && vb.contains_tensor("query.weight");
        let [q, k, v, o] =
            if legacy { ["query", "key", "value", "proj_attn"] } else { ["to_q", "to_k", "to_v", "to_out.0"] };
        Ok(Self {
            to_q: Linear::new(vb.pp(q), cfg.query_dim, inner, cfg.bias)?,
            to_k: Linear::new(vb.pp(k), kv_dim, inner, cfg.bias)?,
            to_v: Linear::new(vb.pp(v), kv_dim, inner, cfg.bias)?,
            to_out: Linear::new(vb.pp(o), inner, cfg.query_dim, cfg.out_bias)?,
            group_norm,
            heads: cfg.heads,
            dim_head: cfg.dim_head,
            scale: 1.0 / (cfg.dim_head as f64).sqrt(),
            residual_connection: cfg.residual_connection,
            rescale_output_factor: cfg.rescale_output_factor,
        })
    }

    /// `[b, seq, dim] -> [b, heads, seq, dim_head]` (a view; `ops::attention` decides on copies).
    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, _) = x.dims3()?;
        x.reshape((b, n, self.heads, self.dim_head))?.transpose(1, 2)
    }

    /// Attention over token sequences: `hidden_states` `[b, n, query_dim]`, `encoder_hidden_states`
    /// `[b, m, cross_attention_dim]` (self-attention when `None`).
    pub fn forward(&self, hidden_states: &Tensor, encoder_hidden_states: Option<&Tensor>) -> Result<Tensor> {
        let (b, n, _) = hidden_states.dims3()?;
        let context = encoder_hidden_states.unwrap_or(hidden_states);
        let q = self.split_heads(&self.to_q.forward(hidden_states)?)?;
        let k = self.split_heads(&self.to_k.forward(context)?)?;
        let v = self.split_heads(&self.to_v.forward(context)?)?;
        let o = ops::attention(&q, &k, &v, self.scale, false, self.to_q.weight.dtype())?;
        let o = o.transpose(1, 2)?.reshape((b, n, self.heads * self.dim_head))?;
        let out = self.to_out.forward(&o)?;
        let out = if self.residual_connection { ops::add(&out, hidden_states)? } else { out };
        if self.rescale_output_factor == 1.0 {
            Ok(out)
        } else {
            out / self.rescale_output_factor
        }
    }

    /// Self-attention over the pixels of an image `[b, c, h, w]` (the VAE mid-block attention):
    /// group norm, attention over `h * w` tokens, residual added on the image.
    pub fn forward_spatial(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let normed = match &self.group_norm {
            Some(gn) => gn.forward(x)?,
            None => x.clone(),
        };
        let tokens = normed.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?;
        let q = self.split_heads(&self.to_q.forward(&tokens)?)?;
        let k = self.split_heads(&self.to_k.forward(&tokens)?)?;
        let v = self.split_heads(&self.to_v.forward(&tokens)?)?;
        let o = ops::attention(&q, &k, &v, self.scale, false, self.to_q.weight.dtype())?;
        let o = o.transpose(1, 2)?.reshape((b, h * w, self.heads * self.dim_head))?;
        let out = self.to_out.forward(&o)?.transpose(1, 2)?.reshape((b, c, h, w))?;
        let out = if self.residual_connection { ops::add(&out, x)? } else { out };
        if self.rescale_output_factor == 1.0 {
            Ok(out)
        } else {
            out / self.rescale_output_factor
        }
    }
}

/// `FeedForward` with the GEGLU activation: `net.0.proj` (dim -> 2 * inner), `hidden * gelu(gate)`,
/// `net.2` (inner -> dim).
#[derive(Clone, Debug)]
pub struct FeedForward {
    /// The two halves of `net.0.proj` (views of the same weights, no copy; quantized apart
    /// when 8-bit), so each matmul writes a contiguous result instead of chunking one output.
    hidden: Linear,
    gate: Linear,
    pub out: Linear,
}

impl FeedForward {
    pub fn new(vb: VarBuilder, dim: usize, inner_dim: usize) -> Result<Self> {
        let vb_proj = vb.pp("net").pp("0").pp("proj");
        let weight = vb_proj.get((inner_dim * 2, dim), "weight")?;
        let bias = vb_proj.get(inner_dim * 2, "bias")?;
        let half = |i: usize| -> Result<Linear> {
            Ok(Linear {
                weight: Weight::from_loaded(weight.narrow(0, i * inner_dim, inner_dim)?, &vb_proj, Side::Right)?,
                bias: Some(bias.narrow(0, i * inner_dim, inner_dim)?),
            })
        };
        let (hidden, gate) = (half(0)?, half(1)?);
        let out = Linear::new(vb.pp("net").pp("2"), inner_dim, dim, true)?;
        Ok(Self { hidden, gate, out })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.hidden.forward(x)?;
        let g = self.gate.forward(x)?;
        self.out.forward(&ops::geglu(&h, &g)?)
    }
}

/// Pre-norm transformer block: self-attention, cross-attention, GEGLU feed-forward, each residual.
#[derive(Clone, Debug)]
pub struct BasicTransformerBlock {
    pub norm1: LayerNorm,
    pub attn1: Attention,
    pub norm2: LayerNorm,
    pub attn2: Attention,
    pub norm3: LayerNorm,
    pub ff: FeedForward,
    /// `attn1` attends to the encoder states instead of itself.
    pub only_cross_attention: bool,
}

impl BasicTransformerBlock {
    pub fn new(
        vb: VarBuilder,
        dim: usize,
        num_attention_heads: usize,
        attention_head_dim: usize,
        cross_attention_dim: usize,
        only_cross_attention: bool,
    ) -> Result<Self> {
        // diffusers: LayerNorm eps 1e-5, attention without q/k/v bias, ff inner = 4 * dim.
        let eps = 1e-5;
        let attn1_cfg = AttentionConfig::new(
            dim,
            only_cross_attention.then_some(cross_attention_dim),
            num_attention_heads,
            attention_head_dim,
        );
        let attn2_cfg = AttentionConfig::new(dim, Some(cross_attention_dim), num_attention_heads, attention_head_dim);
        Ok(Self {
            norm1: LayerNorm::new(vb.pp("norm1"), dim, eps)?,
            attn1: Attention::new(vb.pp("attn1"), &attn1_cfg)?,
            norm2: LayerNorm::new(vb.pp("norm2"), dim, eps)?,
            attn2: Attention::new(vb.pp("attn2"), &attn2_cfg)?,
            norm3: LayerNorm::new(vb.pp("norm3"), dim, eps)?,
            ff: FeedForward::new(vb.pp("ff"), dim, dim * 4)?,
            only_cross_attention,
        })
    }

    pub fn forward(&self, x: &Tensor, encoder_hidden_states: &Tensor) -> Result<Tensor> {
        let n = self.norm1.forward(x)?;
        let ctx1 = self.only_cross_attention.then_some(encoder_hidden_states);
        let x = ops::add(&self.attn1.forward(&n, ctx1)?, x)?;
        let n = self.norm2.forward(&x)?;
        let x = ops::add(&self.attn2.forward(&n, Some(encoder_hidden_states))?, &x)?;
        let n = self.norm3.forward(&x)?;
        ops::add(&self.ff.forward(&n)?, &x)
    }
}

/// `proj_in`/`proj_out`: a Linear (`use_linear_projection`) or a 1x1 convolution. Both are applied
/// as a matmul over the channel axis of `[b, h*w, c]` tokens (a 1x1 convolution is exactly that),
/// so the layout is converted once on the way in and once on the way out.
#[derive(Clone, Debug)]
pub struct Projection {
    pub linear: Linear,
    pub is_conv: bool,
}

impl Projection {
    fn new(vb: VarBuilder, cin: usize, cout: usize, conv: bool) -> Result<Self> {
        if conv {
            // squeeze keeps the loaded storage (a view), whatever its layout.
            let weight = vb.get((cout, cin, 1, 1), "weight")?.squeeze(3)?.squeeze(2)?;
            let bias = Some(vb.get(cout, "bias")?);
            Ok(Self { linear: Linear { weight: Weight::from_loaded(weight, &vb, Side::Right)?, bias }, is_conv: true })
        } else {
            Ok(Self { linear: Linear::new(vb, cin, cout, true)?, is_conv: false })
        }
    }
}

/// The spatial transformer of the UNet: group norm, `proj_in`, `transformer_blocks`, `proj_out`,
/// plus the input as residual.
#[derive(Clone, Debug)]
pub struct Transformer2DModel {
    pub norm: GroupNorm,
    pub proj_in: Projection,
    pub transformer_blocks: Vec<BasicTransformerBlock>,
    pub proj_out: Projection,
}

/// Construction parameters of [`Transformer2DModel`].
#[derive(Clone, Debug)]
pub struct Transformer2DConfig {
    pub num_attention_heads: usize,
    pub attention_head_dim: usize,
    pub in_channels: usize,
    pub num_layers: usize,
    pub cross_attention_dim: usize,
    pub norm_num_groups: usize,
    pub use_linear_projection: bool,
    pub only_cross_attention: bool,
}

impl Transformer2DModel {
    pub fn new(vb: VarBuilder, cfg: &Transformer2DConfig) -> Result<Self> {
        let inner = cfg.num_attention_heads * cfg.attention_head_dim;
        let linear = cfg.use_linear_projection;
        let norm = GroupNorm::new(vb.pp("norm"), cfg.norm_num_groups, cfg.in_channels, 1e-6)?;
        let proj_in = Projection::new(vb.pp("proj_in"), cfg.in_channels, inner, !linear)?;
        let transformer_blocks = (0..cfg.num_layers)
            .map(|i| {
                BasicTransformerBlock::new(
                    vb.pp("transformer_blocks").pp(i),
                    inner,
                    cfg.num_attention_heads,
                    cfg.attention_head_dim,
                    cfg.cross_attention_dim,
                    cfg.only_cross_attention,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let proj_out = Projection::new(vb.pp("proj_out"), inner, cfg.in_channels, !linear)?;
        Ok(Self { norm, proj_in, transformer_blocks, proj_out })
    }

    pub fn forward(&self, x: &Tensor, encoder_hidden_states: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let n = self.norm.forward(x)?;
        let tokens = n.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?;
        let mut t = self.proj_in.linear.forward(&tokens)?;
        for block in &self.transformer_blocks {
            t = block.forward(&t, encoder_hidden_states)?;
        }
        let t = self.proj_out.linear.forward(&t)?;
        let out = t.transpose(1, 2)?.reshape((b, c, h, w))?;
        out + x
    }
}
