//! `relora_params`: every option of a trainer behind an opaque handle, set by key. New options
//! become new keys, never a new struct layout. The keys and their parsing are the options table
//! ([`super::options`]).

use super::guard::{
    boundary, check_live, cstr, out_ptr, registry, write_text, Failure, FfiResult, HandleKind,
};
use super::status::relora_status;
use crate::fs::read::{read_limited_text, JSON_LIMIT};
use std::os::raw::c_char;

use super::options::{all_keys, Options};

/// Options for a trainer, set by key (see `relora_params_set` for the keys). Create with
/// `relora_params_new`, free with `relora_params_free`. Calls on params handles are serialised
/// internally, so a handle may be used from any thread.
pub struct relora_params {
    pub(crate) options: Options,
}

/// Runs `body` on the options of a live params handle, holding the handle registry's lock so the
/// handle cannot be freed meanwhile.
pub(crate) fn with_params<T>(
    params: *const relora_params,
    body: impl FnOnce(&mut Options) -> FfiResult<T>,
) -> FfiResult<T> {
    if params.is_null() {
        return Err(Failure::null("params"));
    }
    let live = registry();
    check_live(&live, params as usize, HandleKind::Params, "params")?;
    // SAFETY: the registry says this is a live params handle, and its lock serialises access.
    let p = unsafe { &mut *(params as *mut relora_params) };
    body(&mut p.options)
}

fn new_handle(options: Options, out: *mut *mut relora_params) -> FfiResult<()> {
    let out = out_ptr(out, "out")?;
    let raw = Box::into_raw(Box::new(relora_params { options }));
    registry().insert(raw as usize, HandleKind::Params);
    // SAFETY: `out` was checked by `out_ptr`.
    unsafe { out.write(raw) };
    Ok(())
}

/// Creates a params handle holding the defaults: the training defaults of the command-line
/// program (mode relora, 600 steps, ...), the "small" model preset (vocab_size 32000: set it to
/// your tokenizer's), device "cpu", no tokenizer.
///
/// On success `*out` receives a new handle that the caller owns and frees with
/// `relora_params_free`; on failure `*out` is not written.
///
/// Errors: `RELORA_STATUS_NULL_PARAMETER` when `out` is NULL.
#[no_mangle]
pub unsafe extern "C" fn relora_params_new(out: *mut *mut relora_params) -> relora_status {
    boundary("relora_params_new", || new_handle(Options::new()?, out))
}

/// Creates a copy of `params`. On success `*out` receives a new handle owned by the caller; on
/// failure `*out` is not written.
///
/// Errors: `RELORA_STATUS_NULL_PARAMETER`, `RELORA_STATUS_INVALID_HANDLE`.
#[no_mangle]
pub unsafe extern "C" fn relora_params_clone(
    params: *const relora_params,
    out: *mut *mut relora_params,
) -> relora_status {
    boundary("relora_params_clone", || {
        out_ptr(out, "out")?;
        let copy = with_params(params, |o| Ok(o.clone()))?;
        new_handle(copy, out)
    })
}

/// Frees a params handle. NULL is a no-op. A pointer that is not a live params handle (for
/// example one already freed) is left alone and recorded as an `RELORA_STATUS_INVALID_HANDLE`
/// message in `relora_last_error_message`. Trainers created from the handle do not depend on it.
#[no_mangle]
pub unsafe extern "C" fn relora_params_free(params: *mut relora_params) {
    if params.is_null() {
        return;
    }
    boundary("relora_params_free", || {
        let mut live = registry();
        check_live(&live, params as usize, HandleKind::Params, "params")?;
        live.remove(&(params as usize));
        // SAFETY: created by Box::into_raw in `new_handle` and just removed from the registry,
        // so nothing else can reach it.
        drop(unsafe { Box::from_raw(params) });
        Ok(())
    });
}

/// Sets option `key` from its text form. Keys (types in parentheses):
///
/// - training: `mode` (full|lora|relora), `steps` (int), `batch_size` (int), `seq_len` (int),
///   `grad_accum` (int), `lr` (real), `min_lr_ratio` (real), `warmup_steps` (int),
///   `weight_decay` (real), `beta1` (real), `beta2` (real), `eps` (real), `grad_clip` (real),
///   `warmup_full_steps` (int), `reset_every` (int), `restart_warmup_steps` (int), `lora_rank`
///   (int), `lora_alpha` (real), `lora_dropout` (real), `target_modules` (comma-separated
///   q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj), `reset_mode` (zero, random:P or
///   magnitude:P), `seed` (int), `max_nonfinite_steps` (int), `dtype` (f32|f64),
///   `compute_dtype` (empty, or bf16 with f32 parameters); the engine choices `fused_kernels`,
///   `layer_nodes`, `effective_weights`, `widening_products`, `grouped_updates` (bool, all true
///   by default; how this trainer computes, never what: each trainer has its own); every field of the library's
///   training configuration is a key, including any added after this list was written
///   (`relora_params_key_count` / `relora_params_key_name` list them);
/// - model: `preset` (tiny, small, 60m, 130m, 250m, 350m, 1b: replaces every model key, so set
///   it first), `model_config` (path of a Hugging Face config.json: replaces every model key),
///   and the config.json names `vocab_size`, `hidden_size`, `intermediate_size`,
///   `num_hidden_layers`, `num_attention_heads`, `num_key_value_heads`,
///   `max_position_embeddings` (int), `rms_norm_eps`, `rope_theta`, `initializer_range` (real),
///   `tie_word_embeddings` (bool);
/// - run: `device` (cpu or cuda:N), `tokenizer` (bytes, gpt2 or a tokenizer.json path; recorded
///   in checkpoints and exports, and its vocabulary is checked against vocab_size).
///
/// Values are parsed here; ranges and consistency between keys are checked by
/// `relora_params_validate` and at trainer creation. On failure `params` is unchanged.
///
/// Errors: `RELORA_STATUS_NULL_PARAMETER`, `RELORA_STATUS_INVALID_HANDLE`,
/// `RELORA_STATUS_INVALID_ARGUMENT` (not UTF-8), `RELORA_STATUS_UNKNOWN_PARAM`,
/// `RELORA_STATUS_INVALID_PARAM` (unparsable value), `RELORA_STATUS_IO` (`model_config` file
/// unreadable).
#[no_mangle]
pub unsafe extern "C" fn relora_params_set(
    params: *mut relora_params,
    key: *const c_char,
    value: *const c_char,
) -> relora_status {
    boundary("relora_params_set", || {
        // SAFETY: NUL-terminated strings per the C contract.
        let (key, value) = unsafe { (cstr(key, "key")?, cstr(value, "value")?) };
        with_params(params, |o| o.set(key, value))
    })
}

/// Sets an integer key (or a real key from an integer), e.g. `steps`, `seed`, `lr`.
///
/// Errors: as `relora_params_set`; `RELORA_STATUS_INVALID_PARAM` also when the key is not an
/// integer or real key, or the value is negative for a count.
#[no_mangle]
pub unsafe extern "C" fn relora_params_set_int(
    params: *mut relora_params,
    key: *const c_char,
    value: i64,
) -> relora_status {
    boundary("relora_params_set_int", || {
        // SAFETY: NUL-terminated string per the C contract.
        let key = unsafe { cstr(key, "key")? };
        with_params(params, |o| o.set_int(key, value))
    })
}

/// Sets a real key, e.g. `lr`, `beta2`. The value must be finite.
///
/// Errors: as `relora_params_set`; `RELORA_STATUS_INVALID_PARAM` also when the key is not a real
/// key (integers go through `relora_params_set_int`) or the value is NaN or infinite.
#[no_mangle]
pub unsafe extern "C" fn relora_params_set_float(
    params: *mut relora_params,
    key: *const c_char,
    value: f64,
) -> relora_status {
    boundary("relora_params_set_float", || {
        // SAFETY: NUL-terminated string per the C contract.
        let key = unsafe { cstr(key, "key")? };
        with_params(params, |o| o.set_float(key, value))
    })
}

/// Sets a boolean key (`tie_word_embeddings`).
///
/// Errors: as `relora_params_set`; `RELORA_STATUS_INVALID_PARAM` when the key is not boolean.
#[no_mangle]
pub unsafe extern "C" fn relora_params_set_bool(
    params: *mut relora_params,
    key: *const c_char,
    value: bool,
) -> relora_status {
    boundary("relora_params_set_bool", || {
        // SAFETY: NUL-terminated string per the C contract.
        let key = unsafe { cstr(key, "key")? };
        with_params(params, |o| o.set_bool(key, value))
    })
}

/// Copies the text form of option `key` (as `relora_params_set` reads it back) into `buf`.
///
/// Text outputs follow one convention: with `buf` NULL and `len` 0, `*out_len` receives the
/// length the text needs (without its NUL) and the call succeeds; otherwise `buf` must hold
/// `len` bytes, at least that length + 1, and on success receives the NUL-terminated text with
/// its length in `*out_len`. On failure neither is written.
///
/// Errors: `RELORA_STATUS_NULL_PARAMETER`, `RELORA_STATUS_INVALID_HANDLE`,
/// `RELORA_STATUS_UNKNOWN_PARAM`, `RELORA_STATUS_BUFFER_TOO_SMALL`.
#[no_mangle]
pub unsafe extern "C" fn relora_params_get(
    params: *const relora_params,
    key: *const c_char,
    buf: *mut c_char,
    len: usize,
    out_len: *mut usize,
) -> relora_status {
    boundary("relora_params_get", || {
        // SAFETY: NUL-terminated string per the C contract.
        let key = unsafe { cstr(key, "key")? };
        let text = with_params(params, |o| o.get(key))?;
        // SAFETY: buffer contract documented above.
        unsafe { write_text(&text, buf, len, out_len) }
    })
}

/// Reads an integer key into `*out` (written only on success).
///
/// Errors: `RELORA_STATUS_NULL_PARAMETER`, `RELORA_STATUS_INVALID_HANDLE`,
/// `RELORA_STATUS_UNKNOWN_PARAM`, `RELORA_STATUS_INVALID_PARAM` (not an integer key).
#[no_mangle]
pub unsafe extern "C" fn relora_params_get_int(
    params: *const relora_params,
    key: *const c_char,
    out: *mut i64,
) -> relora_status {
    boundary("relora_params_get_int", || {
        // SAFETY: NUL-terminated string per the C contract.
        let key = unsafe { cstr(key, "key")? };
        let out = out_ptr(out, "out")?;
        let v = with_params(params, |o| o.get_int(key))?;
        // SAFETY: checked by `out_ptr`.
        unsafe { out.write(v) };
        Ok(())
    })
}

/// Reads an integer or real key as a real number into `*out` (written only on success).
///
/// Errors: `RELORA_STATUS_NULL_PARAMETER`, `RELORA_STATUS_INVALID_HANDLE`,
/// `RELORA_STATUS_UNKNOWN_PARAM`, `RELORA_STATUS_INVALID_PARAM` (a text or boolean key).
#[no_mangle]
pub unsafe extern "C" fn relora_params_get_float(
    params: *const relora_params,
    key: *const c_char,
    out: *mut f64,
) -> relora_status {
    boundary("relora_params_get_float", || {
        // SAFETY: NUL-terminated string per the C contract.
        let key = unsafe { cstr(key, "key")? };
        let out = out_ptr(out, "out")?;
        let v = with_params(params, |o| o.get_float(key))?;
        // SAFETY: checked by `out_ptr`.
        unsafe { out.write(v) };
        Ok(())
    })
}

/// Applies a configuration file: a JSON object whose members are parameter keys, e.g.
/// `{"preset": "tiny", "vocab_size": 258, "lr": 0.003, "target_modules": ["q_proj", "v_proj"]}`.
/// Strings, numbers, booleans and lists of strings are accepted; `null` members are skipped;
/// `preset` and `model_config` are applied before the other keys. A training configuration saved
/// by the command-line program (`--train-config`) is such a file.
///
/// All or nothing: on failure `params` is unchanged and the message names the file and key.
///
/// Errors: `RELORA_STATUS_NULL_PARAMETER` (checked before the file is touched),
/// `RELORA_STATUS_INVALID_HANDLE`, `RELORA_STATUS_IO` (unreadable, missing, over 256 MiB, or not
/// a regular file), `RELORA_STATUS_INVALID_CONFIG` (not a JSON object),
/// `RELORA_STATUS_UNKNOWN_PARAM`, `RELORA_STATUS_INVALID_PARAM`.
#[no_mangle]
pub unsafe extern "C" fn relora_params_load_file(
    params: *mut relora_params,
    path: *const c_char,
) -> relora_status {
    boundary("relora_params_load_file", || {
        // SAFETY: NUL-terminated string per the C contract.
        let path = unsafe { cstr(path, "path")? };
        // The handle is checked before the file system is touched, and the file is read outside
        // the handle registry's lock.
        with_params(params, |_| Ok(()))?;
        let text = read_limited_text(path.as_ref(), JSON_LIMIT)?;
        with_params(params, |o| o.load_json(&text, path))
    })
}

/// The number of parameter keys this library knows (every key `relora_params_set` accepts),
/// into `*out`; with `relora_params_key_name` a host can list them, e.g. to check its own
/// configuration files against this version of the library.
///
/// Errors: `RELORA_STATUS_NULL_PARAMETER`.
#[no_mangle]
pub unsafe extern "C" fn relora_params_key_count(out: *mut usize) -> relora_status {
    boundary("relora_params_key_count", || {
        let out = out_ptr(out, "out")?;
        // SAFETY: checked by `out_ptr`.
        unsafe { out.write(all_keys().len()) };
        Ok(())
    })
}

/// Copies the name of key `index` (0 .. count-1) with the text-output convention of
/// `relora_params_get`. Training keys come first, then the model keys, then `device` and
/// `tokenizer`.
///
/// Errors: `RELORA_STATUS_NULL_PARAMETER`, `RELORA_STATUS_INVALID_ARGUMENT` (index out of range),
/// `RELORA_STATUS_BUFFER_TOO_SMALL`.
#[no_mangle]
pub unsafe extern "C" fn relora_params_key_name(
    index: usize,
    buf: *mut c_char,
    len: usize,
    out_len: *mut usize,
) -> relora_status {
    boundary("relora_params_key_name", || {
        let keys = all_keys();
        let (name, _) = keys.get(index).ok_or_else(|| {
            Failure::invalid(format!(
                "index {index} is out of range (count {})",
                keys.len()
            ))
        })?;
        // SAFETY: buffer contract as documented.
        unsafe { write_text(name, buf, len, out_len) }
    })
}

/// Checks the options as `relora_trainer_new` will, without building anything: every value in
/// range, the keys consistent with each other (`warmup_steps` < `steps`, `seq_len` <=
/// `max_position_embeddings`, ...), the tokenizer (if set) known and covered by `vocab_size`.
/// The device is checked when the trainer is created.
///
/// Errors: `RELORA_STATUS_NULL_PARAMETER`, `RELORA_STATUS_INVALID_HANDLE`,
/// `RELORA_STATUS_INVALID_CONFIG`, `RELORA_STATUS_TOKENIZER`.
#[no_mangle]
pub unsafe extern "C" fn relora_params_validate(params: *const relora_params) -> relora_status {
    boundary("relora_params_validate", || {
        let options = with_params(params, |o| Ok(o.clone()))?;
        options.validate()
    })
}
