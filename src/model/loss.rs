//! Next-token cross-entropy: the fused op where it has a kernel ([`crate::ops::cross_entropy`]:
//! f32/f64 on the CPU, f32 on CUDA), composed differentiable ops elsewhere.

use candle_core::{Tensor, D};

/// Per-token cross-entropy `[n]` of `logits [n, vocab]` against `targets [n]` (u32).
fn per_token(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    if crate::ops::has_kernel(logits) {
        crate::ops::cross_entropy_rows(logits, targets)
    } else {
        cross_entropy_composed_rows(logits, targets)
    }
}

/// Mean cross-entropy of `logits [n, vocab]` against `targets [n]` (u32).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    per_token(logits, targets)?.mean_all()
}

/// Sum (not mean) of the per-token cross-entropy, for evaluation over many batches.
pub(crate) fn cross_entropy_sum(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    per_token(logits, targets)?.sum_all()
}

/// Per-token cross-entropy `[n]` from candle's differentiable ops, for any device and dtype:
/// `logsumexp(logits) - logits[target]`, with the (detached) row maximum subtracted first.
pub(crate) fn cross_entropy_composed_rows(
    logits: &Tensor,
    targets: &Tensor,
) -> candle_core::Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let picked = shifted.gather(&targets.unsqueeze(1)?, 1)?;
    (lse - picked)?.squeeze(1)
}
