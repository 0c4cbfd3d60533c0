//! Scaled, causally masked softmax over the last dimension as one autograd node:
//! `y[i, j] = softmax_j(scale * s[i, j])` over `j <= i`, and 0 above the diagonal.
//!
//! Composed (scale, add a -inf mask, subtract the row max, exp, sum, divide) this is six nodes
//! on the largest activation of the model, `[batch, heads, t, t]`, each of whose backward passes
//! allocates and accumulates full-size buffers. Fused: one pass forward, one pass backward,
//! `ds = scale * y * (dy - sum_j(y dy))`.

use super::float::{contiguous, rows_per_task, task_len, Float};
use super::lanes::{dot, fold};
use super::widest::{widest, WideKernel};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

struct CausalSoftmax {
    scale: f64,
}

fn forward<T: Float>(x: &[T], t: usize, scale: T) -> Vec<T> {
    let mut y = vec![T::ZERO; x.len()];
    y.par_chunks_mut(task_len(t))
        .zip(x.par_chunks(task_len(t)))
        .enumerate()
        .for_each(|(chunk, (yc, xc))| {
            let first_row = chunk * rows_per_task(t);
            for (r, (yr, xr)) in yc.chunks_mut(t).zip(xc.chunks(t)).enumerate() {
                // Query position within its [t, t] block; keys 0..=i are visible.
                let i = (first_row + r) % t;
                yr[..=i].copy_from_slice(&xr[..=i]);
                softmax_row_in_place(&mut yr[..=i], scale);
            }
        });
    y
}

/// `x := softmax(scale * x)` over one row's visible scores (the caller leaves the masked
/// entries alone): the row kernel of [`causal_softmax`], for the fused attention blocks too.
/// Run in the widest vectors the CPU has ([`widest`]).
pub(crate) fn softmax_row_in_place<T: Float>(x: &mut [T], scale: T) {
    widest(SoftmaxRow { x, scale })
}

/// [`softmax_row_in_place`]'s kernel.
struct SoftmaxRow<'a, T> {
    x: &'a mut [T],
    scale: T,
}

impl<T: Float> WideKernel for SoftmaxRow<'_, T> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        softmax_row(self.x, self.scale)
    }
}

#[inline(always)]
fn softmax_row<T: Float>(x: &mut [T], scale: T) {
    // max_j(scale x_j), from the extreme of x on scale's side (rounding is monotonic, so the
    // product of the extreme is the extreme of the products).
    let pick = |up: bool| {
        move |m: T, v: T| {
            if (v > m) == up && v != m {
                v
            } else {
                m
            }
        }
    };
    let max = if scale >= T::ZERO {
        fold(x, T::NEG_INF, pick(true)) * scale
    } else {
        fold(x, -T::NEG_INF, pick(false)) * scale
    };
    for v in x.iter_mut() {
        *v = *v * scale - max;
    }
    T::exp_in_place(x);
    let inv = T::ONE / fold(x, T::ZERO, |s, v| s + v);
    for v in x.iter_mut() {
        *v = *v * inv;
    }
}

/// `dy := scale * y * (dy - sum_j(y dy))` over one row's visible entries: the row kernel of
/// [`causal_softmax_backward`], turning the gradient of the probabilities into that of the
/// scores in place.
/// Run in the widest vectors the CPU has ([`widest`]).
pub(crate) fn softmax_backward_row_in_place<T: Float>(y: &[T], dy: &mut [T], scale: T) {
    widest(SoftmaxBackwardRow { y, dy, scale })
}

/// [`softmax_backward_row_in_place`]'s kernel.
struct SoftmaxBackwardRow<'a, T> {
    y: &'a [T],
    dy: &'a mut [T],
    scale: T,
}

impl<T: Float> WideKernel for SoftmaxBackwardRow<'_, T> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        let (y, dy, scale) = (self.y, self.dy, self.scale);
        let dot = dot(y, dy);
        for (d, &a) in dy.iter_mut().zip(y) {
            *d = scale * a * (*d - dot);
        }
    }
}

fn backward<T: Float>(y: &[T], dy: &[T], t: usize, scale: T) -> Vec<T> {
    let mut dx = vec![T::ZERO; y.len()];
    let step = task_len(t);
    dx.par_chunks_mut(step)
        .zip(y.par_chunks(step).zip(dy.par_chunks(step)))
        .enumerate()
        .for_each(|(chunk, (dxc, (yc, dyc)))| {
            let first_row = chunk * rows_per_task(t);
            let rows = dxc.chunks_mut(t).zip(yc.chunks(t)).zip(dyc.chunks(t));
            for (r, ((dxr, yr), dyr)) in rows.enumerate() {
                // Masked keys have y = 0 and get a zero gradient whatever dy holds there (the
                // attention's causal products leave dy's masked entries uncomputed).
                let i = (first_row + r) % t;
                dxr[..=i].copy_from_slice(&dyr[..=i]);
                softmax_backward_row_in_place(&yr[..=i], &mut dxr[..=i], scale);
            }
        });
    dx
}

fn square_last_dims(l: &Layout) -> candle_core::Result<usize> {
    let dims = l.shape().dims();
    let n = dims.len();
    if n < 2 || dims[n - 1] != dims[n - 2] {
        candle_core::bail!("causal softmax: expected [.., t, t], got {:?}", dims);
    }
    Ok(dims[n - 1])
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let t = square_last_dims(l)?;
        let out = match s {
            CpuStorage::F32(_) => {
                let x = contiguous::<f32>(self.name(), s, l)?;
                f32::storage(forward(x, t, f32::from_f64(self.scale)))
            }
            CpuStorage::F64(_) => {
                let x = contiguous::<f64>(self.name(), s, l)?;
                f64::storage(forward(x, t, self.scale))
            }
            other => candle_core::bail!("causal softmax: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda;
        let t = square_last_dims(l)?;
        let n = l.shape().elem_count();
        let dev = s.device();
        let rows = n / t.max(1);
        let (ti, scale) = (cuda::int(self.name(), "length", t)?, self.scale as f32);
        cuda::int(self.name(), "rows", rows)?;
        let cfg = cuda::rows(rows, t);
        let out = match s.dtype() {
            candle_core::DType::BF16 => {
                let x = cuda::input_bf16(self.name(), s, l)?;
                let y = cuda::output::<half::bf16>(dev, n)?;
                if rows > 0 {
                    cuda::launch!(dev, "causal_softmax_fwd_bf16", cfg, &x, &y, &ti, &scale);
                }
                cuda::storage(y, dev)
            }
            _ => {
                let x = cuda::input(self.name(), s, l)?;
                let y = cuda::output::<f32>(dev, n)?;
                if rows > 0 {
                    cuda::launch!(dev, "causal_softmax_fwd", cfg, &x, &y, &ti, &scale);
                }
                cuda::storage(y, dev)
            }
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dy = dy.contiguous()?;
        Ok(Some(y.detach().apply_op2_no_bwd(
            &dy,
            &CausalSoftmaxBwd { scale: self.scale },
        )?))
    }
}

struct CausalSoftmaxBwd {
    scale: f64,
}

impl CustomOp2 for CausalSoftmaxBwd {
    fn name(&self) -> &'static str {
        "causal-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        yl: &Layout,
        ds: &CpuStorage,
        dl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let t = square_last_dims(yl)?;
        let out = match ys {
            CpuStorage::F32(_) => f32::storage(backward(
                contiguous::<f32>(self.name(), ys, yl)?,
                contiguous::<f32>(self.name(), ds, dl)?,
                t,
                f32::from_f64(self.scale),
            )),
            CpuStorage::F64(_) => f64::storage(backward(
                contiguous::<f64>(self.name(), ys, yl)?,
                contiguous::<f64>(self.name(), ds, dl)?,
                t,
                self.scale,
            )),
            other => candle_core::bail!("causal softmax: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, yl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ys: &candle_core::CudaStorage,
        yl: &Layout,
        ds: &candle_core::CudaStorage,
        dl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda;
        let t = square_last_dims(yl)?;
        if dl.shape() != yl.shape() {
            candle_core::bail!(
                "causal softmax: gradient {:?} for {:?}",
                dl.shape(),
                yl.shape()
            );
        }
        let n = yl.shape().elem_count();
        let dev = ys.device();
        let rows = n / t.max(1);
        let (ti, scale) = (cuda::int(self.name(), "length", t)?, self.scale as f32);
        cuda::int(self.name(), "rows", rows)?;
        let cfg = cuda::rows(rows, t);
        let out = match ys.dtype() {
            candle_core::DType::BF16 => {
                let y = cuda::input_bf16(self.name(), ys, yl)?;
                let d = cuda::input_bf16(self.name(), ds, dl)?;
                let dx = cuda::output::<half::bf16>(dev, n)?;
                if rows > 0 {
                    cuda::launch!(
                        dev,
                        "causal_softmax_bwd_bf16",
                        cfg,
                        &y,
                        &d,
                        &dx,
                        &ti,
                        &scale
                    );
                }
                cuda::storage(dx, dev)
            }
            _ => {
                let y = cuda::input(self.name(), ys, yl)?;
                let d = cuda::input(self.name(), ds, dl)?;
                let dx = cuda::output::<f32>(dev, n)?;
                if rows > 0 {
                    cuda::launch!(dev, "causal_softmax_bwd", cfg, &y, &d, &dx, &ti, &scale);
                }
                cuda::storage(dx, dev)
            }
        };
        Ok((out, yl.shape().clone()))
    }
}

/// `scores [.., t, t] -> softmax(scale * scores)` with keys after the query masked out: f32 or
/// f64 on the CPU, f32 or bf16 (arithmetic in f32) on CUDA.
pub fn causal_softmax(scores: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    scores.contiguous()?.apply_op1(CausalSoftmax { scale })
}

/// The backward of [`causal_softmax`] from its output `y` and the gradient `dy` of that output:
/// `ds = scale * y * (dy - sum_j(y dy))`, for ops that differentiate through a softmax inside their
/// own backward.
pub(crate) fn causal_softmax_backward(
    y: &Tensor,
    dy: &Tensor,
    scale: f64,
) -> candle_core::Result<Tensor> {
    y.contiguous()?
        .apply_op2_no_bwd(&dy.contiguous()?, &CausalSoftmaxBwd { scale })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::attention::{causal_mask, softmax_last_dim};
    use crate::ops::float::max_abs_diff as max_diff;
    use candle_core::{Device, Var};

    #[test]
    fn values_and_gradients_equal_the_composed_ops_on_odd_shapes() {
        for (b, h, t) in [(1, 1, 1), (2, 3, 5), (1, 2, 17)] {
            let x = Var::randn(0f64, 2.0, (b, h, t, t), &Device::Cpu).unwrap();
            let scale = 0.37;
            let fused = causal_softmax(&x, scale).unwrap();
            let mask = causal_mask(t, &x).unwrap();
            let composed =
                softmax_last_dim(&(x.affine(scale, 0.0).unwrap().broadcast_add(&mask).unwrap()))
                    .unwrap();
            assert!(max_diff(&fused, &composed) < 1e-14, "values ({b},{h},{t})");
            let (gf, gc) = crate::ops::float::probed_grads(&fused, &composed);
            let d = max_diff(gf.get(&x).unwrap(), gc.get(&x).unwrap());
            assert!(d < 1e-12, "gradient ({b},{h},{t}) differs by {d}");
        }
    }

    #[test]
    fn f32_matches_and_non_square_input_is_an_error() {
        let x = Tensor::randn(0f32, 1.0, (2, 2, 9, 9), &Device::Cpu).unwrap();
        let fused = causal_softmax(&x, 0.5).unwrap();
        let composed = softmax_last_dim(
            &(x.affine(0.5, 0.0)
                .unwrap()
                .broadcast_add(&causal_mask(9, &x).unwrap())
                .unwrap()),
        )
        .unwrap();
        assert!(
            max_diff(
                &fused.to_dtype(candle_core::DType::F64).unwrap(),
                &composed.to_dtype(candle_core::DType::F64).unwrap()
            ) < 1e-6
        );
        let bad = Tensor::zeros((2, 3, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(causal_softmax(&bad, 1.0).is_err());
    }

    #[test]
    fn f32_rows_longer_than_the_lanes_match_f64_with_large_scores_and_either_sign_of_scale() {
        // Scores of a few hundred overflow e^x unless the row maximum is right.
        let t = 70;
        let x32 = (Tensor::randn(0f32, 1.0, (1, 2, t, t), &Device::Cpu).unwrap() * 150.0).unwrap();
        // The f64 reference sees the same (f32-representable) scores, so only the arithmetic
        // differs: f32 rounding of scores near 600 moves an exponent by ~4e-5 at most.
        let x64 = x32.to_dtype(candle_core::DType::F64).unwrap();
        for scale in [1.0, 0.125, -0.5] {
            let want = causal_softmax(&x64, scale).unwrap();
            let got = causal_softmax(&x32, scale)
                .unwrap()
                .to_dtype(candle_core::DType::F64)
                .unwrap();
            let d = max_diff(&got, &want);
            assert!(
                d.is_finite() && d < 1e-4,
                "scale {scale}: differs from f64 by {d}"
            );
            // A wrong row maximum shows as rows that no longer sum to one (or as NaN).
            let sums: Vec<f64> = got
                .sum(3)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert!(
                sums.iter().all(|s| (s - 1.0).abs() < 1e-5),
                "scale {scale}: {sums:?}"
            );
        }
    }
}
