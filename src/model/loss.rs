//! Next-token cross-entropy, composed from differentiable ops.

use candle_core::{Tensor, D};

/// Mean cross-entropy of `logits [n, vocab]` against `targets [n]` (u32):
/// `logsumexp(logits) - logits[target]`, with the (detached) row maximum subtracted first.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let picked = shifted.gather(&targets.unsqueeze(1)?, 1)?;
    (lse - picked)?.mean_all()
}

/// Sum (not mean) of the per-token cross-entropy, for evaluation over many batches.
pub fn cross_entropy_sum(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let picked = shifted.gather(&targets.unsqueeze(1)?, 1)?;
    (lse - picked)?.sum_all()
}
