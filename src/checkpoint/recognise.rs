//! How relora recognises its own checkpoints on disk, so that a save, an import or a `--force`
//! replaces or removes only what it wrote (see [`crate::fs::output`]).
//!
//! A complete checkpoint is a directory whose `manifest.json` says it is a relora checkpoint and
//! which holds nothing but the files that manifest lists (plus the manifest, its checksum and
//! `phases/`). An unfinished one (a save killed before its manifest, a half-deleted one) is
//! recognised by its entries' names alone: every one of them is a name the checkpoint layout
//! uses.

use super::manifest::{FORMAT, MANIFEST_CHECKSUM_FILE, MANIFEST_FILE};
use crate::fs::ownership::{is_inside, Claim, OutputKind, Recognise};
use std::path::{Path, PathBuf};

/// A relora checkpoint directory.
pub const CHECKPOINT: OutputKind = OutputKind {
    noun: "checkpoint",
    dir: true,
    recognise: Recognise::Custom(complete),
};

/// What a killed save or prune leaves of a checkpoint (`.step-N.tmp-PID` and the like).
pub(crate) const UNFINISHED_CHECKPOINT: OutputKind = OutputKind {
    noun: "unfinished checkpoint",
    dir: true,
    recognise: Recognise::Custom(unfinished),
};

/// The subdirectory of the completed phases.
const PHASES_DIR: &str = "phases";

/// The files of a checkpoint as its manifest lists them.
fn complete(dir: &Path) -> Result<Claim, String> {
    let path = dir.join(MANIFEST_FILE);
    let bytes =
        crate::fs::read::read_limited(&path, crate::fs::read::JSON_LIMIT).map_err(|e| match e {
            crate::error::Error::Io { source, .. }
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                format!("no {MANIFEST_FILE}, so not a relora checkpoint")
            }
            e => format!("its {MANIFEST_FILE} cannot be read ({e})"),
        })?;
    let doc: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|_| format!("its {MANIFEST_FILE} is not JSON"))?;
    if doc["format"].as_str() != Some(FORMAT) {
        return Err(format!("its {MANIFEST_FILE} is not a relora checkpoint's"));
    }
    let mut claim = Claim::default();
    for name in [MANIFEST_FILE, MANIFEST_CHECKSUM_FILE] {
        claim.files.insert(PathBuf::from(name));
    }
    claim.dirs.insert(PathBuf::from(PHASES_DIR));
    let listed = doc["files"]
        .as_object()
        .map(|m| m.keys())
        .into_iter()
        .flatten();
    for rel in listed {
        let rel = PathBuf::from(rel);
        if !is_inside(&rel) {
            return Err(format!("its manifest names {}, outside it", rel.display()));
        }
        claim.files.insert(rel);
    }
    Ok(claim)
}

/// Whether `rel` is a name of the checkpoint layout.
fn is_layout_name(rel: &Path) -> bool {
    let s = rel.to_string_lossy();
    match s.strip_prefix("phases/") {
        Some(file) => file
            .strip_prefix("phase-")
            .and_then(|f| f.strip_suffix(".safetensors"))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())),
        None => matches!(
            &*s,
            MANIFEST_FILE
                | MANIFEST_CHECKSUM_FILE
                | PHASES_DIR
                | "params.safetensors"
                | "base.safetensors"
                | "adapters.safetensors"
                | "optimizer.safetensors"
        ),
    }
}

/// The entries of an unfinished checkpoint, when every one has a checkpoint layout name.
fn unfinished(dir: &Path) -> Result<Claim, String> {
    let entries = crate::fs::ownership::entries(dir).map_err(|e| e.to_string())?;
    let mut claim = Claim::default();
    for (rel, is_dir) in entries {
        if !is_layout_name(&rel) || (is_dir != (rel == Path::new(PHASES_DIR))) {
            return Err(format!("{} is not part of a checkpoint", rel.display()));
        }
        if is_dir {
            claim.dirs.insert(rel);
        } else {
            claim.files.insert(rel);
        }
    }
    Ok(claim)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_names() {
        for ok in [
            "manifest.json",
            "params.safetensors",
            "phases",
            "phases/phase-0001.safetensors",
            "phases/phase-12345.safetensors",
        ] {
            assert!(is_layout_name(Path::new(ok)), "{ok}");
        }
        for not in [
            "notes.txt",
            "phases/phase-.safetensors",
            "phases/phase-1a.safetensors",
            "phases/x",
            "sub/params.safetensors",
        ] {
            assert!(!is_layout_name(Path::new(not)), "{not}");
        }
    }
}
