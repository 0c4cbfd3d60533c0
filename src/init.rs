//! Parameter initialisation from the crate's own seeded generator, so that a seed fixes every
//! weight on every device.

use crate::error::{Result, TensorContext};
use crate::rng::Rng;
use candle_core::{DType, Device, Tensor};

/// Builds a tensor of `shape` whose elements come from `f`, in row-major order.
fn from_fn(
    shape: &[usize],
    dtype: DType,
    device: &Device,
    mut f: impl FnMut() -> f64,
) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let t = match dtype {
        DType::F64 => Tensor::from_vec((0..n).map(|_| f()).collect::<Vec<f64>>(), shape, device),
        _ => Tensor::from_vec(
            (0..n).map(|_| f() as f32).collect::<Vec<f32>>(),
            shape,
            &Device::Cpu,
        )
        .and_then(|t| t.to_dtype(dtype))
        .and_then(|t| t.to_device(device)),
    };
    t.ctx("initialising a parameter")
}

/// Normal(0, std), as Hugging Face initialises LLaMA matrices and embeddings.
pub fn normal(
    shape: &[usize],
    std: f64,
    dtype: DType,
    device: &Device,
    rng: &mut Rng,
) -> Result<Tensor> {
    from_fn(shape, dtype, device, || rng.normal() * std)
}

/// Kaiming-uniform with a = sqrt(5), PyTorch's `nn.Linear` default and LoRA's A init:
/// U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for a `[out, fan_in]` matrix.
pub(crate) fn kaiming_uniform(
    shape: &[usize],
    dtype: DType,
    device: &Device,
    rng: &mut Rng,
) -> Result<Tensor> {
    let fan_in = *shape.last().unwrap_or(&1) as f64;
    let bound = 1.0 / fan_in.sqrt();
    from_fn(shape, dtype, device, || rng.uniform(-bound, bound))
}

/// All ones (RMSNorm weights).
pub fn ones(shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
    Tensor::ones(shape, dtype, device).ctx("initialising a norm weight")
}

/// All zeros (LoRA's B).
pub fn zeros(shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
    Tensor::zeros(shape, dtype, device).ctx("initialising a zero parameter")
}
