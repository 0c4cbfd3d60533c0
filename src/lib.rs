//! # relora
//!
//! Training LLaMA-style language models with ReLoRA (Lialin et al., "ReLoRA: High-Rank Training
//! Through Low-Rank Updates", arXiv 2307.05695): full-rank warm start, then low-rank adapters on
//! every attention and MLP projection that are merged into the frozen weights and restarted every
//! `reset_every` steps, with a partial optimizer reset and a jagged cosine learning rate.
//!
//! ## The floors, from the ground up
//!
//! Each module imports only from floors below its own:
//!
//! 1. [`error`], [`rng`], [`engine`] (a trainer's engine choices);
//! 2. [`ops`] (fused kernels with their own backward), [`fs`] (regular-file reads, outputs that
//!    replace only relora's own), [`schedule`], [`train_state`] (counters, RNG streams, step
//!    statistics, the gradient-reducer hook), [`init`], [`device`], [`profile`];
//! 3. [`optim`] (AdamW with reachable state), [`data`], [`tensor_file`] (safetensors and
//!    dtypes), [`distributed`], [`plots`];
//! 4. [`config`], [`relora`] (the adaptable projection, the merge and its phases, the base
//!    weights);
//! 5. [`model`] (the LLaMA decoder and its adapter cycle);
//! 6. [`trainer`], [`sample`];
//! 7. [`checkpoint`] (save, load, run directories, the streaming source);
//! 8. [`run`] (a training run as the command line drives it), [`export`] (Hugging Face and PEFT
//!    directories);
//! 9. [`import`] (Hugging Face into a checkpoint), [`ffi`] (the C ABI, and the trainer session
//!    it shares with the cxx bridge in `bindings/cxx`: nothing in the crate depends on it);
//! 10. [`analysis`] (inspect, spectrum).
//!
//! The core (model, relora, optim, trainer, checkpoint) imports none of export, import,
//! analysis or plots.

#![warn(missing_docs)]

pub mod analysis;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod device;
pub mod distributed;
pub mod engine;
pub mod error;
pub mod export;
pub mod ffi;
pub mod fs;
pub mod import;
pub mod init;
pub mod model;
pub mod ops;
pub mod optim;
pub mod plots;
pub mod profile;
pub mod relora;
pub mod rng;
pub mod run;
pub mod sample;
pub mod schedule;
pub mod tensor_file;
pub mod train_state;
pub mod trainer;

pub use config::{Mode, ModelConfig, TrainConfig};
pub use error::{Error, Result};
pub use trainer::{StepStats, Trainer};
