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
    let device = Device::new_cuda(ordinal).map_err(|e| Error::Device(format!("'{spec}': {e}")))?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = &device {
        // SAFETY: relora runs all work of a device on candle's one stream per device, so the
        // cross-stream events cudarc would record on every kernel argument order nothing; they
        // cost host time on each of the thousands of launches in a step.
        unsafe { d.disable_event_tracking() };
        keep_freed_memory_pooled(ordinal)?;
    }
    Ok(device)
}

/// Tells the device's default memory pool (which candle's stream-ordered allocations draw from)
/// to keep freed memory instead of returning it to the driver at every synchronisation. A
/// training step frees and re-allocates gigabytes of activations, and the two host reads of a
/// step synchronise; with the default threshold of zero every step mapped that memory anew.
#[cfg(feature = "cuda")]
fn keep_freed_memory_pooled(ordinal: usize) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let fail = |what: &str, r: sys::CUresult| {
        Error::Device(format!("cuda:{ordinal}: {what} failed: {r:?}"))
    };
    let mut dev: sys::CUdevice = 0;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    // SAFETY: plain driver calls on out-pointers to locals; the driver was initialised when
    // candle created the device.
    unsafe {
        let r = sys::cuDeviceGet(&mut dev, ordinal as i32);
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(fail("cuDeviceGet", r));
        }
        let r = sys::cuDeviceGetDefaultMemPool(&mut pool, dev);
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(fail("cuDeviceGetDefaultMemPool", r));
        }
        let r = sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        );
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(fail("cuMemPoolSetAttribute", r));
        }
    }
    Ok(())
}

/// The canonical string for a device ("cpu" or "cuda:N").
pub(crate) fn device_string(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Lets CUDA f32 matmuls use TF32 tensor cores (about 10 mantissa bits per product, f32
/// accumulation). No effect on the CPU or in builds without CUDA.
///
/// This one is process-wide, and stays out of the trainer's engine choices
/// ([`crate::engine::Engine`]): it is candle's own global cuBLAS setting, which cannot be scoped
/// to one trainer's calls while another trainer runs on another thread. Only `relora bench
/// --tf32` sets it; for training, bf16 mixed precision (`compute_dtype`) is the per-trainer
/// choice.
pub fn set_tf32(enabled: bool) {
    candle_core::cuda::set_gemm_reduced_precision_f32(enabled);
}
