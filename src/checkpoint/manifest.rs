//! The checkpoint manifest: a versioned JSON document naming everything needed to resume.

use super::files::{write_synced, FileInfo};
use crate::config::{ModelConfig, TrainConfig};
use crate::error::{Error, Result};
use crate::train_state::{TrainerCounters, TrainerRngs};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// The value of `format` in every manifest.
pub const FORMAT: &str = "relora-checkpoint";
/// The manifest layout this build writes. Version 2 added [`MANIFEST_CHECKSUM_FILE`]; version 1
/// checkpoints (no checksum of the manifest itself) are still read.
pub const FORMAT_VERSION: u32 = 2;
/// The oldest manifest layout this build reads.
pub(crate) const OLDEST_READABLE_VERSION: u32 = 1;
/// The manifest's file name inside a checkpoint directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The CRC-32 of the manifest's bytes, as 8 hex digits. The manifest checks every other file; this
/// checks the manifest, so that a flipped digit (a scale, a step, a checksum) is caught too.
pub const MANIFEST_CHECKSUM_FILE: &str = "manifest.json.crc32";

/// One completed ReLoRA phase as listed in the manifest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PhaseEntry {
    /// 1-based phase number.
    pub index: usize,
    /// Optimizer step of the merge.
    pub step: u64,
    /// File inside the checkpoint, e.g. `phases/phase-0001.safetensors`.
    pub file: String,
}

/// Everything a checkpoint says about itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: String,
    /// [`FORMAT_VERSION`] at the time of writing.
    pub format_version: u32,
    /// The crate version that wrote it.
    pub writer: String,
    /// The model's shape.
    pub model: ModelConfig,
    /// The training options.
    pub train: TrainConfig,
    /// Step, skipped steps and the non-finite streak.
    pub counters: TrainerCounters,
    /// Number of completed ReLoRA phases (merges).
    pub phase_index: usize,
    /// Whether adapters are attached (the switch from full rank has happened).
    pub adapters_attached: bool,
    /// The trainer's random streams.
    pub rngs: TrainerRngs,
    /// The data cursor of whoever feeds batches (the CLI's batcher state), opaque here.
    pub data: Option<serde_json::Value>,
    /// A host's state as the exact JSON text it gave (the C API's `host_state`); absent in
    /// checkpoints written before it existed, where a host's state was kept in `data`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_state: Option<String>,
    /// The tokenizer spec ("bytes", "gpt2" or a tokenizer.json path), if known.
    pub tokenizer: Option<String>,
    /// Adam step count per parameter name.
    pub optimizer_steps: BTreeMap<String, u64>,
    /// Completed phases, in merge order.
    pub phases: Vec<PhaseEntry>,
    /// Size and checksum of each file, by path relative to the checkpoint directory.
    pub files: BTreeMap<String, FileInfo>,
}

/// Whether `rel` is a plain relative path below a directory: no root, drive prefix or `..`.
fn is_inside(rel: &str) -> bool {
    let p = Path::new(rel);
    !rel.is_empty()
        && p.components().all(|c| {
            matches!(
                c,
                std::path::Component::Normal(_) | std::path::Component::CurDir
            )
        })
}

impl Manifest {
    /// Reads and checks a manifest: format name and version, and internal consistency.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST_FILE);
        match std::fs::metadata(dir) {
            Ok(meta) if !meta.is_dir() => {
                return Err(Error::checkpoint(
                    dir,
                    format!(
                        "is {}, not a checkpoint directory",
                        crate::fs::read::describe(&meta.file_type())
                    ),
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::checkpoint(
                    dir,
                    "does not exist (no manifest.json to load)",
                ))
            }
            _ => {}
        }
        let bytes = match crate::fs::read::read_limited(&path, crate::fs::read::JSON_LIMIT) {
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::checkpoint(
                    dir,
                    "no manifest.json: not a checkpoint directory (or an unfinished save)",
                ))
            }
            other => other.map_err(super::files::damaged)?,
        };
        let has_checksum = Self::verify_checksum(dir, &bytes)?;
        let m: Manifest = serde_json::from_slice(&bytes)
            .map_err(|e| Error::checkpoint(&path, format!("unreadable manifest: {e}")))?;
        if m.format != FORMAT {
            return Err(Error::checkpoint(
                &path,
                format!("format is '{}', expected '{FORMAT}'", m.format),
            ));
        }
        if !(OLDEST_READABLE_VERSION..=FORMAT_VERSION).contains(&m.format_version) {
            return Err(Error::checkpoint(
                &path,
                format!(
                    "format version {} is not supported (this build reads \
                     {OLDEST_READABLE_VERSION} to {FORMAT_VERSION})",
                    m.format_version
                ),
            ));
        }
        if m.format_version >= 2 && !has_checksum {
            return Err(Error::checkpoint(
                dir,
                format!("{MANIFEST_CHECKSUM_FILE} is missing (format version 2 writes it)"),
            ));
        }
        if m.phases.len() != m.phase_index {
            return Err(Error::checkpoint(
                &path,
                "phase_index disagrees with the phase list",
            ));
        }
        // Every file a manifest names lies inside the checkpoint: readers join these names to the
        // checkpoint directory, and a damaged or hostile manifest must not point them elsewhere.
        let named = m.files.keys().chain(m.phases.iter().map(|p| &p.file));
        for rel in named {
            if !is_inside(rel) {
                return Err(Error::checkpoint(
                    &path,
                    format!("file name '{rel}' leaves the checkpoint directory"),
                ));
            }
        }
        m.model
            .validate()
            .map_err(|e| Error::checkpoint(&path, e.to_string()))?;
        m.train
            .validate()
            .map_err(|e| Error::checkpoint(&path, e.to_string()))?;
        Ok(m)
    }

    /// Checks `manifest.json`'s bytes against [`MANIFEST_CHECKSUM_FILE`] when that file exists;
    /// returns whether it did.
    fn verify_checksum(dir: &Path, manifest: &[u8]) -> Result<bool> {
        let path = dir.join(MANIFEST_CHECKSUM_FILE);
        // A CRC file is 8 bytes; anything much larger is damage, refused without reading it all.
        let text = match crate::fs::read::read_limited(&path, 64) {
            Ok(t) => t,
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Ok(false)
            }
            Err(e) => return Err(super::files::damaged(e)),
        };
        // Exactly as written: 8 lower-case hex digits, so that any changed byte is an error.
        let well_formed =
            text.len() == 8 && text.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        let recorded = std::str::from_utf8(&text)
            .ok()
            .filter(|_| well_formed)
            .and_then(|t| u32::from_str_radix(t, 16).ok())
            .ok_or_else(|| {
                Error::checkpoint(
                    &path,
                    "not a CRC-32 (8 lower-case hex digits): the file is damaged",
                )
            })?;
        let actual = crc32fast::hash(manifest);
        if actual != recorded {
            return Err(Error::checkpoint(
                dir,
                format!(
                    "{MANIFEST_FILE} does not match {MANIFEST_CHECKSUM_FILE} (CRC-32 {actual:08x}, \
                     recorded {recorded:08x}): the manifest or its checksum is damaged"
                ),
            ));
        }
        Ok(true)
    }

    /// Writes `manifest.json` and its checksum file into `dir`, each synced to disk. Writers call
    /// this last, after every file the manifest lists.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let json = serde_json::to_vec_pretty(self)
            .map_err(|e| Error::checkpoint(dir, format!("serialising the manifest: {e}")))?;
        write_synced(&dir.join(MANIFEST_FILE), &json)?;
        // No newline: every byte of the file is part of the value, so truncation is detected.
        let crc = format!("{:08x}", crc32fast::hash(&json));
        write_synced(&dir.join(MANIFEST_CHECKSUM_FILE), crc.as_bytes())?;
        Ok(())
    }

    /// Refuses a manifest whose model cannot be held by `stored` bytes of weight files (params
    /// plus base) at `elem_bytes` per parameter of type `dtype` (named in the error). A coarse bound, half the need, so that absurd
    /// claims fail before anything is allocated for the model; the per-tensor checks that follow
    /// are exact and name the tensor (e.g. one stored in a narrower dtype).
    pub(crate) fn check_weights_fit(
        &self,
        dir: &Path,
        stored: u64,
        elem_bytes: usize,
        dtype: &str,
    ) -> Result<()> {
        let need = self.model.weight_bytes(elem_bytes);
        if need / 2 > stored {
            return Err(Error::checkpoint(
                dir,
                format!(
                    "the manifest's model needs {need} bytes of weights ({dtype}), but \
                     params.safetensors and base.safetensors hold only {stored} bytes"
                ),
            ));
        }
        Ok(())
    }

    /// The recorded size and checksum of `file`, or an error naming the missing entry.
    pub fn file(&self, dir: &Path, file: &str) -> Result<FileInfo> {
        self.files
            .get(file)
            .copied()
            .ok_or_else(|| Error::checkpoint(dir, format!("manifest lists no file {file}")))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn named_files_must_stay_inside_the_checkpoint() {
        use super::is_inside;
        for ok in [
            "params.safetensors",
            "phases/phase-0001.safetensors",
            "./base.safetensors",
        ] {
            assert!(is_inside(ok), "{ok}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "../other/params.safetensors",
            "phases/../../x",
        ] {
            assert!(!is_inside(bad), "{bad}");
        }
    }
}
