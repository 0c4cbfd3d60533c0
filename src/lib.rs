//! # relora
//!
//! Training LLaMA-style language models with ReLoRA (Lialin et al., "ReLoRA: High-Rank Training
//! Through Low-Rank Updates", arXiv 2307.05695): full-rank warm start, then low-rank adapters on
//! every attention and MLP projection that are merged into the frozen weights and restarted every
//! `reset_every` steps, with a partial optimizer reset and a jagged cosine learning rate.
//!
//! The pieces, one concept per module: [`config`], [`model`], [`relora`] (the adapter layer and the
//! merge cycle), [`optim`] (AdamW with reachable state), [`schedule`], [`data`], [`trainer`],
//! [`checkpoint`] and [`export`] (the merge math shared with the converter and the C API).

#![warn(missing_docs)]

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod device;
pub mod error;
pub mod export;
pub mod ffi;
pub mod model;
pub mod ops;
pub mod optim;
pub mod relora;
pub mod rng;
pub mod run;
pub mod sample;
pub mod schedule;
pub mod trainer;

pub use config::{Mode, ModelConfig, TrainConfig};
pub use error::{Error, Result};
pub use trainer::{StepStats, Trainer};
