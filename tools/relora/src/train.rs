//! `relora train`.

use crate::report::Reporter;
use crate::{inputs, train_flags};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::Args;
use relora::checkpoint::recognise::CHECKPOINT;
use relora::checkpoint::run_dir;
use relora::config::{Mode, ModelConfig, TrainConfig};
use relora::device::parse_device;
use relora::distributed::bucket::DEFAULT_BUCKET_BYTES;
use relora::distributed::{BucketReducer, Communicator};
use relora::run::{RunOptions, TrainRun};
use relora::Trainer;
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// Options of `relora train`. Precedence: defaults < `--train-config` file < flags < `--set`.
#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Model preset (tiny, small, 60m, 130m, 250m, 350m, 1b).
    #[arg(long, default_value = "small")]
    preset: String,
    /// A Hugging Face style config.json for the model (overrides --preset).
    #[arg(long)]
    config: Option<PathBuf>,
    /// A JSON file of training options (field names as in `--set`).
    #[arg(long)]
    train_config: Option<PathBuf>,
    /// Training arm: full, lora or relora.
    #[arg(long)]
    mode: Option<Mode>,
    /// Training data: "builtin", a text file, or a .u16/.u32 token file.
    #[arg(long, default_value = "builtin")]
    data: String,
    /// Held-out data for evaluation ("builtin-eval" with the built-in corpus; "none" disables).
    #[arg(long)]
    eval_data: Option<String>,
    /// Tokenizer: bytes, gpt2, or a tokenizer.json path.
    #[arg(long, default_value = "bytes")]
    tokenizer: String,
    /// Total optimizer steps.
    #[arg(long)]
    steps: Option<u64>,
    /// Peak learning rate.
    #[arg(long)]
    lr: Option<f64>,
    /// Sequences per micro-batch.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Tokens per sequence.
    #[arg(long)]
    seq_len: Option<usize>,
    /// Adapter rank.
    #[arg(long)]
    rank: Option<usize>,
    /// Steps between ReLoRA merges.
    #[arg(long)]
    reset_every: Option<u64>,
    /// Learning-rate warm-up steps (linear, from 0).
    #[arg(long)]
    warmup_steps: Option<u64>,
    /// Full-rank warm-start steps.
    #[arg(long)]
    warmup_full_steps: Option<u64>,
    /// CPU threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Seed for initialisation, data order and resets.
    #[arg(long)]
    seed: Option<u64>,
    /// Device: cpu, or cuda:N in CUDA builds.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Run directory (metrics.jsonl, checkpoints/) [default: runs/default, or with --resume the
    /// run directory being resumed]
    #[arg(long)]
    out: Option<PathBuf>,
    /// Resume from a checkpoint directory or a run directory (its newest checkpoint).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Save a checkpoint every N steps (0: only at the end).
    #[arg(long, default_value_t = 100)]
    save_every: u64,
    /// Checkpoints to keep.
    #[arg(long, default_value_t = 3)]
    keep_last: usize,
    /// Evaluate every N steps (0: only at the end).
    #[arg(long, default_value_t = 100)]
    eval_every: u64,
    /// Held-out batches per evaluation.
    #[arg(long, default_value_t = 16)]
    eval_batches: usize,
    /// Any training option as key=value (repeatable), e.g. --set reset_mode=random:0.9.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Stop after this many steps in this invocation (the schedule still spans --steps).
    #[arg(long)]
    stop_after: Option<u64>,
    /// No progress bar; print one line per evaluation instead.
    #[arg(long)]
    quiet: bool,
    /// Without a terminal (output to a file or a pipe), print a line every N steps (and one
    /// per evaluation, merge and skipped step) instead of a progress bar.
    #[arg(long, default_value_t = 20)]
    log_every: u64,
    /// At the end, export the final checkpoint (all phases and the current adapter merged, fp32)
    /// as a Hugging Face model directory here (what `relora-convert merge` writes).
    #[arg(long)]
    export: Option<PathBuf>,
    /// Start afresh in an --out directory that already holds a run (relora's own checkpoints and
    /// metrics log there are removed; a checkpoint holding anything else is refused), and
    /// replace an earlier relora export at --export.
    #[arg(long)]
    force: bool,
    /// Data-parallel training: "none"; "mpi" under `mpirun -np N` (builds with the `mpi`
    /// feature); or "nccl", one process per GPU (builds with the `nccl` feature), rank and job
    /// size from RANK/WORLD_SIZE/LOCAL_RANK (torchrun, or set by hand), Open MPI's or Slurm's
    /// variables. Each rank runs grad_accum micro-batches of batch_size sequences per step, so
    /// the global batch is batch_size x grad_accum x N; only rank 0 writes files.
    #[arg(long, default_value = "none")]
    distributed: String,
    /// Data-parallel runs: end the job when one collective call (gradient all-reduce, barrier)
    /// waits longer than this many seconds, i.e. a peer rank died or hung. It must exceed the
    /// longest time rank 0 spends evaluating or saving between two steps.
    #[arg(long, default_value_t = 900)]
    dist_timeout: u64,
    /// --distributed nccl: the file through which rank 0 hands NCCL's id to the other ranks, on
    /// a filesystem they all see; it must not exist at the start [default: OUT/nccl-id].
    #[arg(long)]
    nccl_id_file: Option<PathBuf>,
    /// Fault injection for tests: RANK:STEP makes that rank's first micro-batch of STEP report
    /// a non-finite loss while its gradients stay finite.
    #[arg(long, hide = true, value_name = "RANK:STEP")]
    fault_nonfinite_loss: Option<String>,
    /// Fault injection for tests: the save of STEP kills the process (SIGKILL) part-way.
    #[arg(long, hide = true, value_name = "STEP")]
    fault_kill_in_save: Option<u64>,
}

/// The communicator `--distributed` asks for (None for a single process), and the device this
/// process trains on.
fn connect(a: &TrainArgs) -> Result<(Option<Rc<dyn Communicator>>, Device)> {
    let timeout = std::time::Duration::from_secs(a.dist_timeout.max(1));
    match a.distributed.as_str() {
        "none" => Ok((None, parse_device(&a.device)?)),
        "mpi" => Ok((Some(connect_mpi(timeout)?), parse_device(&a.device)?)),
        "nccl" => connect_nccl(a, timeout),
        other => bail!("--distributed expects none, mpi or nccl, got '{other}'"),
    }
}

/// The first of the environment variables `names` that is set, as a number.
#[cfg(feature = "nccl")]
fn env_number(names: &[&str]) -> Result<Option<usize>> {
    for n in names {
        if let Ok(v) = std::env::var(n) {
            let parsed = v
                .trim()
                .parse()
                .with_context(|| format!("environment variable {n}='{v}' is not a number"))?;
            return Ok(Some(parsed));
        }
    }
    Ok(None)
}

#[cfg(feature = "nccl")]
fn connect_nccl(
    a: &TrainArgs,
    timeout: std::time::Duration,
) -> Result<(Option<Rc<dyn Communicator>>, Device)> {
    let rank = env_number(&["RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID"])?;
    let world = env_number(&["WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "SLURM_NTASKS"])?;
    let (Some(rank), Some(world)) = (rank, world) else {
        bail!(
            "--distributed nccl: set RANK and WORLD_SIZE (and LOCAL_RANK for the GPU) for each \
             process, or start it with torchrun, mpirun or srun, which set them"
        );
    };
    let local =
        env_number(&["LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID"])?.unwrap_or(rank);
    // One GPU per process: "cpu" (the default) or a bare "cuda" means this rank's own GPU.
    let spec = match a.device.trim() {
        "cpu" | "cuda" => format!("cuda:{local}"),
        other => other.to_string(),
    };
    let device = parse_device(&spec)?;
    let id_file = match &a.nccl_id_file {
        Some(p) => p.clone(),
        None => out_dir_of(a).join("nccl-id"),
    };
    if rank == 0 {
        if let Some(dir) = id_file.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
    }
    let comm =
        relora::distributed::nccl::NcclCommunicator::join(&id_file, rank, world, &device, timeout)?;
    Ok((Some(Rc::new(comm)), device))
}

#[cfg(not(feature = "nccl"))]
fn connect_nccl(
    _a: &TrainArgs,
    _timeout: std::time::Duration,
) -> Result<(Option<Rc<dyn Communicator>>, Device)> {
    bail!(
        "--distributed nccl: this relora was built without NCCL support; rebuild with \
         `cargo build --release -p relora-cli --features nccl` (needs the CUDA toolkit and \
         libnccl) and start one process per GPU"
    )
}

#[cfg(feature = "mpi")]
fn connect_mpi(timeout: std::time::Duration) -> Result<Rc<dyn Communicator>> {
    let comm = relora::distributed::mpi::MpiCommunicator::init(timeout)?;
    Ok(Rc::new(comm))
}

#[cfg(not(feature = "mpi"))]
fn connect_mpi(_timeout: std::time::Duration) -> Result<Rc<dyn Communicator>> {
    bail!(
        "--distributed mpi: this relora was built without MPI support; rebuild with \
         `cargo build --release -p relora-cli --features mpi` (needs Open MPI and libclang: \
         apt-get install libopenmpi-dev openmpi-bin libclang-dev) and start it with \
         `mpirun -np N relora train --distributed mpi ...`"
    )
}

fn build_config(a: &TrainArgs) -> Result<TrainConfig> {
    let mut c = match &a.train_config {
        Some(p) => TrainConfig::from_file(p)?,
        None => TrainConfig::default(),
    };
    if let Some(m) = a.mode {
        c.mode = m;
    }
    macro_rules! apply {
        ($field:ident, $cfg:ident) => {
            if let Some(v) = a.$field {
                c.$cfg = v;
            }
        };
    }
    apply!(steps, steps);
    apply!(lr, lr);
    apply!(batch_size, batch_size);
    apply!(seq_len, seq_len);
    apply!(rank, lora_rank);
    apply!(reset_every, reset_every);
    apply!(warmup_steps, warmup_steps);
    apply!(warmup_full_steps, warmup_full_steps);
    apply!(seed, seed);
    for kv in &a.set {
        let Some((k, v)) = kv.split_once('=') else {
            bail!("--set expects KEY=VALUE, got '{kv}'");
        };
        c.set(k.trim(), v)?;
    }
    c.validate()?;
    Ok(c)
}

/// The run directory: --out, else the one a resumed run continues in, else runs/default.
fn out_dir_of(a: &TrainArgs) -> PathBuf {
    match (&a.out, &a.resume) {
        (Some(out), _) => out.clone(),
        (None, Some(r)) => resumed_run_dir(r),
        (None, None) => PathBuf::from("runs/default"),
    }
}

/// The run directory a resumed run continues in when `--out` is not given: `RUN` for `RUN` or
/// `RUN/checkpoints/step-N`.
fn resumed_run_dir(resume: &Path) -> PathBuf {
    let parent = resume.parent();
    match parent {
        Some(p) if p.file_name().is_some_and(|n| n == "checkpoints") => {
            p.parent().map(Path::to_path_buf).unwrap_or_default()
        }
        _ => resume.to_path_buf(),
    }
}

/// Runs `relora train`. In a data-parallel run, an error on one rank is printed with its rank
/// and ends the whole job (so the other ranks don't wait for it in a collective call).
pub fn run(a: TrainArgs) -> Result<()> {
    let (comm, device) = connect(&a)?;
    if comm.is_none() {
        inputs::set_threads(a.threads);
        return inputs::on_compute_pool(move || run_with(a, None, device))
            .map_err(train_flags::in_flag_names);
    }
    // (The communicator stays on the thread that created it, as MPI wants.)
    let result = run_with(a, comm.clone(), device).map_err(train_flags::in_flag_names);
    if let (Err(e), Some(c)) = (&result, &comm) {
        if c.world() > 1 {
            eprintln!(
                "error: rank {} of {}: {}",
                c.rank(),
                c.world(),
                relora::error::report(e.as_ref())
            );
            eprintln!("ending all ranks of the job");
            c.abort(1);
        }
    }
    result
}

/// Refuses a fresh run in a run directory that already holds checkpoints.
fn refuse_existing_run(out_dir: &Path) -> Result<()> {
    let existing = run_dir::list(out_dir)?;
    if !existing.is_empty() {
        bail!(
            "{} already holds a run ({} checkpoints); continue it with --resume {}, or start \
             afresh with --force",
            out_dir.display(),
            existing.len(),
            out_dir.display()
        );
    }
    Ok(())
}

/// Checks that the export at the end of the run will be allowed and can be written: the target
/// (`--force` or a resume replaces relora's own earlier export, never anything else) and the
/// nearest existing directory above it.
fn check_export_target(out: &Path, replace_own: bool) -> Result<()> {
    let kind = relora::export::hf::output_kind(out);
    relora::fs::output::check_parent_writable(out)
        .and_then(|()| relora::fs::output::check_target(out, kind, replace_own))
        .with_context(|| format!("--export {}", out.display()))
}

/// A fresh run's trainer and data, built and checked before anything is written.
struct Fresh {
    trainer: Trainer,
    tokenizer: String,
    train: Vec<u32>,
    eval: Option<Vec<u32>>,
}

/// Builds the model, trainer and data of a fresh run from the options; any bad option (a
/// preset, a data path, a flag's value) fails here, before the run directory exists.
fn build_fresh(a: &TrainArgs, eval_spec: Option<&str>, device: &Device) -> Result<Fresh> {
    let config = build_config(a)?;
    let tok = inputs::tokenizer(&a.tokenizer)?;
    let mut model = match &a.config {
        Some(p) => ModelConfig::from_file(p)?,
        None => ModelConfig::preset(&a.preset)?,
    };
    if a.config.is_none() {
        model.vocab_size = tok.vocab_size();
    } else if model.vocab_size < tok.vocab_size() {
        bail!(
            "config vocab_size {} is smaller than the tokenizer's {}",
            model.vocab_size,
            tok.vocab_size()
        );
    }
    let train = inputs::tokens(&a.data, &tok)?;
    let eval = eval_spec.map(|s| inputs::tokens(s, &tok)).transpose()?;
    let trainer = Trainer::new(&model, &config, device).context("creating the trainer")?;
    Ok(Fresh {
        trainer,
        tokenizer: tok.spec(),
        train,
        eval,
    })
}

fn run_with(mut a: TrainArgs, comm: Option<Rc<dyn Communicator>>, device: Device) -> Result<()> {
    let (rank, world) = comm.as_ref().map_or((0, 1), |c| (c.rank(), c.world()));
    let writer = rank == 0;
    let barrier = || -> Result<()> {
        if let Some(c) = &comm {
            c.barrier()?;
        }
        Ok(())
    };
    if a.out.is_none() {
        a.out = Some(out_dir_of(&a));
    }
    let out_dir = a.out.clone().unwrap_or_default();
    let started = std::time::Instant::now();
    inputs::set_threads(a.threads);
    let opts = RunOptions {
        out_dir: out_dir.clone(),
        save_every: a.save_every,
        keep_last: a.keep_last,
        eval_every: a.eval_every,
        eval_batches: a.eval_batches,
        writer,
    };
    let eval_spec = match (&a.eval_data, a.data.as_str()) {
        (Some(s), _) if s == "none" => None,
        (Some(s), _) => Some(s.clone()),
        (None, "builtin") => Some("builtin-eval".to_string()),
        (None, _) => None,
    };

    let mut run = if let Some(resume) = &a.resume {
        // Tidy what a killed save left in the run directory before any rank picks its newest
        // checkpoint.
        if writer {
            run_dir::clean_stale(&out_dir)
                .with_context(|| format!("tidying {}", out_dir.display()))?;
        }
        barrier()?;
        let dir = run_dir::resolve(resume)?;
        let manifest = relora::checkpoint::Manifest::read(&dir)?;
        let tok_spec = manifest
            .tokenizer
            .clone()
            .unwrap_or_else(|| a.tokenizer.clone());
        let tok = inputs::tokenizer(&tok_spec)?;
        let train = inputs::tokens(&a.data, &tok)?;
        let eval = eval_spec
            .as_deref()
            .map(|s| inputs::tokens(s, &tok))
            .transpose()?;
        if let (true, Some(out)) = (writer, &a.export) {
            check_export_target(out, true)?;
        }
        if writer {
            eprintln!(
                "resuming {} at step {} (phase {})",
                dir.display(),
                manifest.counters.step,
                manifest.phase_index
            );
            relora::relora::base_weights::set_spill_dir(Some(out_dir.clone()));
        }
        TrainRun::resume(&dir, &device, train, eval, opts)?
    } else {
        let fresh = build_fresh(&a, eval_spec.as_deref(), &device)?;
        // What would clobber a run or stop this one at its end is refused before anything is
        // written.
        let existing = run_dir::list(&out_dir)?;
        if !existing.is_empty() && !a.force {
            refuse_existing_run(&out_dir)?;
        }
        if writer {
            if let Some(out) = &a.export {
                check_export_target(out, a.force)?;
            }
            // --force removes only relora's own checkpoints, file by file; all are checked
            // before any is removed, and one a user has put files into is refused.
            for (_, dir) in &existing {
                relora::fs::output::check_target(dir, &CHECKPOINT, true)
                    .with_context(|| format!("--force: not removing {}", dir.display()))?;
            }
            relora::run::check_metrics_log(&out_dir)?;
            std::fs::create_dir_all(&out_dir)
                .with_context(|| format!("creating {}", out_dir.display()))?;
            for (_, dir) in existing {
                run_dir::remove_checkpoint(&dir)
                    .with_context(|| format!("--force: not removing {}", dir.display()))?;
            }
            // A fresh run starts a fresh log, also over one left by an attempt that died
            // before its first checkpoint.
            relora::run::remove_metrics_log(&out_dir)?;
            // The base weights of the adapter phase go next to the checkpoints, on their disk,
            // rather than to a /tmp that may be memory (the other ranks keep the default).
            relora::relora::base_weights::set_spill_dir(Some(out_dir.clone()));
        }
        barrier()?;
        let (model, config) = (&fresh.trainer.model.config, &fresh.trainer.config);
        if writer {
            eprintln!(
                "model: {} parameters ({} layers, hidden {}, vocab {}); mode {}; {} steps of {}{} x {} x {} tokens",
                model.num_parameters(),
                model.num_hidden_layers,
                model.hidden_size,
                model.vocab_size,
                config.mode,
                config.steps,
                if world > 1 { format!("{world} ranks x ") } else { String::new() },
                config.grad_accum,
                config.batch_size,
                config.seq_len
            );
        }
        TrainRun::new(
            fresh.trainer,
            fresh.train,
            fresh.eval,
            Some(fresh.tokenizer),
            None,
            opts,
        )?
    };
    if let Some(c) = &comm {
        let shared: Box<dyn Communicator> = Box::new(Rc::clone(c));
        run.set_data_parallel(BucketReducer::new(shared, DEFAULT_BUCKET_BYTES))?;
        if writer {
            eprintln!(
                "data-parallel over {world} ranks ({}): global batch {} x {} x {world} sequences",
                c.backend(),
                run.trainer.config.batch_size,
                run.trainer.config.grad_accum
            );
        }
    }
    inject_faults(&a, &mut run, rank)?;

    let total = run.trainer.config.steps;
    let until = a
        .stop_after
        .map(|n| run.trainer.step_count() + n)
        .unwrap_or(total);
    let report = Reporter::new(
        a.quiet || !writer,
        total,
        run.trainer.step_count(),
        a.log_every,
    );
    let first_step = run.trainer.step_count();
    let mut last_eval = None;
    let result = run.train_until(until, |r| {
        report.step(r);
        if r.eval.is_some() {
            last_eval = r.eval;
        }
        true
    });
    if let Err(e) = result {
        report.abandon();
        let out = run.options().out_dir.display().to_string();
        let newest = match run_dir::list(&run.options().out_dir) {
            Ok(list) => list
                .last()
                .map(|(_, p)| format!("newest checkpoint {}", p.display()))
                .unwrap_or_else(|| "no checkpoint yet".to_string()),
            Err(_) => "checkpoints unreadable".to_string(),
        };
        return Err(anyhow::Error::new(e).context(format!(
            "training stopped after step {} ({newest}; continue with --resume {out} --out {out})",
            run.trainer.step_count()
        )));
    }
    report.finish();
    if !writer {
        return Ok(());
    }
    let last = run_dir::list(&run.options().out_dir)?
        .pop()
        .map(|(_, p)| p)
        .unwrap_or_default();
    let steps = run.trainer.step_count();
    let mut summary = format!(
        "done: step {steps} of {total} ({} this run) in {:.0} s",
        steps - first_step,
        started.elapsed().as_secs_f64()
    );
    if let Some(e) = last_eval {
        summary.push_str(&format!(
            "; eval loss {:.4}, perplexity {:.2}",
            e.loss, e.perplexity
        ));
    }
    eprintln!("{summary}");
    eprintln!("checkpoint: {}", last.display());
    if let Some(out) = &a.export {
        export_final(&last, out, a.force || a.resume.is_some())?;
    }
    let eval_data = eval_spec.unwrap_or_else(|| a.data.clone());
    print_next_steps(&out_dir, &eval_data, a.export.as_deref());
    Ok(())
}

/// Exports the final checkpoint; on failure the error says that the checkpoint is safe and
/// gives the command that redoes the export.
fn export_final(ckpt: &Path, out: &Path, replace_own: bool) -> Result<()> {
    let opts = relora::export::hf::HfExportOptions {
        force: replace_own,
        ..Default::default()
    };
    relora::export::hf::merge_checkpoint(ckpt, out, None, &opts).with_context(|| {
        format!(
            "exporting to {} failed; the checkpoint {} is safe: redo the export with \
             `relora-convert merge {} {}{}` (the error follows)",
            out.display(),
            ckpt.display(),
            ckpt.display(),
            out.display(),
            if replace_own { " --force" } else { "" }
        )
    })?;
    eprintln!(
        "exported: {} (a Hugging Face model directory)",
        out.display()
    );
    Ok(())
}

/// What to do with the run now: sample, evaluate, and load the export in transformers.
fn print_next_steps(run: &Path, eval_data: &str, export: Option<&Path>) {
    let run = run.display();
    eprintln!("next:");
    eprintln!("  relora generate --checkpoint {run} --prompt \"It was\"");
    eprintln!("  relora eval --checkpoint {run} --data {eval_data}");
    match export {
        Some(hf) => eprintln!(
            "  python -c \"from transformers import pipeline; \
             print(pipeline('text-generation', model='{}')('It was', max_new_tokens=40)[0]['generated_text'])\"",
            hf.display()
        ),
        None => eprintln!("  relora-convert merge {run} {run}/hf   # a Hugging Face model"),
    }
}

/// Applies the hidden fault-injection flags (tests only).
fn inject_faults(a: &TrainArgs, run: &mut TrainRun, rank: usize) -> Result<()> {
    if let Some(spec) = &a.fault_nonfinite_loss {
        let parsed = spec
            .split_once(':')
            .and_then(|(r, s)| Some((r.parse::<usize>().ok()?, s.parse::<u64>().ok()?)));
        let Some((fault_rank, step)) = parsed else {
            bail!("--fault-nonfinite-loss takes RANK:STEP, not {spec}");
        };
        if fault_rank == rank {
            run.trainer.inject_nonfinite_loss_at(step);
        }
    }
    if let Some(step) = a.fault_kill_in_save {
        run.inject_kill_in_save_at(step);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::resumed_run_dir;
    use std::path::Path;

    #[test]
    fn a_resumed_run_continues_in_its_own_directory() {
        assert_eq!(resumed_run_dir(Path::new("runs/a")), Path::new("runs/a"));
        assert_eq!(
            resumed_run_dir(Path::new("runs/a/checkpoints/step-00000010")),
            Path::new("runs/a")
        );
    }
}
