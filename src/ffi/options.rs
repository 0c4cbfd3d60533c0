//! The options table behind `relora_params` (and any other face of the library that takes
//! options by key): every key with its type, the options a trainer is built from, and how each
//! key is set from text, typed values or a JSON file and read back.
//!
//! Keys are the field names of [`TrainConfig`] (training), of Hugging Face's `config.json`
//! ([`ModelConfig`]), plus `preset`, `model_config`, `device` and `tokenizer`.

use super::guard::{Failure, FfiResult};
use super::status::relora_status;
use crate::config::{ModelConfig, TrainConfig};
use crate::data::Tokenizer;
use crate::optim::reset::ResetMode;
use std::path::Path;

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
pub struct Options {
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
                    crate::error::Error::Io { .. } => Failure::from(e),
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
