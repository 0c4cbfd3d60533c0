//! The checkpoint manifest: a versioned JSON document naming everything needed to resume.

use super::files::FileInfo;
use crate::config::{ModelConfig, TrainConfig};
use crate::error::{Error, Result};
use crate::trainer::{TrainerCounters, TrainerRngs};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// The value of `format` in every manifest.
pub const FORMAT: &str = "relora-checkpoint";
/// The manifest layout this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The manifest's file name inside a checkpoint directory.
pub const MANIFEST_FILE: &str = "manifest.json";

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
    /// The tokenizer spec ("bytes", "gpt2" or a tokenizer.json path), if known.
    pub tokenizer: Option<String>,
    /// Adam step count per parameter name.
    pub optimizer_steps: BTreeMap<String, u64>,
    /// Completed phases, in merge order.
    pub phases: Vec<PhaseEntry>,
    /// Size and checksum of each file, by path relative to the checkpoint directory.
    pub files: BTreeMap<String, FileInfo>,
}

impl Manifest {
    /// Reads and checks a manifest: format name and version, and internal consistency.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::checkpoint(
                dir,
                "no manifest.json: not a checkpoint directory (or an unfinished save)",
            ),
            _ => Error::io(&path, e),
        })?;
        let m: Manifest = serde_json::from_str(&text)
            .map_err(|e| Error::checkpoint(&path, format!("unreadable manifest: {e}")))?;
        if m.format != FORMAT {
            return Err(Error::checkpoint(
                &path,
                format!("format is '{}', expected '{FORMAT}'", m.format),
            ));
        }
        if m.format_version != FORMAT_VERSION {
            return Err(Error::checkpoint(
                &path,
                format!(
                    "format version {} is not supported (this build reads {FORMAT_VERSION})",
                    m.format_version
                ),
            ));
        }
        if m.phases.len() != m.phase_index {
            return Err(Error::checkpoint(
                &path,
                "phase_index disagrees with the phase list",
            ));
        }
        m.model
            .validate()
            .map_err(|e| Error::checkpoint(&path, e.to_string()))?;
        m.train
            .validate()
            .map_err(|e| Error::checkpoint(&path, e.to_string()))?;
        Ok(m)
    }

    /// The recorded size and checksum of `file`, or an error naming the missing entry.
    pub fn file(&self, dir: &Path, file: &str) -> Result<FileInfo> {
        self.files
            .get(file)
            .copied()
            .ok_or_else(|| Error::checkpoint(dir, format!("manifest lists no file {file}")))
    }
}
