//! LoRA adapters on a loaded model, as diffusers' `load_lora_weights` + `set_adapters`:
//! several adapters, each with a weight, fused into the UNet and text encoder weights when the
//! networks are built, so inference costs nothing extra.

use crate::loaders::lora::{resolve_source, LoraComponent, LoraFile, WeightIndex};
use crate::loaders::weights::WeightDeltas;
use anyhow::{bail, Result};
use std::collections::HashMap;
use std::sync::Arc;

/// One LoRA to load: `--lora SOURCE[@WEIGHT]`.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraSpec {
    /// A `.safetensors` file, a folder, or a hub repo id.
    pub source: String,
    /// File inside a folder or repo (default `pytorch_lora_weights.safetensors`).
    pub weight_name: Option<String>,
    /// Default: derived from the source.
    pub adapter_name: Option<String>,
    /// diffusers' `adapter_weights` entry (1.0 by default).
    pub weight: f64,
}

impl LoraSpec {
    /// Parse `SOURCE[@WEIGHT]`.
    pub fn parse(arg: &str) -> Result<Self> {
        let split = if std::path::Path::new(arg).exists() { None } else { arg.rsplit_once('@') };
        let (source, weight) = match split {
            Some(("", _)) => bail!("--lora {arg}: give a file, folder or hub repo id before `@`"),
            Some((s, w)) => match w.parse::<f64>() {
                Ok(w) if w.is_finite() => (s, w),
                _ => bail!("--lora {arg}: `{w}` is not a weight (use SOURCE@WEIGHT, e.g. my-lora.safetensors@0.8)"),
            },
            _ => (arg, 1.0),
        };
        if source.is_empty() {
            bail!("--lora needs a file, folder or hub repo id");
        }
        Ok(Self { source: source.to_string(), weight_name: None, adapter_name: None, weight })
    }
}

/// What loading a LoRA matched.
#[derive(Clone, Debug)]
pub struct LoraReport {
    pub adapter: String,
    pub matched_modules: usize,
    pub total_modules: usize,
    /// Keys that match nothing in this model (a partial match is allowed, with a warning).
    pub unmatched_keys: Vec<String>,
}

impl LoraReport {
    /// The warning to show for a partial match, if any.
    pub fn warning(&self) -> Option<String> {
        if self.unmatched_keys.is_empty() {
            return None;
        }
        Some(format!(
            "LoRA `{}`: {} of its keys match nothing in this model and were ignored ({} modules applied), e.g. {}",
            self.adapter,
            self.unmatched_keys.len(),
            self.matched_modules,
            self.unmatched_keys.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
        ))
    }
}

/// A loaded adapter: its updates per component at weight 1.0.
pub struct LoadedLora {
    pub name: String,
    pub source: String,
    pub weight: f64,
    pub active: bool,
    deltas: HashMap<LoraComponent, WeightDeltas>,
}

/// The LoRAs loaded into one model (diffusers calls them adapters).
#[derive(Default)]
pub struct LoraSet {
    pub loras: Vec<LoadedLora>,
}

fn default_name(source: &str) -> String {
    let p = std::path::Path::new(source.trim_end_matches('/'));
    let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or(source);
    if stem == "pytorch_lora_weights" {
        p.parent().and_then(|d| d.file_name()).and_then(|s| s.to_str()).unwrap_or(stem).to_string()
    } else {
        stem.to_string()
    }
}

impl LoraSet {
    /// Parse a LoRA and match it against the model's weights (does not rebuild anything).
    pub fn add(&mut self, spec: &LoraSpec, targets: &[(LoraComponent, &dyn WeightIndex)]) -> Result<LoraReport> {
        let path = resolve_source(&spec.source, spec.weight_name.as_deref())?;
        let file = LoraFile::read(&path)?;
        let mut name = spec.adapter_name.clone().unwrap_or_else(|| default_name(&spec.source));
        if spec.adapter_name.is_none() {
            let base = name.clone();
            let mut i = 2;
            while self.loras.iter().any(|a| a.name == name) {
                name = format!("{base}_{i}");
                i += 1;
            }
        } else if self.loras.iter().any(|a| a.name == name) {
            bail!("an adapter named `{name}` is already loaded");
        }
        let comps = file.components();
        if let Some(missing) = comps.iter().find(|c| !targets.iter().any(|(t, _)| t == *c)) {
            bail!(
                "LoRA {} has weights for `{}`, which this model does not have; is it made for another base model (e.g. SDXL)?",
                spec.source,
                missing.name()
            );
        }
        let mut deltas = HashMap::new();
        let mut unmatched = Vec::new();
        let mut matched = 0;
        for (comp, weights) in targets.iter().filter(|(c, _)| comps.contains(c)) {
            let (d, u) = file.deltas_for(*comp, *weights)?;
            matched += d.by_weight.values().map(Vec::len).sum::<usize>();
            unmatched.extend(u);
            deltas.insert(*comp, d);
        }
        if matched == 0 {
            let ldm = unmatched
                .iter()
                .any(|k| k.contains("input_blocks") || k.contains("output_blocks") || k.contains("middle_block"));
            bail!(
                "LoRA {} matches nothing in this model{} (keys such as {})",
                spec.source,
                if ldm {
                    "; it uses original Stable Diffusion (LDM) layer names, or is made for another base model"
                } else {
                    "; is it made for another base model?"
                },
                unmatched.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
            );
        }
        self.loras.push(LoadedLora {
            name: name.clone(),
            source: spec.source.clone(),
            weight: spec.weight,
            active: true,
            deltas,
        });
        Ok(LoraReport {
            adapter: name,
            matched_modules: matched,
            total_modules: file.num_modules(),
            unmatched_keys: unmatched,
        })
    }

    /// diffusers' `set_adapters(names, adapter_weights)`: only these adapters are active.
    pub fn set_active(&mut self, names_and_weights: &[(&str, f64)]) -> Result<()> {
        for (n, _) in names_and_weights {
            if !self.loras.iter().any(|a| a.name == *n) {
                bail!("no adapter named `{n}` is loaded (loaded: {})", self.names().join(", "));
            }
        }
        for a in &mut self.loras {
            match names_and_weights.iter().find(|(n, _)| *n == a.name) {
                Some((_, w)) => {
                    a.active = true;
                    a.weight = *w;
                }
                None => a.active = false,
            }
        }
        Ok(())
    }

    /// diffusers' `delete_adapters(name)`.
    pub fn remove(&mut self, name: &str) -> Result<()> {
        let before = self.loras.len();
        self.loras.retain(|a| a.name != name);
        if self.loras.len() == before {
            bail!("no adapter named `{name}` is loaded");
        }
        Ok(())
    }

    pub fn names(&self) -> Vec<String> {
        self.loras.iter().map(|a| a.name.clone()).collect()
    }

    /// The weighted sum of the active adapters' updates to one component.
    pub fn combined(&self, comp: LoraComponent) -> Option<Arc<WeightDeltas>> {
        let mut out = WeightDeltas::default();
        for a in self.loras.iter().filter(|a| a.active && a.weight != 0.0) {
            let Some(d) = a.deltas.get(&comp) else { continue };
            for (name, list) in &d.by_weight {
                let entry = out.by_weight.entry(name.clone()).or_default();
                entry.extend(list.iter().map(|x| {
                    let mut x = x.clone();
                    x.scale *= a.weight;
                    x
                }));
            }
        }
        (!out.is_empty()).then(|| Arc::new(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_spec_parsing() {
        let s = LoraSpec::parse("latent-consistency/lcm-lora-sdv1-5").unwrap();
        assert_eq!((s.source.as_str(), s.weight), ("latent-consistency/lcm-lora-sdv1-5", 1.0));
        let s = LoraSpec::parse("style.safetensors@0.8").unwrap();
        assert_eq!((s.source.as_str(), s.weight), ("style.safetensors", 0.8));
        assert!(LoraSpec::parse("style.safetensors@heavy").is_err());
        assert!(LoraSpec::parse("@0.5").is_err());
        assert_eq!(default_name("loras/peft/pytorch_lora_weights.safetensors"), "peft");
        assert_eq!(default_name("org/lcm-lora-sdv1-5"), "lcm-lora-sdv1-5");
    }
}
