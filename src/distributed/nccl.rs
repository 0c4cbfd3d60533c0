//! The NCCL backend (feature `nccl`): one process per GPU, gradients all-reduced on the GPU by
//! NVIDIA's collective library through cudarc's bindings, on candle's own CUDA stream so the
//! reduction is ordered after the backward pass that produced the gradients without a host
//! round trip.
//!
//! Joining a job needs NCCL's unique id, made by rank 0 and read by every other rank; it travels
//! through a file all ranks see ([`id_file`]), which rank 0 deletes once every rank has joined.
//!
//! A dead or hung peer: NCCL calls of the other ranks would wait forever, so every collective
//! runs under the [`Watchdog`] and is waited for before it returns.

use super::watchdog::{Collective, Watchdog};
use super::{id_file, Communicator};
use crate::error::{Error, Result};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::nccl::{Comm, Id, ReduceOp};
use candle_core::{CpuStorage, CudaStorage, DType, Device, Layout, Shape, Tensor};
use std::ffi::c_char;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A communicator, shareable with the all-reduce op that candle may run from any thread.
struct SharedComm(Comm);

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it don't overlap;
// every use goes through the `Mutex` around this wrapper.
unsafe impl Send for SharedComm {}

/// Rank `rank` of an NCCL job, bound to one CUDA device.
pub struct NcclCommunicator {
    comm: Arc<Mutex<SharedComm>>,
    device: Device,
    rank: usize,
    world: usize,
    watchdog: Watchdog,
}

impl NcclCommunicator {
    /// Joins the job of `world` ranks as `rank` on `device` (a CUDA device: one per rank),
    /// exchanging NCCL's id through `id_file` (see the module documentation). Joining, and later
    /// every collective call, fails the process after `timeout` without progress.
    pub fn join(
        id_file: &Path,
        rank: usize,
        world: usize,
        device: &Device,
        timeout: Duration,
    ) -> Result<NcclCommunicator> {
        if world == 0 || rank >= world {
            return Err(Error::Distributed(format!(
                "NCCL: rank {rank} is outside a job of {world} ranks"
            )));
        }
        let Device::Cuda(cuda) = device else {
            return Err(Error::Distributed(format!(
                "NCCL needs a CUDA device, got {device:?} (pass --device cuda:N)"
            )));
        };
        let id = if rank == 0 {
            let id = Id::new().map_err(|e| nccl_error("making the unique id", e))?;
            id_file::publish(id_file, &id.internal().map(|c| c as u8))?;
            id
        } else {
            Id::uninit(id_file::wait(id_file, timeout)?.map(|b| b as c_char))
        };
        let watchdog = Watchdog::start("nccl", rank, world, timeout)?;
        // Joining is itself collective: it returns once every rank has joined.
        let comm = watchdog
            .watched(Collective::Barrier, || {
                Comm::from_rank(cuda.cuda_stream(), rank, world, id)
            })
            .map_err(|e| nccl_error("joining the job", e))?;
        if rank == 0 {
            // Everyone has read it; a later job must not find it.
            std::fs::remove_file(id_file).map_err(|e| Error::io(id_file, e))?;
        }
        Ok(NcclCommunicator {
            comm: Arc::new(Mutex::new(SharedComm(comm))),
            device: device.clone(),
            rank,
            world,
            watchdog,
        })
    }

    /// Sums `t` (f32, on this rank's device) over the ranks and waits for the result.
    fn reduce_on_device(&self, t: &Tensor, what: Collective) -> Result<Tensor> {
        let op = AllReduceSum {
            comm: Arc::clone(&self.comm),
        };
        self.watchdog.watched(what, || {
            let sum = t
                .contiguous()
                .and_then(|t| t.apply_op1_no_bwd(&op))
                .map_err(|e| Error::Distributed(format!("NCCL all-reduce: {e}")))?;
            self.device
                .synchronize()
                .map_err(|e| Error::Distributed(format!("NCCL all-reduce: {e}")))?;
            Ok(sum)
        })
    }
}

impl Communicator for NcclCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn backend(&self) -> &str {
        "nccl"
    }

    fn all_reduce_sum(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        super::check_lengths(send, recv)?;
        let t = Tensor::from_slice(send, send.len(), &self.device)
            .map_err(|e| Error::Distributed(format!("NCCL all-reduce upload: {e}")))?;
        let sum = self.reduce_on_device(&t, Collective::AllReduce)?;
        let host = sum
            .to_vec1::<f32>()
            .map_err(|e| Error::Distributed(format!("NCCL all-reduce download: {e}")))?;
        recv.copy_from_slice(&host);
        Ok(())
    }

    fn all_reduce_sum_tensor(&self, t: &Tensor) -> Result<Option<Tensor>> {
        if !t.device().same_device(&self.device) || t.dtype() != DType::F32 {
            return Ok(None);
        }
        self.reduce_on_device(t, Collective::AllReduce).map(Some)
    }

    fn barrier(&self) -> Result<()> {
        // NCCL has no barrier: an all-reduce of one value that every rank waits for is one.
        let one = Tensor::ones(1, DType::F32, &self.device)
            .map_err(|e| Error::Distributed(format!("NCCL barrier: {e}")))?;
        self.reduce_on_device(&one, Collective::Barrier).map(|_| ())
    }

    fn abort(&self, code: i32) -> ! {
        // The peers stop at their next collective, when their watchdogs fire, or when the
        // launcher notices this rank is gone.
        std::process::exit(code)
    }
}

/// The all-reduce as a candle op, so it runs on the tensor's storage on candle's stream.
struct AllReduceSum {
    comm: Arc<Mutex<SharedComm>>,
}

impl candle_core::CustomOp1 for AllReduceSum {
    fn name(&self) -> &'static str {
        "nccl-all-reduce-sum"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("the NCCL all-reduce runs on CUDA tensors only")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let input = crate::ops::cuda::input("nccl all-reduce", s, l)?;
        let n = l.shape().elem_count();
        let dev = s.device();
        // SAFETY: NCCL writes every element of the output before anything reads it.
        let mut out = unsafe { dev.alloc::<f32>(n.max(1)) }?;
        if n > 0 {
            let comm = self
                .comm
                .lock()
                .map_err(|_| candle_core::Error::Msg("the NCCL communicator is poisoned".into()))?;
            comm.0
                .all_reduce(&input, &mut out, &ReduceOp::Sum)
                .map_err(|e| candle_core::Error::Msg(format!("ncclAllReduce: {e:?}")))?;
        }
        Ok((crate::ops::cuda::storage(out, dev), l.shape().clone()))
    }
}

fn nccl_error(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Distributed(format!("NCCL: {what}: {e:?}"))
}
