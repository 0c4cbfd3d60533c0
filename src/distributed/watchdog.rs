//! A hang watchdog for collective calls. A peer rank that dies is noticed by the launcher or the
//! backend; one that hangs without dying (stopped, a lost node) would leave every other rank
//! waiting in its next collective forever. The watchdog ends this process, with a message that
//! says which call hung, when one collective has not completed within the timeout; the launcher
//! (`mpirun`, `torchrun`, a batch system) then ends the rest of the job.

use crate::error::{Error, Result};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The collective calls the watchdog can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Collective {
    /// A gradient all-reduce.
    AllReduce = 1,
    /// A barrier.
    Barrier = 2,
}

impl Collective {
    fn describe(op: u8) -> &'static str {
        match op {
            1 => "an all-reduce",
            2 => "a barrier",
            _ => "a collective call",
        }
    }
}

/// The in-flight collective and its deadline, shared with the watchdog thread.
struct Watch {
    /// Milliseconds after `start` at which the call in flight is declared hung; 0: none.
    deadline_ms: AtomicU64,
    /// The [`Collective`] in flight.
    op: AtomicU8,
    start: Instant,
}

/// Watches one rank's collective calls from a background thread.
pub struct Watchdog {
    watch: Arc<Watch>,
    timeout: Duration,
}

impl Watchdog {
    /// Starts the watchdog thread of rank `rank` of `world` for backend `backend` ("mpi").
    pub fn start(backend: &str, rank: usize, world: usize, timeout: Duration) -> Result<Watchdog> {
        let watch = Arc::new(Watch {
            deadline_ms: AtomicU64::new(0),
            op: AtomicU8::new(0),
            start: Instant::now(),
        });
        let w = Arc::clone(&watch);
        let launcher = match backend {
            "mpi" => "mpirun",
            _ => "the launcher",
        };
        std::thread::Builder::new()
            .name(format!("relora-{backend}-watchdog"))
            .spawn(move || watch_loop(&w, rank, world, timeout, launcher))
            .map_err(|e| {
                Error::Distributed(format!("starting the {backend} watchdog thread: {e}"))
            })?;
        Ok(Watchdog { watch, timeout })
    }

    /// Runs `f` (one collective call) under the watchdog.
    pub fn watched<T>(&self, op: Collective, f: impl FnOnce() -> T) -> T {
        let deadline = self.watch.start.elapsed() + self.timeout;
        self.watch.op.store(op as u8, Ordering::SeqCst);
        self.watch
            .deadline_ms
            .store((deadline.as_millis() as u64).max(1), Ordering::SeqCst);
        let out = f();
        self.watch.deadline_ms.store(0, Ordering::SeqCst);
        out
    }
}

/// Polls the deadline; ends the process when a collective overstays it.
fn watch_loop(w: &Watch, rank: usize, world: usize, timeout: Duration, launcher: &str) {
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let deadline = w.deadline_ms.load(Ordering::SeqCst);
        if deadline != 0 && w.start.elapsed().as_millis() as u64 > deadline {
            eprintln!(
                "error: rank {rank} of {world}: {} did not complete within {} s; another rank \
                 has probably died or hung. Ending this rank so that {launcher} ends the job.",
                Collective::describe(w.op.load(Ordering::SeqCst)),
                timeout.as_secs()
            );
            std::process::exit(1);
        }
    }
}
