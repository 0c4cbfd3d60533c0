//! `relora bench`: tokens/s and peak memory of full-rank, LoRA and ReLoRA-phase training steps
//! for one model size, each mode in its own child process so peak RSS is per mode.

use crate::{flops, inputs, matmuls, regions};
use anyhow::{bail, Context, Result};
use clap::Args;
use relora::config::{Mode, ModelConfig, TrainConfig};
use relora::data::batcher::Batcher;
use relora::device::parse_device;
use relora::engine::Engine;
use relora::fs::output::{Claim, OutputKind, Recognise};
use relora::Trainer;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Instant;

/// Options of `relora bench`.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Model preset.
    #[arg(long, default_value = "small")]
    preset: String,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Adapter rank.
    #[arg(long, default_value_t = 32)]
    rank: usize,
    /// Steps between merges, to amortise the merge + reset cost over a cycle.
    #[arg(long, default_value_t = 100)]
    reset_every: u64,
    /// Timed steps per mode (the median is reported).
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Untimed warm-up steps per mode.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// CPU threads.
    #[arg(long)]
    threads: Option<usize>,
    /// Device: cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Let CUDA f32 matmuls use TF32 tensor cores.
    #[arg(long)]
    tf32: bool,
    /// Mixed precision: run matmuls in this dtype ("bf16") with fp32 masters.
    #[arg(long, default_value = "")]
    compute_dtype: String,
    /// Use candle's composed operations instead of relora's fused kernels, to measure what the
    /// kernels buy.
    #[arg(long)]
    composed_ops: bool,
    /// Train every decoder layer on candle's autograd graph instead of as one node with a
    /// hand-chained backward, to measure what the layer nodes buy.
    #[arg(long)]
    graph_layers: bool,
    /// On CUDA, run the AdamW update with launches per tensor instead of one grouped launch for
    /// all parameters, to measure what grouping buys.
    #[arg(long)]
    per_tensor_optimizer: bool,
    /// In bf16, round the products the model keeps in f32 to bf16 first (candle's matmul and a
    /// cast) instead of keeping cuBLAS's f32 sums, to measure what that buys.
    #[arg(long)]
    rounded_products: bool,
    /// Run each adapted projection's adapter as separate products (x Aᵀ, its up-projection, and
    /// their input gradient) instead of one product on the effective weight W + s B A, to
    /// measure what the effective weight buys.
    #[arg(long)]
    separate_adapter_products: bool,
    /// Time named regions of the step (each layer's projections, attention, norms; the loss; the
    /// optimizer) and print where a step goes. Waits for the device around every region, so
    /// the step itself is slower: take tokens/s from a run without it.
    #[arg(long)]
    profile: bool,
    /// Tokenizer ("bytes": 258 tokens, "gpt2": 50257), which sets the vocabulary size.
    #[arg(long, default_value = "bytes")]
    tokenizer: String,
    /// Modes to run, comma-separated.
    #[arg(long, default_value = "full,lora,relora")]
    modes: String,
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Instead of training steps, time each matmul of a step alone on its exact shape and
    /// layout (`--steps` products each, the median kept), to compare the matmul library with
    /// PyTorch's on the same products (`bench/compare.py --matmuls`).
    #[arg(long)]
    matmuls: bool,
    /// Internal: run one mode in this process and print its JSON.
    #[arg(long, hide = true)]
    single: Option<Mode>,
}

/// One mode's measurements.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ModeResult {
    mode: String,
    tokens_per_step: usize,
    median_step_ms: f64,
    min_step_ms: f64,
    tokens_per_s: f64,
    merge_reset_ms: Option<f64>,
    forward_ms: f64,
    backward_ms: f64,
    optimizer_ms: f64,
    tokens_per_s_amortised: f64,
    trainable_params: usize,
    optimizer_state_bytes: usize,
    /// Bytes of the gradients a step holds (one per trainable parameter).
    gradient_bytes: usize,
    peak_rss_mib: f64,
    /// Matmul FLOPs per token of a step in this mode (see `flops::per_token`).
    flops_per_token: f64,
    /// Achieved model matmul rate: `flops_per_token * tokens_per_s`.
    model_gflops: f64,
    /// With `--profile`: each region's milliseconds and calls per timed step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    profile: Option<regions::StepProfile>,
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn run_single(a: &BenchArgs, mode: Mode) -> Result<ModeResult> {
    let device = parse_device(&a.device)?;
    relora::device::set_tf32(a.tf32);
    let mut model = ModelConfig::preset(&a.preset)?;
    let tok = inputs::tokenizer(&a.tokenizer)?;
    model.vocab_size = tok.vocab_size();
    model.max_position_embeddings = model.max_position_embeddings.max(a.seq_len);
    let cfg = TrainConfig {
        mode,
        steps: 1_000_000,
        batch_size: a.batch_size,
        seq_len: a.seq_len,
        warmup_steps: 10,
        // Measure the adapter phase itself: no warm start.
        warmup_full_steps: 0,
        reset_every: a.reset_every.max(2),
        restart_warmup_steps: 1,
        lora_rank: a.rank,
        lora_alpha: a.rank as f64,
        compute_dtype: a.compute_dtype.clone(),
        // The trainer's own engine choices: what `relora train --set` and the C API set too.
        engine: Engine {
            fused_kernels: !a.composed_ops,
            layer_nodes: !a.graph_layers,
            grouped_updates: !a.per_tensor_optimizer,
            widening_products: !a.rounded_products,
            effective_weights: !a.separate_adapter_products,
        },
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(&model, &cfg, &device)?;
    let tokens = inputs::tokens("builtin", &tok)?;
    let mut batcher = Batcher::new(tokens, a.batch_size, a.seq_len, 1)?;
    relora::profile::set_profiling(a.profile);
    let mut times = Vec::new();
    let (mut fwd, mut bwd, mut opt) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..a.warmup + a.steps {
        let b = batcher.next_batch();
        if i == a.warmup {
            // Only the timed steps count.
            relora::profile::take_regions();
        }
        let t0 = Instant::now();
        let stats = trainer.step(std::slice::from_ref(&b))?;
        if i >= a.warmup {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
            fwd.push(stats.timings.forward_ms);
            bwd.push(stats.timings.backward_ms);
            opt.push(stats.timings.optimizer_ms);
        }
    }
    let profile = a
        .profile
        .then(|| regions::StepProfile::new(relora::profile::take_regions(), &times));
    relora::profile::set_profiling(false);
    let merge_reset_ms = if mode == Mode::Relora {
        let t0 = Instant::now();
        trainer.merge_and_reset()?;
        Some(t0.elapsed().as_secs_f64() * 1e3)
    } else {
        None
    };
    let tokens_per_step = a.batch_size * a.seq_len;
    let trainable = trainer.model.trainable_params();
    let trainable_params: usize = trainable.iter().map(|(_, v)| v.elem_count()).sum();
    let gradient_bytes: usize = trainable
        .iter()
        .map(|(_, v)| v.elem_count() * v.dtype().size_in_bytes())
        .sum();
    let fpt = flops::per_token(&model, mode, a.seq_len, a.rank);
    let med = median(&mut times);
    let tokens_per_s = tokens_per_step as f64 / (med / 1e3);
    let cycle = a.reset_every.max(2) as f64;
    let amortised = match merge_reset_ms {
        Some(m) => tokens_per_step as f64 * cycle / ((med * cycle + m) / 1e3),
        None => tokens_per_s,
    };
    Ok(ModeResult {
        mode: mode.to_string(),
        tokens_per_step,
        median_step_ms: med,
        min_step_ms: times.iter().cloned().fold(f64::INFINITY, f64::min),
        tokens_per_s,
        merge_reset_ms,
        forward_ms: median(&mut fwd),
        backward_ms: median(&mut bwd),
        optimizer_ms: median(&mut opt),
        tokens_per_s_amortised: amortised,
        trainable_params,
        optimizer_state_bytes: trainer.optimizer().state_bytes(),
        gradient_bytes,
        peak_rss_mib: peak_rss_mib(),
        flops_per_token: fpt,
        model_gflops: fpt * tokens_per_s / 1e9,
        profile,
    })
}

/// `relora bench --matmuls`: the step's products timed one by one.
fn run_matmuls(a: &BenchArgs) -> Result<()> {
    let device = parse_device(&a.device)?;
    let mut model = ModelConfig::preset(&a.preset)?;
    model.vocab_size = inputs::tokenizer(&a.tokenizer)?.vocab_size();
    let mut products = matmuls::step_products(&model, a.seq_len * a.batch_size, a.rank);
    matmuls::time_products(&mut products, &device, a.steps.max(1))?;
    print_header(
        a,
        &format!(
            "{} rows (seq {} x batch {})",
            a.seq_len * a.batch_size,
            a.seq_len,
            a.batch_size
        ),
    );
    matmuls::print_table(&products);
    if let Some(path) = &a.json {
        let doc = serde_json::json!({
            "tool": BENCH_TOOL, "preset": a.preset, "seq_len": a.seq_len,
            "batch_size": a.batch_size, "rank": a.rank, "threads": a.threads,
            "device": a.device, "cpu": cpu_model(), "products": products,
        });
        let text = serde_json::to_string_pretty(&doc)?;
        relora::fs::output::write_file_output(path, &BENCH_JSON, true, text.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The first line of a report: the configuration (`shape` describes the batch) and the machine.
fn print_header(a: &BenchArgs, shape: &str) {
    println!(
        "preset {} | {shape} | rank {} | threads {} | {} | {}",
        a.preset,
        a.rank,
        a.threads
            .map(|t| t.to_string())
            .unwrap_or_else(|| "all".into()),
        a.device,
        cpu_model()
    );
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1).map(|v| v.trim().to_string()))
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Runs `relora bench`.
pub fn run(a: BenchArgs) -> Result<()> {
    inputs::set_threads(a.threads);
    if let Some(mode) = a.single {
        let r = inputs::on_compute_pool(|| run_single(&a, mode))?;
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    if a.matmuls {
        return inputs::on_compute_pool(|| run_matmuls(&a));
    }
    // The machine's matmul rate, measured in this run, for the utilisation column.
    relora::device::set_tf32(a.tf32);
    let gemm_dtype = match a.compute_dtype.as_str() {
        "bf16" => candle_core::DType::BF16,
        _ => candle_core::DType::F32,
    };
    // The device goes out of scope before the children start.
    let peak_gflops = flops::gemm_peak_gflops(&parse_device(&a.device)?, gemm_dtype)?;
    let exe = std::env::current_exe().context("locating the relora binary")?;
    let mut results: Vec<ModeResult> = Vec::new();
    for mode in a.modes.split(',').map(str::trim).filter(|m| !m.is_empty()) {
        let mut cmd = std::process::Command::new(&exe);
        cmd.args([
            "bench", "--single", mode, "--preset", &a.preset, "--device", &a.device,
        ])
        .args([
            "--seq-len",
            &a.seq_len.to_string(),
            "--batch-size",
            &a.batch_size.to_string(),
        ])
        .args([
            "--rank",
            &a.rank.to_string(),
            "--reset-every",
            &a.reset_every.to_string(),
        ])
        .args([
            "--steps",
            &a.steps.to_string(),
            "--warmup",
            &a.warmup.to_string(),
        ]);
        if let Some(t) = a.threads {
            cmd.args(["--threads", &t.to_string()]);
        }
        // The switches pass through to the child as given.
        for (on, flag) in [
            (a.tf32, "--tf32"),
            (a.composed_ops, "--composed-ops"),
            (a.graph_layers, "--graph-layers"),
            (a.per_tensor_optimizer, "--per-tensor-optimizer"),
            (a.rounded_products, "--rounded-products"),
            (a.separate_adapter_products, "--separate-adapter-products"),
            (a.profile, "--profile"),
        ] {
            if on {
                cmd.arg(flag);
            }
        }
        cmd.args(["--tokenizer", &a.tokenizer]);
        if !a.compute_dtype.is_empty() {
            cmd.args(["--compute-dtype", &a.compute_dtype]);
        }
        let out = cmd
            .output()
            .with_context(|| format!("running the {mode} benchmark"))?;
        if !out.status.success() {
            bail!(
                "{mode} benchmark failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let line = String::from_utf8_lossy(&out.stdout);
        let r: ModeResult = serde_json::from_str(line.trim())
            .with_context(|| format!("parsing the {mode} benchmark output: {line}"))?;
        results.push(r);
    }
    let full = results
        .iter()
        .find(|r| r.mode == "full")
        .map(|r| r.tokens_per_s);
    print_header(&a, &format!("seq {} x batch {}", a.seq_len, a.batch_size));
    println!("gemm peak ({gemm_dtype:?}, measured now): {peak_gflops:.1} GFLOP/s");
    println!(
        "{:<8} {:>9} {:>8} {:>8} {:>8} {:>9} {:>15} {:>8} {:>11} {:>8} {:>8} {:>9} {:>9} {:>7}",
        "mode",
        "step ms",
        "fwd ms",
        "bwd ms",
        "opt ms",
        "tok/s",
        "tok/s (amort.)",
        "vs full",
        "trainable",
        "opt MiB",
        "grad MiB",
        "peak MiB",
        "GFLOP/s",
        "of peak"
    );
    for r in &results {
        // Against full rank only when full rank ran in this invocation.
        let ratio = full
            .map(|f| format!("{:.2}x", r.tokens_per_s_amortised / f))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<8} {:>9.1} {:>8.1} {:>8.1} {:>8.1} {:>9.0} {:>15.0} {:>8} {:>11} {:>8.1} {:>8.1} {:>9.1} {:>9.1} {:>6.1}%",
            r.mode,
            r.median_step_ms,
            r.forward_ms,
            r.backward_ms,
            r.optimizer_ms,
            r.tokens_per_s,
            r.tokens_per_s_amortised,
            ratio,
            r.trainable_params,
            r.optimizer_state_bytes as f64 / (1 << 20) as f64,
            r.gradient_bytes as f64 / (1 << 20) as f64,
            r.peak_rss_mib,
            r.model_gflops,
            100.0 * r.model_gflops / peak_gflops
        );
    }
    let profiles: Vec<_> = results
        .iter()
        .filter_map(|r| r.profile.as_ref().map(|p| (r.mode.as_str(), p)))
        .collect();
    if !profiles.is_empty() {
        regions::print_table(&profiles);
    }
    if let Some(path) = &a.json {
        let doc = serde_json::json!({
            "tool": BENCH_TOOL,
            "preset": a.preset, "seq_len": a.seq_len, "batch_size": a.batch_size,
            "rank": a.rank, "reset_every": a.reset_every, "threads": a.threads,
            "device": a.device, "cpu": cpu_model(), "tf32": a.tf32,
            "fused_kernels": !a.composed_ops, "layer_nodes": !a.graph_layers,
            "grouped_optimizer": !a.per_tensor_optimizer,
            "widening_products": !a.rounded_products,
            "effective_weights": !a.separate_adapter_products,
            "profiled": a.profile,
            "gemm_peak_gflops": peak_gflops,
            "tokenizer": a.tokenizer,
            "compute_dtype": a.compute_dtype, "results": results,
        });
        let text = serde_json::to_string_pretty(&doc)?;
        relora::fs::output::write_file_output(path, &BENCH_JSON, true, text.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The `tool` field of a `relora bench --json` document.
const BENCH_TOOL: &str = "relora bench";

/// A `relora bench --json` document: replaced by the next run, and nothing else is.
const BENCH_JSON: OutputKind = OutputKind {
    noun: "benchmark report",
    dir: false,
    recognise: Recognise::Custom(|path| {
        let doc: serde_json::Value = relora::fs::read::read_limited(path, 64 << 20)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        if doc["tool"] == BENCH_TOOL {
            Ok(Claim::default())
        } else {
            Err("not a report of relora bench".into())
        }
    }),
};
