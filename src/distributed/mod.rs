//! Data-parallel training: every rank holds the same model, draws its own share of each step's
//! micro-batches ([`shard`]), and averages the trainable gradients with the other ranks before
//! the optimizer step ([`bucket`]), so every rank applies the same update and the weights stay
//! identical. Merges and optimizer resets are functions of the step and the seeded random
//! streams, so they happen on every rank at the same step without communication.
//!
//! The global batch of one optimizer step is `batch_size x grad_accum x ranks` sequences: each
//! rank runs `grad_accum` micro-batches of `batch_size` rows. A run on `N` ranks therefore
//! matches a single-process run with `grad_accum x N` (same seed, same other options).
//!
//! The backend is behind [`Communicator`]; the MPI one (module `mpi`, feature `mpi`) serves CPU
//! clusters (`mpirun -np N relora train --distributed mpi ...`), the NCCL one (module `nccl`,
//! feature `nccl`) GPUs, one process per GPU, reducing on the GPU.

pub mod bucket;
pub mod id_file;
#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod shard;
pub mod watchdog;

pub use bucket::{BucketReducer, ReduceStats};
pub use shard::Shard;

use crate::error::Result;
use candle_core::Tensor;

/// The collective operations data-parallel training needs. All ranks must call the same
/// operations in the same order with buffers of the same length.
pub trait Communicator {
    /// This process's rank, `0..world()`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world(&self) -> usize;
    /// The backend's name, for messages ("mpi").
    fn backend(&self) -> &str;
    /// Sums `send` element-wise over all ranks into `recv` (same length as `send`), on every rank.
    fn all_reduce_sum(&self, send: &[f32], recv: &mut [f32]) -> Result<()>;
    /// Sums the f32 tensor `t` over all ranks on its own device, where the backend can (NCCL on
    /// CUDA buffers), and returns the sum; `None` sends the caller through the host buffers of
    /// [`Communicator::all_reduce_sum`]. The default is `None`.
    fn all_reduce_sum_tensor(&self, t: &Tensor) -> Result<Option<Tensor>> {
        let _ = t;
        Ok(None)
    }
    /// Waits until every rank has reached this call.
    fn barrier(&self) -> Result<()>;
    /// Ends the whole job (all ranks) with `code`, after this rank printed why. Used when one
    /// rank fails, so that the others don't wait forever in a collective.
    fn abort(&self, code: i32) -> !;
}

/// The buffers of [`Communicator::all_reduce_sum`] must be the same length.
#[cfg(any(feature = "mpi", feature = "nccl"))]
pub(crate) fn check_lengths(send: &[f32], recv: &[f32]) -> Result<()> {
    if send.len() != recv.len() {
        return Err(crate::error::Error::Distributed(format!(
            "all-reduce buffers differ in length ({} and {})",
            send.len(),
            recv.len()
        )));
    }
    Ok(())
}

/// Where this process stands in the job, for logs and for deciding who writes files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RankInfo {
    /// This process's rank.
    pub rank: usize,
    /// Number of ranks.
    pub world: usize,
}

impl RankInfo {
    /// The info of `comm`'s process.
    pub fn of(comm: &dyn Communicator) -> RankInfo {
        RankInfo {
            rank: comm.rank(),
            world: comm.world(),
        }
    }
}

/// A shared communicator (the program keeps one handle to abort the job on an error while the
/// run's reducer holds another).
impl<C: Communicator + ?Sized> Communicator for std::rc::Rc<C> {
    fn rank(&self) -> usize {
        (**self).rank()
    }
    fn world(&self) -> usize {
        (**self).world()
    }
    fn backend(&self) -> &str {
        (**self).backend()
    }
    fn all_reduce_sum(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        (**self).all_reduce_sum(send, recv)
    }
    fn all_reduce_sum_tensor(&self, t: &Tensor) -> Result<Option<Tensor>> {
        (**self).all_reduce_sum_tensor(t)
    }
    fn barrier(&self) -> Result<()> {
        (**self).barrier()
    }
    fn abort(&self, code: i32) -> ! {
        (**self).abort(code)
    }
}
