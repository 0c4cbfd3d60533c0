//! The trainer: one object that runs all four arms of the paper's comparison (full, LoRA, LoRA
//! after a warm start, ReLoRA). A step is readable top to bottom in [`Trainer::accumulate`] and
//! [`Trainer::apply`]; [`Trainer::step`] does both for callers that don't reduce gradients
//! themselves.

use crate::config::{Mode, ModelConfig, TrainConfig};
use crate::data::batcher::Batch;
use crate::error::{Error, Result, TensorContext};
use crate::model::adapters::{attach_adapters, merge_and_reinit};
use crate::model::llama::is_decayed;
use crate::model::loss::{cross_entropy, cross_entropy_sum};
use crate::model::{Llama, ParamGrads};
use crate::optim::{clip, AdamW, AdamWConfig, ResetReport};
use crate::profile::region;
use crate::relora::merge::Phase;
use crate::relora::BaseWeights;
use crate::rng::Rng;
use crate::schedule::Schedule;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::time::Instant;

pub use crate::train_state::{
    EvalResult, GradientReducer, ResetSummary, StepStats, StepTimings, TrainerCounters, TrainerRngs,
};

/// The whole training state.
pub struct Trainer {
    /// The model.
    pub model: Llama,
    /// The training options (validated).
    pub config: TrainConfig,
    optimizer: AdamW,
    schedule: Schedule,
    counters: TrainerCounters,
    rngs: TrainerRngs,
    /// Target projection weights at the switch to adapters (`{module}.weight`), on disk.
    base: Option<BaseWeights>,
    phases: Vec<Phase>,
    /// Gradients summed over the micro-batches of the step being built, in trainable order.
    pending: Option<Pending>,
    /// The step whose switch/reset has been performed, so a retried step doesn't repeat it.
    prepared_step: Option<u64>,
    prepared_events: (bool, Option<ResetSummary>),
    prepare_ms: f64,
    /// A step whose first micro-batch reports a non-finite loss (fault injection for tests).
    fault_nonfinite_at: Option<u64>,
}

struct Pending {
    grads: Vec<Tensor>,
    timings: StepTimings,
    loss_sum: f64,
    micro_batches: usize,
    tokens: usize,
    non_finite: bool,
}

impl Trainer {
    /// A new trainer with a freshly initialised model (seeded by `config.seed`).
    pub fn new(model_config: &ModelConfig, config: &TrainConfig, device: &Device) -> Result<Self> {
        config.validate_for(model_config)?;
        let mut init_rng = Rng::derived(config.seed, "init");
        let model = Llama::new(model_config, config.candle_dtype()?, device, &mut init_rng)?;
        Self::assemble(
            model,
            config.clone(),
            TrainerCounters::default(),
            TrainerRngs::new(config.seed),
        )
    }

    /// Assembles a trainer from restored parts (used by checkpoint loading), checking the
    /// options against the model.
    pub(crate) fn from_parts(
        model: Llama,
        config: TrainConfig,
        counters: TrainerCounters,
        rngs: TrainerRngs,
    ) -> Result<Self> {
        config.validate_for(&model.config)?;
        Self::assemble(model, config, counters, rngs)
    }

    /// The trainer around validated parts.
    fn assemble(
        mut model: Llama,
        config: TrainConfig,
        counters: TrainerCounters,
        rngs: TrainerRngs,
    ) -> Result<Self> {
        model.set_compute_dtype(config.candle_compute_dtype()?);
        let optimizer = AdamW::new(AdamWConfig {
            beta1: config.beta1,
            beta2: config.beta2,
            eps: config.eps,
            weight_decay: config.weight_decay,
        });
        Ok(Trainer {
            model,
            schedule: config.schedule(),
            config,
            optimizer,
            counters,
            rngs,
            base: None,
            phases: Vec::new(),
            pending: None,
            prepared_step: None,
            prepared_events: (false, None),
            prepare_ms: 0.0,
            fault_nonfinite_at: None,
        })
    }

    /// Optimizer steps completed.
    pub fn step_count(&self) -> u64 {
        self.counters.step
    }

    /// Counters (step, skipped steps, non-finite streak).
    pub fn counters(&self) -> &TrainerCounters {
        &self.counters
    }

    /// The random streams.
    pub fn rngs(&self) -> &TrainerRngs {
        &self.rngs
    }

    /// The optimizer.
    pub fn optimizer(&self) -> &AdamW {
        &self.optimizer
    }

    /// Mutable optimizer access (restoring state, inspection tools).
    pub(crate) fn optimizer_mut(&mut self) -> &mut AdamW {
        &mut self.optimizer
    }

    /// The learning-rate schedule.
    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    /// Completed ReLoRA phases, in merge order.
    pub fn phases(&self) -> &[Phase] {
        &self.phases
    }

    /// Target weights as of the switch to adapters, if it has happened.
    pub fn base_weights(&self) -> Option<&BaseWeights> {
        self.base.as_ref()
    }

    /// Whether adapters are attached.
    pub fn has_adapters(&self) -> bool {
        self.model.projections().iter().any(|p| p.adapter.is_some())
    }

    /// Restores the ReLoRA history (checkpoint loading): the base weights and completed phases.
    pub(crate) fn restore_history(&mut self, base: Option<BaseWeights>, phases: Vec<Phase>) {
        self.base = base;
        self.phases = phases;
    }

    /// The learning rate for the step about to be taken: the schedule's multiplier times `lr`, or
    /// times `adapter_lr` (when set) once adapters are attached.
    pub fn current_lr(&self) -> f64 {
        let peak = if self.has_adapters() && self.config.adapter_lr > 0.0 {
            self.config.adapter_lr
        } else {
            self.config.lr
        };
        peak * self.schedule.multiplier(self.counters.step)
    }

    /// Drops a half-built step (after `accumulate`, before `apply`): nothing is applied; a switch
    /// or merge already performed for this step stays done and is not repeated.
    pub(crate) fn discard_pending(&mut self) {
        self.pending = None;
    }

    /// Whether a gradient accumulation is in progress (a save must wait for `apply`).
    pub fn has_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// Performs the structural events due before step `t`: the switch from full rank to adapters
    /// and, in ReLoRA, the merge + re-init + optimizer reset. Idempotent per step.
    fn prepare_step(&mut self) -> Result<()> {
        let t = self.counters.step;
        if self.prepared_step == Some(t) {
            return Ok(());
        }
        let started = Instant::now();
        let mut switched = false;
        let mut reset = None;
        if self.config.uses_adapters() && !self.has_adapters() && t >= self.config.warmup_full_steps
        {
            self.switch_to_adapters()?;
            switched = true;
        } else if self.config.mode == Mode::Relora
            && self.has_adapters()
            && self.schedule.is_reset_step(t)
        {
            reset = Some(self.merge_and_reset()?);
        }
        self.prepared_step = Some(t);
        self.prepared_events = (switched, reset);
        self.prepare_ms = started.elapsed().as_secs_f64() * 1e3;
        Ok(())
    }

    /// Freezes the target projections, keeps a copy of their weights as the base, attaches fresh
    /// adapters and drops the frozen weights' optimizer state.
    fn switch_to_adapters(&mut self) -> Result<()> {
        let cfg = self.config.clone();
        let modules = attach_adapters(
            &mut self.model,
            &cfg.target_modules,
            cfg.lora_rank,
            cfg.lora_scale(),
            &mut self.rngs.adapters,
        )?;
        let mut base = Vec::with_capacity(modules.len());
        for p in self.model.projections() {
            if p.adapter.is_some() {
                let name = format!("{}.weight", p.name);
                self.optimizer.remove(&name);
                base.push((name, p.weight.as_tensor()));
            }
        }
        self.base = Some(BaseWeights::spill(base)?);
        Ok(())
    }

    /// Merges the adapters into the frozen weights (fp32), re-initialises them and prunes their
    /// optimizer state. Public so hosts can merge on demand ("merge now").
    pub fn merge_and_reset(&mut self) -> Result<ResetSummary> {
        crate::engine::scoped(self.config.engine, || self.merge_and_reset_scoped())
    }

    fn merge_and_reset_scoped(&mut self) -> Result<ResetSummary> {
        if !self.has_adapters() {
            return Err(Error::Config(
                "merge requested but no adapters are attached".into(),
            ));
        }
        let index = self.phases.len() + 1;
        let phase = merge_and_reinit(
            &mut self.model,
            index,
            self.counters.step,
            &mut self.rngs.adapters,
        )?;
        self.phases.push(phase);
        let report: ResetReport = self.optimizer.reset(
            |name| name.ends_with(".lora_A") || name.ends_with(".lora_B"),
            self.config.reset_mode,
            &mut self.rngs.reset,
        )?;
        Ok(ResetSummary {
            phase: index,
            positions: report.positions,
            zeroed: report.zeroed,
        })
    }

    /// Checks a batch's shape and token ids against the model.
    fn check_batch(&self, batch: &Batch) -> Result<()> {
        let n = batch.batch * batch.seq_len;
        if n == 0 || batch.inputs.len() != n || batch.targets.len() != n {
            return Err(Error::Data(format!(
                "batch of {} x {} needs {n} inputs and targets, got {} and {}",
                batch.batch,
                batch.seq_len,
                batch.inputs.len(),
                batch.targets.len()
            )));
        }
        if batch.seq_len > self.model.config.max_position_embeddings {
            return Err(Error::Data(format!(
                "sequence length {} exceeds max_position_embeddings {}",
                batch.seq_len, self.model.config.max_position_embeddings
            )));
        }
        let vocab = self.model.config.vocab_size;
        for (what, ids) in [("input", &batch.inputs), ("target", &batch.targets)] {
            if let Some((pos, id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
                return Err(Error::Data(format!(
                    "{what} token id {id} at position {pos} (row {}, column {}) is >= vocab_size {vocab}",
                    pos / batch.seq_len,
                    pos % batch.seq_len
                )));
            }
        }
        Ok(())
    }

    fn batch_tensors(&self, batch: &Batch) -> Result<(Tensor, Tensor)> {
        let dev = self.model.device();
        let ids =
            Tensor::from_slice(&batch.inputs, (batch.batch, batch.seq_len), dev).ctx("inputs")?;
        let targets =
            Tensor::from_slice(&batch.targets, batch.batch * batch.seq_len, dev).ctx("targets")?;
        Ok((ids, targets))
    }

    /// Forward + backward of one micro-batch, adding its gradients to the step being built.
    /// Returns the micro-batch's loss. Non-finite losses mark the step for skipping.
    pub fn accumulate(&mut self, batch: &Batch) -> Result<f64> {
        crate::engine::scoped(self.config.engine, || self.accumulate_scoped(batch))
    }

    fn accumulate_scoped(&mut self, batch: &Batch) -> Result<f64> {
        self.check_batch(batch)?;
        self.prepare_step()?;
        let started = Instant::now();
        let (ids, targets) = self.batch_tensors(batch)?;
        let params = self.model.trainable_params();
        let p = self.config.lora_dropout;
        let dropout = (p > 0.0).then_some((&mut self.rngs.dropout, p));
        let layer_grads = ParamGrads::new();
        let logits = self
            .model
            .forward_for_training(&ids, dropout, &layer_grads)?;
        let v = self.model.config.vocab_size;
        let logits = logits
            .reshape((batch.batch * batch.seq_len, v))
            .ctx("logits")?;
        let dev = self.model.device().clone();
        let loss =
            region("fwd loss", &dev, || cross_entropy(&logits, &targets)).ctx("cross-entropy")?;
        let mut loss_value = region("fwd loss", &dev, || {
            loss.to_dtype(DType::F64)?.to_scalar::<f64>()
        })
        .ctx("loss")?;
        if self.fault_nonfinite_at == Some(self.counters.step) {
            self.fault_nonfinite_at = None;
            loss_value = f64::NAN;
        }
        // Average over micro-batches so the step's gradient is the mean over all of them.
        let scaled = loss
            .affine(1.0 / self.config.grad_accum as f64, 0.0)
            .ctx("loss scale")?;
        let forward_ms = started.elapsed().as_secs_f64() * 1e3;
        let started = Instant::now();
        // The layer nodes' backward runs inside, in regions of its own.
        let mut grads = region("bwd graph (loss, head, embedding)", &dev, || {
            scaled.backward()
        })
        .ctx("backward")?;
        let step_grads = region("bwd collect gradients", &dev, || {
            layer_grads
                .merge_into(&mut grads)
                .ctx("gradients of the decoder layers")?;
            let mut step_grads = Vec::with_capacity(params.len());
            for (name, var) in &params {
                let g = match grads.get(var.as_tensor()) {
                    Some(g) => g.clone(),
                    None => var
                        .zeros_like()
                        .with_ctx(|| format!("zero gradient for {name}"))?,
                };
                step_grads.push(g);
            }
            Ok::<_, Error>(step_grads)
        })?;
        drop(grads);
        // GPU kernels run asynchronously: wait for the backward pass so its time is not
        // counted as the optimizer's (the next host read would wait anyway).
        self.model
            .device()
            .synchronize()
            .ctx("synchronizing after backward")?;
        let pending = self.pending.get_or_insert_with(|| Pending {
            grads: Vec::new(),
            timings: StepTimings::default(),
            loss_sum: 0.0,
            micro_batches: 0,
            tokens: 0,
            non_finite: false,
        });
        if pending.grads.is_empty() {
            pending.grads = step_grads;
        } else {
            region("bwd accumulate micro-batches", &dev, || {
                for (acc, g) in pending.grads.iter_mut().zip(step_grads) {
                    *acc = (&*acc + g).ctx("gradient accumulation")?;
                }
                Ok::<_, Error>(())
            })?;
        }
        pending.loss_sum += loss_value;
        pending.micro_batches += 1;
        pending.tokens += batch.batch * batch.seq_len;
        pending.non_finite |= !loss_value.is_finite();
        pending.timings.forward_ms += forward_ms;
        pending.timings.backward_ms += started.elapsed().as_secs_f64() * 1e3;
        Ok(loss_value)
    }

    /// Finishes the step: optional gradient reduction, clipping, and the AdamW update at the
    /// scheduled learning rate. A non-finite loss or gradient skips the update (nothing applied,
    /// nothing merged) and is counted; too many in a row is an error.
    pub fn apply(&mut self, reducer: Option<&mut dyn GradientReducer>) -> Result<StepStats> {
        crate::engine::scoped(self.config.engine, || self.apply_scoped(reducer))
    }

    fn apply_scoped(&mut self, reducer: Option<&mut dyn GradientReducer>) -> Result<StepStats> {
        let Some(mut pending) = self.pending.take() else {
            return Err(Error::Config(
                "apply called without any accumulated micro-batch".into(),
            ));
        };
        let started = Instant::now();
        let dev = self.model.device().clone();
        let params = self.model.trainable_params();
        if let Some(r) = reducer {
            if pending.non_finite {
                // A non-finite loss here must skip the step on every rank, not only this one:
                // poisoned, this rank's gradient makes the reduced gradients, and so every
                // rank's norm, non-finite too.
                if let Some(g) = pending.grads.first_mut() {
                    *g = g.affine(0.0, f64::NAN).ctx("marking a non-finite step")?;
                }
            }
            let names: Vec<&str> = params.iter().map(|(n, _)| n.as_str()).collect();
            region("opt reduce across ranks", &dev, || {
                r.reduce_all(&names, &mut pending.grads)
            })?;
        }
        let loss = pending.loss_sum / pending.micro_batches as f64;
        let grad_norm = region("opt gradient norm", &dev, || {
            clip::global_norm(&pending.grads)
        })?;
        let lr = self.current_lr();
        let (switched, reset) = self.prepared_events;
        let mut stats = StepStats {
            step: self.counters.step,
            loss,
            lr,
            grad_norm,
            phase: self.phases.len(),
            adapters: self.has_adapters(),
            skipped: false,
            skipped_total: self.counters.skipped_total,
            tokens: pending.tokens,
            reset,
            switched,
            timings: StepTimings {
                merge_reset_ms: if switched || reset.is_some() {
                    self.prepare_ms
                } else {
                    0.0
                },
                ..pending.timings
            },
        };
        if pending.non_finite || !grad_norm.is_finite() {
            self.counters.skipped_total += 1;
            self.counters.nonfinite_streak += 1;
            stats.skipped = true;
            stats.skipped_total = self.counters.skipped_total;
            if self.counters.nonfinite_streak >= self.config.max_nonfinite_steps {
                return Err(Error::NonFinite {
                    step: self.counters.step,
                    count: self.counters.nonfinite_streak,
                    loss,
                });
            }
            return Ok(stats);
        }
        let clip_scale = clip::coefficient(grad_norm, self.config.grad_clip);
        let decay: Vec<bool> = params
            .iter()
            .map(|(n, v)| is_decayed(n, v.dims()))
            .collect();
        region("opt adamw", &dev, || {
            self.optimizer
                .step_scaled(&params, &pending.grads, &decay, lr, clip_scale)
        })?;
        self.model
            .device()
            .synchronize()
            .ctx("synchronizing after the update")?;
        self.counters.step += 1;
        self.counters.nonfinite_streak = 0;
        self.prepared_events = (false, None);
        stats.step = self.counters.step;
        stats.timings.optimizer_ms = started.elapsed().as_secs_f64() * 1e3;
        Ok(stats)
    }

    /// One optimizer step over `micro_batches` (normally `grad_accum` of them).
    pub fn step(&mut self, micro_batches: &[Batch]) -> Result<StepStats> {
        if micro_batches.is_empty() {
            return Err(Error::Data("a step needs at least one micro-batch".into()));
        }
        for b in micro_batches {
            if let Err(e) = self.accumulate(b) {
                self.discard_pending();
                return Err(e);
            }
        }
        self.apply(None)
    }

    /// Mean loss and perplexity over `batches`, without touching any state.
    pub fn eval(&self, batches: &[Batch]) -> Result<EvalResult> {
        crate::engine::scoped(self.config.engine, || self.eval_scoped(batches))
    }

    fn eval_scoped(&self, batches: &[Batch]) -> Result<EvalResult> {
        let mut sum = 0.0f64;
        let mut tokens = 0usize;
        for b in batches {
            self.check_batch(b)?;
            let (ids, targets) = self.batch_tensors(b)?;
            let logits = self.model.forward(&ids, None)?.detach();
            let v = self.model.config.vocab_size;
            let logits = logits.reshape((b.batch * b.seq_len, v)).ctx("logits")?;
            sum += cross_entropy_sum(&logits, &targets)
                .and_then(|l| l.to_dtype(DType::F64))
                .and_then(|l| l.to_scalar::<f64>())
                .ctx("eval loss")?;
            tokens += b.batch * b.seq_len;
        }
        if tokens == 0 {
            return Err(Error::Data("evaluation needs at least one token".into()));
        }
        let loss = sum / tokens as f64;
        Ok(EvalResult {
            loss,
            perplexity: loss.exp(),
            tokens,
        })
    }

    /// The weights a plain LLaMA would have now: every projection with its current adapter merged
    /// in (fp32), under Hugging Face names. The trainer's state is not changed.
    pub fn merged_weights(&self) -> Result<HashMap<String, Tensor>> {
        crate::engine::scoped(self.config.engine, || self.merged_weights_scoped())
    }

    fn merged_weights_scoped(&self) -> Result<HashMap<String, Tensor>> {
        let mut out: HashMap<String, Tensor> = self.model.weights().into_iter().collect();
        for p in self.model.projections() {
            if let Some(merged) = p.merged_weight()? {
                out.insert(format!("{}.weight", p.name), merged);
            }
        }
        Ok(out)
    }

    /// Makes the first micro-batch of step `step` report a non-finite loss while its gradients
    /// stay finite, once: what an overflow on one data-parallel rank looks like. For tests.
    #[doc(hidden)]
    pub fn inject_nonfinite_loss_at(&mut self, step: u64) {
        self.fault_nonfinite_at = Some(step);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Mode, ModelConfig};

    /// Records whether any gradient it reduced held a non-finite value.
    struct Recorder {
        saw_non_finite: bool,
    }

    impl GradientReducer for Recorder {
        fn reduce(&mut self, _name: &str, grad: &mut [f32]) -> Result<()> {
            self.saw_non_finite |= grad.iter().any(|v| !v.is_finite());
            Ok(())
        }
    }

    #[test]
    fn a_non_finite_loss_reaches_the_other_ranks_through_the_reduction() {
        let mut model = ModelConfig::preset("tiny").unwrap();
        model.vocab_size = 32;
        let cfg = TrainConfig {
            mode: Mode::Full,
            batch_size: 1,
            seq_len: 4,
            ..TrainConfig::default()
        };
        let mut t = Trainer::new(&model, &cfg, &Device::Cpu).unwrap();
        let batch = Batch {
            inputs: vec![1, 2, 3, 4],
            targets: vec![2, 3, 4, 5],
            batch: 1,
            seq_len: 4,
        };
        // A finite step first: the reducer sees finite gradients and the update applies.
        t.accumulate(&batch).unwrap();
        let mut r = Recorder {
            saw_non_finite: false,
        };
        assert!(!t.apply(Some(&mut r)).unwrap().skipped);
        assert!(!r.saw_non_finite);
        // The same batch with this rank's loss marked non-finite (an overflow the gradients did
        // not show): what the other ranks receive must carry it, and the step is skipped.
        t.accumulate(&batch).unwrap();
        t.pending.as_mut().unwrap().non_finite = true;
        let st = t.apply(Some(&mut r)).unwrap();
        assert!(r.saw_non_finite, "the reduction carried only finite values");
        assert!(st.skipped);
    }
}
