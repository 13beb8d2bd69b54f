//! The models a server holds: loaded once at start, named, and reconfigured between jobs (the
//! LoRA set, the ControlNets and T2I-Adapters a job asks for).

use crate::config::{NamedSource, ServerConfig};
use anyhow::{bail, Context, Result};
use lcm::loaders::model_index::resolve_component;
use lcm::models::controlnet::ControlNetModel;
use lcm::models::t2i_adapter::T2IAdapter;
use lcm::models::vae::Autoencoder;
use lcm::pipelines::components::load_vae;
use lcm::pipelines::{ControlNets, LcmPipeline, LoadOptions, LoraSpec, Named, PipelineKind, T2IAdapters};
use std::path::Path;
use std::sync::{Mutex, RwLock};

/// What a job needs the pipeline to carry: the active LoRAs with their weights, and the control
/// models in request order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Setup {
    pub loras: Vec<(String, f64)>,
    pub controlnets: Vec<String>,
    pub adapters: Vec<String>,
}

/// One loaded model. The pipeline sits behind a lock only the executor writes (between jobs, to
/// change the [`Setup`]); request handlers read it to plan requests while a job runs.
pub struct Model {
    pub name: String,
    pub pipe: RwLock<LcmPipeline>,
    pub kind: PipelineKind,
    pub default_size: (usize, usize),
    /// LoRA adapter names (the `.safetensors` stems of `--lora-dir` this model accepted).
    pub loras: Vec<String>,
    pub controlnets: Vec<Named<ControlNetModel>>,
    pub controlnet_names: Vec<String>,
    pub adapters: Vec<Named<T2IAdapter>>,
    pub adapter_names: Vec<String>,
    /// The tiny autoencoder step previews are decoded with.
    pub preview_vae: Option<Autoencoder>,
    pub video: bool,
    setup: Mutex<Setup>,
}

impl Model {
    /// The setup the pipeline carries now; `None` while the executor is changing it (a request
    /// handler must not wait for a rebuild).
    pub fn setup_if_idle(&self) -> Option<Setup> {
        match self.setup.try_lock() {
            Ok(s) => Some(s.clone()),
            Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner().clone()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    /// Bring the pipeline to `want`. Changing the LoRA set rebuilds the fused UNet and text
    /// encoder weights from the base once (a full weight pass: about as long as loading the
    /// model from the page cache); control models are swapped without copying weights.
    pub fn configure(&self, want: &Setup) -> Result<()> {
        let mut current = self.setup.lock().unwrap_or_else(|e| e.into_inner());
        if *current == *want {
            return Ok(());
        }
        let mut pipe = self.pipe.write().unwrap_or_else(|e| e.into_inner());
        if current.loras != want.loras {
            let names: Vec<(&str, f64)> = want.loras.iter().map(|(n, w)| (n.as_str(), *w)).collect();
            // On failure the pipeline's LoRA state is unknown: say so, so the next job rebuilds.
            current.loras = vec![("\u{0}unknown".into(), 0.0)];
            pipe.set_adapters(&names)?;
            current.loras = want.loras.clone();
        }
        if current.controlnets != want.controlnets {
            pipe.controlnets = ControlNets::default();
            current.controlnets.clear();
            for name in &want.controlnets {
                let i = self.controlnet_names.iter().position(|n| n == name).context("unknown ControlNet")?;
                pipe.add_controlnet(self.controlnets[i].clone())?;
            }
            current.controlnets = want.controlnets.clone();
        }
        if current.adapters != want.adapters {
            pipe.t2i_adapters = T2IAdapters::default();
            current.adapters.clear();
            for name in &want.adapters {
                let i = self.adapter_names.iter().position(|n| n == name).context("unknown T2I-Adapter")?;
                pipe.add_t2i_adapter(self.adapters[i].clone());
            }
            current.adapters = want.adapters.clone();
        }
        Ok(())
    }
}

/// The name a source is known by when none is given: its folder, file stem or repo name.
pub fn default_name(source: &str) -> String {
    let p = Path::new(source.trim_end_matches(['/', '\\']));
    let name =
        if p.extension().is_some_and(|e| e == "safetensors" || e == "ckpt") { p.file_stem() } else { p.file_name() };
    name.and_then(|n| n.to_str()).unwrap_or(source).to_string()
}

/// The `.safetensors` files of `--lora-dir`, by stem, sorted.
fn lora_files(dir: &Path) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("--lora-dir {}", dir.display()))? {
        let path = e?.path();
        if path.extension().is_some_and(|x| x == "safetensors") && path.is_file() {
            if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
                out.push((stem.to_string(), path.to_string_lossy().into_owned()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Load every model of the configuration, failing on the first that cannot load.
pub fn load_all(config: &ServerConfig) -> Result<Vec<Model>> {
    let device = lcm::device::parse(&config.device)?;
    let dtype = config.dtype.unwrap_or(lcm::device::default_dtype(&device));
    let loras = match &config.lora_dir {
        Some(dir) => lora_files(dir)?,
        None => Vec::new(),
    };
    let mut sources: Vec<(NamedSource, Option<String>)> = config.models.iter().map(|m| (m.clone(), None)).collect();
    if let (Some(motion), Some(first)) = (&config.motion_adapter, config.models.first()) {
        // A motion adapter turns the UNet into AnimateDiff's: a second pipeline over the first
        // model, named after the adapter, serves the requests with frames.
        sources.push((
            NamedSource { name: motion.name.clone(), source: first.source.clone() },
            Some(motion.source.clone()),
        ));
    }
    let mut models: Vec<Model> = Vec::new();
    for (m, motion) in sources {
        if models.iter().any(|x| x.name == m.name) {
            bail!("two models are named `{}`; name them with NAME=SOURCE", m.name);
        }
        let opts =
            LoadOptions { dtype, device: device.clone().into(), motion_adapter: motion.clone(), ..Default::default() };
        let mut pipe = LcmPipeline::load(&m.source, &opts).with_context(|| format!("--model {}", m.source))?;
        let accepted = attach_loras(&mut pipe, &m.name, &loras)?;
        let kind = pipe.kind();
        let c = &pipe.components;
        let (precision, dev) = (c.precision(), c.device().clone());
        let mut controlnets = Vec::new();
        let mut controlnet_names = Vec::new();
        for cn in &config.controlnets {
            let model = lcm::pipelines::control::load_controlnet_with(&cn.source, None, precision, &dev)
                .with_context(|| format!("--controlnet {}", cn.source))?;
            // A ControlNet made for another base model is offered only to the models it fits.
            match lcm::pipelines::control::check_controlnet_fits(&model.name, &model.model, &c.unet_config) {
                Ok(()) => {
                    controlnets.push(model);
                    controlnet_names.push(cn.name.clone());
                }
                Err(e) => eprintln!("warning: model {}: ControlNet {} not offered: {e:#}", m.name, cn.name),
            }
        }
        let mut adapters = Vec::new();
        let mut adapter_names = Vec::new();
        for ad in &config.adapters {
            let model = lcm::pipelines::control::load_t2i_adapter_with(&ad.source, None, precision, &dev)
                .with_context(|| format!("--adapter {}", ad.source))?;
            adapters.push(model);
            adapter_names.push(ad.name.clone());
        }
        let preview_vae = match &config.preview_vae {
            Some(source) => {
                let dir = resolve_component(source, "vae", None)?;
                let vae = load_vae(&dir, kind, precision, &dev).with_context(|| format!("--preview-vae {source}"))?;
                if vae.latent_channels() == c.vae.latent_channels() {
                    Some(vae)
                } else {
                    eprintln!(
                        "warning: model {}: --preview-vae {source} has other latent channels; no previews",
                        m.name
                    );
                    None
                }
            }
            None => None,
        };
        let default_size = pipe.default_size();
        models.push(Model {
            name: m.name.clone(),
            kind,
            default_size,
            loras: accepted,
            controlnets,
            controlnet_names,
            adapters,
            adapter_names,
            preview_vae,
            video: motion.is_some(),
            pipe: RwLock::new(pipe),
            setup: Mutex::new(Setup::default()),
        });
    }
    Ok(models)
}

/// Load the LoRA files into the model, all at once when they all fit it (one rebuild), else one
/// by one, leaving out (with a warning) those made for another base model; then deactivate
/// them all: jobs choose theirs.
fn attach_loras(pipe: &mut LcmPipeline, model: &str, files: &[(String, String)]) -> Result<Vec<String>> {
    if files.is_empty() {
        return Ok(Vec::new());
    }
    let spec = |(name, path): &(String, String)| LoraSpec {
        source: path.clone(),
        weight_name: None,
        adapter_name: Some(name.clone()),
        weight: 1.0,
    };
    let specs: Vec<LoraSpec> = files.iter().map(spec).collect();
    let mut accepted = Vec::new();
    if pipe.load_loras(&specs).is_ok() {
        accepted = files.iter().map(|f| f.0.clone()).collect();
    } else {
        // The adapters matched before the failing one stay in the set: start again, one by one.
        pipe.components.loras.loras.clear();
        for f in files {
            // A failed load leaves the set as it was (the adapter is added only on success).
            match pipe.load_loras(&[spec(f)]) {
                Ok(_) => accepted.push(f.0.clone()),
                Err(e) => eprintln!("warning: model {model}: LoRA {} not offered: {e:#}", f.0),
            }
        }
    }
    pipe.set_adapters(&[])?;
    Ok(accepted)
}
