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
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

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
    let h = d / 2;
    let mut y = vec![T::ZERO; x.len()];
    let rows_per_task = rows_per_task(d);
    y.par_chunks_mut(task_len(d))
        .zip(x.par_chunks(task_len(d)))
        .enumerate()
        .for_each(|(chunk, (yc, xc))| {
            for (r, (yr, xr)) in yc.chunks_mut(d).zip(xc.chunks(d)).enumerate() {
                let p = (chunk * rows_per_task + r) % t;
                let (c, s) = (&cos[p * d..(p + 1) * d], &sin[p * d..(p + 1) * d]);
                for j in 0..h {
                    if inverse {
                        yr[j] = xr[j] * c[j] + xr[j + h] * s[j + h];
                        yr[j + h] = xr[j + h] * c[j + h] - xr[j] * s[j];
                    } else {
                        yr[j] = xr[j] * c[j] - xr[j + h] * s[j];
                        yr[j + h] = xr[j + h] * c[j + h] + xr[j] * s[j + h];
                    }
                }
            }
        });
    y
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::rope::Rope;
    use crate::ops::float::max_abs_diff as max_diff;
    use candle_core::{DType, Device, Var};

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
