//! transformers' `CLIPTextModel` and `CLIPTextModelWithProjection` (the Stable Diffusion text
//! encoders), inference only.
//!
//! Weights load in both layouts found in the wild: Stable Diffusion checkpoints (and
//! `CLIPTextModelWithProjection` saves) name them `text_model.embeddings.token_embedding.weight`
//! ..., transformers 5 `CLIPTextModel.save_pretrained` writes them without the `text_model.`
//! prefix. An `embeddings.position_ids` buffer, when present, is ignored.

use crate::nn::{Activation, LayerNorm, Linear};
use crate::ops;
use candle_core::{bail, DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;
use serde::Deserialize;

/// `eos_token_id` of a config: one id or (rarely) a list of ids.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum EosTokenId {
    One(i64),
    Many(Vec<i64>),
}

/// `text_encoder/config.json` (`CLIPTextConfig`), with transformers' defaults.
#[derive(Clone, Debug, Deserialize)]
pub struct ClipTextConfig {
    #[serde(default = "default_vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "default_hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "default_intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "default_projection_dim")]
    pub projection_dim: Option<usize>,
    #[serde(default = "default_num_hidden_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "default_num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_pad_token_id")]
    pub pad_token_id: Option<i64>,
    #[serde(default = "default_bos_token_id")]
    pub bos_token_id: Option<i64>,
    #[serde(default = "default_eos_token_id")]
    pub eos_token_id: Option<EosTokenId>,
}

fn default_vocab_size() -> usize {
    49408
}
fn default_hidden_size() -> usize {
    512
}
fn default_intermediate_size() -> usize {
    2048
}
fn default_projection_dim() -> Option<usize> {
    Some(512)
}
fn default_num_hidden_layers() -> usize {
    12
}
fn default_num_attention_heads() -> usize {
    8
}
fn default_max_position_embeddings() -> usize {
    77
}
fn default_hidden_act() -> String {
    "quick_gelu".to_string()
}
fn default_layer_norm_eps() -> f64 {
    1e-5
}
fn default_pad_token_id() -> Option<i64> {
    Some(1)
}
fn default_bos_token_id() -> Option<i64> {
    Some(49406)
}
fn default_eos_token_id() -> Option<EosTokenId> {
    Some(EosTokenId::One(49407))
}

impl Default for ClipTextConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("all fields have defaults")
    }
}

/// What a CLIP text encoder returns.
#[derive(Clone, Debug)]
pub struct ClipTextOutput {
    /// Final-layer-normed output of the last layer, `[b, seq, hidden]`.
    pub last_hidden_state: Tensor,
    /// `hidden_states[-2]`: the output of the second-to-last layer, not layer-normed
    /// (SDXL's prompt embeddings; `clip_skip`).
    pub penultimate_hidden_state: Tensor,
    /// `last_hidden_state` at each sequence's end-of-text position, `[b, hidden]`.
    pub pooler_output: Tensor,
}

/// Every hidden state, as transformers' `output_hidden_states=True` returns them.
#[derive(Clone, Debug)]
pub struct ClipTextHiddenStates {
    /// `hidden_states`: the embeddings, then the output of each layer (`num_hidden_layers + 1`
    /// tensors, none layer-normed).
    pub hidden_states: Vec<Tensor>,
    pub last_hidden_state: Tensor,
    pub pooler_output: Tensor,
}

/// What `CLIPTextModelWithProjection` returns.
#[derive(Clone, Debug)]
pub struct ClipTextProjectionOutput {
    /// `text_projection(pooler_output)`, `[b, projection_dim]`.
    pub text_embeds: Tensor,
    pub last_hidden_state: Tensor,
    pub penultimate_hidden_state: Tensor,
    pub pooler_output: Tensor,
}

#[derive(Clone, Debug)]
struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    num_heads: usize,
    head_dim: usize,
    scale: f64,
}

impl ClipAttention {
    fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let head_dim = h / cfg.num_attention_heads;
        Ok(Self {
            q_proj: Linear::new(vb.pp("q_proj"), h, h, true)?,
            k_proj: Linear::new(vb.pp("k_proj"), h, h, true)?,
            v_proj: Linear::new(vb.pp("v_proj"), h, h, true)?,
            out_proj: Linear::new(vb.pp("out_proj"), h, h, true)?,
            num_heads: cfg.num_attention_heads,
            head_dim,
            scale: (head_dim as f64).powf(-0.5),
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, seq, hidden) = x.dims3()?;
        let heads = |t: Tensor| -> Result<Tensor> {
            t.reshape((b, seq, self.num_heads, self.head_dim))?.transpose(1, 2)?.contiguous()
        };
        let q = heads(self.q_proj.forward(x)?)?;
        let k = heads(self.k_proj.forward(x)?)?;
        let v = heads(self.v_proj.forward(x)?)?;
        let y = ops::attention(&q, &k, &v, self.scale, true, self.q_proj.weight.dtype())?;
        let y = y.transpose(1, 2)?.contiguous()?.reshape((b, seq, hidden))?;
        self.out_proj.forward(&y)
    }
}

#[derive(Clone, Debug)]
struct ClipEncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: ClipAttention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl ClipEncoderLayer {
    fn new(vb: VarBuilder, cfg: &ClipTextConfig, act: Activation) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            layer_norm1: LayerNorm::new(vb.pp("layer_norm1"), h, cfg.layer_norm_eps)?,
            self_attn: ClipAttention::new(vb.pp("self_attn"), cfg)?,
            layer_norm2: LayerNorm::new(vb.pp("layer_norm2"), h, cfg.layer_norm_eps)?,
            fc1: Linear::new(vb.pp("mlp").pp("fc1"), h, cfg.intermediate_size, true)?,
            fc2: Linear::new(vb.pp("mlp").pp("fc2"), cfg.intermediate_size, h, true)?,
            act,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.self_attn.forward(&self.layer_norm1.forward(x)?)?;
        let x = (x + h)?;
        let h = self.fc1.forward(&self.layer_norm2.forward(&x)?)?;
        let h = self.fc2.forward(&self.act.forward(&h)?)?;
        x + h
    }
}

/// How the pooled output picks its position in each sequence.
#[derive(Clone, Debug, PartialEq)]
enum PoolRule {
    /// Legacy configs (`eos_token_id == 2`): the position of the largest id.
    ArgmaxId,
    /// The first position holding one of these ids (0 when none does).
    FirstOf(Vec<i64>),
}

/// transformers' `CLIPTextModel`.
#[derive(Clone, Debug)]
pub struct ClipTextModel {
    /// Kept in the weights' dtype (half precision: half the memory); the rows looked up are
    /// converted to `dtype`.
    token_embedding: Tensor,
    position_embedding: Tensor,
    /// The activations' dtype (the `VarBuilder`'s).
    dtype: DType,
    layers: Vec<ClipEncoderLayer>,
    final_layer_norm: LayerNorm,
    pool_rule: PoolRule,
    config: ClipTextConfig,
}

impl ClipTextModel {
    /// Build from a `VarBuilder` over the component's weights (either layout).
    pub fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        let vb =
            if vb.contains_tensor("text_model.embeddings.token_embedding.weight") { vb.pp("text_model") } else { vb };
        Self::new_unprefixed(vb, cfg)
    }

    /// Build from a `VarBuilder` already at the text model's root (`embeddings.`, `encoder.`,
    /// `final_layer_norm.`).
    pub fn new_unprefixed(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) {
            bail!(
                "text encoder config: hidden_size {} is not a multiple of num_attention_heads {}",
                cfg.hidden_size,
                cfg.num_attention_heads
            )
        }
        let act = Activation::from_name(&cfg.hidden_act)?;
        let h = cfg.hidden_size;
        let emb = vb.pp("embeddings");
        let token_embedding = emb.get((cfg.vocab_size, h), "token_embedding.weight")?;
        let position_embedding = emb.get((cfg.max_position_embeddings, h), "position_embedding.weight")?;
        let enc = vb.pp("encoder").pp("layers");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| ClipEncoderLayer::new(enc.pp(i), cfg, act))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = LayerNorm::new(vb.pp("final_layer_norm"), h, cfg.layer_norm_eps)?;
        let pool_rule = match &cfg.eos_token_id {
            Some(EosTokenId::One(2)) => PoolRule::ArgmaxId,
            Some(EosTokenId::One(id)) => PoolRule::FirstOf(vec![*id]),
            Some(EosTokenId::Many(ids)) => PoolRule::FirstOf(ids.clone()),
            None => PoolRule::FirstOf(vec![]),
        };
        Ok(Self {
            token_embedding,
            position_embedding,
            dtype: vb.dtype(),
            layers,
            final_layer_norm,
            pool_rule,
            config: cfg.clone(),
        })
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// `input_ids`: `[b, seq]` (u32 or i64), `seq <= max_position_embeddings`. Causal
    /// attention, no padding mask (as diffusers calls it).
    pub fn forward(&self, input_ids: &Tensor) -> Result<ClipTextOutput> {
        let (ids, rows) = self.check_ids(input_ids)?;
        let mut x = self.embed(&ids)?;
        let mut penultimate = x.clone();
        for layer in &self.layers {
            penultimate = x;
            x = layer.forward(&penultimate)?;
        }
        let last_hidden_state = self.final_layer_norm.forward(&x)?;
        let pooler_output = self.pool(&last_hidden_state, &rows)?;
        Ok(ClipTextOutput { last_hidden_state, penultimate_hidden_state: penultimate, pooler_output })
    }

    /// Like [`Self::forward`], keeping every hidden state (`output_hidden_states=True`).
    pub fn forward_hidden_states(&self, input_ids: &Tensor) -> Result<ClipTextHiddenStates> {
        let (ids, rows) = self.check_ids(input_ids)?;
        let mut hidden_states = vec![self.embed(&ids)?];
        for layer in &self.layers {
            let next = layer.forward(hidden_states.last().expect("not empty"))?;
            hidden_states.push(next);
        }
        let last_hidden_state = self.final_layer_norm(hidden_states.last().expect("not empty"))?;
        let pooler_output = self.pool(&last_hidden_state, &rows)?;
        Ok(ClipTextHiddenStates { hidden_states, last_hidden_state, pooler_output })
    }

    /// The model's `final_layer_norm` (diffusers applies it to `hidden_states[-(clip_skip + 1)]`).
    pub fn final_layer_norm(&self, x: &Tensor) -> Result<Tensor> {
        self.final_layer_norm.forward(x)
    }

    /// Validate ids; returns them as u32 `[b, seq]` and as rows of i64 for pooling.
    fn check_ids(&self, input_ids: &Tensor) -> Result<(Tensor, Vec<Vec<i64>>)> {
        let (_, seq) = input_ids.dims2()?;
        if seq > self.config.max_position_embeddings {
            bail!(
                "text encoder: sequence length {seq} exceeds max_position_embeddings {}",
                self.config.max_position_embeddings
            )
        }
        let rows: Vec<Vec<i64>> = match input_ids.dtype() {
            DType::U32 | DType::I64 | DType::U8 => input_ids.to_dtype(DType::I64)?.to_vec2()?,
            other => bail!("text encoder: input_ids must be u32 or i64, got {other:?}"),
        };
        let vocab = self.config.vocab_size as i64;
        if let Some(bad) = rows.iter().flatten().find(|&&id| id < 0 || id >= vocab) {
            bail!("text encoder: token id {bad} is outside the vocabulary (size {vocab})")
        }
        let ids = input_ids.to_dtype(DType::U32)?;
        Ok((ids, rows))
    }

    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, seq) = ids.dims2()?;
        let h = self.config.hidden_size;
        let tok =
            self.token_embedding.index_select(&ids.flatten_all()?, 0)?.reshape((b, seq, h))?.to_dtype(self.dtype)?;
        let pos = self.position_embedding.narrow(0, 0, seq)?.to_dtype(self.dtype)?;
        tok.broadcast_add(&pos)
    }

    fn pool(&self, last: &Tensor, rows: &[Vec<i64>]) -> Result<Tensor> {
        let positions: Vec<u32> = rows
            .iter()
            .map(|row| {
                let pos = match &self.pool_rule {
                    // torch.argmax: the first of equal maxima.
                    PoolRule::ArgmaxId => {
                        let max = row.iter().copied().max().unwrap_or(0);
                        row.iter().position(|&v| v == max).unwrap_or(0)
                    }
                    PoolRule::FirstOf(eos) => row.iter().position(|v| eos.contains(v)).unwrap_or(0),
                };
                pos as u32
            })
            .collect();
        let b = rows.len();
        let idx = Tensor::from_vec(positions, (b, 1, 1), last.device())?
            .broadcast_as((b, 1, last.dim(D::Minus1)?))?
            .contiguous()?;
        last.gather(&idx, 1)?.squeeze(1)
    }
}

impl Module for ClipTextModel {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(ClipTextModel::forward(self, xs)?.last_hidden_state)
    }
}

/// transformers' `CLIPTextModelWithProjection` (SDXL's `text_encoder_2`).
#[derive(Clone, Debug)]
pub struct ClipTextModelWithProjection {
    pub text_model: ClipTextModel,
    text_projection: Linear,
}

impl ClipTextModelWithProjection {
    /// Weights: `text_model.*` (or the text model at the root) and `text_projection.weight`.
    pub fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        let Some(projection_dim) = cfg.projection_dim else {
            bail!("text encoder config: CLIPTextModelWithProjection needs `projection_dim`")
        };
        let text_projection = Linear::new(vb.pp("text_projection"), cfg.hidden_size, projection_dim, false)?;
        let text_model = ClipTextModel::new(vb, cfg)?;
        Ok(Self { text_model, text_projection })
    }

    pub fn config(&self) -> &ClipTextConfig {
        self.text_model.config()
    }

    pub fn forward(&self, input_ids: &Tensor) -> Result<ClipTextProjectionOutput> {
        let out = self.text_model.forward(input_ids)?;
        let text_embeds = self.text_projection.forward(&out.pooler_output)?;
        Ok(ClipTextProjectionOutput {
            text_embeds,
            last_hidden_state: out.last_hidden_state,
            penultimate_hidden_state: out.penultimate_hidden_state,
            pooler_output: out.pooler_output,
        })
    }

    /// `text_projection` applied to a pooled output.
    pub fn project(&self, pooled: &Tensor) -> Result<Tensor> {
        self.text_projection.forward(pooled)
    }
}
