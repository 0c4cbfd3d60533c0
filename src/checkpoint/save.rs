//! Atomic checkpoint saving: everything is written into a temporary sibling directory, each file
//! synced, the manifest written last, then the directory is renamed into place
//! ([`crate::fs::output::Staged`]). A save that dies at any point leaves at most a stray `.tmp-*`
//! directory and never touches older checkpoints. An existing target is replaced only when it is
//! an empty directory or relora's own checkpoint holding nothing else; anything else is refused
//! and left as it was.

use super::files::{write_tensors, FileInfo};
use super::manifest::{Manifest, PhaseEntry, FORMAT, FORMAT_VERSION};
use super::recognise::CHECKPOINT;
use crate::error::{Error, Result};
use crate::fs::output::Staged;
use crate::trainer::Trainer;
use candle_core::Tensor;
use std::collections::BTreeMap;
use std::path::Path;

/// What the caller adds to a checkpoint besides the trainer's own state.
#[derive(Clone, Debug, Default)]
pub struct SaveExtra {
    /// The data cursor (e.g. the batcher's state as JSON).
    pub data: Option<serde_json::Value>,
    /// The tokenizer spec.
    pub tokenizer: Option<String>,
    /// A host's own state as JSON text (the C API's `host_state`), stored and given back byte
    /// for byte. The caller checks that it is JSON.
    pub host_state: Option<String>,
}

/// Saves `trainer` to the directory `dir` atomically. `dir` must not exist yet, be an empty
/// directory, or be an earlier relora checkpoint holding nothing else, which is replaced (and
/// removed only after the new one is complete). Anything else there is refused with
/// [`Error::OutputExists`] and left untouched.
pub fn save(trainer: &Trainer, dir: &Path, extra: &SaveExtra) -> Result<()> {
    save_with_fault(trainer, dir, extra, None)
}

/// A failure injected into a save after some of its files, for tests of atomicity.
#[doc(hidden)]
#[derive(Clone, Copy, Debug)]
pub(crate) enum SaveFault {
    /// The next file's write fails with an I/O error.
    FailAfter(usize),
    /// The process kills itself with SIGKILL (as `kill -9` would) before the next file.
    KillAfter(usize),
}

/// [`save`] with an injected failure after `fail_after_files` files, for tests of atomicity.
#[doc(hidden)]
pub fn save_with_fault(
    trainer: &Trainer,
    dir: &Path,
    extra: &SaveExtra,
    fail_after_files: Option<usize>,
) -> Result<()> {
    save_with(
        trainer,
        dir,
        extra,
        fail_after_files.map(SaveFault::FailAfter),
    )
}

/// [`save`] with an optional injected fault.
#[doc(hidden)]
pub(crate) fn save_with(
    trainer: &Trainer,
    dir: &Path,
    extra: &SaveExtra,
    fault: Option<SaveFault>,
) -> Result<()> {
    if trainer.has_pending() {
        return Err(Error::checkpoint(
            dir,
            "cannot save in the middle of a gradient accumulation",
        ));
    }
    let staged = Staged::new(dir, &CHECKPOINT, true)?;
    write_all(trainer, staged.path(), extra, fault)?;
    staged.commit()
}

fn write_all(
    trainer: &Trainer,
    tmp: &Path,
    extra: &SaveExtra,
    fault: Option<SaveFault>,
) -> Result<()> {
    std::fs::create_dir_all(tmp.join("phases")).map_err(|e| Error::io(tmp, e))?;
    let mut files: BTreeMap<String, FileInfo> = BTreeMap::new();
    // Writes one file through `write` and records it (or fails as injected, for the tests).
    let mut put = |rel: &str, write: &dyn Fn(&Path) -> Result<FileInfo>| -> Result<()> {
        match fault {
            Some(SaveFault::FailAfter(n)) if files.len() >= n => {
                return Err(Error::io(
                    tmp.join(rel),
                    std::io::Error::other("injected write failure"),
                ));
            }
            Some(SaveFault::KillAfter(n)) if files.len() >= n => kill_self(),
            _ => {}
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
        host_state: extra.host_state.clone(),
        optimizer_steps: steps,
        phases: phase_entries,
        files,
    };
    manifest.write(tmp)
}

/// Ends the process as `kill -9` does: no destructor, no clean-up.
fn kill_self() {
    #[cfg(unix)]
    // SAFETY: sends a signal to this process; nothing is touched afterwards.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    std::process::abort();
}
