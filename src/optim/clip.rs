//! Global-norm gradient clipping.

use crate::error::{Result, TensorContext};
use candle_core::{DType, Tensor};

/// The L2 norm of all gradients together, computed in f64. On a GPU, one fused reduction and
/// one read-back ([`crate::ops::sum_squares`]); on the CPU, tensor by tensor.
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    let on_gpu = grads.first().is_some_and(|g| !g.device().is_cpu());
    if on_gpu && grads.iter().all(crate::ops::has_kernel) {
        let sum = match crate::ops::sum_squares(grads).ctx("gradient norm")? {
            Some(s) => s.to_vec1::<f64>().ctx("gradient norm")?[0],
            None => 0.0,
        };
        return Ok(sum.sqrt());
    }
    let mut sum = 0.0f64;
    for g in grads {
        sum += g
            .to_dtype(DType::F64)
            .and_then(|g| g.sqr())
            .and_then(|g| g.sum_all())
            .and_then(|s| s.to_scalar::<f64>())
            .ctx("gradient norm")?;
    }
    Ok(sum.sqrt())
}

/// Scales every gradient by `max_norm / norm` when `norm > max_norm` (PyTorch's
/// `clip_grad_norm_` with its 1e-6 guard). `max_norm == 0` disables clipping.
pub fn clip(grads: &mut [Tensor], norm: f64, max_norm: f64) -> Result<()> {
    if max_norm <= 0.0 {
        return Ok(());
    }
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for g in grads.iter_mut() {
            *g = g.affine(coef, 0.0).ctx("gradient clipping")?;
        }
    }
    Ok(())
}
