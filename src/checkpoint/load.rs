//! Loading a checkpoint back into a trainer: verify every file against the manifest, rebuild the
//! projection weights by re-merging the phases onto the base (the same code the trainer merged
//! with, so the result is bit-identical), re-attach the adapters and restore the optimizer.

use super::files::{parse_tensors, read_verified, take};
use super::manifest::Manifest;
use crate::error::{Error, Result, TensorContext};
use crate::model::adapters::{attach_adapters, short_name};
use crate::model::llama::set_checked;
use crate::model::Llama;
use crate::optim::ParamState;
use crate::relora::merge::{merge_phases, Phase, PhaseAdapter};
use crate::relora::BaseWeights;
use crate::rng::Rng;
use crate::trainer::Trainer;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// Reads one listed safetensors file of the checkpoint, verified.
fn read_file(
    dir: &Path,
    m: &Manifest,
    rel: &str,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let info = m.file(dir, rel)?;
    let path = dir.join(rel);
    let bytes = read_verified(&path, &info)?;
    parse_tensors(&path, &bytes, device)
}

/// Reads the completed phases listed in the manifest.
pub(crate) fn read_phases(dir: &Path, m: &Manifest, device: &Device) -> Result<Vec<Phase>> {
    let mut phases = Vec::with_capacity(m.phases.len());
    for (i, entry) in m.phases.iter().enumerate() {
        if entry.index != i + 1 {
            return Err(Error::checkpoint(
                dir,
                format!("phase list out of order at {}", entry.index),
            ));
        }
        let path = dir.join(&entry.file);
        let mut t = read_file(dir, m, &entry.file, device)?;
        let mut modules: Vec<String> = t
            .keys()
            .filter_map(|k| k.strip_suffix(".lora_A").map(str::to_string))
            .collect();
        modules.sort_by_key(|name| module_order(name));
        let mut adapters = Vec::with_capacity(modules.len());
        for module in modules {
            let a = take(&mut t, &format!("{module}.lora_A"), &path)?;
            let b = take(&mut t, &format!("{module}.lora_B"), &path)?;
            let scale = take(&mut t, &format!("{module}.scale"), &path)?
                .to_dtype(DType::F64)
                .and_then(|s| s.flatten_all())
                .and_then(|s| s.to_vec1::<f64>())
                .with_ctx(|| format!("{module}.scale"))?;
            let [scale] = scale[..] else {
                return Err(Error::checkpoint(
                    &path,
                    format!("{module}.scale must hold one value"),
                ));
            };
            adapters.push(PhaseAdapter {
                module,
                a,
                b,
                scale,
            });
        }
        if let Some(extra) = t.keys().next() {
            return Err(Error::checkpoint(
                &path,
                format!("unexpected tensor {extra}"),
            ));
        }
        phases.push(Phase {
            index: entry.index,
            step: entry.step,
            adapters,
        });
    }
    Ok(phases)
}

/// Sort key that keeps modules in model order (layer number, then q,k,v,o,gate,up,down), so a
/// re-merge visits them in the trainer's order.
fn module_order(module: &str) -> (usize, usize) {
    let layer = module
        .split('.')
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(usize::MAX);
    let short = module.rsplit('.').next().unwrap_or("");
    let pos = crate::config::ALL_TARGETS
        .iter()
        .position(|t| *t == short)
        .unwrap_or(usize::MAX);
    (layer, pos)
}

/// Reads the base weights (projection weights at the switch to adapters), if present.
pub(crate) fn read_base(
    dir: &Path,
    m: &Manifest,
    device: &Device,
) -> Result<Option<HashMap<String, Tensor>>> {
    if !m.adapters_attached {
        return Ok(None);
    }
    read_file(dir, m, "base.safetensors", device).map(Some)
}

/// Loads a checkpoint directory into a trainer on `device`. Returns the manifest too (it holds
/// the data cursor and tokenizer spec).
pub fn load(dir: &Path, device: &Device) -> Result<(Trainer, Manifest)> {
    let m = Manifest::read(dir)?;
    let dtype = m.train.candle_dtype()?;

    let params_path = dir.join("params.safetensors");
    let mut params = read_file(dir, &m, "params.safetensors", device)?;
    let base = read_base(dir, &m, device)?;
    // Every weight is stored in params or base (just verified to be the sizes the manifest
    // records), so they bound the model: a manifest claiming a bigger one is corrupt, and is
    // refused before the model is allocated.
    let mut stored = m.file(dir, "params.safetensors")?.bytes;
    if base.is_some() {
        stored += m.file(dir, "base.safetensors")?.bytes;
    }
    m.check_weights_fit(dir, stored, dtype.size_in_bytes(), &format!("{dtype:?}"))?;
    let phases = read_phases(dir, &m, device)?;
    // Placeholder init (overwritten below); a fixed seed keeps it cheap to reason about.
    let mut model = Llama::new(&m.model, dtype, device, &mut Rng::new(0))?;

    let mut weights: HashMap<String, Tensor> = HashMap::new();
    if let Some(base) = &base {
        for (k, v) in base {
            weights.insert(k.clone(), v.clone());
        }
        merge_phases(&mut weights, &phases, None)?;
    }
    for (k, v) in params.drain() {
        if weights.insert(k.clone(), v).is_some() {
            return Err(Error::checkpoint(
                &params_path,
                format!("{k} is in both params and base"),
            ));
        }
    }
    model
        .load_weights(&weights, true)
        .map_err(|e| Error::checkpoint(dir, e.to_string()))?;

    let mut base_list = None;
    if m.adapters_attached {
        let adapters_path = dir.join("adapters.safetensors");
        let mut adapters = read_file(dir, &m, "adapters.safetensors", device)?;
        // Adapters are allocated at the manifest's rank: first check that the file holds each
        // of them at that rank, so a corrupt rank is an error rather than an allocation.
        let rank = m.train.lora_rank;
        for p in model.projections() {
            if !m
                .train
                .target_modules
                .iter()
                .any(|t| t == short_name(&p.name))
            {
                continue;
            }
            for (key, shape) in [
                (format!("{}.lora_A", p.name), [rank, p.in_dim()]),
                (format!("{}.lora_B", p.name), [p.out_dim(), rank]),
            ] {
                let t = adapters.get(&key).ok_or_else(|| {
                    Error::checkpoint(&adapters_path, format!("tensor {key} is missing"))
                })?;
                if t.dims() != shape {
                    return Err(Error::checkpoint(
                        &adapters_path,
                        format!(
                            "tensor {key} is {:?}, but lora_rank {rank} needs {shape:?}",
                            t.dims()
                        ),
                    ));
                }
            }
        }
        attach_adapters(
            &mut model,
            &m.train.target_modules,
            m.train.lora_rank,
            m.train.lora_scale(),
            &mut Rng::new(0),
        )?;
        for p in model.projections() {
            if let Some(ad) = &p.adapter {
                let a = take(&mut adapters, &format!("{}.lora_A", p.name), &adapters_path)?;
                let b = take(&mut adapters, &format!("{}.lora_B", p.name), &adapters_path)?;
                set_checked(&format!("{}.lora_A", p.name), &ad.a, &a)?;
                set_checked(&format!("{}.lora_B", p.name), &ad.b, &b)?;
            }
        }
        if let Some(extra) = adapters.keys().next() {
            return Err(Error::checkpoint(
                &adapters_path,
                format!("unexpected tensor {extra}"),
            ));
        }
        let base_path = dir.join("base.safetensors");
        let base = base.unwrap_or_default();
        let mut names = Vec::new();
        for p in model.projections() {
            if p.adapter.is_some() {
                let key = format!("{}.weight", p.name);
                if !base.contains_key(&key) {
                    return Err(Error::checkpoint(&base_path, format!("{key} is missing")));
                }
                names.push(key);
            }
        }
        // The trainer reads the verified file itself when it saves, rather than a copy.
        base_list = Some(BaseWeights::open(&base_path, names)?);
    }

    let mut trainer =
        Trainer::from_parts(model, m.train.clone(), m.counters.clone(), m.rngs.clone())?;
    trainer.restore_history(base_list, phases);

    let opt_path = dir.join("optimizer.safetensors");
    let mut opt = read_file(dir, &m, "optimizer.safetensors", device)?;
    let trainable: HashMap<String, Vec<usize>> = trainer
        .model
        .trainable_params()
        .into_iter()
        .map(|(n, v)| (n, v.dims().to_vec()))
        .collect();
    for (name, &step) in &m.optimizer_steps {
        let Some(shape) = trainable.get(name) else {
            return Err(Error::checkpoint(
                &opt_path,
                format!("state for {name}, which is not trainable"),
            ));
        };
        let exp_avg = take(&mut opt, &format!("{name}.exp_avg"), &opt_path)?;
        let exp_avg_sq = take(&mut opt, &format!("{name}.exp_avg_sq"), &opt_path)?;
        for t in [&exp_avg, &exp_avg_sq] {
            if t.dims() != shape.as_slice() {
                return Err(Error::checkpoint(
                    &opt_path,
                    format!(
                        "state of {name} is {:?}, the parameter is {shape:?}",
                        t.dims()
                    ),
                ));
            }
        }
        trainer.optimizer_mut().set_state(
            name,
            ParamState {
                exp_avg: exp_avg.to_dtype(dtype).ctx("optimizer state")?,
                exp_avg_sq: exp_avg_sq.to_dtype(dtype).ctx("optimizer state")?,
                step,
            },
        );
    }
    if let Some(extra) = opt.keys().next() {
        return Err(Error::checkpoint(
            &opt_path,
            format!("unexpected tensor {extra}"),
        ));
    }
    Ok((trainer, m))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::checkpoint::{save, SaveExtra};
    use crate::config::{Mode, ModelConfig, TrainConfig};
    use crate::data::Batch;

    /// A tiny LoRA trainer after one step (adapters attached), saved to `dir`.
    pub(crate) fn saved_checkpoint(dir: &Path) {
        let mut model = ModelConfig::preset("tiny").unwrap();
        model.vocab_size = 32;
        let cfg = TrainConfig {
            mode: Mode::Lora,
            steps: 4,
            warmup_steps: 0,
            warmup_full_steps: 0,
            batch_size: 1,
            seq_len: 4,
            lora_rank: 2,
            ..TrainConfig::default()
        };
        let mut t = Trainer::new(&model, &cfg, &Device::Cpu).unwrap();
        let batch = Batch {
            inputs: vec![1, 2, 3, 4],
            targets: vec![2, 3, 4, 5],
            batch: 1,
            seq_len: 4,
        };
        t.step(&[batch]).unwrap();
        save(&t, dir, &SaveExtra::default()).unwrap();
    }

    /// Rewrites the checkpoint's manifest as `original` with `edit` applied.
    pub(crate) fn write_edited(dir: &Path, original: &Manifest, edit: impl FnOnce(&mut Manifest)) {
        let mut m = original.clone();
        edit(&mut m);
        m.write(dir).unwrap();
    }

    #[test]
    fn sizes_a_manifest_claims_beyond_its_files_are_refused_before_allocating() {
        // Found by fuzzing (fuzz/seeds/manifest/huge-*.json): a manifest naming a huge model or
        // rank made the loader allocate it (terabytes) before reading a single weight.
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ckpt");
        saved_checkpoint(&dir);
        let original = Manifest::read(&dir).unwrap();
        let load_edited = |edit: fn(&mut Manifest)| {
            write_edited(&dir, &original, edit);
            load(&dir, &Device::Cpu)
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        load_edited(|_| {}).unwrap();

        let err = load_edited(|m| m.model.vocab_size = 1 << 30).unwrap_err();
        assert!(err.contains("bytes of weights"), "{err}");
        let err = load_edited(|m| m.model.num_hidden_layers = 1 << 20).unwrap_err();
        assert!(err.contains("bytes of weights"), "{err}");
        let err = load_edited(|m| m.train.lora_rank = 1 << 40).unwrap_err();
        assert!(err.contains("lora_rank"), "{err}");
        let err = load_edited(|m| m.model.max_position_embeddings = 1 << 36).unwrap_err();
        assert!(err.contains("rotary table"), "{err}");
    }
}
