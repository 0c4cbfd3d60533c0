//! The GPU side of the fused ops: the kernels of `kernels.cu`, compiled with NVRTC the first time
//! a process launches one, and the plumbing to launch them on candle's CUDA storages.
//!
//! Run-time compilation rather than PTX built by nvcc in a build script: candle-core's `cuda`
//! feature already links NVRTC, so this adds no build-time dependency and no build script; the
//! driver JIT-compiles the PTX for whatever card is present; and the kernels' source stays a
//! readable file next to the ops. The cost is one compilation per process (tens of
//! milliseconds), paid at the first fused op.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, LaunchConfig};
use candle_core::cuda_backend::{CudaDType, CudaDevice};
use candle_core::{CudaStorage, DType, Layout};
use std::sync::OnceLock;

/// The module name under which candle caches the compiled kernels, per device.
pub(crate) const MODULE: &str = "relora-fused-ops";

const SOURCE: &str = include_str!("kernels.cu");

/// The PTX of `kernels.cu`, compiled once per process.
pub(crate) fn ptx() -> candle_core::Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    PTX.get_or_init(|| {
        candle_core::cuda_backend::cudarc::nvrtc::compile_ptx(SOURCE)
            .map(|p| p.to_src())
            .map_err(|e| format!("NVRTC could not compile relora's fused-op kernels: {e:?}"))
    })
    .as_deref()
    .map_err(|e| candle_core::Error::Msg(e.clone()))
}

/// Launches kernel `$name` of `kernels.cu` on `$dev` with `$cfg` and the listed arguments, which
/// must match the kernel's parameter list in order and type.
macro_rules! launch {
    ($dev:expr, $name:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg as _;
        use candle_core::cuda_backend::WrapErr as _;
        let func = $dev.get_or_load_custom_func($name, $crate::ops::cuda::MODULE, $crate::ops::cuda::ptx()?)?;
        // One expression, so temporaries among the arguments live until the launch.
        // SAFETY: every call site passes the arguments of the kernel's signature in kernels.cu,
        // with buffers at least as long as the kernel indexes (checked by the caller).
        unsafe { func.builder()$(.arg($arg))+.launch($cfg) }.w()?;
    }};
}
pub(crate) use launch;

/// The f32 buffer of a contiguous input, from its first element.
pub fn input<'a>(
    op: &str,
    s: &'a CudaStorage,
    l: &Layout,
) -> candle_core::Result<CudaView<'a, f32>> {
    typed_input(op, s, l, DType::F32)
}

/// The bf16 buffer of a contiguous input, from its first element.
pub(crate) fn input_bf16<'a>(
    op: &str,
    s: &'a CudaStorage,
    l: &Layout,
) -> candle_core::Result<CudaView<'a, half::bf16>> {
    typed_input(op, s, l, DType::BF16)
}

fn typed_input<'a, T: CudaDType>(
    op: &str,
    s: &'a CudaStorage,
    l: &Layout,
    dtype: DType,
) -> candle_core::Result<CudaView<'a, T>> {
    if s.dtype() != dtype {
        candle_core::bail!("{op}: the CUDA kernel takes {dtype:?}, got {:?}", s.dtype());
    }
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: the CUDA kernel needs a contiguous input");
    };
    Ok(s.as_cuda_slice::<T>()?.slice(start..end))
}

/// An uninitialised buffer of `len` elements that the next kernel fills completely.
pub(crate) fn output<T: DeviceRepr>(
    dev: &CudaDevice,
    len: usize,
) -> candle_core::Result<CudaSlice<T>> {
    // SAFETY: each caller launches a kernel that writes every element before anything reads.
    unsafe { dev.alloc::<T>(len.max(1)) }
}

/// Wraps a filled buffer as a storage of `dev`.
pub(crate) fn storage<T: CudaDType>(slice: CudaSlice<T>, dev: &CudaDevice) -> CudaStorage {
    CudaStorage::wrap_cuda_slice(slice, dev.clone())
}

/// A grid-stride launch over `n` elements.
pub(crate) fn elementwise(n: usize) -> LaunchConfig {
    const BLOCK: usize = 256;
    LaunchConfig {
        grid_dim: (n.div_ceil(BLOCK).clamp(1, 1 << 16) as u32, 1, 1),
        block_dim: (BLOCK as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block per row of `width` elements: `blocks` blocks of up to 1024 threads, a multiple of
/// the warp size, no more than the row needs.
pub(crate) fn rows(blocks: usize, width: usize) -> LaunchConfig {
    let threads = width.div_ceil(32).clamp(1, 32) * 32;
    LaunchConfig {
        grid_dim: (blocks.max(1) as u32, 1, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A kernel's `int` argument, refusing sizes the kernels' 32-bit row indexing cannot hold.
pub(crate) fn int(op: &str, what: &str, v: usize) -> candle_core::Result<i32> {
    i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{op}: {what} {v} is too large")))
}

#[cfg(test)]
mod tests {
    /// NVRTC accepts `kernels.cu`. It needs only libnvrtc, not a GPU, so the CUDA compile check
    /// (scripts/check-cuda.sh) runs it on a CPU machine and a kernel that does not compile is
    /// caught before a GPU session.
    #[test]
    fn kernels_compile_with_nvrtc() {
        let ptx = super::ptx().unwrap();
        for kernel in [
            "causal_softmax_fwd",
            "cross_entropy_fwd",
            "cross_entropy_bwd",
            "rotary",
            "adamw_group",
            "sum_squares_group",
            "add_scaled_to_bf16",
        ] {
            assert!(ptx.contains(kernel), "{kernel} missing from the PTX");
        }
    }
}
