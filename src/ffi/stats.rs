//! `relora_step_stats`: what one optimizer step did, as a sized struct. The caller sets
//! `struct_size` to the size it was compiled with; the library writes only that many bytes, so
//! fields appended in later versions never overrun an older host's struct.

use super::guard::{Failure, FfiResult};
use crate::trainer::StepStats;

/// Statistics of one optimizer step.
///
/// Before passing one to the library, set `struct_size = sizeof(relora_step_stats)`; the library
/// fills the fields that fit in `struct_size` bytes and leaves `struct_size` as it was. Fields are
/// only ever appended (the ABI version stays), so a host compiled against an older header keeps
/// working. The layout has no padding on any platform.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct relora_step_stats {
    /// Set by the caller to `sizeof(relora_step_stats)`.
    pub struct_size: u32,
    /// Completed ReLoRA merges (phases) so far.
    pub phase: u32,
    /// Optimizer steps completed after this one (a skipped step does not count).
    pub step: u64,
    /// Steps skipped for a non-finite loss or gradient in the whole run.
    pub skipped_total: u64,
    /// Tokens (targets) processed by this step.
    pub tokens: u64,
    /// Mean next-token cross-entropy of the step's micro-batches, in nats.
    pub loss: f64,
    /// Learning rate used by this step.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Milliseconds in forward passes.
    pub forward_ms: f64,
    /// Milliseconds in backward passes.
    pub backward_ms: f64,
    /// Milliseconds in the gradient reduction, clipping and optimizer update.
    pub optimizer_ms: f64,
    /// Milliseconds in the merge and optimizer reset (or the switch to adapters) before the step.
    pub merge_reset_ms: f64,
    /// Whether the step was skipped (non-finite loss or gradient; nothing was updated).
    pub skipped: bool,
    /// Whether low-rank adapters are attached.
    pub adapters: bool,
    /// Whether a ReLoRA merge and optimizer reset happened right before this step.
    pub merged: bool,
    /// Whether the model switched from full rank to adapters right before this step.
    pub switched: bool,
    /// Consecutive non-finite steps right now (training stops with
    /// `RELORA_STATUS_NON_FINITE` at `max_nonfinite_steps`).
    pub nonfinite_streak: u32,
}

/// The size of the first layout; callers must provide at least this much.
pub const RELORA_STEP_STATS_MIN_SIZE: u32 = 96;

const _: () = assert!(std::mem::size_of::<relora_step_stats>() == 96);

impl relora_step_stats {
    /// Converts the trainer's statistics.
    pub(crate) fn from_stats(s: &StepStats, nonfinite_streak: u32) -> Self {
        relora_step_stats {
            struct_size: std::mem::size_of::<relora_step_stats>() as u32,
            phase: u32::try_from(s.phase).unwrap_or(u32::MAX),
            step: s.step,
            skipped_total: s.skipped_total,
            tokens: s.tokens as u64,
            loss: s.loss,
            lr: s.lr,
            grad_norm: s.grad_norm,
            forward_ms: s.timings.forward_ms,
            backward_ms: s.timings.backward_ms,
            optimizer_ms: s.timings.optimizer_ms,
            merge_reset_ms: s.timings.merge_reset_ms,
            skipped: s.skipped,
            adapters: s.adapters,
            merged: s.reset.is_some(),
            switched: s.switched,
            nonfinite_streak,
        }
    }
}

/// Checks a caller's stats struct before any work is done: aligned, and `struct_size` at least
/// the first layout's. NULL is allowed (the caller does not want statistics).
///
/// # Safety
/// `out` is NULL or valid for reads of its `struct_size` field.
pub(crate) unsafe fn check_stats_out(out: *mut relora_step_stats) -> FfiResult<()> {
    if out.is_null() {
        return Ok(());
    }
    if !(out as usize).is_multiple_of(std::mem::align_of::<relora_step_stats>()) {
        return Err(Failure::invalid("argument 'stats' is misaligned"));
    }
    // SAFETY: non-NULL and aligned; the caller provides at least the size field.
    let size = unsafe { std::ptr::addr_of!((*out).struct_size).read() };
    if size < RELORA_STEP_STATS_MIN_SIZE {
        return Err(Failure::invalid(format!(
            "stats->struct_size is {size}; set it to sizeof(relora_step_stats) (at least {})",
            RELORA_STEP_STATS_MIN_SIZE
        )));
    }
    Ok(())
}

/// Writes `stats` into the caller's struct, at most `struct_size` bytes, keeping `struct_size`.
///
/// # Safety
/// `out` passed [`check_stats_out`] and is valid for writes of its `struct_size` bytes.
pub(crate) unsafe fn write_stats(out: *mut relora_step_stats, stats: &relora_step_stats) {
    if out.is_null() {
        return;
    }
    // SAFETY: checked by `check_stats_out`; the struct has no padding, so its bytes are all
    // initialised and copying a prefix is sound.
    unsafe {
        let size = std::ptr::addr_of!((*out).struct_size).read() as usize;
        let n = size.min(std::mem::size_of::<relora_step_stats>());
        let mut value = *stats;
        value.struct_size = size as u32;
        std::ptr::copy_nonoverlapping(
            (&value as *const relora_step_stats).cast::<u8>(),
            out.cast::<u8>(),
            n,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_respect_struct_size() {
        let stats = relora_step_stats {
            step: 7,
            loss: 2.5,
            ..Default::default()
        };
        let mut big = [0u64; 16];
        let out = big.as_mut_ptr().cast::<relora_step_stats>();
        unsafe {
            (*out).struct_size = 128;
            check_stats_out(out).unwrap();
            big[15] = 0xdead;
            write_stats(out, &stats);
            assert_eq!((*out).step, 7);
            assert_eq!((*out).struct_size, 128);
            assert_eq!(
                big[15], 0xdead,
                "bytes past the library's struct are untouched"
            );
            (*out).struct_size = 8;
            assert!(check_stats_out(out).is_err());
        }
    }
}
