//! A training run as the command-line program drives it: a trainer fed by a seeded batcher,
//! periodic evaluation on held-out tokens, checkpoints every N steps (keeping the last K), and a
//! JSON-lines metrics file. Resuming restores the data cursor, so an interrupted run continues
//! exactly as if it had not stopped.

use crate::checkpoint::{self, run_dir, SaveExtra};
use crate::data::batcher::{eval_batches, Batch, Batcher, BatcherState};
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
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            out_dir: PathBuf::from("runs/default"),
            save_every: 0,
            keep_last: 3,
            eval_every: 0,
            eval_batches: 16,
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
}

/// What the caller sees after each step.
pub struct StepReport<'a> {
    /// The step's statistics.
    pub stats: &'a StepStats,
    /// Tokens per second of this step (wall clock).
    pub tokens_per_s: f64,
    /// The evaluation, when one ran after this step.
    pub eval: Option<EvalResult>,
    /// The checkpoint written after this step, if any.
    pub saved: Option<PathBuf>,
}

/// A trainer, its data and its run directory.
pub struct TrainRun {
    /// The trainer.
    pub trainer: Trainer,
    batcher: Batcher,
    eval: Vec<Batch>,
    tokenizer: Option<String>,
    opts: RunOptions,
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
        std::fs::create_dir_all(&opts.out_dir).map_err(|e| Error::io(&opts.out_dir, e))?;
        // Leftovers of a process killed while saving (this run directory has one writer: us).
        run_dir::clean_stale(&opts.out_dir)?;
        Ok(TrainRun {
            trainer,
            batcher,
            eval,
            tokenizer,
            opts,
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
        run_dir::clean_stale(&opts.out_dir)?;
        let dir = run_dir::resolve(path)?;
        let (trainer, manifest) = checkpoint::load(&dir, device)?;
        trim_metrics(&opts.out_dir.join("metrics.jsonl"), trainer.step_count())?;
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

    /// The run options.
    pub fn options(&self) -> &RunOptions {
        &self.opts
    }

    /// Whether held-out data was given.
    pub fn has_eval(&self) -> bool {
        !self.eval.is_empty()
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
        };
        checkpoint::save(&self.trainer, &dir, &extra).map_err(|e| {
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
    /// to stop early (a final checkpoint is still written).
    pub fn train_until(
        &mut self,
        until_step: u64,
        mut on_step: impl FnMut(&StepReport<'_>) -> bool,
    ) -> Result<()> {
        let until = until_step.min(self.trainer.config.steps);
        let metrics_path = self.opts.out_dir.join("metrics.jsonl");
        let mut metrics = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&metrics_path)
            .map_err(|e| Error::io(&metrics_path, e))?;
        let accum = self.trainer.config.grad_accum;
        let mut saved_at = None;
        while self.trainer.step_count() < until {
            let start = std::time::Instant::now();
            let batches: Vec<Batch> = (0..accum).map(|_| self.batcher.next_batch()).collect();
            let stats = self.trainer.step(&batches)?;
            let tokens_per_s = stats.tokens as f64 / start.elapsed().as_secs_f64().max(1e-9);
            let step = self.trainer.step_count();
            let done = step >= until;
            let eval = if !stats.skipped
                && ((self.opts.eval_every > 0 && step % self.opts.eval_every == 0) || done)
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
            };
            let mut json = serde_json::to_string(&line).unwrap_or_default();
            json.push('\n');
            metrics
                .write_all(json.as_bytes())
                .map_err(|e| Error::io(&metrics_path, e))?;
            let saved =
                if !stats.skipped && self.opts.save_every > 0 && step % self.opts.save_every == 0 {
                    saved_at = Some(step);
                    Some(self.save()?)
                } else {
                    None
                };
            let report = StepReport {
                stats: &stats,
                tokens_per_s,
                eval,
                saved,
            };
            if !on_step(&report) {
                break;
            }
        }
        if saved_at != Some(self.trainer.step_count()) {
            self.save()?;
        }
        Ok(())
    }
}

/// Cuts `metrics.jsonl` back to the line that completed step `step` (and drops a torn last line),
/// so a run resumed from that step's checkpoint does not log the steps after it twice. A file
/// without that line (another run's, or none) is left alone.
fn trim_metrics(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read(path) else {
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
