//! Next-token cross-entropy as one autograd node: per row of `logits [n, vocab]`,
//! `loss = logsumexp(logits) - logits[target]`.
//!
//! Composed (row max, subtract, exp, sum, log, gather, subtract) it keeps several `[n, vocab]`
//! tensors alive until the backward, and the gather's backward scatters into a fresh zero
//! `[n, vocab]` tensor; with GPT-2's 50257-token vocabulary those are hundreds of megabytes a step.
//! Fused: the forward reads the logits once (a running maximum and a rescaled sum of
//! exponentials) and writes each row's loss and log-sum-exp; the backward writes
//! `dlogits = dloss (softmax(logits) - onehot(target))` in one pass from those log-sum-exps.
//!
//! CPU kernels (f32, f64) and CUDA kernels (f32). The CPU checks every target against the
//! vocabulary; the CUDA kernel, which cannot report an error without a synchronisation, gives a
//! NaN loss for a target outside it (the trainer checks every batch's token ids on the host
//! before they reach the device).

use super::float::{contiguous, Float};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

struct CrossEntropy;

/// The targets as a slice, checked: u32, one per row, each below `vocab`.
fn targets<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    n: usize,
    vocab: usize,
) -> candle_core::Result<&'a [u32]> {
    let CpuStorage::U32(t) = s else {
        candle_core::bail!("cross-entropy: targets must be u32, got {:?}", s.dtype());
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("cross-entropy: targets are not contiguous");
    };
    let t = &t[a..b];
    if t.len() != n {
        candle_core::bail!("cross-entropy: {} targets for {n} rows of logits", t.len());
    }
    if let Some((i, &bad)) = t.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
        candle_core::bail!(
            "cross-entropy: target {bad} at row {i} is outside the vocabulary of {vocab}"
        );
    }
    Ok(t)
}

/// `max + log(sum(exp(row - max)))`, the row's log-sum-exp, in one pass: the running sum is
/// rescaled whenever the maximum grows.
fn row_lse<T: Float>(row: &[T]) -> T {
    let mut max = T::NEG_INF;
    let mut sum = T::ZERO;
    for &v in row {
        if v > max {
            sum = sum * (max - v).exp() + T::ONE;
            max = v;
        } else {
            sum += (v - max).exp();
        }
    }
    max + sum.ln()
}

/// `[2, n]`: each row's loss, then its log-sum-exp (which the backward reuses).
fn forward<T: Float>(logits: &[T], t: &[u32], vocab: usize) -> Vec<T> {
    let n = t.len();
    let mut out = vec![T::ZERO; 2 * n];
    let (loss, lse) = out.split_at_mut(n);
    loss.par_iter_mut()
        .zip(lse.par_iter_mut())
        .zip(logits.par_chunks(vocab.max(1)).zip(t.par_iter()))
        .for_each(|((l, s), (row, &target))| {
            *s = row_lse(row);
            *l = *s - row[target as usize];
        });
    out
}

/// `dloss (softmax(row) - onehot(target))` for each row, from the forward's log-sum-exps.
fn backward<T: Float>(logits: &[T], t: &[u32], dloss: &[T], lse: &[T], vocab: usize) -> Vec<T> {
    let mut out = vec![T::ZERO; logits.len()];
    out.par_chunks_mut(vocab.max(1))
        .zip(logits.par_chunks(vocab.max(1)))
        .zip(t.par_iter().zip(dloss.par_iter().zip(lse.par_iter())))
        .for_each(|((o, row), (&target, (&d, &s)))| {
            for (g, &v) in o.iter_mut().zip(row) {
                *g = d * (v - s).exp();
            }
            o[target as usize] = o[target as usize] - d;
        });
    out
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(
        &self,
        ls: &CpuStorage,
        ll: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, vocab) = ll.shape().dims2()?;
        let t = targets(ts, tl, n, vocab)?;
        let out = match ls {
            CpuStorage::F32(_) => {
                f32::storage(forward(contiguous::<f32>(self.name(), ls, ll)?, t, vocab))
            }
            CpuStorage::F64(_) => {
                f64::storage(forward(contiguous::<f64>(self.name(), ls, ll)?, t, vocab))
            }
            other => candle_core::bail!("cross-entropy: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, Shape::from((2, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ls: &candle_core::CudaStorage,
        ll: &Layout,
        ts: &candle_core::CudaStorage,
        tl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda;
        let (n, vocab) = ll.shape().dims2()?;
        if vocab == 0 && n > 0 {
            candle_core::bail!("cross-entropy: logits have an empty vocabulary");
        }
        let x = cuda::input(self.name(), ls, ll)?;
        let t = cuda_targets(ts, tl, n)?;
        let dev = ls.device();
        let out = cuda::output::<f32>(dev, 2 * n)?;
        let (vi, rows) = (cuda::int(self.name(), "vocabulary", vocab)?, n as u64);
        cuda::int(self.name(), "rows", n)?;
        if n > 0 {
            cuda::launch!(
                dev,
                "cross_entropy_fwd",
                cuda::rows(n, vocab),
                &x,
                &t,
                &out,
                &vi,
                &rows
            );
        }
        Ok((cuda::storage(out, dev), Shape::from((2, n))))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        out: &Tensor,
        dout: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // Only the losses (row 0 of the output) are used downstream; row 1 holds the
        // log-sum-exps for this backward. `[2, n]`: the losses' gradient, then those.
        let both = Tensor::stack(&[&dout.get(0)?, &out.detach().get(1)?], 0)?;
        let d = logits
            .detach()
            .apply_op3_no_bwd(&targets.detach(), &both, &CrossEntropyBwd)?;
        Ok((Some(d), None))
    }
}

struct CrossEntropyBwd;

impl CustomOp3 for CrossEntropyBwd {
    fn name(&self) -> &'static str {
        "cross-entropy-bwd"
    }

    fn cpu_fwd(
        &self,
        ls: &CpuStorage,
        ll: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
        ds: &CpuStorage,
        dl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, vocab) = ll.shape().dims2()?;
        let t = targets(ts, tl, n, vocab)?;
        if dl.shape().dims() != [2, n] {
            candle_core::bail!(
                "cross-entropy: gradient {:?} for {n} rows",
                dl.shape().dims()
            );
        }
        let out = match ls {
            CpuStorage::F32(_) => {
                let (d, lse) = contiguous::<f32>(self.name(), ds, dl)?.split_at(n);
                let l = contiguous::<f32>(self.name(), ls, ll)?;
                f32::storage(backward(l, t, d, lse, vocab))
            }
            CpuStorage::F64(_) => {
                let (d, lse) = contiguous::<f64>(self.name(), ds, dl)?.split_at(n);
                let l = contiguous::<f64>(self.name(), ls, ll)?;
                f64::storage(backward(l, t, d, lse, vocab))
            }
            other => candle_core::bail!("cross-entropy: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, ll.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ls: &candle_core::CudaStorage,
        ll: &Layout,
        ts: &candle_core::CudaStorage,
        tl: &Layout,
        ds: &candle_core::CudaStorage,
        dl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda;
        let (n, vocab) = ll.shape().dims2()?;
        if dl.shape().dims() != [2, n] {
            candle_core::bail!(
                "cross-entropy: gradient {:?} for {n} rows",
                dl.shape().dims()
            );
        }
        let x = cuda::input(self.name(), ls, ll)?;
        let t = cuda_targets(ts, tl, n)?;
        let d = cuda::input(self.name(), ds, dl)?;
        let dev = ls.device();
        let dx = cuda::output::<f32>(dev, n * vocab)?;
        let (vi, rows) = (cuda::int(self.name(), "vocabulary", vocab)?, n as u64);
        cuda::int(self.name(), "rows", n)?;
        if n > 0 && vocab > 0 {
            cuda::launch!(
                dev,
                "cross_entropy_bwd",
                cuda::rows(n, vocab),
                &x,
                &t,
                &d,
                &dx,
                &vi,
                &rows
            );
        }
        Ok((cuda::storage(dx, dev), ll.shape().clone()))
    }
}

/// The targets' device buffer, checked: u32, contiguous, one per row.
#[cfg(feature = "cuda")]
fn cuda_targets<'a>(
    s: &'a candle_core::CudaStorage,
    l: &Layout,
    n: usize,
) -> candle_core::Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, u32>> {
    if s.dtype() != candle_core::DType::U32 {
        candle_core::bail!("cross-entropy: targets must be u32, got {:?}", s.dtype());
    }
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("cross-entropy: targets are not contiguous");
    };
    if b - a != n {
        candle_core::bail!("cross-entropy: {} targets for {n} rows of logits", b - a);
    }
    Ok(s.as_cuda_slice::<u32>()?.slice(a..b))
}

/// Per-row cross-entropy `[n]` of `logits [n, vocab]` (f32 or f64 on the CPU, f32 on CUDA)
/// against `targets [n]` (u32, each below `vocab`).
pub fn cross_entropy_rows(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    logits
        .contiguous()?
        .apply_op2(&targets.contiguous()?, CrossEntropy)?
        .get(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::loss::cross_entropy_composed_rows;
    use crate::ops::float::max_abs_diff as max_diff;
    use candle_core::{DType, Device, Var};

    #[test]
    fn values_and_gradients_equal_the_composed_ops() {
        for (n, v) in [(1, 1), (5, 7), (33, 258)] {
            let logits = Var::randn(0f64, 3.0, (n, v), &Device::Cpu).unwrap();
            let t: Vec<u32> = (0..n).map(|i| ((i * 7 + 3) % v) as u32).collect();
            let targets = Tensor::new(t.as_slice(), &Device::Cpu).unwrap();
            let fused = cross_entropy_rows(&logits, &targets).unwrap();
            let composed = cross_entropy_composed_rows(&logits, &targets).unwrap();
            assert!(max_diff(&fused, &composed) < 1e-12, "values ({n},{v})");
            let (gf, gc) = crate::ops::float::probed_grads(&fused, &composed);
            let d = max_diff(gf.get(&logits).unwrap(), gc.get(&logits).unwrap());
            assert!(d < 1e-12, "dlogits ({n},{v}) differs by {d}");
        }
    }

    #[test]
    fn bad_targets_are_errors() {
        let logits = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
        let out_of_range = Tensor::new(&[1u32, 4], &Device::Cpu).unwrap();
        let err = cross_entropy_rows(&logits, &out_of_range)
            .unwrap_err()
            .to_string();
        assert!(err.contains("target 4 at row 1"), "{err}");
        let short = Tensor::new(&[1u32], &Device::Cpu).unwrap();
        assert!(cross_entropy_rows(&logits, &short).is_err());
        let signed = Tensor::new(&[1i64, 2], &Device::Cpu).unwrap();
        assert!(cross_entropy_rows(&logits, &signed).is_err());
    }
}
