//! `relora eval`.

use crate::inputs;
use anyhow::Result;
use clap::Args;
use relora::checkpoint::{self, run_dir};
use relora::data::batcher::eval_batches;
use relora::device::parse_device;
use std::path::PathBuf;

/// Options of `relora eval`.
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Checkpoint directory (or a run directory: its newest checkpoint).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Data to score: "builtin-eval", a text file or a token file.
    #[arg(long)]
    data: String,
    /// Tokenizer (default: the one recorded in the checkpoint).
    #[arg(long)]
    tokenizer: Option<String>,
    /// Sequence length (default: the training sequence length).
    #[arg(long)]
    seq_len: Option<usize>,
    /// Sequences per batch.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Score at most this many batches (default: all).
    #[arg(long)]
    max_batches: Option<usize>,
    /// Device: cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// CPU threads.
    #[arg(long)]
    threads: Option<usize>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// Runs `relora eval`.
pub fn run(a: EvalArgs) -> Result<()> {
    inputs::set_threads(a.threads);
    inputs::on_compute_pool(move || run_on_pool(a))
}

fn run_on_pool(a: EvalArgs) -> Result<()> {
    let device = parse_device(&a.device)?;
    let dir = run_dir::resolve(&a.checkpoint)?;
    let (trainer, manifest) = checkpoint::load(&dir, &device)?;
    let spec = a
        .tokenizer
        .or(manifest.tokenizer)
        .unwrap_or_else(|| "bytes".to_string());
    let tok = inputs::tokenizer(&spec)?;
    let tokens = inputs::tokens(&a.data, &tok)?;
    anyhow::ensure!(
        tokens.len() >= 2,
        "data '{}' has fewer than 2 tokens",
        a.data
    );
    let seq = a
        .seq_len
        .unwrap_or(trainer.config.seq_len)
        .min(tokens.len() - 1);
    anyhow::ensure!(
        a.batch_size > 0 && seq > 0,
        "batch size and sequence length must be positive"
    );
    let batches = eval_batches(&tokens, a.batch_size, seq, a.max_batches);
    let r = trainer.eval(&batches)?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "checkpoint": dir.display().to_string(),
                "step": trainer.step_count(),
                "loss": r.loss,
                "perplexity": r.perplexity,
                "tokens": r.tokens,
            })
        );
    } else {
        println!(
            "checkpoint {} (step {}): loss {:.4}, perplexity {:.3}, {} tokens",
            dir.display(),
            trainer.step_count(),
            r.loss,
            r.perplexity,
            r.tokens
        );
    }
    Ok(())
}
