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
        Ok(TrainRun {
            trainer,
            batcher,
            eval,
            tokenizer,
            opts,
        })
    }

    /// Resumes from a checkpoint directory (or a run directory's newest checkpoint).
    pub fn resume(
        path: &Path,
        device: &Device,
        train_tokens: Vec<u32>,
        eval_tokens: Option<Vec<u32>>,
        opts: RunOptions,
    ) -> Result<Self> {
        let dir = run_dir::resolve(path)?;
        let (trainer, manifest) = checkpoint::load(&dir, device)?;
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
        checkpoint::save(&self.trainer, &dir, &extra)?;
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
            let saved =
                if !stats.skipped && self.opts.save_every > 0 && step % self.opts.save_every == 0 {
                    saved_at = Some(step);
                    Some(self.save()?)
                } else {
                    None
                };
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
