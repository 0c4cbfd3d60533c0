//! bf16 mixed precision (f32 masters, bf16 products) through the decoder-layer nodes on the CPU,
//! the path a GPU trains on: full rank and with adapters, with grouped-query attention. The
//! layer nodes must give the graph's loss and gradients (the same ops, chained by hand), and
//! both must agree with candle's composed casts to bf16 rounding. The fused-kernel switch and
//! the profiler are process-wide, so this file holds a single test.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{attach_random_adapters, random_batch, tiny, values};
use relora::model::loss::cross_entropy;
use relora::model::{Llama, ParamGrads};
use relora::rng::Rng;

type Run = (f64, Vec<(String, Vec<f64>)>);

/// The loss and every trainable gradient (by name), through the graph or the layer nodes, and
/// how many decoder layers ran as nodes (counted by the profiler's per-layer regions).
fn loss_and_grads(model: &Llama, ids: &Tensor, targets: &Tensor, nodes: bool) -> (Run, usize) {
    relora::profile::set_profiling(true);
    let _ = relora::profile::take_regions();
    let sink = ParamGrads::new();
    let logits = if nodes {
        model.forward_for_training(ids, None, &sink).unwrap()
    } else {
        model.forward(ids, None).unwrap()
    };
    let (b, t, v) = logits.dims3().unwrap();
    let loss = cross_entropy(&logits.reshape((b * t, v)).unwrap(), targets).unwrap();
    let mut grads = loss.backward().unwrap();
    sink.merge_into(&mut grads).unwrap();
    let node_layers = relora::profile::take_regions()
        .iter()
        .filter(|r| r.name == "layer fwd q k v")
        .map(|r| r.calls)
        .sum::<u64>() as usize;
    relora::profile::set_profiling(false);
    let named = model
        .trainable_params()
        .into_iter()
        .map(|(name, var)| {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient"));
            assert_eq!(g.dtype(), DType::F32, "{name}: gradient dtype");
            (name, values(g))
        })
        .collect();
    let loss = loss
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    ((loss, named), node_layers)
}

/// `run` has `reference`'s loss within `loss_tol` (relative) and every gradient within `tol` of
/// the reference's largest entry for that parameter.
fn agree(what: &str, run: &Run, reference: &Run, loss_tol: f64, tol: f64) {
    let ((loss, grads), (ref_loss, ref_grads)) = (run, reference);
    assert!(
        (loss - ref_loss).abs() <= loss_tol * ref_loss.abs(),
        "{what}: loss {loss} vs {ref_loss}"
    );
    assert_eq!(grads.len(), ref_grads.len());
    for ((name, a), (ref_name, b)) in grads.iter().zip(ref_grads) {
        assert_eq!(name, ref_name);
        let scale = b.iter().fold(1e-30f64, |m, x| m.max(x.abs()));
        let diff = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        assert!(
            diff <= tol * scale,
            "{what}: {name} gradients differ by {diff} (largest {scale})"
        );
    }
}

#[test]
fn bf16_layer_nodes_match_the_graph_and_the_composed_casts() {
    for adapters in [false, true] {
        let cfg = tiny(40);
        let mut model = Llama::new(&cfg, DType::F32, &Device::Cpu, &mut Rng::new(31)).unwrap();
        model.set_compute_dtype(Some(DType::BF16));
        if adapters {
            attach_random_adapters(&mut model, 32);
        }
        let batch = random_batch(3, 9, 40, 33);
        let ids = Tensor::from_slice(&batch.inputs, (3, 9), &Device::Cpu).unwrap();
        let targets = Tensor::from_slice(&batch.targets, 27, &Device::Cpu).unwrap();
        let (graph, graph_nodes) = loss_and_grads(&model, &ids, &targets, false);
        let (nodes, node_layers) = loss_and_grads(&model, &ids, &targets, true);
        assert_eq!(graph_nodes, 0);
        assert_eq!(
            node_layers, cfg.num_hidden_layers,
            "every layer runs as a node in bf16 (adapters: {adapters})"
        );
        relora::ops::set_fused_kernels(false);
        let (composed, _) = loss_and_grads(&model, &ids, &targets, false);
        relora::ops::set_fused_kernels(true);
        let what = |s: &str| format!("{s} (adapters: {adapters})");
        // The same bf16 products in the same order (measured: equal bits).
        agree(&what("layer nodes vs graph"), &nodes, &graph, 1e-7, 1e-6);
        // Full rank, the composed casts round where the nodes do (measured: 2e-7). The composed
        // adapter adds its two bf16 products in bf16, the fused one in f32: bf16 rounding of
        // the adapters' gradients (measured: 1.9e-2 on an A).
        let tol = if adapters { 5e-2 } else { 1e-5 };
        agree(
            &what("layer nodes vs composed"),
            &nodes,
            &composed,
            1e-3,
            tol,
        );
    }
}
