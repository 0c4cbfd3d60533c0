//! The MPI backend (feature `mpi`): the world communicator of `mpirun -np N ...`, over the
//! system's MPI library (Open MPI on Debian: `libopenmpi-dev`).
//!
//! A dead peer: Open MPI's `mpirun` notices a rank that exits or is killed and ends the others,
//! and MPI's default error handler aborts the job on a failed call. For a peer that hangs
//! without dying (stopped, or a lost node), a watchdog ends this rank when one collective call
//! has not completed within the timeout, with a message that says so; `mpirun` then ends the
//! rest of the job.

use super::Communicator;
use crate::error::{Error, Result};
use mpi::collective::{CommunicatorCollectives, SystemOperation};
use mpi::environment::Universe;
use mpi::topology::{Communicator as _, SimpleCommunicator};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Names of the collective calls the watchdog can see in flight (index stored atomically).
const OPS: [&str; 3] = ["nothing", "an all-reduce", "a barrier"];

/// The in-flight collective and its deadline, shared with the watchdog thread.
struct Watch {
    /// Milliseconds after `start` at which the call in flight is declared hung; 0: none.
    deadline_ms: AtomicU64,
    /// Index into [`OPS`] of the call in flight.
    op: AtomicU8,
    start: Instant,
}

/// The MPI world communicator with a hang watchdog.
pub struct MpiCommunicator {
    world: SimpleCommunicator,
    watch: Arc<Watch>,
    timeout: Duration,
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
        let watch = Arc::new(Watch {
            deadline_ms: AtomicU64::new(0),
            op: AtomicU8::new(0),
            start: Instant::now(),
        });
        let (rank, size) = (world.rank(), world.size());
        let w = Arc::clone(&watch);
        std::thread::Builder::new()
            .name("relora-mpi-watchdog".into())
            .spawn(move || watchdog(&w, rank, size, timeout))
            .map_err(|e| Error::Distributed(format!("starting the MPI watchdog thread: {e}")))?;
        Ok(MpiCommunicator {
            world,
            watch,
            timeout,
            _universe: universe,
        })
    }

    /// Runs `f` (one collective call) under the watchdog.
    fn watched<T>(&self, op: u8, f: impl FnOnce() -> T) -> T {
        let now = self.watch.start.elapsed() + self.timeout;
        self.watch.op.store(op, Ordering::SeqCst);
        self.watch
            .deadline_ms
            .store((now.as_millis() as u64).max(1), Ordering::SeqCst);
        let out = f();
        self.watch.deadline_ms.store(0, Ordering::SeqCst);
        out
    }
}

/// Polls the deadline; ends the process when a collective overstays it.
fn watchdog(w: &Watch, rank: i32, size: i32, timeout: Duration) {
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let deadline = w.deadline_ms.load(Ordering::SeqCst);
        if deadline != 0 && w.start.elapsed().as_millis() as u64 > deadline {
            let op = OPS[usize::from(w.op.load(Ordering::SeqCst)).min(OPS.len() - 1)];
            eprintln!(
                "error: rank {rank} of {size}: {op} did not complete within {} s; another rank \
                 has probably died or hung. Ending this rank so that mpirun ends the job.",
                timeout.as_secs()
            );
            std::process::exit(1);
        }
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
        if send.len() != recv.len() {
            return Err(Error::Distributed(format!(
                "all-reduce buffers differ in length ({} and {})",
                send.len(),
                recv.len()
            )));
        }
        // MPI counts are C ints: split larger buffers.
        const CHUNK: usize = 1 << 30;
        for (s, r) in send.chunks(CHUNK).zip(recv.chunks_mut(CHUNK)) {
            self.watched(1, || {
                self.world.all_reduce_into(s, r, SystemOperation::sum())
            });
        }
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        self.watched(2, || self.world.barrier());
        Ok(())
    }

    fn abort(&self, code: i32) -> ! {
        mpi::topology::Communicator::abort(&self.world, code)
    }
}
