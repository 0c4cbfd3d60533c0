//! Gradients of every parameter kind against central finite differences in float64, and a
//! check that every trainable parameter receives a non-zero gradient (a cut graph fails it).

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{attach_random_adapters, random_batch, tiny, values};
use relora::model::loss::cross_entropy;
use relora::model::Llama;
use relora::rng::Rng;

fn loss(model: &Llama, ids: &Tensor, targets: &Tensor) -> Tensor {
    let logits = model.forward(ids, None).unwrap();
    let (b, t, v) = logits.dims3().unwrap();
    cross_entropy(&logits.reshape((b * t, v)).unwrap(), targets).unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_scalar::<f64>().unwrap()
}

/// Compares the analytic gradient of `var` with central differences at a few entries.
fn check_param(model: &Llama, name: &str, var: &Var, ids: &Tensor, targets: &Tensor) {
    let grads = loss(model, ids, targets).backward().unwrap();
    let g = values(
        grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient")),
    );
    let orig = var.as_tensor().copy().unwrap();
    let base = values(&orig);
    let n = base.len();
    let mut rng = Rng::new(n as u64);
    let h = 1e-6;
    let mut checked = 0;
    for _ in 0..4 {
        let i = rng.below(n as u64) as usize;
        let mut plus = base.clone();
        plus[i] += h;
        var.set(&Tensor::from_vec(plus, orig.shape(), &Device::Cpu).unwrap())
            .unwrap();
        let lp = scalar(&loss(model, ids, targets));
        let mut minus = base.clone();
        minus[i] -= h;
        var.set(&Tensor::from_vec(minus, orig.shape(), &Device::Cpu).unwrap())
            .unwrap();
        let lm = scalar(&loss(model, ids, targets));
        var.set(&orig).unwrap();
        let fd = (lp - lm) / (2.0 * h);
        let err = (fd - g[i]).abs();
        assert!(
            err <= 1e-6 + 1e-4 * fd.abs().max(g[i].abs()),
            "{name}[{i}]: analytic {} vs finite difference {fd}",
            g[i]
        );
        checked += 1;
    }
    assert_eq!(checked, 4);
}

fn setup(adapters: bool) -> (Llama, Tensor, Tensor) {
    let cfg = tiny(48);
    let mut model = Llama::new(&cfg, DType::F64, &Device::Cpu, &mut Rng::new(5)).unwrap();
    if adapters {
        // B starts at zero, which would make A's gradient exactly zero; a random B instead.
        attach_random_adapters(&mut model, 6);
    }
    let batch = random_batch(2, 6, 48, 11);
    let ids = Tensor::from_slice(&batch.inputs, (2, 6), &Device::Cpu).unwrap();
    let targets = Tensor::from_slice(&batch.targets, 12, &Device::Cpu).unwrap();
    (model, ids, targets)
}

#[test]
fn full_rank_parameters_match_finite_differences() {
    let (model, ids, targets) = setup(false);
    let params = model.trainable_params();
    // One of each kind: embedding, both norms of layer 1, the final norm, each projection
    // of layer 1 and layer 0's q_proj, lm_head.
    let wanted = [
        "model.embed_tokens.weight",
        "model.layers.1.input_layernorm.weight",
        "model.layers.1.post_attention_layernorm.weight",
        "model.norm.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.1.self_attn.k_proj.weight",
        "model.layers.1.self_attn.v_proj.weight",
        "model.layers.1.self_attn.o_proj.weight",
        "model.layers.1.mlp.gate_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "lm_head.weight",
    ];
    for w in wanted {
        let (name, var) = params
            .iter()
            .find(|(n, _)| n == w)
            .unwrap_or_else(|| panic!("{w} missing"));
        check_param(&model, name, var, &ids, &targets);
    }
}

#[test]
fn adapter_parameters_match_finite_differences() {
    let (model, ids, targets) = setup(true);
    let params = model.trainable_params();
    for short in [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ] {
        for ab in ["lora_A", "lora_B"] {
            let (name, var) = params
                .iter()
                .find(|(n, _)| {
                    n.starts_with("model.layers.0") && n.ends_with(&format!("{short}.{ab}"))
                })
                .unwrap();
            check_param(&model, name, var, &ids, &targets);
        }
    }
    // Frozen weights are not trainable while adapters are attached.
    assert!(!params.iter().any(|(n, _)| n.ends_with("q_proj.weight")));
}

#[test]
fn every_trainable_parameter_gets_a_nonzero_gradient() {
    for adapters in [false, true] {
        let (model, ids, targets) = setup(adapters);
        let grads = loss(&model, &ids, &targets).backward().unwrap();
        for (name, var) in model.trainable_params() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name} got no gradient (adapters: {adapters})"));
            let norm: f64 = values(g).iter().map(|x| x * x).sum();
            assert!(
                norm > 0.0,
                "{name} has an all-zero gradient (adapters: {adapters})"
            );
        }
    }
}
