//! The whole model with relora's fused ops (the attention node, RMSNorm, SwiGLU, the LoRA
//! projection, cross-entropy), and with each decoder layer as one node (the training forward),
//! against the same model on candle's composed ops, in float64: equal losses and equal
//! gradients for every trainable parameter, full rank and with adapters, with grouped-query
//! attention (the tiny preset shares each key/value head between two query heads). The switch
//! is process-wide, so this file holds a single test.

mod common;

use candle_core::{DType, Device, Tensor};
use common::gradients::{agree, loss_and_grads};
use common::{attach_random_adapters, random_batch, tiny};
use relora::engine::Engine;
use relora::model::Llama;
use relora::rng::Rng;

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
        let composed_ops = Engine {
            fused_kernels: false,
            ..Engine::default()
        };
        let (composed, composed_nodes, no_nodes) = relora::engine::scoped(composed_ops, || {
            let (composed, _) = loss_and_grads(&model, &ids, &targets, false);
            // Without the fused kernels no layer qualifies for the node: the same graph.
            let (composed_nodes, no_nodes) = loss_and_grads(&model, &ids, &targets, true);
            (composed, composed_nodes, no_nodes)
        });
        let (fused, _) = loss_and_grads(&model, &ids, &targets, false);
        let (nodes, node_layers) = loss_and_grads(&model, &ids, &targets, true);
        assert_eq!(no_nodes, 0);
        assert_eq!(node_layers, cfg.num_hidden_layers);
        for (what, run) in [
            ("fused ops", &fused),
            ("layer nodes", &nodes),
            ("composed ops, layer nodes asked for", &composed_nodes),
        ] {
            let what = format!("{what} (adapters: {adapters})");
            agree(&what, run, &composed, 1e-12, 1e-10);
        }
    }
}
