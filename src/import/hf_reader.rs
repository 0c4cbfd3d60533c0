//! Reading a Hugging Face Llama directory: its `config.json` (refusing variants the model cannot
//! represent) and its weight files, one `model.safetensors` or the shards of
//! `model.safetensors.index.json`, opened and indexed by tensor name.

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::fs::read::{read_limited_text, JSON_LIMIT};
use crate::tensor_file::safetensors::SafetensorsFile;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// An error about a file of the Hugging Face directory (reported as a damaged input).
pub(crate) fn hf_err(path: &Path, message: impl Into<String>) -> Error {
    Error::checkpoint(path, message)
}

/// Reads a Hugging Face `config.json`, refusing Llama variants the trainer's model cannot
/// represent (the error names the field).
pub fn read_hf_config(path: &Path) -> Result<ModelConfig> {
    let text = read_limited_text(path, JSON_LIMIT)?;
    let v: Value =
        serde_json::from_str(&text).map_err(|e| hf_err(path, format!("not valid JSON: {e}")))?;
    let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
    if model_type != "llama" {
        return Err(hf_err(
            path,
            format!("model_type is '{model_type}', only 'llama' can be imported"),
        ));
    }
    let flag = |k: &str| v.get(k).and_then(Value::as_bool).unwrap_or(false);
    for k in ["attention_bias", "mlp_bias"] {
        if flag(k) {
            return Err(hf_err(
                path,
                format!("{k} is true; the model has no biases"),
            ));
        }
    }
    if let Some(act) = v.get("hidden_act").and_then(Value::as_str) {
        if act != "silu" {
            return Err(hf_err(
                path,
                format!("hidden_act is '{act}'; the model uses silu"),
            ));
        }
    }
    for k in ["rope_scaling", "rope_parameters"] {
        if let Some(kind) = v
            .get(k)
            .and_then(|r| r.get("rope_type").or_else(|| r.get("type")))
            .and_then(Value::as_str)
        {
            if kind != "default" {
                return Err(hf_err(
                    path,
                    format!("{k} has rope_type '{kind}'; only the default rotary embedding is supported"),
                ));
            }
        }
    }
    let mut obj = v.as_object().cloned().unwrap_or_default();
    // transformers 5 may keep the rotary base only inside rope_parameters.
    if matches!(obj.get("rope_theta"), None | Some(Value::Null)) {
        if let Some(t) = obj
            .get("rope_parameters")
            .and_then(|r| r.get("rope_theta"))
            .cloned()
        {
            obj.insert("rope_theta".into(), t);
        }
    }
    let cfg: ModelConfig = serde_json::from_value(Value::Object(obj))
        .map_err(|e| hf_err(path, format!("not a usable Llama config: {e}")))?;
    cfg.validate().map_err(|e| hf_err(path, e.to_string()))?;
    if let Some(hd) = v.get("head_dim").and_then(Value::as_u64) {
        if hd as usize != cfg.head_dim() {
            return Err(hf_err(
                path,
                format!(
                    "head_dim is {hd}, but the model requires hidden_size / num_attention_heads = {}",
                    cfg.head_dim()
                ),
            ));
        }
    }
    Ok(cfg)
}

/// The weight files of a Hugging Face directory, opened: `model.safetensors`, or the shards of
/// `model.safetensors.index.json`; and which file holds each tensor.
pub struct HfWeights {
    files: Vec<SafetensorsFile>,
    location: HashMap<String, usize>,
}

impl HfWeights {
    /// Opens the weights of `dir`, checking every file's header and that the index (if any)
    /// agrees with the shards.
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let mut files = Vec::new();
        let mut location = HashMap::new();
        if index.exists() {
            let text = read_limited_text(&index, JSON_LIMIT)?;
            let v: Value = serde_json::from_str(&text)
                .map_err(|e| hf_err(&index, format!("not valid JSON: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| hf_err(&index, "has no weight_map"))?;
            let mut shard_ids: BTreeMap<String, usize> = BTreeMap::new();
            for (name, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    hf_err(
                        &index,
                        format!("weight_map entry {name} is not a file name"),
                    )
                })?;
                if file.contains('/') || file.contains('\\') || file.starts_with('.') {
                    return Err(hf_err(
                        &index,
                        format!("shard name '{file}' is not a plain file name"),
                    ));
                }
                let id = match shard_ids.get(file) {
                    Some(&id) => id,
                    None => {
                        files.push(SafetensorsFile::open(&dir.join(file))?);
                        shard_ids.insert(file.to_string(), files.len() - 1);
                        files.len() - 1
                    }
                };
                if files[id].get(name).is_none() {
                    return Err(hf_err(
                        files[id].path(),
                        format!("tensor {name} is missing (the index places it in this shard)"),
                    ));
                }
                location.insert(name.clone(), id);
            }
            for f in &files {
                for n in f.names() {
                    if location
                        .get(&n)
                        .is_none_or(|&i| files[i].path() != f.path())
                    {
                        return Err(hf_err(
                            f.path(),
                            format!("tensor {n} is not listed in model.safetensors.index.json"),
                        ));
                    }
                }
            }
        } else if single.exists() {
            let f = SafetensorsFile::open(&single)?;
            for n in f.names() {
                location.insert(n, 0);
            }
            files.push(f);
        } else {
            let hint = if dir.join("pytorch_model.bin").exists() {
                " (pytorch_model.bin is not supported: re-save with safe_serialization=True)"
            } else {
                ""
            };
            return Err(hf_err(
                dir,
                format!("has neither model.safetensors nor model.safetensors.index.json{hint}"),
            ));
        }
        Ok(HfWeights { files, location })
    }

    /// The file holding `name`, if any.
    pub fn file_of(&self, name: &str) -> Option<&SafetensorsFile> {
        self.location.get(name).map(|&i| &self.files[i])
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.location.keys().cloned().collect();
        v.sort();
        v
    }
}
