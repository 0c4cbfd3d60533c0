//! Configuration text: the input is a model `config.json` / training-options JSON file (read
//! through every reader the project has for them), or lines of `key=value` fed to
//! `TrainConfig::set`, as `--set` and the C API's setter do, followed by `validate()`.
//!
//! Must hold: no panic, no hang; a config that validates has a computable parameter count; every
//! error has a message.

#![no_main]

use libfuzzer_sys::fuzz_target;
use relora::import::read_hf_config;
use relora::{ModelConfig, TrainConfig};
use relora_fuzz::{check_err, scratch_dir};

fn model_ok(m: &ModelConfig) {
    check_err(m.validate()).expect("a config that was read validates");
    let _ = m.kv_heads();
    let _ = m.head_dim();
    let _ = m.num_parameters();
}

fuzz_target!(|data: &[u8]| {
    let path = &scratch_dir().join("config.json");
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
