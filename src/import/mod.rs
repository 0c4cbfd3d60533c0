//! Hugging Face models into relora: the reader of a Llama directory ([`hf_reader`]) and the
//! import that turns one into a checkpoint to continue pretraining from ([`to_checkpoint`]).

pub mod hf_reader;
pub mod to_checkpoint;

pub use hf_reader::{read_hf_config, HfWeights};
pub use to_checkpoint::{import_hf, ImportOptions, ImportReport};
