//! A diffusers pipeline folder: `model_index.json` plus one subfolder per component.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// What `model_index.json` says about a pipeline folder.
#[derive(Clone, Debug)]
pub struct ModelIndex {
    pub root: PathBuf,
    /// `_class_name`, e.g. `StableDiffusionPipeline` or `LatentConsistencyModelPipeline`.
    pub class_name: String,
    /// Components listed with a library and class (null entries are absent components).
    pub components: Vec<(String, String)>,
    /// SDXL pipelines: negative embeddings are zeros when no negative prompt is given
    /// (`force_zeros_for_empty_prompt`, default true as in diffusers).
    pub force_zeros_for_empty_prompt: bool,
}

impl ModelIndex {
    pub fn read(root: &Path) -> Result<Self> {
        if !root.is_dir() {
            crate::error::not_found!("model folder {} does not exist or is not a folder", root.display());
        }
        let path = root.join("model_index.json");
        if !path.is_file() {
            bail!("{} has no model_index.json; is it a diffusers pipeline folder?", root.display());
        }
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("invalid {}: {e}", path.display()))?;
        let obj = json.as_object().ok_or_else(|| anyhow::anyhow!("invalid {}: not an object", path.display()))?;
        let class_name = obj.get("_class_name").and_then(|v| v.as_str()).unwrap_or("").to_string();
        let components = obj
            .iter()
            .filter(|(k, _)| !k.starts_with('_'))
            .filter_map(|(k, v)| {
                let pair = v.as_array()?;
                let class = pair.get(1)?.as_str()?;
                Some((k.clone(), class.to_string()))
            })
            .collect();
        let force_zeros_for_empty_prompt =
            obj.get("force_zeros_for_empty_prompt").and_then(|v| v.as_bool()).unwrap_or(true);
        Ok(Self { root: root.to_path_buf(), class_name, components, force_zeros_for_empty_prompt })
    }

    /// Whether `model_index.json` lists a component (with a class, not `[null, null]`).
    pub fn has(&self, name: &str) -> bool {
        self.components.iter().any(|(n, _)| n == name)
    }

    /// The folder of a component, checked to exist (with its config file).
    pub fn component_dir(&self, name: &str, config_file: Option<&str>) -> Result<PathBuf> {
        let dir = self.root.join(name);
        if !dir.is_dir() {
            bail!("model folder {} is missing its `{name}` component", self.root.display());
        }
        if let Some(file) = config_file.filter(|f| !dir.join(f).is_file()) {
            bail!("{} has no {file}", dir.display());
        }
        Ok(dir)
    }
}

/// A standalone component folder (e.g. `--unet DIR`): either a folder holding `config_file`
/// directly, or a pipeline folder holding it under `subfolder`.
pub fn standalone_component_dir(root: &Path, subfolder: &str, config_file: &str) -> Result<PathBuf> {
    if root.join(config_file).is_file() {
        Ok(root.to_path_buf())
    } else if root.join(subfolder).join(config_file).is_file() {
        Ok(root.join(subfolder))
    } else {
        bail!("{} has no {config_file} (nor {subfolder}/{config_file})", root.display())
    }
}

/// A standalone component given on the command line (`--unet`, `--controlnet`, ...): a local
/// folder (the component itself or a pipeline holding it under `subfolder`) or a hub repo id.
pub fn resolve_component(arg: &str, subfolder: &str, variant: Option<&str>) -> Result<PathBuf> {
    use crate::loaders::{hub, ModelSource};
    let root = match ModelSource::parse(arg)? {
        ModelSource::Local(p) => p,
        ModelSource::Hub(id) => hub::snapshot(&id, &[], variant, "config.json")?,
    };
    standalone_component_dir(&root, subfolder, "config.json")
}
