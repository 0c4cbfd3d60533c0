//! Named parameters copied out of and into a trainer as f32, for hosts that inspect weights or
//! initialise them from their own source.
//!
//! The names are Hugging Face's (`model.embed_tokens.weight`,
//! `model.layers.0.self_attn.q_proj.weight`, ...), followed, while adapters are attached, by each
//! adapted projection's `{module}.lora_A` (`[rank, in]`) and `{module}.lora_B` (`[out, rank]`).

use super::guard::{boundary, cstr, out_ptr, slice, slice_mut, write_text, Failure};
use super::handle::{enter, relora_trainer};
use super::status::relora_status;
use std::os::raw::c_char;

/// The number of named parameters right now (it grows when adapters are attached), into `*out`.
///
/// Errors: `RELORA_STATUS_NULL_PARAMETER`, `RELORA_STATUS_INVALID_HANDLE`, `RELORA_STATUS_BUSY`,
/// `RELORA_STATUS_POISONED`.
#[no_mangle]
pub unsafe extern "C" fn relora_trainer_tensor_count(
    trainer: *const relora_trainer,
    out: *mut usize,
) -> relora_status {
    let func = "relora_trainer_tensor_count";
    boundary(func, || {
        let out = out_ptr(out, "out")?;
        let n = enter(func, trainer, |s| Ok(s.tensor_names().len()))?;
        // SAFETY: checked by `out_ptr`.
        unsafe { out.write(n) };
        Ok(())
    })
}

/// Copies the name of parameter `index` (0 .. count-1) with the text-output convention of
/// `relora_params_get`.
///
/// Errors: `RELORA_STATUS_NULL_PARAMETER`, `RELORA_STATUS_INVALID_HANDLE`,
/// `RELORA_STATUS_INVALID_ARGUMENT` (index out of range), `RELORA_STATUS_BUFFER_TOO_SMALL`,
/// `RELORA_STATUS_BUSY`, `RELORA_STATUS_POISONED`.
#[no_mangle]
pub unsafe extern "C" fn relora_trainer_tensor_name(
    trainer: *const relora_trainer,
    index: usize,
    buf: *mut c_char,
    len: usize,
    out_len: *mut usize,
) -> relora_status {
    let func = "relora_trainer_tensor_name";
    boundary(func, || {
        let name = enter(func, trainer, |s| {
            let all = s.tensor_names();
            let n = all.len();
            all.into_iter().nth(index).ok_or_else(|| {
                Failure::invalid(format!("index {index} is out of range (count {n})"))
            })
        })?;
        // SAFETY: buffer contract as documented.
        unsafe { write_text(&name, buf, len, out_len) }
    })
}

/// The shape of parameter `name`: `*ndims` receives its rank and `dims[0 .. rank]` its
/// dimensions. With `dims` NULL and `max_dims` 0 only `*ndims` is written (a rank query);
/// otherwise `max_dims` must be at least the rank. Outputs are written only on success.
///
/// Errors: `RELORA_STATUS_NULL_PARAMETER`, `RELORA_STATUS_INVALID_HANDLE`,
/// `RELORA_STATUS_UNKNOWN_TENSOR`, `RELORA_STATUS_BUFFER_TOO_SMALL`, `RELORA_STATUS_BUSY`,
/// `RELORA_STATUS_POISONED`.
#[no_mangle]
pub unsafe extern "C" fn relora_trainer_tensor_shape(
    trainer: *const relora_trainer,
    name: *const c_char,
    dims: *mut usize,
    max_dims: usize,
    ndims: *mut usize,
) -> relora_status {
    let func = "relora_trainer_tensor_shape";
    boundary(func, || {
        // SAFETY: NUL-terminated string per the C contract.
        let name = unsafe { cstr(name, "name")? };
        let ndims = out_ptr(ndims, "ndims")?;
        let shape = enter(func, trainer, |s| s.tensor_shape(name))?;
        if dims.is_null() {
            if max_dims != 0 {
                return Err(Failure::null("dims"));
            }
        } else {
            out_ptr(dims, "dims")?;
            if max_dims < shape.len() {
                return Err(Failure::new(
                    relora_status::BufferTooSmall,
                    format!(
                        "{name} has {} dimensions, max_dims is {max_dims}",
                        shape.len()
                    ),
                ));
            }
            // SAFETY: `dims` holds max_dims >= shape.len() writable values per the contract.
            unsafe { std::ptr::copy_nonoverlapping(shape.as_ptr(), dims, shape.len()) };
        }
        // SAFETY: checked by `out_ptr`.
        unsafe { ndims.write(shape.len()) };
        Ok(())
    })
}

/// The number of elements of parameter `name`, into `*out` (written only on success).
///
/// Errors: `RELORA_STATUS_NULL_PARAMETER`, `RELORA_STATUS_INVALID_HANDLE`,
/// `RELORA_STATUS_UNKNOWN_TENSOR`, `RELORA_STATUS_BUSY`, `RELORA_STATUS_POISONED`.
#[no_mangle]
pub unsafe extern "C" fn relora_trainer_tensor_numel(
    trainer: *const relora_trainer,
    name: *const c_char,
    out: *mut usize,
) -> relora_status {
    let func = "relora_trainer_tensor_numel";
    boundary(func, || {
        // SAFETY: NUL-terminated string per the C contract.
        let name = unsafe { cstr(name, "name")? };
        let out = out_ptr(out, "out")?;
        let n = enter(func, trainer, |s| {
            Ok(s.tensor_shape(name)?.iter().product::<usize>())
        })?;
        // SAFETY: checked by `out_ptr`.
        unsafe { out.write(n) };
        Ok(())
    })
}

/// Copies parameter `name` out as f32, row-major, into `out`, which must hold exactly its
/// number of elements (`len` = `relora_trainer_tensor_numel`). Projection weights are as stored:
/// without any unmerged adapter (`relora_trainer_export` merges).
///
/// Errors: `RELORA_STATUS_NULL_PARAMETER`, `RELORA_STATUS_INVALID_HANDLE`,
/// `RELORA_STATUS_UNKNOWN_TENSOR`, `RELORA_STATUS_INVALID_ARGUMENT` (len differs from the element
/// count), `RELORA_STATUS_BUSY`, `RELORA_STATUS_POISONED`.
#[no_mangle]
pub unsafe extern "C" fn relora_trainer_tensor_get(
    trainer: *const relora_trainer,
    name: *const c_char,
    out: *mut f32,
    len: usize,
) -> relora_status {
    let func = "relora_trainer_tensor_get";
    boundary(func, || {
        // SAFETY: NUL-terminated string per the C contract.
        let name = unsafe { cstr(name, "name")? };
        // SAFETY: `out` holds `len` writable floats per the contract.
        let out = unsafe { slice_mut(out, len, "out")? };
        enter(func, trainer, |s| s.tensor_get(name, out))?;
        Ok(())
    })
}

/// Overwrites parameter `name` with `len` f32 values, row-major (`len` must equal its element
/// count; values must be finite), converting to the trainer's dtype. The optimizer state of the
/// parameter is kept. Refused for a projection weight while an adapter is attached to it (it is
/// frozen and its history is what checkpoints and merges are computed from) and during a split
/// step.
///
/// Errors: `RELORA_STATUS_NULL_PARAMETER`, `RELORA_STATUS_INVALID_HANDLE`,
/// `RELORA_STATUS_UNKNOWN_TENSOR`, `RELORA_STATUS_INVALID_ARGUMENT` (length mismatch, non-finite
/// values), `RELORA_STATUS_INVALID_STATE`, `RELORA_STATUS_BUSY`, `RELORA_STATUS_POISONED`.
#[no_mangle]
pub unsafe extern "C" fn relora_trainer_tensor_set(
    trainer: *mut relora_trainer,
    name: *const c_char,
    values: *const f32,
    len: usize,
) -> relora_status {
    let func = "relora_trainer_tensor_set";
    boundary(func, || {
        // SAFETY: NUL-terminated string per the C contract.
        let name = unsafe { cstr(name, "name")? };
        // SAFETY: `values` holds `len` floats per the contract.
        let src = unsafe { slice(values, len, "values")? };
        enter(func, trainer, |s| s.tensor_set(name, src))
    })
}
