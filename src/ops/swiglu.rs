//! SwiGLU's gate as one autograd node: `y = silu(g) * u` with `silu(g) = g * sigmoid(g)`.
//!
//! candle's silu backward alone is several full-size passes, plus the product's. Fused: one
//! pass forward, one pass backward giving `dg = dy u sigmoid(g) (1 + g (1 - sigmoid(g)))` and
//! `du = dy silu(g)` together.

use super::float::{contiguous, Float};
use super::widest::{widest, WideKernel};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

const CHUNK: usize = 16_384;

struct SwiGlu;

/// One chunk of the forward, `y = g / (1 + e^-g) u`, as a kernel for [`widest`].
struct ForwardChunk<'a, T> {
    y: &'a mut [MaybeUninit<T>],
    g: &'a [T],
    u: &'a [T],
}

impl<T: Float> WideKernel for ForwardChunk<'_, T> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        // e^-g in y's own memory first, in one vectorised pass.
        let y = write_negated(self.y, self.g);
        T::exp_in_place(y);
        for ((y, &g), &u) in y.iter_mut().zip(self.g).zip(self.u) {
            *y = g / (T::ONE + *y) * u;
        }
    }
}

/// One chunk of the backward, `dg` and `du` from `dy`, as a kernel for [`widest`].
struct BackwardChunk<'a, T> {
    dg: &'a mut [MaybeUninit<T>],
    du: &'a mut [MaybeUninit<T>],
    g: &'a [T],
    u: &'a [T],
    dy: &'a [T],
}

impl<T: Float> WideKernel for BackwardChunk<'_, T> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        // e^-g in dg's memory first, in one vectorised pass.
        let dgc = write_negated(self.dg, self.g);
        T::exp_in_place(dgc);
        assert_eq!(self.du.len(), dgc.len(), "swiglu: chunks differ in length");
        let inputs = self.g.iter().zip(self.u).zip(self.dy);
        for ((dg, du), ((&g, &u), &d)) in dgc.iter_mut().zip(self.du).zip(inputs) {
            let s = T::ONE / (T::ONE + *dg);
            du.write(d * g * s);
            *dg = d * u * s * (T::ONE + g * (T::ONE - s));
        }
    }
}

fn forward<T: Float>(g: &[T], u: &[T]) -> Vec<T> {
    let n = g.len();
    assert_eq!(u.len(), n, "swiglu: gate and up differ in length");
    // Written once, by the first pass of each chunk below: no zero-fill first.
    let mut y = Vec::with_capacity(n);
    y.spare_capacity_mut()[..n]
        .par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
        .for_each(|(y, (g, u))| widest(ForwardChunk { y, g, u }));
    // SAFETY: the chunks cover all n elements, each written by `write_negated`.
    unsafe { y.set_len(n) };
    y
}

/// Writes `-g` into `out` (of `g`'s length) and returns it as initialised.
#[inline(always)]
fn write_negated<'a, T: Float>(out: &'a mut [MaybeUninit<T>], g: &[T]) -> &'a mut [T] {
    assert_eq!(out.len(), g.len(), "swiglu: chunks differ in length");
    for (o, &g) in out.iter_mut().zip(g) {
        o.write(-g);
    }
    // SAFETY: every element was written just above (equal lengths, checked).
    unsafe { &mut *(out as *mut [MaybeUninit<T>] as *mut [T]) }
}

/// `[2, ..]`: dg then du.
fn backward<T: Float>(g: &[T], u: &[T], dy: &[T]) -> Vec<T> {
    let n = g.len();
    assert!(
        u.len() == n && dy.len() == n,
        "swiglu: gate, up and gradient differ in length"
    );
    // Written once below (dg by `write_negated` first, du in the second loop): no zero-fill.
    let mut out = Vec::with_capacity(2 * n);
    let (dg, du) = out.spare_capacity_mut()[..2 * n].split_at_mut(n);
    dg.par_chunks_mut(CHUNK)
        .zip(du.par_chunks_mut(CHUNK))
        .zip(
            g.par_chunks(CHUNK)
                .zip(u.par_chunks(CHUNK))
                .zip(dy.par_chunks(CHUNK)),
        )
        .for_each(|((dg, du), ((g, u), dy))| widest(BackwardChunk { dg, du, g, u, dy }));
    // SAFETY: dg's chunks cover its n elements, each written by `write_negated`; du's chunks
    // are as long (checked) and each element was written in the second loop (dy's chunks are
    // as long too: the lengths are equal, checked above).
    unsafe { out.set_len(2 * n) };
    out
}

fn same_shape(gl: &Layout, ul: &Layout) -> candle_core::Result<()> {
    if gl.shape() != ul.shape() {
        candle_core::bail!(
            "swiglu: gate {:?} and up {:?} differ",
            gl.shape().dims(),
            ul.shape().dims()
        );
    }
    Ok(())
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        same_shape(gl, ul)?;
        let out = match gs {
            CpuStorage::F32(_) => f32::storage(forward(
                contiguous::<f32>(self.name(), gs, gl)?,
                contiguous::<f32>(self.name(), us, ul)?,
            )),
            CpuStorage::F64(_) => f64::storage(forward(
                contiguous::<f64>(self.name(), gs, gl)?,
                contiguous::<f64>(self.name(), us, ul)?,
            )),
            other => candle_core::bail!("swiglu: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, gl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
        us: &candle_core::CudaStorage,
        ul: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda;
        same_shape(gl, ul)?;
        let (g, u) = (
            cuda::input(self.name(), gs, gl)?,
            cuda::input(self.name(), us, ul)?,
        );
        let n = gl.shape().elem_count();
        let dev = gs.device();
        let y = cuda::output::<f32>(dev, n)?;
        cuda::launch!(
            dev,
            "swiglu_fwd",
            cuda::elementwise(n),
            &g,
            &u,
            &y,
            &(n as u64)
        );
        Ok((cuda::storage(y, dev), gl.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dg, du) = swiglu_backward(g, u, dy)?;
        Ok((Some(dg), Some(du)))
    }
}

/// The backward of [`swiglu`]: `(dgate, dup)` from the inputs and the output's gradient, for
/// code that chains backward passes by hand.
pub(crate) fn swiglu_backward(
    g: &Tensor,
    u: &Tensor,
    dy: &Tensor,
) -> candle_core::Result<(Tensor, Tensor)> {
    let both = g
        .detach()
        .apply_op3_no_bwd(&u.detach(), &dy.contiguous()?, &SwiGluBwd)?;
    Ok((both.get(0)?, both.get(1)?))
}

struct SwiGluBwd;

impl CustomOp3 for SwiGluBwd {
    fn name(&self) -> &'static str {
        "swiglu-bwd"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
        ds: &CpuStorage,
        dl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        same_shape(gl, ul)?;
        same_shape(gl, dl)?;
        let out = match gs {
            CpuStorage::F32(_) => f32::storage(backward(
                contiguous::<f32>(self.name(), gs, gl)?,
                contiguous::<f32>(self.name(), us, ul)?,
                contiguous::<f32>(self.name(), ds, dl)?,
            )),
            CpuStorage::F64(_) => f64::storage(backward(
                contiguous::<f64>(self.name(), gs, gl)?,
                contiguous::<f64>(self.name(), us, ul)?,
                contiguous::<f64>(self.name(), ds, dl)?,
            )),
            other => candle_core::bail!("swiglu: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, both_shape(gl)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
        us: &candle_core::CudaStorage,
        ul: &Layout,
        ds: &candle_core::CudaStorage,
        dl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda;
        same_shape(gl, ul)?;
        same_shape(gl, dl)?;
        let g = cuda::input(self.name(), gs, gl)?;
        let u = cuda::input(self.name(), us, ul)?;
        let d = cuda::input(self.name(), ds, dl)?;
        let n = gl.shape().elem_count();
        let dev = gs.device();
        let out = cuda::output::<f32>(dev, 2 * n)?;
        cuda::launch!(
            dev,
            "swiglu_bwd",
            cuda::elementwise(n),
            &g,
            &u,
            &d,
            &out,
            &(n as u64)
        );
        Ok((cuda::storage(out, dev), both_shape(gl)))
    }
}

/// `[2, ..shape]`: the gate's gradient stacked on the up projection's.
fn both_shape(gl: &Layout) -> Shape {
    let mut dims = vec![2];
    dims.extend_from_slice(gl.shape().dims());
    Shape::from(dims)
}

/// `silu(gate) * up`, same shapes: f32 or f64 on the CPU, f32 on CUDA ([`super::has_kernel`]).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::float::max_abs_diff as max_diff;
    use candle_core::{Device, Var};

    #[test]
    fn values_and_gradients_equal_the_composed_ops_on_odd_shapes() {
        for (n, i) in [(1, 1), (7, 13), (33, 100)] {
            let g = Var::randn(0f64, 3.0, (n, i), &Device::Cpu).unwrap();
            let u = Var::randn(0f64, 1.0, (n, i), &Device::Cpu).unwrap();
            let fused = swiglu(&g, &u).unwrap();
            let composed = (g.silu().unwrap() * u.as_tensor()).unwrap();
            assert!(max_diff(&fused, &composed) < 1e-13, "values ({n},{i})");
            let (gf, gc) = crate::ops::float::probed_grads(&fused, &composed);
            for (v, what) in [(&g, "dg"), (&u, "du")] {
                let d = max_diff(gf.get(v).unwrap(), gc.get(v).unwrap());
                assert!(d < 1e-12, "{what} ({n},{i}) differs by {d}");
            }
        }
        let g = Tensor::zeros((2, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
        let u = Tensor::zeros((3, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(swiglu(&g, &u).is_err());
    }
}
