//! A Hugging Face Llama directory as a checkpoint to continue pretraining from with ReLoRA.
//!
//! The directory's `config.json` must describe a plain Llama (no biases, SiLU, default rotary
//! embedding, `head_dim = hidden / heads`); its weights may be one `model.safetensors` or shards
//! listed in `model.safetensors.index.json`, in f32, bf16, f16 or f64. The checkpoint written is
//! the state of a run at step 0 that has not switched to adapters yet: every weight (converted to
//! the run's dtype, exactly) in `params.safetensors`, an empty optimizer, no phases, and the given
//! training options, so `relora train --resume CKPT` starts the ReLoRA schedule on the imported
//! model. Rotary `inv_freq` buffers are skipped, as is `lm_head.weight` of a tied model.

use super::hf_reader::{hf_err, read_hf_config, HfWeights};
use crate::checkpoint::manifest::{Manifest, FORMAT, FORMAT_VERSION};
use crate::checkpoint::recognise::CHECKPOINT;
use crate::config::{ModelConfig, TrainConfig};
use crate::data::tokenizer::Tokenizer;
use crate::error::{Error, Result};
use crate::export::hf::{write_file, Payload};
use crate::export::tokenizer::recognise;
use crate::fs::file_info::FileInfo;
use crate::fs::output::{check_target, Staged};
use crate::tensor_file::safetensors::PlannedTensor;
use crate::train_state::{TrainerCounters, TrainerRngs};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
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
