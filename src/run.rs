//! A training run as the command-line program drives it: a trainer fed by a seeded batcher,
//! periodic evaluation on held-out tokens, checkpoints every N steps (keeping the last K), and a
//! JSON-lines metrics file. Resuming restores the data cursor, so an interrupted run continues
//! exactly as if it had not stopped.
//!
//! Data-parallel runs ([`TrainRun::set_data_parallel`]): every rank builds the same run; each
//! trains on its share of every step's micro-batches ([`crate::distributed::Shard`]) and the
//! gradients are averaged before the update. Only rank 0 (the writer) evaluates and writes
//! metrics and checkpoints; every rank waits at a barrier after each save. The global batch is
//! `batch_size x grad_accum x ranks` sequences.

use crate::checkpoint::{self, run_dir, SaveExtra};
use crate::data::batcher::{eval_batches, Batch, Batcher, BatcherState};
use crate::distributed::{BucketReducer, Shard};
use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::trainer::{EvalResult, StepStats, Trainer};
use candle_core::Device;
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};

/// How a run saves, evaluates and logs.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Directory for `metrics.jsonl` and `checkpoints/`.
    pub out_dir: PathBuf,
    /// Save every N steps (0: only at the end).
    pub save_every: u64,
    /// Checkpoints to keep (0: all).
    pub keep_last: usize,
    /// Evaluate every N steps (0: only at the end).
    pub eval_every: u64,
    /// At most this many held-out batches per evaluation.
    pub eval_batches: usize,
    /// Whether this process writes the run directory (metrics, checkpoints, tidying what a
    /// killed run left). False on data-parallel ranks other than 0.
    pub writer: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            out_dir: PathBuf::from("runs/default"),
            save_every: 0,
            keep_last: 3,
            eval_every: 0,
            eval_batches: 16,
            writer: true,
        }
    }
}

/// One line of `metrics.jsonl`.
#[derive(Serialize)]
struct MetricsLine<'a> {
    #[serde(flatten)]
    stats: &'a StepStats,
    tokens_per_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    eval_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    eval_perplexity: Option<f64>,
    /// Data-parallel runs: ranks, and gradient bytes each rank all-reduced in this step.
    #[serde(skip_serializing_if = "Option::is_none")]
    ranks: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reduced_bytes: Option<u64>,
}

/// What the caller sees after each step.
pub struct StepReport<'a> {
    /// The step's statistics.
    pub stats: &'a StepStats,
    /// Tokens per second of this step (wall clock).
    pub tokens_per_s: f64,
    /// The evaluation, when one ran after this step.
    pub eval: Option<EvalResult>,
    /// The checkpoint written after this step, if any (always None on ranks other than 0).
    pub saved: Option<PathBuf>,
    /// Data-parallel runs: gradient bytes this rank all-reduced in this step.
    pub reduced_bytes: Option<u64>,
}

/// A trainer, its data and its run directory.
pub struct TrainRun {
    /// The trainer.
    pub trainer: Trainer,
    batcher: Batcher,
    eval: Vec<Batch>,
    tokenizer: Option<String>,
    opts: RunOptions,
    /// Set for data-parallel runs: averages gradients over the ranks.
    reducer: Option<BucketReducer>,
    /// The step whose save kills the process part-way (fault injection for tests).
    kill_in_save_at: Option<u64>,
}

impl TrainRun {
    /// A run over `train_tokens` (and optional held-out tokens) for a fresh or resumed trainer.
    /// `data_state` restores the batcher's cursor when resuming.
    pub fn new(
        trainer: Trainer,
        train_tokens: Vec<u32>,
        eval_tokens: Option<Vec<u32>>,
        tokenizer: Option<String>,
        data_state: Option<BatcherState>,
        opts: RunOptions,
    ) -> Result<Self> {
        let vocab = trainer.model.config.vocab_size;
        crate::data::tokens::check_token_range(&train_tokens, vocab, "training data")?;
        let cfg = &trainer.config;
        let seed = Rng::derived(cfg.seed, "data").next_u64();
        let mut batcher = Batcher::new(train_tokens, cfg.batch_size, cfg.seq_len, seed)?;
        if let Some(state) = data_state {
            batcher.restore(state)?;
        }
        let eval = match eval_tokens {
            Some(t) => {
                crate::data::tokens::check_token_range(&t, vocab, "evaluation data")?;
                if t.len() < 2 {
                    return Err(Error::Data(
                        "evaluation data has fewer than 2 tokens".into(),
                    ));
                }
                let seq = cfg.seq_len.min(t.len() - 1);
                eval_batches(&t, cfg.batch_size, seq, Some(opts.eval_batches.max(1)))
            }
            None => Vec::new(),
        };
        if opts.writer {
            std::fs::create_dir_all(&opts.out_dir).map_err(|e| Error::io(&opts.out_dir, e))?;
            // Leftovers of a process killed while saving (this run directory has one writer: us).
            run_dir::clean_stale(&opts.out_dir)?;
        }
        Ok(TrainRun {
            trainer,
            batcher,
            eval,
            tokenizer,
            opts,
            reducer: None,
            kill_in_save_at: None,
        })
    }

    /// Resumes from a checkpoint directory (or a run directory's newest checkpoint). Metrics
    /// lines of `opts.out_dir` for steps after the checkpoint (written by a run that was
    /// interrupted later) are dropped: the resumed run writes them again.
    pub fn resume(
        path: &Path,
        device: &Device,
        train_tokens: Vec<u32>,
        eval_tokens: Option<Vec<u32>>,
        opts: RunOptions,
    ) -> Result<Self> {
        // A kill while replacing the newest checkpoint may have parked it under a hidden name.
        if opts.writer {
            run_dir::clean_stale(&opts.out_dir)?;
        }
        let dir = run_dir::resolve(path)?;
        let (trainer, manifest) = checkpoint::load(&dir, device)?;
        if opts.writer {
            trim_metrics(&opts.out_dir.join(METRICS_FILE), trainer.step_count())?;
        }
        let state = match manifest.data {
            Some(v) => Some(
                serde_json::from_value::<BatcherState>(v)
                    .map_err(|e| Error::checkpoint(&dir, format!("data cursor: {e}")))?,
            ),
            None => None,
        };
        Self::new(
            trainer,
            train_tokens,
            eval_tokens,
            manifest.tokenizer,
            state,
            opts,
        )
    }

    /// Makes this a data-parallel run over `reducer`'s communicator. Every rank must have built
    /// its run with the same options, data and seed, and `writer` set on rank 0 only.
    pub fn set_data_parallel(&mut self, reducer: BucketReducer) -> Result<()> {
        let comm = reducer.comm();
        if self.opts.writer != (comm.rank() == 0) {
            return Err(Error::Config(format!(
                "rank {} of {}: only rank 0 may write the run directory (writer is {})",
                comm.rank(),
                comm.world(),
                self.opts.writer
            )));
        }
        self.reducer = Some(reducer);
        Ok(())
    }

    /// This rank's share of each step's micro-batches (the whole step without data parallelism).
    pub fn shard(&self) -> Shard {
        match &self.reducer {
            Some(r) => Shard::new(r.comm().rank(), r.comm().world()),
            None => Shard::new(0, 1),
        }
    }

    /// Makes the save of step `step` kill this process (SIGKILL) after writing two of its files,
    /// as a `kill -9` during a save would. For tests.
    #[doc(hidden)]
    pub fn inject_kill_in_save_at(&mut self, step: u64) {
        self.kill_in_save_at = Some(step);
    }

    /// Waits for the other ranks (no-op without data parallelism).
    pub fn barrier(&self) -> Result<()> {
        match &self.reducer {
            Some(r) => r.comm().barrier(),
            None => Ok(()),
        }
    }

    /// The run options.
    pub fn options(&self) -> &RunOptions {
        &self.opts
    }

    /// This rank's micro-batches of the next step; the batcher advances past the whole step.
    fn next_step_batches(&mut self) -> Vec<Batch> {
        let shard = self.shard();
        let accum = self.trainer.config.grad_accum;
        let mut mine = Vec::with_capacity(accum);
        for i in 0..shard.global_micro_batches(accum) {
            if shard.owns(i) {
                mine.push(self.batcher.next_batch());
            } else {
                self.batcher.skip_batch();
            }
        }
        mine
    }

    /// One optimizer step on this rank's micro-batches, gradients averaged over the ranks in a
    /// data-parallel run (whose loss and token count are then made global too). Returns the
    /// statistics and the gradient bytes reduced.
    fn train_step(&mut self) -> Result<(StepStats, Option<u64>)> {
        let batches = self.next_step_batches();
        let Some(reducer) = self.reducer.as_mut() else {
            return Ok((self.trainer.step(&batches)?, None));
        };
        for b in &batches {
            if let Err(e) = self.trainer.accumulate(b) {
                self.trainer.discard_pending();
                return Err(e);
            }
        }
        let mut stats = self.trainer.apply(Some(reducer))?;
        let bytes = reducer.last().bytes;
        // The logged loss is the mean over all ranks' micro-batches, as in one process; every
        // rank's micro-batches have the same shape. (The communicators reduce f32, so the
        // logged mean has f32 precision here.)
        let comm = reducer.comm();
        let mut global = [0f32];
        comm.all_reduce_sum(&[stats.loss as f32], &mut global)?;
        stats.loss = f64::from(global[0] / comm.world() as f32);
        stats.tokens *= comm.world();
        Ok((stats, Some(bytes)))
    }

    /// Rank 0 saves a checkpoint; then every rank waits for it. Returns the directory on rank 0.
    fn save_and_sync(&self) -> Result<Option<PathBuf>> {
        let dir = if self.opts.writer {
            Some(self.save()?)
        } else {
            None
        };
        self.barrier()?;
        Ok(dir)
    }

    /// Evaluates the held-out batches.
    pub fn evaluate(&self) -> Result<Option<EvalResult>> {
        if self.eval.is_empty() {
            return Ok(None);
        }
        self.trainer.eval(&self.eval).map(Some)
    }

    /// Saves a checkpoint for the current step and prunes old ones. Returns its directory.
    pub fn save(&self) -> Result<PathBuf> {
        let dir = run_dir::checkpoint_dir(&self.opts.out_dir, self.trainer.step_count());
        let extra = SaveExtra {
            data: Some(serde_json::to_value(self.batcher.state()).map_err(|e| {
                Error::checkpoint(&dir, format!("serialising the data cursor: {e}"))
            })?),
            tokenizer: self.tokenizer.clone(),
            host_state: None,
        };
        let fault = (self.kill_in_save_at == Some(self.trainer.step_count()))
            .then_some(checkpoint::save::SaveFault::KillAfter(2));
        checkpoint::save::save_with(&self.trainer, &dir, &extra, fault).map_err(|e| {
            Error::checkpoint(
                &dir,
                format!("could not be saved ({e}); the older checkpoints are intact"),
            )
        })?;
        run_dir::prune(&self.opts.out_dir, self.opts.keep_last)?;
        Ok(dir)
    }

    /// Trains until the trainer has completed `until_step` steps (at most `config.steps`),
    /// evaluating, saving and logging on the way. `on_step` sees each step and may return false
    /// to stop early (a final checkpoint is still written); in a data-parallel run it must
    /// decide the same on every rank.
    pub fn train_until(
        &mut self,
        until_step: u64,
        mut on_step: impl FnMut(&StepReport<'_>) -> bool,
    ) -> Result<()> {
        let until = until_step.min(self.trainer.config.steps);
        let metrics_path = self.opts.out_dir.join(METRICS_FILE);
        let mut metrics = if self.opts.writer {
            Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&metrics_path)
                    .map_err(|e| Error::io(&metrics_path, e))?,
            )
        } else {
            None
        };
        let ranks = self.reducer.as_ref().map(|r| r.comm().world());
        let mut saved_at = None;
        while self.trainer.step_count() < until {
            let start = std::time::Instant::now();
            let (stats, reduced_bytes) = self.train_step()?;
            let tokens_per_s = stats.tokens as f64 / start.elapsed().as_secs_f64().max(1e-9);
            let step = self.trainer.step_count();
            let done = step >= until;
            let eval = if self.opts.writer
                && !stats.skipped
                && ((self.opts.eval_every > 0 && step.is_multiple_of(self.opts.eval_every)) || done)
            {
                self.evaluate()?
            } else {
                None
            };
            // The step's line goes out before its checkpoint, so every checkpoint's step is in
            // the log (a resume cuts the log back to it).
            let line = MetricsLine {
                stats: &stats,
                tokens_per_s,
                eval_loss: eval.map(|e| e.loss),
                eval_perplexity: eval.map(|e| e.perplexity),
                ranks,
                reduced_bytes,
            };
            if let Some(metrics) = metrics.as_mut() {
                let mut json = serde_json::to_string(&line).unwrap_or_default();
                json.push('\n');
                metrics
                    .write_all(json.as_bytes())
                    .map_err(|e| Error::io(&metrics_path, e))?;
            }
            let saved = if !stats.skipped
                && self.opts.save_every > 0
                && step.is_multiple_of(self.opts.save_every)
            {
                saved_at = Some(step);
                self.save_and_sync()?
            } else {
                None
            };
            let report = StepReport {
                stats: &stats,
                tokens_per_s,
                eval,
                saved,
                reduced_bytes,
            };
            if !on_step(&report) {
                break;
            }
        }
        if saved_at != Some(self.trainer.step_count()) {
            self.save_and_sync()?;
        }
        Ok(())
    }
}

/// The run directory's log of steps.
pub(crate) const METRICS_FILE: &str = "metrics.jsonl";

/// Removes the run directory's `metrics.jsonl` before a fresh run, if it is relora's log: a
/// regular file whose every complete line is a JSON object with a `step`. Anything else under
/// that name is refused ([`Error::OutputExists`]) and left alone; a missing file is fine.
pub fn remove_metrics_log(out_dir: &Path) -> Result<()> {
    if check_metrics_log(out_dir)? {
        let path = out_dir.join(METRICS_FILE);
        std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
    }
    Ok(())
}

/// Whether the run directory has a `metrics.jsonl`, refusing one that is not relora's log (see
/// [`remove_metrics_log`]).
pub fn check_metrics_log(out_dir: &Path) -> Result<bool> {
    let path = out_dir.join(METRICS_FILE);
    let meta = match std::fs::symlink_metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::io(&path, e)),
    };
    let foreign = |found: String| Error::OutputExists {
        path: path.clone(),
        found,
        own: false,
    };
    if !meta.is_file() {
        return Err(foreign(crate::fs::read::describe(&meta.file_type()).into()));
    }
    let text = crate::fs::read::read_regular(&path)?;
    for (i, line) in text.split_inclusive(|&b| b == b'\n').enumerate() {
        // A torn last line is what a killed run leaves.
        if !line.ends_with(b"\n") {
            break;
        }
        let v: serde_json::Value = serde_json::from_slice(line).unwrap_or_default();
        if v["step"].as_u64().is_none() {
            return Err(foreign(format!(
                "a file whose line {} is not a relora metrics record (not relora's log)",
                i + 1
            )));
        }
    }
    Ok(true)
}

/// Cuts `metrics.jsonl` back to the line that completed step `step` (and drops a torn last line),
/// so a run resumed from that step's checkpoint does not log the steps after it twice. A file
/// without that line (another run's, or none) is left alone.
fn trim_metrics(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = crate::fs::read::read_regular(path) else {
        return Ok(());
    };
    let mut end = 0usize;
    let mut keep = None;
    for line in text.split_inclusive(|&b| b == b'\n') {
        end += line.len();
        if !line.ends_with(b"\n") {
            break;
        }
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) else {
            break;
        };
        if v["step"].as_u64() == Some(step) && v["skipped"] != serde_json::Value::Bool(true) {
            keep = Some(end);
            break;
        }
    }
    let Some(keep) = keep else {
        return Ok(());
    };
    if keep < text.len() {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        f.set_len(keep as u64).map_err(|e| Error::io(path, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::trim_metrics;

    #[test]
    fn metrics_are_cut_back_to_the_resumed_step() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let line = |step: u64, skipped: bool| {
            format!("{{\"step\":{step},\"loss\":1.0,\"skipped\":{skipped}}}\n")
        };
        let body: String = [
            line(1, false),
            line(2, false),
            line(2, true),
            line(3, false),
            line(4, false),
        ]
        .concat();
        std::fs::write(&path, format!("{body}{{\"step\":5,\"lo")).unwrap();
        trim_metrics(&path, 3).unwrap();
        let kept = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            kept,
            [
                line(1, false),
                line(2, false),
                line(2, true),
                line(3, false)
            ]
            .concat()
        );
        // A skipped attempt after the checkpoint's step is dropped too.
        trim_metrics(&path, 2).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            [line(1, false), line(2, false)].concat()
        );
        // A step the file does not hold leaves it alone; so does a missing file.
        trim_metrics(&path, 9).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            [line(1, false), line(2, false)].concat()
        );
        trim_metrics(&dir.path().join("none.jsonl"), 1).unwrap();
    }
}
