//! Device strings: "cpu", or "cuda:N" in builds with the `cuda` feature.

use crate::error::{Error, Result};
use candle_core::Device;

/// Parses "cpu" / "cuda" / "cuda:N" into a device, with a clear error when CUDA is not built in
/// or not available.
pub fn parse_device(spec: &str) -> Result<Device> {
    let s = spec.trim().to_ascii_lowercase();
    if s == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = if s == "cuda" {
        0
    } else if let Some(n) = s.strip_prefix("cuda:") {
        n.parse::<usize>()
            .map_err(|_| Error::Device(format!("'{spec}': bad ordinal (expected cuda:N)")))?
    } else {
        return Err(Error::Device(format!(
            "'{spec}' is not a device (expected cpu or cuda:N)"
        )));
    };
    if !cfg!(feature = "cuda") {
        return Err(Error::Device(format!(
            "'{spec}': this build of relora has no CUDA support (rebuild with --features cuda)"
        )));
    }
    Device::new_cuda(ordinal).map_err(|e| Error::Device(format!("'{spec}': {e}")))
}

/// The canonical string for a device ("cpu" or "cuda:N").
pub fn device_string(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Lets CUDA f32 matmuls use TF32 tensor cores (about 10 mantissa bits per product, f32
/// accumulation). No effect on the CPU or in builds without CUDA.
pub fn set_tf32(enabled: bool) {
    candle_core::cuda::set_gemm_reduced_precision_f32(enabled);
}
