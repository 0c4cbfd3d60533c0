//! The element types the fused CPU kernels support (f32, f64), and access to contiguous CPU
//! buffers through a layout.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout};

/// Arithmetic the fused kernels need, for f32 and f64.
pub(crate) trait Float:
    Copy
    + Send
    + Sync
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::AddAssign
    + std::ops::Neg<Output = Self>
    + 'static
{
    /// Zero.
    const ZERO: Self;
    /// One.
    const ONE: Self;
    /// Negative infinity.
    const NEG_INF: Self;
    /// Conversion from f64 (rounding for f32).
    fn from_f64(v: f64) -> Self;
    /// e^x.
    fn exp(self) -> Self;
    /// Replaces each element by its exponential; vectorised for f32
    /// ([`super::vector_exp`]), element by element for f64.
    fn exp_in_place(xs: &mut [Self]);
    /// Square root.
    fn sqrt(self) -> Self;
    /// Natural logarithm.
    fn ln(self) -> Self;
    /// The buffer of this type inside a CPU storage, if it holds this type.
    fn slice(s: &CpuStorage) -> Option<&[Self]>;
    /// The same buffer, writable.
    fn slice_mut(s: &mut CpuStorage) -> Option<&mut [Self]>;
    /// Wraps a vector as a CPU storage.
    fn storage(v: Vec<Self>) -> CpuStorage;
}

impl Float for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INF: Self = f32::NEG_INFINITY;
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn exp(self) -> Self {
        f32::exp(self)
    }
    fn exp_in_place(xs: &mut [Self]) {
        super::vector_exp::exp_in_place(xs)
    }
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    fn ln(self) -> Self {
        f32::ln(self)
    }
    fn slice(s: &CpuStorage) -> Option<&[Self]> {
        match s {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
    fn slice_mut(s: &mut CpuStorage) -> Option<&mut [Self]> {
        match s {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
    fn storage(v: Vec<Self>) -> CpuStorage {
        CpuStorage::F32(v)
    }
}

impl Float for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INF: Self = f64::NEG_INFINITY;
    fn from_f64(v: f64) -> Self {
        v
    }
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn exp_in_place(xs: &mut [Self]) {
        for x in xs {
            *x = x.exp();
        }
    }
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    fn ln(self) -> Self {
        f64::ln(self)
    }
    fn slice(s: &CpuStorage) -> Option<&[Self]> {
        match s {
            CpuStorage::F64(v) => Some(v),
            _ => None,
        }
    }
    fn slice_mut(s: &mut CpuStorage) -> Option<&mut [Self]> {
        match s {
            CpuStorage::F64(v) => Some(v),
            _ => None,
        }
    }
    fn storage(v: Vec<Self>) -> CpuStorage {
        CpuStorage::F64(v)
    }
}

/// The elements a contiguous layout covers, or an error naming the op.
pub fn contiguous<'a, T: Float>(
    op: &str,
    s: &'a CpuStorage,
    l: &Layout,
) -> candle_core::Result<&'a [T]> {
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: input is not contiguous");
    };
    let Some(v) = T::slice(s) else {
        candle_core::bail!("{op}: unsupported dtype {:?}", s.dtype());
    };
    Ok(&v[start..end])
}

/// The elements a contiguous layout covers, writable, or an error naming the op.
pub fn contiguous_mut<'a, T: Float>(
    op: &str,
    s: &'a mut CpuStorage,
    l: &Layout,
) -> candle_core::Result<&'a mut [T]> {
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: destination is not contiguous");
    };
    let dtype = s.dtype();
    let Some(v) = T::slice_mut(s) else {
        candle_core::bail!("{op}: unsupported dtype {dtype:?}");
    };
    Ok(&mut v[start..end])
}

/// Rows handed to each rayon task: enough work per task to amortise scheduling.
pub(crate) fn rows_per_task(row_len: usize) -> usize {
    (16_384 / row_len.max(1)).max(1)
}

/// Elements handed to each rayon task: [`rows_per_task`] whole rows, and never zero, so an empty
/// row width (nothing to compute) does not make a zero chunk size.
pub(crate) fn task_len(row_len: usize) -> usize {
    (row_len * rows_per_task(row_len)).max(1)
}

/// Gradients of `sum(fused * probe)` and `sum(composed * probe)` for one random `probe` of their
/// shape (a non-uniform upstream gradient, so every term of a backward is exercised), for the
/// ops' tests comparing a fused op with its composed reference.
#[cfg(test)]
pub fn probed_grads(
    fused: &candle_core::Tensor,
    composed: &candle_core::Tensor,
) -> (
    candle_core::backprop::GradStore,
    candle_core::backprop::GradStore,
) {
    let probe = candle_core::Tensor::randn(0f64, 1.0, fused.shape(), fused.device())
        .and_then(|p| p.to_dtype(fused.dtype()))
        .expect("probe");
    let grads = |t: &candle_core::Tensor| {
        (t * &probe)
            .and_then(|l| l.sum_all())
            .and_then(|l| l.backward())
            .expect("backward")
    };
    (grads(fused), grads(composed))
}

/// Largest absolute elementwise difference of two same-shape tensors, for the ops' tests.
#[cfg(test)]
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f64 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_dtype(candle_core::DType::F64))
        .and_then(|d| d.to_scalar::<f64>())
        .expect("max_abs_diff")
}
