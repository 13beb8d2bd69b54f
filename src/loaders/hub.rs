//! Resolving a model argument: an existing local path, or a Hugging Face hub repo id looked up
//! in (and, when the network allows, downloaded into) the standard Hugging Face cache, the same
//! cache diffusers uses (`HF_HOME`, `HF_HUB_CACHE`, `HF_HUB_OFFLINE`, `HF_TOKEN`).

use anyhow::{bail, Result};
use hf_hub::{api::sync::ApiBuilder, Cache, Repo, RepoType};
use std::path::{Path, PathBuf};

/// Where a model (or a single component) comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSource {
    Local(PathBuf),
    Hub(String),
}

impl ModelSource {
    /// An argument naming an existing path is a path, even when it looks like `org/name`.
    pub fn parse(arg: &str) -> Result<Self> {
        if arg.trim().is_empty() {
            bail!("empty model name");
        }
        let path = Path::new(arg);
        if path.exists() {
            return Ok(Self::Local(path.to_path_buf()));
        }
        let looks_like_path = arg.starts_with('.')
            || arg.starts_with('/')
            || arg.starts_with('~')
            || arg.contains('\\')
            || arg.matches('/').count() > 1;
        if looks_like_path {
            bail!("model folder {arg} does not exist");
        }
        Ok(Self::Hub(arg.to_string()))
    }
}

/// The hub cache root: `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`.
fn cache() -> Cache {
    match std::env::var("HF_HUB_CACHE") {
        Ok(dir) if !dir.is_empty() => Cache::new(PathBuf::from(dir)),
        _ => Cache::from_env(),
    }
}

fn offline() -> bool {
    matches!(
        std::env::var("HF_HUB_OFFLINE").unwrap_or_default().to_ascii_lowercase().as_str(),
        "1" | "true" | "yes" | "on"
    )
}

/// Which files of a hub repo to fetch: everything under the wanted top-level folders (configs,
/// tokenizer files and the weights of the chosen variant), plus top-level json files.
fn wanted(file: &str, folders: &[&str], variant: Option<&str>) -> bool {
    let (dir, name) = match file.rsplit_once('/') {
        Some((d, n)) => (d, n),
        None => ("", file),
    };
    let in_scope = if dir.is_empty() { true } else { folders.contains(&dir) };
    if !in_scope || dir.contains('/') {
        return false;
    }
    if name.ends_with(".json") || name.ends_with(".txt") {
        return true;
    }
    if let Some(stem) = name.strip_suffix(".safetensors") {
        let file_variant = stem.rsplit_once('.').map(|(_, v)| v);
        return file_variant == variant;
    }
    false
}

/// Resolve a hub repo to a local snapshot folder holding the wanted files (`folders` are
/// component subfolders such as `unet`; an empty list means files at the repo root).
/// `marker` is the file that must be there (`model_index.json`, `config.json`, a LoRA file).
pub fn snapshot(repo_id: &str, folders: &[&str], variant: Option<&str>, marker: &str) -> Result<PathBuf> {
    let cache = cache();
    let cache_dir = cache.path().clone();
    let cached = cache.repo(Repo::new(repo_id.to_string(), RepoType::Model)).get(marker);
    let hint = format!(
        "pass a local diffusers folder instead (e.g. --model /path/to/folder), or download `{repo_id}` where the hub is reachable into the Hugging Face cache ({})",
        cache_dir.display()
    );
    if offline() {
        return match cached {
            Some(p) => Ok(p.parent().unwrap_or(Path::new(".")).to_path_buf()),
            None => bail!("`{repo_id}` is not in the Hugging Face cache and HF_HUB_OFFLINE is set; {hint}"),
        };
    }
    let token = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()).or_else(|| cache.token());
    let api = ApiBuilder::from_cache(cache.clone())
        .with_token(token)
        .with_progress(false)
        .with_retries(0)
        .build();
    let fetched = api.map_err(|e| e.to_string()).and_then(|api| {
        let repo = api.model(repo_id.to_string());
        let info = repo.info().map_err(|e| e.to_string())?;
        let mut dir = None;
        for s in info.siblings.iter().filter(|s| s.rfilename == marker || wanted(&s.rfilename, folders, variant)) {
            let path = repo.get(&s.rfilename).map_err(|e| e.to_string())?;
            if s.rfilename == marker {
                dir = path.parent().map(Path::to_path_buf);
            }
        }
        dir.ok_or_else(|| format!("`{repo_id}` has no {marker}"))
    });
    match (fetched, cached) {
        (Ok(dir), _) => Ok(dir),
        // The hub is unreachable but a previous download (ours or diffusers') is there.
        (Err(_), Some(p)) => Ok(p.parent().unwrap_or(Path::new(".")).to_path_buf()),
        (Err(e), None) => {
            let e = super::weights::one_line(&e);
            bail!("cannot reach the Hugging Face hub for `{repo_id}` ({e}) and it is not in the local cache; {hint}")
        }
    }
}
