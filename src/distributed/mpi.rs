//! The MPI backend (feature `mpi`): the world communicator of `mpirun -np N ...`, over the
//! system's MPI library (Open MPI on Debian: `libopenmpi-dev`).
//!
//! A dead peer: Open MPI's `mpirun` notices a rank that exits or is killed and ends the others,
//! and MPI's default error handler aborts the job on a failed call. For a peer that hangs
//! without dying, the [`Watchdog`] ends this rank.

use super::watchdog::{Collective, Watchdog};
use super::Communicator;
use crate::error::{Error, Result};
use mpi::collective::{CommunicatorCollectives, SystemOperation};
use mpi::environment::Universe;
use mpi::topology::{Communicator as _, SimpleCommunicator};
use std::time::Duration;

/// The MPI world communicator with a hang watchdog.
pub struct MpiCommunicator {
    world: SimpleCommunicator,
    watchdog: Watchdog,
    // Declared last so MPI is finalised after the communicator is dropped.
    _universe: Universe,
}

impl MpiCommunicator {
    /// Initialises MPI. A collective call that has not completed within `timeout` ends this
    /// process with exit code 1 and a message (a peer has died or hung).
    pub fn init(timeout: Duration) -> Result<MpiCommunicator> {
        let universe = mpi::initialize().ok_or_else(|| {
            Error::Distributed("MPI could not be initialised (was it already?)".into())
        })?;
        let world = universe.world();
        let watchdog =
            Watchdog::start("mpi", world.rank() as usize, world.size() as usize, timeout)?;
        Ok(MpiCommunicator {
            world,
            watchdog,
            _universe: universe,
        })
    }
}

impl Communicator for MpiCommunicator {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }

    fn world(&self) -> usize {
        self.world.size() as usize
    }

    fn backend(&self) -> &str {
        "mpi"
    }

    fn all_reduce_sum(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        super::check_lengths(send, recv)?;
        // MPI counts are C ints: split larger buffers.
        const CHUNK: usize = 1 << 30;
        for (s, r) in send.chunks(CHUNK).zip(recv.chunks_mut(CHUNK)) {
            self.watchdog.watched(Collective::AllReduce, || {
                self.world.all_reduce_into(s, r, SystemOperation::sum())
            });
        }
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        self.watchdog
            .watched(Collective::Barrier, || self.world.barrier());
        Ok(())
    }

    fn abort(&self, code: i32) -> ! {
        mpi::topology::Communicator::abort(&self.world, code)
    }
}
