//! Configuration text: the input is a model `config.json` / training-options JSON file (read
//! through every reader the project has for them), or lines of `key=value` fed to
//! `TrainConfig::set`, as `--set` and the C API's setter do, followed by `validate()`.
//!
//! Must hold: no panic, no hang; a config that validates has a computable parameter count; every
//! error has a message.

#![no_main]

use libfuzzer_sys::fuzz_target;
use relora::export::import::read_hf_config;
use relora::{ModelConfig, TrainConfig};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

fn path() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let d = tempfile::tempdir().expect("temp dir");
        let p = d.path().join("config.json");
        (d, p)
    })
    .1
}

fn check_err<T>(r: relora::Result<T>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            assert!(!e.to_string().is_empty(), "error without a message: {e:?}");
            None
        }
    }
}

fn model_ok(m: &ModelConfig) {
    check_err(m.validate()).expect("a config that was read validates");
    let _ = m.kv_heads();
    let _ = m.head_dim();
    let _ = m.num_parameters();
}

fuzz_target!(|data: &[u8]| {
    let path = path();
    std::fs::write(path, data).expect("write input");
    if let Some(m) = check_err(ModelConfig::from_file(path)) {
        model_ok(&m);
    }
    if let Some(m) = check_err(read_hf_config(path)) {
        model_ok(&m);
    }
    let mut train = match check_err(TrainConfig::from_file(path)) {
        Some(t) => {
            check_err(t.validate());
            let _ = t.lora_scale();
            let _ = serde_json::to_string(&t);
            t
        }
        None => TrainConfig::default(),
    };

    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for line in text.lines() {
        let (key, value) = line.split_once('=').unwrap_or((line, ""));
        check_err(train.set(key, value));
    }
    if check_err(train.validate()).is_some() {
        check_err(train.candle_dtype()).expect("validated dtype");
        check_err(train.candle_compute_dtype()).expect("validated compute dtype");
    }
    if let Ok(preset) = ModelConfig::preset(text.trim()) {
        model_ok(&preset);
    }
});
