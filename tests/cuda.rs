//! CUDA agreement tests (built with `--features cuda`, run on a GPU machine by
//! scripts/gpu-check.sh): the same seed on "cpu" and "cuda:0" gives the same logits, the same
//! training trajectory through a switch and merges, and checkpoints that move between devices.
#![cfg(feature = "cuda")]

mod common;

use candle_core::{Device, Tensor};
use common::{random_batch, tiny, train_cfg, values};
use relora::config::Mode;
use relora::ops::frozen_matmul;
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
    assert_eq!(gpu_t.phases().len(), 3);
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
