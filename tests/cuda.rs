//! CUDA agreement tests (built with `--features cuda`, run on a GPU machine by
//! scripts/gpu-check.sh): each fused op's CUDA kernel gives the CPU kernel's values and
//! gradients; the same seed on "cpu" and "cuda:0" gives the same logits and the same training
//! trajectory through a switch and merges; checkpoints move between devices.
#![cfg(feature = "cuda")]

mod common;

use candle_core::{Device, Tensor, Var};
use common::{random_batch, tiny, train_cfg, values};
use relora::config::{Mode, ModelConfig};
use relora::ops::adamw_update::{adamw_update, AdamWConstants};
use relora::ops::{
    causal_attention, causal_softmax, cross_entropy_rows, frozen_matmul, lora_linear, mixed_linear,
    rms_norm_fused, rotary, sum_squares, swiglu, Heads,
};
use relora::{checkpoint, Trainer};

fn gpu() -> Device {
    Device::new_cuda(0).expect("a CUDA device (run on the GPU machine)")
}

fn max_rel(a: &[f64], b: &[f64]) -> f64 {
    let scale = a.iter().fold(1e-12f64, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
        / scale
}

/// Runs `op` on CPU f32 inputs and on their GPU copies and checks that the outputs, and the
/// gradients of `sum(out * probe)` with respect to every input, agree to `tol` relative to the
/// largest magnitude.
fn gpu_op_agrees(
    name: &str,
    inputs: &[Tensor],
    op: impl Fn(&[Tensor]) -> candle_core::Result<Tensor>,
    tol: f64,
) {
    let run = |dev: &Device, probe: Option<&Tensor>| {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(&t.to_device(dev).unwrap()).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = op(&ts).unwrap();
        assert!(
            relora::ops::has_kernel(&y),
            "{name}: no fused kernel on {dev:?}"
        );
        let probe = match probe {
            Some(p) => p.to_device(dev).unwrap(),
            None => Tensor::randn(0f32, 1.0, y.shape(), &Device::Cpu).unwrap(),
        };
        let grads = (&y * &probe.to_device(dev).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g: Vec<Vec<f64>> = vars
            .iter()
            .map(|v| values(grads.get(v.as_tensor()).unwrap()))
            .collect();
        (values(&y), g, probe.to_device(&Device::Cpu).unwrap())
    };
    let (y_cpu, g_cpu, probe) = run(&Device::Cpu, None);
    let (y_gpu, g_gpu, _) = run(&gpu(), Some(&probe));
    let d = max_rel(&y_cpu, &y_gpu);
    assert!(d < tol, "{name}: values differ by {d}");
    for (i, (a, b)) in g_cpu.iter().zip(&g_gpu).enumerate() {
        let d = max_rel(a, b);
        assert!(d < tol, "{name}: gradient of input {i} differs by {d}");
    }
}

fn randn(shape: &[usize], mean: f32, std: f32) -> Tensor {
    Tensor::randn(mean, std, shape, &Device::Cpu).unwrap()
}

#[test]
fn fused_swiglu_kernel_matches_the_cpu() {
    for (n, i) in [(1, 1), (33, 100), (7, 70_001)] {
        let inputs = [randn(&[n, i], 0.0, 3.0), randn(&[n, i], 0.0, 1.0)];
        gpu_op_agrees(
            &format!("swiglu [{n}, {i}]"),
            &inputs,
            |t| swiglu(&t[0], &t[1]),
            1e-5,
        );
    }
}

#[test]
fn fused_rms_norm_kernel_matches_the_cpu() {
    // Widths below, at and above one block of threads; more rows than the backward's blocks.
    // (Width 1 is left out: its exact dx is 0, so the relative comparison measures rounding.)
    for (n, h) in [(1, 3), (37, 5), (3, 1024), (130, 2500), (1300, 64)] {
        let inputs = [randn(&[n, h], 0.0, 1.5), randn(&[h], 1.0, 0.3)];
        gpu_op_agrees(
            &format!("rms norm [{n}, {h}]"),
            &inputs,
            |t| rms_norm_fused(&t[0], &t[1], 1e-5),
            2e-5,
        );
    }
}

#[test]
fn fused_causal_softmax_kernel_matches_the_cpu() {
    for (b, h, t) in [(1, 1, 1), (2, 3, 5), (1, 2, 33), (1, 1, 1100)] {
        let inputs = [randn(&[b, h, t, t], 0.0, 2.0)];
        gpu_op_agrees(
            &format!("causal softmax [{b}, {h}, {t}, {t}]"),
            &inputs,
            |x| causal_softmax(&x[0], 0.125),
            1e-5,
        );
    }
}

#[test]
fn fused_causal_softmax_in_bf16_stays_within_bf16_rounding_of_the_f32_cpu() {
    for (b, h, t) in [(1, 1, 1), (2, 3, 33), (2, 2, 512)] {
        let inputs = [randn(&[b, h, t, t], 0.0, 2.0)];
        gpu_op_agrees(
            &format!("causal softmax bf16 [{b}, {h}, {t}, {t}]"),
            &inputs,
            |x| {
                if x[0].device().is_cuda() {
                    let xb = x[0].to_dtype(candle_core::DType::BF16)?;
                    causal_softmax(&xb, 0.125)?.to_dtype(candle_core::DType::F32)
                } else {
                    causal_softmax(&x[0], 0.125)
                }
            },
            2e-2,
        );
    }
}

#[test]
fn fused_lora_linear_kernel_matches_the_cpu() {
    for (n, k, out, r) in [(7, 5, 6, 3), (65, 130, 90, 8), (256, 512, 1376, 32)] {
        let w = randn(&[out, k], 0.0, 0.1);
        let inputs = [
            randn(&[n, k], 0.0, 1.0),
            randn(&[r, k], 0.0, 0.1),
            randn(&[out, r], 0.0, 0.1),
        ];
        gpu_op_agrees(
            &format!("lora linear x [{n}, {k}] r {r} out {out}"),
            &inputs,
            |t| {
                let w = w.to_device(t[0].device())?;
                lora_linear(&t[0], &w, &t[1], &t[2], 0.75, None)
            },
            1e-5,
        );
    }
}

#[test]
fn fused_lora_linear_in_bf16_stays_within_bf16_rounding_of_the_f32_cpu() {
    let (n, k, out, r) = (256, 512, 1376, 32);
    let w = randn(&[out, k], 0.0, 0.05);
    let inputs = [
        randn(&[n, k], 0.0, 1.0),
        randn(&[r, k], 0.0, 0.05),
        randn(&[out, r], 0.0, 0.05),
    ];
    gpu_op_agrees(
        "lora linear, bf16 compute on the GPU",
        &inputs,
        |t| {
            let w = w.to_device(t[0].device())?;
            let compute = t[0].device().is_cuda().then_some(candle_core::DType::BF16);
            lora_linear(&t[0], &w, &t[1], &t[2], 0.75, compute)
        },
        3e-2,
    );
}

/// With enough rows the op reads the effective weight `W + s B A`; on the GPU in bf16 that is
/// cuBLAS's f32 product scaled, added to W and rounded by `add_scaled_to_bf16`. Values and gradients agree with
/// the CPU's build (one accumulating gemm): f32 to 1e-5, bf16 to bf16 rounding.
#[test]
fn lora_linear_on_the_effective_weight_matches_the_cpu() {
    let (n, k, out, r) = (1024, 512, 384, 32);
    let w = randn(&[out, k], 0.0, 0.05);
    let inputs = [
        randn(&[n, k], 0.0, 1.0),
        randn(&[r, k], 0.0, 0.05),
        randn(&[out, r], 0.0, 0.05),
    ];
    assert!(relora::ops::effective_weights());
    for (compute, tol) in [(None, 1e-5), (Some(candle_core::DType::BF16), 3e-2)] {
        gpu_op_agrees(
            &format!("lora linear on the effective weight, compute {compute:?}"),
            &inputs,
            |t| {
                let w = w.to_device(t[0].device())?;
                lora_linear(&t[0], &w, &t[1], &t[2], 0.75, compute)
            },
            tol,
        );
    }
}

#[test]
fn fused_rotary_kernel_matches_the_cpu() {
    let rope =
        relora::model::rope::Rope::new(64, 600, 10_000.0, candle_core::DType::F32, &Device::Cpu)
            .unwrap();
    let (cos, sin) = rope.tables();
    for (b, h, t) in [(1, 1, 1), (2, 3, 17), (2, 4, 512)] {
        let inputs = [randn(&[b, h, t, 64], 0.0, 1.0)];
        gpu_op_agrees(
            &format!("rotary [{b}, {h}, {t}, 64]"),
            &inputs,
            |x| {
                let dev = x[0].device();
                rotary(&x[0], &cos.to_device(dev)?, &sin.to_device(dev)?)
            },
            1e-5,
        );
    }
}

/// The fused attention node (rotation, both products, the causal softmax, its own backward) on
/// the GPU against the CPU: f32 products to rounding, and the mixed-precision path (bf16
/// products and a bf16 softmax on the GPU) to bf16 rounding, with shared key/value heads.
#[test]
fn fused_attention_node_matches_the_cpu() {
    let rope =
        relora::model::rope::Rope::new(64, 600, 10_000.0, candle_core::DType::F32, &Device::Cpu)
            .unwrap();
    let (cos, sin) = rope.tables();
    for (b, t, heads, kv_heads, bf16) in [
        (1, 1, 1, 1, false),
        (2, 17, 4, 2, false),
        (2, 512, 8, 8, false),
        (2, 33, 4, 1, true),
        (2, 512, 8, 4, true),
    ] {
        let h = Heads {
            batch: b,
            seq: t,
            heads,
            kv_heads,
            head_dim: 64,
        };
        let inputs = [
            randn(&[b * t, heads * 64], 0.0, 1.0),
            randn(&[b * t, kv_heads * 64], 0.0, 1.0),
            randn(&[b * t, kv_heads * 64], 0.0, 1.0),
        ];
        gpu_op_agrees(
            &format!("attention b {b} t {t} heads {heads}/{kv_heads} bf16 {bf16}"),
            &inputs,
            |x| {
                let dev = x[0].device();
                let mm = (bf16 && dev.is_cuda()).then_some(candle_core::DType::BF16);
                let (c, s) = (cos.to_device(dev)?, sin.to_device(dev)?);
                causal_attention(&x[0], &x[1], &x[2], &c, &s, h, mm)
            },
            if bf16 { 3e-2 } else { 1e-5 },
        );
    }
}

/// The fused cross-entropy's CUDA kernels against the CPU kernels, up to GPT-2's vocabulary and
/// a row wider than a block of threads; a target outside the vocabulary gives a NaN loss on the
/// GPU (the CPU refuses it), never a read out of bounds.
#[test]
fn fused_cross_entropy_kernel_matches_the_cpu() {
    for (n, vocab) in [(1, 1), (33, 258), (5, 1100), (64, 50257)] {
        let t: Vec<u32> = (0..n).map(|i| ((i * 7919 + 3) % vocab) as u32).collect();
        let targets = Tensor::new(t.as_slice(), &Device::Cpu).unwrap();
        gpu_op_agrees(
            &format!("cross-entropy [{n}, {vocab}]"),
            &[randn(&[n, vocab], 0.0, 3.0)],
            |x| cross_entropy_rows(&x[0], &targets.to_device(x[0].device())?),
            1e-5,
        );
    }
    let logits = randn(&[2, 4], 0.0, 1.0).to_device(&gpu()).unwrap();
    let bad = Tensor::new(&[1u32, 4], &gpu()).unwrap();
    let loss = values(&cross_entropy_rows(&logits, &bad).unwrap());
    assert!(loss[0].is_finite() && loss[1].is_nan(), "{loss:?}");
}

#[test]
fn mixed_linear_in_bf16_matches_the_cpu_to_bf16_rounding() {
    let inputs = [randn(&[300, 512], 0.0, 1.0), randn(&[700, 512], 0.0, 0.05)];
    gpu_op_agrees(
        "mixed linear bf16",
        &inputs,
        |t| mixed_linear(&t[0], &t[1], candle_core::DType::BF16),
        2e-2,
    );
}

#[test]
fn fused_sum_of_squares_and_adamw_match_the_cpu() {
    let ts: Vec<Tensor> = [vec![1000, 37], vec![5], vec![64, 3000]]
        .iter()
        .map(|s| randn(s, 0.0, 1.0))
        .collect();
    let mut with_t = ts.clone();
    with_t.push(randn(&[40, 70], 0.0, 1.0).t().unwrap());
    let cpu = sum_squares(&with_t)
        .unwrap()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()[0];
    let on_gpu: Vec<Tensor> = with_t
        .iter()
        .map(|t| t.to_device(&gpu()).unwrap())
        .collect();
    let g = sum_squares(&on_gpu)
        .unwrap()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()[0];
    assert!((cpu - g).abs() < 1e-9 * cpu, "sum of squares {cpu} vs {g}");
    // The same on the GPU every time (a fixed reduction order).
    let again = sum_squares(&on_gpu)
        .unwrap()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()[0];
    assert_eq!(g.to_bits(), again.to_bits());

    let k = AdamWConstants {
        beta1: 0.9,
        beta2: 0.95,
        inv_sqrt_bc2: 1.0 / (1.0 - 0.95f64.powi(3)).sqrt(),
        eps: 1e-8,
        step_size: 1e-3 / (1.0 - 0.9f64.powi(3)),
        decay: Some(1.0 - 1e-4),
        grad_scale: 0.6,
    };
    let (p, grad) = (randn(&[513, 77], 0.0, 1.0), randn(&[513, 77], 0.0, 0.1));
    let (m, v) = (
        randn(&[513, 77], 0.0, 0.01),
        randn(&[513, 77], 0.0, 0.01).sqr().unwrap(),
    );
    let run = |dev: &Device| {
        let pv = Var::from_tensor(&p.to_device(dev).unwrap()).unwrap();
        let d = |t: &Tensor| t.to_device(dev).unwrap();
        let (m2, v2) = adamw_update(pv.as_tensor(), &d(&grad), &d(&m), &d(&v), k).unwrap();
        (values(pv.as_tensor()), values(&m2), values(&v2))
    };
    let (a, b) = (run(&Device::Cpu), run(&gpu()));
    assert!(max_rel(&a.0, &b.0) < 1e-6, "parameter");
    assert!(max_rel(&a.1, &b.1) < 1e-6, "exp_avg");
    assert!(max_rel(&a.2, &b.2) < 1e-6, "exp_avg_sq");
}

/// The widening bf16 matmul (cuBLAS with an f32 result) gives the CPU's f32 sums of the same
/// bf16 products for every orientation of its operands, including single rows and columns, and
/// so does adding a second product in place.
#[test]
fn widening_matmul_matches_the_cpu_in_every_orientation() {
    use candle_core::DType::BF16;
    use relora::ops::widening_matmul;
    for (m, k, n) in [(33, 70, 45), (1, 64, 9), (17, 1, 5), (8, 40, 1)] {
        let bf = |r: usize, c: usize| randn(&[r, c], 0.0, 1.0).to_dtype(BF16).unwrap();
        let (a, at) = (bf(m, k), bf(k, m).t().unwrap());
        let (b, bt) = (bf(k, n), bf(n, k).t().unwrap());
        for (x, y) in [(&a, &b), (&at, &b), (&a, &bt), (&at, &bt)] {
            let cpu = widening_matmul(x, y).unwrap();
            let on_gpu = |t: &Tensor| t.to_device(&gpu()).unwrap();
            // Transposed views stay transposed on the GPU: copy the source, then transpose.
            let gx = if x.is_contiguous() {
                on_gpu(x)
            } else {
                on_gpu(&x.t().unwrap()).t().unwrap()
            };
            let gy = if y.is_contiguous() {
                on_gpu(y)
            } else {
                on_gpu(&y.t().unwrap()).t().unwrap()
            };
            let g = widening_matmul(&gx, &gy).unwrap();
            assert_eq!(g.dtype(), candle_core::DType::F32);
            let d = max_rel(&values(&cpu), &values(&g));
            // A second product added in place (cuBLAS with beta = 1), scaled.
            relora::ops::widening_matmul_add(&cpu, x, y, 0.5).unwrap();
            relora::ops::widening_matmul_add(&g, &gx, &gy, 0.5).unwrap();
            let d_add = max_rel(&values(&cpu), &values(&g));
            assert!(d_add < 1e-5, "[{m}, {k}] x [{k}, {n}] added: {d_add}");
            assert!(
                d < 1e-5,
                "[{m}, {k}] x [{k}, {n}] ({:?}, {:?}): {d}",
                gx.stride(),
                gy.stride()
            );
        }
    }
}

/// The grouped AdamW kernel (every parameter in one launch, moments in place) follows the CPU
/// and the per-tensor kernels over three steps: mixed shapes, decay on some,
/// a transposed gradient, clipping's scale, and a resumed state whose two moments share one
/// buffer (which the optimizer must copy before writing in place).
#[test]
fn grouped_adamw_follows_the_cpu_and_the_per_tensor_kernels() {
    use relora::optim::{AdamW, AdamWConfig, ParamState};
    let shapes: [&[usize]; 5] = [&[64, 300], &[300], &[1, 5], &[2816, 16], &[7, 9]];
    let init: Vec<Tensor> = shapes.iter().map(|s| randn(s, 0.0, 1.0)).collect();
    let grads: Vec<Vec<Tensor>> = (0..3)
        .map(|_| shapes.iter().map(|s| randn(s, 0.0, 0.1)).collect())
        .collect();
    let decay = [true, false, true, true, false];
    let config = AdamWConfig {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let run = |dev: &Device, grouped: bool| {
        let engine = relora::engine::Engine {
            grouped_updates: grouped,
            ..relora::engine::Engine::default()
        };
        relora::engine::scoped(engine, || {
            let params: Vec<(String, Var)> = init
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    (
                        format!("p{i}"),
                        Var::from_tensor(&t.to_device(dev).unwrap()).unwrap(),
                    )
                })
                .collect();
            let mut opt = AdamW::new(config);
            // A resumed state for p4: both moments are views of one buffer.
            let both = randn(&[2, 7, 9], 0.0, 0.01)
                .abs()
                .unwrap()
                .to_device(dev)
                .unwrap();
            let resumed = values(&both);
            opt.set_state(
                "p4",
                ParamState {
                    exp_avg: both.get(0).unwrap(),
                    exp_avg_sq: both.get(1).unwrap(),
                    step: 4,
                },
            );
            for (s, gs) in grads.iter().enumerate() {
                let gs: Vec<Tensor> = gs
                    .iter()
                    .enumerate()
                    .map(|(i, g)| {
                        let g = g.to_device(dev).unwrap();
                        // The [7, 9] gradient arrives as a transposed view of a [9, 7] tensor.
                        if i == 4 {
                            g.t().unwrap().contiguous().unwrap().t().unwrap()
                        } else {
                            g
                        }
                    })
                    .collect();
                assert!(!gs[4].is_contiguous());
                opt.step_scaled(&params, &gs, &decay, 1e-2 / (s + 1) as f64, 0.7)
                    .unwrap();
            }
            let mut out = Vec::new();
            for (name, var) in &params {
                let st = opt.state(name).unwrap();
                // In place: the second moment is a tensor of its own, not the second half of the
                // per-tensor kernel's [2, n] buffer.
                assert_eq!(
                    st.exp_avg_sq.layout().start_offset() == 0,
                    grouped && dev.is_cuda(),
                    "{name}: grouped {grouped} on {dev:?}"
                );
                out.push((
                    values(var.as_tensor()),
                    values(&st.exp_avg),
                    values(&st.exp_avg_sq),
                ));
            }
            // The resumed buffer itself was copied, not written.
            assert_eq!(values(&both), resumed);
            out
        })
    };
    let cpu = run(&Device::Cpu, true);
    let per_tensor = run(&gpu(), false);
    let grouped = run(&gpu(), true);
    for (i, ((c, p), g)) in cpu.iter().zip(&per_tensor).zip(&grouped).enumerate() {
        for (what, a, b, x) in [
            ("parameter", &c.0, &p.0, &g.0),
            ("exp_avg", &c.1, &p.1, &g.1),
            ("exp_avg_sq", &c.2, &p.2, &g.2),
        ] {
            assert!(max_rel(a, x) < 1e-6, "p{i} {what}: grouped GPU vs CPU");
            assert!(
                max_rel(b, x) < 1e-6,
                "p{i} {what}: grouped vs per-tensor GPU"
            );
            if b != x {
                eprintln!("p{i} {what}: grouped and per-tensor kernels differ in the last bits");
            }
        }
    }
}

/// The grouped kernel refuses a table whose written tensors share memory, before writing any.
#[test]
fn grouped_adamw_refuses_moments_that_share_memory() {
    use relora::ops::adamw_group::{adamw_update_group, GroupMember};
    let p = randn(&[10, 10], 0.0, 1.0).to_device(&gpu()).unwrap();
    let g = randn(&[10, 10], 0.0, 1.0).to_device(&gpu()).unwrap();
    let m = randn(&[10, 10], 0.0, 1.0).to_device(&gpu()).unwrap();
    let k = AdamWConstants {
        beta1: 0.9,
        beta2: 0.95,
        inv_sqrt_bc2: 1.0,
        eps: 1e-8,
        step_size: 1e-3,
        decay: None,
        grad_scale: 1.0,
    };
    let member = GroupMember {
        name: "w",
        param: &p,
        grad: &g,
        exp_avg: &m,
        exp_avg_sq: &m,
        constants: k,
    };
    let before = values(&p);
    let e = adamw_update_group(&[member]).unwrap_err().to_string();
    assert!(e.contains("share memory") && e.contains("of w"), "{e}");
    assert_eq!(values(&p), before);
    let reads_written = GroupMember {
        grad: &p,
        exp_avg: &m,
        exp_avg_sq: &g,
        ..member
    };
    let e = adamw_update_group(&[reads_written])
        .unwrap_err()
        .to_string();
    assert!(e.contains("is read while"), "{e}");
}

/// More tensors than one grouped launch takes (65535): the sum of squares is split over
/// launches and still counts every tensor once.
#[test]
fn sum_of_squares_over_more_tensors_than_one_launch_takes() {
    let n = 65_535 + 100;
    let host: Vec<f32> = (0..3 * n).map(|i| (i % 7) as f32 - 3.0).collect();
    let flat = Tensor::from_vec(host.clone(), 3 * n, &gpu()).unwrap();
    let parts: Vec<Tensor> = (0..n).map(|i| flat.narrow(0, 3 * i, 3).unwrap()).collect();
    let want: f64 = host.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
    let got = sum_squares(&parts)
        .unwrap()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()[0];
    assert_eq!(got, want);
}

/// A projection input cast to bf16 beforehand (a layer node casts the input that q, k and v
/// share once) gives the same bits as the f32 input the op casts itself, forward and backward.
#[test]
fn lora_linear_on_a_shared_bf16_input_gives_the_same_bits() {
    use candle_core::DType::BF16;
    let dev = gpu();
    let on = |t: Tensor| t.to_device(&dev).unwrap();
    let (x, w) = (
        on(randn(&[64, 96], 0.0, 1.0)),
        on(randn(&[80, 96], 0.0, 0.05)),
    );
    let (a, b) = (
        on(randn(&[8, 96], 0.0, 0.05)),
        on(randn(&[80, 8], 0.0, 0.05)),
    );
    let xb = x.to_dtype(BF16).unwrap();
    let own = lora_linear(&x, &w, &a, &b, 0.5, Some(BF16)).unwrap();
    let shared = lora_linear(&xb, &w, &a, &b, 0.5, Some(BF16)).unwrap();
    assert_eq!(shared.dtype(), candle_core::DType::F32);
    assert!(values(&own) == values(&shared), "forward");
    let own = mixed_linear(&x, &w, BF16).unwrap();
    let shared = mixed_linear(&xb, &w, BF16).unwrap();
    assert_eq!(shared.dtype(), candle_core::DType::F32);
    assert!(values(&own) == values(&shared), "mixed linear forward");
}

/// Trains `cpu` and `gpu_t` on the same `steps` random batches (4 x 32 tokens of 258, seeds
/// from `seed`) and checks every step's loss on the GPU within `tol` (relative) of the CPU's;
/// returns the worst relative difference.
fn follow_the_cpu(cpu: &mut Trainer, gpu_t: &mut Trainer, steps: u64, seed: u64, tol: f64) -> f64 {
    let mut worst = 0f64;
    for s in 0..steps {
        let b = random_batch(4, 32, 258, seed + s);
        let a = cpu.step(std::slice::from_ref(&b)).unwrap().loss;
        let g = gpu_t.step(&[b]).unwrap().loss;
        let rel = (a - g).abs() / a.abs();
        worst = worst.max(rel);
        assert!(
            rel < tol,
            "step {s}: loss {a} on the CPU, {g} on the GPU ({rel:e})"
        );
    }
    worst
}

/// bf16 mixed precision end to end: the GPU (cuBLAS bf16 products, the bf16 softmax) follows
/// the CPU's mixed-precision training (the same casts through the same layer nodes) through
/// the switch and merges, to bf16 rounding.
#[test]
fn bf16_training_on_the_gpu_follows_the_cpu_in_bf16() {
    let mut cfg = train_cfg(Mode::Relora, "f32");
    cfg.compute_dtype = "bf16".into();
    cfg.warmup_full_steps = 4;
    cfg.reset_every = 4;
    cfg.seq_len = 32;
    cfg.batch_size = 4;
    let mut cpu = Trainer::new(&tiny(258), &cfg, &Device::Cpu).unwrap();
    let mut gpu_t = Trainer::new(&tiny(258), &cfg, &gpu()).unwrap();
    let worst = follow_the_cpu(&mut cpu, &mut gpu_t, 14, 300, 2e-2);
    assert!(gpu_t.phases().len() >= 3, "{} phases", gpu_t.phases().len());
    eprintln!("bf16 mixed precision, 14 steps: worst relative loss difference {worst:e}");
}

#[test]
fn tiny_preset_first_20_losses_match_the_cpu_to_1e4_relative() {
    relora::device::set_tf32(false);
    let mut model = ModelConfig::preset("tiny").unwrap();
    model.vocab_size = 258;
    let mut cfg = train_cfg(Mode::Relora, "f32");
    cfg.warmup_full_steps = 6;
    cfg.reset_every = 5;
    cfg.seq_len = 32;
    cfg.batch_size = 4;
    let mut cpu = Trainer::new(&model, &cfg, &Device::Cpu).unwrap();
    let mut gpu_t = Trainer::new(&model, &cfg, &gpu()).unwrap();
    let worst = follow_the_cpu(&mut cpu, &mut gpu_t, 20, 100, 1e-4);
    // The run went through the switch and at least one merge.
    assert!(gpu_t.phases().len() >= 2, "{} phases", gpu_t.phases().len());
    eprintln!("tiny preset, 20 steps: worst relative loss difference {worst:e}");
}

#[test]
fn frozen_matmul_matches_the_cpu_with_only_an_input_gradient() {
    let x = Tensor::randn(0f32, 1.0, (33, 70), &Device::Cpu).unwrap();
    let w = Tensor::randn(0f32, 1.0, (45, 70), &Device::Cpu).unwrap();
    let cpu = frozen_matmul(&x, &w).unwrap();
    let xv = candle_core::Var::from_tensor(&x.to_device(&gpu()).unwrap()).unwrap();
    let g = frozen_matmul(xv.as_tensor(), &w.to_device(&gpu()).unwrap()).unwrap();
    assert!(max_rel(&values(&cpu), &values(&g)) < 1e-5);
    let grads = g.sum_all().unwrap().backward().unwrap();
    let gx = values(grads.get(xv.as_tensor()).unwrap());
    let want = values(
        &Tensor::ones((33, 45), candle_core::DType::F32, &Device::Cpu)
            .unwrap()
            .matmul(&w)
            .unwrap(),
    );
    assert!(max_rel(&want, &gx) < 1e-5);
}

#[test]
fn gpu_training_follows_the_cpu_trajectory_and_checkpoints_cross_devices() {
    let mut cfg = train_cfg(Mode::Relora, "f32");
    cfg.warmup_full_steps = 3;
    cfg.reset_every = 3;
    cfg.reset_mode = relora::optim::ResetMode::Magnitude(0.9);
    let mut cpu = Trainer::new(&tiny(64), &cfg, &Device::Cpu).unwrap();
    let mut gpu_t = Trainer::new(&tiny(64), &cfg, &gpu()).unwrap();
    let ids = Tensor::from_slice(&random_batch(2, 8, 64, 7).inputs, (2, 8), &Device::Cpu).unwrap();
    let l_cpu = values(&cpu.model.forward(&ids, None).unwrap());
    let l_gpu = values(
        &gpu_t
            .model
            .forward(&ids.to_device(&gpu()).unwrap(), None)
            .unwrap(),
    );
    assert!(max_rel(&l_cpu, &l_gpu) < 1e-5, "initial logits differ");
    for s in 0..12 {
        let b = random_batch(2, 8, 64, s);
        let a = cpu.step(std::slice::from_ref(&b)).unwrap();
        let g = gpu_t.step(&[b]).unwrap();
        assert!(
            (a.loss - g.loss).abs() < 2e-3 * a.loss.abs().max(1.0),
            "step {s}: loss {} vs {}",
            a.loss,
            g.loss
        );
        assert_eq!(a.reset.is_some(), g.reset.is_some());
    }
    // Both devices went through the same switch and merges.
    assert_eq!(gpu_t.phases().len(), cpu.phases().len());
    assert!(gpu_t.phases().len() >= 2);
    for ((n, x), (_, y)) in cpu.model.weights().iter().zip(gpu_t.model.weights()) {
        let d = max_rel(&values(x), &values(&y));
        assert!(d < 5e-3, "{n}: relative difference {d}");
    }
    // A GPU checkpoint resumes on the CPU with identical values.
    let dir = tempfile::tempdir().unwrap();
    checkpoint::save(&gpu_t, dir.path().join("c").as_path(), &Default::default()).unwrap();
    let (back, _) = checkpoint::load(&dir.path().join("c"), &Device::Cpu).unwrap();
    for ((n, x), (_, y)) in gpu_t.model.weights().iter().zip(back.model.weights()) {
        assert!(
            values(x) == values(&y),
            "{n} changed across the device move"
        );
    }
}
