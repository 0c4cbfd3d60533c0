//! A run directory's checkpoints: `checkpoints/step-NNNNNNNN/`, the newest found by step number,
//! older ones pruned to keep the last K.
//!
//! Only complete checkpoints carry a visible name. A save in progress writes `.NAME.tmp-PID`, a
//! save that replaces a checkpoint parks the old one as `.NAME.old-PID` for a moment, and pruning
//! renames a checkpoint to `.NAME.del-PID` before deleting it, so a process killed at any point
//! never leaves a half-written or half-deleted `step-*` directory. What such a kill does leave
//! behind, [`clean_stale`] removes when the next trainer starts on the run directory.
//!
//! Every removal here takes only what relora wrote ([`crate::fs::output::remove_own`]): a
//! checkpoint is removed file by file from its manifest's list, a leftover only when all its
//! entries carry checkpoint file names; a directory holding anything else is left alone.

use super::recognise::{CHECKPOINT, UNFINISHED_CHECKPOINT};
use crate::error::{Error, Result};
use crate::fs::output::remove_own;
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

/// Removes the checkpoint `dir` if it is relora's own and holds nothing else (file by file, from
/// its manifest's list); otherwise an [`Error::OutputExists`] says what is in it, and nothing is
/// removed.
pub fn remove_checkpoint(dir: &Path) -> Result<()> {
    remove_own(dir, &CHECKPOINT)
}

/// Removes all but the newest `keep` checkpoints (0 keeps all). Each is first renamed to a hidden
/// name, so a kill during the deletion leaves no partial checkpoint that looks complete. A
/// checkpoint directory that also holds files relora did not write is kept.
pub fn prune(run_dir: &Path, keep: usize) -> Result<()> {
    if keep == 0 {
        return Ok(());
    }
    let all = list(run_dir)?;
    if all.len() > keep {
        for (_, p) in &all[..all.len() - keep] {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            // A checkpoint a user has put files into is not relora's alone: it stays, under its
            // name (checked before the rename).
            if !crate::fs::output::holds_own(p, &CHECKPOINT) {
                continue;
            }
            let doomed = p.with_file_name(format!(".{name}.del-{}", std::process::id()));
            std::fs::rename(p, &doomed).map_err(|e| Error::io(p, e))?;
            remove_own(&doomed, &CHECKPOINT)?;
        }
    }
    Ok(())
}

/// Splits a hidden leftover name `.NAME.KIND-PID` (or `.NAME.KIND-PID-N`) into `(NAME, KIND)`
/// for the kinds the checkpoint code writes (`tmp`, `old`, `del`).
fn leftover(name: &str) -> Option<(&str, &str)> {
    let rest = name.strip_prefix('.')?;
    let (ckpt, tail) = rest.rsplit_once('.')?;
    let (kind, tag) = tail.split_once('-')?;
    let tag_ok = tag.starts_with(|c: char| c.is_ascii_digit())
        && tag.bytes().all(|b| b.is_ascii_digit() || b == b'-')
        && !tag.ends_with('-');
    if !tag_ok || !ckpt.starts_with("step-") || !matches!(kind, "tmp" | "old" | "del") {
        return None;
    }
    Some((ckpt, kind))
}

/// Tidies the checkpoints of `run_dir` after a process was killed while saving or pruning:
/// removes unfinished saves (`.step-*.tmp-PID`) and half-deleted checkpoints (`.step-*.del-PID`),
/// and puts back a checkpoint parked for replacement (`.step-*.old-PID`) whose replacement never
/// arrived (otherwise removes it). Returns the paths removed or restored. A leftover name whose
/// directory holds anything that is not part of a checkpoint is left alone.
///
/// Only one trainer may write a run directory: this removes every process's leftovers. Call it
/// when a trainer starts on the run directory, never from readers such as `eval`.
pub fn clean_stale(run_dir: &Path) -> Result<Vec<PathBuf>> {
    let dir = run_dir.join("checkpoints");
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
        let entry = entry.map_err(|e| Error::io(&dir, e))?;
        entries.push(entry.file_name().to_string_lossy().to_string());
    }
    // Restorations first, so a parked checkpoint wins over removing it as a duplicate.
    entries.sort_by_key(|n| !n.contains(".old-"));
    let mut touched = Vec::new();
    for name in entries {
        let Some((ckpt, kind)) = leftover(&name) else {
            continue;
        };
        let path = dir.join(&name);
        let target = dir.join(ckpt);
        if kind == "old" && !target.exists() && path.join(super::manifest::MANIFEST_FILE).exists() {
            std::fs::rename(&path, &target).map_err(|e| Error::io(&path, e))?;
        } else if remove_own(&path, &UNFINISHED_CHECKPOINT).is_err() {
            continue;
        }
        touched.push(path);
    }
    Ok(touched)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpoint(path: &Path) {
        std::fs::create_dir_all(path.join("phases")).unwrap();
        std::fs::write(
            path.join(super::super::manifest::MANIFEST_FILE),
            br#"{"format": "relora-checkpoint", "files": {"params.safetensors": {}}}"#,
        )
        .unwrap();
        std::fs::write(path.join("params.safetensors"), b"x").unwrap();
    }

    fn names(run: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn leftovers_of_killed_saves_are_recognised() {
        assert_eq!(
            leftover(".step-00000012.tmp-4242"),
            Some(("step-00000012", "tmp"))
        );
        assert_eq!(leftover(".step-1.old-7"), Some(("step-1", "old")));
        assert_eq!(leftover(".step-1.del-7"), Some(("step-1", "del")));
        assert_eq!(leftover(".step-1.old-7-2"), Some(("step-1", "old")));
        for not in [
            "step-00000012",
            ".step-1.tmp-",
            ".step-1.tmp-12a",
            ".step-1.tmp-12-",
            ".step-1.tmp--1",
            ".step-1.bak-12",
            ".hidden",
            ".other.tmp-12",
        ] {
            assert_eq!(leftover(not), None, "{not}");
        }
    }

    #[test]
    fn clean_stale_removes_leftovers_and_restores_a_parked_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path();
        let ck = run.join("checkpoints");
        checkpoint(&ck.join("step-00000004"));
        // A save killed part-way (no manifest yet) and one killed after writing its manifest.
        std::fs::create_dir_all(ck.join(".step-00000006.tmp-111/phases")).unwrap();
        checkpoint(&ck.join(".step-00000008.tmp-222"));
        // A prune killed part-way.
        std::fs::create_dir_all(ck.join(".step-00000002.del-333")).unwrap();
        // A replacement killed between its two renames: the parked original comes back...
        checkpoint(&ck.join(".step-00000010.old-444"));
        // ...but one whose replacement did arrive is removed.
        checkpoint(
            &ck.join("step-00000004")
                .with_file_name(".step-00000004.old-555"),
        );
        // Unrelated files stay, and so does a leftover name holding a user's file.
        std::fs::write(ck.join("notes.txt"), b"keep").unwrap();
        std::fs::create_dir_all(ck.join(".step-00000012.tmp-666")).unwrap();
        std::fs::write(ck.join(".step-00000012.tmp-666/notes.txt"), b"keep").unwrap();

        let touched = clean_stale(run).unwrap();
        assert_eq!(touched.len(), 5, "{touched:?}");
        assert_eq!(
            names(run),
            [
                ".step-00000012.tmp-666",
                "notes.txt",
                "step-00000004",
                "step-00000010"
            ]
        );
        assert_eq!(
            list(run)
                .unwrap()
                .iter()
                .map(|(s, _)| *s)
                .collect::<Vec<_>>(),
            [4, 10]
        );
        // Idempotent, and a run directory without checkpoints is fine.
        assert!(clean_stale(run).unwrap().is_empty());
        assert!(clean_stale(&run.join("nothing")).unwrap().is_empty());
    }

    #[test]
    fn prune_leaves_no_partial_checkpoint_behind() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path();
        for s in [1, 2, 3, 4] {
            checkpoint(&checkpoint_dir(run, s));
        }
        // A user's file in the oldest checkpoint keeps that one.
        std::fs::write(checkpoint_dir(run, 1).join("notes.txt"), b"mine").unwrap();
        prune(run, 2).unwrap();
        assert_eq!(
            names(run),
            ["step-00000001", "step-00000003", "step-00000004"]
        );
        assert!(checkpoint_dir(run, 1).join("notes.txt").exists());
    }
}
