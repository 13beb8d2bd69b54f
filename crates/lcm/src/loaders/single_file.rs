//! Single-file checkpoints in the original layouts (CompVis `ldm` for SD1.x / SD2.x, Stability's
//! `sgm` for SDXL), as community models ship them: what diffusers' `from_single_file` does.
//!
//! The architecture is read from the keys (as diffusers' `infer_diffusers_model_type`), the
//! configs are the ones diffusers would fetch for it (embedded here, so nothing is downloaded),
//! and every weight is renamed to diffusers' name by `diffusers_name` (one table of rules, the
//! inverse of which `tests/fixtures/make_single_file_fixtures.py` checks against diffusers' own
//! converters). Weights are read from the file lazily like any other safetensors file.

use crate::loaders::weights::{ComponentWeights, WeightView};
use anyhow::{bail, Result};
use std::path::Path;

/// The model families a single file can hold, with the diffusers repository whose configs
/// `from_single_file` uses for each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    /// stable-diffusion-v1-5/stable-diffusion-v1-5
    Sd15,
    /// stable-diffusion-v1-5/stable-diffusion-inpainting
    Sd15Inpainting,
    /// stabilityai/stable-diffusion-2-1 (768-v)
    Sd21,
    /// stabilityai/stable-diffusion-2-inpainting
    Sd2Inpainting,
    /// stabilityai/stable-diffusion-xl-base-1.0
    Sdxl,
    /// diffusers/stable-diffusion-xl-1.0-inpainting-0.1
    SdxlInpainting,
}

/// The component configs of an architecture (diffusers' file contents).
pub struct EmbeddedConfigs {
    pub model_index: &'static str,
    pub unet: &'static str,
    pub vae: &'static str,
    pub text_encoder: &'static str,
    pub text_encoder_2: Option<&'static str>,
    pub scheduler: &'static str,
    /// `tokenizer_config.json` and `special_tokens_map.json` of `tokenizer/`.
    pub tokenizer: (&'static str, &'static str),
    /// The same for SDXL's `tokenizer_2/`.
    pub tokenizer_2: Option<(&'static str, &'static str)>,
}

macro_rules! configs {
    ($dir:literal, $te2:expr, $tok2:expr) => {
        EmbeddedConfigs {
            model_index: include_str!(concat!("single_file_configs/", $dir, "/model_index.json")),
            unet: include_str!(concat!("single_file_configs/", $dir, "/unet.json")),
            vae: include_str!(concat!("single_file_configs/", $dir, "/vae.json")),
            text_encoder: include_str!(concat!("single_file_configs/", $dir, "/text_encoder.json")),
            text_encoder_2: $te2,
            scheduler: include_str!(concat!("single_file_configs/", $dir, "/scheduler.json")),
            tokenizer: (
                include_str!(concat!("single_file_configs/", $dir, "/tokenizer_config.json")),
                include_str!(concat!("single_file_configs/", $dir, "/special_tokens_map.json")),
            ),
            tokenizer_2: $tok2,
        }
    };
    (xl $dir:literal) => {
        configs!(
            $dir,
            Some(include_str!(concat!("single_file_configs/", $dir, "/text_encoder_2.json"))),
            Some((
                include_str!(concat!("single_file_configs/", $dir, "/tokenizer_2_config.json")),
                include_str!(concat!("single_file_configs/", $dir, "/special_tokens_2_map.json")),
            ))
        )
    };
}

impl Architecture {
    /// A short name (also the name of its configs folder and test listings).
    pub fn name(self) -> &'static str {
        match self {
            Self::Sd15 => "sd15",
            Self::Sd15Inpainting => "sd15_inpainting",
            Self::Sd21 => "sd21",
            Self::Sd2Inpainting => "sd2_inpainting",
            Self::Sdxl => "sdxl",
            Self::SdxlInpainting => "sdxl_inpainting",
        }
    }

    pub fn configs(self) -> EmbeddedConfigs {
        match self {
            Self::Sd15 => configs!("sd15", None, None),
            Self::Sd15Inpainting => configs!("sd15_inpainting", None, None),
            Self::Sd21 => configs!("sd21", None, None),
            Self::Sd2Inpainting => configs!("sd2_inpainting", None, None),
            Self::Sdxl => configs!(xl "sdxl"),
            Self::SdxlInpainting => configs!(xl "sdxl_inpainting"),
        }
    }

    fn is_xl(self) -> bool {
        matches!(self, Self::Sdxl | Self::SdxlInpainting)
    }

    fn is_v2(self) -> bool {
        matches!(self, Self::Sd21 | Self::Sd2Inpainting)
    }

    /// Detect the architecture from tensor names and shapes, with diffusers' marker keys.
    pub fn detect(shape: impl Fn(&str) -> Option<Vec<usize>>) -> Result<Self> {
        const V1: &str = "model.diffusion_model.output_blocks.11.0.skip_connection.weight";
        const V2: &str = "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight";
        const XL_BASE: &str = "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias";
        const XL_REFINER: &str = "conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias";
        const CONV_IN: &str = "model.diffusion_model.input_blocks.0.0.weight";
        let v2 = shape(V2).and_then(|s| s.last().copied()) == Some(1024);
        let xl = shape(XL_BASE).is_some();
        let Some(conv_in) = shape(CONV_IN) else {
            bail!(
                "no `model.diffusion_model.*` UNet weights: not a Stable Diffusion single-file checkpoint (a LoRA goes to --lora, an autoencoder to --vae)"
            )
        };
        Ok(match conv_in.get(1) {
            Some(9) if v2 => Self::Sd2Inpainting,
            Some(9) if xl => Self::SdxlInpainting,
            Some(9) => Self::Sd15Inpainting,
            _ if v2 => Self::Sd21,
            _ if xl => Self::Sdxl,
            _ if shape(XL_REFINER).is_some() => bail!("SDXL refiner checkpoints are not supported"),
            _ if shape("model.diffusion_model.input_blocks.10.0.skip_connection.bias").is_some() => {
                bail!("Stable Diffusion x4 upscaler checkpoints are not supported")
            }
            // diffusers falls back to SD1.x for any other UNet; so do we, but only when the
            // SD1.x marker is there (else the names would not match anyway).
            _ if shape(V1).is_some() => Self::Sd15,
            _ => bail!("unrecognised UNet layout (not SD1.x, SD2.x or SDXL)"),
        })
    }
}

/// The pipeline components a single file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Component {
    Unet,
    Vae,
    TextEncoder,
    TextEncoder2,
}

/// An opened single-file checkpoint: its architecture and its weights (original names).
pub struct SingleFile {
    pub arch: Architecture,
    weights: ComponentWeights,
}

/// What a file is, judged by its extension: pickled PyTorch checkpoints run code when loaded,
/// so they are refused (diffusers too only loads them with `weights_only` unpickling).
pub fn is_pickle(path: &Path) -> bool {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    matches!(ext.as_str(), "ckpt" | "pt" | "pth" | "bin" | "pkl")
}

impl SingleFile {
    pub fn open(path: &Path) -> Result<Self> {
        if is_pickle(path) {
            bail!(
                "{} is a pickled PyTorch checkpoint, which lcm never unpickles (that can run code); use the model's .safetensors file",
                path.display()
            );
        }
        if !path.is_file() {
            crate::error::not_found!("checkpoint file {} does not exist", path.display());
        }
        let weights = ComponentWeights::open_files(&[path.to_path_buf()])?;
        let arch = Architecture::detect(|n| weights.shape(n))
            .map_err(|e| anyhow::anyhow!("cannot load single-file checkpoint {}: {e}", path.display()))?;
        Ok(Self { arch, weights })
    }

    /// The weights of one component under diffusers' names. `layers_per_block` (UNet) and
    /// `up_blocks` (VAE) come from the component's config, as in diffusers' converters.
    pub fn component(
        &self,
        component: Component,
        layers_per_block: usize,
        up_blocks: usize,
    ) -> Result<ComponentWeights> {
        let entries = renames(self.arch, component, self.weights.names(), layers_per_block, up_blocks);
        if entries.is_empty() {
            bail!("the checkpoint has no {component:?} weights");
        }
        self.weights.renamed(&entries)
    }
}

/// `(diffusers name, stored name, view)` for every tensor of `component` among `stored`.
fn renames(
    arch: Architecture,
    component: Component,
    stored: &[String],
    lpb: usize,
    up: usize,
) -> Vec<(String, String, WeightView)> {
    let mut out = Vec::new();
    for s in stored {
        match diffusers_name(arch, component, s, lpb, up) {
            Some((name, One(view))) => out.push((name, s.clone(), view)),
            // A fused q/k/v projection becomes three weights.
            Some((name, Fused)) => {
                for (index, p) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                    out.push((name.replace("{qkv}", p), s.clone(), WeightView::Rows { index, parts: 3 }));
                }
            }
            None => {}
        }
    }
    out
}

/// The diffusers names and shapes a single file's tensors (`name`, `shape`) give for one
/// component: the renaming without the file (for checking key listings of real checkpoints).
pub fn map_listing(
    arch: Architecture,
    component: Component,
    listing: &[(String, Vec<usize>)],
    layers_per_block: usize,
    up_blocks: usize,
) -> Result<Vec<(String, Vec<usize>)>> {
    let shapes: std::collections::HashMap<&str, &Vec<usize>> = listing.iter().map(|(n, s)| (n.as_str(), s)).collect();
    let names: Vec<String> = listing.iter().map(|(n, _)| n.clone()).collect();
    renames(arch, component, &names, layers_per_block, up_blocks)
        .into_iter()
        .map(|(name, stored, view)| {
            let shape = view
                .apply(shapes[stored.as_str()])
                .ok_or_else(|| anyhow::anyhow!("{stored} cannot be cut as {view:?}"))?;
            Ok((name, shape))
        })
        .collect()
}

/// How one stored tensor maps: to one weight, or (OpenCLIP `in_proj`) to three.
enum Mapped {
    One(WeightView),
    Fused,
}
use Mapped::{Fused, One};

/// The diffusers name of an original-layout tensor of `component`, or `None` when the tensor
/// belongs to another component or to nothing diffusers loads (EMA copies, scheduler buffers,
/// `position_ids`, `logit_scale`). For a fused OpenCLIP `in_proj` the name holds `{qkv}`.
fn diffusers_name(
    arch: Architecture,
    component: Component,
    stored: &str,
    layers_per_block: usize,
    up_blocks: usize,
) -> Option<(String, Mapped)> {
    let whole = |n: String| Some((n, One(WeightView::Whole)));
    match component {
        Component::Unet => whole(unet_name(stored.strip_prefix("model.diffusion_model.")?, layers_per_block)?),
        Component::Vae => {
            let rest = stored.strip_prefix("first_stage_model.").or_else(|| stored.strip_prefix("vae."))?;
            let (name, squeeze) = vae_name(rest, up_blocks)?;
            Some((name, One(if squeeze { WeightView::Squeezed } else { WeightView::Whole })))
        }
        Component::TextEncoder if arch.is_v2() => open_clip_name(stored.strip_prefix("cond_stage_model.model.")?),
        Component::TextEncoder => {
            let prefix =
                if arch.is_xl() { "conditioner.embedders.0.transformer." } else { "cond_stage_model.transformer." };
            let rest = stored.strip_prefix(prefix)?;
            if rest.ends_with("position_ids") {
                return None;
            }
            // Old checkpoints omit `text_model.` (transformers' earlier CLIPTextModel layout).
            whole(if rest.starts_with("text_model.") { rest.to_string() } else { format!("text_model.{rest}") })
        }
        Component::TextEncoder2 if arch.is_xl() => {
            open_clip_name(stored.strip_prefix("conditioner.embedders.1.model.")?)
        }
        Component::TextEncoder2 => None,
    }
}

/// `in_layers.0` -> `norm1`, ...: a UNet ResBlock's parts.
fn unet_resnet(rest: &str) -> Option<String> {
    const PARTS: [(&str, &str); 6] = [
        ("in_layers.0.", "norm1."),
        ("in_layers.2.", "conv1."),
        ("out_layers.0.", "norm2."),
        ("out_layers.3.", "conv2."),
        ("emb_layers.1.", "time_emb_proj."),
        ("skip_connection.", "conv_shortcut."),
    ];
    PARTS.iter().find_map(|(old, new)| rest.strip_prefix(old).map(|leaf| format!("{new}{leaf}")))
}

/// Split `"12.0.rest"` into `(12, "0.rest")`.
fn index_prefix(s: &str) -> Option<(usize, &str)> {
    let (i, rest) = s.split_once('.')?;
    Some((i.parse().ok()?, rest))
}

fn unet_name(k: &str, lpb: usize) -> Option<String> {
    const FIXED: [(&str, &str); 7] = [
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        ("input_blocks.0.0.", "conv_in."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
        ("label_emb.0.0.", "add_embedding.linear_1."),
        ("label_emb.0.2.", "add_embedding.linear_2."),
    ];
    if let Some(n) = FIXED.iter().find_map(|(old, new)| k.strip_prefix(old).map(|leaf| format!("{new}{leaf}"))) {
        return Some(n);
    }
    let per = lpb + 1;
    if let Some((i, rest)) = k.strip_prefix("input_blocks.").and_then(index_prefix) {
        let (block, layer) = ((i.checked_sub(1)?) / per, (i - 1) % per);
        if let Some(leaf) = rest.strip_prefix("0.op.") {
            return Some(format!("down_blocks.{}.downsamplers.0.conv.{leaf}", i / per - 1));
        }
        if let Some(r) = rest.strip_prefix("0.") {
            return Some(format!("down_blocks.{block}.resnets.{layer}.{}", unet_resnet(r)?));
        }
        return rest.strip_prefix("1.").map(|r| format!("down_blocks.{block}.attentions.{layer}.{r}"));
    }
    if let Some((i, rest)) = k.strip_prefix("middle_block.").and_then(index_prefix) {
        return match i {
            0 | 2 => Some(format!("mid_block.resnets.{}.{}", i / 2, unet_resnet(rest)?)),
            1 => Some(format!("mid_block.attentions.0.{rest}")),
            _ => None,
        };
    }
    if let Some((i, rest)) = k.strip_prefix("output_blocks.").and_then(index_prefix) {
        let (block, layer) = (i / per, i % per);
        if let Some(leaf) = rest.strip_prefix("1.conv.").or_else(|| rest.strip_prefix("2.conv.")) {
            return Some(format!("up_blocks.{block}.upsamplers.0.conv.{leaf}"));
        }
        if let Some(r) = rest.strip_prefix("0.") {
            return Some(format!("up_blocks.{block}.resnets.{layer}.{}", unet_resnet(r)?));
        }
        return rest.strip_prefix("1.").map(|r| format!("up_blocks.{block}.attentions.{layer}.{r}"));
    }
    None
}

/// A VAE name and whether the weight is a 1x1 convolution kernel diffusers holds as a linear one.
fn vae_name(k: &str, up_blocks: usize) -> Option<(String, bool)> {
    let (side, rest) = k.split_once('.')?;
    if !matches!(side, "encoder" | "decoder") {
        return matches!(side, "quant_conv" | "post_quant_conv").then(|| (k.to_string(), false));
    }
    let resnet = |r: &str| r.replacen("nin_shortcut.", "conv_shortcut.", 1);
    let name = if let Some(leaf) = rest.strip_prefix("norm_out.") {
        format!("conv_norm_out.{leaf}")
    } else if rest.starts_with("conv_in.") || rest.starts_with("conv_out.") {
        rest.to_string()
    } else if let Some(r) = rest.strip_prefix("mid.attn_1.") {
        let (part, leaf) = r.split_once('.')?;
        let part = match part {
            "norm" => "group_norm",
            "q" => "to_q",
            "k" => "to_k",
            "v" => "to_v",
            "proj_out" => "to_out.0",
            _ => return None,
        };
        return Some((format!("{side}.mid_block.attentions.0.{part}.{leaf}"), part != "group_norm"));
    } else if let Some(r) = rest.strip_prefix("mid.block_") {
        let (i, r) = index_prefix(r)?;
        format!("mid_block.resnets.{}.{}", i.checked_sub(1)?, resnet(r))
    } else if let Some((i, r)) = rest.strip_prefix("down.").and_then(index_prefix) {
        if let Some(r) = r.strip_prefix("block.") {
            let (j, r) = index_prefix(r)?;
            format!("down_blocks.{i}.resnets.{j}.{}", resnet(r))
        } else {
            format!("down_blocks.{i}.downsamplers.0.conv.{}", r.strip_prefix("downsample.conv.")?)
        }
    } else if let Some((i, r)) = rest.strip_prefix("up.").and_then(index_prefix) {
        let block = up_blocks.checked_sub(i + 1)?;
        if let Some(r) = r.strip_prefix("block.") {
            let (j, r) = index_prefix(r)?;
            format!("up_blocks.{block}.resnets.{j}.{}", resnet(r))
        } else {
            format!("up_blocks.{block}.upsamplers.0.conv.{}", r.strip_prefix("upsample.conv.")?)
        }
    } else {
        return None;
    };
    Some((format!("{side}.{name}"), false))
}

/// An OpenCLIP text tower's name (SD2 `cond_stage_model.model.`, SDXL
/// `conditioner.embedders.1.model.`) in transformers' `CLIPTextModel(WithProjection)` layout.
fn open_clip_name(k: &str) -> Option<(String, Mapped)> {
    let whole = |n: String| Some((n, One(WeightView::Whole)));
    match k {
        "token_embedding.weight" => return whole("text_model.embeddings.token_embedding.weight".into()),
        "positional_embedding" => return whole("text_model.embeddings.position_embedding.weight".into()),
        "text_projection" => return Some(("text_projection.weight".into(), One(WeightView::Transposed))),
        _ => {}
    }
    if let Some(leaf) = k.strip_prefix("ln_final.") {
        return whole(format!("text_model.final_layer_norm.{leaf}"));
    }
    let (i, rest) = k.strip_prefix("transformer.resblocks.").and_then(index_prefix)?;
    let layer = format!("text_model.encoder.layers.{i}");
    if let Some(kind) = rest.strip_prefix("attn.in_proj_") {
        return Some((format!("{layer}.self_attn.{{qkv}}.{kind}"), Fused));
    }
    const PARTS: [(&str, &str); 5] = [
        ("ln_1.", "layer_norm1."),
        ("ln_2.", "layer_norm2."),
        ("attn.out_proj.", "self_attn.out_proj."),
        ("mlp.c_fc.", "mlp.fc1."),
        ("mlp.c_proj.", "mlp.fc2."),
    ];
    let part = PARTS.iter().find_map(|(old, new)| rest.strip_prefix(old).map(|leaf| format!("{new}{leaf}")))?;
    whole(format!("{layer}.{part}"))
}
