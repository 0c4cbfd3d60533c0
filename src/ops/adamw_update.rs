//! One parameter's AdamW update in one or two passes instead of a dozen tensor ops.
//!
//! Composed from candle ops the update is eleven element-wise ops and a copy, each a full pass
//! over the parameter (and, on a GPU, a kernel launch with its allocation): at 350M parameters
//! and a few hundred tensors that was most of a training step. Fused: one pass scales the
//! gradient (gradient clipping's coefficient, so clipping needs no pass of its own) and computes
//! the new moments `m' = b1 m + (1 - b1) g`, `v' = b2 v + (1 - b2) g^2` into a fresh `[2, ..]` buffer
//! (the old moments are never written, so state tensors that share storage stay correct), and one
//! in-place pass updates the parameter, `p = p d - k m' / (sqrt(v') c + eps)`. On the CPU, once
//! the optimizer holds a parameter's moments in a buffer of its own, the two passes become one
//! ([`adamw_update_in_place`]): moments and parameter are written as each element is read, 28
//! bytes of memory traffic per f32 parameter instead of 36, in the widest vectors the CPU has.
//!
//! The CPU kernel evaluates each expression exactly as the composed ops round it (`affine` is
//! `x * mul + add` with both constants rounded to the element type), so its results are
//! bit-identical to [`crate::optim::AdamW`]'s composed path, which a test checks.

use super::float::{contiguous, contiguous_mut, Float};
use super::widest::{widest, WideKernel};
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp3, InplaceOp1, InplaceOp2, InplaceOp3, Layout, Shape, Tensor,
};
use rayon::prelude::*;
use std::mem::MaybeUninit;
use std::sync::Mutex;

const CHUNK: usize = 16_384;
/// Below this many elements one thread does the pass: the adapters' and norms' tensors are small,
/// and handing each to the thread pool cost more than the arithmetic.
const SERIAL_MAX: usize = 4 * CHUNK;

/// The constants of one update, computed by the optimizer from its hyper-parameters and step.
#[derive(Clone, Copy, Debug)]
pub struct AdamWConstants {
    /// First-moment decay `b1`.
    pub beta1: f64,
    /// Second-moment decay `b2`.
    pub beta2: f64,
    /// `1 / sqrt(1 - b2^t)`.
    pub inv_sqrt_bc2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// `lr / (1 - b1^t)`.
    pub step_size: f64,
    /// `1 - lr * wd` for decayed parameters, `None` for the others.
    pub decay: Option<f64>,
    /// The factor the gradient is multiplied by first (gradient clipping's coefficient; 1 for
    /// none), rounded as `g.affine(grad_scale, 0)` rounds it.
    pub grad_scale: f64,
}

struct Moments(AdamWConstants);

/// `[2, n]`: m' then v'.
fn moments<T: Float>(g: &[T], m: &[T], v: &[T], c: &AdamWConstants) -> Vec<T> {
    let n = g.len();
    let k = constants::<T>(c).0;
    // Written once, element by element, below: no zero-fill first (at full rank that fill was
    // a sixth of the optimizer's memory traffic).
    // The callers check the shapes agree; the unchecked writes below rely on it.
    assert!(
        m.len() == n && v.len() == n,
        "adamw: moments differ in length"
    );
    let mut out: Vec<T> = Vec::with_capacity(2 * n);
    let (mo, vo) = out.spare_capacity_mut()[..2 * n].split_at_mut(n);
    let chunk =
        |mo: &mut [MaybeUninit<T>], vo: &mut [MaybeUninit<T>], g: &[T], m: &[T], v: &[T]| {
            for i in 0..g.len() {
                let (m, v) = new_moments(g[i], m[i], v[i], k);
                mo[i].write(m);
                vo[i].write(v);
            }
        };
    if n <= SERIAL_MAX {
        chunk(mo, vo, g, m, v);
    } else {
        mo.par_chunks_mut(CHUNK)
            .zip(vo.par_chunks_mut(CHUNK))
            .zip(
                g.par_chunks(CHUNK)
                    .zip(m.par_chunks(CHUNK))
                    .zip(v.par_chunks(CHUNK)),
            )
            .for_each(|((mo, vo), ((g, m), v))| chunk(mo, vo, g, m, v));
    }
    // SAFETY: the capacity is 2n, and the passes above wrote each of the first 2n elements
    // (mo and vo are its two halves, chunked alongside g, m and v, which all have length n).
    unsafe { out.set_len(2 * n) };
    out
}

/// `(m', v')` of one element from its gradient and moments, each product plus the zero
/// `affine` adds, as the composed ops round them. `k` is `(grad_scale, b1, 1 - b1, b2, 1 - b2)`
/// in `T`.
#[inline(always)]
fn new_moments<T: Float>(g: T, m: T, v: T, (scale, b1, b1c, b2, b2c): (T, T, T, T, T)) -> (T, T) {
    let g = g * scale + T::ZERO;
    (
        (m * b1 + T::ZERO) + (g * b1c + T::ZERO),
        (v * b2 + T::ZERO) + ((g * g) * b2c + T::ZERO),
    )
}

/// The parameter's new value from its new moments `m`, `v`: `k` is `(1 / sqrt(1 - b2^t), eps,
/// step size, decay)` in `T`, each product plus the zero `affine` adds, as the composed ops
/// round them.
#[inline(always)]
fn new_param<T: Float>(p: T, m: T, v: T, (inv, eps, k, d): (T, T, T, Option<T>)) -> T {
    let update = (m / (v.sqrt() * inv + eps)) * k + T::ZERO;
    let kept = match d {
        Some(d) => p * d + T::ZERO,
        None => p,
    };
    kept - update
}

/// The constants of [`new_moments`] and [`new_param`] in `T`.
type Constants<T> = ((T, T, T, T, T), (T, T, T, Option<T>));

fn constants<T: Float>(c: &AdamWConstants) -> Constants<T> {
    (
        (
            T::from_f64(c.grad_scale),
            T::from_f64(c.beta1),
            T::from_f64(1.0 - c.beta1),
            T::from_f64(c.beta2),
            T::from_f64(1.0 - c.beta2),
        ),
        (
            T::from_f64(c.inv_sqrt_bc2),
            T::from_f64(c.eps),
            T::from_f64(c.step_size),
            c.decay.map(T::from_f64),
        ),
    )
}

/// One chunk of the one-pass update: each element's moments written over the old ones and its
/// parameter updated from them.
#[inline(always)]
fn update_chunk<T: Float>(p: &mut [T], g: &[T], m: &mut [T], v: &mut [T], k: &Constants<T>) {
    let n = p.len();
    let (g, m, v) = (&g[..n], &mut m[..n], &mut v[..n]);
    for i in 0..n {
        let (mi, vi) = new_moments(g[i], m[i], v[i], k.0);
        m[i] = mi;
        v[i] = vi;
        p[i] = new_param(p[i], mi, vi, k.1);
    }
}

/// [`update_chunk`] as a kernel for [`widest`].
struct UpdateChunk<'a, T> {
    p: &'a mut [T],
    g: &'a [T],
    m: &'a mut [T],
    v: &'a mut [T],
    k: &'a Constants<T>,
}

impl<T: Float> WideKernel for UpdateChunk<'_, T> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        update_chunk(self.p, self.g, self.m, self.v, self.k)
    }
}

/// The whole update in one pass: `both` is `[2, n]`, m then v, written over; `p` updated in place.
/// Bit-identical to [`moments`] followed by [`apply`].
fn update_in_place<T: Float>(p: &mut [T], g: &[T], both: &mut [T], c: &AdamWConstants) {
    let n = p.len();
    // The callers check the lengths agree; the loop's indexing relies on it.
    assert!(
        g.len() == n && both.len() == 2 * n,
        "adamw: gradient or moments differ in length"
    );
    let k = constants::<T>(c);
    let (m, v) = both.split_at_mut(n);
    if n <= SERIAL_MAX {
        widest(UpdateChunk { p, g, m, v, k: &k });
        return;
    }
    p.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
        .for_each(|((p, g), (m, v))| widest(UpdateChunk { p, g, m, v, k: &k }));
}

fn apply<T: Float>(p: &mut [T], m: &[T], v: &[T], c: &AdamWConstants) {
    let k = constants::<T>(c).1;
    let chunk = |p: &mut [T], m: &[T], v: &[T]| {
        for i in 0..p.len() {
            p[i] = new_param(p[i], m[i], v[i], k);
        }
    };
    if p.len() <= SERIAL_MAX {
        chunk(p, m, v);
        return;
    }
    p.par_chunks_mut(CHUNK)
        .zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK)))
        .for_each(|(p, (m, v))| chunk(p, m, v));
}

fn same_shapes(op: &str, ls: &[&Layout]) -> candle_core::Result<()> {
    if ls.iter().any(|l| l.shape() != ls[0].shape()) {
        let shapes: Vec<_> = ls.iter().map(|l| l.shape().dims().to_vec()).collect();
        candle_core::bail!("{op}: shapes differ: {shapes:?}");
    }
    Ok(())
}

impl CustomOp3 for Moments {
    fn name(&self) -> &'static str {
        "adamw-moments"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        ms: &CpuStorage,
        ml: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        same_shapes(self.name(), &[gl, ml, vl])?;
        let out = match gs {
            CpuStorage::F32(_) => f32::storage(moments(
                contiguous::<f32>(self.name(), gs, gl)?,
                contiguous::<f32>(self.name(), ms, ml)?,
                contiguous::<f32>(self.name(), vs, vl)?,
                &self.0,
            )),
            CpuStorage::F64(_) => f64::storage(moments(
                contiguous::<f64>(self.name(), gs, gl)?,
                contiguous::<f64>(self.name(), ms, ml)?,
                contiguous::<f64>(self.name(), vs, vl)?,
                &self.0,
            )),
            other => candle_core::bail!("adamw: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, Shape::from((2, gl.shape().elem_count()))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
        ms: &candle_core::CudaStorage,
        ml: &Layout,
        vs: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda;
        same_shapes(self.name(), &[gl, ml, vl])?;
        let g = cuda::input(self.name(), gs, gl)?;
        let m = cuda::input(self.name(), ms, ml)?;
        let v = cuda::input(self.name(), vs, vl)?;
        let n = gl.shape().elem_count();
        let dev = gs.device();
        let out = cuda::output::<f32>(dev, 2 * n)?;
        let c = &self.0;
        let (b1, b2) = (c.beta1 as f32, c.beta2 as f32);
        let (b1c, b2c) = ((1.0 - c.beta1) as f32, (1.0 - c.beta2) as f32);
        let scale = c.grad_scale as f32;
        let nn = n as u64;
        let cfg = cuda::elementwise(n);
        cuda::launch!(
            dev,
            "adamw_moments",
            cfg,
            &g,
            &m,
            &v,
            &out,
            &scale,
            &b1,
            &b1c,
            &b2,
            &b2c,
            &nn
        );
        Ok((cuda::storage(out, dev), Shape::from((2, n))))
    }
}

/// The one-pass update as an in-place op on the moments buffer: holding that buffer writable, it
/// runs [`OnePassParam`] on the parameter, so parameter, gradient and both moments meet in one
/// pass (candle's in-place ops write one tensor each).
struct OnePass<'a> {
    param: &'a Tensor,
    grad: &'a Tensor,
    c: AdamWConstants,
}

impl OnePass<'_> {
    fn run<T: Float>(&self, bs: &mut CpuStorage, bl: &Layout) -> candle_core::Result<()> {
        let both = contiguous_mut::<T>(self.name(), bs, bl)?;
        let op = OnePassParam {
            moments: Mutex::new(both),
            c: self.c,
        };
        self.param.inplace_op2(self.grad, &op)
    }
}

impl InplaceOp1 for OnePass<'_> {
    fn name(&self) -> &'static str {
        "adamw-one-pass"
    }

    fn cpu_fwd(&self, bs: &mut CpuStorage, bl: &Layout) -> candle_core::Result<()> {
        match bs {
            CpuStorage::F32(_) => self.run::<f32>(bs, bl),
            CpuStorage::F64(_) => self.run::<f64>(bs, bl),
            other => candle_core::bail!("{}: unsupported dtype {:?}", self.name(), other.dtype()),
        }
    }
}

/// [`OnePass`]'s inner op on the parameter, with the moments it holds.
struct OnePassParam<'a, T> {
    moments: Mutex<&'a mut [T]>,
    c: AdamWConstants,
}

impl<T: Float> InplaceOp2 for OnePassParam<'_, T> {
    fn name(&self) -> &'static str {
        "adamw-one-pass"
    }

    fn cpu_fwd(
        &self,
        ps: &mut CpuStorage,
        pl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<()> {
        let name = self.name();
        same_shapes(name, &[pl, gl])?;
        let p = contiguous_mut::<T>(name, ps, pl)?;
        let g = contiguous::<T>(name, gs, gl)?;
        // Never contended (one op holds it); poisoned only by a panic inside this op.
        let Ok(mut both) = self.moments.lock() else {
            candle_core::bail!("{name}: the moments' lock is poisoned");
        };
        if both.len() != 2 * p.len() {
            candle_core::bail!(
                "{name}: {} moment values for {} parameters",
                both.len(),
                p.len()
            );
        }
        update_in_place(p, g, &mut both, &self.c);
        Ok(())
    }
}

struct Apply(AdamWConstants);

impl InplaceOp3 for Apply {
    fn name(&self) -> &'static str {
        "adamw-apply"
    }

    fn cpu_fwd(
        &self,
        ps: &mut CpuStorage,
        pl: &Layout,
        ms: &CpuStorage,
        ml: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<()> {
        same_shapes(self.name(), &[pl, ml, vl])?;
        let Some((start, end)) = pl.contiguous_offsets() else {
            candle_core::bail!("adamw: the parameter is not contiguous");
        };
        match ps {
            CpuStorage::F32(p) => apply(
                &mut p[start..end],
                contiguous::<f32>(self.name(), ms, ml)?,
                contiguous::<f32>(self.name(), vs, vl)?,
                &self.0,
            ),
            CpuStorage::F64(p) => apply(
                &mut p[start..end],
                contiguous::<f64>(self.name(), ms, ml)?,
                contiguous::<f64>(self.name(), vs, vl)?,
                &self.0,
            ),
            other => candle_core::bail!("adamw: unsupported dtype {:?}", other.dtype()),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ps: &mut candle_core::CudaStorage,
        pl: &Layout,
        ms: &candle_core::CudaStorage,
        ml: &Layout,
        vs: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> candle_core::Result<()> {
        use super::cuda;
        same_shapes(self.name(), &[pl, ml, vl])?;
        let m = cuda::input(self.name(), ms, ml)?;
        let v = cuda::input(self.name(), vs, vl)?;
        let n = pl.shape().elem_count();
        let Some((start, end)) = pl.contiguous_offsets() else {
            candle_core::bail!("adamw: the parameter is not contiguous");
        };
        let dev = ps.device().clone();
        let c = &self.0;
        let (inv, eps, k) = (c.inv_sqrt_bc2 as f32, c.eps as f32, c.step_size as f32);
        // A decay factor of exactly 1 leaves the parameter as it is, as `None` does.
        let d = c.decay.unwrap_or(1.0) as f32;
        let nn = n as u64;
        let mut p = ps.as_cuda_slice_mut::<f32>()?.slice_mut(start..end);
        cuda::launch!(
            dev,
            "adamw_apply",
            cuda::elementwise(n),
            &mut p,
            &m,
            &v,
            &inv,
            &eps,
            &k,
            &d,
            &nn
        );
        Ok(())
    }
}

/// [`adamw_update`] on the CPU with the moments written over the old ones: `both` is the
/// contiguous `[2, ..]` buffer whose rows are `exp_avg` and `exp_avg_sq` (as
/// [`adamw_update`] returns them), held by the caller alone. The same arithmetic, without the
/// fresh buffer and its write-allocate traffic.
pub fn adamw_update_in_place(
    param: &Tensor,
    grad: &Tensor,
    both: &Tensor,
    c: AdamWConstants,
) -> candle_core::Result<()> {
    if !param.is_contiguous() {
        candle_core::bail!("adamw: the parameter is not contiguous");
    }
    let n = param.elem_count();
    let grad = grad.contiguous()?.flatten_all()?;
    if grad.elem_count() != n || both.dims() != [2, n] {
        candle_core::bail!(
            "adamw: parameter {:?}, gradient {:?} and moments {:?} do not fit",
            param.dims(),
            grad.dims(),
            both.dims()
        );
    }
    if both.dtype() != param.dtype() || grad.dtype() != param.dtype() {
        candle_core::bail!(
            "adamw: parameter {:?}, gradient {:?} and moments {:?} differ in dtype",
            param.dtype(),
            grad.dtype(),
            both.dtype()
        );
    }
    let op = OnePass {
        param: &param.reshape(n)?,
        grad: &grad,
        c,
    };
    both.inplace_op1(&op)
}

/// Applies one AdamW update to `param` in place and returns the new `(exp_avg, exp_avg_sq)`
/// (views of one fresh buffer). All four tensors have one shape and dtype; f32 or f64 on the CPU,
/// f32 on CUDA ([`super::has_kernel`]).
pub fn adamw_update(
    param: &Tensor,
    grad: &Tensor,
    exp_avg: &Tensor,
    exp_avg_sq: &Tensor,
    c: AdamWConstants,
) -> candle_core::Result<(Tensor, Tensor)> {
    if !param.is_contiguous() {
        candle_core::bail!("adamw: the parameter is not contiguous");
    }
    let shape = param.shape().clone();
    let both = grad.contiguous()?.apply_op3_no_bwd(
        &exp_avg.contiguous()?,
        &exp_avg_sq.contiguous()?,
        &Moments(c),
    )?;
    let (m, v) = (both.get(0)?, both.get(1)?);
    let param_flat = param.reshape(m.shape())?;
    param_flat.inplace_op3(&m, &v, &Apply(c))?;
    Ok((m.reshape(&shape)?, v.reshape(shape)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    fn constants() -> AdamWConstants {
        AdamWConstants {
            beta1: 0.9,
            beta2: 0.95,
            inv_sqrt_bc2: 1.0,
            eps: 1e-8,
            step_size: 1e-3,
            decay: Some(0.999),
            grad_scale: 1.0,
        }
    }

    /// Moments of the wrong length or dtype, and a gradient of another shape, are errors that
    /// leave the parameter as it was, never a panic.
    #[test]
    fn mismatched_moments_and_gradients_are_errors() {
        let dev = Device::Cpu;
        let p = Var::from_tensor(&Tensor::ones((3, 4), DType::F32, &dev).unwrap()).unwrap();
        let g = Tensor::ones((3, 4), DType::F32, &dev).unwrap();
        let short = Tensor::zeros((2, 11), DType::F32, &dev).unwrap();
        let f64_moments = Tensor::zeros((2, 12), DType::F64, &dev).unwrap();
        let f64_grad = Tensor::ones((3, 4), DType::F64, &dev).unwrap();
        let other_grad = Tensor::ones((4, 3), DType::F32, &dev).unwrap().t().unwrap();
        let both = Tensor::zeros((2, 12), DType::F32, &dev).unwrap();
        let k = constants();
        assert!(adamw_update_in_place(p.as_tensor(), &g, &short, k).is_err());
        assert!(adamw_update_in_place(p.as_tensor(), &g, &f64_moments, k).is_err());
        assert!(adamw_update_in_place(p.as_tensor(), &f64_grad, &both, k).is_err());
        let g13 = Tensor::ones(13, DType::F32, &dev).unwrap();
        assert!(adamw_update_in_place(p.as_tensor(), &g13, &both, k).is_err());
        let ones: Vec<f32> = p.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        assert!(
            ones.iter().all(|&v| v == 1.0),
            "a refused update wrote the parameter"
        );
        // A transposed gradient of the same element count is read in row-major order.
        adamw_update_in_place(p.as_tensor(), &other_grad, &both, k).unwrap();
        let updated: Vec<f32> = p.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        assert!(updated.iter().all(|&v| v < 1.0));
    }
}
