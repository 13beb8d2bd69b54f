//! Reading diffusers / transformers `config.json` files into serde structs.

use anyhow::{Context, Result};
use serde::de::DeserializeOwned;
use std::path::Path;

/// Parse a JSON config file; errors name the file and the offending key.
pub fn read_config<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config {}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("invalid config {}: {e}", path.display()))
}

/// `null` in a config reads as `false`, as diffusers' truthiness checks treat `None`
/// (`#[serde(deserialize_with = "crate::config::null_false")]`).
pub fn null_false<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<bool, D::Error> {
    use serde::Deserialize;
    Ok(Option::<bool>::deserialize(d)?.unwrap_or(false))
}

/// Refuse a folder whose `config.json` names another class than `expected` (e.g. a UNet folder
/// given as a ControlNet); a config without `_class_name` is accepted.
pub fn check_class_name(dir: &Path, expected: &str) -> Result<()> {
    let v: serde_json::Value = read_config(&dir.join("config.json"))?;
    if let Some(class) = v.get("_class_name").and_then(|c| c.as_str()).filter(|c| *c != expected) {
        anyhow::bail!("{} holds a `{class}`, not a `{expected}`", dir.display())
    }
    Ok(())
}

/// A config value that diffusers accepts either as one number for every block or as one
/// number per block (`attention_head_dim`, `transformer_layers_per_block`, ...).
#[derive(Clone, Debug, serde::Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlock<T> {
    One(T),
    Each(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    /// The value for each of `n` blocks; errors if a per-block list has the wrong length.
    pub fn expand(&self, n: usize, name: &str) -> Result<Vec<T>> {
        match self {
            Self::One(v) => Ok(vec![v.clone(); n]),
            Self::Each(v) if v.len() == n => Ok(v.clone()),
            Self::Each(v) => anyhow::bail!("config `{name}` has {} entries, expected {n}", v.len()),
        }
    }
}

/// As the config writes it: `20` or `[1, 2]`.
impl<T: std::fmt::Debug> std::fmt::Display for PerBlock<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::One(v) => write!(f, "{v:?}"),
            Self::Each(v) => write!(f, "{v:?}"),
        }
    }
}
