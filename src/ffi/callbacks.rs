//! Host callbacks, each with the host's `user_data`: a per-trainer logger, a progress callback
//! that can abort, and the gradient reducer of the split step.
//!
//! Callbacks run on the thread that made the call, inside it. They must not call into the same
//! trainer (that call fails with `RELORA_STATUS_BUSY`), must return normally (no longjmp, no C++
//! exception), and may use other trainers.

use super::guard::{Failure, FfiResult};
use super::status::relora_status;
use crate::error::{Error, Result};
use crate::trainer::GradientReducer;
use std::ffi::CString;
use std::os::raw::{c_char, c_void};

/// Severity of a log message.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum relora_log_level {
    /// A call on the trainer failed (the same text as the last error message).
    Error = 1,
    /// Something the host should know about: a skipped (non-finite) step.
    Warn = 2,
    /// Milestones: creation, switch to adapters, merges, checkpoints, exports.
    Info = 3,
    /// One line per optimizer step.
    Debug = 4,
}

/// What a progress report is counting.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum relora_progress_stage {
    /// Micro-batches of a `relora_trainer_step` (forward + backward done for `done` of `total`).
    MicroBatch = 1,
    /// Chunks of `batch_size` rows of a `relora_trainer_eval`.
    Eval = 2,
}

/// Receives the trainer's log messages. `message` is a NUL-terminated UTF-8 string valid only
/// during the call.
pub type relora_log_fn = Option<
    unsafe extern "C" fn(user_data: *mut c_void, level: relora_log_level, message: *const c_char),
>;

/// Reports progress inside a long call: `done` of `total` units of `stage` are finished. Return
/// true to continue, false to abort the call, which then returns `RELORA_STATUS_ABORTED` without
/// applying any update.
pub type relora_progress_fn = Option<
    unsafe extern "C" fn(
        user_data: *mut c_void,
        stage: relora_progress_stage,
        done: u64,
        total: u64,
    ) -> bool,
>;

/// Reduces one trainable parameter's gradient in place before the optimizer step, e.g. an
/// all-reduce (mean) across data-parallel ranks. `index` counts the trainable parameters from 0
/// in a fixed order (the same on every rank with the same configuration and step), `name` is the
/// parameter's name, `grad` holds `len` f32 values, row-major, which the callback may overwrite.
/// `name` and `grad` are valid only during the call. Return true on success; false abandons the
/// step (`RELORA_STATUS_CALLBACK_FAILED`, no update, the accumulated gradients discarded).
pub type relora_grad_reduce_fn = Option<
    unsafe extern "C" fn(
        user_data: *mut c_void,
        index: usize,
        name: *const c_char,
        grad: *mut f32,
        len: usize,
    ) -> bool,
>;

/// The callbacks installed on one trainer.
pub(crate) struct Callbacks {
    log: relora_log_fn,
    log_data: *mut c_void,
    log_max: relora_log_level,
    progress: relora_progress_fn,
    progress_data: *mut c_void,
}

impl Default for Callbacks {
    fn default() -> Self {
        Callbacks {
            log: None,
            log_data: std::ptr::null_mut(),
            log_max: relora_log_level::Info,
            progress: None,
            progress_data: std::ptr::null_mut(),
        }
    }
}

impl Callbacks {
    /// Installs (or, with `None`, removes) the logger, delivering `max` and more severe.
    pub(crate) fn set_log(&mut self, log: relora_log_fn, data: *mut c_void, max: relora_log_level) {
        self.log = log;
        self.log_data = data;
        self.log_max = max;
    }

    /// Installs (or, with `None`, removes) the progress callback.
    pub(crate) fn set_progress(&mut self, progress: relora_progress_fn, data: *mut c_void) {
        self.progress = progress;
        self.progress_data = data;
    }
}

/// A C string with any interior NUL replaced, so no message is ever dropped.
fn c_text(s: &str) -> CString {
    CString::new(s.replace('\0', "\u{FFFD}")).unwrap_or_default()
}

impl Callbacks {
    /// Sends a message to the host's logger if one is installed and `level` is wanted. The text
    /// is built only then.
    pub fn log(&self, level: relora_log_level, message: impl FnOnce() -> String) {
        if let Some(f) = self.log {
            if level <= self.log_max {
                let text = c_text(&message());
                // SAFETY: a host function installed with its own user_data; the string lives
                // for the duration of the call.
                unsafe { f(self.log_data, level, text.as_ptr()) };
            }
        }
    }

    /// Reports progress; `Err(Aborted)` when the host asks to stop.
    pub fn progress(&self, stage: relora_progress_stage, done: u64, total: u64) -> FfiResult<()> {
        if let Some(f) = self.progress {
            // SAFETY: a host function installed with its own user_data.
            if !unsafe { f(self.progress_data, stage, done, total) } {
                return Err(Failure::new(
                    relora_status::Aborted,
                    format!("aborted by the progress callback after {done} of {total}"),
                ));
            }
        }
        Ok(())
    }
}

/// Adapts the host's reduce callback to the trainer's [`GradientReducer`].
pub(crate) struct HostReducer {
    f: unsafe extern "C" fn(*mut c_void, usize, *const c_char, *mut f32, usize) -> bool,
    user_data: *mut c_void,
    index: usize,
    /// Set when the host returned false: the parameter it failed on.
    pub failed: Option<String>,
}

impl HostReducer {
    /// Wraps `f` (None when the host passed NULL).
    pub fn new(f: relora_grad_reduce_fn, user_data: *mut c_void) -> Option<Self> {
        f.map(|f| HostReducer {
            f,
            user_data,
            index: 0,
            failed: None,
        })
    }
}

impl GradientReducer for HostReducer {
    fn reduce(&mut self, name: &str, grad: &mut [f32]) -> Result<()> {
        let index = self.index;
        self.index += 1;
        let c_name = c_text(name);
        // SAFETY: a host function with its own user_data; the name and buffer live for the call.
        let ok = unsafe {
            (self.f)(
                self.user_data,
                index,
                c_name.as_ptr(),
                grad.as_mut_ptr(),
                grad.len(),
            )
        };
        if ok {
            Ok(())
        } else {
            self.failed = Some(format!("{name} (index {index})"));
            Err(Error::Config(format!(
                "the gradient reducer failed on {name}"
            )))
        }
    }
}
