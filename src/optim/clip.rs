//! Global-norm gradient clipping.

use crate::error::{Result, TensorContext};
use candle_core::{DType, Tensor};

/// The L2 norm of all gradients together, computed in f64: one fused reduction and one
/// read-back ([`crate::ops::sum_squares`]) where every gradient has its kernel, else tensor by
/// tensor with candle's ops.
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    if grads.iter().all(crate::ops::has_kernel) {
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

/// The factor clipping scales every gradient by: `max_norm / (norm + 1e-6)` when that is below
/// 1 (PyTorch's `clip_grad_norm_` with its 1e-6 guard), else 1. `max_norm == 0` disables
/// clipping. The optimizer applies it within its update ([`super::AdamW::step_scaled`]), so
/// clipping costs no pass over the gradients of its own.
pub fn coefficient(norm: f64, max_norm: f64) -> f64 {
    if max_norm <= 0.0 {
        return 1.0;
    }
    (max_norm / (norm + 1e-6)).min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clips_only_above_the_limit() {
        assert_eq!(coefficient(0.5, 1.0), 1.0);
        assert_eq!(coefficient(4.0, 1.0), 1.0 / (4.0 + 1e-6));
        assert_eq!(coefficient(1e9, 0.0), 1.0, "0 disables clipping");
    }
}
