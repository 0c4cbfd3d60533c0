//! What a checkpoint, a Hugging Face model directory or a safetensors file holds, read from the
//! manifest and the safetensors headers only (fast on any size), or with every checksum and
//! shape verified on request.

use crate::checkpoint::manifest::{Manifest, MANIFEST_FILE};
use crate::checkpoint::source::CheckpointSource;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::import::{read_hf_config, HfWeights};
use crate::tensor_file::safetensors::SafetensorsFile;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// One tensor of a file.
#[derive(Clone, Debug, Serialize)]
pub struct TensorRow {
    /// Name.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Safetensors dtype name.
    pub dtype: String,
    /// Data size in bytes.
    pub bytes: u64,
}

/// A safetensors file's header.
#[derive(Clone, Debug, Serialize)]
pub struct FileReport {
    /// Path (relative to the inspected directory for directories).
    pub file: String,
    /// File size in bytes.
    pub bytes: u64,
    /// `__metadata__`.
    pub metadata: BTreeMap<String, String>,
    /// The tensors, by name.
    pub tensors: Vec<TensorRow>,
}

/// One completed phase.
#[derive(Clone, Debug, Serialize)]
pub struct PhaseRow {
    /// 1-based index.
    pub index: usize,
    /// Optimizer step of its merge.
    pub step: u64,
    /// File inside the checkpoint.
    pub file: String,
}

/// What a checkpoint holds.
#[derive(Clone, Debug, Serialize)]
pub struct CheckpointReport {
    /// Manifest format version.
    pub format_version: u32,
    /// The program that wrote it.
    pub writer: String,
    /// Optimizer steps completed.
    pub step: u64,
    /// Training mode.
    pub mode: String,
    /// Whether adapters are attached.
    pub adapters_attached: bool,
    /// Adapter rank and alpha, and the adapted projections.
    pub lora_rank: usize,
    /// Adapter alpha.
    pub lora_alpha: f64,
    /// Projection names that carry adapters.
    pub target_modules: Vec<String>,
    /// Completed phases.
    pub phases: Vec<PhaseRow>,
    /// Tokenizer spec.
    pub tokenizer: Option<String>,
    /// The model's shape.
    pub model: ModelConfig,
    /// Total parameters (without adapters).
    pub parameters: usize,
    /// Whether every checksum, header and shape was verified.
    pub verified: bool,
    /// Every listed safetensors file.
    pub files: Vec<FileReport>,
}

/// What a Hugging Face model directory holds.
#[derive(Clone, Debug, Serialize)]
pub struct ModelDirReport {
    /// The parsed `config.json`, when it describes a Llama this crate can load.
    pub model: Option<ModelConfig>,
    /// Why `config.json` could not be used, otherwise.
    pub config_error: Option<String>,
    /// The weight files.
    pub files: Vec<FileReport>,
}

/// The result of inspecting a path.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Inspection {
    /// A relora checkpoint directory.
    Checkpoint {
        /// The directory.
        path: String,
        /// Its contents.
        report: Box<CheckpointReport>,
    },
    /// A Hugging Face model directory.
    ModelDir {
        /// The directory.
        path: String,
        /// Its contents.
        report: ModelDirReport,
    },
    /// A single safetensors file.
    File {
        /// The file.
        path: String,
        /// Its header.
        report: FileReport,
    },
}

fn file_report(f: &SafetensorsFile, shown: &str) -> FileReport {
    FileReport {
        file: shown.to_string(),
        bytes: f.len(),
        metadata: f.metadata().clone(),
        tensors: f
            .tensors()
            .into_iter()
            .map(|t| TensorRow {
                name: t.name.clone(),
                shape: t.shape.clone(),
                dtype: t.dtype.name().to_string(),
                bytes: t.bytes(),
            })
            .collect(),
    }
}

/// Inspects `path`: a checkpoint directory (has `manifest.json`), a Hugging Face model
/// directory (has `config.json`), or a safetensors file. `verify` checks a checkpoint's
/// checksums (every file) and every header against the model (as `merge` would) instead of
/// headers only.
pub fn inspect(path: &Path, verify: bool) -> Result<Inspection> {
    let shown = path.display().to_string();
    // `exists`, not `is_file`: a manifest that is a FIFO or a device is a damaged checkpoint,
    // refused by the reader with the file named, not a reason to look for something else.
    if path.is_dir() && path.join(MANIFEST_FILE).exists() {
        let m = Manifest::read(path)?;
        if verify {
            // The merge's own checks (headers against the model), then the size and CRC-32 of
            // every listed file, including those a merge does not read (the optimizer state).
            CheckpointSource::open(path)?;
            for rel in m.files.keys() {
                crate::checkpoint::source::verify_file(path, &m, rel)?;
            }
        }
        let mut files = Vec::new();
        // Tensor files only (an imported checkpoint also lists its tokenizer.json).
        for rel in m.files.keys().filter(|r| r.ends_with(".safetensors")) {
            let f = SafetensorsFile::open(&path.join(rel))?;
            files.push(file_report(&f, rel));
        }
        let t = &m.train;
        let report = CheckpointReport {
            format_version: m.format_version,
            writer: m.writer.clone(),
            step: m.counters.step,
            mode: t.mode.to_string(),
            adapters_attached: m.adapters_attached,
            lora_rank: t.lora_rank,
            lora_alpha: t.lora_alpha,
            target_modules: t.target_modules.clone(),
            phases: m
                .phases
                .iter()
                .map(|p| PhaseRow {
                    index: p.index,
                    step: p.step,
                    file: p.file.clone(),
                })
                .collect(),
            tokenizer: m.tokenizer.clone(),
            parameters: m.model.num_parameters(),
            model: m.model.clone(),
            verified: verify,
            files,
        };
        return Ok(Inspection::Checkpoint {
            path: shown,
            report: Box::new(report),
        });
    }
    if path.is_dir() && path.join("config.json").exists() {
        let (model, config_error) = match read_hf_config(&path.join("config.json")) {
            Ok(c) => (Some(c), None),
            Err(e) => (None, Some(e.to_string())),
        };
        let weights = HfWeights::open(path)?;
        let mut files: Vec<FileReport> = Vec::new();
        for name in weights.names() {
            if let Some(f) = weights.file_of(&name) {
                let rel = f
                    .path()
                    .file_name()
                    .map(|n| n.to_string_lossy().to_string())
                    .unwrap_or_default();
                if !files.iter().any(|r| r.file == rel) {
                    files.push(file_report(f, &rel));
                }
            }
        }
        files.sort_by(|a, b| a.file.cmp(&b.file));
        return Ok(Inspection::ModelDir {
            path: shown,
            report: ModelDirReport {
                model,
                config_error,
                files,
            },
        });
    }
    if path.is_dir() {
        return Err(Error::checkpoint(
            path,
            "is neither a checkpoint (no manifest.json) nor a model directory (no config.json)",
        ));
    }
    let f = SafetensorsFile::open(path)?;
    Ok(Inspection::File {
        report: file_report(&f, &shown),
        path: shown,
    })
}

fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.2} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} kB", b / 1e3)
    } else {
        format!("{bytes} B")
    }
}

fn write_files(out: &mut String, files: &[FileReport]) {
    for f in files {
        let _ = writeln!(
            out,
            "\n{}  ({}, {} tensors{})",
            f.file,
            human(f.bytes),
            f.tensors.len(),
            if f.metadata.is_empty() {
                String::new()
            } else {
                format!(", metadata {:?}", f.metadata)
            }
        );
        for t in &f.tensors {
            let _ = writeln!(
                out,
                "  {:<56} {:<5} {:<16} {:>10}",
                t.name,
                t.dtype,
                format!("{:?}", t.shape),
                human(t.bytes)
            );
        }
    }
}

fn write_model(out: &mut String, c: &ModelConfig) {
    let _ = writeln!(
        out,
        "model: vocab {}, hidden {}, intermediate {}, layers {}, heads {} (kv {}), head_dim {}, \
         max positions {}, rope_theta {}, rms_norm_eps {}, tied embeddings {}; {} parameters",
        c.vocab_size,
        c.hidden_size,
        c.intermediate_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.kv_heads(),
        c.head_dim(),
        c.max_position_embeddings,
        c.rope_theta,
        c.rms_norm_eps,
        c.tie_word_embeddings,
        c.num_parameters()
    );
}

impl Inspection {
    /// A human-readable report.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        match self {
            Inspection::Checkpoint { path, report: r } => {
                let _ = writeln!(
                    out,
                    "checkpoint {path}\nformat version {}, written by {}{}",
                    r.format_version,
                    r.writer,
                    if r.verified {
                        "; checksums and shapes verified"
                    } else {
                        ""
                    }
                );
                let _ = writeln!(
                    out,
                    "step {}, mode {}, adapters {}",
                    r.step,
                    r.mode,
                    if r.adapters_attached {
                        format!(
                            "attached (rank {}, alpha {}, on {})",
                            r.lora_rank,
                            r.lora_alpha,
                            r.target_modules.join(",")
                        )
                    } else {
                        "not attached".into()
                    }
                );
                let _ = writeln!(
                    out,
                    "tokenizer {}",
                    r.tokenizer.as_deref().unwrap_or("(not recorded)")
                );
                write_model(&mut out, &r.model);
                let _ = writeln!(out, "{} completed phases", r.phases.len());
                for p in &r.phases {
                    let _ = writeln!(
                        out,
                        "  phase {:>4} at step {:>8}: {}",
                        p.index, p.step, p.file
                    );
                }
                write_files(&mut out, &r.files);
            }
            Inspection::ModelDir { path, report } => {
                let _ = writeln!(out, "Hugging Face model directory {path}");
                match (&report.model, &report.config_error) {
                    (Some(c), _) => write_model(&mut out, c),
                    (None, Some(e)) => {
                        let _ = writeln!(out, "config.json: {e}");
                    }
                    _ => {}
                }
                write_files(&mut out, &report.files);
            }
            Inspection::File { path, report } => {
                let _ = writeln!(out, "safetensors file {path}");
                write_files(&mut out, std::slice::from_ref(report));
            }
        }
        out
    }
}
