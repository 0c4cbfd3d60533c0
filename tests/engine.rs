//! Engine choices belong to the trainer that carries them: two trainers with different choices,
//! stepped in turn on one thread or side by side on two, each end exactly where it would have
//! alone.

mod common;

use candle_core::Device;
use common::{random_batch, tiny, train_cfg, values};
use relora::config::{Mode, TrainConfig};
use relora::engine::Engine;
use relora::Trainer;

/// Every trainable parameter's values, in order.
fn weights(t: &Trainer) -> Vec<Vec<f64>> {
    t.model
        .trainable_params()
        .iter()
        .map(|(_, v)| values(v.as_tensor()))
        .collect()
}

fn config(engine: Engine) -> TrainConfig {
    TrainConfig {
        engine,
        ..train_cfg(Mode::Relora, "f32")
    }
}

const STEPS: u64 = 8;

fn step(t: &mut Trainer, i: u64) {
    t.step(&[random_batch(2, 8, 64, 100 + i)]).unwrap();
}

fn alone(engine: Engine) -> Vec<Vec<f64>> {
    let mut t = Trainer::new(&tiny(64), &config(engine), &Device::Cpu).unwrap();
    for i in 0..STEPS {
        step(&mut t, i);
    }
    weights(&t)
}

#[test]
fn two_trainers_in_one_process_keep_their_own_engine_choices() {
    let composed = Engine {
        fused_kernels: false,
        ..Engine::default()
    };
    let fused = Engine::default();
    let (ref_composed, ref_fused) = (alone(composed), alone(fused));
    assert_ne!(
        ref_composed, ref_fused,
        "the choice makes no difference here, so this test could not see it leak"
    );

    // In turn on one thread.
    let mut a = Trainer::new(&tiny(64), &config(composed), &Device::Cpu).unwrap();
    let mut b = Trainer::new(&tiny(64), &config(fused), &Device::Cpu).unwrap();
    for i in 0..STEPS {
        step(&mut a, i);
        step(&mut b, i);
    }
    assert_eq!(weights(&a), ref_composed);
    assert_eq!(weights(&b), ref_fused);

    // Side by side on two threads.
    let (wa, wb) = std::thread::scope(|s| {
        let ha = s.spawn(|| alone(composed));
        let hb = s.spawn(|| alone(fused));
        (ha.join().unwrap(), hb.join().unwrap())
    });
    assert_eq!(wa, ref_composed);
    assert_eq!(wb, ref_fused);
}

#[test]
fn engine_choices_are_options_like_any_other() {
    let mut c = TrainConfig::default();
    c.set("layer_nodes", "false").unwrap();
    c.set("fused_kernels", "0").unwrap();
    assert!(!c.engine.layer_nodes && !c.engine.fused_kernels && c.engine.grouped_updates);
    assert!(c.set("widening_products", "maybe").is_err());
    // They travel with the configuration (a checkpoint's manifest), and old ones without them
    // read as the defaults.
    let json = serde_json::to_value(&c).unwrap();
    assert_eq!(json["layer_nodes"], false);
    let mut old = json.clone();
    for key in Engine::KEYS {
        old.as_object_mut().unwrap().remove(key);
    }
    let back: TrainConfig = serde_json::from_value(old).unwrap();
    assert_eq!(back.engine, Engine::default());
    assert!(TrainConfig::keys().iter().any(|k| k == "grouped_updates"));
}
