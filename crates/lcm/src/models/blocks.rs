//! The down, mid and up blocks of the UNet and the VAE (diffusers `unets/unet_2d_blocks.py`).

use crate::models::attention::{Attention, AttentionConfig, Transformer2DConfig, Transformer2DModel};
use crate::models::resnet::{Downsample2D, ResnetBlock2D, ResnetBlock2DConfig, TimeEmbeddingNorm, Upsample2D};
use crate::nn::Activation;
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

/// Resnet settings shared by every resnet of a block.
#[derive(Clone, Copy, Debug)]
pub struct ResnetParams {
    /// `None`: no time embedding (the VAE).
    pub temb_channels: Option<usize>,
    pub groups: usize,
    pub eps: f64,
    pub act: Activation,
    pub time_embedding_norm: TimeEmbeddingNorm,
    pub output_scale_factor: f64,
}

impl ResnetParams {
    fn resnet(&self, vb: VarBuilder, cin: usize, cout: usize) -> Result<ResnetBlock2D> {
        let mut cfg = ResnetBlock2DConfig::new(cin, cout, self.temb_channels, self.groups, self.eps, self.act);
        cfg.time_embedding_norm = self.time_embedding_norm;
        cfg.output_scale_factor = self.output_scale_factor;
        ResnetBlock2D::new(vb, &cfg)
    }
}

/// Cross-attention settings of a `CrossAttn*` block.
#[derive(Clone, Debug)]
pub struct CrossAttnParams {
    pub num_attention_heads: usize,
    pub cross_attention_dim: usize,
    /// Transformer depth of each of the block's attentions (one entry per resnet/attention pair).
    pub transformer_layers_per_block: Vec<usize>,
    pub use_linear_projection: bool,
    pub only_cross_attention: bool,
}

impl CrossAttnParams {
    fn transformer(&self, vb: VarBuilder, channels: usize, groups: usize, i: usize) -> Result<Transformer2DModel> {
        let heads = self.num_attention_heads;
        if heads == 0 || heads > channels {
            candle_core::bail!("{}: {heads} attention heads cannot split {channels} channels", vb.prefix())
        }
        let Some(&num_layers) = self.transformer_layers_per_block.get(i) else {
            candle_core::bail!(
                "{}: transformer_layers_per_block has {} entries, the block has more attentions",
                vb.prefix(),
                self.transformer_layers_per_block.len()
            )
        };
        Transformer2DModel::new(
            vb,
            &Transformer2DConfig {
                num_attention_heads: heads,
                // diffusers: `out_channels // num_attention_heads`.
                attention_head_dim: channels / heads,
                in_channels: channels,
                num_layers,
                cross_attention_dim: self.cross_attention_dim,
                norm_num_groups: groups,
                use_linear_projection: self.use_linear_projection,
                only_cross_attention: self.only_cross_attention,
            },
        )
    }
}

fn downsampler(vb: &VarBuilder, add: bool, channels: usize, padding: usize) -> Result<Option<Downsample2D>> {
    if add {
        Ok(Some(Downsample2D::new(vb.pp("downsamplers").pp(0), channels, channels, padding)?))
    } else {
        Ok(None)
    }
}

fn upsampler(vb: &VarBuilder, add: bool, channels: usize) -> Result<Option<Upsample2D>> {
    if add {
        Ok(Some(Upsample2D::new(vb.pp("upsamplers").pp(0), channels, channels)?))
    } else {
        Ok(None)
    }
}

/// Called after each layer of a block with the layer's index and output: AnimateDiff's motion
/// modules. `None` leaves the block as it is.
pub type LayerHook<'a> = Option<&'a dyn Fn(usize, Tensor) -> Result<Tensor>>;

fn after_layer(hook: LayerHook, i: usize, x: Tensor) -> Result<Tensor> {
    match hook {
        Some(f) => f(i, x),
        None => Ok(x),
    }
}

/// Resnets then an optional downsampler; every intermediate output is a skip connection.
#[derive(Clone, Debug)]
pub struct DownBlock2D {
    pub resnets: Vec<ResnetBlock2D>,
    pub downsamplers: Option<Downsample2D>,
}

impl DownBlock2D {
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        num_layers: usize,
        add_downsample: bool,
        downsample_padding: usize,
        rp: &ResnetParams,
    ) -> Result<Self> {
        let resnets = (0..num_layers)
            .map(|i| {
                let cin = if i == 0 { in_channels } else { out_channels };
                rp.resnet(vb.pp("resnets").pp(i), cin, out_channels)
            })
            .collect::<Result<Vec<_>>>()?;
        let downsamplers = downsampler(&vb, add_downsample, out_channels, downsample_padding)?;
        Ok(Self { resnets, downsamplers })
    }

    /// Returns the output and the skip connections it produced.
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>, hook: LayerHook) -> Result<(Tensor, Vec<Tensor>)> {
        let mut x = x.clone();
        let mut states = Vec::with_capacity(self.resnets.len() + 1);
        for (i, r) in self.resnets.iter().enumerate() {
            x = after_layer(hook, i, r.forward(&x, temb)?)?;
            states.push(x.clone());
        }
        if let Some(d) = &self.downsamplers {
            x = d.forward(&x)?;
            states.push(x.clone());
        }
        Ok((x, states))
    }
}

/// Resnet + spatial transformer pairs then an optional downsampler.
#[derive(Clone, Debug)]
pub struct CrossAttnDownBlock2D {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
    pub downsamplers: Option<Downsample2D>,
}

impl CrossAttnDownBlock2D {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        num_layers: usize,
        add_downsample: bool,
        downsample_padding: usize,
        rp: &ResnetParams,
        ap: &CrossAttnParams,
    ) -> Result<Self> {
        let mut resnets = Vec::with_capacity(num_layers);
        let mut attentions = Vec::with_capacity(num_layers);
        for i in 0..num_layers {
            let cin = if i == 0 { in_channels } else { out_channels };
            resnets.push(rp.resnet(vb.pp("resnets").pp(i), cin, out_channels)?);
            attentions.push(ap.transformer(vb.pp("attentions").pp(i), out_channels, rp.groups, i)?);
        }
        let downsamplers = downsampler(&vb, add_downsample, out_channels, downsample_padding)?;
        Ok(Self { resnets, attentions, downsamplers })
    }

    /// `additional_residual` (T2I-Adapter) is added after the last resnet/attention pair, before
    /// that output is recorded as a skip connection.
    pub fn forward(
        &self,
        x: &Tensor,
        temb: Option<&Tensor>,
        encoder_hidden_states: &Tensor,
        additional_residual: Option<&Tensor>,
        hook: LayerHook,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut x = x.clone();
        let mut states = Vec::with_capacity(self.resnets.len() + 1);
        let n = self.resnets.len();
        for (i, (r, a)) in self.resnets.iter().zip(&self.attentions).enumerate() {
            x = r.forward(&x, temb)?;
            x = after_layer(hook, i, a.forward(&x, encoder_hidden_states)?)?;
            if i + 1 == n {
                if let Some(res) = additional_residual {
                    x = (x + res)?;
                }
            }
            states.push(x.clone());
        }
        if let Some(d) = &self.downsamplers {
            x = d.forward(&x)?;
            states.push(x.clone());
        }
        Ok((x, states))
    }
}

/// Resnets over `cat([x, skip], dim=1)`, consuming skips from the last, then an optional upsampler.
#[derive(Clone, Debug)]
pub struct UpBlock2D {
    pub resnets: Vec<ResnetBlock2D>,
    pub upsamplers: Option<Upsample2D>,
}

/// Input channels of up-block resnet `i`: the previous output plus the skip it consumes.
fn up_resnet_in(
    i: usize,
    num_layers: usize,
    in_channels: usize,
    prev_output_channel: usize,
    out_channels: usize,
) -> usize {
    let res_skip = if i + 1 == num_layers { in_channels } else { out_channels };
    let resnet_in = if i == 0 { prev_output_channel } else { out_channels };
    resnet_in + res_skip
}

fn take_skip<'a>(skips: &mut &'a [Tensor], what: &str) -> Result<&'a Tensor> {
    match skips.split_last() {
        Some((last, rest)) => {
            *skips = rest;
            Ok(last)
        }
        None => candle_core::bail!("{what}: ran out of skip connections"),
    }
}

impl UpBlock2D {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        prev_output_channel: usize,
        out_channels: usize,
        num_layers: usize,
        add_upsample: bool,
        rp: &ResnetParams,
    ) -> Result<Self> {
        let resnets = (0..num_layers)
            .map(|i| {
                let cin = up_resnet_in(i, num_layers, in_channels, prev_output_channel, out_channels);
                rp.resnet(vb.pp("resnets").pp(i), cin, out_channels)
            })
            .collect::<Result<Vec<_>>>()?;
        let upsamplers = upsampler(&vb, add_upsample, out_channels)?;
        Ok(Self { resnets, upsamplers })
    }

    /// `skips`: this block's skip connections in the order they were produced (the last one is
    /// consumed first). `upsample_size`: explicit output size of the upsampler.
    pub fn forward(
        &self,
        x: &Tensor,
        skips: &[Tensor],
        temb: Option<&Tensor>,
        upsample_size: Option<(usize, usize)>,
        hook: LayerHook,
    ) -> Result<Tensor> {
        let mut skips = skips;
        let mut x = x.clone();
        for (i, r) in self.resnets.iter().enumerate() {
            let skip = take_skip(&mut skips, "UpBlock2D")?;
            x = after_layer(hook, i, r.forward(&Tensor::cat(&[&x, skip], 1)?, temb)?)?;
        }
        match &self.upsamplers {
            Some(u) => u.forward(&x, upsample_size),
            None => Ok(x),
        }
    }
}

/// Resnet + spatial transformer pairs over `cat([x, skip])`, then an optional upsampler.
#[derive(Clone, Debug)]
pub struct CrossAttnUpBlock2D {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
    pub upsamplers: Option<Upsample2D>,
}

impl CrossAttnUpBlock2D {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        prev_output_channel: usize,
        out_channels: usize,
        num_layers: usize,
        add_upsample: bool,
        rp: &ResnetParams,
        ap: &CrossAttnParams,
    ) -> Result<Self> {
        let mut resnets = Vec::with_capacity(num_layers);
        let mut attentions = Vec::with_capacity(num_layers);
        for i in 0..num_layers {
            let cin = up_resnet_in(i, num_layers, in_channels, prev_output_channel, out_channels);
            resnets.push(rp.resnet(vb.pp("resnets").pp(i), cin, out_channels)?);
            attentions.push(ap.transformer(vb.pp("attentions").pp(i), out_channels, rp.groups, i)?);
        }
        let upsamplers = upsampler(&vb, add_upsample, out_channels)?;
        Ok(Self { resnets, attentions, upsamplers })
    }

    pub fn forward(
        &self,
        x: &Tensor,
        skips: &[Tensor],
        temb: Option<&Tensor>,
        encoder_hidden_states: &Tensor,
        upsample_size: Option<(usize, usize)>,
        hook: LayerHook,
    ) -> Result<Tensor> {
        let mut skips = skips;
        let mut x = x.clone();
        for (i, (r, a)) in self.resnets.iter().zip(&self.attentions).enumerate() {
            let skip = take_skip(&mut skips, "CrossAttnUpBlock2D")?;
            x = r.forward(&Tensor::cat(&[&x, skip], 1)?, temb)?;
            x = after_layer(hook, i, a.forward(&x, encoder_hidden_states)?)?;
        }
        match &self.upsamplers {
            Some(u) => u.forward(&x, upsample_size),
            None => Ok(x),
        }
    }
}

/// `resnets.0`, then `(attention, resnet)` pairs; the attentions are the VAE's single-head
/// group-norm self-attention (absent when `add_attention` is false). SSD-1B's UNet uses it with
/// no pairs: one resnet.
#[derive(Clone, Debug)]
pub struct UNetMidBlock2D {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Option<Attention>>,
}

impl UNetMidBlock2D {
    pub fn new(
        vb: VarBuilder,
        channels: usize,
        num_layers: usize,
        add_attention: bool,
        attention_head_dim: usize,
        rp: &ResnetParams,
    ) -> Result<Self> {
        let mut resnets = vec![rp.resnet(vb.pp("resnets").pp(0), channels, channels)?];
        let mut attentions = Vec::with_capacity(num_layers);
        for i in 0..num_layers {
            if add_attention {
                if attention_head_dim == 0 {
                    candle_core::bail!("{}: attention_head_dim is 0", vb.prefix())
                }
                let mut cfg = AttentionConfig::new(channels, None, channels / attention_head_dim, attention_head_dim);
                cfg.bias = true;
                cfg.norm_num_groups = Some(rp.groups);
                cfg.eps = rp.eps;
                cfg.residual_connection = true;
                cfg.rescale_output_factor = rp.output_scale_factor;
                attentions.push(Some(Attention::new(vb.pp("attentions").pp(i), &cfg)?));
            } else {
                attentions.push(None);
            }
            resnets.push(rp.resnet(vb.pp("resnets").pp(i + 1), channels, channels)?);
        }
        Ok(Self { resnets, attentions })
    }

    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let mut x = x.clone();
        for (i, r) in self.resnets.iter().enumerate() {
            if i > 0 {
                if let Some(Some(a)) = self.attentions.get(i - 1) {
                    x = a.forward_spatial(&x)?;
                }
            }
            x = r.forward(&x, temb)?;
        }
        Ok(x)
    }
}

/// `resnets.0`, then one `(transformer, resnet)` pair.
#[derive(Clone, Debug)]
pub struct UNetMidBlock2DCrossAttn {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
}

impl UNetMidBlock2DCrossAttn {
    pub fn new(vb: VarBuilder, channels: usize, rp: &ResnetParams, ap: &CrossAttnParams) -> Result<Self> {
        let num_layers = 1;
        let mut resnets = vec![rp.resnet(vb.pp("resnets").pp(0), channels, channels)?];
        let mut attentions = Vec::with_capacity(num_layers);
        for i in 0..num_layers {
            attentions.push(ap.transformer(vb.pp("attentions").pp(i), channels, rp.groups, i)?);
            resnets.push(rp.resnet(vb.pp("resnets").pp(i + 1), channels, channels)?);
        }
        Ok(Self { resnets, attentions })
    }

    pub fn forward(
        &self,
        x: &Tensor,
        temb: Option<&Tensor>,
        encoder_hidden_states: &Tensor,
        hook: LayerHook,
    ) -> Result<Tensor> {
        let mut x = x.clone();
        for (i, r) in self.resnets.iter().enumerate() {
            if i > 0 {
                if let Some(a) = self.attentions.get(i - 1) {
                    // AnimateDiff's mid block: attention, motion module, resnet.
                    x = after_layer(hook, i - 1, a.forward(&x, encoder_hidden_states)?)?;
                }
            }
            x = r.forward(&x, temb)?;
        }
        Ok(x)
    }
}

/// VAE encoder block: resnets without time embedding, then an optional downsampler.
#[derive(Clone, Debug)]
pub struct DownEncoderBlock2D {
    pub resnets: Vec<ResnetBlock2D>,
    pub downsamplers: Option<Downsample2D>,
}

impl DownEncoderBlock2D {
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        num_layers: usize,
        add_downsample: bool,
        downsample_padding: usize,
        rp: &ResnetParams,
    ) -> Result<Self> {
        let DownBlock2D { resnets, downsamplers } =
            DownBlock2D::new(vb, in_channels, out_channels, num_layers, add_downsample, downsample_padding, rp)?;
        Ok(Self { resnets, downsamplers })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        for r in &self.resnets {
            x = r.forward(&x, None)?;
        }
        match &self.downsamplers {
            Some(d) => d.forward(&x),
            None => Ok(x),
        }
    }
}

/// VAE decoder block: resnets without skips or time embedding, then an optional upsampler.
#[derive(Clone, Debug)]
pub struct UpDecoderBlock2D {
    pub resnets: Vec<ResnetBlock2D>,
    pub upsamplers: Option<Upsample2D>,
}

impl UpDecoderBlock2D {
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        num_layers: usize,
        add_upsample: bool,
        rp: &ResnetParams,
    ) -> Result<Self> {
        let resnets = (0..num_layers)
            .map(|i| {
                let cin = if i == 0 { in_channels } else { out_channels };
                rp.resnet(vb.pp("resnets").pp(i), cin, out_channels)
            })
            .collect::<Result<Vec<_>>>()?;
        let upsamplers = upsampler(&vb, add_upsample, out_channels)?;
        Ok(Self { resnets, upsamplers })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        for r in &self.resnets {
            x = r.forward(&x, None)?;
        }
        match &self.upsamplers {
            Some(u) => u.forward(&x, None),
            None => Ok(x),
        }
    }
}
