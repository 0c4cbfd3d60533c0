//! A trainer as the library's faces hold it, and everything they do with it: the C ABI (this
//! module's siblings) and the cxx bridge (`bindings/cxx`) both call these operations, so a call
//! checks the same things, does the same work and fails with the same status and message
//! whichever face it came through. A face adds only what its language needs: pointer and length
//! checks and the handle registry for C, slices and exceptions for C++.
//!
//! Tokens arrive as `batch` rows of `len` tokens, row-major. Each row carries its own shifted
//! target: the inputs are `row[0 .. len-1]` and the targets `row[1 .. len]`, so a row of `len`
//! tokens trains `len - 1` positions (`len` = seq_len + 1).

use super::callbacks::{relora_log_level, relora_progress_stage, Callbacks};
use super::guard::{Failure, FfiResult};
use super::options::Options;
use super::stats::relora_step_stats;
use super::status::relora_status;
use crate::checkpoint::{self, SaveExtra};
use crate::data::batcher::Batch;
use crate::device::{device_string, parse_device};
use crate::error::{Error, TensorContext};
use crate::export::{write_model_dir, ExportDType, HfExportOptions};
use crate::model::llama::set_checked;
use crate::trainer::{GradientReducer, StepStats, Trainer};
use candle_core::{DType, Tensor, Var};
use std::path::Path;

/// A gradient reducer supplied by a face (the C callback, a C++ communicator), which can say
/// why it failed.
pub trait FaceReducer {
    /// The reducer the trainer calls.
    fn reducer(&mut self) -> &mut dyn GradientReducer;
    /// Set when a reduction failed: the message of the step's failure.
    fn failure(&self) -> Option<String>;
}

/// A trainer and what the faces keep beside it.
pub struct Session {
    /// The core trainer.
    pub(crate) trainer: Trainer,
    /// The options it was built from (or read back from its checkpoint).
    pub(crate) options: Options,
    /// The host's callbacks (the C face installs them; none by default).
    pub(crate) callbacks: Callbacks,
    /// Statistics of the last applied step since creation or loading.
    pub(crate) last_stats: Option<relora_step_stats>,
    /// The host's JSON text stored in the checkpoint this trainer was loaded from, byte for
    /// byte as the host gave it.
    pub(crate) host_state: Option<String>,
    /// The message of the panic that poisoned the trainer (the C face's handle).
    pub(crate) poison: String,
}

/// Checks `batch` rows of `len` tokens in `tokens` (exactly `batch * len` of them) and splits
/// them into rows, every id checked against `vocab`.
pub(crate) fn rows(
    tokens: &[i32],
    batch: usize,
    len: usize,
    vocab: usize,
) -> FfiResult<Vec<Vec<u32>>> {
    check_shape(batch, len)?;
    let total = batch
        .checked_mul(len)
        .ok_or_else(|| Failure::invalid(format!("batch {batch} x len {len} overflows")))?;
    if tokens.len() != total {
        return Err(Failure::invalid(format!(
            "{} token ids given, batch {batch} x len {len} is {total}",
            tokens.len()
        )));
    }
    let mut rows = Vec::with_capacity(batch);
    for (r, row) in tokens.chunks_exact(len).enumerate() {
        let mut ids = Vec::with_capacity(len);
        for (c, &id) in row.iter().enumerate() {
            if id < 0 || id as usize >= vocab {
                return Err(Failure::new(
                    relora_status::InvalidData,
                    format!(
                        "token id {id} at row {r}, column {c} is outside [0, vocab_size {vocab})"
                    ),
                ));
            }
            ids.push(id as u32);
        }
        rows.push(ids);
    }
    Ok(rows)
}

/// Refuses an empty batch and rows too short to hold an input and its target.
pub(crate) fn check_shape(batch: usize, len: usize) -> FfiResult<()> {
    if batch == 0 {
        return Err(Failure::invalid(
            "batch is 0; a call needs at least one row",
        ));
    }
    if len < 2 {
        return Err(Failure::invalid(format!(
            "len is {len}; each row needs at least 2 tokens (inputs are row[0..len-1], targets \
             row[1..len])"
        )));
    }
    Ok(())
}

/// Rows into batches of at most `per_batch` rows each.
pub fn batches(rows: &[Vec<u32>], per_batch: usize) -> Vec<Batch> {
    rows.chunks(per_batch.max(1))
        .map(|chunk| {
            let seq = chunk[0].len() - 1;
            let mut inputs = Vec::with_capacity(chunk.len() * seq);
            let mut targets = Vec::with_capacity(chunk.len() * seq);
            for row in chunk {
                inputs.extend_from_slice(&row[..seq]);
                targets.extend_from_slice(&row[1..]);
            }
            Batch {
                inputs,
                targets,
                batch: chunk.len(),
                seq_len: seq,
            }
        })
        .collect()
}

/// One named parameter.
struct Entry {
    name: String,
    var: Var,
    /// A projection weight frozen under an adapter.
    frozen: bool,
}

/// Every parameter in a fixed order: the dense ones, then per projection its weight and, when it
/// has one, its adapter.
fn entries(t: &Trainer) -> Vec<Entry> {
    let mut out: Vec<Entry> = t
        .model
        .dense_params()
        .into_iter()
        .map(|(name, var)| Entry {
            name,
            var,
            frozen: false,
        })
        .collect();
    for p in t.model.projections() {
        out.push(Entry {
            name: format!("{}.weight", p.name),
            var: p.weight.clone(),
            frozen: p.adapter.is_some(),
        });
        if let Some(ad) = &p.adapter {
            for (suffix, var) in [("lora_A", &ad.a), ("lora_B", &ad.b)] {
                out.push(Entry {
                    name: format!("{}.{suffix}", p.name),
                    var: var.clone(),
                    frozen: false,
                });
            }
        }
    }
    out
}

impl Session {
    /// A session around `trainer`.
    fn around(trainer: Trainer, options: Options, host_state: Option<String>) -> Self {
        Session {
            trainer,
            options,
            callbacks: Callbacks::default(),
            last_stats: None,
            host_state,
            poison: String::new(),
        }
    }

    /// A trainer with a freshly initialised model, from `options` (validated first), on their
    /// device.
    pub fn create(options: Options) -> FfiResult<Session> {
        options.validate()?;
        let device = parse_device(&options.device)?;
        let trainer = Trainer::new(&options.model, &options.train, &device)?;
        Ok(Session::around(trainer, options, None))
    }

    /// A trainer loaded from the checkpoint `dir`, on `device` ("cpu" when `None`), with the
    /// checkpoint's options and the host state saved with it.
    pub fn load(dir: &str, device: Option<&str>) -> FfiResult<Session> {
        let device = parse_device(device.unwrap_or("cpu"))?;
        let (trainer, manifest) = checkpoint::load(Path::new(dir), &device)?;
        let options = Options {
            train: manifest.train.clone(),
            model: manifest.model.clone(),
            preset: String::new(),
            model_config: String::new(),
            device: device_string(&device),
            tokenizer: manifest.tokenizer.clone().unwrap_or_default(),
        };
        // Checkpoints from before the exact text was kept hold the host's state as JSON in
        // `data` (as does a command-line run's data cursor).
        let host_state = manifest
            .host_state
            .clone()
            .or_else(|| manifest.data.as_ref().map(|v| v.to_string()));
        Ok(Session::around(trainer, options, host_state))
    }

    /// The core trainer.
    pub fn trainer(&self) -> &Trainer {
        &self.trainer
    }

    /// The options the trainer was built from (or read back from its checkpoint).
    pub fn options(&self) -> &Options {
        &self.options
    }

    /// The host state of the checkpoint this trainer was loaded from ("" when none).
    pub fn host_state(&self) -> &str {
        self.host_state.as_deref().unwrap_or_default()
    }

    /// Statistics of the last applied step since creation or loading.
    pub fn last_stats(&self) -> FfiResult<relora_step_stats> {
        self.last_stats.ok_or_else(|| {
            Failure::state("no step has been applied since the trainer was created or loaded")
        })
    }

    /// The vocabulary size token ids are checked against.
    pub(crate) fn vocab(&self) -> usize {
        self.trainer.model.config.vocab_size
    }

    /// Refuses `what` while a split step is being built.
    pub(crate) fn refuse_pending(&self, what: &str) -> FfiResult<()> {
        if self.trainer.has_pending() {
            return Err(Failure::state(format!(
                "{what} is not allowed during a split step: relora_trainer_accumulate was called, \
                 finish the step with relora_trainer_apply first"
            )));
        }
        Ok(())
    }

    /// One optimizer step on `batch` rows of `len` tokens, split into `grad_accum` equal
    /// micro-batches; the progress callback may abort between them (nothing is applied then).
    pub fn step(
        &mut self,
        tokens: &[i32],
        batch: usize,
        len: usize,
    ) -> FfiResult<relora_step_stats> {
        self.refuse_pending("relora_trainer_step")?;
        let rows = rows(tokens, batch, len, self.vocab())?;
        let k = self.trainer.config.grad_accum;
        if !batch.is_multiple_of(k) {
            return Err(Failure::invalid(format!(
                "batch {batch} is not a multiple of grad_accum {k} (the rows are split into \
                 grad_accum equal micro-batches)"
            )));
        }
        let micro = batches(&rows, batch / k);
        for (i, mb) in micro.iter().enumerate() {
            let progress = self
                .trainer
                .accumulate(mb)
                .map_err(Failure::from)
                .and_then(|_| {
                    self.callbacks.progress(
                        relora_progress_stage::MicroBatch,
                        i as u64 + 1,
                        micro.len() as u64,
                    )
                });
            if let Err(f) = progress {
                self.trainer.discard_pending();
                return Err(f);
            }
        }
        let st = self.trainer.apply(None)?;
        Ok(self.record(&st))
    }

    /// Forward and backward of one micro-batch of `batch` rows of `len` tokens, added to the step
    /// being built; returns the micro-batch's mean loss.
    pub fn accumulate(&mut self, tokens: &[i32], batch: usize, len: usize) -> FfiResult<f64> {
        let rows = rows(tokens, batch, len, self.vocab())?;
        Ok(self.trainer.accumulate(&batches(&rows, batch)[0])?)
    }

    /// Finishes a split step: each accumulated gradient through `reducer` (when given), then
    /// clipping, the update and any due ReLoRA event. A failed reduction abandons the step.
    pub fn apply(&mut self, reducer: Option<&mut dyn FaceReducer>) -> FfiResult<relora_step_stats> {
        if !self.trainer.has_pending() {
            return Err(Failure::state(
                "nothing to apply: call relora_trainer_accumulate first",
            ));
        }
        let (result, failure) = match reducer {
            Some(r) => {
                let result = self.trainer.apply(Some(r.reducer()));
                (result, r.failure())
            }
            None => (self.trainer.apply(None), None),
        };
        match (result, failure) {
            (Ok(st), _) => Ok(self.record(&st)),
            (Err(_), Some(message)) => Err(Failure::new(relora_status::CallbackFailed, message)),
            (Err(e), None) => Err(e.into()),
        }
    }

    /// Mean next-token cross-entropy (nats) on `batch` rows of `len` tokens, in chunks of
    /// `batch_size` rows, without changing the trainer.
    pub fn eval(&self, tokens: &[i32], batch: usize, len: usize) -> FfiResult<f64> {
        let rows = rows(tokens, batch, len, self.vocab())?;
        let chunks = batches(&rows, self.trainer.config.batch_size);
        let (mut sum, mut count) = (0.0f64, 0usize);
        for (i, b) in chunks.iter().enumerate() {
            let r = self.trainer.eval(std::slice::from_ref(b))?;
            sum += r.loss * r.tokens as f64;
            count += r.tokens;
            self.callbacks.progress(
                relora_progress_stage::Eval,
                i as u64 + 1,
                chunks.len() as u64,
            )?;
        }
        Ok(sum / count as f64)
    }

    /// Saves a checkpoint to `dir` with the host's JSON state (checked to be JSON, then kept
    /// byte for byte).
    pub fn save(&self, dir: &str, host_state: Option<&str>) -> FfiResult<()> {
        self.refuse_pending("saving")?;
        if let Some(text) = host_state {
            serde_json::from_str::<serde::de::IgnoredAny>(text)
                .map_err(|e| Failure::invalid(format!("host_state is not valid JSON: {e}")))?;
        }
        let tokenizer = Some(self.options.tokenizer.clone()).filter(|t| !t.is_empty());
        let extra = SaveExtra {
            data: None,
            tokenizer,
            host_state: host_state.map(str::to_string),
        };
        checkpoint::save(&self.trainer, Path::new(dir), &extra)?;
        self.callbacks.log(relora_log_level::Info, || {
            format!(
                "saved checkpoint {dir} at step {}",
                self.trainer.step_count()
            )
        });
        Ok(())
    }

    /// Merges the current adapters now, as a scheduled ReLoRA merge does.
    pub fn merge(&mut self) -> FfiResult<()> {
        self.refuse_pending("merging")?;
        if !self.trainer.has_adapters() {
            return Err(Failure::state(
                "no adapters are attached (mode full, or still in the full-rank warm start)",
            ));
        }
        let r = self.trainer.merge_and_reset()?;
        self.callbacks.log(relora_log_level::Info, || {
            format!(
                "step {}: merged phase {} on request; optimizer reset zeroed {} of {} adapter \
                 state entries",
                self.trainer.step_count(),
                r.phase,
                r.zeroed,
                r.positions
            )
        });
        Ok(())
    }

    /// Exports the merged model as a Hugging Face directory at `out` (`dtype` "f32" when `None`,
    /// "bf16" or "f16"; `max_shard_bytes` 0 writes one file).
    pub fn export(
        &self,
        out: &str,
        dtype: Option<&str>,
        max_shard_bytes: u64,
        overwrite: bool,
    ) -> FfiResult<()> {
        let dtype: ExportDType = match dtype {
            None => ExportDType::F32,
            Some(d) => d
                .parse()
                .map_err(|e: Error| Failure::invalid(e.to_string()))?,
        };
        let opts = HfExportOptions {
            dtype,
            max_shard_bytes: (max_shard_bytes > 0).then_some(max_shard_bytes),
            force: overwrite,
        };
        let weights = self.trainer.merged_weights()?;
        let tokenizer = Some(self.options.tokenizer.as_str()).filter(|t| !t.is_empty());
        write_model_dir(
            &weights,
            &self.trainer.model.config,
            tokenizer,
            Path::new(out),
            &opts,
        )?;
        self.callbacks.log(relora_log_level::Info, || {
            format!(
                "exported the merged model ({dtype}) to {out} at step {}",
                self.trainer.step_count()
            )
        });
        Ok(())
    }

    /// The names of the model's parameters now (adapters included while attached).
    pub fn tensor_names(&self) -> Vec<String> {
        entries(&self.trainer).into_iter().map(|e| e.name).collect()
    }

    fn find(&self, name: &str) -> FfiResult<Entry> {
        entries(&self.trainer)
            .into_iter()
            .find(|e| e.name == name)
            .ok_or_else(|| {
                Failure::new(
                    relora_status::UnknownTensor,
                    format!(
                        "'{name}' is not a parameter of this model (list them with \
                         relora_trainer_tensor_count / relora_trainer_tensor_name)"
                    ),
                )
            })
    }

    /// The shape of parameter `name`.
    pub fn tensor_shape(&self, name: &str) -> FfiResult<Vec<usize>> {
        Ok(self.find(name)?.var.dims().to_vec())
    }

    /// Copies parameter `name` as f32, row-major, into `out`, which must hold exactly its
    /// elements.
    pub fn tensor_get(&self, name: &str, out: &mut [f32]) -> FfiResult<()> {
        let e = self.find(name)?;
        let n = e.var.elem_count();
        if out.len() != n {
            return Err(Failure::invalid(format!(
                "{name} has {n} elements, len is {}",
                out.len()
            )));
        }
        let values = e
            .var
            .as_tensor()
            .flatten_all()
            .and_then(|t| t.to_dtype(DType::F32))
            .and_then(|t| t.to_vec1::<f32>())
            .with_ctx(|| format!("reading {name}"))?;
        out.copy_from_slice(&values);
        Ok(())
    }

    /// Overwrites parameter `name` with `values` (f32, row-major, finite, exactly its elements).
    pub fn tensor_set(&mut self, name: &str, values: &[f32]) -> FfiResult<()> {
        if self.trainer.has_pending() {
            return Err(Failure::state(
                "parameters cannot be replaced during a split step (after \
                 relora_trainer_accumulate, before relora_trainer_apply)",
            ));
        }
        let e = self.find(name)?;
        if e.frozen {
            return Err(Failure::state(format!(
                "{name} is frozen under an adapter; set its lora_A / lora_B instead"
            )));
        }
        let n = e.var.elem_count();
        if values.len() != n {
            return Err(Failure::invalid(format!(
                "{name} has {n} elements, len is {}",
                values.len()
            )));
        }
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(Failure::invalid(format!(
                "value {} at index {i} is not finite",
                values[i]
            )));
        }
        let t = Tensor::from_slice(values, e.var.dims(), e.var.device())
            .with_ctx(|| format!("staging {name}"))?;
        set_checked(name, &e.var, &t)?;
        Ok(())
    }

    /// Records a finished step: statistics and log lines.
    fn record(&mut self, stats: &StepStats) -> relora_step_stats {
        let c = relora_step_stats::from_stats(stats, self.trainer.counters().nonfinite_streak);
        let cb = &self.callbacks;
        if stats.switched {
            cb.log(relora_log_level::Info, || {
                format!(
                    "step {}: switched from full rank to rank-{} adapters",
                    stats.step, self.trainer.config.lora_rank
                )
            });
        }
        if let Some(r) = stats.reset {
            cb.log(relora_log_level::Info, || {
                format!(
                    "step {}: merged phase {} into the weights; optimizer reset zeroed {} of {} \
                     adapter state entries",
                    stats.step, r.phase, r.zeroed, r.positions
                )
            });
        }
        if stats.skipped {
            cb.log(relora_log_level::Warn, || {
                format!(
                    "step {} skipped: non-finite loss {} or gradient norm {} ({} skipped in total)",
                    stats.step, stats.loss, stats.grad_norm, stats.skipped_total
                )
            });
        }
        cb.log(relora_log_level::Debug, || {
            format!(
                "step {} loss {:.4} lr {:.3e} grad_norm {:.4} tokens {}",
                stats.step, stats.loss, stats.lr, stats.grad_norm, stats.tokens
            )
        });
        self.last_stats = Some(c);
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_carry_their_shifted_targets() {
        let tokens = [1, 2, 3, 4, 5, 6];
        let r = rows(&tokens, 2, 3, 10).unwrap();
        let b = batches(&r, 2);
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].inputs, [1, 2, 4, 5]);
        assert_eq!(b[0].targets, [2, 3, 5, 6]);
        assert_eq!((b[0].batch, b[0].seq_len), (2, 2));
        let e = rows(&tokens, 2, 3, 6).unwrap_err();
        assert_eq!(e.status, relora_status::InvalidData);
        assert!(e.message.contains("row 1, column 2"), "{}", e.message);
        let e = rows(&[0, -1], 1, 2, 6).unwrap_err();
        assert_eq!(e.status, relora_status::InvalidData);
        let e = rows(&tokens, 2, 2, 10).unwrap_err();
        assert!(e.message.contains("6 token ids given"), "{}", e.message);
    }
}
