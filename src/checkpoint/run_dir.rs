//! A run directory's checkpoints: `checkpoints/step-NNNNNNNN/`, the newest found by step number,
//! older ones pruned to keep the last K.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// The checkpoint directory for `step` under `run_dir`.
pub fn checkpoint_dir(run_dir: &Path, step: u64) -> PathBuf {
    run_dir.join("checkpoints").join(format!("step-{step:08}"))
}

/// Complete checkpoints under `run_dir` (those with a manifest), sorted by step.
pub fn list(run_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let dir = run_dir.join("checkpoints");
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
        let entry = entry.map_err(|e| Error::io(&dir, e))?;
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(step) = name
            .strip_prefix("step-")
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        if entry.path().join(super::manifest::MANIFEST_FILE).exists() {
            out.push((step, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Resolves what the user passed to `--resume`: a checkpoint directory itself, or a run
/// directory (its newest checkpoint).
pub fn resolve(path: &Path) -> Result<PathBuf> {
    if path.join(super::manifest::MANIFEST_FILE).exists() {
        return Ok(path.to_path_buf());
    }
    list(path)?.pop().map(|(_, p)| p).ok_or_else(|| {
        Error::checkpoint(
            path,
            "neither a checkpoint nor a run directory with checkpoints",
        )
    })
}

/// Removes all but the newest `keep` checkpoints (0 keeps all).
pub fn prune(run_dir: &Path, keep: usize) -> Result<()> {
    if keep == 0 {
        return Ok(());
    }
    let all = list(run_dir)?;
    if all.len() > keep {
        for (_, p) in &all[..all.len() - keep] {
            std::fs::remove_dir_all(p).map_err(|e| Error::io(p, e))?;
        }
    }
    Ok(())
}
