//! Resolving a model argument: an existing local path, or a Hugging Face hub repo id looked up
//! in (and, when the network allows, downloaded into) the standard Hugging Face cache, the same
//! cache diffusers uses (`HF_HOME`, `HF_HUB_CACHE`, `HF_HUB_OFFLINE`, `HF_TOKEN`, `HF_ENDPOINT`).

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
            crate::error::not_found!("model folder {arg} does not exist");
        }
        // A file name (`style.safetensors`, `model.ckpt`) is never a hub repo id: say it is
        // missing rather than asking the network (repo ids may hold dots, as `...-sdxl-1.0`,
        // so only file extensions count).
        const FILE_EXTENSIONS: [&str; 10] =
            ["safetensors", "ckpt", "pt", "pth", "bin", "json", "gguf", "png", "jpg", "jpeg"];
        let ext = path.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase());
        if ext.is_some_and(|e| FILE_EXTENSIONS.contains(&e.as_str())) {
            crate::error::not_found!("no such file: {arg}");
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

/// The components of a diffusers pipeline repo that a download fetches.
pub const PIPELINE_FOLDERS: &[&str] =
    &["unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler"];

/// A hub client on `cache`, with `HF_TOKEN` (or the cached token) and a progress bar per file
/// when stderr is a terminal.
fn api(cache: &Cache) -> std::result::Result<hf_hub::api::sync::Api, String> {
    use std::io::IsTerminal;
    let token = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()).or_else(|| cache.token());
    let mut builder = ApiBuilder::from_cache(cache.clone())
        .with_token(token)
        .with_progress(std::io::stderr().is_terminal())
        .with_retries(0);
    // A mirror, as huggingface_hub's HF_ENDPOINT.
    if let Some(endpoint) =
        std::env::var("HF_ENDPOINT").ok().map(|e| e.trim_end_matches('/').to_string()).filter(|e| !e.is_empty())
    {
        builder = builder.with_endpoint(endpoint);
    }
    builder.build().map_err(|e| e.to_string())
}

/// `lcm download REPO`: fetch a model into the Hugging Face cache ahead of time, as diffusers'
/// `from_pretrained` would (a pipeline repo: the component folders, `variant` weights; any other
/// repo, e.g. a LoRA, VAE or ControlNet: its top-level files). Returns the snapshot folder.
pub fn download(repo_id: &str, variant: Option<&str>) -> Result<PathBuf> {
    if let ModelSource::Local(p) = ModelSource::parse(repo_id)? {
        bail!("{} is a local path; there is nothing to download", p.display());
    }
    if offline() {
        bail!("HF_HUB_OFFLINE is set; unset it to download `{repo_id}`");
    }
    let cache = cache();
    let result = api(&cache).and_then(|api| {
        let repo = api.model(repo_id.to_string());
        let info = repo.info().map_err(|e| e.to_string())?;
        let pipeline = info.siblings.iter().any(|s| s.rfilename == "model_index.json");
        let folders: &[&str] = if pipeline { PIPELINE_FOLDERS } else { &[] };
        let files: Vec<&str> =
            info.siblings.iter().map(|s| s.rfilename.as_str()).filter(|f| wanted(f, folders, variant)).collect();
        if !files.iter().any(|f| f.ends_with(".safetensors")) {
            return Err(format!(
                "`{repo_id}` has no {}.safetensors weights to download",
                variant.map(|v| format!("{v} ")).unwrap_or_default()
            ));
        }
        let mut dir = None;
        for f in files {
            let path = repo.get(f).map_err(|e| format!("{f}: {e}"))?;
            if !f.contains('/') {
                dir = path.parent().map(Path::to_path_buf);
            }
        }
        dir.ok_or_else(|| format!("`{repo_id}` has no top-level files"))
    });
    result.map_err(|e| {
        anyhow::anyhow!(
            "cannot download `{repo_id}` from the Hugging Face hub{}; check the network, the repo id and HF_TOKEN",
            network_words(&e)
        )
    })
}

/// Resolve a hub repo to a local snapshot folder holding the wanted files (`folders` are
/// component subfolders such as `unet`; an empty list means files at the repo root).
/// `marker` is the file that must be there (`model_index.json`, `config.json`, a LoRA file).
pub fn snapshot(repo_id: &str, folders: &[&str], variant: Option<&str>, marker: &str) -> Result<PathBuf> {
    let cache = cache();
    let cache_dir = cache.path().clone();
    let cached = cache.repo(Repo::new(repo_id.to_string(), RepoType::Model)).get(marker);
    let hint =
        format!("give a local path instead, or download it into {} where the hub is reachable", cache_dir.display());
    if offline() {
        return match cached {
            Some(p) => Ok(p.parent().unwrap_or(Path::new(".")).to_path_buf()),
            None => bail!("`{repo_id}` is not in the Hugging Face cache and HF_HUB_OFFLINE is set; {hint}"),
        };
    }
    let fetched = api(&cache).and_then(|api| {
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
            let why = network_words(&e);
            bail!("cannot reach the Hugging Face hub for `{repo_id}`{why}, and it is not in the cache; {hint}")
        }
    }
}

/// The network's own words about a failed request, ` (...)`, only when `RUST_LOG` is set: the one
/// line of an error stays short.
fn network_words(error: &str) -> String {
    match std::env::var_os("RUST_LOG") {
        Some(_) => format!(" ({})", super::weights::one_line(error)),
        None => String::new(),
    }
}
