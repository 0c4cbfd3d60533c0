//! `relora_params`: every option of a trainer behind an opaque handle, set by key. New options
//! become new keys, never a new struct layout.
//!
//! Keys are the field names of [`TrainConfig`] (training), of Hugging Face's `config.json`
//! ([`ModelConfig`]), plus `preset`, `model_config`, `device` and `tokenizer`.

use super::guard::{
    boundary, check_live, cstr, out_ptr, registry, write_text, Failure, FfiResult, HandleKind,
};
use super::status::relora_status;
use crate::config::{ModelConfig, TrainConfig};
use crate::data::Tokenizer;
use crate::fs::read::{read_limited_text, JSON_LIMIT};
use crate::optim::reset::ResetMode;
use std::os::raw::c_char;
use std::path::Path;

/// The type of a key's value, which decides the typed setters it accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A non-negative integer.
    Int,
    /// A real number.
    Float,
    /// true / false.
    Bool,
    /// Text (a name, a list, a path).
    Text,
}

/// The model and run keys, with their types. The training keys are the fields of
/// [`TrainConfig`] and are read from it (see [`train_keys`]), so a new training option is a new
/// key without any change here.
pub(crate) const MODEL_AND_RUN_KEYS: &[(&str, Kind)] = &[
    // The model (ModelConfig, Hugging Face names).
    ("preset", Kind::Text),
    ("model_config", Kind::Text),
    ("vocab_size", Kind::Int),
    ("hidden_size", Kind::Int),
    ("intermediate_size", Kind::Int),
    ("num_hidden_layers", Kind::Int),
    ("num_attention_heads", Kind::Int),
    ("num_key_value_heads", Kind::Int),
    ("max_position_embeddings", Kind::Int),
    ("rms_norm_eps", Kind::Float),
    ("rope_theta", Kind::Float),
    ("tie_word_embeddings", Kind::Bool),
    ("initializer_range", Kind::Float),
    // Where and with what the trainer runs.
    ("device", Kind::Text),
    ("tokenizer", Kind::Text),
];

/// A training configuration as a JSON object keyed by field name.
fn train_json(t: &TrainConfig) -> serde_json::Map<String, serde_json::Value> {
    match serde_json::to_value(t) {
        Ok(serde_json::Value::Object(map)) => map,
        _ => serde_json::Map::new(),
    }
}

/// The training keys (the fields of [`TrainConfig`]) with their types, read from the defaults.
pub(crate) fn train_keys() -> Vec<(String, Kind)> {
    train_json(&TrainConfig::default())
        .into_iter()
        .map(|(k, v)| {
            let kind = match &v {
                serde_json::Value::Number(n) if n.is_f64() => Kind::Float,
                serde_json::Value::Number(_) => Kind::Int,
                serde_json::Value::Bool(_) => Kind::Bool,
                _ => Kind::Text,
            };
            (k, kind)
        })
        .collect()
}

/// Every key: training keys first, then model and run keys.
pub(crate) fn all_keys() -> Vec<(String, Kind)> {
    let mut keys = train_keys();
    keys.extend(
        MODEL_AND_RUN_KEYS
            .iter()
            .map(|(k, kind)| (k.to_string(), *kind)),
    );
    keys
}

/// The model preset a new params handle starts from (the command-line program's default).
pub(crate) const DEFAULT_PRESET: &str = "small";

/// The type of `key`, if it is a key.
pub(crate) fn kind_of(key: &str) -> Option<Kind> {
    MODEL_AND_RUN_KEYS
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, kind)| *kind)
        .or_else(|| {
            train_keys()
                .into_iter()
                .find(|(k, _)| k == key)
                .map(|(_, kind)| kind)
        })
}

fn unknown(key: &str) -> Failure {
    Failure::new(
        relora_status::UnknownParam,
        format!("unknown parameter '{key}'"),
    )
}

fn bad_value(key: &str, value: &str, why: impl std::fmt::Display) -> Failure {
    Failure::new(
        relora_status::InvalidParam,
        format!("{key} = '{value}': {why}"),
    )
}

/// Everything a trainer is built from.
#[derive(Clone, Debug)]
pub(crate) struct Options {
    /// Training options.
    pub train: TrainConfig,
    /// The model's shape.
    pub model: ModelConfig,
    /// The preset the model keys were last reset to ("" when from a file or a checkpoint).
    pub preset: String,
    /// The `config.json` the model keys were last read from ("" when none).
    pub model_config: String,
    /// "cpu" or "cuda:N".
    pub device: String,
    /// Tokenizer spec recorded in checkpoints and exports ("" when the host tokenizes itself).
    pub tokenizer: String,
}

impl Options {
    /// The defaults: [`TrainConfig::default`], the [`DEFAULT_PRESET`] model, CPU, no tokenizer.
    pub fn new() -> FfiResult<Self> {
        Ok(Options {
            train: TrainConfig::default(),
            model: ModelConfig::preset(DEFAULT_PRESET)?,
            preset: DEFAULT_PRESET.to_string(),
            model_config: String::new(),
            device: "cpu".to_string(),
            tokenizer: String::new(),
        })
    }

    /// Sets `key` from text. Fails with `UnknownParam` or `InvalidParam`; `self` is unchanged
    /// on failure.
    pub fn set(&mut self, key: &str, value: &str) -> FfiResult<()> {
        kind_of(key).ok_or_else(|| unknown(key))?;
        let v = value.trim();
        fn num<T: std::str::FromStr>(key: &str, v: &str) -> FfiResult<T> {
            v.parse()
                .map_err(|_| bad_value(key, v, "not a number of the right kind"))
        }
        fn real(key: &str, v: &str) -> FfiResult<f64> {
            let x: f64 = num(key, v)?;
            if x.is_finite() {
                Ok(x)
            } else {
                Err(bad_value(key, v, "not a finite number"))
            }
        }
        match key {
            "preset" => {
                self.model = ModelConfig::preset(v).map_err(|e| bad_value(key, v, e))?;
                self.preset = v.to_ascii_lowercase();
                self.model_config.clear();
            }
            "model_config" => {
                self.model = ModelConfig::from_file(Path::new(v)).map_err(|e| match e {
                    crate::Error::Io { .. } => Failure::from(e),
                    other => bad_value(key, v, other),
                })?;
                self.model_config = v.to_string();
                self.preset.clear();
            }
            "vocab_size" => self.model.vocab_size = num(key, v)?,
            "hidden_size" => self.model.hidden_size = num(key, v)?,
            "intermediate_size" => self.model.intermediate_size = num(key, v)?,
            "num_hidden_layers" => self.model.num_hidden_layers = num(key, v)?,
            "num_attention_heads" => self.model.num_attention_heads = num(key, v)?,
            "num_key_value_heads" => self.model.num_key_value_heads = Some(num(key, v)?),
            "max_position_embeddings" => self.model.max_position_embeddings = num(key, v)?,
            "rms_norm_eps" => self.model.rms_norm_eps = real(key, v)?,
            "rope_theta" => self.model.rope_theta = real(key, v)?,
            "tie_word_embeddings" => self.model.tie_word_embeddings = parse_bool(key, v)?,
            "initializer_range" => self.model.initializer_range = real(key, v)?,
            "device" => {
                let d = v.to_ascii_lowercase();
                let ok = d == "cpu"
                    || d == "cuda"
                    || d.strip_prefix("cuda:")
                        .is_some_and(|n| n.parse::<usize>().is_ok());
                if !ok {
                    return Err(bad_value(key, v, "expected cpu or cuda:N"));
                }
                self.device = d;
            }
            "tokenizer" => self.tokenizer = v.to_string(),
            _ => {
                // A training option: parse into a copy so a failure leaves `self` unchanged.
                let mut t = self.train.clone();
                t.set(key, value).map_err(|e| bad_value(key, v, e))?;
                self.train = t;
            }
        }
        Ok(())
    }

    /// Sets an integer-typed or real-typed key from an integer.
    pub fn set_int(&mut self, key: &str, value: i64) -> FfiResult<()> {
        match kind_of(key).ok_or_else(|| unknown(key))? {
            Kind::Int | Kind::Float => self.set(key, &value.to_string()),
            k => Err(wrong_type(key, k, "an integer")),
        }
    }

    /// Sets a real-typed key.
    pub fn set_float(&mut self, key: &str, value: f64) -> FfiResult<()> {
        match kind_of(key).ok_or_else(|| unknown(key))? {
            Kind::Float if value.is_finite() => self.set(key, &value.to_string()),
            Kind::Float => Err(bad_value(key, &value.to_string(), "must be finite")),
            k => Err(wrong_type(key, k, "a real number")),
        }
    }

    /// Sets a boolean key.
    pub fn set_bool(&mut self, key: &str, value: bool) -> FfiResult<()> {
        match kind_of(key).ok_or_else(|| unknown(key))? {
            Kind::Bool => self.set(key, if value { "true" } else { "false" }),
            k => Err(wrong_type(key, k, "a boolean")),
        }
    }

    /// The value of `key` as text, in the form [`Options::set`] reads back.
    pub fn get(&self, key: &str) -> FfiResult<String> {
        let m = &self.model;
        Ok(match key {
            "preset" => self.preset.clone(),
            "model_config" => self.model_config.clone(),
            "vocab_size" => m.vocab_size.to_string(),
            "hidden_size" => m.hidden_size.to_string(),
            "intermediate_size" => m.intermediate_size.to_string(),
            "num_hidden_layers" => m.num_hidden_layers.to_string(),
            "num_attention_heads" => m.num_attention_heads.to_string(),
            "num_key_value_heads" => m.kv_heads().to_string(),
            "max_position_embeddings" => m.max_position_embeddings.to_string(),
            "rms_norm_eps" => m.rms_norm_eps.to_string(),
            "rope_theta" => m.rope_theta.to_string(),
            "tie_word_embeddings" => m.tie_word_embeddings.to_string(),
            "initializer_range" => m.initializer_range.to_string(),
            "device" => self.device.clone(),
            "tokenizer" => self.tokenizer.clone(),
            "reset_mode" => self.train.reset_mode.to_string(),
            "mode" => self.train.mode.to_string(),
            _ => {
                let map = train_json(&self.train);
                let v = map.get(key).ok_or_else(|| unknown(key))?;
                json_text(key, v)?
            }
        })
    }

    /// The value of an integer-typed key.
    pub fn get_int(&self, key: &str) -> FfiResult<i64> {
        match kind_of(key).ok_or_else(|| unknown(key))? {
            Kind::Int => {
                let text = self.get(key)?;
                text.parse().map_err(|_| {
                    Failure::invalid(format!("{key} = {text} does not fit in an int64_t"))
                })
            }
            k => Err(wrong_type(key, k, "an integer")),
        }
    }

    /// The value of an integer- or real-typed key as a real number.
    pub fn get_float(&self, key: &str) -> FfiResult<f64> {
        match kind_of(key).ok_or_else(|| unknown(key))? {
            Kind::Int | Kind::Float => {
                let text = self.get(key)?;
                text.parse()
                    .map_err(|_| Failure::invalid(format!("{key} = {text} is not a number")))
            }
            k => Err(wrong_type(key, k, "a real number")),
        }
    }

    /// Applies a JSON object of keys and values (see `relora_params_load_file`). All or nothing.
    pub fn load_json(&mut self, text: &str, origin: &str) -> FfiResult<()> {
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| Failure::new(relora_status::InvalidConfig, format!("{origin}: {e}")))?;
        let serde_json::Value::Object(map) = value else {
            return Err(Failure::new(
                relora_status::InvalidConfig,
                format!("{origin}: expected a JSON object of parameter keys"),
            ));
        };
        let mut next = self.clone();
        // The model source first, so the model keys in the same file refine it.
        let mut keys: Vec<&String> = map.keys().collect();
        keys.sort_by_key(|k| match k.as_str() {
            "preset" => 0,
            "model_config" => 1,
            _ => 2,
        });
        for key in keys {
            let v = &map[key];
            if v.is_null() {
                continue;
            }
            let text = json_text(key, v).map_err(|f| in_file(f, origin))?;
            next.set(key, &text).map_err(|f| in_file(f, origin))?;
        }
        *self = next;
        Ok(())
    }

    /// Checks the options as trainer creation will: each config, their consistency, the
    /// tokenizer's vocabulary against `vocab_size`.
    pub fn validate(&self) -> FfiResult<()> {
        self.train.validate_for(&self.model)?;
        if !self.tokenizer.is_empty() {
            let tok = Tokenizer::from_spec(&self.tokenizer)?;
            if tok.vocab_size() > self.model.vocab_size {
                return Err(Failure::new(
                    relora_status::InvalidConfig,
                    format!(
                        "vocab_size {} is smaller than the tokenizer's {} ({})",
                        self.model.vocab_size,
                        tok.vocab_size(),
                        self.tokenizer
                    ),
                ));
            }
        }
        Ok(())
    }
}

fn in_file(mut f: Failure, origin: &str) -> Failure {
    f.message = format!("{origin}: {}", f.message);
    f
}

fn wrong_type(key: &str, kind: Kind, given: &str) -> Failure {
    let expected = match kind {
        Kind::Int => "an integer (relora_params_set_int)",
        Kind::Float => "a real number (relora_params_set_float)",
        Kind::Bool => "a boolean (relora_params_set_bool)",
        Kind::Text => "text (relora_params_set)",
    };
    Failure::new(
        relora_status::InvalidParam,
        format!("'{key}' takes {expected}, not {given}"),
    )
}

fn parse_bool(key: &str, v: &str) -> FfiResult<bool> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(bad_value(key, v, "expected true or false")),
    }
}

/// The text form of a JSON value for key `key`.
fn json_text(key: &str, v: &serde_json::Value) -> FfiResult<String> {
    use serde_json::Value;
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        Value::Array(items) => items
            .iter()
            .map(|i| match i {
                Value::String(s) => Ok(s.clone()),
                other => Err(bad_value(
                    key,
                    &other.to_string(),
                    "expected a list of strings",
                )),
            })
            .collect::<FfiResult<Vec<_>>>()
            .map(|v| v.join(",")),
        // A reset mode as serialised by the training configuration.
        Value::Object(_) if key == "reset_mode" => serde_json::from_value::<ResetMode>(v.clone())
            .map(|m| m.to_string())
            .map_err(|e| bad_value(key, &v.to_string(), e)),
        other => Err(bad_value(key, &other.to_string(), "unsupported JSON value")),
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_round_trips_through_get_and_set() {
        let mut o = Options::new().unwrap();
        let keys = all_keys();
        assert!(keys
            .iter()
            .any(|(k, kind)| k == "lr" && *kind == Kind::Float));
        assert!(keys
            .iter()
            .any(|(k, kind)| k == "steps" && *kind == Kind::Int));
        assert!(keys
            .iter()
            .any(|(k, kind)| k == "target_modules" && *kind == Kind::Text));
        for (key, _) in &keys {
            if key == "model_config" || key == "preset" {
                continue;
            }
            let text = o.get(key).unwrap();
            let before = format!("{:?}", (&o.train, &o.model));
            o.set(key, &text)
                .unwrap_or_else(|f| panic!("{key}: {}", f.message));
            assert_eq!(before, format!("{:?}", (&o.train, &o.model)), "{key}");
        }
    }

    #[test]
    fn typed_setters_check_the_key_type() {
        let mut o = Options::new().unwrap();
        o.set_int("steps", 50).unwrap();
        o.set_int("lr", 1).unwrap();
        o.set_float("lr", 3e-4).unwrap();
        assert_eq!(o.train.lr, 3e-4);
        o.set_bool("tie_word_embeddings", true).unwrap();
        assert!(o.model.tie_word_embeddings);
        let e = o.set_float("steps", 1.5).unwrap_err();
        assert_eq!(e.status, relora_status::InvalidParam);
        let e = o.set_int("mode", 1).unwrap_err();
        assert_eq!(e.status, relora_status::InvalidParam);
        let e = o.set_float("lr", f64::NAN).unwrap_err();
        assert_eq!(e.status, relora_status::InvalidParam);
        let e = o.set_int("steps", -1).unwrap_err();
        assert_eq!(e.status, relora_status::InvalidParam);
        let e = o.set("nope", "1").unwrap_err();
        assert_eq!(e.status, relora_status::UnknownParam);
        assert_eq!(o.get_int("steps").unwrap(), 50);
        assert_eq!(o.get_float("lr").unwrap(), 3e-4);
    }

    #[test]
    fn preset_resets_the_model_and_json_applies_it_first() {
        let mut o = Options::new().unwrap();
        o.load_json(
            r#"{"vocab_size": 258, "preset": "tiny", "lr": 0.01,
                "target_modules": ["q_proj", "v_proj"], "reset_mode": "random:0.5",
                "num_key_value_heads": null}"#,
            "test.json",
        )
        .unwrap();
        assert_eq!(o.model.hidden_size, 64);
        assert_eq!(o.model.vocab_size, 258);
        assert_eq!(o.train.target_modules, ["q_proj", "v_proj"]);
        assert_eq!(o.get("preset").unwrap(), "tiny");
        let before = format!("{o:?}");
        let e = o
            .load_json(r#"{"lr": 0.5, "bogus": 1}"#, "bad.json")
            .unwrap_err();
        assert_eq!(e.status, relora_status::UnknownParam);
        assert!(e.message.contains("bad.json"), "{}", e.message);
        assert_eq!(before, format!("{o:?}"), "a failed load changes nothing");
    }

    #[test]
    fn a_saved_train_config_loads() {
        let json = serde_json::to_string(&TrainConfig::default()).unwrap();
        let mut o = Options::new().unwrap();
        o.set("lr", "0.5").unwrap();
        o.load_json(&json, "train.json").unwrap();
        assert_eq!(o.train, TrainConfig::default());
    }

    #[test]
    fn validate_checks_consistency_and_tokenizer_vocab() {
        let mut o = Options::new().unwrap();
        o.validate().unwrap();
        o.set("warmup_steps", "1000").unwrap();
        assert_eq!(
            o.validate().unwrap_err().status,
            relora_status::InvalidConfig
        );
        let mut o = Options::new().unwrap();
        o.set("tokenizer", "bytes").unwrap();
        o.set("vocab_size", "100").unwrap();
        let e = o.validate().unwrap_err();
        assert!(e.message.contains("258"), "{}", e.message);
    }
}
