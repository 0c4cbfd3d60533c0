//! `relora_trainer`: create (from params or a checkpoint), free, save, merge, export, and read
//! the trainer's counters, statistics, host state and options. Training itself is in
//! [`super::train_step`], the handle in [`super::handle`].

use super::callbacks::{relora_log_fn, relora_log_level, relora_progress_fn};
use super::guard::{
    boundary, check_live, cstr, opt_cstr, out_ptr, registry, write_text, Failure, HandleKind,
};
use super::handle::{enter, hand_out, relora_trainer};
use super::params::{relora_params, with_params};
use super::session::Session;
use super::stats::{check_stats_out, relora_step_stats, write_stats};
use super::status::relora_status;
use std::os::raw::{c_char, c_void};

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
        hand_out(Session::create(options)?, out);
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
        hand_out(Session::load(dir, device)?, out);
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
        if unsafe { &*trainer }.is_busy() {
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
            s.save(dir, host)?;
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
            s.merge()?;
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
            s.export(out, dtype, max_shard_bytes, overwrite)?;
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
            let c = s.last_stats()?;
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
            let text = s.host_state();
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
    get: impl FnOnce(&Session) -> T,
) -> relora_status {
    boundary(func, || {
        let out = out_ptr(out, "out")?;
        let v = enter(func, trainer, |s| Ok(get(s)))?;
        // SAFETY: checked by `out_ptr`.
        unsafe { out.write(v) };
        Ok(())
    })
}

/// Installs (or, with `callback` NULL, removes) the trainer's logger. Messages of `max_level` and
/// more severe are delivered: pass a `relora_log_level` value (1 = errors only ... 4 = every
/// step). `user_data` is passed back untouched and must stay valid while the logger is installed.
/// Each trainer has its own logger; there is no global one.
///
/// Errors: `RELORA_STATUS_NULL_PARAMETER` (trainer), `RELORA_STATUS_INVALID_HANDLE`,
/// `RELORA_STATUS_INVALID_ARGUMENT` (`max_level` not 1..4), `RELORA_STATUS_BUSY`,
/// `RELORA_STATUS_POISONED`.
#[no_mangle]
pub unsafe extern "C" fn relora_trainer_set_log_callback(
    trainer: *mut relora_trainer,
    callback: relora_log_fn,
    user_data: *mut c_void,
    max_level: u32,
) -> relora_status {
    let func = "relora_trainer_set_log_callback";
    boundary(func, || {
        let level = match max_level {
            1 => relora_log_level::Error,
            2 => relora_log_level::Warn,
            3 => relora_log_level::Info,
            4 => relora_log_level::Debug,
            other => {
                return Err(Failure::invalid(format!(
                    "max_level {other} is not a relora_log_level (1..4)"
                )))
            }
        };
        enter(func, trainer, |s| {
            s.callbacks.set_log(callback, user_data, level);
            Ok(())
        })
    })
}

/// Installs (or, with `callback` NULL, removes) the trainer's progress callback, called after each
/// micro-batch of `relora_trainer_step` and each chunk of `relora_trainer_eval`; returning false
/// aborts that call with `RELORA_STATUS_ABORTED` and no update applied. `user_data` is
/// passed back untouched and must stay valid while the callback is installed.
///
/// Errors: `RELORA_STATUS_NULL_PARAMETER` (trainer), `RELORA_STATUS_INVALID_HANDLE`,
/// `RELORA_STATUS_BUSY`, `RELORA_STATUS_POISONED`.
#[no_mangle]
pub unsafe extern "C" fn relora_trainer_set_progress_callback(
    trainer: *mut relora_trainer,
    callback: relora_progress_fn,
    user_data: *mut c_void,
) -> relora_status {
    let func = "relora_trainer_set_progress_callback";
    boundary(func, || {
        enter(func, trainer, |s| {
            s.callbacks.set_progress(callback, user_data);
            Ok(())
        })
    })
}

#[cfg(test)]
mod tests {
    use super::super::callbacks::relora_progress_stage;
    use super::super::train_step::{relora_trainer_apply, relora_trainer_step};
    use super::*;
    use crate::ffi::guard::FfiResult;
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
    fn a_panic_poisons_the_trainer_until_it_is_freed() {
        let t = tiny_trainer();
        let st = boundary("test", || {
            enter("test", t, |_| -> FfiResult<()> { panic!("injected fault") })
        });
        assert_eq!(st, relora_status::Panic);
        let mut n = 0u64;
        let st = unsafe { relora_trainer_step_count(t, &mut n) };
        assert_eq!(st, relora_status::Poisoned);
        assert!(crate::ffi::last_error::last_error().contains("injected fault"));
        unsafe { relora_trainer_free(t) };
        assert_eq!(crate::ffi::last_error::last_error(), "");
        // The handle is gone: a second free is detected, not performed.
        unsafe { relora_trainer_free(t) };
        assert!(crate::ffi::last_error::last_error().contains("not a live relora_trainer"));
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
            let cb = relora_trainer_set_progress_callback;
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
