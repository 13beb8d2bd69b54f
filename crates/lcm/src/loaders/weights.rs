//! Finding and reading the safetensors files of one model component.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The `*.safetensors` files of a component folder, chosen the way diffusers chooses them:
/// with `variant = Some("fp16")` only `name.fp16.safetensors` (or its shards), otherwise only
/// files without a variant infix.
pub fn safetensors_files(dir: &Path, variant: Option<&str>) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("cannot read model folder {}", dir.display()))?;
    let mut all = Vec::new();
    for entry in entries {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) == Some("safetensors") {
            all.push(path);
        }
    }
    all.sort();
    let picked: Vec<PathBuf> = all.iter().filter(|p| file_variant(p).as_deref() == variant).cloned().collect();
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
            (_, _, true) => {
                bail!("{} has only PyTorch .bin weights; convert them to .safetensors first", dir.display())
            }
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

/// The precision weights are kept in (`--dtype`): whatever the files store, the weights are
/// converted to it when loaded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum WeightDType {
    #[default]
    F32,
    F16,
    BF16,
    /// 8-bit fast mode: the UNet's linear and convolution weights (and those of ControlNets,
    /// T2I-Adapters and motion modules) quantized per output channel at load, multiplied in 8
    /// bits where the CPU has VNNI; everything else f32. CPU only.
    Int8,
}

impl std::str::FromStr for WeightDType {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(Self::F32),
            "f16" | "fp16" | "float16" | "half" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::BF16),
            "int8" | "q8" | "qint8" => Ok(Self::Int8),
            _ => Err(format!("unknown dtype `{s}`: f32, f16, bf16 or int8")),
        }
    }
}

impl std::fmt::Display for WeightDType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::BF16 => "bf16",
            Self::Int8 => "int8",
        })
    }
}

impl WeightDType {
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::BF16 => DType::BF16,
            // What is not quantized stays f32.
            Self::Int8 => DType::F32,
        }
    }

    /// How a model is built on `device` with weights in this dtype: on the CPU the activations
    /// stay f32 (our kernels widen half-precision weights as they pack them); elsewhere
    /// everything is in this dtype.
    pub fn precision(self, device: &Device) -> Precision {
        if device.is_cpu() {
            Precision { compute: DType::F32, weights: self.dtype(), int8: self == Self::Int8 }
        } else {
            Precision::from(self.dtype())
        }
    }
}

/// The dtypes a model is built in: `weights` for matrices and kernels (every tensor of rank 2
/// or more: linear and convolution weights, embedding tables), `compute` for the activations
/// and the small 1-D parameters (norm scales, biases), which is the `VarBuilder`'s dtype. A
/// plain `DType` is both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Precision {
    pub compute: DType,
    pub weights: DType,
    /// Linear and convolution layers quantize their weights to 8 bits ([`quantized_layers`]).
    pub int8: bool,
}

impl From<DType> for Precision {
    fn from(dtype: DType) -> Self {
        Self { compute: dtype, weights: dtype, int8: false }
    }
}

impl Precision {
    /// The same without 8-bit layers (components kept in floating point: text encoders, VAEs).
    pub fn float(self) -> Self {
        Self { int8: false, ..self }
    }
}

/// The name a layer asks its `VarBuilder` about (`vb.contains_tensor`) to learn whether its
/// weight is to be quantized to 8 bits: candle's `VarBuilder` carries only a dtype, and this
/// question reaches our weights backend, which knows the [`Precision`]. No stored tensor name
/// contains a NUL.
const INT8_QUERY: &str = "\0int8";

/// Whether the layers built from `vb` keep their weights in 8 bits.
pub fn quantized_layers(vb: &VarBuilder) -> bool {
    vb.contains_tensor(INT8_QUERY)
}

/// The weights of a component folder as a `VarBuilder` (diffusers' names).
pub fn load_component(
    dir: &Path,
    variant: Option<&str>,
    precision: impl Into<Precision>,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    Ok(ComponentWeights::open(dir, variant)?.var_builder(None, precision, device))
}

/// Explicit safetensors files as a `VarBuilder`; a truncated or non-safetensors file is an error
/// naming it.
pub fn load_files(files: &[PathBuf], precision: impl Into<Precision>, device: &Device) -> Result<VarBuilder<'static>> {
    Ok(ComponentWeights::open_files(files)?.var_builder(None, precision, device))
}

/// The weights of one component, kept so that the component can be rebuilt (e.g. with other
/// LoRA weights): the safetensors headers are parsed once and each tensor is read from its file
/// with a positioned read when a model asks for it. Nothing stays mapped, so the weights are
/// resident once (in the model's tensors), not twice (tensors plus mapped file pages); a rebuild
/// reads the files again, normally from the page cache.
#[derive(Clone)]
pub struct ComponentWeights {
    tensors: Arc<WeightFiles>,
    names: Arc<Vec<String>>,
}

impl ComponentWeights {
    pub fn open(dir: &Path, variant: Option<&str>) -> Result<Self> {
        Self::open_files(&safetensors_files(dir, variant)?)
    }

    pub fn open_files(files: &[PathBuf]) -> Result<Self> {
        let tensors = WeightFiles::open(files)?;
        let mut names: Vec<String> = tensors.index.keys().cloned().collect();
        names.sort();
        Ok(Self { tensors: Arc::new(tensors), names: Arc::new(names) })
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The shape of a stored tensor.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors.index.get(name).map(|t| t.shape.clone())
    }

    /// The same files seen under other names: each `(name, stored_name, view)` makes `name` read
    /// `stored_name` cut by `view` (single-file checkpoints in the original layouts). Stored
    /// names that are missing or views that do not fit are an error naming them.
    pub fn renamed(&self, entries: &[(String, String, WeightView)]) -> Result<Self> {
        let mut index = HashMap::with_capacity(entries.len());
        for (name, stored, view) in entries {
            let Some(t) = self.tensors.index.get(stored) else { bail!("no tensor `{stored}` (for `{name}`)") };
            let Some(t) = t.view(*view) else {
                bail!("tensor `{stored}` of shape {:?} cannot be cut as {view:?} for `{name}`", t.shape)
            };
            index.insert(name.clone(), t);
        }
        let mut names: Vec<String> = index.keys().cloned().collect();
        names.sort();
        let tensors = WeightFiles { files: self.tensors.files.clone(), index };
        Ok(Self { tensors: Arc::new(tensors), names: Arc::new(names) })
    }

    /// A `VarBuilder` over these weights, with `deltas` (e.g. fused LoRAs) added on load (in
    /// f32, then stored in the weights' dtype).
    pub fn var_builder(
        &self,
        deltas: Option<Arc<WeightDeltas>>,
        precision: impl Into<Precision>,
        device: &Device,
    ) -> VarBuilder<'static> {
        let p = precision.into();
        let backend = FusedWeights { base: self.tensors.clone(), deltas: deltas.unwrap_or_default(), precision: p };
        VarBuilder::from_backend(Box::new(backend), p.compute, device.clone())
    }
}

/// Where one tensor lies in which file.
#[derive(Clone)]
struct StoredTensor {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    /// Absolute byte offset of the data in the file.
    offset: u64,
    len: usize,
    /// Stored as the transpose of the matrix the model wants (OpenCLIP's `text_projection`).
    transposed: bool,
}

impl WeightView {
    /// The shape of the cut, or `None` when it does not fit `shape`.
    pub fn apply(self, shape: &[usize]) -> Option<Vec<usize>> {
        let mut s = shape.to_vec();
        match self {
            Self::Whole => {}
            Self::Rows { index, parts } => {
                let rows = *s.first()?;
                if parts == 0 || index >= parts || rows % parts != 0 {
                    return None;
                }
                s[0] = rows / parts;
            }
            Self::Transposed => {
                if s.len() != 2 {
                    return None;
                }
                s.reverse();
            }
            Self::Squeezed => {
                while s.len() > 2 && s.last() == Some(&1) {
                    s.pop();
                }
            }
        }
        Some(s)
    }
}

/// How a renamed weight is cut from a stored tensor ([`ComponentWeights::renamed`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightView {
    /// The stored tensor as it is.
    Whole,
    /// Part `index` of `parts` equal row blocks (a fused `in_proj` split into q, k, v): a
    /// contiguous byte range, so reading it costs nothing extra.
    Rows { index: usize, parts: usize },
    /// The transposed matrix.
    Transposed,
    /// Trailing size-1 dimensions dropped (1x1 convolution kernels used as linear weights).
    Squeezed,
}

/// Open safetensors files and the index of their tensors (a later file wins on duplicate names,
/// as with candle's `MmapedSafetensors::multi`).
struct WeightFiles {
    files: Arc<Vec<(PathBuf, std::fs::File)>>,
    index: HashMap<String, StoredTensor>,
}

impl WeightFiles {
    fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let bad = |e: &dyn std::fmt::Display| {
                anyhow::anyhow!("cannot load weights {}: {}", path.display(), one_line(&e.to_string()))
            };
            let file = std::fs::File::open(path).map_err(|e| bad(&e))?;
            let (header_len, metadata) = {
                // The header is validated against the whole file (offsets contiguous, sizes
                // matching shapes, data ending exactly at the end of the file); only the header's
                // pages are touched, and the mapping is dropped right away.
                // SAFETY: mapped read-only and only read here; like diffusers we assume nobody
                // truncates a weight file while it is being used.
                let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| bad(&e))?;
                safetensors::SafeTensors::read_metadata(&map).map_err(|e| bad(&e))?
            };
            for (name, info) in metadata.tensors() {
                let dtype = candle_dtype(info.dtype).map_err(|e| bad(&format!("{name}: {e}")))?;
                let (start, end) = info.data_offsets;
                let stored = StoredTensor {
                    file: i,
                    dtype,
                    shape: info.shape.clone(),
                    offset: (8 + header_len + start) as u64,
                    len: end - start,
                    transposed: false,
                };
                index.insert(name, stored);
            }
            files.push((path.clone(), file));
        }
        Ok(Self { files: Arc::new(files), index })
    }

    /// Read a tensor in its stored dtype.
    fn load(&self, name: &str, dev: &Device) -> candle_core::Result<Tensor> {
        let Some(t) = self.index.get(name) else {
            return Err(candle_core::Error::CannotFindTensor { path: name.to_string() }.bt());
        };
        let (path, file) = &self.files[t.file];
        let read_err =
            |e: std::io::Error| candle_core::Error::Msg(format!("cannot read {name} from {}: {e}", path.display()));
        if t.dtype == DType::F32 && !t.transposed {
            // Mapped from the page cache where the global allocator can free such a buffer.
            if let Some(data) = crate::alloc::map_file_f32(file, t.offset, t.len) {
                return Tensor::from_vec(data, t.stored_shape(), dev);
            }
        }
        if t.dtype == DType::F32 {
            // Straight into the tensor's buffer: one copy from the page cache, none in between.
            let mut data = vec![0f32; t.len / 4];
            // SAFETY: any bytes are a valid f32; the byte view covers exactly `data`'s memory.
            let bytes = unsafe { std::slice::from_raw_parts_mut(data.as_mut_ptr().cast::<u8>(), t.len) };
            read_exact_at(file, bytes, t.offset).map_err(read_err)?;
            if cfg!(target_endian = "big") {
                data.iter_mut().for_each(|v| *v = f32::from_bits(u32::from_le(v.to_bits())));
            }
            return t.oriented(Tensor::from_vec(data, t.stored_shape(), dev)?);
        }
        let mut bytes = vec![0u8; t.len];
        read_exact_at(file, &mut bytes, t.offset).map_err(read_err)?;
        t.oriented(Tensor::from_raw_buffer(&bytes, t.dtype, &t.stored_shape(), dev)?)
    }
}

impl StoredTensor {
    /// The shape of the bytes on disk (`shape` is what the model sees).
    fn stored_shape(&self) -> Vec<usize> {
        if self.transposed {
            self.shape.iter().rev().copied().collect()
        } else {
            self.shape.clone()
        }
    }

    fn oriented(&self, t: Tensor) -> candle_core::Result<Tensor> {
        if self.transposed {
            t.t()?.contiguous()
        } else {
            Ok(t)
        }
    }

    /// This tensor cut as `view` says; `None` if the view does not fit its shape.
    fn view(&self, view: WeightView) -> Option<Self> {
        let mut t = self.clone();
        t.shape = view.apply(&self.shape)?;
        match view {
            WeightView::Rows { index, parts } => {
                if self.transposed {
                    return None;
                }
                t.len /= parts;
                t.offset += (index * t.len) as u64;
            }
            WeightView::Transposed => t.transposed = !t.transposed,
            WeightView::Whole | WeightView::Squeezed => {}
        }
        Some(t)
    }
}

fn candle_dtype(d: safetensors::Dtype) -> Result<DType> {
    use safetensors::Dtype as S;
    Ok(match d {
        S::U8 => DType::U8,
        S::U32 => DType::U32,
        S::I16 => DType::I16,
        S::I32 => DType::I32,
        S::I64 => DType::I64,
        S::BF16 => DType::BF16,
        S::F16 => DType::F16,
        S::F32 => DType::F32,
        S::F64 => DType::F64,
        S::F8_E4M3 => DType::F8E4M3,
        other => bail!("unsupported tensor dtype {other:?}"),
    })
}

#[cfg(unix)]
fn read_exact_at(file: &std::fs::File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(windows)]
fn read_exact_at(file: &std::fs::File, mut buf: &mut [u8], mut offset: u64) -> std::io::Result<()> {
    while !buf.is_empty() {
        match std::os::windows::fs::FileExt::seek_read(file, buf, offset)? {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
        }
    }
    Ok(())
}

/// Low-rank updates to add to named weights: `weight += scale * up @ down`, reshaped to the
/// weight's shape (linear layers and convolutions alike).
#[derive(Clone, Debug, Default)]
pub struct WeightDeltas {
    pub by_weight: HashMap<String, Vec<LowRankDelta>>,
}

#[derive(Clone, Debug)]
pub struct LowRankDelta {
    /// `[out, rank]`.
    pub up: Tensor,
    /// `[rank, in * kh * kw]`.
    pub down: Tensor,
    pub scale: f64,
}

impl WeightDeltas {
    pub fn is_empty(&self) -> bool {
        self.by_weight.is_empty()
    }

    /// `weight` plus its deltas, computed in f32, in `dtype`.
    fn apply(&self, name: &str, weight: Tensor, dtype: DType) -> candle_core::Result<Tensor> {
        let Some(deltas) = self.by_weight.get(name) else { return weight.to_dtype(dtype) };
        let mut w = weight.to_dtype(DType::F32)?;
        for d in deltas {
            let delta = d.up.matmul(&d.down)?;
            if delta.elem_count() != w.elem_count() {
                candle_core::bail!(
                    "LoRA update for {name} has {} values but the weight has shape {:?}",
                    delta.elem_count(),
                    w.dims()
                )
            }
            let delta = (delta.reshape(w.shape())? * d.scale)?;
            w = (w + delta)?;
        }
        w.to_dtype(dtype)
    }
}

/// A `SimpleBackend` that reads stored weights and adds the deltas of fused adapters; tensors of
/// rank 2 or more come in `precision.weights`, the others in the dtype asked for.
struct FusedWeights {
    base: Arc<WeightFiles>,
    deltas: Arc<WeightDeltas>,
    precision: Precision,
}

impl FusedWeights {
    /// The dtype a tensor of this shape is kept in, when the model asks for `asked`.
    fn dtype_for(&self, shape: &Shape, asked: DType) -> DType {
        if shape.rank() >= 2 && asked == self.precision.compute {
            self.precision.weights
        } else {
            asked
        }
    }
}

impl SimpleBackend for FusedWeights {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let w = self.base.load(name, dev)?;
        if w.shape() != &s {
            Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: s,
                got: w.shape().clone(),
            }
            .bt())?
        }
        let dtype = self.dtype_for(w.shape(), dtype);
        self.deltas.apply(name, w, dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let w = self.base.load(name, dev)?;
        let dtype = self.dtype_for(w.shape(), dtype);
        self.deltas.apply(name, w, dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        if name.ends_with(INT8_QUERY) {
            return self.precision.int8;
        }
        self.base.index.contains_key(name)
    }
}

pub(crate) fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
