//! `relora_trainer`: create (from params or a checkpoint), train (one call, or accumulate then
//! apply with a gradient reducer), evaluate, save, merge, export, and read the step statistics.
//!
//! Tokens arrive as `const int32_t *tokens` holding `batch` rows of `len` tokens, row-major.
//! Each row carries its own shifted target: the inputs are `row[0 .. len-1]` and the targets
//! `row[1 .. len]`, so a row of `len` tokens trains `len - 1` positions (`len` = seq_len + 1).

use super::callbacks::{relora_log_level, relora_progress_stage, Callbacks, HostReducer};
use super::guard::{
    boundary, check_live, cstr, opt_cstr, out_ptr, panic_message, registry, slice, write_out,
    write_text, Failure, FfiResult, HandleKind,
};
use super::params::{relora_params, with_params, Options};
use super::stats::{check_stats_out, relora_step_stats, write_stats};
use super::status::relora_status;
use crate::checkpoint::{self, SaveExtra};
use crate::data::batcher::Batch;
use crate::device::{device_string, parse_device};
use crate::error::Error;
use crate::export::{write_model_dir, ExportDType, HfExportOptions};
use crate::trainer::{GradientReducer, StepStats, Trainer};
use std::cell::UnsafeCell;
use std::os::raw::{c_char, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// A trainer and everything the C API keeps beside it.
pub(crate) struct TrainerState {
    /// The core trainer.
    pub trainer: Trainer,
    /// The options it was built from (or read back from its checkpoint).
    pub options: Options,
    /// The host's callbacks.
    pub callbacks: Callbacks,
    /// Statistics of the last applied step since creation or loading.
    pub last_stats: Option<relora_step_stats>,
    /// The host's JSON text stored in the checkpoint this trainer was loaded from, byte for
    /// byte as the host gave it.
    pub host_state: Option<String>,
    /// The message of the panic that poisoned the trainer.
    poison: String,
}

/// A trainer. Create with `relora_trainer_new` or `relora_trainer_load`, free with
/// `relora_trainer_free`. One trainer is used by one thread at a time; separate trainers may run
/// in parallel.
pub struct relora_trainer {
    /// Set while a call is running on this trainer.
    busy: AtomicBool,
    /// Set when a call panicked; everything but `_free` is refused from then on.
    poisoned: AtomicBool,
    /// Only touched by the call that holds `busy`.
    state: UnsafeCell<TrainerState>,
}

/// Clears the busy flag when a call leaves, however it leaves.
struct Release<'a>(&'a AtomicBool);

impl Drop for Release<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Runs `body` with exclusive access to a live, healthy trainer. Refuses NULL, freed or foreign
/// handles, overlapping calls (`Busy`) and poisoned trainers; a panic in `body` poisons the
/// trainer. Failures are also sent to the trainer's logger as "func: message".
pub(crate) fn enter<T>(
    func: &str,
    trainer: *const relora_trainer,
    body: impl FnOnce(&mut TrainerState) -> FfiResult<T>,
) -> FfiResult<T> {
    if trainer.is_null() {
        return Err(Failure::null("trainer"));
    }
    {
        let live = registry();
        check_live(&live, trainer as usize, HandleKind::Trainer, "trainer")?;
        // SAFETY: the registry says the handle is live, and it cannot be freed while we hold the
        // registry lock (freeing takes it too).
        let t = unsafe { &*trainer };
        if t.busy.swap(true, Ordering::Acquire) {
            return Err(Failure::new(
                relora_status::Busy,
                "the trainer is already in a call (from another thread, or from one of its own \
                 callbacks); one trainer is used by one thread at a time",
            ));
        }
    }
    // SAFETY: live (checked above); `_free` refuses a busy trainer, so it stays live until the
    // Release guard clears the flag.
    let t = unsafe { &*trainer };
    let _release = Release(&t.busy);
    // SAFETY: the busy flag gives this call exclusive access to the state.
    let state = unsafe { &mut *t.state.get() };
    if t.poisoned.load(Ordering::Acquire) {
        return Err(Failure::new(
            relora_status::Poisoned,
            format!(
                "the trainer panicked in an earlier call ({}); only relora_trainer_free is allowed",
                state.poison
            ),
        ));
    }
    let result = match catch_unwind(AssertUnwindSafe(|| body(&mut *state))) {
        Ok(r) => r,
        Err(payload) => {
            let msg = panic_message(&*payload);
            t.poisoned.store(true, Ordering::Release);
            state.poison = msg.clone();
            Err(Failure::new(
                relora_status::Panic,
                format!(
                    "internal panic: {msg}; the trainer is poisoned and only relora_trainer_free \
                     is allowed"
                ),
            ))
        }
    };
    if let Err(f) = &result {
        state
            .callbacks
            .log(relora_log_level::Error, || format!("{func}: {}", f.message));
    }
    result
}

/// Boxes a trainer, registers the handle and writes it to `out`.
fn hand_out(state: TrainerState, out: *mut *mut relora_trainer) {
    let raw = Box::into_raw(Box::new(relora_trainer {
        busy: AtomicBool::new(false),
        poisoned: AtomicBool::new(false),
        state: UnsafeCell::new(state),
    }));
    registry().insert(raw as usize, HandleKind::Trainer);
    // SAFETY: `out` was checked by `out_ptr` before any work.
    unsafe { out.write(raw) };
}

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

impl TrainerState {
    fn new(trainer: Trainer, options: Options, host_state: Option<String>) -> Self {
        TrainerState {
            trainer,
            options,
            callbacks: Callbacks::default(),
            last_stats: None,
            host_state,
            poison: String::new(),
        }
    }

    /// The vocabulary size token ids are checked against.
    fn vocab(&self) -> usize {
        self.trainer.model.config.vocab_size
    }

    /// Drops a half-built step, if any.
    fn discard_pending(&mut self) {
        self.trainer.discard_pending();
    }

    fn refuse_pending(&self, what: &str) -> FfiResult<()> {
        if self.trainer.has_pending() {
            return Err(Failure::state(format!(
                "{what} is not allowed during a split step: relora_trainer_accumulate was called, \
                 finish the step with relora_trainer_apply first"
            )));
        }
        Ok(())
    }

    /// Records a finished step: statistics and log lines.
    fn record(&mut self, stats: &StepStats) -> relora_step_stats {
        let c = relora_step_stats::from_stats(stats, self.trainer.counters().nonfinite_streak);
        let cb = &self.callbacks;
        if stats.switched {
            cb.log(relora_log_level::Info, || {
                format!(
                    "step {}: switched from full rank to rank-{} adapters",
                    stats.step, self.trainer.config.lora_rank
                )
            });
        }
        if let Some(r) = stats.reset {
            cb.log(relora_log_level::Info, || {
                format!(
                    "step {}: merged phase {} into the weights; optimizer reset zeroed {} of {} \
                     adapter state entries",
                    stats.step, r.phase, r.zeroed, r.positions
                )
            });
        }
        if stats.skipped {
            cb.log(relora_log_level::Warn, || {
                format!(
                    "step {} skipped: non-finite loss {} or gradient norm {} ({} skipped in total)",
                    stats.step, stats.loss, stats.grad_norm, stats.skipped_total
                )
            });
        }
        cb.log(relora_log_level::Debug, || {
            format!(
                "step {} loss {:.4} lr {:.3e} grad_norm {:.4} tokens {}",
                stats.step, stats.loss, stats.lr, stats.grad_norm, stats.tokens
            )
        });
        self.last_stats = Some(c);
        c
    }
}

/// Creates a trainer with a freshly initialised model from `params` (which the caller keeps and
/// may free right after). The model and optimizer live on `params`' device ("cpu", or "cuda:N" in
/// builds with CUDA).
///
/// On success `*out` receives a new trainer that the caller owns and frees with
/// `relora_trainer_free`; on failure `*out` is not written.
///
/// Errors: `RELORA_STATUS_NULL_PARAMETER`, `RELORA_STATUS_INVALID_HANDLE` (params),
/// `RELORA_STATUS_INVALID_CONFIG` (see `relora_params_validate`), `RELORA_STATUS_TOKENIZER`,
/// `RELORA_STATUS_DEVICE` (e.g. "cuda:0" in a build without CUDA), `RELORA_STATUS_COMPUTE`.
#[no_mangle]
pub unsafe extern "C" fn relora_trainer_new(
    params: *const relora_params,
    out: *mut *mut relora_trainer,
) -> relora_status {
    boundary("relora_trainer_new", || {
        let out = out_ptr(out, "out")?;
        let options = with_params(params, |o| Ok(o.clone()))?;
        options.validate()?;
        let device = parse_device(&options.device)?;
        let trainer = Trainer::new(&options.model, &options.train, &device)?;
        hand_out(TrainerState::new(trainer, options, None), out);
        Ok(())
    })
}

/// Loads a trainer from a checkpoint directory written by `relora_trainer_save` (or by the
/// command-line program), on `device` ("cpu" when NULL, or "cuda:N"). Training continues exactly
/// where it stopped: weights, adapters, optimizer state, ReLoRA phase, schedule position and
/// random streams are restored; the options are the checkpoint's (read them with
/// `relora_trainer_config_get`), and the host state saved with it is available from
/// `relora_trainer_host_state`. Callbacks are not part of a checkpoint: install them again.
///
/// On success `*out` receives a new trainer owned by the caller; on failure `*out` is not
/// written.
///
/// Errors: `RELORA_STATUS_NULL_PARAMETER`, `RELORA_STATUS_INVALID_ARGUMENT`,
/// `RELORA_STATUS_CHECKPOINT` (missing, corrupt or inconsistent checkpoint, `dir` not a
/// directory, or one of its files not a regular file: a FIFO, a device), `RELORA_STATUS_IO` (an
/// OS error reading a file, such as permission denied), `RELORA_STATUS_DEVICE`.
#[no_mangle]
pub unsafe extern "C" fn relora_trainer_load(
    dir: *const c_char,
    device: *const c_char,
    out: *mut *mut relora_trainer,
) -> relora_status {
    boundary("relora_trainer_load", || {
        let out = out_ptr(out, "out")?;
        // SAFETY: NUL-terminated strings (or NULL for the device) per the C contract.
        let (dir, device) = unsafe { (cstr(dir, "dir")?, opt_cstr(device, "device")?) };
        let device = parse_device(device.unwrap_or("cpu"))?;
        let (trainer, manifest) = checkpoint::load(Path::new(dir), &device)?;
        let options = Options {
            train: manifest.train.clone(),
            model: manifest.model.clone(),
            preset: String::new(),
            model_config: String::new(),
            device: device_string(&device),
            tokenizer: manifest.tokenizer.clone().unwrap_or_default(),
        };
        // Checkpoints from before the exact text was kept hold the host's state as JSON in
        // `data` (as does a command-line run's data cursor).
        let host_state = manifest
            .host_state
            .clone()
            .or_else(|| manifest.data.as_ref().map(|v| v.to_string()));
        hand_out(TrainerState::new(trainer, options, host_state), out);
        Ok(())
    })
}

/// Frees a trainer. NULL is a no-op. A pointer that is not a live trainer (for example one
/// already freed) is left alone, as is a trainer that is inside a call (from one of its own
/// callbacks or another thread); both are recorded in `relora_last_error_message`. A poisoned
/// trainer can be freed.
#[no_mangle]
pub unsafe extern "C" fn relora_trainer_free(trainer: *mut relora_trainer) {
    if trainer.is_null() {
        return;
    }
    boundary("relora_trainer_free", || {
        let mut live = registry();
        check_live(&live, trainer as usize, HandleKind::Trainer, "trainer")?;
        // SAFETY: live per the registry, whose lock we hold.
        if unsafe { &*trainer }.busy.load(Ordering::Acquire) {
            return Err(Failure::new(
                relora_status::Busy,
                "cannot free a trainer while a call on it is running",
            ));
        }
        live.remove(&(trainer as usize));
        drop(live);
        // SAFETY: created by Box::into_raw in `hand_out`, now unreachable through the registry.
        drop(unsafe { Box::from_raw(trainer) });
        Ok(())
    });
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

/// Saves a checkpoint of the whole training state to directory `dir`, atomically: a save that
/// fails leaves whatever was there intact. `dir` may be new, an empty directory, or an earlier
/// relora checkpoint holding nothing else, which is replaced; anything else (a directory with
/// other files, a regular file) is refused with `RELORA_STATUS_OUTPUT_EXISTS` and not touched.
/// `host_state` may be NULL, or JSON text (e.g. the host's data-loader cursor), checked to be
/// JSON and stored as given: `relora_trainer_host_state` returns it byte for byte after
/// `relora_trainer_load`.
///
/// Errors: `RELORA_STATUS_NULL_PARAMETER`, `RELORA_STATUS_INVALID_HANDLE`,
/// `RELORA_STATUS_INVALID_ARGUMENT` (host_state not JSON), `RELORA_STATUS_INVALID_STATE` (a split
/// step is in progress), `RELORA_STATUS_OUTPUT_EXISTS`, `RELORA_STATUS_IO`,
/// `RELORA_STATUS_CHECKPOINT`, `RELORA_STATUS_BUSY`, `RELORA_STATUS_POISONED`.
#[no_mangle]
pub unsafe extern "C" fn relora_trainer_save(
    trainer: *const relora_trainer,
    dir: *const c_char,
    host_state: *const c_char,
) -> relora_status {
    let func = "relora_trainer_save";
    boundary(func, || {
        enter(func, trainer, |s| {
            // SAFETY: NUL-terminated strings (host_state may be NULL) per the C contract.
            let (dir, host) = unsafe { (cstr(dir, "dir")?, opt_cstr(host_state, "host_state")?) };
            s.refuse_pending("saving")?;
            // Checked to be JSON, then kept as the exact text: a host's cursor comes back byte
            // for byte (key order, spacing, integers beyond 64 bits).
            if let Some(text) = host {
                serde_json::from_str::<serde::de::IgnoredAny>(text)
                    .map_err(|e| Failure::invalid(format!("host_state is not valid JSON: {e}")))?;
            }
            let tokenizer = Some(s.options.tokenizer.clone()).filter(|t| !t.is_empty());
            let extra = SaveExtra {
                data: None,
                tokenizer,
                host_state: host.map(str::to_string),
            };
            checkpoint::save(&s.trainer, Path::new(dir), &extra)?;
            s.callbacks.log(relora_log_level::Info, || {
                format!("saved checkpoint {dir} at step {}", s.trainer.step_count())
            });
            Ok(())
        })
    })
}

/// Merges the current adapters into the frozen weights now, re-initialises them and resets their
/// optimizer state, as a scheduled ReLoRA merge does (counted as a phase). For hosts that decide
/// merge points themselves.
///
/// Errors: `RELORA_STATUS_NULL_PARAMETER`, `RELORA_STATUS_INVALID_HANDLE`,
/// `RELORA_STATUS_INVALID_STATE` (no adapters attached: mode full, or before
/// warmup_full_steps; or a split step in progress), `RELORA_STATUS_COMPUTE`,
/// `RELORA_STATUS_BUSY`, `RELORA_STATUS_POISONED`.
#[no_mangle]
pub unsafe extern "C" fn relora_trainer_merge(trainer: *mut relora_trainer) -> relora_status {
    let func = "relora_trainer_merge";
    boundary(func, || {
        enter(func, trainer, |s| {
            s.refuse_pending("merging")?;
            if !s.trainer.has_adapters() {
                return Err(Failure::state(
                    "no adapters are attached (mode full, or still in the full-rank warm start)",
                ));
            }
            let r = s.trainer.merge_and_reset()?;
            s.callbacks.log(relora_log_level::Info, || {
                format!(
                    "step {}: merged phase {} on request; optimizer reset zeroed {} of {} adapter \
                     state entries",
                    s.trainer.step_count(),
                    r.phase,
                    r.zeroed,
                    r.positions
                )
            });
            Ok(())
        })
    })
}

/// Exports the model with its current adapters merged in as a Hugging Face Llama directory at
/// `out_dir` (`config.json`, `generation_config.json`, `model.safetensors` or shards with an
/// index, and the tokenizer files when the trainer has a tokenizer), written atomically. The
/// trainer is not changed. `dtype` is "f32" (when NULL), "bf16" or "f16"; `max_shard_bytes` 0
/// writes one file. `out_dir` may be new or an empty directory; an earlier relora export there
/// (marked by its `relora-export.json`, holding nothing else) is replaced only when `overwrite`
/// is true; anything else is never replaced.
///
/// Errors: `RELORA_STATUS_NULL_PARAMETER`, `RELORA_STATUS_INVALID_HANDLE`,
/// `RELORA_STATUS_INVALID_ARGUMENT` (unknown dtype), `RELORA_STATUS_OUTPUT_EXISTS` (out_dir
/// holds what relora did not write, or its own export and overwrite is false),
/// `RELORA_STATUS_IO` (a write failed), `RELORA_STATUS_TOKENIZER`,
/// `RELORA_STATUS_COMPUTE`, `RELORA_STATUS_BUSY`, `RELORA_STATUS_POISONED`.
#[no_mangle]
pub unsafe extern "C" fn relora_trainer_export(
    trainer: *const relora_trainer,
    out_dir: *const c_char,
    dtype: *const c_char,
    max_shard_bytes: u64,
    overwrite: bool,
) -> relora_status {
    let func = "relora_trainer_export";
    boundary(func, || {
        enter(func, trainer, |s| {
            // SAFETY: NUL-terminated strings (dtype may be NULL) per the C contract.
            let (out, dtype) = unsafe { (cstr(out_dir, "out_dir")?, opt_cstr(dtype, "dtype")?) };
            let dtype: ExportDType = match dtype {
                None => ExportDType::F32,
                Some(d) => d
                    .parse()
                    .map_err(|e: Error| Failure::invalid(e.to_string()))?,
            };
            let opts = HfExportOptions {
                dtype,
                max_shard_bytes: (max_shard_bytes > 0).then_some(max_shard_bytes),
                force: overwrite,
            };
            let weights = s.trainer.merged_weights()?;
            let tokenizer = Some(s.options.tokenizer.as_str()).filter(|t| !t.is_empty());
            write_model_dir(
                &weights,
                &s.trainer.model.config,
                tokenizer,
                Path::new(out),
                &opts,
            )?;
            s.callbacks.log(relora_log_level::Info, || {
                format!(
                    "exported the merged model ({dtype}) to {out} at step {}",
                    s.trainer.step_count()
                )
            });
            Ok(())
        })
    })
}

/// Optimizer steps completed, into `*out` (written only on success).
///
/// Errors: `RELORA_STATUS_NULL_PARAMETER`, `RELORA_STATUS_INVALID_HANDLE`, `RELORA_STATUS_BUSY`,
/// `RELORA_STATUS_POISONED`.
#[no_mangle]
pub unsafe extern "C" fn relora_trainer_step_count(
    trainer: *const relora_trainer,
    out: *mut u64,
) -> relora_status {
    getter("relora_trainer_step_count", trainer, out, |s| {
        s.trainer.step_count()
    })
}

/// Completed ReLoRA merges (phases), into `*out` (written only on success).
///
/// Errors: as `relora_trainer_step_count`.
#[no_mangle]
pub unsafe extern "C" fn relora_trainer_phase(
    trainer: *const relora_trainer,
    out: *mut u64,
) -> relora_status {
    getter("relora_trainer_phase", trainer, out, |s| {
        s.trainer.phases().len() as u64
    })
}

/// Steps skipped for a non-finite loss or gradient over the whole run, into `*out` (written only
/// on success).
///
/// Errors: as `relora_trainer_step_count`.
#[no_mangle]
pub unsafe extern "C" fn relora_trainer_skipped_steps(
    trainer: *const relora_trainer,
    out: *mut u64,
) -> relora_status {
    getter("relora_trainer_skipped_steps", trainer, out, |s| {
        s.trainer.counters().skipped_total
    })
}

/// The learning rate the next step will use, into `*out` (written only on success).
///
/// Errors: as `relora_trainer_step_count`.
#[no_mangle]
pub unsafe extern "C" fn relora_trainer_current_lr(
    trainer: *const relora_trainer,
    out: *mut f64,
) -> relora_status {
    getter("relora_trainer_current_lr", trainer, out, |s| {
        s.trainer.current_lr()
    })
}

/// Statistics of the last step applied since this trainer was created or loaded (set
/// `stats->struct_size` first).
///
/// Errors: `RELORA_STATUS_NULL_PARAMETER`, `RELORA_STATUS_INVALID_HANDLE`,
/// `RELORA_STATUS_INVALID_ARGUMENT` (bad struct_size), `RELORA_STATUS_INVALID_STATE` (no step
/// yet), `RELORA_STATUS_BUSY`, `RELORA_STATUS_POISONED`.
#[no_mangle]
pub unsafe extern "C" fn relora_trainer_last_stats(
    trainer: *const relora_trainer,
    stats: *mut relora_step_stats,
) -> relora_status {
    let func = "relora_trainer_last_stats";
    boundary(func, || {
        enter(func, trainer, |s| {
            if stats.is_null() {
                return Err(Failure::null("stats"));
            }
            // SAFETY: the caller's struct, checked before use.
            unsafe { check_stats_out(stats)? };
            let c = s.last_stats.ok_or_else(|| {
                Failure::state("no step has been applied since the trainer was created or loaded")
            })?;
            // SAFETY: checked by `check_stats_out`.
            unsafe { write_stats(stats, &c) };
            Ok(())
        })
    })
}

/// Copies the JSON text stored as host state in the checkpoint this trainer was loaded from
/// (empty when none, or when the trainer was created from params), with the text-output
/// convention of `relora_params_get`.
///
/// Errors: `RELORA_STATUS_NULL_PARAMETER`, `RELORA_STATUS_INVALID_HANDLE`,
/// `RELORA_STATUS_BUFFER_TOO_SMALL`, `RELORA_STATUS_BUSY`, `RELORA_STATUS_POISONED`.
#[no_mangle]
pub unsafe extern "C" fn relora_trainer_host_state(
    trainer: *const relora_trainer,
    buf: *mut c_char,
    len: usize,
    out_len: *mut usize,
) -> relora_status {
    let func = "relora_trainer_host_state";
    boundary(func, || {
        enter(func, trainer, |s| {
            let text = s.host_state.as_deref().unwrap_or_default();
            // SAFETY: buffer contract as documented.
            unsafe { write_text(text, buf, len, out_len) }
        })
    })
}

/// Copies the text form of one of the trainer's options (any `relora_params_set` key; `preset`
/// and `model_config` read back as set, empty for a loaded trainer), with the text-output
/// convention of `relora_params_get`.
///
/// Errors: `RELORA_STATUS_NULL_PARAMETER`, `RELORA_STATUS_INVALID_HANDLE`,
/// `RELORA_STATUS_UNKNOWN_PARAM`, `RELORA_STATUS_BUFFER_TOO_SMALL`, `RELORA_STATUS_BUSY`,
/// `RELORA_STATUS_POISONED`.
#[no_mangle]
pub unsafe extern "C" fn relora_trainer_config_get(
    trainer: *const relora_trainer,
    key: *const c_char,
    buf: *mut c_char,
    len: usize,
    out_len: *mut usize,
) -> relora_status {
    let func = "relora_trainer_config_get";
    boundary(func, || {
        // SAFETY: NUL-terminated string per the C contract.
        let key = unsafe { cstr(key, "key")? };
        let text = enter(func, trainer, |s| s.options.get(key))?;
        // SAFETY: buffer contract as documented.
        unsafe { write_text(&text, buf, len, out_len) }
    })
}

/// Reads one of the trainer's integer options (e.g. `vocab_size`, `seq_len`, `batch_size`) into
/// `*out` (written only on success).
///
/// Errors: `RELORA_STATUS_NULL_PARAMETER`, `RELORA_STATUS_INVALID_HANDLE`,
/// `RELORA_STATUS_UNKNOWN_PARAM`, `RELORA_STATUS_INVALID_PARAM` (not an integer key),
/// `RELORA_STATUS_BUSY`, `RELORA_STATUS_POISONED`.
#[no_mangle]
pub unsafe extern "C" fn relora_trainer_config_get_int(
    trainer: *const relora_trainer,
    key: *const c_char,
    out: *mut i64,
) -> relora_status {
    let func = "relora_trainer_config_get_int";
    boundary(func, || {
        // SAFETY: NUL-terminated string per the C contract.
        let key = unsafe { cstr(key, "key")? };
        let out = out_ptr(out, "out")?;
        let v = enter(func, trainer, |s| s.options.get_int(key))?;
        // SAFETY: checked by `out_ptr`.
        unsafe { out.write(v) };
        Ok(())
    })
}

/// Reads one of the trainer's integer or real options as a real number into `*out` (written only
/// on success).
///
/// Errors: as `relora_trainer_config_get_int`, with text and boolean keys refused.
#[no_mangle]
pub unsafe extern "C" fn relora_trainer_config_get_float(
    trainer: *const relora_trainer,
    key: *const c_char,
    out: *mut f64,
) -> relora_status {
    let func = "relora_trainer_config_get_float";
    boundary(func, || {
        // SAFETY: NUL-terminated string per the C contract.
        let key = unsafe { cstr(key, "key")? };
        let out = out_ptr(out, "out")?;
        let v = enter(func, trainer, |s| s.options.get_float(key))?;
        // SAFETY: checked by `out_ptr`.
        unsafe { out.write(v) };
        Ok(())
    })
}

/// A status-returning getter of one value.
fn getter<T>(
    func: &str,
    trainer: *const relora_trainer,
    out: *mut T,
    get: impl FnOnce(&TrainerState) -> T,
) -> relora_status {
    boundary(func, || {
        let out = out_ptr(out, "out")?;
        let v = enter(func, trainer, |s| Ok(get(s)))?;
        // SAFETY: checked by `out_ptr`.
        unsafe { out.write(v) };
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ffi::params::{relora_params_free, relora_params_new, relora_params_set};
    use std::ffi::CString;

    fn tiny_trainer() -> *mut relora_trainer {
        let mut p: *mut relora_params = std::ptr::null_mut();
        unsafe {
            assert_eq!(relora_params_new(&mut p), relora_status::Ok);
            for (k, v) in [
                ("preset", "tiny"),
                ("vocab_size", "64"),
                ("seq_len", "8"),
                ("batch_size", "2"),
                ("steps", "20"),
                ("warmup_steps", "1"),
                ("warmup_full_steps", "2"),
                ("reset_every", "3"),
                ("restart_warmup_steps", "1"),
                ("lora_rank", "2"),
            ] {
                let (k, v) = (CString::new(k).unwrap(), CString::new(v).unwrap());
                assert_eq!(
                    relora_params_set(p, k.as_ptr(), v.as_ptr()),
                    relora_status::Ok
                );
            }
            let mut t = std::ptr::null_mut();
            assert_eq!(relora_trainer_new(p, &mut t), relora_status::Ok);
            relora_params_free(p);
            t
        }
    }

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

    #[test]
    fn a_panic_poisons_the_trainer_until_it_is_freed() {
        let t = tiny_trainer();
        let st = boundary("test", || {
            enter("test", t, |_| -> FfiResult<()> { panic!("injected fault") })
        });
        assert_eq!(st, relora_status::Panic);
        let mut n = 0u64;
        let st = unsafe { relora_trainer_step_count(t, &mut n) };
        assert_eq!(st, relora_status::Poisoned);
        assert!(crate::ffi::error::last_error().contains("injected fault"));
        unsafe { relora_trainer_free(t) };
        assert_eq!(crate::ffi::error::last_error(), "");
        // The handle is gone: a second free is detected, not performed.
        unsafe { relora_trainer_free(t) };
        assert!(crate::ffi::error::last_error().contains("not a live relora_trainer"));
    }

    #[test]
    fn an_aborted_step_changes_nothing() {
        unsafe extern "C" fn stop(
            _: *mut c_void,
            _: relora_progress_stage,
            _: u64,
            _: u64,
        ) -> bool {
            false
        }
        let t = tiny_trainer();
        let tokens: Vec<i32> = (0..18).map(|i| i % 64).collect();
        unsafe {
            let mut before = relora_step_stats {
                struct_size: std::mem::size_of::<relora_step_stats>() as u32,
                ..Default::default()
            };
            assert_eq!(
                relora_trainer_step(t, tokens.as_ptr(), 2, 9, &mut before),
                relora_status::Ok
            );
            assert_eq!(before.step, 1);
            let cb = super::super::callbacks::relora_trainer_set_progress_callback;
            assert_eq!(cb(t, Some(stop), std::ptr::null_mut()), relora_status::Ok);
            let st = relora_trainer_step(t, tokens.as_ptr(), 2, 9, std::ptr::null_mut());
            assert_eq!(st, relora_status::Aborted);
            let mut n = 0u64;
            assert_eq!(relora_trainer_step_count(t, &mut n), relora_status::Ok);
            assert_eq!(n, 1);
            // No accumulation was left behind: apply has nothing to do.
            let st = relora_trainer_apply(t, None, std::ptr::null_mut(), std::ptr::null_mut());
            assert_eq!(st, relora_status::InvalidState);
            relora_trainer_free(t);
        }
    }
}
