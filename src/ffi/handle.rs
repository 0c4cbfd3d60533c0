//! The trainer handle behind `relora_trainer *`: a [`Session`] in a box the registry knows, and
//! [`enter`], the one way a C call reaches it: live-handle check, one call at a time, panics
//! caught and the trainer poisoned.

use super::callbacks::relora_log_level;
use super::guard::{check_live, panic_message, registry, Failure, FfiResult, HandleKind};
use super::session::Session;
use super::status::relora_status;
use std::cell::UnsafeCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};

/// A trainer. Create with `relora_trainer_new` or `relora_trainer_load`, free with
/// `relora_trainer_free`. One trainer is used by one thread at a time; separate trainers may run
/// in parallel.
pub struct relora_trainer {
    /// Set while a call is running on this trainer.
    busy: AtomicBool,
    /// Set when a call panicked; everything but `_free` is refused from then on.
    poisoned: AtomicBool,
    /// Only touched by the call that holds `busy`.
    state: UnsafeCell<Session>,
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
    body: impl FnOnce(&mut Session) -> FfiResult<T>,
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
pub(crate) fn hand_out(state: Session, out: *mut *mut relora_trainer) {
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
