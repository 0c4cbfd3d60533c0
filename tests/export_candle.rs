//! An exported model loads in candle-transformers' Llama and gives relora's logits.
//!
//! A tiny ReLoRA run (merges done and a live adapter) is exported with
//! `write_model_dir`; candle-transformers reads `config.json` into its `LlamaConfig`, loads
//! `model.safetensors` through a `VarBuilder` and runs its forward. Its logits (it returns only
//! the last position's) must match relora's own forward at the last position within 1e-5
//! relative (max abs difference / max abs logit), both for the trainer's live model (adapter
//! path) and for a plain relora model loaded from the merged weights.

mod common;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_transformers::models::llama as ct;
use common::random_batch;
use relora::config::{Mode, ModelConfig, TrainConfig};
use relora::export::hf::write_model_dir;
use relora::model::Llama;
use relora::rng::Rng;
use relora::Trainer;
use std::path::Path;

const VOCAB: usize = 258;

fn train_cfg() -> TrainConfig {
    TrainConfig {
        mode: Mode::Relora,
        steps: 20,
        batch_size: 2,
        seq_len: 16,
        warmup_steps: 2,
        warmup_full_steps: 4,
        reset_every: 4,
        restart_warmup_steps: 1,
        lora_rank: 4,
        lora_alpha: 8.0,
        ..Default::default()
    }
}

/// Fourteen ReLoRA steps on random tokens: full-rank warmup to step 4, merges at steps 8 and
/// 12, then a live adapter trained for two more steps.
fn trained(model_cfg: &ModelConfig) -> Trainer {
    let mut t = Trainer::new(model_cfg, &train_cfg(), &Device::Cpu).unwrap();
    for s in 0..14 {
        t.step(&[random_batch(2, 16, VOCAB, 100 + s)]).unwrap();
    }
    assert!(
        t.phases().len() >= 2,
        "expected two merges by step 14, phases: {}",
        t.phases().len()
    );
    assert!(t.has_adapters());
    t
}

/// candle-transformers' Llama, loaded from an export directory.
fn load_candle(dir: &Path) -> (ct::Llama, ct::Config) {
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let cfg: ct::LlamaConfig = serde_json::from_str(&text).unwrap();
    let cfg = cfg.into_config(false);
    let weights = dir.join("model.safetensors");
    // SAFETY: the file was just written by this test and is not modified while mapped.
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, &Device::Cpu)
    }
    .unwrap();
    (ct::Llama::load(vb, &cfg).unwrap(), cfg)
}

/// Max abs difference divided by max abs reference value.
fn rel_diff(got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.dims(), want.dims());
    let g = common::values(got);
    let w = common::values(want);
    let diff = g
        .iter()
        .zip(&w)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f64, f64::max);
    let scale = w.iter().map(|v| v.abs()).fold(0.0f64, f64::max);
    assert!(scale > 0.0 && diff.is_finite());
    diff / scale
}

/// Trains, exports, loads in candle-transformers and compares logits for several prompt
/// lengths; returns the worst relative difference seen.
fn check(model_cfg: &ModelConfig) -> f64 {
    let t = trained(model_cfg);
    let merged = t.merged_weights().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("hf");
    write_model_dir(
        &merged,
        &t.model.config,
        Some("bytes"),
        &dir,
        &Default::default(),
    )
    .unwrap();

    // relora's plain model holding the merged weights (no adapters).
    let mut plain =
        Llama::new(&t.model.config, DType::F32, &Device::Cpu, &mut Rng::new(0)).unwrap();
    plain.load_weights(&merged, true).unwrap();

    let (ctm, ccfg) = load_candle(&dir);
    let dev = Device::Cpu;
    let mut worst = 0.0f64;
    for (i, &len) in [1usize, 5, 16, 40].iter().enumerate() {
        let b = random_batch(2, len, VOCAB, 7 + i as u64);
        let ids = Tensor::from_vec(b.inputs, (2, len), &dev).unwrap();
        let mut cache = ct::Cache::new(false, DType::F32, &ccfg, &dev).unwrap();
        let got = ctm.forward(&ids, 0, &mut cache).unwrap();
        assert_eq!(got.dims(), &[2, VOCAB]);
        for (name, model) in [("trainer (live adapter)", &t.model), ("merged", &plain)] {
            let want = model.forward(&ids, None).unwrap();
            let want = want
                .i((.., len - 1, ..))
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let r = rel_diff(&got, &want);
            println!("len {len:2} vs {name}: max rel diff {r:.3e}");
            assert!(
                r < 1e-5,
                "len {len} vs {name}: max rel diff {r:.3e} >= 1e-5"
            );
            worst = worst.max(r);
        }
    }
    worst
}

fn tiny() -> ModelConfig {
    common::tiny(VOCAB)
}

#[test]
fn candle_transformers_matches_untied_gqa() {
    let cfg = tiny();
    assert_eq!(cfg.num_key_value_heads, Some(2));
    assert!(!cfg.tie_word_embeddings);
    println!("worst max rel diff: {:.3e}", check(&cfg));
}

#[test]
fn candle_transformers_matches_tied_embeddings() {
    let mut cfg = tiny();
    cfg.tie_word_embeddings = true;
    println!("worst max rel diff: {:.3e}", check(&cfg));
}

/// candle-transformers reads only the top-level `rope_theta`; a non-default theta and eps
/// must survive the export.
#[test]
fn candle_transformers_matches_nondefault_rope_and_eps() {
    let mut cfg = tiny();
    cfg.rope_theta = 500_000.0;
    cfg.rms_norm_eps = 1e-5;
    println!("worst max rel diff: {:.3e}", check(&cfg));
}
