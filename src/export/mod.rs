//! Everything that leaves or enters the trainer's own formats.
//!
//! The merge math comes first, shared by the trainer, the converter and the C API: a ReLoRA
//! model's weights are `W = W_base + sum_k s_k B_k A_k` over the completed phases in order. The
//! trainer's own merges call [`merge_delta`] too, so re-merging a checkpoint reproduces its weights
//! bit for bit.
//!
//! Around it, one submodule per job of `relora-convert`:
//! - [`hf`]: a Hugging Face Llama directory (or one `.safetensors` file) from in-memory weights
//!   ([`write_model_dir`]) or streamed from a checkpoint ([`merge_checkpoint`]);
//! - [`peft`]: the current adapter as a PEFT LoRA adapter plus its base model;
//! - [`import`]: a Hugging Face Llama directory as a checkpoint that training resumes from;
//! - [`spectrum`]: singular values of the update `W_final - W_base` per projection;
//! - [`inspect`]: what a checkpoint, model directory or safetensors file holds;
//! - [`curves`]: training curves of several runs as a PNG line chart;
//! - [`safetensors`]: the memory-mapped reader and streaming writer the others are built on,
//!   [`source`] the validated, streaming view of a checkpoint, [`tokenizer`] the tokenizer files
//!   of an export.

pub mod hf;
pub mod peft;
pub mod recognise;
pub mod tokenizer;

pub use crate::tensor_file::dtype::ExportDType;
pub use hf::{merge_checkpoint, merge_checkpoint_with, write_model_dir, HfExportOptions};
