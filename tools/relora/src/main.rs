//! `relora`: train LLaMA-style models with ReLoRA on CPU (or CUDA), evaluate, sample and benchmark.

mod bench;
mod eval;
mod flops;
mod generate;
mod inputs;
mod matmuls;
mod plot;
mod regions;
mod report;
mod train;
mod train_flags;

use clap::{Parser, Subcommand};

// Training allocates and frees many large temporaries per step. glibc's malloc maps and unmaps
// each of them, and zeroing the fresh pages cost more than the arithmetic (measured: 2.4x slower
// steps on the small preset); mimalloc reuses them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `purge_delay` option (index in its option enum).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps freed memory mapped: the same buffer sizes come back every step, and returning them to
/// the OS meant a page fault and a zeroed huge page per buffer (measured: 85k faults and 13% of
/// step time on the 60m preset).
fn keep_freed_memory() {
    // SAFETY: sets a process-wide allocator option; valid at any time.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

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
    Train(Box<train::TrainArgs>),
    /// Evaluate a checkpoint: mean loss, perplexity and token count on a data file.
    Eval(eval::EvalArgs),
    /// Sample text from a checkpoint.
    Generate(generate::GenerateArgs),
    /// Measure training speed of full-rank vs LoRA vs ReLoRA steps.
    Bench(bench::BenchArgs),
    /// Draw training curves of several runs (eval loss by default) as one PNG chart.
    Plot(plot::PlotArgs),
}

fn main() {
    keep_freed_memory();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(a) => train::run(*a),
        Command::Eval(a) => eval::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Plot(a) => plot::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {}", relora::error::report(e.as_ref()));
        std::process::exit(1);
    }
}
