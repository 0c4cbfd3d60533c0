//! Gradient averaging in a few flat buckets: the trainable gradients of a step are packed, in the
//! trainer's fixed order, into f32 buffers of at most a given size, each all-reduced with one
//! collective call and divided by the number of ranks. Only trainable parameters are reduced:
//! in the ReLoRA phase that is the adapters plus embeddings, norms and `lm_head`, not the frozen
//! projections, which is where the saving in communication comes from.

use super::Communicator;
use crate::error::{Error, Result, TensorContext};
use crate::train_state::GradientReducer;
use candle_core::{DType, Tensor};
use std::ops::Range;

/// Default bucket size: 16 MiB of f32 values.
pub const DEFAULT_BUCKET_BYTES: usize = 16 << 20;

/// What the last reduction moved, for the log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReduceStats {
    /// Gradient bytes this rank contributed to all-reduces (f32 values x 4).
    pub bytes: u64,
    /// Collective calls (one per bucket).
    pub buckets: usize,
    /// Parameters reduced.
    pub params: usize,
}

/// Groups consecutive parameters of `lens` elements into buckets of at most `cap` elements; a
/// parameter larger than `cap` gets a bucket of its own. Returns the parameter index ranges.
pub(crate) fn plan_buckets(lens: &[usize], cap: usize) -> Vec<Range<usize>> {
    let cap = cap.max(1);
    let mut out = Vec::new();
    let mut start = 0;
    let mut filled = 0usize;
    for (i, &n) in lens.iter().enumerate() {
        if i > start && filled + n > cap {
            out.push(start..i);
            start = i;
            filled = 0;
        }
        filled += n;
    }
    if start < lens.len() {
        out.push(start..lens.len());
    }
    out
}

/// A [`GradientReducer`] that averages gradients over the ranks of a [`Communicator`] in flat
/// buckets, and remembers how many bytes it reduced.
pub struct BucketReducer {
    comm: Box<dyn Communicator>,
    cap_elems: usize,
    send: Vec<f32>,
    recv: Vec<f32>,
    last: ReduceStats,
}

impl BucketReducer {
    /// A reducer over `comm` with buckets of at most `bucket_bytes` bytes (rounded down to whole
    /// f32 values, at least one).
    pub fn new(comm: Box<dyn Communicator>, bucket_bytes: usize) -> BucketReducer {
        BucketReducer {
            comm,
            cap_elems: (bucket_bytes / 4).max(1),
            send: Vec::new(),
            recv: Vec::new(),
            last: ReduceStats::default(),
        }
    }

    /// The communicator (for barriers and rank information).
    pub fn comm(&self) -> &dyn Communicator {
        self.comm.as_ref()
    }

    /// What the most recent reduction moved.
    pub fn last(&self) -> ReduceStats {
        self.last
    }

    /// All-reduces `send` into `recv` and divides by the number of ranks.
    fn average(&mut self, what: &dyn Fn() -> String) -> Result<()> {
        self.recv.clear();
        self.recv.resize(self.send.len(), 0.0);
        self.comm
            .all_reduce_sum(&self.send, &mut self.recv)
            .map_err(|e| {
                Error::Distributed(format!(
                    "rank {} of {}: all-reduce of {}: {e}",
                    self.comm.rank(),
                    self.comm.world(),
                    what()
                ))
            })?;
        let world = self.comm.world() as f32;
        for x in &mut self.recv {
            *x /= world;
        }
        Ok(())
    }

    /// Averages one bucket of gradients over the ranks: on their device when the backend can,
    /// else through host buffers. Returns the averaged values as one flat f32 tensor on the
    /// gradients' device.
    fn reduce_bucket(&mut self, grads: &[Tensor], what: &dyn Fn() -> String) -> Result<Tensor> {
        let flat: Vec<Tensor> = grads
            .iter()
            .map(|g| g.flatten_all().and_then(|t| t.to_dtype(DType::F32)))
            .collect::<candle_core::Result<_>>()
            .with_ctx(|| format!("packing {}", what()))?;
        let packed = Tensor::cat(&flat, 0).with_ctx(|| format!("packing {}", what()))?;
        let distributed = |e: Error| {
            Error::Distributed(format!(
                "rank {} of {}: all-reduce of {}: {e}",
                self.comm.rank(),
                self.comm.world(),
                what()
            ))
        };
        let world = self.comm.world() as f64;
        if let Some(sum) = self
            .comm
            .all_reduce_sum_tensor(&packed)
            .map_err(distributed)?
        {
            return sum
                .affine(1.0 / world, 0.0)
                .with_ctx(|| format!("averaging {}", what()));
        }
        self.send = packed
            .to_vec1::<f32>()
            .with_ctx(|| format!("packing {}", what()))?;
        self.average(what)?;
        Tensor::from_slice(&self.recv, self.recv.len(), packed.device())
            .with_ctx(|| format!("unpacking {}", what()))
    }
}

impl GradientReducer for BucketReducer {
    fn reduce(&mut self, name: &str, grad: &mut [f32]) -> Result<()> {
        self.send.clear();
        self.send.extend_from_slice(grad);
        self.average(&|| format!("the gradient of {name}"))?;
        grad.copy_from_slice(&self.recv);
        self.last = ReduceStats {
            bytes: 4 * grad.len() as u64,
            buckets: 1,
            params: 1,
        };
        Ok(())
    }

    fn reduce_all(&mut self, names: &[&str], grads: &mut [Tensor]) -> Result<()> {
        let lens: Vec<usize> = grads.iter().map(Tensor::elem_count).collect();
        let mut stats = ReduceStats {
            params: grads.len(),
            ..ReduceStats::default()
        };
        for (b, range) in plan_buckets(&lens, self.cap_elems).into_iter().enumerate() {
            let name = |i: usize| names.get(i).copied().unwrap_or("?");
            let what = || {
                format!(
                    "bucket {b} ({} values, {} to {})",
                    lens[range.clone()].iter().sum::<usize>(),
                    name(range.start),
                    name(range.end - 1)
                )
            };
            let values = self.reduce_bucket(&grads[range.clone()], &what)?;
            let mut off = 0;
            for i in range {
                let g = &grads[i];
                grads[i] = values
                    .narrow(0, off, lens[i])
                    .and_then(|t| t.reshape(g.shape()))
                    .and_then(|t| t.to_dtype(g.dtype()))
                    .with_ctx(|| format!("unpacking the gradient of {}", name(i)))?;
                off += lens[i];
            }
            stats.bytes += 4 * values.elem_count() as u64;
            stats.buckets += 1;
        }
        self.last = stats;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Two ranks where the other rank's gradient is always three times this one's.
    struct Mirror;

    impl Communicator for Mirror {
        fn rank(&self) -> usize {
            0
        }
        fn world(&self) -> usize {
            2
        }
        fn backend(&self) -> &str {
            "test"
        }
        fn all_reduce_sum(&self, send: &[f32], recv: &mut [f32]) -> Result<()> {
            for (r, s) in recv.iter_mut().zip(send) {
                *r = s + 3.0 * s;
            }
            Ok(())
        }
        fn barrier(&self) -> Result<()> {
            Ok(())
        }
        fn abort(&self, code: i32) -> ! {
            panic!("abort {code}")
        }
    }

    #[test]
    fn buckets_are_consecutive_and_bounded() {
        assert_eq!(
            plan_buckets(&[3, 3, 3, 10, 1], 6),
            vec![0..2, 2..3, 3..4, 4..5]
        );
        assert_eq!(plan_buckets(&[1, 1, 1], 100), vec![0..3]);
        assert!(plan_buckets(&[], 4).is_empty());
    }

    #[test]
    fn gradients_are_averaged_and_bytes_counted() {
        let dev = Device::Cpu;
        let a = Tensor::arange(0f32, 6.0, &dev)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        let b = Tensor::new(&[1f32, -2.0], &dev).unwrap();
        let c = Tensor::new(&[5f32; 4], &dev).unwrap();
        let mut grads = vec![a.clone(), b.clone(), c.clone()];
        // 8 values per bucket: [a, b] then [c].
        let mut r = BucketReducer::new(Box::new(Mirror), 32);
        r.reduce_all(&["a", "b", "c"], &mut grads).unwrap();
        for (got, orig) in grads.iter().zip([a, b, c]) {
            assert_eq!(got.dims(), orig.dims());
            let want = (orig * 2.0).unwrap();
            let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
        }
        assert_eq!(
            r.last(),
            ReduceStats {
                bytes: 4 * 12,
                buckets: 2,
                params: 3
            }
        );
        let mut one = [1f32, 2.0];
        r.reduce("x", &mut one).unwrap();
        assert_eq!(one, [2.0, 4.0]);
        assert_eq!(r.last().bytes, 8);
    }
}
