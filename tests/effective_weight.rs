//! The effective weight `W + s B A` (the trainer's `effective_weights` choice): an adapted projection over
//! enough rows runs one product forward and one for the input gradient on it instead of the
//! separate adapter products. It must be the same function: in float64 the loss and every
//! gradient equal the separate products' to rounding, in f32 to f32 rounding, in bf16 mixed
//! precision to bf16 rounding; and the layer nodes must still equal the graph. The
//! switch is process-wide, so this file holds a single test.

mod common;

use candle_core::{DType, Device, Tensor};
use common::gradients::{agree, loss_and_grads, Run};
use common::{attach_random_adapters, random_batch, tiny};
use relora::engine::Engine;
use relora::model::Llama;
use relora::rng::Rng;

/// The largest difference between two runs' gradients, relative to each parameter's largest.
fn largest_difference(a: &Run, b: &Run) -> f64 {
    a.1.iter()
        .zip(&b.1)
        .map(|((_, x), (_, y))| {
            let scale = y.iter().fold(1e-30f64, |m, v| m.max(v.abs()));
            x.iter()
                .zip(y)
                .map(|(p, q)| (p - q).abs() / scale)
                .fold(0.0, f64::max)
        })
        .fold(0.0, f64::max)
}

#[test]
fn the_effective_weight_computes_what_the_separate_adapter_products_do() {
    // 4 x 32 rows: enough for every projection of the tiny model to take the effective weight.
    let (batch, seq, vocab) = (4, 32, 40);
    let data = random_batch(batch, seq, vocab, 61);
    let ids = Tensor::from_slice(&data.inputs, (batch, seq), &Device::Cpu).unwrap();
    let targets = Tensor::from_slice(&data.targets, batch * seq, &Device::Cpu).unwrap();
    // (parameter dtype, compute dtype, loss tolerance, gradient tolerance)
    for (dtype, compute, loss_tol, grad_tol) in [
        (DType::F64, None, 1e-12, 1e-10),
        (DType::F32, None, 1e-6, 1e-5),
        (DType::F32, Some(DType::BF16), 1e-3, 5e-2),
    ] {
        let what = |s: &str| format!("{s} ({dtype:?}, compute {compute:?})");
        let cfg = tiny(vocab);
        let mut model = Llama::new(&cfg, dtype, &Device::Cpu, &mut Rng::new(62)).unwrap();
        model.set_compute_dtype(compute);
        // Random B, so the adapters change the output and receive gradients through A.
        attach_random_adapters(&mut model, 63);

        assert!(relora::ops::effective_weights(), "on by default");
        let (nodes, node_layers) = loss_and_grads(&model, &ids, &targets, true);
        let (graph, _) = loss_and_grads(&model, &ids, &targets, false);
        assert_eq!(
            node_layers,
            cfg.num_hidden_layers,
            "{}",
            what("layer nodes")
        );
        let separate_products = Engine {
            effective_weights: false,
            ..Engine::default()
        };
        let (separate, _) = relora::engine::scoped(separate_products, || {
            loss_and_grads(&model, &ids, &targets, true)
        });

        // Both paths build the effective weight the same way and run the same products; the
        // graph sums some gradients in another order (as without the effective weight).
        agree(&what("layer nodes vs graph"), &nodes, &graph, 1e-7, 1e-6);
        agree(
            &what("effective vs separate"),
            &nodes,
            &separate,
            loss_tol,
            grad_tol,
        );
        // The switch really changes the computation: the sums are rounded differently.
        assert!(
            largest_difference(&nodes, &separate) > 0.0 || nodes.0 != separate.0,
            "{}",
            what("the effective weight changed nothing")
        );
    }
}
