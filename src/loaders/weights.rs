//! Finding and memory-mapping the safetensors files of one model component.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use std::path::{Path, PathBuf};

/// The `*.safetensors` files of a component folder, chosen the way diffusers chooses them:
/// with `variant = Some("fp16")` only `name.fp16.safetensors` (or its shards), otherwise only
/// files without a variant infix.
pub fn safetensors_files(dir: &Path, variant: Option<&str>) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read model folder {}", dir.display()))?;
    let mut all = Vec::new();
    for entry in entries {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) == Some("safetensors") {
            all.push(path);
        }
    }
    all.sort();
    let picked: Vec<PathBuf> = all
        .iter()
        .filter(|p| file_variant(p).as_deref() == variant)
        .cloned()
        .collect();
    if picked.is_empty() {
        let has_bin = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .any(|e| e.path().extension().and_then(|x| x.to_str()) == Some("bin"));
        match (variant, all.is_empty(), has_bin) {
            (Some(v), false, _) => bail!(
                "no `{v}` variant weights in {} (found {}); drop --variant or pick another",
                dir.display(),
                all.iter().filter_map(|p| p.file_name()?.to_str().map(String::from)).collect::<Vec<_>>().join(", ")
            ),
            (_, _, true) => bail!(
                "{} has only PyTorch .bin weights; convert them to .safetensors first",
                dir.display()
            ),
            _ => bail!("no .safetensors weights in {}", dir.display()),
        }
    }
    Ok(picked)
}

/// `model.fp16.safetensors` -> Some("fp16"); `model-00001-of-00002.fp16.safetensors` too.
fn file_variant(path: &Path) -> Option<String> {
    let stem = path.file_stem()?.to_str()?;
    let (_, ext) = stem.rsplit_once('.')?;
    Some(ext.to_string())
}

/// Memory-map the weights of a component folder into a `VarBuilder` (diffusers' names).
pub fn load_component(
    dir: &Path,
    variant: Option<&str>,
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    let files = safetensors_files(dir, variant)?;
    load_files(&files, dtype, device)
}

/// Memory-map explicit safetensors files; a truncated or non-safetensors file is an error
/// naming it.
pub fn load_files(files: &[PathBuf], dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    for f in files {
        // Validate each file on its own so the error names the bad one.
        unsafe { candle_core::safetensors::MmapedSafetensors::new(f) }
            .map_err(|e| anyhow::anyhow!("cannot load weights {}: {}", f.display(), one_line(&e.to_string())))?;
    }
    // SAFETY: the files are mapped read-only; like diffusers we assume nobody truncates a
    // weight file while it is being used.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(files, dtype, device) }?;
    Ok(vb)
}

pub(crate) fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
