//! Where a pipeline runs: `--device cpu`, `cuda` or `cuda:N`, as PyTorch names devices.

use crate::loaders::weights::WeightDType;
use anyhow::{bail, Result};
use candle_core::Device;

/// The device named like PyTorch's `torch.device`: `cpu`, `cuda` (GPU 0) or `cuda:N`.
/// CUDA needs a build with the `cuda` feature (`scripts/build-cuda.sh`); without it the answer
/// is a one-line error saying so.
pub fn parse(name: &str) -> Result<Device> {
    let name = name.trim();
    if name.eq_ignore_ascii_case("cpu") {
        return Ok(Device::Cpu);
    }
    let ordinal = match name.to_ascii_lowercase().strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => match rest.strip_prefix(':').and_then(|n| n.parse::<usize>().ok()) {
            Some(n) => n,
            None => bail!("unknown device `{name}`: expected cpu, cuda or cuda:N"),
        },
        None => bail!("unknown device `{name}`: expected cpu, cuda or cuda:N"),
    };
    cuda(ordinal)
}

#[cfg(feature = "cuda")]
fn cuda(ordinal: usize) -> Result<Device> {
    Device::new_cuda(ordinal)
        .map_err(|e| anyhow::anyhow!("cannot open CUDA device {ordinal}: {}", first_line(&e.to_string())))
}

#[cfg(not(feature = "cuda"))]
fn cuda(_ordinal: usize) -> Result<Device> {
    bail!("this lcm was built without CUDA; build it with scripts/build-cuda.sh (cargo feature `cuda`) or pass --device cpu")
}

#[cfg(feature = "cuda")]
fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

/// The dtype diffusers' guide loads models in on this device when none is asked for:
/// `torch_dtype=torch.float16` on a GPU; f32 on the CPU.
/// Bytes of memory new allocations can take on `device` without swapping out what runs: on the
/// CPU, Linux's `MemAvailable` plus free swap; `None` where unknown (other systems, GPUs).
pub fn available_memory(device: &Device) -> Option<u64> {
    if !device.is_cpu() {
        return None;
    }
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = info.lines().find(|l| l.starts_with(name))?;
        line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb * 1024)
    };
    Some(field("MemAvailable:")? + field("SwapFree:").unwrap_or(0))
}

pub fn default_dtype(device: &Device) -> WeightDType {
    if device.is_cpu() {
        WeightDType::F32
    } else {
        WeightDType::F16
    }
}

/// `device` as PyTorch prints it.
pub fn name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(parse("cpu").unwrap().is_cpu());
        assert!(parse(" CPU ").unwrap().is_cpu());
        for bad in ["gpu", "cuda:", "cuda:x", "cuda0", "metal"] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains("unknown device"), "{bad}: {e}");
        }
        #[cfg(not(feature = "cuda"))]
        for name in ["cuda", "cuda:1"] {
            let e = parse(name).unwrap_err().to_string();
            assert!(e.contains("built without CUDA") && !e.contains('\n'), "{e}");
        }
        assert_eq!(name(&Device::Cpu), "cpu");
        assert_eq!(default_dtype(&Device::Cpu), WeightDType::F32);
    }
}
