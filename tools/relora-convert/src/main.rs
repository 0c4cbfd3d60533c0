//! `relora-convert`: take ReLoRA checkpoints to the Hugging Face ecosystem and back.
//!
//! - `merge`: checkpoint -> Hugging Face Llama directory (or one .safetensors file)
//! - `inspect`: what a checkpoint, model directory or safetensors file holds
//! - `peft`: the current adapter as a PEFT LoRA adapter, with its base model
//! - `import`: Hugging Face Llama directory -> checkpoint for continued pretraining
//! - `spectrum`: singular values of each projection's update, as a table, JSON or PNG
//! - `synth`: a synthetic checkpoint with random weights, for benchmarks

mod synth;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use relora::analysis::inspect::inspect;
use relora::analysis::spectrum::{histogram_png, spectrum, table, Spectrum};
use relora::checkpoint::run_dir;
use relora::config::TrainConfig;
use relora::export::hf::parse_size;
use relora::export::peft::write_peft;
use relora::export::{merge_checkpoint_with, ExportDType, HfExportOptions};
use relora::import::{import_hf, ImportOptions};
use std::path::{Path, PathBuf};
use std::time::Instant;

// A merge allocates and frees tensors of the same few sizes hundreds of times. glibc's malloc maps
// and unmaps each, paying a page fault and a zeroed page per 4 KiB every time (measured: a third
// of a 1B merge's time); mimalloc reuses them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `purge_delay` option (index in its option enum).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps freed memory mapped, so the next tensor of the same size reuses its pages instead of
/// faulting in freshly zeroed ones.
fn keep_freed_memory() {
    // SAFETY: sets a process-wide allocator option; valid at any time.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

/// Convert ReLoRA checkpoints: merge adapter phases into Hugging Face models, export PEFT
/// adapters, import Hugging Face Llamas for continued pretraining, and analyse update spectra.
#[derive(Parser)]
#[command(name = "relora-convert", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Merge a checkpoint (W = W_base + sum_k s_k B_k A_k over its phases, then the current
    /// adapter) into a Hugging Face Llama directory, or one file if OUT ends in .safetensors.
    Merge(MergeArgs),
    /// Show a checkpoint's step, phases, config and tensors, a model directory's tensors, or a
    /// safetensors file's header.
    Inspect(InspectArgs),
    /// Export the current (unmerged) adapter as a PEFT LoRA adapter, with the base model it
    /// applies to in OUT/base.
    Peft(PeftArgs),
    /// Turn a Hugging Face Llama directory into a checkpoint that `relora train --resume`
    /// continues with ReLoRA.
    Import(ImportArgs),
    /// Singular values of each projection's update W_final - W_base, as a table, JSON, or a
    /// PNG histogram; --against compares two runs.
    Spectrum(SpectrumArgs),
    /// Write a checkpoint with random weights and several phases (for benchmarking `merge`).
    Synth(synth::SynthArgs),
}

/// Options shared by the commands that write Hugging Face models.
#[derive(Args, Debug)]
struct WriteOpts {
    /// Element type of the written weights: f32, bf16 or f16 (merging is always in fp32).
    #[arg(long, default_value = "f32")]
    dtype: ExportDType,
    /// Split the weights into shards of at most this size (e.g. 2GB, 500MB) with a
    /// model.safetensors.index.json.
    #[arg(long, value_name = "SIZE")]
    max_shard_size: Option<String>,
    /// Replace OUT if it exists.
    #[arg(long)]
    force: bool,
}

impl WriteOpts {
    fn options(&self) -> Result<HfExportOptions> {
        Ok(HfExportOptions {
            dtype: self.dtype,
            max_shard_bytes: self.max_shard_size.as_deref().map(parse_size).transpose()?,
            force: self.force,
        })
    }
}

#[derive(Args, Debug)]
struct MergeArgs {
    /// Checkpoint directory, or a run directory (its newest checkpoint).
    ckpt: PathBuf,
    /// Output: a directory for a Hugging Face model, or a file ending in .safetensors.
    out: PathBuf,
    /// Stop after phase N: projections as they stood right after the N-th merge (the current
    /// adapter left out; other tensors are current). 0 gives the base.
    #[arg(long, value_name = "N")]
    upto_phase: Option<usize>,
    /// Tokenizer to export instead of the checkpoint's: bytes, gpt2, or a tokenizer.json path.
    #[arg(long)]
    tokenizer: Option<String>,
    #[command(flatten)]
    write: WriteOpts,
}

#[derive(Args, Debug)]
struct InspectArgs {
    /// A checkpoint or run directory, a Hugging Face model directory, or a .safetensors file.
    path: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Also verify a checkpoint's checksums and every tensor's shape and dtype.
    #[arg(long)]
    verify: bool,
}

#[derive(Args, Debug)]
struct PeftArgs {
    /// Checkpoint directory (with adapters attached), or a run directory.
    ckpt: PathBuf,
    /// Output directory: adapter_model.safetensors, adapter_config.json and base/.
    out: PathBuf,
    #[command(flatten)]
    write: WriteOpts,
}

#[derive(Args, Debug)]
struct ImportArgs {
    /// Hugging Face Llama directory (config.json and model.safetensors or shards).
    hf_dir: PathBuf,
    /// Checkpoint directory to create.
    ckpt: PathBuf,
    /// JSON file of training options for the continued run (field names as in --set).
    #[arg(long)]
    train_config: Option<PathBuf>,
    /// A training option as KEY=VALUE (repeatable), e.g. --set steps=2000 --set lr=5e-4.
    /// Defaults are relora train's, except warmup_full_steps=0 (adapters from the first step).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Tokenizer spec to record (bytes, gpt2 or a path); default: the directory's tokenizer.json.
    #[arg(long)]
    tokenizer: Option<String>,
    /// Replace CKPT if it exists.
    #[arg(long)]
    force: bool,
}

#[derive(Args, Debug)]
struct SpectrumArgs {
    /// Checkpoint (or run) directory to analyse.
    ckpt: PathBuf,
    /// Another run's checkpoint to show side by side (e.g. LoRA against ReLoRA); repeatable,
    /// up to seven.
    #[arg(long, value_name = "CKPT2")]
    against: Vec<PathBuf>,
    /// Measure CKPT's update from this checkpoint's merged weights instead of CKPT's own base
    /// (needed for full-rank runs, which have no base).
    #[arg(long, value_name = "REF")]
    from: Option<PathBuf>,
    /// Like --from, for the --against runs: the Nth --against-from goes with the Nth --against;
    /// `-` keeps that run's own base.
    #[arg(long, value_name = "REF2")]
    against_from: Vec<PathBuf>,
    /// Write a PNG histogram of all singular values.
    #[arg(long, value_name = "FILE")]
    png: Option<PathBuf>,
    /// Histogram bins.
    #[arg(long, default_value_t = 40)]
    bins: usize,
    /// Logarithmic x axis: five decades below the largest singular value.
    #[arg(long)]
    log: bool,
    /// Print JSON (every singular value) instead of the table.
    #[arg(long)]
    json: bool,
}

/// A checkpoint directory itself, or a run directory's newest checkpoint.
fn resolve(path: &Path) -> Result<PathBuf> {
    if path.is_dir() && !path.join("manifest.json").exists() && path.join("checkpoints").is_dir() {
        return Ok(run_dir::resolve(path)?);
    }
    Ok(path.to_path_buf())
}

fn merge(a: MergeArgs) -> Result<()> {
    let ckpt = resolve(&a.ckpt)?;
    let opts = a.write.options()?;
    let started = Instant::now();
    let manifest = relora::checkpoint::Manifest::read(&ckpt)?;
    if a.tokenizer.is_none() && manifest.tokenizer.is_none() && !is_file_out(&a.out) {
        eprintln!(
            "warning: the checkpoint records no tokenizer; the directory will have no \
             tokenizer files (pass --tokenizer)"
        );
    }
    merge_checkpoint_with(&ckpt, &a.out, a.upto_phase, a.tokenizer.as_deref(), &opts)
        .with_context(|| format!("merging {}", ckpt.display()))?;
    let phases = a.upto_phase.map_or_else(
        || format!("all {} phases + current adapter", manifest.phases.len()),
        |n| format!("phases 1..={n}"),
    );
    eprintln!(
        "wrote {} ({}, {}; step {}) in {:.1}s",
        a.out.display(),
        opts.dtype,
        phases,
        manifest.counters.step,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn is_file_out(p: &Path) -> bool {
    relora::export::hf::is_single_file(p)
}

fn run_inspect(a: InspectArgs) -> Result<()> {
    let path = resolve(&a.path)?;
    let report =
        inspect(&path, a.verify).with_context(|| format!("inspecting {}", path.display()))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.to_text());
    }
    Ok(())
}

fn peft(a: PeftArgs) -> Result<()> {
    let ckpt = resolve(&a.ckpt)?;
    let opts = a.write.options()?;
    write_peft(&ckpt, &a.out, &opts).with_context(|| format!("exporting {}", ckpt.display()))?;
    eprintln!(
        "wrote the adapter to {} and its base model to {}",
        a.out.display(),
        a.out.join(relora::export::peft::BASE_DIR).display()
    );
    Ok(())
}

fn import(a: ImportArgs) -> Result<()> {
    let mut opts = ImportOptions::default();
    if let Some(p) = &a.train_config {
        opts.train = TrainConfig::from_file(p)?;
    }
    for kv in &a.set {
        let Some((k, v)) = kv.split_once('=') else {
            bail!("--set expects KEY=VALUE, got '{kv}'");
        };
        opts.train.set(k.trim(), v)?;
    }
    opts.tokenizer = a.tokenizer;
    opts.force = a.force;
    let report = import_hf(&a.hf_dir, &a.ckpt, &opts)
        .with_context(|| format!("importing {}", a.hf_dir.display()))?;
    eprintln!(
        "imported {} tensors ({}) into {}; {} parameters; tokenizer {}",
        report.tensors,
        report.source_dtypes.join(", "),
        a.ckpt.display(),
        report.config.num_parameters(),
        report
            .tokenizer
            .as_deref()
            .unwrap_or("(none: pass --tokenizer to relora train)")
    );
    for s in &report.skipped {
        eprintln!("skipped {s}");
    }
    eprintln!(
        "continue with: relora train --resume {} --data <your data>",
        a.ckpt.display()
    );
    Ok(())
}

fn run_spectrum(a: SpectrumArgs) -> Result<()> {
    let mut runs: Vec<Spectrum> = Vec::new();
    let ckpt = resolve(&a.ckpt)?;
    runs.push(
        spectrum(&ckpt, a.from.as_deref())
            .with_context(|| format!("spectrum of {}", ckpt.display()))?,
    );
    if a.against_from.len() > a.against.len() {
        bail!(
            "{} --against-from for {} --against: each --against-from goes with one --against",
            a.against_from.len(),
            a.against.len()
        );
    }
    for (k, b) in a.against.iter().enumerate() {
        let b = resolve(b)?;
        let from = a
            .against_from
            .get(k)
            .filter(|p| p.as_os_str() != "-")
            .map(PathBuf::as_path);
        runs.push(spectrum(&b, from).with_context(|| format!("spectrum of {}", b.display()))?);
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&runs)?);
    } else {
        print!("{}", table(&runs));
    }
    if let Some(p) = &a.png {
        histogram_png(&runs, p, a.bins, a.log)?;
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}

fn main() {
    keep_freed_memory();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Merge(a) => merge(a),
        Command::Inspect(a) => run_inspect(a),
        Command::Peft(a) => peft(a),
        Command::Import(a) => import(a),
        Command::Spectrum(a) => run_spectrum(a),
        Command::Synth(a) => synth::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {}", relora::error::report(e.as_ref()));
        std::process::exit(1);
    }
}
