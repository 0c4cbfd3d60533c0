//! Training through the C API: one step, or a split step (accumulate micro-batches, then apply
//! with the host's gradient reducer), and evaluation; the work is the [`super::session`]'s.
//!
//! Tokens arrive as `const int32_t *tokens` holding `batch` rows of `len` tokens, row-major.
//! Each row carries its own shifted target: the inputs are `row[0 .. len-1]` and the targets
//! `row[1 .. len]`, so a row of `len` tokens trains `len - 1` positions (`len` = seq_len + 1).

use super::callbacks::HostReducer;
use super::guard::{boundary, out_ptr, slice, write_out, Failure, FfiResult};
use super::handle::{enter, relora_trainer};
use super::session::{check_shape, FaceReducer};
use super::stats::{check_stats_out, relora_step_stats, write_stats};
use super::status::relora_status;
use crate::trainer::GradientReducer;
use std::os::raw::c_void;

/// The C reduce callback as a face's reducer: its failure names the parameter it refused.
impl FaceReducer for HostReducer {
    fn reducer(&mut self) -> &mut dyn GradientReducer {
        self
    }

    fn failure(&self) -> Option<String> {
        self.failed.as_ref().map(|name| {
            format!(
                "the gradient reducer returned false for {name}; the step was abandoned and its \
                 gradients discarded"
            )
        })
    }
}

/// Borrows the caller's `batch` rows of `len` tokens, after the checks a C caller's pointer and
/// lengths need (the ids and the count are checked by the session).
///
/// # Safety
/// `tokens` is NULL or valid for reads of `batch * len` values.
unsafe fn token_slice<'a>(tokens: *const i32, batch: usize, len: usize) -> FfiResult<&'a [i32]> {
    if tokens.is_null() {
        return Err(Failure::null("tokens"));
    }
    check_shape(batch, len)?;
    let total = batch
        .checked_mul(len)
        .ok_or_else(|| Failure::invalid(format!("batch {batch} x len {len} overflows")))?;
    // SAFETY: the caller provides batch * len readable values.
    unsafe { slice(tokens, total, "tokens") }
}

/// One optimizer step on `batch` rows of `len` tokens (`len` = seq_len + 1: inputs are
/// `row[0..len-1]`, targets `row[1..len]`). The rows are split into `grad_accum` equal
/// micro-batches whose gradients are averaged; the step then clips, updates at the scheduled
/// learning rate, and performs the ReLoRA switch or merge when one is due. `batch` and `len`
/// may differ from the `batch_size` and `seq_len` options (`batch_size` only sizes evaluation
/// chunks), as long as `len - 1` is at most `max_position_embeddings`.
///
/// A step whose loss or gradient is not finite is skipped (nothing updated, `stats->skipped`
/// set) and still returns `RELORA_STATUS_OK`, until `max_nonfinite_steps` in a row fail with
/// `RELORA_STATUS_NON_FINITE`.
///
/// `stats` may be NULL; otherwise set `stats->struct_size` first, and on success it receives the
/// step's statistics. On failure no update is applied and the step count is unchanged (a ReLoRA
/// switch or merge due before this step may already have been performed; a retried step does
/// not repeat it).
///
/// Errors: `RELORA_STATUS_NULL_PARAMETER`, `RELORA_STATUS_INVALID_HANDLE`,
/// `RELORA_STATUS_INVALID_ARGUMENT` (batch 0, len < 2, batch not a multiple of grad_accum, bad
/// struct_size), `RELORA_STATUS_INVALID_DATA` (token ids outside [0, vocab_size), len - 1 above
/// max_position_embeddings), `RELORA_STATUS_INVALID_STATE` (a split step is in progress),
/// `RELORA_STATUS_ABORTED`, `RELORA_STATUS_NON_FINITE`, `RELORA_STATUS_COMPUTE`,
/// `RELORA_STATUS_BUSY`, `RELORA_STATUS_POISONED`.
#[no_mangle]
pub unsafe extern "C" fn relora_trainer_step(
    trainer: *mut relora_trainer,
    tokens: *const i32,
    batch: usize,
    len: usize,
    stats: *mut relora_step_stats,
) -> relora_status {
    let func = "relora_trainer_step";
    boundary(func, || {
        enter(func, trainer, |s| {
            // SAFETY: the caller's struct, checked before use.
            unsafe { check_stats_out(stats)? };
            // SAFETY: the caller provides batch * len tokens.
            let tokens = unsafe { token_slice(tokens, batch, len)? };
            let c = s.step(tokens, batch, len)?;
            // SAFETY: checked by `check_stats_out`.
            unsafe { write_stats(stats, &c) };
            Ok(())
        })
    })
}

/// The first half of a split step, for hosts that reduce gradients themselves: forward and
/// backward of one micro-batch of `batch` rows of `len` tokens (as in `relora_trainer_step`),
/// adding its gradients to the step being built. Call it `grad_accum` times per step (each
/// micro-batch's loss is scaled by 1 / grad_accum), then `relora_trainer_apply`. `loss` may be
/// NULL; on success it receives the micro-batch's mean loss.
///
/// Errors: as `relora_trainer_step`, except that a split step in progress is what this call
/// extends; a failed call leaves the micro-batches accumulated so far in place.
#[no_mangle]
pub unsafe extern "C" fn relora_trainer_accumulate(
    trainer: *mut relora_trainer,
    tokens: *const i32,
    batch: usize,
    len: usize,
    loss: *mut f32,
) -> relora_status {
    let func = "relora_trainer_accumulate";
    boundary(func, || {
        enter(func, trainer, |s| {
            if !loss.is_null() {
                out_ptr(loss, "loss")?;
            }
            // SAFETY: the caller provides batch * len tokens.
            let tokens = unsafe { token_slice(tokens, batch, len)? };
            let value = s.accumulate(tokens, batch, len)?;
            // SAFETY: NULL or checked by `out_ptr`. The ABI's `float`; the step's statistics
            // carry the mean as computed.
            unsafe { write_out(loss, value as f32) };
            Ok(())
        })
    })
}

/// The second half of a split step: calls `reduce` (if not NULL) once per trainable parameter,
/// in a fixed order, with its accumulated gradient as f32 so the host can all-reduce it in place
/// (average across ranks: every rank must then apply the same gradient), then clips, updates and
/// performs any due ReLoRA event, as `relora_trainer_step` does. `user_data` is passed to
/// `reduce` untouched.
///
/// `stats` may be NULL; otherwise set `stats->struct_size` first. If `reduce` returns false the
/// step is abandoned: `RELORA_STATUS_CALLBACK_FAILED`, no weight changed, the accumulated
/// gradients discarded.
///
/// Errors: `RELORA_STATUS_NULL_PARAMETER`, `RELORA_STATUS_INVALID_HANDLE`,
/// `RELORA_STATUS_INVALID_STATE` (nothing accumulated), `RELORA_STATUS_INVALID_ARGUMENT` (bad
/// struct_size), `RELORA_STATUS_CALLBACK_FAILED`, `RELORA_STATUS_NON_FINITE`,
/// `RELORA_STATUS_COMPUTE`, `RELORA_STATUS_BUSY`, `RELORA_STATUS_POISONED`.
#[no_mangle]
pub unsafe extern "C" fn relora_trainer_apply(
    trainer: *mut relora_trainer,
    reduce: super::callbacks::relora_grad_reduce_fn,
    user_data: *mut c_void,
    stats: *mut relora_step_stats,
) -> relora_status {
    let func = "relora_trainer_apply";
    boundary(func, || {
        enter(func, trainer, |s| {
            // SAFETY: the caller's struct, checked before use.
            unsafe { check_stats_out(stats)? };
            let mut reducer = HostReducer::new(reduce, user_data);
            let c = s.apply(reducer.as_mut().map(|r| r as &mut dyn FaceReducer))?;
            // SAFETY: checked by `check_stats_out`.
            unsafe { write_stats(stats, &c) };
            Ok(())
        })
    })
}

/// Mean next-token cross-entropy (nats) of the model on `batch` rows of `len` tokens (as in
/// `relora_trainer_step`), evaluated in chunks of `batch_size` rows, without changing the
/// trainer (dropout off). On success `*loss` receives it; exp(loss) is the perplexity.
///
/// Errors: `RELORA_STATUS_NULL_PARAMETER`, `RELORA_STATUS_INVALID_HANDLE`,
/// `RELORA_STATUS_INVALID_ARGUMENT`, `RELORA_STATUS_INVALID_DATA`, `RELORA_STATUS_ABORTED`,
/// `RELORA_STATUS_COMPUTE`, `RELORA_STATUS_BUSY`, `RELORA_STATUS_POISONED`.
#[no_mangle]
pub unsafe extern "C" fn relora_trainer_eval(
    trainer: *const relora_trainer,
    tokens: *const i32,
    batch: usize,
    len: usize,
    loss: *mut f64,
) -> relora_status {
    let func = "relora_trainer_eval";
    boundary(func, || {
        enter(func, trainer, |s| {
            let loss = out_ptr(loss, "loss")?;
            // SAFETY: the caller provides batch * len tokens.
            let tokens = unsafe { token_slice(tokens, batch, len)? };
            let value = s.eval(tokens, batch, len)?;
            // SAFETY: checked by `out_ptr`.
            unsafe { loss.write(value) };
            Ok(())
        })
    })
}
