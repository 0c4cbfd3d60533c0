//! Atomic checkpoint saving: everything is written into a temporary sibling directory, each file
//! synced, the manifest written last, then the directory is renamed into place. A save that dies
//! at any point leaves at most a stray `.tmp-*` directory and never touches older checkpoints.

use super::files::{write_tensors, FileInfo};
use super::manifest::{Manifest, PhaseEntry, FORMAT, FORMAT_VERSION};
use crate::error::{Error, Result};
use crate::trainer::Trainer;
use candle_core::Tensor;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What the caller adds to a checkpoint besides the trainer's own state.
#[derive(Clone, Debug, Default)]
pub struct SaveExtra {
    /// The data cursor (e.g. the batcher's state as JSON).
    pub data: Option<serde_json::Value>,
    /// The tokenizer spec.
    pub tokenizer: Option<String>,
}

/// Saves `trainer` to the directory `dir` atomically. `dir` must not exist yet, or is replaced
/// (the old one is removed only after the new one is complete).
pub fn save(trainer: &Trainer, dir: &Path, extra: &SaveExtra) -> Result<()> {
    save_with_fault(trainer, dir, extra, None)
}

/// [`save`] with an injected failure after `fail_after_files` files, for tests of atomicity.
#[doc(hidden)]
pub fn save_with_fault(
    trainer: &Trainer,
    dir: &Path,
    extra: &SaveExtra,
    fail_after_files: Option<usize>,
) -> Result<()> {
    if trainer.has_pending() {
        return Err(Error::checkpoint(
            dir,
            "cannot save in the middle of a gradient accumulation",
        ));
    }
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let name = dir
        .file_name()
        .ok_or_else(|| Error::checkpoint(dir, "checkpoint path has no directory name"))?
        .to_string_lossy()
        .to_string();
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    let result =
        write_all(trainer, &tmp, extra, fail_after_files).and_then(|_| commit(&tmp, dir, parent));
    if result.is_err() {
        // Best effort: the previous checkpoints are untouched either way.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

fn write_all(
    trainer: &Trainer,
    tmp: &Path,
    extra: &SaveExtra,
    fail_after: Option<usize>,
) -> Result<()> {
    std::fs::create_dir_all(tmp.join("phases")).map_err(|e| Error::io(tmp, e))?;
    let mut files: BTreeMap<String, FileInfo> = BTreeMap::new();
    // Writes one file through `write` and records it (or fails as injected, for the tests).
    let mut put = |rel: &str, write: &dyn Fn(&Path) -> Result<FileInfo>| -> Result<()> {
        if fail_after.is_some_and(|n| files.len() >= n) {
            return Err(Error::io(
                tmp.join(rel),
                std::io::Error::other("injected write failure"),
            ));
        }
        files.insert(rel.to_string(), write(&tmp.join(rel))?);
        Ok(())
    };

    // Full-rank parameters as they are now: dense ones and every projection without an adapter.
    let model = &trainer.model;
    let mut params: Vec<(String, Tensor)> = model
        .dense_params()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    let mut adapters = Vec::new();
    for p in model.projections() {
        match &p.adapter {
            None => params.push((format!("{}.weight", p.name), p.weight.as_tensor().clone())),
            Some(ad) => {
                adapters.push((format!("{}.lora_A", p.name), ad.a.as_tensor().clone()));
                adapters.push((format!("{}.lora_B", p.name), ad.b.as_tensor().clone()));
            }
        }
    }
    put("params.safetensors", &|p| write_tensors(p, &params))?;
    if let Some(base) = trainer.base_weights() {
        put("base.safetensors", &|p| base.write_copy(p))?;
    }
    if !adapters.is_empty() {
        put("adapters.safetensors", &|p| write_tensors(p, &adapters))?;
    }
    let mut phase_entries = Vec::new();
    for phase in trainer.phases() {
        let rel = format!("phases/phase-{:04}.safetensors", phase.index);
        let mut t = Vec::new();
        for ad in &phase.adapters {
            t.push((format!("{}.lora_A", ad.module), ad.a.clone()));
            t.push((format!("{}.lora_B", ad.module), ad.b.clone()));
            let scale = Tensor::new(&[ad.scale], &candle_core::Device::Cpu)
                .map_err(|e| Error::tensor("phase scale", e))?;
            t.push((format!("{}.scale", ad.module), scale));
        }
        put(&rel, &|p| write_tensors(p, &t))?;
        phase_entries.push(PhaseEntry {
            index: phase.index,
            step: phase.step,
            file: rel,
        });
    }
    let mut opt = Vec::new();
    let mut steps = BTreeMap::new();
    for (name, st) in trainer.optimizer().states() {
        opt.push((format!("{name}.exp_avg"), st.exp_avg.clone()));
        opt.push((format!("{name}.exp_avg_sq"), st.exp_avg_sq.clone()));
        steps.insert(name.clone(), st.step);
    }
    put("optimizer.safetensors", &|p| write_tensors(p, &opt))?;

    let manifest = Manifest {
        format: FORMAT.to_string(),
        format_version: FORMAT_VERSION,
        writer: format!("relora {}", env!("CARGO_PKG_VERSION")),
        model: model.config.clone(),
        train: trainer.config.clone(),
        counters: trainer.counters().clone(),
        phase_index: trainer.phases().len(),
        adapters_attached: trainer.has_adapters(),
        rngs: trainer.rngs().clone(),
        data: extra.data.clone(),
        tokenizer: extra.tokenizer.clone(),
        optimizer_steps: steps,
        phases: phase_entries,
        files,
    };
    manifest.write(tmp)?;
    sync_dir(&tmp.join("phases"))?;
    sync_dir(tmp)
}

/// Moves the finished temporary directory into place.
fn commit(tmp: &Path, dir: &Path, parent: &Path) -> Result<()> {
    let mut old: Option<PathBuf> = None;
    if dir.exists() {
        let o = parent.join(format!(
            ".{}.old-{}",
            dir.file_name().unwrap_or_default().to_string_lossy(),
            std::process::id()
        ));
        std::fs::rename(dir, &o).map_err(|e| Error::io(dir, e))?;
        old = Some(o);
    }
    std::fs::rename(tmp, dir).map_err(|e| Error::io(dir, e))?;
    sync_dir(parent)?;
    if let Some(o) = old {
        std::fs::remove_dir_all(&o).map_err(|e| Error::io(&o, e))?;
    }
    Ok(())
}

/// Flushes a directory's entries (new names, renames) to disk.
fn sync_dir(dir: &Path) -> Result<()> {
    let f = std::fs::File::open(dir).map_err(|e| Error::io(dir, e))?;
    f.sync_all().map_err(|e| Error::io(dir, e))
}
