//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod gradients;

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

/// Attaches rank-4 adapters (alpha 2) to every projection of `model`, with `seed`, and sets each
/// B to random values (seed `seed + 1`) instead of zero, so the adapters' A matrices receive
/// non-zero gradients in gradient checks.
pub fn attach_random_adapters(model: &mut relora::model::Llama, seed: u64) {
    use candle_core::{Device, Tensor};
    let targets: Vec<String> = relora::config::ALL_TARGETS
        .iter()
        .map(|s| s.to_string())
        .collect();
    relora::model::adapters::attach_adapters(model, &targets, 4, 2.0, &mut Rng::new(seed)).unwrap();
    let mut rng = Rng::new(seed + 1);
    for p in model.projections() {
        let b = &p.adapter.as_ref().unwrap().b;
        let v: Vec<f64> = (0..b.elem_count()).map(|_| rng.normal() * 0.1).collect();
        let v = Tensor::from_vec(v, b.shape(), &Device::Cpu)
            .and_then(|t| t.to_dtype(b.dtype()))
            .unwrap();
        b.set(&v).unwrap();
    }
}
