//! bf16 mixed precision (meant for GPUs, checked here on the CPU): matmuls in bf16 on copies of
//! fp32 master weights, everything else in fp32; the masters and optimizer state stay fp32.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{random_batch, tiny, train_cfg, values};
use relora::config::Mode;
use relora::Trainer;

#[test]
fn bf16_compute_tracks_fp32_and_keeps_fp32_masters() {
    let mut cfg = train_cfg(Mode::Relora, "f32");
    cfg.warmup_full_steps = 2;
    cfg.reset_every = 3;
    let mut exact = Trainer::new(&tiny(64), &cfg, &Device::Cpu).unwrap();
    cfg.compute_dtype = "bf16".into();
    let mut mixed = Trainer::new(&tiny(64), &cfg, &Device::Cpu).unwrap();
    assert_eq!(mixed.model.compute_dtype(), Some(DType::BF16));

    let ids = Tensor::from_slice(&random_batch(2, 8, 64, 1).inputs, (2, 8), &Device::Cpu).unwrap();
    let a = values(&exact.model.forward(&ids, None).unwrap());
    let b = values(&mixed.model.forward(&ids, None).unwrap());
    let scale = a.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
        / scale;
    assert!(diff > 0.0, "bf16 compute changed nothing: is it on?");
    assert!(diff < 3e-2, "bf16 logits differ by {diff} relative");

    for s in 0..9 {
        let batch = random_batch(2, 8, 64, 10 + s);
        let e = exact.step(std::slice::from_ref(&batch)).unwrap();
        let m = mixed.step(&[batch]).unwrap();
        assert!(!m.skipped && m.grad_norm.is_finite());
        assert!(
            (e.loss - m.loss).abs() < 0.05 * e.loss,
            "step {s}: {} vs {}",
            e.loss,
            m.loss
        );
    }
    assert_eq!(mixed.phases().len(), 2);
    for (name, p) in mixed.model.trainable_params() {
        assert_eq!(p.dtype(), DType::F32, "{name} master is not fp32");
    }
    for (name, st) in mixed.optimizer().states() {
        assert_eq!(st.exp_avg.dtype(), DType::F32, "{name} state is not fp32");
    }
}

#[test]
fn bf16_compute_needs_fp32_parameters() {
    let mut cfg = train_cfg(Mode::Full, "f64");
    cfg.compute_dtype = "bf16".into();
    let err = Trainer::new(&tiny(64), &cfg, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("compute_dtype"), "{err}");
    cfg.dtype = "f32".into();
    cfg.compute_dtype = "f16".into();
    assert!(Trainer::new(&tiny(64), &cfg, &Device::Cpu).is_err());
}
