//! Checkpoints. A checkpoint is a directory:
//!
//! ```text
//! manifest.json               format + version, configs, step, phase index, RNG and data cursor,
//!                             optimizer step counts, size + CRC-32 of every file below
//! manifest.json.crc32         CRC-32 of manifest.json itself (8 hex digits; format version 2)
//! params.safetensors          current full-rank parameters (embedding, norms, lm_head, and every
//!                             projection without an adapter)
//! base.safetensors            adapted projections' weights as of the switch to adapters
//! phases/phase-NNNN.safetensors  each completed ReLoRA phase: {module}.lora_A/.lora_B/.scale
//! adapters.safetensors        the current (unmerged) adapters
//! optimizer.safetensors       {param}.exp_avg / {param}.exp_avg_sq
//! ```
//!
//! The adapted projections' current weights are not stored: they are `base + sum_k s_k B_k A_k`,
//! recomputed on load by [`crate::relora::merge_phases`], the code the trainer merged with.

pub mod files;
pub mod load;
pub mod manifest;
pub mod recognise;
pub mod run_dir;
pub mod save;
pub mod source;

pub use load::load;
pub use manifest::Manifest;
pub use save::{save, SaveExtra};
