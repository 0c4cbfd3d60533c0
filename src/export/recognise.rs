//! How relora recognises its own exports on disk, so that `--force` (or `overwrite`) replaces an
//! earlier export and nothing else (see [`crate::fs::output`]).
//!
//! A model or PEFT directory carries [`EXPORT_MARKER`], written last, listing every file of the
//! export; Hugging Face loaders, vLLM and llama.cpp's converter ignore it. A single
//! `.safetensors` file records its writer in its header's `__metadata__` ([`WRITER_KEY`]).

use crate::fs::output::{Claim, OutputKind, Recognise};
use crate::tensor_file::safetensors::SafetensorsFile;
use std::collections::BTreeMap;
use std::path::Path;

/// The marker file of an export directory.
pub(crate) const EXPORT_MARKER: &str = "relora-export.json";

/// The `__metadata__` key of an exported safetensors file that names its writer.
pub(crate) const WRITER_KEY: &str = "writer";

/// A Hugging Face model directory written by relora.
pub(crate) const MODEL_DIR: OutputKind = OutputKind {
    noun: "model export",
    dir: true,
    recognise: Recognise::Marker {
        file: EXPORT_MARKER,
        format: "relora-export",
    },
};

/// A PEFT adapter directory (with its base model) written by relora.
pub(crate) const PEFT_DIR: OutputKind = OutputKind {
    noun: "PEFT export",
    dir: true,
    recognise: Recognise::Marker {
        file: EXPORT_MARKER,
        format: "relora-export",
    },
};

/// A single `.safetensors` model file written by relora.
pub(crate) const MODEL_FILE: OutputKind = OutputKind {
    noun: "model export",
    dir: false,
    recognise: Recognise::Custom(single_file),
};

/// The `__metadata__` of every exported safetensors file: `format: pt` (which transformers
/// requires) and the writer.
pub fn export_metadata() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("format".to_string(), "pt".to_string()),
        (
            WRITER_KEY.to_string(),
            format!("relora {}", env!("CARGO_PKG_VERSION")),
        ),
    ])
}

fn single_file(path: &Path) -> Result<Claim, String> {
    let f = SafetensorsFile::open(path)
        .map_err(|_| "not a safetensors file relora wrote".to_string())?;
    match f.metadata().get(WRITER_KEY) {
        Some(w) if w.starts_with("relora ") => Ok(Claim::default()),
        _ => Err("a safetensors file whose header names no relora writer".into()),
    }
}
