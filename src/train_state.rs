//! What a trainer's state and its steps are made of, below the trainer itself: the counters
//! and random streams a checkpoint stores, the statistics a step and an evaluation report, and
//! the hook through which a step's gradients are reduced across data-parallel ranks. Checkpoints,
//! imports and the data-parallel reducers use these without depending on the trainer.

use crate::error::{Result, TensorContext};
use crate::rng::Rng;
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

/// What one optimizer step did.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StepStats {
    /// Optimizer steps completed after this one (skipped steps don't count).
    pub step: u64,
    /// Mean loss over the step's micro-batches, as computed (in f64 from the loss tensors).
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Completed ReLoRA merges so far (0 while full-rank or in plain LoRA).
    pub phase: usize,
    /// Whether adapters are attached.
    pub adapters: bool,
    /// Whether this step was skipped for a non-finite loss or gradient.
    pub skipped: bool,
    /// Steps skipped in the whole run.
    pub skipped_total: u64,
    /// Tokens processed by this step (all micro-batches).
    pub tokens: usize,
    /// Set when a merge and optimizer reset happened right before this step.
    pub reset: Option<ResetSummary>,
    /// Set when the model switched from full rank to adapters right before this step.
    pub switched: bool,
    /// Wall-clock time spent in each part of the step.
    pub timings: StepTimings,
}

/// Where a step's wall-clock time went, in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StepTimings {
    /// Forward passes and the loss, all micro-batches.
    pub forward_ms: f64,
    /// Backward passes and gradient accumulation, all micro-batches.
    pub backward_ms: f64,
    /// Reduction, clipping and the AdamW update.
    pub optimizer_ms: f64,
    /// The merge, re-init and optimizer reset (or the switch) before this step.
    pub merge_reset_ms: f64,
}

/// What a merge + optimizer reset did, for the log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResetSummary {
    /// The phase that was completed (1-based).
    pub phase: usize,
    /// Optimizer state positions considered.
    pub positions: usize,
    /// Positions zeroed in both moments.
    pub zeroed: usize,
}

/// Result of evaluating held-out data.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalResult {
    /// Mean next-token cross-entropy (nats).
    pub loss: f64,
    /// exp(loss).
    pub perplexity: f64,
    /// Tokens scored.
    pub tokens: usize,
}

/// Receives each trainable gradient before the optimizer step, e.g. to all-reduce it across
/// data-parallel ranks. The buffer holds the gradient as f32, row-major.
pub trait GradientReducer {
    /// Reduces `grad` (of parameter `name`) in place.
    fn reduce(&mut self, name: &str, grad: &mut [f32]) -> Result<()>;

    /// Reduces all trainable gradients of one step in place; `names[i]` names `grads[i]`, in the
    /// trainer's fixed order (the same on every rank with the same configuration and step). The
    /// default converts each gradient to f32 and calls [`GradientReducer::reduce`] once per
    /// parameter, in order, stopping at the first error; reducers that pack gradients into
    /// flat buckets (see `crate::distributed`) override it.
    fn reduce_all(&mut self, names: &[&str], grads: &mut [Tensor]) -> Result<()> {
        for (name, g) in names.iter().zip(grads.iter_mut()) {
            let ctx = || format!("reducing gradient of {name}");
            let mut buf: Vec<f32> = g
                .flatten_all()
                .and_then(|t| t.to_dtype(DType::F32))
                .and_then(|t| t.to_vec1())
                .with_ctx(ctx)?;
            self.reduce(name, &mut buf)?;
            *g = Tensor::from_vec(buf, g.shape(), g.device())
                .and_then(|t| t.to_dtype(g.dtype()))
                .with_ctx(ctx)?;
        }
        Ok(())
    }
}

/// The random streams the trainer draws from; part of the checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainerRngs {
    /// Adapter (re-)initialisation.
    pub adapters: Rng,
    /// Random pruning of optimizer state.
    pub reset: Rng,
    /// Adapter-input dropout masks.
    pub dropout: Rng,
}

impl TrainerRngs {
    /// The streams for `seed`.
    pub fn new(seed: u64) -> Self {
        TrainerRngs {
            adapters: Rng::derived(seed, "adapters"),
            reset: Rng::derived(seed, "optimizer-reset"),
            dropout: Rng::derived(seed, "dropout"),
        }
    }
}

/// Counters that a resumed run must continue from.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainerCounters {
    /// Optimizer steps completed.
    pub step: u64,
    /// Steps skipped for non-finite values, in the whole run.
    pub skipped_total: u64,
    /// Non-finite steps in a row right now.
    pub nonfinite_streak: u32,
}
