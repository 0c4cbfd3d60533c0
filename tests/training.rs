//! End-to-end training behaviour: the tiny model learns the built-in corpus, non-finite steps are
//! skipped without touching any state, and bad inputs are clear errors rather than panics.

mod common;

use candle_core::{Device, Tensor};
use common::{random_batch, tiny, train_cfg, values};
use relora::config::{Mode, ModelConfig, TrainConfig};
use relora::data::batcher::{eval_batches, Batcher};
use relora::data::corpus::{builtin_eval_text, builtin_train_text, unigram_entropy_nats};
use relora::data::tokenizer::Tokenizer;
use relora::data::tokens::{load_tokens, DataSource};
use relora::trainer::GradientReducer;
use relora::{Error, Trainer};

#[test]
fn tiny_relora_learns_the_builtin_corpus_beyond_unigram_statistics() {
    let tok = Tokenizer::bytes();
    let train = load_tokens(&DataSource::parse("builtin"), &tok).unwrap();
    let eval = load_tokens(&DataSource::parse("builtin-eval"), &tok).unwrap();
    let model = tiny(tok.vocab_size());
    let cfg = TrainConfig {
        mode: Mode::Relora,
        steps: 150,
        batch_size: 8,
        seq_len: 64,
        lr: 3e-3,
        warmup_steps: 10,
        warmup_full_steps: 50,
        reset_every: 30,
        restart_warmup_steps: 5,
        lora_rank: 8,
        lora_alpha: 16.0,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(&model, &cfg, &Device::Cpu).unwrap();
    let batches = eval_batches(&eval, 8, 64, Some(8));
    let before = trainer.eval(&batches).unwrap().loss;
    let mut batcher = Batcher::new(train, 8, 64, 3).unwrap();
    let mut merges = 0;
    for _ in 0..cfg.steps {
        let st = trainer.step(&[batcher.next_batch()]).unwrap();
        merges += st.reset.is_some() as usize;
        assert!(!st.skipped);
    }
    let after = trainer.eval(&batches).unwrap().loss;
    // The threshold: the empirical byte-unigram entropy of the held-out text. A model that only
    // learned byte frequencies sits at that value; going below it requires using context.
    let unigram = unigram_entropy_nats(builtin_eval_text().as_bytes());
    eprintln!("eval loss {before:.3} -> {after:.3}; unigram entropy {unigram:.3}");
    assert!(
        before > 5.0,
        "an untrained model should be near ln(258) = 5.55, got {before}"
    );
    assert!(
        after < unigram - 0.3,
        "eval loss {after:.3} not below unigram entropy {unigram:.3} - 0.3"
    );
    assert_eq!(merges, 3, "merges at steps 80, 110, 140");
    assert!(!builtin_train_text().is_empty());
}

#[test]
fn non_finite_steps_are_skipped_without_touching_state_then_stop_the_run() {
    let mut cfg = train_cfg(Mode::Relora, "f32");
    cfg.max_nonfinite_steps = 3;
    let mut t = Trainer::new(&tiny(40), &cfg, &Device::Cpu).unwrap();
    for s in 0..6 {
        t.step(&[random_batch(2, 8, 40, s)]).unwrap();
    }
    // Poison one norm weight: every forward now produces NaN.
    let norm = t
        .model
        .dense_params()
        .into_iter()
        .find(|(n, _)| n == "model.norm.weight")
        .unwrap()
        .1;
    let good = norm.as_tensor().copy().unwrap();
    let mut poisoned = values(&good);
    poisoned[0] = f64::NAN;
    norm.set(
        &Tensor::from_vec(
            poisoned.iter().map(|v| *v as f32).collect::<Vec<_>>(),
            good.shape(),
            &Device::Cpu,
        )
        .unwrap(),
    )
    .unwrap();
    let snapshot = |t: &Trainer| -> Vec<Vec<f64>> {
        let mut v: Vec<Vec<f64>> = t
            .model
            .trainable_params()
            .iter()
            .map(|(_, p)| values(p.as_tensor()))
            .collect();
        for s in t.optimizer().states().values() {
            v.push(values(&s.exp_avg));
            v.push(values(&s.exp_avg_sq));
        }
        v
    };
    let bits = |v: Vec<Vec<f64>>| -> Vec<Vec<u64>> {
        v.into_iter()
            .map(|x| x.into_iter().map(f64::to_bits).collect())
            .collect()
    };
    let before = bits(snapshot(&t));
    let step_before = t.step_count();
    for i in 0..2 {
        let st = t.step(&[random_batch(2, 8, 40, 100 + i)]).unwrap();
        assert!(st.skipped && st.loss.is_nan());
        assert_eq!(st.skipped_total, i + 1);
    }
    assert_eq!(
        bits(snapshot(&t)),
        before,
        "a skipped step changed weights or optimizer state"
    );
    assert_eq!(t.step_count(), step_before);
    // The third in a row stops with a clear error.
    let err = t.step(&[random_batch(2, 8, 40, 200)]).unwrap_err();
    assert!(matches!(err, Error::NonFinite { count: 3, .. }), "{err}");
    assert!(err.to_string().contains("non-finite"));
    // Repairing the weight lets training continue; the streak resets.
    norm.set(&good).unwrap();
    let st = t.step(&[random_batch(2, 8, 40, 300)]).unwrap();
    assert!(!st.skipped);
    assert_eq!(t.counters().nonfinite_streak, 0);
}

/// Makes every gradient of a step non-finite, as a batch with an overflowing loss would.
struct PoisonGradients;

impl GradientReducer for PoisonGradients {
    fn reduce(&mut self, _name: &str, grad: &mut [f32]) -> relora::Result<()> {
        if let Some(g) = grad.first_mut() {
            *g = f32::NAN;
        }
        Ok(())
    }
}

/// Trains the tiny model to step 16 on batches seeded by the step number; at each step count in
/// `poison_at` one extra attempt with poisoned gradients comes first. Returns every trainable
/// value, optimizer moment and completed phase, as bits.
fn run_with_poisoned_steps(poison_at: &[u64]) -> (Vec<Vec<u64>>, usize) {
    let mut cfg = train_cfg(Mode::Relora, "f32");
    cfg.steps = 16;
    let mut t = Trainer::new(&tiny(40), &cfg, &Device::Cpu).unwrap();
    let mut poisoned = std::collections::HashSet::new();
    while t.step_count() < cfg.steps {
        let s = t.step_count();
        let batch = random_batch(2, 8, 40, s);
        t.accumulate(&batch).unwrap();
        if poison_at.contains(&s) && poisoned.insert(s) {
            let st = t.apply(Some(&mut PoisonGradients)).unwrap();
            assert!(st.skipped, "step {s} was not skipped");
            assert_eq!(t.step_count(), s, "a skipped step advanced the count");
            continue;
        }
        assert!(!t.apply(None).unwrap().skipped);
    }
    let bits = |x: &Tensor| {
        values(x)
            .into_iter()
            .map(f64::to_bits)
            .collect::<Vec<u64>>()
    };
    let mut state: Vec<Vec<u64>> = t
        .model
        .trainable_params()
        .iter()
        .map(|(_, p)| bits(p.as_tensor()))
        .collect();
    for st in t.optimizer().states().values() {
        state.push(bits(&st.exp_avg));
        state.push(bits(&st.exp_avg_sq));
    }
    for phase in t.phases() {
        for ad in &phase.adapters {
            state.push(bits(&ad.a));
            state.push(bits(&ad.b));
        }
    }
    for w in t.merged_weights().unwrap().values() {
        assert!(
            values(w).iter().all(|v| v.is_finite()),
            "a non-finite merge"
        );
    }
    (state, t.phases().len())
}

#[test]
fn poisoned_steps_around_the_switch_and_merges_leave_no_trace() {
    // Switch to adapters at step 4, merges at 9 and 14: poison the steps on both sides of each.
    let (clean, phases) = run_with_poisoned_steps(&[]);
    assert_eq!(phases, 2);
    let (poisoned, poisoned_phases) = run_with_poisoned_steps(&[3, 4, 8, 9, 13, 14]);
    assert_eq!(poisoned_phases, phases);
    assert!(
        poisoned == clean,
        "skipped poisoned steps changed the weights, optimizer state or merged phases"
    );
}

#[test]
fn adapter_lr_takes_over_at_the_switch() {
    let mut cfg = train_cfg(Mode::Relora, "f32");
    cfg.adapter_lr = 2.5 * cfg.lr;
    let schedule = cfg.schedule();
    let mut t = Trainer::new(&tiny(40), &cfg, &Device::Cpu).unwrap();
    for s in 0..8u64 {
        let st = t.step(&[random_batch(2, 8, 40, s)]).unwrap();
        let peak = if st.adapters { cfg.adapter_lr } else { cfg.lr };
        assert_eq!(st.adapters, s >= cfg.warmup_full_steps);
        let want = peak * schedule.multiplier(s);
        assert!(
            (st.lr - want).abs() <= 1e-15 * want.max(1.0),
            "step {s}: {} vs {want}",
            st.lr
        );
    }
    let mut bad = cfg.clone();
    bad.adapter_lr = -1.0;
    assert!(bad
        .validate()
        .unwrap_err()
        .to_string()
        .contains("adapter_lr"));
}

#[test]
fn bad_inputs_are_clear_errors() {
    let cfg = train_cfg(Mode::Relora, "f32");
    let mut t = Trainer::new(&tiny(40), &cfg, &Device::Cpu).unwrap();

    // A token id beyond the vocabulary, with its position.
    let mut b = random_batch(2, 8, 40, 1);
    b.targets[11] = 40;
    let err = t.step(&[b]).unwrap_err().to_string();
    assert!(
        err.contains("target token id 40 at position 11") && err.contains("vocab_size 40"),
        "{err}"
    );
    // The failed step left nothing half-accumulated.
    assert!(!t.has_pending());
    t.step(&[random_batch(2, 8, 40, 2)]).unwrap();

    // Mismatched lengths.
    let mut b = random_batch(2, 8, 40, 3);
    b.inputs.pop();
    assert!(matches!(t.step(&[b]), Err(Error::Data(_))));
    // No micro-batches at all.
    assert!(t.step(&[]).is_err());
    // Longer than the model's positions.
    let long = random_batch(1, 300, 40, 4);
    assert!(t
        .step(&[long])
        .unwrap_err()
        .to_string()
        .contains("max_position_embeddings"));

    // Empty and too-short data.
    assert!(Batcher::new(Vec::<u32>::new(), 2, 8, 0).is_err());
    assert!(Batcher::new(vec![1u32; 8], 2, 8, 0).is_err());
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    assert!(load_tokens(
        &DataSource::parse(empty.to_str().unwrap()),
        &Tokenizer::bytes()
    )
    .is_err());

    // Wrong configuration values name the field.
    for (key, value, needle) in [
        ("lr", "-1", "lr"),
        ("lora_rank", "0", "lora_rank"),
        ("reset_mode", "magnitude:1.5", "1.5"),
        ("target_modules", "q_proj,wq", "wq"),
        ("steps", "0", "steps"),
    ] {
        let mut c = cfg.clone();
        let msg = match c.set(key, value) {
            Err(e) => e.to_string(),
            Ok(()) => Trainer::new(&tiny(40), &c, &Device::Cpu)
                .err()
                .expect("should fail")
                .to_string(),
        };
        assert!(msg.contains(needle), "{key}={value}: {msg}");
    }
    let mut m: ModelConfig = tiny(40);
    m.num_key_value_heads = Some(3);
    assert!(Trainer::new(&m, &cfg, &Device::Cpu).is_err());
    let mut long_seq = cfg.clone();
    long_seq.seq_len = 10_000;
    assert!(Trainer::new(&tiny(40), &long_seq, &Device::Cpu)
        .err()
        .unwrap()
        .to_string()
        .contains("seq_len"));
    // An unknown device, and CUDA in a CPU build.
    assert!(relora::device::parse_device("tpu").is_err());
    if !cfg!(feature = "cuda") {
        assert!(relora::device::parse_device("cuda:0")
            .unwrap_err()
            .to_string()
            .contains("CUDA"));
    }
}

/// Scales every gradient of a step by clipping's coefficient for `max_norm`, from the norm of
/// the gradients it sees: clipping done by hand, outside the optimizer.
struct ClipByHand {
    max_norm: f64,
    coefficients: Vec<f64>,
}

impl GradientReducer for ClipByHand {
    fn reduce(&mut self, _name: &str, _grad: &mut [f32]) -> relora::Result<()> {
        unreachable!("reduce_all is overridden")
    }

    fn reduce_all(&mut self, _names: &[&str], grads: &mut [Tensor]) -> relora::Result<()> {
        let norm = relora::optim::clip::global_norm(grads)?;
        let coef = relora::optim::clip::coefficient(norm, self.max_norm);
        self.coefficients.push(coef);
        for g in grads.iter_mut() {
            *g = g.affine(coef, 0.0).unwrap();
        }
        Ok(())
    }
}

#[test]
fn clipping_inside_the_update_equals_scaling_the_gradients_first() {
    // Through the switch to adapters (step 4) and a merge (step 9).
    let run = |grad_clip: f64, by_hand: Option<f64>| {
        let mut cfg = train_cfg(Mode::Relora, "f32");
        cfg.grad_clip = grad_clip;
        let mut t = Trainer::new(&tiny(40), &cfg, &Device::Cpu).unwrap();
        let mut hand = by_hand.map(|max_norm| ClipByHand {
            max_norm,
            coefficients: Vec::new(),
        });
        for s in 0..12 {
            t.accumulate(&random_batch(2, 8, 40, s)).unwrap();
            let reducer = hand.as_mut().map(|h| h as &mut dyn GradientReducer);
            assert!(!t.apply(reducer).unwrap().skipped);
        }
        let state: Vec<u64> = t
            .model
            .trainable_params()
            .iter()
            .flat_map(|(_, p)| values(p.as_tensor()))
            .map(f64::to_bits)
            .collect();
        (state, hand.map(|h| h.coefficients))
    };
    let (clipped, _) = run(0.05, None);
    let (by_hand, coefficients) = run(0.0, Some(0.05));
    let coefficients = coefficients.unwrap();
    assert!(
        coefficients.iter().all(|&c| c < 0.5),
        "the limit should clip every step: {coefficients:?}"
    );
    assert!(
        clipped == by_hand,
        "clipping in the update differs from clipping by hand"
    );
    let (unclipped, _) = run(0.0, None);
    assert!(clipped != unclipped, "clipping changed nothing");
}
