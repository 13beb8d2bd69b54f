//! LoRA adapters: reading the key layouts found in the wild and turning them into low-rank
//! weight updates on diffusers' weight names.
//!
//! Layouts understood (all map onto the same `(component, module, down, up, alpha)` records):
//! - diffusers / PEFT: `unet.<module>.lora_A.weight` / `lora_B.weight` (also `text_encoder.`,
//!   `text_encoder_2.`, and `.lora.down.weight` / `.lora.up.weight`);
//! - diffusers' older attention-processor layout: `unet.<block>.processor.to_q_lora.down.weight`,
//!   `text_encoder.<module>.lora_linear_layer.down.weight`;
//! - kohya / AUTOMATIC1111: `lora_unet_<module_with_underscores>.lora_down.weight`,
//!   `.lora_up.weight`, `.alpha` (`lora_te_`, `lora_te1_`, `lora_te2_` for text encoders).
//!
//! Module names are resolved against the weight names the model actually has, so the
//! underscore-joined kohya names need no hand-written tables.

use crate::loaders::weights::{one_line, ComponentWeights, LowRankDelta, WeightDeltas};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The file diffusers' `load_lora_weights` looks for in a folder or repo.
pub const DEFAULT_WEIGHT_NAME: &str = "pytorch_lora_weights.safetensors";

/// Which network a LoRA module belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LoraComponent {
    Unet,
    TextEncoder,
    TextEncoder2,
}

impl LoraComponent {
    pub fn name(self) -> &'static str {
        match self {
            Self::Unet => "unet",
            Self::TextEncoder => "text_encoder",
            Self::TextEncoder2 => "text_encoder_2",
        }
    }
}

/// How a module is named in the file.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum ModuleKey {
    /// diffusers' dotted module path.
    Dotted(String),
    /// kohya's path with every `.` turned into `_`.
    Underscored(String),
}

#[derive(Default)]
struct RawModule {
    down: Option<Tensor>,
    up: Option<Tensor>,
    alpha: Option<f64>,
    keys: Vec<String>,
}

/// One LoRA file, parsed (not yet matched to a model).
pub struct LoraFile {
    pub source: String,
    modules: BTreeMap<(LoraComponent, ModuleKey), RawModule>,
    /// `lora_alpha` from diffusers' adapter metadata, when the file carries it.
    metadata_alpha: HashMap<LoraComponent, MetadataAlpha>,
}

#[derive(Clone, Debug, Default)]
struct MetadataAlpha {
    lora_alpha: Option<f64>,
    r: Option<f64>,
    alpha_pattern: HashMap<String, f64>,
    rank_pattern: HashMap<String, f64>,
}

/// Split a tensor key into (component, module key, part), part being `down`, `up` or `alpha`.
fn parse_key(key: &str) -> Option<(LoraComponent, ModuleKey, &'static str)> {
    // kohya / A1111.
    for (prefix, comp) in [
        ("lora_unet_", LoraComponent::Unet),
        ("lora_te1_", LoraComponent::TextEncoder),
        ("lora_te2_", LoraComponent::TextEncoder2),
        ("lora_te_", LoraComponent::TextEncoder),
    ] {
        if let Some(rest) = key.strip_prefix(prefix) {
            for (suffix, part) in [(".lora_down.weight", "down"), (".lora_up.weight", "up"), (".alpha", "alpha")] {
                if let Some(module) = rest.strip_suffix(suffix) {
                    return Some((comp, ModuleKey::Underscored(module.to_string()), part));
                }
            }
            return None;
        }
    }
    // diffusers / PEFT, current and older layouts.
    let (comp, rest) = if let Some(r) = key.strip_prefix("unet.") {
        (LoraComponent::Unet, r)
    } else if let Some(r) = key.strip_prefix("text_encoder_2.") {
        (LoraComponent::TextEncoder2, r)
    } else if let Some(r) = key.strip_prefix("text_encoder.") {
        (LoraComponent::TextEncoder, r)
    } else if let Some(r) = key.strip_prefix("base_model.model.") {
        (LoraComponent::Unet, r)
    } else {
        (LoraComponent::Unet, key)
    };
    for (suffix, part) in [
        (".lora_A.weight", "down"),
        (".lora_B.weight", "up"),
        (".lora.down.weight", "down"),
        (".lora.up.weight", "up"),
        (".lora_linear_layer.down.weight", "down"),
        (".lora_linear_layer.up.weight", "up"),
        (".alpha", "alpha"),
    ] {
        if let Some(module) = rest.strip_suffix(suffix) {
            return Some((comp, ModuleKey::Dotted(module.to_string()), part));
        }
    }
    // Attention processors: `<attn>.processor.to_q_lora.down.weight` -> `<attn>.to_q`.
    if let Some((attn, tail)) = rest.split_once(".processor.") {
        for (proj, target) in
            [("to_q_lora", "to_q"), ("to_k_lora", "to_k"), ("to_v_lora", "to_v"), ("to_out_lora", "to_out.0")]
        {
            for (suffix, part) in [(".down.weight", "down"), (".up.weight", "up")] {
                if tail == format!("{proj}{suffix}") {
                    return Some((comp, ModuleKey::Dotted(format!("{attn}.{target}")), part));
                }
            }
        }
    }
    None
}

/// Where a LoRA comes from: a `.safetensors` file, a folder holding `weight_name`, or a hub
/// repo id (resolved through the Hugging Face cache like models).
pub fn resolve_source(source: &str, weight_name: Option<&str>) -> Result<PathBuf> {
    use crate::loaders::{hub, ModelSource};
    let path = match ModelSource::parse(source)? {
        ModelSource::Local(p) => p,
        ModelSource::Hub(id) => match weight_name {
            Some(w) => hub::snapshot(&id, &[], None, w)?,
            // diffusers guesses the weight file; LoRA repos use pytorch_lora_weights.safetensors,
            // converted motion LoRAs (guoyww/animatediff-motion-lora-*) diffusion_pytorch_model.safetensors.
            None => hub::snapshot(&id, &[], None, DEFAULT_WEIGHT_NAME)
                .or_else(|e| hub::snapshot(&id, &[], None, "diffusion_pytorch_model.safetensors").map_err(|_| e))?,
        },
    };
    if path.is_file() {
        return Ok(path);
    }
    if let Some(w) = weight_name {
        let f = path.join(w);
        if f.is_file() {
            return Ok(f);
        }
        bail!("LoRA folder {} has no {w}", path.display());
    }
    let default = path.join(DEFAULT_WEIGHT_NAME);
    if default.is_file() {
        return Ok(default);
    }
    // Like diffusers' best guess: a folder with exactly one .safetensors file.
    let found: Vec<PathBuf> = std::fs::read_dir(&path)
        .with_context(|| format!("cannot read LoRA folder {}", path.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("safetensors"))
        .collect();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!("LoRA folder {} has no .safetensors file", path.display()),
        _ => bail!("LoRA folder {} has several .safetensors files; name one (SOURCE/FILE.safetensors)", path.display()),
    }
}

impl LoraFile {
    /// Read a LoRA `.safetensors` file.
    pub fn read(path: &Path) -> Result<Self> {
        let tensors = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| anyhow::anyhow!("cannot load LoRA {}: {}", path.display(), one_line(&e.to_string())))?;
        let metadata = read_metadata(path)?;
        Self::from_tensors(&path.display().to_string(), tensors, metadata)
    }

    /// Build from tensors already in memory (`metadata`: the safetensors `__metadata__`).
    pub fn from_tensors(
        source: &str,
        tensors: HashMap<String, Tensor>,
        metadata: HashMap<String, String>,
    ) -> Result<Self> {
        let mut modules: BTreeMap<(LoraComponent, ModuleKey), RawModule> = BTreeMap::new();
        let mut unknown = Vec::new();
        let mut keys: Vec<_> = tensors.keys().cloned().collect();
        keys.sort();
        for key in keys {
            let t = &tensors[&key];
            let Some((comp, module, part)) = parse_key(&key) else {
                unknown.push(key);
                continue;
            };
            let m = modules.entry((comp, module)).or_default();
            m.keys.push(key.clone());
            match part {
                "down" => m.down = Some(t.to_dtype(DType::F32)?),
                "up" => m.up = Some(t.to_dtype(DType::F32)?),
                _ => {
                    m.alpha =
                        Some(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?.first().copied().unwrap_or(0.0))
                }
            }
        }
        if modules.is_empty() {
            bail!(
                "{source} is not a LoRA file: none of its keys is in a known LoRA layout (e.g. {})",
                unknown.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
            );
        }
        for ((_, module), m) in &modules {
            if m.down.is_none() || m.up.is_none() {
                bail!(
                    "LoRA {source}: module {module:?} has no {} matrix",
                    if m.down.is_none() { "down" } else { "up" }
                );
            }
        }
        Ok(Self { source: source.to_string(), modules, metadata_alpha: parse_metadata(&metadata) })
    }

    /// Match the file against a component's weights; returns the updates (at weight 1.0) and
    /// the keys that matched nothing.
    pub fn deltas_for(
        &self,
        component: LoraComponent,
        weights: &dyn WeightIndex,
    ) -> Result<(WeightDeltas, Vec<String>)> {
        let index = ModuleIndex::new(component, weights);
        let mut deltas = WeightDeltas::default();
        let mut unmatched = Vec::new();
        for ((comp, key), m) in self.modules.iter().filter(|((c, _), _)| *c == component) {
            let Some((module, weight_name)) = index.find(key) else {
                unmatched.extend(m.keys.iter().cloned());
                continue;
            };
            let (up, down) = (m.up.as_ref().unwrap(), m.down.as_ref().unwrap());
            let rank = down.dim(0)?;
            if up.dims().len() < 2 || up.dim(1)? != rank || up.dims()[2..].iter().any(|&d| d != 1) {
                bail!(
                    "LoRA {}: {} has up {:?} and down {:?}, which do not compose",
                    self.source,
                    module,
                    up.dims(),
                    down.dims()
                );
            }
            let up2 = up.reshape((up.dim(0)?, rank))?;
            let down2 = down.reshape((rank, down.elem_count() / rank))?;
            let shape = weights.shape(&weight_name).unwrap_or_default();
            if up2.dim(0)? * down2.dim(1)? != shape.iter().product::<usize>() || shape.first() != Some(&up2.dim(0)?) {
                bail!(
                    "LoRA {} does not fit this model ({}.{module} is {shape:?}, the LoRA changes [{}, {}]): is it for another base model?",
                    self.source,
                    comp.name(),
                    up2.dim(0)?,
                    down2.dim(1)?
                );
            }
            let scale = self.scale(*comp, &module, m.alpha, rank);
            deltas.by_weight.entry(weight_name).or_default().push(LowRankDelta { up: up2, down: down2, scale });
        }
        Ok((deltas, unmatched))
    }

    /// diffusers' scaling: `lora_alpha / r`, with alpha from the `.alpha` key (kohya, or
    /// network alphas), else from the adapter metadata, else equal to the rank.
    fn scale(&self, comp: LoraComponent, module: &str, alpha: Option<f64>, rank: usize) -> f64 {
        let meta = self.metadata_alpha.get(&comp);
        let pattern = |p: &HashMap<String, f64>| {
            p.iter().find(|(k, _)| module == k.as_str() || module.ends_with(&format!(".{k}"))).map(|(_, v)| *v)
        };
        let alpha = alpha
            .or_else(|| meta.and_then(|m| pattern(&m.alpha_pattern)))
            .or_else(|| meta.and_then(|m| m.lora_alpha))
            .unwrap_or(rank as f64);
        alpha / rank as f64
    }

    /// The components this file has modules for.
    pub fn components(&self) -> Vec<LoraComponent> {
        let mut c: Vec<_> = self.modules.keys().map(|(c, _)| *c).collect();
        c.dedup();
        c
    }

    pub fn num_modules(&self) -> usize {
        self.modules.len()
    }
}

/// The safetensors header's `__metadata__`.
fn read_metadata(path: &Path) -> Result<HashMap<String, String>> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mmap = unsafe { memmap2::Mmap::map(&file) }?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&mmap)
        .map_err(|e| anyhow::anyhow!("cannot load LoRA {}: {e}", path.display()))?;
    Ok(meta.metadata().clone().unwrap_or_default())
}

/// diffusers stores each adapter's LoRA config as JSON under `lora_adapter_metadata`
/// (keys prefixed by component, e.g. `unet.lora_alpha`).
fn parse_metadata(meta: &HashMap<String, String>) -> HashMap<LoraComponent, MetadataAlpha> {
    let mut out: HashMap<LoraComponent, MetadataAlpha> = HashMap::new();
    let Some(raw) = meta.get("lora_adapter_metadata") else { return out };
    let Ok(serde_json::Value::Object(obj)) = serde_json::from_str::<serde_json::Value>(raw) else { return out };
    for (k, v) in obj {
        let (comp, field) = if let Some(f) = k.strip_prefix("text_encoder_2.") {
            (LoraComponent::TextEncoder2, f)
        } else if let Some(f) = k.strip_prefix("text_encoder.") {
            (LoraComponent::TextEncoder, f)
        } else if let Some(f) = k.strip_prefix("unet.") {
            (LoraComponent::Unet, f)
        } else {
            (LoraComponent::Unet, k.as_str())
        };
        let m = out.entry(comp).or_default();
        let map = |v: &serde_json::Value| -> HashMap<String, f64> {
            v.as_object()
                .map(|o| o.iter().filter_map(|(k, v)| Some((k.clone(), v.as_f64()?))).collect())
                .unwrap_or_default()
        };
        match field {
            "lora_alpha" => m.lora_alpha = v.as_f64(),
            "r" => m.r = v.as_f64(),
            "alpha_pattern" => m.alpha_pattern = map(&v),
            "rank_pattern" => m.rank_pattern = map(&v),
            _ => {}
        }
    }
    out
}

/// The names and shapes of a component's weights, which LoRA modules are matched against.
pub trait WeightIndex {
    fn names(&self) -> &[String];
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
}

impl WeightIndex for ComponentWeights {
    fn names(&self) -> &[String] {
        ComponentWeights::names(self)
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        ComponentWeights::shape(self, name)
    }
}

/// A component's module names, by diffusers' dotted name and by kohya's underscored name.
struct ModuleIndex {
    dotted: HashMap<String, String>,
    underscored: HashMap<String, String>,
}

impl ModuleIndex {
    fn new(component: LoraComponent, weights: &dyn WeightIndex) -> Self {
        let is_text = component != LoraComponent::Unet;
        let (mut dotted, mut underscored) = (HashMap::new(), HashMap::new());
        for name in weights.names() {
            let Some(module) = name.strip_suffix(".weight") else { continue };
            // Text encoders are named with the `text_model.` prefix of real checkpoints
            // whether or not this copy (transformers 5 layout) stores it.
            let canonical = if is_text && !module.starts_with("text_model.") {
                format!("text_model.{module}")
            } else {
                module.to_string()
            };
            underscored.insert(canonical.replace('.', "_"), name.clone());
            dotted.insert(canonical, name.clone());
        }
        Self { dotted, underscored }
    }

    /// The module's canonical name and the weight it updates.
    fn find(&self, key: &ModuleKey) -> Option<(String, String)> {
        match key {
            ModuleKey::Dotted(m) => {
                let canonical = if self.dotted.contains_key(m) { m.clone() } else { format!("text_model.{m}") };
                self.dotted.get(&canonical).map(|w| (canonical, w.clone()))
            }
            ModuleKey::Underscored(m) => {
                self.underscored.get(m).map(|w| (w.trim_end_matches(".weight").to_string(), w.clone()))
            }
        }
    }
}
