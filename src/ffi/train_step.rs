//! Training through the C API: one step, or a split step (accumulate micro-batches, then apply
//! with the host's gradient reducer), and evaluation.
//!
//! Tokens arrive as `const int32_t *tokens` holding `batch` rows of `len` tokens, row-major.
//! Each row carries its own shifted target: the inputs are `row[0 .. len-1]` and the targets
//! `row[1 .. len]`, so a row of `len` tokens trains `len - 1` positions (`len` = seq_len + 1).

use super::callbacks::{relora_progress_stage, HostReducer};
use super::guard::{boundary, out_ptr, slice, write_out, Failure, FfiResult};
use super::handle::{enter, relora_trainer};
use super::stats::{check_stats_out, relora_step_stats, write_stats};
use super::status::relora_status;
use crate::data::batcher::Batch;
use crate::trainer::GradientReducer;
use std::os::raw::c_void;

/// Reads `batch` rows of `len` tokens into one batch (inputs `row[..len-1]`, targets `row[1..]`),
/// checking the lengths and every id against `vocab`.
///
/// # Safety
/// `tokens` is NULL or valid for reads of `batch * len` values.
unsafe fn read_rows(
    tokens: *const i32,
    batch: usize,
    len: usize,
    vocab: usize,
) -> FfiResult<Vec<Vec<u32>>> {
    if tokens.is_null() {
        return Err(Failure::null("tokens"));
    }
    if batch == 0 {
        return Err(Failure::invalid(
            "batch is 0; a call needs at least one row",
        ));
    }
    if len < 2 {
        return Err(Failure::invalid(format!(
            "len is {len}; each row needs at least 2 tokens (inputs are row[0..len-1], targets \
             row[1..len])"
        )));
    }
    let total = batch
        .checked_mul(len)
        .ok_or_else(|| Failure::invalid(format!("batch {batch} x len {len} overflows")))?;
    // SAFETY: the caller provides batch * len readable values.
    let all = unsafe { slice(tokens, total, "tokens")? };
    let mut rows = Vec::with_capacity(batch);
    for (r, row) in all.chunks_exact(len).enumerate() {
        let mut ids = Vec::with_capacity(len);
        for (c, &id) in row.iter().enumerate() {
            if id < 0 || id as usize >= vocab {
                return Err(Failure::new(
                    relora_status::InvalidData,
                    format!(
                        "token id {id} at row {r}, column {c} is outside [0, vocab_size {vocab})"
                    ),
                ));
            }
            ids.push(id as u32);
        }
        rows.push(ids);
    }
    Ok(rows)
}

/// Rows into batches of at most `per_batch` rows each.
fn batches(rows: &[Vec<u32>], per_batch: usize) -> Vec<Batch> {
    rows.chunks(per_batch.max(1))
        .map(|chunk| {
            let seq = chunk[0].len() - 1;
            let mut inputs = Vec::with_capacity(chunk.len() * seq);
            let mut targets = Vec::with_capacity(chunk.len() * seq);
            for row in chunk {
                inputs.extend_from_slice(&row[..seq]);
                targets.extend_from_slice(&row[1..]);
            }
            Batch {
                inputs,
                targets,
                batch: chunk.len(),
                seq_len: seq,
            }
        })
        .collect()
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
            s.refuse_pending("relora_trainer_step")?;
            // SAFETY: the caller provides batch * len tokens.
            let rows = unsafe { read_rows(tokens, batch, len, s.vocab())? };
            let k = s.trainer.config.grad_accum;
            if batch % k != 0 {
                return Err(Failure::invalid(format!(
                    "batch {batch} is not a multiple of grad_accum {k} (the rows are split into \
                     grad_accum equal micro-batches)"
                )));
            }
            let micro = batches(&rows, batch / k);
            for (i, mb) in micro.iter().enumerate() {
                let progress = s
                    .trainer
                    .accumulate(mb)
                    .map_err(Failure::from)
                    .and_then(|_| {
                        s.callbacks.progress(
                            relora_progress_stage::MicroBatch,
                            i as u64 + 1,
                            micro.len() as u64,
                        )
                    });
                if let Err(f) = progress {
                    s.discard_pending();
                    return Err(f);
                }
            }
            let st = s.trainer.apply(None)?;
            let c = s.record(&st);
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
            let rows = unsafe { read_rows(tokens, batch, len, s.vocab())? };
            let value = s.trainer.accumulate(&batches(&rows, batch)[0])?;
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
            if !s.trainer.has_pending() {
                return Err(Failure::state(
                    "nothing to apply: call relora_trainer_accumulate first",
                ));
            }
            let mut reducer = HostReducer::new(reduce, user_data);
            let result = s
                .trainer
                .apply(reducer.as_mut().map(|r| r as &mut dyn GradientReducer));
            let st = match result {
                Ok(st) => st,
                Err(e) => {
                    return Err(match reducer.and_then(|r| r.failed) {
                        Some(name) => Failure::new(
                            relora_status::CallbackFailed,
                            format!(
                                "the gradient reducer returned false for {name}; the step was \
                                 abandoned and its gradients discarded"
                            ),
                        ),
                        None => e.into(),
                    })
                }
            };
            let c = s.record(&st);
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
            let rows = unsafe { read_rows(tokens, batch, len, s.vocab())? };
            let chunks = batches(&rows, s.trainer.config.batch_size);
            let (mut sum, mut count) = (0.0f64, 0usize);
            for (i, b) in chunks.iter().enumerate() {
                let r = s.trainer.eval(std::slice::from_ref(b))?;
                sum += r.loss * r.tokens as f64;
                count += r.tokens;
                s.callbacks.progress(
                    relora_progress_stage::Eval,
                    i as u64 + 1,
                    chunks.len() as u64,
                )?;
            }
            // SAFETY: checked by `out_ptr`.
            unsafe { loss.write(sum / count as f64) };
            Ok(())
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_carry_their_shifted_targets() {
        let tokens = [1, 2, 3, 4, 5, 6];
        let rows = unsafe { read_rows(tokens.as_ptr(), 2, 3, 10).unwrap() };
        let b = batches(&rows, 2);
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].inputs, [1, 2, 4, 5]);
        assert_eq!(b[0].targets, [2, 3, 5, 6]);
        assert_eq!((b[0].batch, b[0].seq_len), (2, 2));
        let e = unsafe { read_rows(tokens.as_ptr(), 2, 3, 6).unwrap_err() };
        assert_eq!(e.status, relora_status::InvalidData);
        assert!(e.message.contains("row 1, column 2"), "{}", e.message);
        let neg = [0, -1];
        let e = unsafe { read_rows(neg.as_ptr(), 1, 2, 6).unwrap_err() };
        assert_eq!(e.status, relora_status::InvalidData);
    }
}
