//! Rotary position embedding as one autograd node, in Hugging Face's half-split layout:
//! `y[j] = x[j] cos[p, j] + rot(x)[j] sin[p, j]` with `rot(x) = [-x[h..], x[..h]]`, `h = d / 2`,
//! for the query or key at position `p`.
//!
//! Composed (two narrows, a negation, a concatenation, two broadcast products and a sum) it is
//! seven nodes, and the backward of each narrow pads its gradient back to full width with zeros.
//! Fused: one pass forward and one pass backward, the rotation by the opposite angle:
//! `dx[j] = dy[j] cos[j] + dy[j + h] sin[j + h]` for `j < h`, `dx[j] = dy[j] cos[j] -
//! dy[j - h] sin[j - h]` for `j >= h`.

use super::float::{contiguous, rows_per_task, task_len, Float};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

struct Rotary {
    /// `[positions >= t, d]`, in the input's dtype.
    cos: Tensor,
    /// `[positions >= t, d]`.
    sin: Tensor,
    /// Backward: rotate by the opposite angle.
    inverse: bool,
}

/// `x` is `[rows, d]` where row `i` is at position `i % t`.
fn rotate<T: Float>(x: &[T], cos: &[T], sin: &[T], t: usize, d: usize, inverse: bool) -> Vec<T> {
    // Every row is written in full by `rotate_row` below: no zero-fill first.
    let len = x.len();
    assert!(
        d.is_multiple_of(2) && len.is_multiple_of(d.max(1)),
        "rotary: rows of odd or uneven width"
    );
    let mut y: Vec<T> = Vec::with_capacity(len);
    let rows_per_task = rows_per_task(d);
    y.spare_capacity_mut()[..len]
        .par_chunks_mut(task_len(d))
        .zip(x.par_chunks(task_len(d)))
        .enumerate()
        .for_each(|(chunk, (yc, xc))| {
            for (r, (yr, xr)) in yc.chunks_mut(d).zip(xc.chunks(d)).enumerate() {
                let p = (chunk * rows_per_task + r) % t;
                let (c, s) = (&cos[p * d..(p + 1) * d], &sin[p * d..(p + 1) * d]);
                rotate_row(yr, xr, (c, s), inverse);
            }
        });
    // SAFETY: y's chunks and rows pair one to one with x's (equal lengths, whole rows of even
    // width d, asserted above), and `rotate_row` wrote every element of each row.
    unsafe { y.set_len(len) };
    y
}

/// One row `x [d]` rotated into `y` in the half-split layout, by the angles of its position's
/// table rows `cos`, `sin [d]`, or by the opposite angles (`inverse`, the backward).
#[inline(always)]
fn rotate_row<T: Float>(y: &mut [MaybeUninit<T>], x: &[T], (c, s): (&[T], &[T]), inverse: bool) {
    let h = x.len() / 2;
    for j in 0..h {
        if inverse {
            y[j].write(x[j] * c[j] + x[j + h] * s[j + h]);
            y[j + h].write(x[j + h] * c[j + h] - x[j] * s[j]);
        } else {
            y[j].write(x[j] * c[j] - x[j + h] * s[j]);
            y[j + h].write(x[j + h] * c[j + h] + x[j] * s[j + h]);
        }
    }
}

impl Rotary {
    /// `(t, d)` of a `[.., t, d]` input whose tables cover it.
    fn dims(&self, l: &Layout) -> candle_core::Result<(usize, usize)> {
        let dims = l.shape().dims();
        let n = dims.len();
        let (positions, width) = self.cos.dims2()?;
        if n < 2 || dims[n - 1] != width || dims[n - 2] > positions || width % 2 != 0 {
            candle_core::bail!(
                "rotary: input {dims:?} does not fit tables of {positions} positions x {width}"
            );
        }
        Ok((dims[n - 2], width))
    }
}

impl CustomOp1 for Rotary {
    fn name(&self) -> &'static str {
        "rotary"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (t, d) = self.dims(l)?;
        let (cs, cl) = self.cos.storage_and_layout();
        let (ss, sl) = self.sin.storage_and_layout();
        let (candle_core::Storage::Cpu(cs), candle_core::Storage::Cpu(ss)) = (&*cs, &*ss) else {
            candle_core::bail!("rotary: tables are not on the CPU");
        };
        let out = match s {
            CpuStorage::F32(_) => f32::storage(rotate(
                contiguous::<f32>(self.name(), s, l)?,
                contiguous::<f32>(self.name(), cs, cl)?,
                contiguous::<f32>(self.name(), ss, sl)?,
                t,
                d,
                self.inverse,
            )),
            CpuStorage::F64(_) => f64::storage(rotate(
                contiguous::<f64>(self.name(), s, l)?,
                contiguous::<f64>(self.name(), cs, cl)?,
                contiguous::<f64>(self.name(), ss, sl)?,
                t,
                d,
                self.inverse,
            )),
            other => candle_core::bail!("rotary: unsupported dtype {:?}", other.dtype()),
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
        let (t, d) = self.dims(l)?;
        let (cs, cl) = self.cos.storage_and_layout();
        let (ss, sl) = self.sin.storage_and_layout();
        let (candle_core::Storage::Cuda(cs), candle_core::Storage::Cuda(ss)) = (&*cs, &*ss) else {
            candle_core::bail!("rotary: tables are not on the GPU");
        };
        let x = cuda::input(self.name(), s, l)?;
        let (c, sn) = (
            cuda::input(self.name(), cs, cl)?,
            cuda::input(self.name(), ss, sl)?,
        );
        let n = l.shape().elem_count();
        let dev = s.device();
        let y = cuda::output::<f32>(dev, n)?;
        let (ti, di) = (
            cuda::int(self.name(), "length", t)?,
            cuda::int(self.name(), "width", d)?,
        );
        let inv = i32::from(self.inverse);
        // One thread per pair (j, j + d/2).
        let pairs = (n / 2) as u64;
        cuda::launch!(
            dev,
            "rotary",
            cuda::elementwise(n / 2),
            &x,
            &c,
            &sn,
            &y,
            &ti,
            &di,
            &inv,
            &pairs
        );
        Ok((cuda::storage(y, dev), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let back = Rotary {
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            inverse: !self.inverse,
        };
        Ok(Some(dy.contiguous()?.apply_op1_no_bwd(&back)?))
    }
}

/// Applies the rotation to `x [.., t, d]` (row `i` of the last two dims at position `i`), with
/// `cos`, `sin` `[positions >= t, d]` in `x`'s dtype: f32 or f64 on the CPU, f32 on CUDA
/// ([`super::has_kernel`]).
pub fn rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(Rotary {
        cos: cos.contiguous()?,
        sin: sin.contiguous()?,
        inverse: false,
    })
}

/// The backward of [`rotary`]: rotates a gradient `dy [.., t, d]` by the opposite angles, for
/// ops that differentiate through a rotation inside their own backward.
pub(crate) fn rotary_inverse(
    dy: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
) -> candle_core::Result<Tensor> {
    dy.contiguous()?.apply_op1_no_bwd(&Rotary {
        cos: cos.contiguous()?,
        sin: sin.contiguous()?,
        inverse: true,
    })
}

/// Which way [`rotate_moving_heads`] moves the heads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HeadMove {
    /// `[b * t, n * d]` (a projection's rows) to rotated `[b, n, t, d]` (the attention's heads).
    Split,
    /// `[b, n, t, d]` to `[b * t, n * d]`, rotated by the opposite angles (the backward).
    MergeInverse,
}

/// The rotation and the move between a projection's row layout and the attention's head
/// layout in one pass on the CPU (f32/f64), instead of a strided copy (single-threaded in
/// candle) and a rotation pass: `x` holds `b` sequences of `t` positions, `n` heads of width
/// `d`; `cos`, `sin [positions >= t, d]` in `x`'s dtype. `None` where it does not apply (other
/// devices or dtypes), for the caller to compose the steps.
pub(crate) fn rotate_moving_heads(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    (b, t, n, d): (usize, usize, usize, usize),
    way: HeadMove,
) -> candle_core::Result<Option<Tensor>> {
    let cpu = |v: &Tensor| matches!(v.device(), candle_core::Device::Cpu) && v.dtype() == x.dtype();
    if !(cpu(x) && cpu(cos) && cpu(sin) && matches!(x.dtype(), DType::F32 | DType::F64)) {
        return Ok(None);
    }
    let want: &[usize] = match way {
        HeadMove::Split => &[b * t, n * d],
        HeadMove::MergeInverse => &[b, n, t, d],
    };
    let (positions, width) = cos.dims2()?;
    if x.dims() != want || d % 2 != 0 || width != d || positions < t || sin.dims() != cos.dims() {
        candle_core::bail!(
            "rotary: {:?} with tables {:?} is not {b} x {t} positions of {n} heads of width {d}",
            x.dims(),
            cos.dims()
        );
    }
    let (x, cos, sin) = (x.contiguous()?, cos.contiguous()?, sin.contiguous()?);
    let out = match x.dtype() {
        DType::F32 => moved::<f32>(&x, &cos, &sin, (b, t, n, d), way)?,
        _ => moved::<f64>(&x, &cos, &sin, (b, t, n, d), way)?,
    };
    Ok(Some(out))
}

fn moved<T: Float + candle_core::WithDType>(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    (b, t, n, d): (usize, usize, usize, usize),
    way: HeadMove,
) -> candle_core::Result<Tensor> {
    let (sx, lx) = x.storage_and_layout();
    let (sc, lc) = cos.storage_and_layout();
    let (ss, ls) = sin.storage_and_layout();
    let (Storage::Cpu(sx), Storage::Cpu(sc), Storage::Cpu(ss)) = (&*sx, &*sc, &*ss) else {
        candle_core::bail!("rotary: operands are not on the CPU");
    };
    let xs = contiguous::<T>("rotary", sx, lx)?;
    let (cos, sin) = (
        contiguous::<T>("rotary", sc, lc)?,
        contiguous::<T>("rotary", ss, ls)?,
    );
    // Every row is written in full by `rotate_row` below: no zero-fill first.
    let len = xs.len();
    let mut y: Vec<T> = Vec::with_capacity(len);
    y.spare_capacity_mut()[..len]
        .par_chunks_mut(task_len(d))
        .enumerate()
        .for_each(|(chunk, yc)| {
            for (r, yr) in yc.chunks_mut(d).enumerate() {
                let row = chunk * rows_per_task(d) + r;
                // The output row's (sequence, head, position), and where its input row is.
                let (ti, src) = match way {
                    HeadMove::Split => {
                        let (bi, hi, ti) = (row / (n * t), row / t % n, row % t);
                        (ti, ((bi * t + ti) * n + hi) * d)
                    }
                    HeadMove::MergeInverse => {
                        let (bi, ti, hi) = (row / (t * n), row / n % t, row % n);
                        (ti, ((bi * n + hi) * t + ti) * d)
                    }
                };
                let xr = &xs[src..src + d];
                let (c, s) = (&cos[ti * d..(ti + 1) * d], &sin[ti * d..(ti + 1) * d]);
                rotate_row(yr, xr, (c, s), way == HeadMove::MergeInverse);
            }
        });
    // SAFETY: the chunks cover all len elements in rows of d (len = b t n d), each row written
    // in full by `rotate_row` (pairs j and j + d/2 for every j < d/2; d is even, checked above).
    unsafe { y.set_len(len) };
    let shape: Vec<usize> = match way {
        HeadMove::Split => vec![b, n, t, d],
        HeadMove::MergeInverse => vec![b * t, n * d],
    };
    Tensor::from_vec(y, shape, &candle_core::Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::rope::Rope;
    use crate::ops::float::max_abs_diff as max_diff;
    use candle_core::{DType, Device, Var};

    /// One pass equals the strided copy and the rotation composed, both ways, in both dtypes,
    /// with tables longer than the sequence; wrong shapes are errors.
    #[test]
    fn moving_heads_equals_the_copy_and_the_rotation() {
        let (b, t, n, d) = (2, 5, 3, 8);
        for dtype in [DType::F32, DType::F64] {
            let rope = Rope::new(d, 9, 10_000.0, dtype, &Device::Cpu).unwrap();
            let (cos, sin) = rope.tables();
            let x = Tensor::randn(0f64, 1.0, (b * t, n * d), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let heads = x
                .reshape((b, t, n, d))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap();
            let got = rotate_moving_heads(&x, cos, sin, (b, t, n, d), HeadMove::Split)
                .unwrap()
                .unwrap();
            assert_eq!(max_diff(&got, &rotary(&heads, cos, sin).unwrap()), 0.0);
            let back = rotate_moving_heads(&got, cos, sin, (b, t, n, d), HeadMove::MergeInverse)
                .unwrap()
                .unwrap();
            let want = rotary_inverse(&got, cos, sin)
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .reshape((b * t, n * d))
                .unwrap();
            assert_eq!(max_diff(&back, &want), 0.0);
            // The rotation is orthogonal: the round trip gives the input back.
            assert!(max_diff(&back, &x) < 1e-5);
            let wrong = rotate_moving_heads(&x, cos, sin, (b, t, n + 1, d), HeadMove::Split);
            assert!(wrong.is_err());
            let long = rotate_moving_heads(&x, cos, sin, (b / 2, t * 2, n, d), HeadMove::Split);
            assert!(long.is_err(), "10 positions do not fit tables of 9");
        }
    }

    #[test]
    fn values_and_gradients_equal_the_composed_ops() {
        let rope = Rope::new(8, 16, 10_000.0, DType::F64, &Device::Cpu).unwrap();
        for (b, h, t) in [(1, 1, 1), (2, 3, 5), (1, 2, 16)] {
            let x = Var::randn(0f64, 1.0, (b, h, t, 8), &Device::Cpu).unwrap();
            let fused = rope.apply(&x).unwrap();
            let composed = rope.apply_composed(&x).unwrap();
            assert!(max_diff(&fused, &composed) < 1e-14, "values ({b},{h},{t})");
            let (gf, gc) = crate::ops::float::probed_grads(&fused, &composed);
            let d = max_diff(gf.get(&x).unwrap(), gc.get(&x).unwrap());
            assert!(d < 1e-13, "dx ({b},{h},{t}) differs by {d}");
        }
        let too_long = Tensor::zeros((1, 1, 17, 8), DType::F64, &Device::Cpu).unwrap();
        assert!(rope.apply(&too_long).is_err());
    }
}
