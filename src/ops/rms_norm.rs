//! RMSNorm as one autograd node: `y = x * r * w` with `r = 1 / sqrt(mean(x^2) + eps)` per row.
//!
//! Composed, it is seven nodes (square, mean, add, sqrt, reciprocal, two broadcast products),
//! each allocating and accumulating full-size gradients. Fused: one pass forward; one pass
//! backward computing `dx = r (g - x r^2 mean(g x))` with `g = dy w`, and `dw = sum_rows(dy x r)`.

use super::float::{contiguous, task_len, Float};
use super::lanes::{dot, dot3};
use super::widest::{widest, WideKernel};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

struct RmsNorm {
    eps: f64,
}

#[inline(always)]
fn inv_rms<T: Float>(row: &[T], eps: T) -> T {
    let ss = dot(row, row);
    T::ONE / (ss / T::from_f64(row.len() as f64) + eps).sqrt()
}

/// One task's rows of the forward, `y = x r w` with `r = 1 / rms(x)`, as a kernel for
/// [`widest`].
struct ForwardRows<'a, T> {
    y: &'a mut [MaybeUninit<T>],
    x: &'a [T],
    w: &'a [T],
    eps: T,
}

impl<T: Float> WideKernel for ForwardRows<'_, T> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        let h = self.w.len();
        for (yr, xr) in self.y.chunks_mut(h).zip(self.x.chunks(h)) {
            let r = inv_rms(xr, self.eps);
            for ((yv, &xv), &wv) in yr.iter_mut().zip(xr).zip(self.w) {
                yv.write(xv * r * wv);
            }
        }
    }
}

/// One task's rows of the backward: their `dx` written, and their share of `dw` returned, as a
/// kernel for [`widest`].
struct BackwardRows<'a, T> {
    dx: &'a mut [MaybeUninit<T>],
    x: &'a [T],
    dy: &'a [T],
    w: &'a [T],
    eps: T,
}

impl<T: Float> WideKernel for BackwardRows<'_, T> {
    type Output = Vec<T>;
    #[inline(always)]
    fn run(self) -> Vec<T> {
        let (h, w) = (self.w.len(), self.w);
        let mut dw = vec![T::ZERO; h];
        let rows = self
            .dx
            .chunks_mut(h)
            .zip(self.x.chunks(h))
            .zip(self.dy.chunks(h));
        for ((dxr, xr), dyr) in rows {
            let r = inv_rms(xr, self.eps);
            let dot = dot3(dyr, w, xr);
            let c = r * r * r * dot / T::from_f64(h as f64);
            for (((d, &xv), &dv), (&wv, acc)) in dxr
                .iter_mut()
                .zip(xr)
                .zip(dyr)
                .zip(w.iter().zip(dw.iter_mut()))
            {
                d.write(r * dv * wv - xv * c);
                *acc += dv * xv * r;
            }
        }
        dw
    }
}

fn forward<T: Float>(x: &[T], w: &[T], eps: T) -> Vec<T> {
    let h = w.len();
    if h == 0 {
        return Vec::new();
    }
    assert!(
        x.len().is_multiple_of(h),
        "rms norm: x is not whole rows of the weight's width"
    );
    let step = task_len(h);
    // Written once below, without a zero-fill first.
    let mut y = Vec::with_capacity(x.len());
    y.spare_capacity_mut()[..x.len()]
        .par_chunks_mut(step)
        .zip(x.par_chunks(step))
        .for_each(|(y, x)| widest(ForwardRows { y, x, w, eps }));
    // SAFETY: the chunks cover all x.len() elements, whole rows of h (x holds whole rows: the
    // callers check its shape against the weight), and each was written above.
    unsafe { y.set_len(x.len()) };
    y
}

/// `[n + 1, h]`: rows `0..n` are dx, row `n` is dw.
fn backward<T: Float>(x: &[T], w: &[T], dy: &[T], eps: T) -> Vec<T> {
    let h = w.len();
    if h == 0 {
        // Zero-width rows: nothing to normalise, and an empty gradient.
        return Vec::new();
    }
    // Every row of dx is written only where x and dy have it.
    assert!(
        dy.len() == x.len() && x.len().is_multiple_of(h),
        "rms norm: x, dy and the weight do not fit"
    );
    // (An empty width has no rows to speak of, and nothing to compute.)
    let n = x.len().checked_div(h).unwrap_or(0);
    let step = task_len(h);
    // dx is written once below, without a zero-fill first; dw's row is summed into zeros.
    let mut out = Vec::with_capacity((n + 1) * h);
    let (dx, dw_row) = out.spare_capacity_mut()[..(n + 1) * h].split_at_mut(n * h);
    dw_row.fill(MaybeUninit::new(T::ZERO));
    let partial_dw: Vec<Vec<T>> = dx
        .par_chunks_mut(step)
        .zip(x.par_chunks(step).zip(dy.par_chunks(step)))
        .map(|(dx, (x, dy))| widest(BackwardRows { dx, x, dy, w, eps }))
        .collect();
    // SAFETY: rows 0..n are dx, every element written above (the chunks cover n whole rows
    // of h); row n was filled with zeros.
    unsafe { out.set_len((n + 1) * h) };
    let dw = &mut out[n * h..];
    for part in partial_dw {
        for (a, b) in dw.iter_mut().zip(part) {
            *a += b;
        }
    }
    out
}

fn dims(xl: &Layout, wl: &Layout) -> candle_core::Result<(usize, usize)> {
    let (n, h) = xl.shape().dims2()?;
    if wl.shape().dims() != [h] {
        candle_core::bail!(
            "rms norm: x is [{n}, {h}] but the weight is {:?}",
            wl.shape().dims()
        );
    }
    Ok((n, h))
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        dims(xl, wl)?;
        let out = match xs {
            CpuStorage::F32(_) => f32::storage(forward(
                contiguous::<f32>(self.name(), xs, xl)?,
                contiguous::<f32>(self.name(), ws, wl)?,
                f32::from_f64(self.eps),
            )),
            CpuStorage::F64(_) => f64::storage(forward(
                contiguous::<f64>(self.name(), xs, xl)?,
                contiguous::<f64>(self.name(), ws, wl)?,
                self.eps,
            )),
            other => candle_core::bail!("rms norm: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda;
        let (n, h) = dims(xl, wl)?;
        let (x, w) = (
            cuda::input(self.name(), xs, xl)?,
            cuda::input(self.name(), ws, wl)?,
        );
        let dev = xs.device();
        let y = cuda::output::<f32>(dev, n * h)?;
        let (hi, eps) = (cuda::int(self.name(), "width", h)?, self.eps as f32);
        if n > 0 {
            cuda::launch!(dev, "rms_fwd", cuda::rows(n, h), &x, &w, &y, &hi, &eps);
        }
        Ok((cuda::storage(y, dev), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = rms_norm_backward(x, w, dy, self.eps)?;
        Ok((Some(dx), Some(dw)))
    }
}

/// The backward of [`rms_norm_fused`]: `(dx [n, h], dweight [h])` from the input `x [n, h]`,
/// the weight and the output's gradient `dy [n, h]`, for code that chains backward passes by
/// hand.
pub(crate) fn rms_norm_backward(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    eps: f64,
) -> candle_core::Result<(Tensor, Tensor)> {
    let (n, _) = x.dims2()?;
    let both = x
        .detach()
        .apply_op3_no_bwd(&w.detach(), &dy.contiguous()?, &RmsNormBwd { eps })?;
    Ok((both.narrow(0, 0, n)?, both.get(n)?))
}

struct RmsNormBwd {
    eps: f64,
}

impl CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "rms-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        ds: &CpuStorage,
        dl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, h) = dims(xl, wl)?;
        if dl.shape() != xl.shape() {
            candle_core::bail!("rms norm: gradient {:?} for x {:?}", dl.shape(), xl.shape());
        }
        let out = match xs {
            CpuStorage::F32(_) => f32::storage(backward(
                contiguous::<f32>(self.name(), xs, xl)?,
                contiguous::<f32>(self.name(), ws, wl)?,
                contiguous::<f32>(self.name(), ds, dl)?,
                f32::from_f64(self.eps),
            )),
            CpuStorage::F64(_) => f64::storage(backward(
                contiguous::<f64>(self.name(), xs, xl)?,
                contiguous::<f64>(self.name(), ws, wl)?,
                contiguous::<f64>(self.name(), ds, dl)?,
                self.eps,
            )),
            other => candle_core::bail!("rms norm: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, Shape::from((n + 1, h))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
        ds: &candle_core::CudaStorage,
        dl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda;
        let (n, h) = dims(xl, wl)?;
        if dl.shape() != xl.shape() {
            candle_core::bail!("rms norm: gradient {:?} for x {:?}", dl.shape(), xl.shape());
        }
        let x = cuda::input(self.name(), xs, xl)?;
        let w = cuda::input(self.name(), ws, wl)?;
        let d = cuda::input(self.name(), ds, dl)?;
        let dev = xs.device();
        // Rows 0..n: dx. Row n: dw, summed from one partial row per block.
        let mut out = cuda::output::<f32>(dev, (n + 1) * h)?;
        let blocks = n.clamp(1, 512);
        let partial = dev.alloc_zeros::<f32>(blocks * h.max(1))?;
        let (ni, hi) = (
            cuda::int(self.name(), "rows", n)?,
            cuda::int(self.name(), "width", h)?,
        );
        let eps = self.eps as f32;
        let cfg = cuda::rows(blocks, h);
        cuda::launch!(dev, "rms_bwd", cfg, &x, &w, &d, &out, &partial, &ni, &hi, &eps);
        let mut dw = out.slice_mut(n * h..);
        let bi = blocks as i32;
        cuda::launch!(
            dev,
            "col_sum",
            cuda::elementwise(h),
            &partial,
            &mut dw,
            &bi,
            &hi
        );
        Ok((cuda::storage(out, dev), Shape::from((n + 1, h))))
    }
}

/// `x [n, h] -> x / rms(x) * weight [h]`: f32 or f64 on the CPU, f32 on CUDA
/// ([`super::has_kernel`]).
pub fn rms_norm_fused(x: &Tensor, weight: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    x.contiguous()?
        .apply_op2(&weight.contiguous()?, RmsNorm { eps })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::norm::rms_norm_composed;
    use crate::ops::float::max_abs_diff as max_diff;
    use candle_core::{Device, Var};

    #[test]
    fn values_and_gradients_equal_the_composed_ops_on_odd_shapes() {
        for (n, h) in [(1, 1), (3, 7), (37, 5), (130, 64)] {
            let x = Var::randn(0f64, 1.5, (n, h), &Device::Cpu).unwrap();
            let w = Var::randn(1f64, 0.3, h, &Device::Cpu).unwrap();
            let fused = rms_norm_fused(&x, &w, 1e-5).unwrap();
            let composed = rms_norm_composed(&x, &w, 1e-5).unwrap();
            assert!(max_diff(&fused, &composed) < 1e-13, "values ({n},{h})");
            let (gf, gc) = crate::ops::float::probed_grads(&fused, &composed);
            for (v, what) in [(&x, "dx"), (&w, "dw")] {
                let d = max_diff(gf.get(v).unwrap(), gc.get(v).unwrap());
                assert!(d < 1e-11, "{what} ({n},{h}) differs by {d}");
            }
        }
    }

    #[test]
    fn mismatched_weight_is_an_error() {
        let x = Tensor::zeros((2, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        let w = Tensor::ones(3, candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(rms_norm_fused(&x, &w, 1e-6).is_err());
    }
}
