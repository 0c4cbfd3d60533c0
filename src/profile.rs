//! Opt-in timing of named regions of a training step, to find where a step's time goes.
//!
//! On a GPU, kernels run asynchronously, so a host clock around an op measures its launch, not
//! its work. When profiling is on, a region therefore waits for the device when it starts and
//! when it ends: its time is its kernels' device time plus their launch cost. The waits also
//! keep the device from overlapping one region's work with the next one's launches, so a
//! profiled step is slower than a plain one: read the regions as shares of a step, and take
//! tokens/s from a run without profiling. Off (the default), a region costs one atomic load.
//!
//! Regions nest: each records its own time less that of the regions inside it, so the times of
//! all regions add up to the time spent inside the outermost ones.

use candle_core::Device;
use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

static ON: AtomicBool = AtomicBool::new(false);

/// Per region name, in the order first seen: total own milliseconds and number of calls.
static TOTALS: Mutex<Vec<RegionTime>> = Mutex::new(Vec::new());

thread_local! {
    /// For each region open on this thread, outermost first: milliseconds spent in the regions
    /// nested inside it so far.
    static OPEN: RefCell<Vec<f64>> = const { RefCell::new(Vec::new()) };
}

/// The accumulated time of one named region.
#[derive(Debug, Clone, PartialEq)]
pub struct RegionTime {
    /// The region's name, e.g. "layer fwd attention".
    pub name: &'static str,
    /// Milliseconds spent in the region, not counting regions nested inside it.
    pub total_ms: f64,
    /// How many times the region ran.
    pub calls: u64,
}

/// Turns profiling on or off for the whole process.
pub fn set_profiling(on: bool) {
    ON.store(on, Ordering::Relaxed);
}

/// Whether profiling is on.
pub(crate) fn profiling() -> bool {
    ON.load(Ordering::Relaxed)
}

/// The regions timed since the last call, in the order they were first seen, and clears them.
pub fn take_regions() -> Vec<RegionTime> {
    match TOTALS.lock() {
        Ok(mut t) => std::mem::take(&mut *t),
        // A panic while recording leaves at worst one region's sum half-updated; the times are
        // diagnostics, so keep them rather than lose all of them.
        Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
    }
}

fn record(name: &'static str, own_ms: f64) {
    let mut totals = TOTALS.lock().unwrap_or_else(|p| p.into_inner());
    match totals.iter_mut().find(|r| r.name == name) {
        Some(r) => {
            r.total_ms += own_ms;
            r.calls += 1;
        }
        None => totals.push(RegionTime {
            name,
            total_ms: own_ms,
            calls: 1,
        }),
    }
}

/// This thread's innermost open region; leaves the stack of open regions as it found it even
/// when the region's code panics.
struct OpenRegion {
    closed: bool,
}

impl OpenRegion {
    fn enter() -> Self {
        OPEN.with(|o| o.borrow_mut().push(0.0));
        OpenRegion { closed: false }
    }

    /// Closes the region after `elapsed` ms: adds them to the enclosing region's nested time and
    /// returns this region's own nested time.
    fn close(mut self, elapsed: f64) -> f64 {
        self.closed = true;
        OPEN.with(|o| {
            let mut o = o.borrow_mut();
            let nested = o.pop().unwrap_or(0.0);
            if let Some(parent) = o.last_mut() {
                *parent += elapsed;
            }
            nested
        })
    }
}

impl Drop for OpenRegion {
    fn drop(&mut self) {
        if !self.closed {
            OPEN.with(|o| o.borrow_mut().pop());
        }
    }
}

/// An error type a region can report a failed wait for the device in.
pub trait SyncError {
    /// The error for a failed wait at the start or end of region `name`.
    fn sync_failed(name: &'static str, source: candle_core::Error) -> Self;
}

impl SyncError for candle_core::Error {
    fn sync_failed(name: &'static str, source: candle_core::Error) -> Self {
        source.context(format!(
            "waiting for the device around profiled region {name:?}"
        ))
    }
}

impl SyncError for crate::error::Error {
    fn sync_failed(name: &'static str, source: candle_core::Error) -> Self {
        crate::error::Error::tensor(
            format!("waiting for the device around profiled region {name:?}"),
            source,
        )
    }
}

/// Runs `f` as the region `name` on `device`: timed when profiling is on (see the module
/// documentation), simply run otherwise. `f`'s error comes first; a failed wait for the device
/// is reported as `E`.
pub fn region<T, E: SyncError>(
    name: &'static str,
    device: &Device,
    f: impl FnOnce() -> Result<T, E>,
) -> Result<T, E> {
    if !profiling() {
        return f();
    }
    device.synchronize().map_err(|e| E::sync_failed(name, e))?;
    let open = OpenRegion::enter();
    let started = Instant::now();
    let result = f();
    let synced = device.synchronize();
    let elapsed = started.elapsed().as_secs_f64() * 1e3;
    let nested = open.close(elapsed);
    let value = result?;
    synced.map_err(|e| E::sync_failed(name, e))?;
    record(name, (elapsed - nested).max(0.0));
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn sleep_ms(ms: u64) -> candle_core::Result<()> {
        std::thread::sleep(Duration::from_millis(ms));
        Ok(())
    }

    /// The regions named "test ...": other tests of this binary train models meanwhile, and
    /// while profiling is on their regions are recorded too.
    fn own(regions: Vec<RegionTime>) -> Vec<RegionTime> {
        regions
            .into_iter()
            .filter(|r| r.name.starts_with("test "))
            .collect()
    }

    // One test, because profiling is a process-wide switch and the tests of a binary run in
    // parallel.
    #[test]
    fn regions_record_own_time_only_when_on() {
        let cpu = Device::Cpu;
        set_profiling(false);
        take_regions();
        region("test off", &cpu, || sleep_ms(1)).unwrap();
        assert!(
            own(take_regions()).is_empty(),
            "nothing is recorded when off"
        );

        set_profiling(true);
        let wall = Instant::now();
        for _ in 0..2 {
            region("test outer", &cpu, || {
                sleep_ms(20)?;
                region("test inner", &cpu, || sleep_ms(40))
            })
            .unwrap();
        }
        let wall_ms = wall.elapsed().as_secs_f64() * 1e3;
        let failed: candle_core::Result<()> = region("test failing", &cpu, || {
            Err(candle_core::Error::Msg("boom".into()))
        });
        let panicked = std::panic::catch_unwind(|| {
            region("test panicking", &cpu, || -> candle_core::Result<()> {
                panic!("boom")
            })
        });
        assert!(panicked.is_err(), "the panic is passed on");
        OPEN.with(|o| assert!(o.borrow().is_empty(), "a panicking region was closed"));
        set_profiling(false);
        assert!(failed.is_err(), "the region's error is passed on");
        let r = own(take_regions());
        let names: Vec<_> = r.iter().map(|r| r.name).collect();
        // "inner" ends first, so it is recorded first; a failed region is not recorded.
        assert_eq!(names, ["test inner", "test outer"]);
        assert_eq!((r[0].calls, r[1].calls), (2, 2));
        assert!(r[0].total_ms >= 80.0, "inner: {:?}", r[0]);
        assert!(r[1].total_ms >= 40.0, "outer: {:?}", r[1]);
        // Own times exclude nested regions: together they fit in the wall time (counted twice,
        // the 80 ms inside "inner" would not).
        assert!(
            r[0].total_ms + r[1].total_ms <= wall_ms,
            "{r:?} in {wall_ms} ms"
        );
        assert!(own(take_regions()).is_empty(), "take_regions clears");
        OPEN.with(|o| assert!(o.borrow().is_empty(), "every region was closed"));
    }
}
