//! NCCL backend tests (built with `--features nccl`, run on the one-GPU machine by
//! scripts/gpu-check.sh): a one-rank job joins through its id file, reduces on the GPU and on the
//! host, and trains exactly as a process without a reducer does; the gradient bytes it reduces
//! in the ReLoRA phase are a fraction of full-rank's. Several ranks need several GPUs; their
//! packing, averaging and unpacking is the `BucketReducer` code the MPI tests run on 2 ranks.
#![cfg(feature = "nccl")]

mod common;

use candle_core::{Device, Tensor};
use common::{random_batch, tiny, train_cfg, values};
use relora::config::Mode;
use relora::distributed::nccl::NcclCommunicator;
use relora::distributed::{BucketReducer, Communicator};
use relora::Trainer;
use std::time::Duration;

fn gpu() -> Device {
    Device::new_cuda(0).expect("a CUDA device (run on the GPU machine)")
}

fn join(dev: &Device, dir: &std::path::Path) -> NcclCommunicator {
    NcclCommunicator::join(&dir.join("nccl-id"), 0, 1, dev, Duration::from_secs(60))
        .expect("a one-rank NCCL job")
}

#[test]
fn a_one_rank_job_joins_reduces_and_removes_its_id_file() {
    let dev = gpu();
    let dir = tempfile::tempdir().unwrap();
    let comm = join(&dev, dir.path());
    assert!(
        !dir.path().join("nccl-id").exists(),
        "rank 0 must delete the id file once everyone joined"
    );
    assert_eq!((comm.rank(), comm.world(), comm.backend()), (0, 1, "nccl"));
    let send = [1.5f32, -2.0, 3.25, 0.0, 1e-30];
    let mut recv = [0f32; 5];
    comm.all_reduce_sum(&send, &mut recv).unwrap();
    assert_eq!(send, recv);
    let t = Tensor::from_slice(&send, 5, &dev).unwrap();
    let sum = comm
        .all_reduce_sum_tensor(&t)
        .unwrap()
        .expect("an f32 tensor on the communicator's GPU is reduced on the GPU");
    assert!(sum.device().same_device(&dev));
    assert_eq!(sum.to_vec1::<f32>().unwrap(), send);
    // Another device's tensors go through the host path.
    let cpu = Tensor::from_slice(&send, 5, &Device::Cpu).unwrap();
    assert!(comm.all_reduce_sum_tensor(&cpu).unwrap().is_none());
    comm.barrier().unwrap();
}

#[test]
fn bad_joins_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let id = dir.path().join("nccl-id");
    let err = NcclCommunicator::join(&id, 0, 1, &Device::Cpu, Duration::from_secs(5))
        .err()
        .expect("the CPU is refused")
        .to_string();
    assert!(err.contains("CUDA device"), "{err}");
    let err = NcclCommunicator::join(&id, 1, 1, &gpu(), Duration::from_secs(5))
        .err()
        .expect("rank 1 of 1 is refused")
        .to_string();
    assert!(err.contains("outside"), "{err}");
    std::fs::write(&id, [0u8; 128]).unwrap();
    let err = NcclCommunicator::join(&id, 0, 1, &gpu(), Duration::from_secs(5))
        .err()
        .expect("a stale id file is refused")
        .to_string();
    assert!(err.contains("already exists"), "{err}");
}

#[test]
fn one_rank_nccl_training_equals_training_without_a_reducer() {
    let dev = gpu();
    let dir = tempfile::tempdir().unwrap();
    let comm = join(&dev, dir.path());
    let mut reducer = BucketReducer::new(Box::new(comm), 64 << 10);
    let mut cfg = train_cfg(Mode::Relora, "f32");
    cfg.warmup_full_steps = 3;
    cfg.reset_every = 4;
    let mut plain = Trainer::new(&tiny(64), &cfg, &dev).unwrap();
    let mut reduced = Trainer::new(&tiny(64), &cfg, &dev).unwrap();
    let (mut full_bytes, mut relora_bytes) = (0u64, 0u64);
    for s in 0..12 {
        let b = random_batch(2, 8, 64, s);
        plain.accumulate(&b).unwrap();
        let a = plain.apply(None).unwrap();
        reduced.accumulate(&b).unwrap();
        let r = reduced.apply(Some(&mut reducer)).unwrap();
        assert_eq!(a.loss.to_bits(), r.loss.to_bits(), "step {s}: loss");
        assert_eq!(a.reset.is_some(), r.reset.is_some(), "step {s}: reset");
        let bytes = reducer.last().bytes;
        if reduced.has_adapters() && s > cfg.warmup_full_steps {
            relora_bytes = bytes;
        } else if !reduced.has_adapters() {
            full_bytes = bytes;
        }
    }
    assert!(reduced.phases().len() >= 2, "the run must span merges");
    // A sum over one rank, scaled by 1/1: the weights must be bit-identical.
    for ((n, x), (_, y)) in plain.model.weights().iter().zip(reduced.model.weights()) {
        assert!(values(x) == values(&y), "{n} differs");
    }
    assert!(full_bytes > 0 && relora_bytes > 0);
    assert!(
        relora_bytes < full_bytes,
        "ReLoRA phase reduced {relora_bytes} bytes a step, full rank {full_bytes}"
    );
}
