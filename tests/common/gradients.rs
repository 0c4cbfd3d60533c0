//! One training forward and backward of a model, its loss and every trainable gradient by name,
//! and the comparison of two such runs: for the tests that check the fused ops and the layer
//! nodes against candle's composed ops.

use candle_core::Tensor;
use relora::model::loss::cross_entropy;
use relora::model::{Llama, ParamGrads};

/// A loss and every trainable parameter's gradient (flattened to f64), by name.
pub type Run = (f64, Vec<(String, Vec<f64>)>);

/// The loss and the gradients through the graph (`forward`), or with each decoder layer as one
/// node (`forward_for_training`), and how many decoder layers ran as nodes, counted by the
/// profiler's per-layer regions (the profiler is process-wide: one test a file).
pub fn loss_and_grads(model: &Llama, ids: &Tensor, targets: &Tensor, nodes: bool) -> (Run, usize) {
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
            assert_eq!(g.dtype(), var.dtype(), "{name}: gradient dtype");
            (name, super::values(g))
        })
        .collect();
    let loss = super::values(&loss)[0];
    ((loss, named), node_layers)
}

/// `run` has `reference`'s loss within `loss_tol` (relative) and every gradient within
/// `grad_tol` of the reference's largest entry for that parameter.
pub fn agree(what: &str, run: &Run, reference: &Run, loss_tol: f64, grad_tol: f64) {
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
            diff <= grad_tol * scale,
            "{what}: {name} gradients differ by {diff} (largest {scale})"
        );
    }
}
