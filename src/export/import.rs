//! A Hugging Face Llama directory as a checkpoint to continue pretraining from with ReLoRA.
//!
//! The directory's `config.json` must describe a plain Llama (no biases, SiLU, default rotary
//! embedding, `head_dim = hidden / heads`); its weights may be one `model.safetensors` or shards
//! listed in `model.safetensors.index.json`, in f32, bf16, f16 or f64. The checkpoint written is
//! the state of a run at step 0 that has not switched to adapters yet: every weight (converted to
//! the run's dtype, exactly) in `params.safetensors`, an empty optimizer, no phases, and the given
//! training options, so `relora train --resume CKPT` starts the ReLoRA schedule on the imported
//! model. Rotary `inv_freq` buffers are skipped, as is `lm_head.weight` of a tied model.

use super::hf::{write_file, Payload};
use super::tokenizer::recognise;
use crate::checkpoint::files::FileInfo;
use crate::checkpoint::manifest::{Manifest, FORMAT, FORMAT_VERSION};
use crate::checkpoint::recognise::CHECKPOINT;
use crate::config::{ModelConfig, TrainConfig};
use crate::data::tokenizer::Tokenizer;
use crate::error::{Error, Result};
use crate::fs::output::{check_target, Staged};
use crate::fs::read::{read_limited_text, JSON_LIMIT};
use crate::tensor_file::safetensors::{PlannedTensor, SafetensorsFile};
use crate::trainer::{TrainerCounters, TrainerRngs};
use serde::Serialize;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::path::Path;

/// How an import is done.
#[derive(Clone, Debug)]
pub struct ImportOptions {
    /// Training options recorded in the checkpoint (a resumed run uses them as they are).
    pub train: TrainConfig,
    /// Tokenizer spec to record; `None` recognises the directory's `tokenizer.json` (this crate's
    /// byte or GPT-2 export become `bytes` / `gpt2`) or copies it into the checkpoint.
    pub tokenizer: Option<String>,
    /// Replace an existing checkpoint directory.
    pub force: bool,
}

impl Default for ImportOptions {
    /// The default training options, except that adapters are attached at once
    /// (`warmup_full_steps = 0`): an imported model is already warm.
    fn default() -> Self {
        ImportOptions {
            train: TrainConfig {
                warmup_full_steps: 0,
                ..TrainConfig::default()
            },
            tokenizer: None,
            force: false,
        }
    }
}

/// What an import found and wrote.
#[derive(Clone, Debug, Serialize)]
pub struct ImportReport {
    /// The model's shape, as read from `config.json`.
    pub config: ModelConfig,
    /// Number of tensors imported.
    pub tensors: usize,
    /// The dtypes found in the source files.
    pub source_dtypes: Vec<String>,
    /// Tensors present in the source but deliberately not imported, with the reason.
    pub skipped: Vec<String>,
    /// The tokenizer spec recorded in the checkpoint.
    pub tokenizer: Option<String>,
}

fn hf_err(path: &Path, message: impl Into<String>) -> Error {
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
                        .map_or(true, |&i| files[i].path() != f.path())
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

/// Size and CRC-32 of a file just written, read back in chunks.
fn file_info(path: &Path) -> Result<FileInfo> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 4 << 20];
    let mut bytes = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        bytes += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok(FileInfo {
        bytes,
        crc32: hasher.finalize(),
    })
}

/// Imports the Hugging Face Llama directory `hf_dir` as the checkpoint directory `ckpt` (see the
/// module documentation). Streams: one tensor is converted and written at a time.
pub fn import_hf(hf_dir: &Path, ckpt: &Path, opts: &ImportOptions) -> Result<ImportReport> {
    check_target(ckpt, &CHECKPOINT, opts.force)?;
    let cfg = read_hf_config(&hf_dir.join("config.json"))?;
    let train = &opts.train;
    train.validate_for(&cfg)?;
    let dtype = match train.dtype.as_str() {
        "f64" => crate::tensor_file::dtype::StDType::F64,
        _ => crate::tensor_file::dtype::StDType::F32,
    };
    let weights = HfWeights::open(hf_dir)?;
    let expected = cfg.tensor_shapes();
    let wanted: BTreeSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    let mut skipped = Vec::new();
    let mut source_dtypes = BTreeSet::new();
    for name in weights.names() {
        if wanted.contains(name.as_str()) {
            continue;
        }
        if name.ends_with("rotary_emb.inv_freq") {
            skipped.push(format!("{name} (rotary table, recomputed)"));
        } else if name == "lm_head.weight" && cfg.tie_word_embeddings {
            skipped.push(format!("{name} (tied to the embedding)"));
        } else {
            let f = weights.file_of(&name).map(|f| f.path().to_path_buf());
            return Err(hf_err(
                &f.unwrap_or_else(|| hf_dir.to_path_buf()),
                format!("unexpected tensor {name} (not a parameter of a Llama with this config)"),
            ));
        }
    }
    for (name, shape) in &expected {
        let f = weights
            .file_of(name)
            .ok_or_else(|| hf_err(hf_dir, format!("tensor {name} is missing from the weights")))?;
        let info = f.info(name)?;
        if &info.shape != shape {
            return Err(hf_err(
                f.path(),
                format!(
                    "tensor {name} has shape {:?}, the config implies {shape:?}",
                    info.shape
                ),
            ));
        }
        if !info.dtype.is_float() {
            return Err(hf_err(
                f.path(),
                format!(
                    "tensor {name} has dtype {}, expected a float type",
                    info.dtype
                ),
            ));
        }
        source_dtypes.insert(info.dtype.name().to_string());
    }

    let tok_src = hf_dir.join("tokenizer.json");
    let (tokenizer, copy_tokenizer) = match &opts.tokenizer {
        Some(spec) => (Some(spec.clone()), false),
        None if tok_src.exists() => match recognise(&tok_src) {
            Some(spec) => (Some(spec), false),
            None => {
                let final_path = std::path::absolute(ckpt)
                    .map_err(|e| Error::io(ckpt, e))?
                    .join("tokenizer.json");
                (Some(final_path.to_string_lossy().to_string()), true)
            }
        },
        None => (None, false),
    };
    let tok_check = if copy_tokenizer {
        Some(Tokenizer::from_hf_file(&tok_src)?)
    } else {
        tokenizer.as_deref().map(Tokenizer::from_spec).transpose()?
    };
    if let Some(t) = &tok_check {
        if t.vocab_size() > cfg.vocab_size {
            return Err(Error::Tokenizer(format!(
                "the tokenizer has {} ids but the model's vocab_size is {}",
                t.vocab_size(),
                cfg.vocab_size
            )));
        }
    }

    let staged = Staged::new(ckpt, &CHECKPOINT, opts.force)?;
    let dir = staged.path().to_path_buf();
    let plan: Vec<PlannedTensor> = expected
        .iter()
        .map(|(name, shape)| PlannedTensor {
            name: name.clone(),
            dtype,
            shape: shape.clone(),
        })
        .collect();
    let mut produce = |name: &str| -> Result<Payload<'_>> {
        let f = weights
            .file_of(name)
            .ok_or_else(|| hf_err(hf_dir, format!("tensor {name} is missing")))?;
        Ok(Payload::Stored(f, name.to_string()))
    };
    let params = dir.join("params.safetensors");
    write_file(&params, plan, &mut produce)?;
    let optimizer = dir.join("optimizer.safetensors");
    write_file(&optimizer, Vec::new(), &mut produce)?;
    let mut files = BTreeMap::new();
    files.insert("params.safetensors".to_string(), file_info(&params)?);
    files.insert("optimizer.safetensors".to_string(), file_info(&optimizer)?);
    if copy_tokenizer {
        // Listed like every other file, so the checkpoint is recognisably relora's whole.
        let dst = dir.join("tokenizer.json");
        let bytes = crate::fs::read::read_limited(&tok_src, crate::fs::read::JSON_LIMIT)?;
        files.insert(
            "tokenizer.json".to_string(),
            crate::checkpoint::files::write_synced(&dst, &bytes)?,
        );
    }
    let manifest = Manifest {
        format: FORMAT.to_string(),
        format_version: FORMAT_VERSION,
        writer: format!(
            "relora {} (import of {})",
            env!("CARGO_PKG_VERSION"),
            hf_dir.display()
        ),
        model: cfg.clone(),
        train: train.clone(),
        counters: TrainerCounters::default(),
        phase_index: 0,
        adapters_attached: false,
        rngs: TrainerRngs::new(train.seed),
        data: None,
        tokenizer: tokenizer.clone(),
        host_state: None,
        optimizer_steps: BTreeMap::new(),
        phases: Vec::new(),
        files,
    };
    manifest.write(&dir)?;
    staged.commit()?;
    Ok(ImportReport {
        config: cfg,
        tensors: expected.len(),
        source_dtypes: source_dtypes.into_iter().collect(),
        skipped,
        tokenizer,
    })
}
