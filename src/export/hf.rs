//! Hugging Face Llama exports: a model directory (`model.safetensors` or shards plus
//! `model.safetensors.index.json`, `config.json`, `generation_config.json` and the tokenizer
//! files) or a single `.safetensors` file, written tensor by tensor under a temporary name and
//! renamed into place, from in-memory weights ([`write_model_dir`]) or streamed out of a
//! checkpoint ([`merge_checkpoint`]).
//!
//! What the consumers need (transformers, peft, candle-transformers, llama.cpp's converter) is
//! recorded in the project's design notes; in short: HF names in `[out, in]` layout, no `lora_*`
//! or `rotary_emb.inv_freq` tensors, `lm_head.weight` omitted when tied, `{"format": "pt"}`
//! metadata, `rope_theta` both at the top level and inside `rope_parameters`, and an explicit
//! `max_position_embeddings`.

use super::recognise::{export_metadata, MODEL_DIR, MODEL_FILE};
use super::tokenizer::{tokenizer_files, TokenizerFiles};
use crate::checkpoint::source::CheckpointSource;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::fs::output::{check_target, write_synced, Staged};
use crate::tensor_file::dtype::{convert_into, ExportDType, StDType};
use crate::tensor_file::safetensors::{PlannedTensor, SafetensorsFile, SafetensorsWriter};
use candle_core::Tensor;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// How an export is written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HfExportOptions {
    /// Element type of the written tensors (the merge itself is always fp32 or wider).
    pub dtype: ExportDType,
    /// Split the weights into shards of at most this many bytes (a tensor larger than the limit
    /// gets a shard of its own); `None` writes one `model.safetensors`.
    pub max_shard_bytes: Option<u64>,
    /// Replace an existing output instead of refusing to.
    pub force: bool,
}

impl Default for HfExportOptions {
    fn default() -> Self {
        HfExportOptions {
            dtype: ExportDType::F32,
            max_shard_bytes: None,
            force: false,
        }
    }
}

/// Where one output tensor's values come from.
pub(crate) enum Payload<'a> {
    /// A computed tensor (any float dtype, any device).
    Tensor(Tensor),
    /// A tensor stored in a safetensors file, copied (and converted) window by window.
    Stored(&'a SafetensorsFile, String),
}

/// Produces the payload of the named tensor, on demand, in plan order.
pub(crate) type Producer<'p, 'a> = dyn FnMut(&str) -> Result<Payload<'a>> + 'p;

/// Name of the file holding shard `i` (0-based) of `n`.
pub(crate) fn shard_name(i: usize, n: usize) -> String {
    format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
}

/// Parses a size such as `2GB`, `500MB`, `1.5GiB`, `4096` (bytes).
pub fn parse_size(text: &str) -> Result<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| Error::Config(format!("size '{text}': expected e.g. 2GB or 500MB")))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(Error::Config(format!(
                "size '{text}': unknown unit '{other}' (B, KB, MB, GB, KiB, MiB, GiB)"
            )))
        }
    };
    let bytes = value * mult;
    if !(bytes >= 1.0 && bytes.is_finite()) {
        return Err(Error::Config(format!(
            "size '{text}' must be at least 1 byte"
        )));
    }
    Ok(bytes as u64)
}

/// Groups `plan` into shards of at most `max` bytes each, keeping plan order.
fn shard_plan(plan: Vec<PlannedTensor>, max: Option<u64>) -> Vec<Vec<PlannedTensor>> {
    let Some(max) = max else {
        return vec![plan];
    };
    let mut shards: Vec<Vec<PlannedTensor>> = Vec::new();
    let mut size = 0u64;
    for t in plan {
        let b = t.bytes();
        match shards.last_mut() {
            Some(cur) if size + b <= max => {
                size += b;
                cur.push(t);
            }
            _ => {
                size = b;
                shards.push(vec![t]);
            }
        }
    }
    if shards.is_empty() {
        shards.push(Vec::new());
    }
    shards
}

/// Writes the bytes of `payload` (converted to `to`) into `w`.
pub(crate) fn write_payload(
    w: &mut SafetensorsWriter,
    payload: Payload<'_>,
    to: StDType,
) -> Result<()> {
    let mut buf = Vec::new();
    match payload {
        Payload::Stored(file, name) => {
            let from = file.info(&name)?.dtype;
            file.for_each_window(&name, |chunk| {
                if from == to {
                    w.write(chunk)
                } else {
                    buf.clear();
                    convert_into(chunk, from, to, &mut buf)?;
                    w.write(&buf)
                }
            })
        }
        Payload::Tensor(t) => crate::tensor_file::windows::tensor_windows(&t, |chunk, from| {
            if from == to {
                return w.write(chunk);
            }
            buf.clear();
            convert_into(chunk, from, to, &mut buf)?;
            w.write(&buf)
        }),
    }
}

/// Writes one safetensors file holding `plan`, pulling each tensor from `produce`. A writer
/// thread takes each tensor as soon as it is produced, so merging the next tensor overlaps with
/// writing this one; at most one tensor waits between them.
pub(crate) fn write_file(
    path: &Path,
    plan: Vec<PlannedTensor>,
    produce: &mut Producer<'_, '_>,
) -> Result<()> {
    let names: Vec<(String, StDType)> = plan.iter().map(|t| (t.name.clone(), t.dtype)).collect();
    let mut w = SafetensorsWriter::create(path, plan, &export_metadata())?;
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<(Payload<'_>, StDType)>(1);
        let writer = scope.spawn(move || -> Result<SafetensorsWriter> {
            for (payload, dtype) in rx {
                write_payload(&mut w, payload, dtype)?;
            }
            Ok(w)
        });
        let mut produced = Ok(());
        for (name, dtype) in names {
            match produce(&name) {
                Ok(p) => {
                    if tx.send((p, dtype)).is_err() {
                        break; // the writer stopped; its error is reported below
                    }
                }
                Err(e) => {
                    produced = Err(e);
                    break;
                }
            }
        }
        drop(tx);
        let written = writer
            .join()
            .map_err(|_| Error::Data(format!("{}: the writer thread panicked", path.display())))?;
        produced?;
        written?.finish()
    })
}

/// The `config.json` of a Llama of shape `cfg` stored as `dtype`.
pub(crate) fn config_json(
    cfg: &ModelConfig,
    dtype: ExportDType,
    bos: Option<u32>,
    eos: Option<u32>,
) -> Value {
    let mut v = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.kv_heads(),
        "head_dim": cfg.head_dim(),
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": false,
        "attention_dropout": 0.0,
        "mlp_bias": false,
        "initializer_range": cfg.initializer_range,
        "pretraining_tp": 1,
        "use_cache": true,
        "torch_dtype": dtype.torch_name(),
        "dtype": dtype.torch_name(),
    });
    if let Some(obj) = v.as_object_mut() {
        if let Some(b) = bos {
            obj.insert("bos_token_id".into(), json!(b));
        }
        if let Some(e) = eos {
            obj.insert("eos_token_id".into(), json!(e));
        }
    }
    v
}

/// The `generation_config.json` matching [`config_json`].
pub(crate) fn generation_config_json(bos: Option<u32>, eos: Option<u32>) -> Value {
    let mut v = json!({"_from_model_config": true});
    if let Some(obj) = v.as_object_mut() {
        if let Some(b) = bos {
            obj.insert("bos_token_id".into(), json!(b));
        }
        if let Some(e) = eos {
            obj.insert("eos_token_id".into(), json!(e));
        }
    }
    v
}

fn json_bytes(v: &Value) -> Vec<u8> {
    let mut s = serde_json::to_vec_pretty(v).unwrap_or_default();
    s.push(b'\n');
    s
}

/// Writes the files of a Hugging Face model directory into the existing directory `dir`
/// (no staging: the caller stages).
pub(crate) fn write_hf_into(
    dir: &Path,
    cfg: &ModelConfig,
    tok: Option<&TokenizerFiles>,
    produce: &mut Producer<'_, '_>,
    opts: &HfExportOptions,
) -> Result<()> {
    let plan: Vec<PlannedTensor> = cfg
        .tensor_shapes()
        .into_iter()
        .map(|(name, shape)| PlannedTensor {
            name,
            dtype: opts.dtype.st(),
            shape,
        })
        .collect();
    let total: u64 = plan.iter().map(|t| t.bytes()).sum();
    let shards = shard_plan(plan, opts.max_shard_bytes);
    let n = shards.len();
    if n == 1 {
        let shard = shards.into_iter().next().unwrap_or_default();
        write_file(&dir.join("model.safetensors"), shard, produce)?;
    } else {
        let mut weight_map = BTreeMap::new();
        for (i, shard) in shards.into_iter().enumerate() {
            let file = shard_name(i, n);
            for t in &shard {
                weight_map.insert(t.name.clone(), file.clone());
            }
            write_file(&dir.join(&file), shard, produce)?;
        }
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        write_synced(
            &dir.join("model.safetensors.index.json"),
            &json_bytes(&index),
        )?;
    }
    let (bos, eos) = tok.map_or((None, None), |t| (t.bos, t.eos));
    write_synced(
        &dir.join("config.json"),
        &json_bytes(&config_json(cfg, opts.dtype, bos, eos)),
    )?;
    write_synced(
        &dir.join("generation_config.json"),
        &json_bytes(&generation_config_json(bos, eos)),
    )?;
    if let Some(t) = tok {
        for (name, bytes) in &t.files {
            write_synced(&dir.join(name), bytes)?;
        }
    }
    Ok(())
}

/// Writes `out`: a single safetensors file when it ends in `.safetensors`, otherwise a model
/// directory; staged under a temporary name and renamed into place.
pub(crate) fn write_export(
    out: &Path,
    cfg: &ModelConfig,
    tokenizer: Option<&str>,
    produce: &mut Producer<'_, '_>,
    opts: &HfExportOptions,
) -> Result<()> {
    check_target(out, output_kind(out), opts.force)?;
    if is_single_file(out) {
        if opts.max_shard_bytes.is_some() {
            return Err(Error::Config(format!(
                "{}: sharding needs a directory output, not a .safetensors file",
                out.display()
            )));
        }
        let staged = Staged::new(out, &MODEL_FILE, opts.force)?;
        let plan = cfg
            .tensor_shapes()
            .into_iter()
            .map(|(name, shape)| PlannedTensor {
                name,
                dtype: opts.dtype.st(),
                shape,
            })
            .collect();
        write_file(staged.path(), plan, produce)?;
        return staged.commit();
    }
    // Build the tokenizer files before any weights, so a bad tokenizer fails fast.
    let tok = tokenizer.map(|s| tokenizer_files(s, cfg)).transpose()?;
    let staged = Staged::new(out, &MODEL_DIR, opts.force)?;
    write_hf_into(staged.path(), cfg, tok.as_ref(), produce, opts)?;
    staged.commit()
}

/// The kind of output `out` names: one safetensors file, or a model directory.
pub fn output_kind(out: &Path) -> &'static crate::fs::output::OutputKind {
    if is_single_file(out) {
        &MODEL_FILE
    } else {
        &MODEL_DIR
    }
}

/// Whether `out` names a single safetensors file rather than a directory.
pub fn is_single_file(out: &Path) -> bool {
    out.extension().is_some_and(|e| e == "safetensors")
}

/// Checks in-memory weights against the model's tensor list: every tensor present with its
/// shape and a float dtype, nothing else (adapter factors and rotary tables are named as such).
fn check_weights(weights: &HashMap<String, Tensor>, cfg: &ModelConfig) -> Result<()> {
    let expected = cfg.tensor_shapes();
    for (name, shape) in &expected {
        let t = weights.get(name).ok_or_else(|| Error::Shape {
            name: name.clone(),
            message: "missing from the weights to export".into(),
        })?;
        if t.dims() != shape.as_slice() {
            return Err(Error::Shape {
                name: name.clone(),
                message: format!("expected {shape:?}, found {:?}", t.dims()),
            });
        }
        if !StDType::from_candle(t.dtype()).is_some_and(StDType::is_float) {
            return Err(Error::Shape {
                name: name.clone(),
                message: format!("dtype {:?} is not a float type", t.dtype()),
            });
        }
    }
    if weights.len() != expected.len() {
        let mut extra: Vec<&String> = weights
            .keys()
            .filter(|k| !expected.iter().any(|(n, _)| n == *k))
            .collect();
        extra.sort();
        let name = extra.first().map(|s| s.to_string()).unwrap_or_default();
        let why = if name.contains("lora_") {
            "an adapter factor: merge adapters before exporting"
        } else if name.contains("inv_freq") {
            "a rotary table, which Hugging Face models recompute"
        } else {
            "not a parameter of a Llama with this config"
        };
        return Err(Error::Shape {
            name,
            message: format!("unexpected tensor: {why}"),
        });
    }
    Ok(())
}

/// Writes a Hugging Face Llama directory (`model.safetensors` or shards + index, `config.json`,
/// `generation_config.json`, and with a tokenizer `tokenizer.json`, `tokenizer_config.json`,
/// `special_tokens_map.json`) atomically (temporary directory + rename). `weights` are plain Llama
/// weights under Hugging Face names (e.g. [`crate::trainer::Trainer::merged_weights`]); `tokenizer` is a
/// spec string ("bytes", "gpt2", or a tokenizer.json path). An `out` ending in `.safetensors`
/// writes only that file.
pub fn write_model_dir(
    weights: &HashMap<String, Tensor>,
    config: &ModelConfig,
    tokenizer: Option<&str>,
    out: &Path,
    opts: &HfExportOptions,
) -> Result<()> {
    config.validate()?;
    check_weights(weights, config)?;
    let mut produce = |name: &str| -> Result<Payload<'static>> {
        weights
            .get(name)
            .cloned()
            .map(Payload::Tensor)
            .ok_or_else(|| Error::Shape {
                name: name.to_string(),
                message: "missing".into(),
            })
    };
    write_export(out, config, tokenizer, &mut produce, opts)
}

/// Merges a checkpoint (base + phases in order, optionally only up to phase `upto_phase`, + the
/// current adapters) and writes it as [`write_model_dir`] does, with the checkpoint's tokenizer:
/// the core of `relora-convert merge`. Streams: each tensor is mapped, merged and written on its
/// own, so memory stays near a few tensors. See [`merge_checkpoint_with`].
pub fn merge_checkpoint(
    ckpt: &Path,
    out: &Path,
    upto_phase: Option<usize>,
    opts: &HfExportOptions,
) -> Result<()> {
    merge_checkpoint_with(ckpt, out, upto_phase, None, opts)
}

/// [`merge_checkpoint`] with the tokenizer spec overridden (`None`: the one the checkpoint
/// records, if any).
///
/// `upto_phase = Some(n)` gives each adapted projection's weight as it stood right after the
/// n-th merge (the current adapter is left out); every other tensor (embedding, norms, head) has
/// its current value, since only projections are versioned by phase. `Some(0)` gives the base.
pub fn merge_checkpoint_with(
    ckpt: &Path,
    out: &Path,
    upto_phase: Option<usize>,
    tokenizer: Option<&str>,
    opts: &HfExportOptions,
) -> Result<()> {
    check_target(out, output_kind(out), opts.force)?;
    let src = CheckpointSource::open(ckpt)?;
    let (upto, current) = src.resolve_upto(upto_phase)?;
    let tok = tokenizer
        .map(str::to_string)
        .or_else(|| src.manifest().tokenizer.clone());
    let mut produce = |name: &str| -> Result<Payload<'_>> { payload(&src, name, upto, current) };
    write_export(out, src.config(), tok.as_deref(), &mut produce, opts)
}

/// The payload of tensor `name` of a checkpoint after `upto` phases (+ the current adapter).
pub(crate) fn payload<'a>(
    src: &'a CheckpointSource,
    name: &str,
    upto: usize,
    current: bool,
) -> Result<Payload<'a>> {
    if src.is_adapted(name) && (upto > 0 || current) {
        let module = name.trim_end_matches(".weight");
        Ok(Payload::Tensor(
            src.merged_projection(module, upto, current)?,
        ))
    } else if src.is_adapted(name) {
        // Nothing to merge: the base weight is copied as stored.
        Ok(Payload::Stored(src.base_file()?, name.to_string()))
    } else {
        Ok(Payload::Stored(src.stored(name)?, name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("2GB").unwrap(), 2_000_000_000);
        assert_eq!(parse_size("1.5 KiB").unwrap(), 1536);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("2XB").is_err());
        assert!(parse_size("0").is_err());
        assert!(parse_size("lots").is_err());
    }

    #[test]
    fn shards_respect_the_limit_and_keep_order() {
        let t = |n: &str, k: usize| PlannedTensor {
            name: n.into(),
            dtype: StDType::F32,
            shape: vec![k],
        };
        let plan = vec![t("a", 10), t("b", 10), t("c", 30), t("d", 5)];
        let shards = shard_plan(plan, Some(80));
        let names: Vec<Vec<&str>> = shards
            .iter()
            .map(|s| s.iter().map(|t| t.name.as_str()).collect())
            .collect();
        // a+b = 80 bytes fit; c (120 bytes) is alone; d follows.
        assert_eq!(names, vec![vec!["a", "b"], vec!["c"], vec!["d"]]);
        assert_eq!(shard_name(0, 3), "model-00001-of-00003.safetensors");
    }

    #[test]
    fn config_has_what_consumers_read() {
        let mut cfg = ModelConfig::preset("tiny").unwrap();
        cfg.vocab_size = 258;
        let v = config_json(&cfg, ExportDType::BF16, Some(256), Some(257));
        assert_eq!(v["rope_parameters"]["rope_theta"], v["rope_theta"]);
        assert_eq!(v["head_dim"], 16);
        assert_eq!(v["num_key_value_heads"], 2);
        assert_eq!(v["torch_dtype"], "bfloat16");
        assert_eq!(v["eos_token_id"], 257);
        let back: ModelConfig = serde_json::from_value(v).unwrap();
        assert_eq!(back, cfg);
    }
}
