//! Loading a checkpoint back into a trainer: verify every file against the manifest, rebuild the
//! projection weights by re-merging the phases onto the base (the same code the trainer merged
//! with, so the result is bit-identical), re-attach the adapters and restore the optimizer.

use super::files::{parse_tensors, read_verified, take};
use super::manifest::Manifest;
use crate::error::{Error, Result, TensorContext};
use crate::export::{merge_phases, Phase, PhaseAdapter};
use crate::model::llama::set_checked;
use crate::model::Llama;
use crate::optim::ParamState;
use crate::relora::cycle::attach_adapters;
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
pub fn read_phases(dir: &Path, m: &Manifest, device: &Device) -> Result<Vec<Phase>> {
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
pub fn read_base(
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
    // Placeholder init (overwritten below); a fixed seed keeps it cheap to reason about.
    let mut model = Llama::new(&m.model, dtype, device, &mut Rng::new(0))?;

    let params_path = dir.join("params.safetensors");
    let mut params = read_file(dir, &m, "params.safetensors", device)?;
    let base = read_base(dir, &m, device)?;
    let phases = read_phases(dir, &m, device)?;

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
        let base = base.unwrap_or_default();
        let mut list: Vec<(String, Tensor)> = Vec::with_capacity(base.len());
        for p in model.projections() {
            if p.adapter.is_some() {
                let key = format!("{}.weight", p.name);
                let t = base.get(&key).ok_or_else(|| {
                    Error::checkpoint(dir.join("base.safetensors"), format!("{key} is missing"))
                })?;
                list.push((key, t.clone()));
            }
        }
        base_list = Some(list);
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
