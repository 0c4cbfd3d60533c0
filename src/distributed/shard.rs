//! Which micro-batches of a step a rank trains on.
//!
//! Every rank runs the same seeded batcher and draws all `grad_accum x world` micro-batches of
//! each step; rank `r` keeps those with index `r, r + world, r + 2 world, ...` and skips the
//! others. The union over ranks is exactly what a single process with `grad_accum x world` would
//! draw, and the batcher's state is the same on every rank, so the state rank 0 saves in a
//! checkpoint resumes every rank.

/// A rank's share of each step's micro-batches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    /// This rank.
    pub rank: usize,
    /// Number of ranks (at least 1).
    pub world: usize,
}

impl Shard {
    /// The shard of `rank` among `world` ranks; `world` 0 is treated as 1.
    pub fn new(rank: usize, world: usize) -> Shard {
        Shard {
            rank,
            world: world.max(1),
        }
    }

    /// Micro-batches all ranks together draw per step when each runs `grad_accum`.
    pub(crate) fn global_micro_batches(&self, grad_accum: usize) -> usize {
        grad_accum * self.world
    }

    /// Whether the step's micro-batch number `index` (0-based, over all ranks) is this rank's.
    pub(crate) fn owns(&self, index: usize) -> bool {
        index % self.world == self.rank
    }
}

#[cfg(test)]
mod tests {
    use super::Shard;

    #[test]
    fn ranks_split_each_step_without_overlap() {
        let world = 3;
        let accum = 2;
        let mut seen = vec![0; Shard::new(0, world).global_micro_batches(accum)];
        for rank in 0..world {
            let s = Shard::new(rank, world);
            let mine: Vec<usize> = (0..seen.len()).filter(|&i| s.owns(i)).collect();
            assert_eq!(
                mine.len(),
                accum,
                "rank {rank} gets grad_accum micro-batches"
            );
            for i in mine {
                seen[i] += 1;
            }
        }
        assert!(seen.iter().all(|&n| n == 1));
        let single = Shard::new(0, 0);
        assert!((0..4).all(|i| single.owns(i)));
    }
}
