//! Kernels over many tensors in one launch: their launch geometry, and the check that makes
//! writing through a table of device addresses safe.
//!
//! The optimizer's per-tensor work (the gradient norm, the AdamW update) is a few hundred small
//! tensors in the adapter phase: launched one tensor at a time, a step spent more time issuing
//! kernels than running them. A grouped kernel takes a table with one entry per tensor (device
//! addresses and sizes, uploaded once per call); `blockIdx.y` picks the entry and a fixed number
//! of blocks along x strides over its elements. Fixed per call, so a reduction's order, and
//! with it its result, does not depend on scheduling.

use std::ops::Range;

/// Threads per block of a grouped kernel.
pub(crate) const BLOCK: usize = 256;
/// The most tensors one launch takes (CUDA's limit on `gridDim.y`); longer tables are launched
/// in parts.
pub(crate) const MAX_TENSORS_PER_LAUNCH: usize = 65_535;
/// Elements each thread takes, at least, in the longest tensor: enough work per block to hide
/// its start, few enough blocks to spread a large tensor over the whole card.
const ELEMENTS_PER_THREAD: usize = 16;
/// The most blocks a tensor gets. Shorter tensors leave most of theirs idle, so more would mostly
/// add scheduling work.
const MAX_BLOCKS_PER_TENSOR: usize = 256;

/// The geometry of a grouped launch: `tensors` entries, `per_tensor` blocks each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Grouped {
    tensors: usize,
    per_tensor: usize,
}

impl Grouped {
    /// The geometry for tensors of these element counts.
    pub fn new(lens: impl IntoIterator<Item = usize>) -> Self {
        let (mut tensors, mut longest) = (0, 0);
        for n in lens {
            tensors += 1;
            longest = longest.max(n);
        }
        let per_tensor = longest
            .div_ceil(BLOCK * ELEMENTS_PER_THREAD)
            .clamp(1, MAX_BLOCKS_PER_TENSOR);
        Grouped {
            tensors,
            per_tensor,
        }
    }

    /// Blocks in all launches together (a reduction's partial sums, one per block).
    pub(crate) fn blocks(&self) -> usize {
        self.tensors * self.per_tensor
    }

    /// Blocks per tensor, `gridDim.x`.
    #[cfg(test)]
    fn per_tensor(&self) -> usize {
        self.per_tensor
    }

    /// The table entries of each launch, in order.
    pub(crate) fn launches(&self) -> impl Iterator<Item = Range<usize>> {
        let n = self.tensors;
        (0..n)
            .step_by(MAX_TENSORS_PER_LAUNCH)
            .map(move |s| s..(s + MAX_TENSORS_PER_LAUNCH).min(n))
    }

    /// The partial sums that the launch over `tensors` writes.
    pub(crate) fn partials(&self, tensors: &Range<usize>) -> Range<usize> {
        tensors.start * self.per_tensor..tensors.end * self.per_tensor
    }

    /// The CUDA launch configuration for the launch over `tensors`.
    #[cfg(feature = "cuda")]
    pub fn config(
        &self,
        tensors: &Range<usize>,
    ) -> candle_core::cuda_backend::cudarc::driver::LaunchConfig {
        candle_core::cuda_backend::cudarc::driver::LaunchConfig {
            grid_dim: (self.per_tensor as u32, tensors.len() as u32, 1),
            block_dim: (BLOCK as u32, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

/// A byte range of device memory, `[start, end)`, and a number the caller names it by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Span {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// The caller's name for it.
    pub id: usize,
}

/// Two ranges that a grouped kernel must not touch together: `first` is written, `second` is
/// written too or, when `second_read`, read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Overlap {
    /// The id of a written range.
    pub first: usize,
    /// The id of the range that overlaps it.
    pub second: usize,
    /// Whether `second` is read rather than written.
    pub second_read: bool,
}

/// Checks that a grouped kernel may write `written` in place while it reads `read`: no two
/// written ranges overlap, and no read range overlaps a written one (reads may overlap each
/// other). Moments that share storage (a state built as two views of one buffer, a clone held
/// as both) would otherwise be updated twice, or read after being written, in an order the
/// card chooses. Empty ranges overlap nothing. Sorts `written`.
pub(crate) fn check_disjoint(written: &mut [Span], read: &[Span]) -> Result<(), Overlap> {
    written.sort_unstable_by_key(|s| (s.start, s.end));
    let live: Vec<Span> = written
        .iter()
        .copied()
        .filter(|s| s.end > s.start)
        .collect();
    for pair in live.windows(2) {
        if pair[1].start < pair[0].end {
            return Err(Overlap {
                first: pair[0].id,
                second: pair[1].id,
                second_read: false,
            });
        }
    }
    for r in read.iter().filter(|r| r.end > r.start) {
        // The written ranges starting before r ends; only the last of them can reach into r,
        // since they are sorted and disjoint.
        let before = live.partition_point(|w| w.start < r.end);
        if let Some(w) = before.checked_sub(1).map(|i| live[i]) {
            if w.end > r.start {
                return Err(Overlap {
                    first: w.id,
                    second: r.id,
                    second_read: true,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(start: u64, end: u64, id: usize) -> Span {
        Span { start, end, id }
    }

    #[test]
    fn geometry_covers_every_tensor_and_splits_long_tables() {
        let g = Grouped::new([10, 5_000_000, 0]);
        assert_eq!(g.per_tensor(), MAX_BLOCKS_PER_TENSOR);
        assert_eq!(g.blocks(), 3 * MAX_BLOCKS_PER_TENSOR);
        assert_eq!(g.launches().collect::<Vec<_>>(), vec![0..3]);
        let small = Grouped::new([1, 4096, 4097]);
        assert_eq!(
            small.per_tensor(),
            2,
            "4097 elements at 16 per thread of 256"
        );
        assert_eq!(Grouped::new([0, 0]).per_tensor(), 1);
        let many = Grouped::new(std::iter::repeat_n(7, 2 * MAX_TENSORS_PER_LAUNCH + 3));
        let parts: Vec<_> = many.launches().collect();
        assert_eq!(
            parts,
            vec![
                0..MAX_TENSORS_PER_LAUNCH,
                MAX_TENSORS_PER_LAUNCH..2 * MAX_TENSORS_PER_LAUNCH,
                2 * MAX_TENSORS_PER_LAUNCH..2 * MAX_TENSORS_PER_LAUNCH + 3
            ]
        );
        // The partial sums of consecutive launches tile the buffer.
        assert_eq!(many.partials(&parts[1]).start, many.partials(&parts[0]).end);
        assert_eq!(many.partials(&parts[2]).end, many.blocks());
        assert!(Grouped::new([]).launches().next().is_none());
    }

    #[test]
    fn overlapping_writes_and_reads_of_written_memory_are_refused() {
        let mut ok = vec![span(100, 200, 1), span(0, 100, 0), span(200, 300, 2)];
        let reads = [span(300, 400, 3), span(350, 360, 4), span(50, 50, 5)];
        assert_eq!(check_disjoint(&mut ok, &reads), Ok(()));

        let mut shared = vec![span(0, 100, 0), span(150, 250, 1), span(200, 300, 2)];
        let both_written = Overlap {
            first: 1,
            second: 2,
            second_read: false,
        };
        assert_eq!(check_disjoint(&mut shared, &[]), Err(both_written));

        // A read that reaches into a written range: from below, from inside, across it.
        for r in [span(90, 101, 9), span(120, 130, 9), span(0, 1000, 9)] {
            let mut w = vec![span(100, 200, 1), span(0, 50, 0)];
            let e = check_disjoint(&mut w, &[r]).unwrap_err();
            assert_eq!((e.second, e.second_read), (9, true), "{r:?}");
        }
        // Empty writes overlap nothing.
        let mut w = vec![span(100, 100, 0), span(50, 150, 1)];
        assert_eq!(check_disjoint(&mut w, &[span(100, 100, 2)]), Ok(()));
    }
}
