//! Helpers shared by the integration tests.
#![allow(dead_code)]

use relora::config::{Mode, ModelConfig, TrainConfig};
use relora::data::batcher::Batch;
use relora::rng::Rng;

/// The tiny preset with a small vocabulary, so float64 checks stay fast.
pub fn tiny(vocab: usize) -> ModelConfig {
    let mut c = ModelConfig::preset("tiny").unwrap();
    c.vocab_size = vocab;
    c
}

/// A training configuration for short test runs.
pub fn train_cfg(mode: Mode, dtype: &str) -> TrainConfig {
    TrainConfig {
        mode,
        steps: 40,
        batch_size: 2,
        seq_len: 8,
        lr: 3e-3,
        warmup_steps: 2,
        warmup_full_steps: 4,
        reset_every: 5,
        restart_warmup_steps: 2,
        lora_rank: 4,
        lora_alpha: 8.0,
        dtype: dtype.to_string(),
        ..TrainConfig::default()
    }
}

/// A batch of random tokens below `vocab`.
pub fn random_batch(batch: usize, seq: usize, vocab: usize, seed: u64) -> Batch {
    let mut rng = Rng::new(seed);
    let n = batch * seq;
    Batch {
        inputs: (0..n).map(|_| rng.below(vocab as u64) as u32).collect(),
        targets: (0..n).map(|_| rng.below(vocab as u64) as u32).collect(),
        batch,
        seq_len: seq,
    }
}

/// Flattened f64 copy of a tensor.
pub fn values(t: &candle_core::Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(candle_core::DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}
