//! `relora`: train LLaMA-style models with ReLoRA on CPU (or CUDA), evaluate, sample and benchmark.

mod bench;
mod eval;
mod generate;
mod inputs;
mod train;

use clap::{Parser, Subcommand};

/// Train LLaMA-style language models with ReLoRA (high-rank training through low-rank updates).
#[derive(Parser)]
#[command(name = "relora", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model (full, lora or relora); with no arguments, the default small model on the
    /// built-in corpus.
    Train(train::TrainArgs),
    /// Evaluate a checkpoint: mean loss, perplexity and token count on a data file.
    Eval(eval::EvalArgs),
    /// Sample text from a checkpoint.
    Generate(generate::GenerateArgs),
    /// Measure training speed of full-rank vs LoRA vs ReLoRA steps.
    Bench(bench::BenchArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(a) => train::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Bench(a) => bench::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
