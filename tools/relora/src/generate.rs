//! `relora generate`.

use crate::inputs;
use anyhow::Result;
use clap::Args;
use relora::checkpoint::{self, run_dir};
use relora::device::parse_device;
use relora::rng::Rng;
use relora::sample::{sample, SampleOptions};
use std::path::PathBuf;

/// Options of `relora generate`.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Checkpoint directory (or a run directory: its newest checkpoint).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Text to continue.
    #[arg(long)]
    prompt: String,
    /// Tokens to generate.
    #[arg(long, default_value_t = 200)]
    max_tokens: usize,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    /// Sample among the k most likely tokens (0: all).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Tokenizer (default: the one recorded in the checkpoint).
    #[arg(long)]
    tokenizer: Option<String>,
    /// Device: cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// Runs `relora generate`.
pub fn run(a: GenerateArgs) -> Result<()> {
    let device = parse_device(&a.device)?;
    let dir = run_dir::resolve(&a.checkpoint)?;
    let (trainer, manifest) = checkpoint::load(&dir, &device)?;
    let spec = a
        .tokenizer
        .or(manifest.tokenizer)
        .unwrap_or_else(|| "bytes".to_string());
    let tok = inputs::tokenizer(&spec)?;
    let prompt = tok.encode(&a.prompt)?;
    // Generation uses the model as a plain LLaMA would: current adapters merged in.
    let mut model = trainer.model;
    relora::model::adapters::fold_adapters(&mut model)?;
    let opts = SampleOptions {
        max_new_tokens: a.max_tokens,
        temperature: a.temperature,
        top_k: a.top_k,
    };
    let out = sample(&model, &prompt, opts, tok.eos_id(), &mut Rng::new(a.seed))?;
    println!("{}{}", a.prompt, tok.decode(&out)?);
    Ok(())
}
