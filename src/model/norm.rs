//! RMSNorm: the fused op where it has a kernel, composed differentiable candle ops elsewhere
//! (candle-nn's fused rms_norm has no backward).

use crate::ops::rms_norm_fused;
use candle_core::{Tensor, D};

/// `x [n, h] * rsqrt(mean(x^2) + eps) * weight [h]`, as Hugging Face's `LlamaRMSNorm` computes it
/// (in the parameter dtype, which is f32 or f64 here).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    if crate::ops::has_kernel(x) && x.rank() == 2 {
        rms_norm_fused(x, weight, eps)
    } else {
        rms_norm_composed(x, weight, eps)
    }
}

/// RMSNorm from candle's differentiable ops, for any device and rank.
pub(crate) fn rms_norm_composed(
    x: &Tensor,
    weight: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    let mean_sq = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv_rms = (mean_sq + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&inv_rms)?.broadcast_mul(weight)
}
