//! Seeded, resumable batches of training windows.
//!
//! The token stream is cut into non-overlapping windows that start at multiples of `seq_len` and
//! hold `seq_len + 1` tokens (the extra token is the last target). Each epoch visits every window
//! once in an order drawn by a Fisher-Yates shuffle. The generator's state at the start of the
//! epoch is all that is needed to redraw that order, so a checkpoint stores three numbers' worth
//! of state ([`BatcherState`]) and resuming never replays the batches already seen.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::rng::Rng;

/// Name of the random stream the batcher derives from the run seed, so data order does not shift
/// when other parts of the program draw more or fewer random numbers.
const DATA_ORDER_STREAM: &str = "data-order";

/// A batch of training windows, row-major `[batch, seq_len]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// Input ids, `batch * seq_len` of them.
    pub inputs: Vec<u32>,
    /// Target ids: the input window shifted left by one token.
    pub targets: Vec<u32>,
    /// Number of rows.
    pub batch: usize,
    /// Tokens per row.
    pub seq_len: usize,
}

/// Everything needed to continue a [`Batcher`] exactly where it stopped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatcherState {
    /// Number of completed passes over the data.
    pub epoch: u64,
    /// Index of the next window within the current epoch's order.
    pub cursor: u64,
    /// The generator as it was when the current epoch's order was drawn.
    pub rng: Rng,
}

/// Yields shuffled training batches from a token stream; see the module docs for the scheme.
#[derive(Clone, Debug)]
pub struct Batcher {
    tokens: Arc<Vec<u32>>,
    batch: usize,
    seq_len: usize,
    epoch: u64,
    cursor: usize,
    /// Generator state before the current order was drawn (what a checkpoint saves).
    epoch_rng: Rng,
    /// Generator state after drawing it, i.e. the start state of the next epoch.
    next_rng: Rng,
    /// Window indices (not token offsets) in visiting order.
    order: Vec<usize>,
}

impl Batcher {
    /// A batcher over `tokens` yielding `batch` rows of `seq_len` tokens, ordered by `seed`.
    /// Fails if `batch` or `seq_len` is zero or if the data cannot fill a single window of
    /// `seq_len + 1` tokens.
    pub fn new(
        tokens: impl Into<Arc<Vec<u32>>>,
        batch: usize,
        seq_len: usize,
        seed: u64,
    ) -> Result<Batcher> {
        let tokens = tokens.into();
        if batch == 0 || seq_len == 0 {
            return Err(Error::Data(format!(
                "batch size ({batch}) and sequence length ({seq_len}) must both be positive"
            )));
        }
        let needed = seq_len
            .checked_add(1)
            .ok_or_else(|| Error::Data(format!("sequence length {seq_len} is too large")))?;
        if tokens.len() < needed {
            return Err(Error::Data(format!(
                "data has {} tokens but one training window of sequence length {seq_len} needs \
                 {needed}",
                tokens.len()
            )));
        }
        let rng = Rng::derived(seed, DATA_ORDER_STREAM);
        let mut batcher = Batcher {
            tokens,
            batch,
            seq_len,
            epoch: 0,
            cursor: 0,
            epoch_rng: rng.clone(),
            next_rng: rng,
            order: Vec::new(),
        };
        batcher.draw_order();
        Ok(batcher)
    }

    /// Rows per batch.
    pub fn batch_size(&self) -> usize {
        self.batch
    }

    /// Tokens per row.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Number of windows in one epoch.
    #[cfg(test)]
    pub(crate) fn windows_per_epoch(&self) -> usize {
        self.order.len()
    }

    /// The next batch. When the data holds fewer windows than `batch`, a batch spans epochs and
    /// may contain a window twice; that is the only way to fill it.
    pub fn next_batch(&mut self) -> Batch {
        let rows = self.batch;
        let seq_len = self.seq_len;
        let mut inputs = Vec::with_capacity(rows * seq_len);
        let mut targets = Vec::with_capacity(rows * seq_len);
        for _ in 0..rows {
            let start = self.order[self.cursor] * seq_len;
            let window = &self.tokens[start..start + seq_len + 1];
            inputs.extend_from_slice(&window[..seq_len]);
            targets.extend_from_slice(&window[1..]);
            self.cursor += 1;
            // Rolling over eagerly keeps `cursor` always inside the order, so a saved state
            // never points past the end.
            if self.cursor == self.order.len() {
                self.start_next_epoch();
            }
        }
        Batch {
            inputs,
            targets,
            batch: rows,
            seq_len,
        }
    }

    /// Advances past the next batch without building it, exactly as [`Batcher::next_batch`]
    /// would (a data-parallel rank skipping the micro-batches of the other ranks).
    pub(crate) fn skip_batch(&mut self) {
        for _ in 0..self.batch {
            self.cursor += 1;
            if self.cursor == self.order.len() {
                self.start_next_epoch();
            }
        }
    }

    /// The current position, for a checkpoint.
    pub fn state(&self) -> BatcherState {
        BatcherState {
            epoch: self.epoch,
            cursor: self.cursor as u64,
            rng: self.epoch_rng.clone(),
        }
    }

    /// Continues from a position saved by [`Batcher::state`]. The batcher must have been built
    /// over the same tokens and `seq_len`; a cursor beyond this data's window count is rejected
    /// because it proves the data differ.
    pub fn restore(&mut self, state: BatcherState) -> Result<()> {
        let windows = self.order.len();
        let cursor = usize::try_from(state.cursor)
            .ok()
            .filter(|&c| c < windows)
            .ok_or_else(|| {
                Error::Data(format!(
                    "batcher state cursor {} is outside the {windows} windows per epoch of this \
                     data ({} tokens, sequence length {}); was it saved with different data or \
                     sequence length?",
                    state.cursor,
                    self.tokens.len(),
                    self.seq_len
                ))
            })?;
        self.epoch = state.epoch;
        self.epoch_rng = state.rng.clone();
        self.next_rng = state.rng;
        self.draw_order();
        self.cursor = cursor;
        Ok(())
    }

    fn start_next_epoch(&mut self) {
        self.epoch += 1;
        self.cursor = 0;
        self.epoch_rng = self.next_rng.clone();
        self.draw_order();
    }

    /// Shuffles the windows with `next_rng`, which must equal `epoch_rng` on entry.
    fn draw_order(&mut self) {
        let windows = (self.tokens.len() - 1) / self.seq_len;
        self.order.clear();
        self.order.extend(0..windows);
        let rng = &mut self.next_rng;
        for i in (1..windows).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            self.order.swap(i, j);
        }
    }
}

/// Evaluation batches: the windows at offsets `0, seq_len, 2 * seq_len, ...` in order, `batch`
/// rows at a time, the last batch keeping whatever rows remain. At most `max_batches` batches are
/// returned when given. The result is empty when `batch` or `seq_len` is zero or the data cannot
/// fill one window of `seq_len + 1` tokens.
pub fn eval_batches(
    tokens: &[u32],
    batch: usize,
    seq_len: usize,
    max_batches: Option<usize>,
) -> Vec<Batch> {
    if batch == 0 || seq_len == 0 || tokens.len() <= seq_len {
        return Vec::new();
    }
    let windows = (tokens.len() - 1) / seq_len;
    let limit = max_batches.unwrap_or(usize::MAX);
    let starts: Vec<usize> = (0..windows).map(|w| w * seq_len).collect();
    starts
        .chunks(batch)
        .take(limit)
        .map(|rows| {
            let mut inputs = Vec::with_capacity(rows.len() * seq_len);
            let mut targets = Vec::with_capacity(rows.len() * seq_len);
            for &start in rows {
                inputs.extend_from_slice(&tokens[start..start + seq_len]);
                targets.extend_from_slice(&tokens[start + 1..start + seq_len + 1]);
            }
            Batch {
                inputs,
                targets,
                batch: rows.len(),
                seq_len,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// Token i has value i, so a row's first input reveals its window start.
    fn ramp(n: u32) -> Vec<u32> {
        (0..n).collect()
    }

    fn row_starts(b: &Batch) -> Vec<usize> {
        (0..b.batch)
            .map(|r| b.inputs[r * b.seq_len] as usize)
            .collect()
    }

    #[test]
    fn same_seed_gives_same_batches_and_different_seeds_differ() {
        let data = ramp(1000);
        let mut a = Batcher::new(data.clone(), 4, 8, 42).unwrap();
        let mut b = Batcher::new(data.clone(), 4, 8, 42).unwrap();
        let mut c = Batcher::new(data, 4, 8, 43).unwrap();
        let mut differs = false;
        for _ in 0..20 {
            let (x, y, z) = (a.next_batch(), b.next_batch(), c.next_batch());
            assert_eq!(x, y);
            differs |= x != z;
        }
        assert!(differs);
    }

    #[test]
    fn targets_are_inputs_shifted_by_one_in_the_source() {
        let data: Vec<u32> = (0..503u32).map(|i| (i * 7919) % 1009).collect();
        let seq_len = 10;
        let mut batcher = Batcher::new(data.clone(), 3, seq_len, 1).unwrap();
        for _ in 0..40 {
            let b = batcher.next_batch();
            assert_eq!((b.batch, b.seq_len), (3, seq_len));
            assert_eq!(b.inputs.len(), 3 * seq_len);
            assert_eq!(b.targets.len(), 3 * seq_len);
            for r in 0..b.batch {
                let row = &b.inputs[r * seq_len..(r + 1) * seq_len];
                let start = (0..data.len())
                    .step_by(seq_len)
                    .find(|&s| s + seq_len < data.len() && &data[s..s + seq_len] == row)
                    .expect("row must be an aligned window of the source");
                assert_eq!(
                    &b.targets[r * seq_len..(r + 1) * seq_len],
                    &data[start + 1..start + seq_len + 1]
                );
            }
        }
    }

    #[test]
    fn each_epoch_visits_every_full_window_once() {
        // 101 tokens, seq_len 10: windows start at 0..=90; the trailing token only serves as
        // the last target.
        let mut batcher = Batcher::new(ramp(101), 5, 10, 9).unwrap();
        assert_eq!(batcher.windows_per_epoch(), 10);
        for epoch in 0..3u64 {
            assert_eq!(batcher.epoch, epoch);
            let mut seen = BTreeSet::new();
            for _ in 0..2 {
                for s in row_starts(&batcher.next_batch()) {
                    assert!(seen.insert(s), "window {s} repeated within epoch {epoch}");
                }
            }
            let expected: BTreeSet<usize> = (0..10).map(|w| w * 10).collect();
            assert_eq!(seen, expected);
        }
        assert_eq!(batcher.epoch, 3);
    }

    #[test]
    fn skipping_a_batch_advances_exactly_like_drawing_it() {
        let data = ramp(211); // batches of 4 windows of 10 straddle epoch ends
        let mut drawn = Batcher::new(data.clone(), 4, 10, 5).unwrap();
        let mut skipped = Batcher::new(data, 4, 10, 5).unwrap();
        for i in 0..20 {
            let b = drawn.next_batch();
            if i % 3 == 1 {
                skipped.skip_batch();
            } else {
                assert_eq!(skipped.next_batch(), b);
            }
            assert_eq!(skipped.state(), drawn.state());
        }
    }

    #[test]
    fn restored_state_continues_identically_across_an_epoch_boundary() {
        let data = ramp(211); // 21 windows of 10: batches of 4 straddle epoch ends
        let mut reference = Batcher::new(data.clone(), 4, 10, 77).unwrap();
        for _ in 0..7 {
            reference.next_batch();
        }
        let saved = reference.state();
        assert_eq!(saved.epoch, 1);
        let json = serde_json::to_string(&saved).unwrap();
        let loaded: BatcherState = serde_json::from_str(&json).unwrap();
        assert_eq!(loaded, saved);

        // A batcher built with another seed must still follow the saved order once restored.
        let mut resumed = Batcher::new(data, 4, 10, 1).unwrap();
        resumed.restore(loaded).unwrap();
        assert_eq!(resumed.state(), saved);
        let start_epoch = reference.epoch;
        for _ in 0..12 {
            assert_eq!(resumed.next_batch(), reference.next_batch());
        }
        assert!(reference.epoch >= start_epoch + 2);
        assert_eq!(resumed.state(), reference.state());
    }

    #[test]
    fn restore_rejects_a_cursor_beyond_this_data() {
        let mut batcher = Batcher::new(ramp(50), 2, 10, 3).unwrap();
        let mut state = batcher.state();
        state.cursor = 4;
        let err = batcher.restore(state).unwrap_err().to_string();
        assert!(
            err.contains("cursor 4") && err.contains("4 windows"),
            "{err}"
        );
    }

    #[test]
    fn too_short_data_and_zero_sizes_are_errors() {
        let err = Batcher::new(ramp(8), 2, 8, 0).unwrap_err().to_string();
        assert!(err.contains("8 tokens") && err.contains("needs 9"), "{err}");
        assert!(Batcher::new(ramp(9), 2, 8, 0).is_ok());
        assert!(Batcher::new(ramp(100), 0, 8, 0).is_err());
        assert!(Batcher::new(ramp(100), 2, 0, 0).is_err());
        assert!(Batcher::new(Vec::new(), 1, 1, 0).is_err());
    }

    #[test]
    fn a_batch_larger_than_the_data_wraps_into_the_next_epoch() {
        let mut batcher = Batcher::new(ramp(21), 5, 10, 5).unwrap();
        let b = batcher.next_batch();
        assert_eq!(b.batch, 5);
        assert!(row_starts(&b).iter().all(|s| *s == 0 || *s == 10));
        assert_eq!(batcher.epoch, 2);
    }

    #[test]
    fn eval_batches_are_sequential_with_a_partial_last_batch() {
        let data = ramp(71); // 7 windows of 10
        let batches = eval_batches(&data, 3, 10, None);
        assert_eq!(batches.len(), 3);
        assert_eq!(
            batches.iter().map(|b| b.batch).collect::<Vec<_>>(),
            vec![3, 3, 1]
        );
        let starts: Vec<usize> = batches.iter().flat_map(row_starts).collect();
        assert_eq!(starts, vec![0, 10, 20, 30, 40, 50, 60]);
        let last = &batches[2];
        assert_eq!(last.inputs, (60..70).collect::<Vec<u32>>());
        assert_eq!(last.targets, (61..71).collect::<Vec<u32>>());
        assert_eq!(eval_batches(&data, 3, 10, Some(2)).len(), 2);
        assert!(eval_batches(&data, 3, 10, Some(0)).is_empty());
        assert!(eval_batches(&data[..10], 3, 10, None).is_empty());
        assert!(eval_batches(&data, 0, 10, None).is_empty());
    }
}
