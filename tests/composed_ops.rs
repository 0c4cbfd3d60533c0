//! The whole model with relora's fused ops (the attention node, RMSNorm, SwiGLU, the LoRA
//! projection, cross-entropy), and with each decoder layer as one node (the training forward),
//! against the same model on candle's composed ops, in float64: equal losses and equal
//! gradients for every trainable parameter, full rank and with adapters, with grouped-query
//! attention (the tiny preset shares each key/value head between two query heads). The switch
//! is process-wide, so this file holds a single test.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{attach_random_adapters, random_batch, tiny, values};
use relora::model::loss::cross_entropy;
use relora::model::{Llama, ParamGrads};
use relora::rng::Rng;

/// The loss and the gradient of every trainable parameter, by name: through the graph
/// (`forward`), or with each decoder layer as one node (`forward_for_training`).
fn loss_and_grads(
    model: &Llama,
    ids: &Tensor,
    targets: &Tensor,
    layer_nodes: bool,
) -> (f64, Vec<(String, Vec<f64>)>) {
    let layer_grads = ParamGrads::new();
    let logits = if layer_nodes {
        model.forward_for_training(ids, None, &layer_grads).unwrap()
    } else {
        model.forward(ids, None).unwrap()
    };
    let (b, t, v) = logits.dims3().unwrap();
    let loss = cross_entropy(&logits.reshape((b * t, v)).unwrap(), targets).unwrap();
    let mut grads = loss.backward().unwrap();
    layer_grads.merge_into(&mut grads).unwrap();
    let named = model
        .trainable_params()
        .into_iter()
        .map(|(name, var)| {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient"));
            (name, values(g))
        })
        .collect();
    (loss.to_scalar::<f64>().unwrap(), named)
}

#[test]
fn fused_and_composed_ops_give_the_same_loss_and_gradients() {
    for adapters in [false, true] {
        let cfg = tiny(40);
        assert_eq!(cfg.num_key_value_heads, Some(cfg.num_attention_heads / 2));
        let mut model = Llama::new(&cfg, DType::F64, &Device::Cpu, &mut Rng::new(21)).unwrap();
        if adapters {
            attach_random_adapters(&mut model, 22);
        }
        let batch = random_batch(3, 7, 40, 24);
        let ids = Tensor::from_slice(&batch.inputs, (3, 7), &Device::Cpu).unwrap();
        let targets = Tensor::from_slice(&batch.targets, 21, &Device::Cpu).unwrap();
        relora::ops::set_fused_kernels(false);
        let composed = loss_and_grads(&model, &ids, &targets, false);
        // Without the fused kernels no layer qualifies for the node: the same graph.
        let composed_nodes = loss_and_grads(&model, &ids, &targets, true);
        relora::ops::set_fused_kernels(true);
        let fused = loss_and_grads(&model, &ids, &targets, false);
        let nodes = loss_and_grads(&model, &ids, &targets, true);
        for (what, run) in [
            ("fused ops", &fused),
            ("layer nodes", &nodes),
            ("composed ops, layer nodes asked for", &composed_nodes),
        ] {
            agree(what, adapters, run, &composed);
        }
    }
}

/// `run` has `reference`'s loss to 1e-12 and every gradient to 1e-10 of its largest entry.
fn agree(what: &str, adapters: bool, run: &Run, reference: &Run) {
    let ((loss, grads), (ref_loss, ref_grads)) = (run, reference);
    assert!(
        (loss - ref_loss).abs() < 1e-12,
        "{what}: loss {loss} vs {ref_loss} (adapters: {adapters})"
    );
    assert_eq!(grads.len(), ref_grads.len());
    for ((name, a), (ref_name, b)) in grads.iter().zip(ref_grads) {
        assert_eq!(name, ref_name);
        let scale = b.iter().fold(1e-12f64, |m, x| m.max(x.abs()));
        let diff = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        assert!(
            diff <= 1e-10 * scale,
            "{what}: {name} gradients differ by {diff} (largest {scale}, adapters: {adapters})"
        );
    }
}

type Run = (f64, Vec<(String, Vec<f64>)>);
