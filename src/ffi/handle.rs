//! The trainer handle behind `relora_trainer *`: what the C API keeps beside the core trainer
//! (options, callbacks, last statistics, the host's state), and [`enter`], the one way a call
//! reaches it: live-handle check, one call at a time, panics caught and the trainer poisoned.

use super::callbacks::{relora_log_level, Callbacks};
use super::guard::{check_live, panic_message, registry, Failure, FfiResult, HandleKind};
use super::options::Options;
use super::stats::relora_step_stats;
use super::status::relora_status;
use crate::trainer::{StepStats, Trainer};
use std::cell::UnsafeCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
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
pub(crate) fn hand_out(state: TrainerState, out: *mut *mut relora_trainer) {
    let raw = Box::into_raw(Box::new(relora_trainer {
        busy: AtomicBool::new(false),
        poisoned: AtomicBool::new(false),
        state: UnsafeCell::new(state),
    }));
    registry().insert(raw as usize, HandleKind::Trainer);
    // SAFETY: `out` was checked by `out_ptr` before any work.
    unsafe { out.write(raw) };
}

impl relora_trainer {
    /// Whether a call is running on this trainer.
    pub(crate) fn is_busy(&self) -> bool {
        self.busy.load(Ordering::Acquire)
    }
}

impl TrainerState {
    /// The state of a new handle around `trainer`.
    pub(crate) fn new(trainer: Trainer, options: Options, host_state: Option<String>) -> Self {
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
    pub(crate) fn vocab(&self) -> usize {
        self.trainer.model.config.vocab_size
    }

    /// Drops a half-built step, if any.
    pub(crate) fn discard_pending(&mut self) {
        self.trainer.discard_pending();
    }

    /// Refuses `what` while a split step is being built.
    pub(crate) fn refuse_pending(&self, what: &str) -> FfiResult<()> {
        if self.trainer.has_pending() {
            return Err(Failure::state(format!(
                "{what} is not allowed during a split step: relora_trainer_accumulate was called, \
                 finish the step with relora_trainer_apply first"
            )));
        }
        Ok(())
    }

    /// Records a finished step: statistics and log lines.
    pub(crate) fn record(&mut self, stats: &StepStats) -> relora_step_stats {
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
