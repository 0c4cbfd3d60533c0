//! The two gradients of a plain projection `y = x Wᵀ` on the CPU, `dx = dy W` and
//! `dW = dyᵀ x`, computed side by side.
//!
//! The two products have the same arithmetic (`n * out * in` multiply-adds each) and share no
//! output, so instead of running them one after the other, each split over every thread, the
//! threads are split between them: on two cores each product runs single-threaded, which the
//! gemm kernels do at a higher rate per core than a product split in two (measured on the 60m
//! shapes: 160-175 GFLOP/s on one thread against 255-305 on two), and the pair needs no
//! hand-off between threads inside either product. The results are written once, without the
//! zero-fill candle's matmul does first.

use super::dense_product::{as_uninit, product, Dst};
use super::float::{contiguous, Float};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Device, InplaceOp3, Layout, Storage, Tensor};
use std::mem::MaybeUninit;
use std::sync::Mutex;

/// `(dx [n, in], dW [out, in])` of `y = x Wᵀ` for `x [n, in]`, `w [out, in]` and the gradient
/// `dy [n, out]`. On the CPU in f32/f64 the pair described above; elsewhere candle's matmuls.
pub(crate) fn linear_backward(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
) -> candle_core::Result<(Tensor, Tensor)> {
    if !cpu_float(x, w, dy) {
        return Ok((dy.matmul(w)?, dy.t()?.matmul(x)?));
    }
    match x.dtype() {
        DType::F32 => typed::<f32>(x, w, dy),
        DType::F64 => typed::<f64>(x, w, dy),
        _ => Ok((dy.matmul(w)?, dy.t()?.matmul(x)?)),
    }
}

/// [`linear_backward`] for the second and later terms of a sum of input gradients (q, k and v
/// read one input; gate and up another): `dx_sum += dy W` where `dx_sum [n, in]` lies, and
/// `dW` beside it. Returns `(dx_sum, dW)`; on the CPU the first is `dx_sum` itself, updated in
/// place, so the caller must hold it alone (a gradient it has just been given). Elsewhere, or
/// when `dx_sum` is not a contiguous tensor of `x`'s dtype apart from `x`, a new sum.
pub(crate) fn linear_backward_add(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    dx_sum: Tensor,
) -> candle_core::Result<(Tensor, Tensor)> {
    let in_place = cpu_float(x, w, dy)
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && dx_sum.dtype() == x.dtype()
        && dx_sum.is_contiguous()
        && matches!(dx_sum.device(), Device::Cpu)
        && !shares_buffer(&dx_sum, x);
    if !in_place {
        let (dx, dw) = linear_backward(x, w, dy)?;
        return Ok(((dx_sum + dx)?, dw));
    }
    let dims = check_dims(x, w, dy)?;
    if dx_sum.dims() != x.dims() {
        candle_core::bail!(
            "linear backward: the input gradient's sum is {:?}, x is {:?}",
            dx_sum.dims(),
            x.dims()
        );
    }
    let op = AddInputGrad {
        x: x.contiguous()?,
        dims,
        dw: Mutex::new(None),
    };
    dx_sum.inplace_op3(&dy.contiguous()?, &w.contiguous()?, &op)?;
    let dw = op
        .dw
        .into_inner()
        .map_err(|_| candle_core::Error::Msg("linear backward: lock poisoned".into()))?
        .ok_or_else(|| candle_core::Error::Msg("linear backward: dW was not computed".into()))?;
    Ok((dx_sum, dw))
}

fn cpu_float(x: &Tensor, w: &Tensor, dy: &Tensor) -> bool {
    let on_cpu = |t: &Tensor| matches!(t.device(), Device::Cpu) && t.dtype() == x.dtype();
    on_cpu(x) && on_cpu(w) && on_cpu(dy)
}

/// Whether `a` and `b` are views of one CPU buffer (an in-place write to `a` would then hold
/// the lock `b`'s read needs).
fn shares_buffer(a: &Tensor, b: &Tensor) -> bool {
    let (sa, _) = a.storage_and_layout();
    let (sb, _) = b.storage_and_layout();
    let ptr = |s: &Storage| match s {
        Storage::Cpu(CpuStorage::F32(v)) => Some(v.as_ptr() as usize),
        Storage::Cpu(CpuStorage::F64(v)) => Some(v.as_ptr() as usize),
        _ => None,
    };
    ptr(&sa).is_some() && ptr(&sa) == ptr(&sb)
}

fn check_dims(x: &Tensor, w: &Tensor, dy: &Tensor) -> candle_core::Result<(usize, usize, usize)> {
    let ((n, inp), (out, w_in), (dy_n, dy_out)) = (x.dims2()?, w.dims2()?, dy.dims2()?);
    if w_in != inp || dy_n != n || dy_out != out {
        candle_core::bail!(
            "linear backward: x {:?}, w {:?} and dy {:?} do not fit y = x wᵀ",
            x.dims(),
            w.dims(),
            dy.dims()
        );
    }
    Ok((n, inp, out))
}

/// The two products side by side: `dx [n, in] (=|+=) dy w` into `dx`, and `dW [out, in] = dyᵀ x`,
/// returned.
fn pair<T: Float>(
    (xs, ws, dys): (&[T], &[T], &[T]),
    (n, inp, out): (usize, usize, usize),
    dx: &mut [MaybeUninit<T>],
    dx_mode: Dst,
) -> Vec<T> {
    let mut dw = Vec::<T>::with_capacity(out * inp);
    let dw_buf = &mut dw.spare_capacity_mut()[..out * inp];
    // The calling trainer's pool: half its threads for each product.
    let threads = rayon::current_num_threads();
    let (t_dx, t_dw) = (threads.div_ceil(2), (threads / 2).max(1));
    let mut dx_task = move || {
        // dx [n, in] = dy [n, out] w [out, in]
        product(
            dx,
            (n, inp, out),
            (dys, out, 1),
            (ws, inp, 1),
            t_dx,
            dx_mode,
        )
    };
    let mut dw_task = move || {
        // dW [out, in] = dyᵀ [out, n] x [n, in]: dy read transposed, by its strides.
        product(
            dw_buf,
            (out, inp, n),
            (dys, 1, out),
            (xs, inp, 1),
            t_dw,
            Dst::Write,
        )
    };
    if threads >= 2 {
        rayon::join(dx_task, dw_task);
    } else {
        dx_task();
        dw_task();
    }
    // SAFETY: the capacity is the length, and `product` wrote every element.
    unsafe { dw.set_len(out * inp) };
    dw
}

fn typed<T: Float + candle_core::WithDType>(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
) -> candle_core::Result<(Tensor, Tensor)> {
    let (n, inp, out) = check_dims(x, w, dy)?;
    let (x, w, dy) = (x.contiguous()?, w.contiguous()?, dy.contiguous()?);
    let (sx, lx) = x.storage_and_layout();
    let (sw, lw) = w.storage_and_layout();
    let (sdy, ldy) = dy.storage_and_layout();
    let (Storage::Cpu(sx), Storage::Cpu(sw), Storage::Cpu(sdy)) = (&*sx, &*sw, &*sdy) else {
        candle_core::bail!("linear backward: operands are not on the CPU");
    };
    let op = "linear backward";
    let operands = (
        contiguous::<T>(op, sx, lx)?,
        contiguous::<T>(op, sw, lw)?,
        contiguous::<T>(op, sdy, ldy)?,
    );
    let mut dx = Vec::<T>::with_capacity(n * inp);
    let dw = pair(
        operands,
        (n, inp, out),
        &mut dx.spare_capacity_mut()[..n * inp],
        Dst::Write,
    );
    // SAFETY: the capacity is the length, and `pair` wrote every element.
    unsafe { dx.set_len(n * inp) };
    Ok((
        Tensor::from_vec(dx, (n, inp), &Device::Cpu)?,
        Tensor::from_vec(dw, (out, inp), &Device::Cpu)?,
    ))
}

/// `dx_sum += dy W` in place (the op's destination, with `dy` and `W` its sources) and `dW`
/// into `dw`, for [`linear_backward_add`].
struct AddInputGrad {
    /// The projection's input, contiguous and apart from the destination.
    x: Tensor,
    /// `(n, in, out)`.
    dims: (usize, usize, usize),
    dw: Mutex<Option<Tensor>>,
}

impl AddInputGrad {
    fn typed<T: Float + candle_core::WithDType>(
        &self,
        sum: &mut [T],
        dy: &[T],
        w: &[T],
    ) -> candle_core::Result<()> {
        let (n, inp, out) = self.dims;
        let (sx, lx) = self.x.storage_and_layout();
        let Storage::Cpu(sx) = &*sx else {
            candle_core::bail!("linear backward: x is not on the CPU");
        };
        let xs = contiguous::<T>("linear backward", sx, lx)?;
        if sum.len() != n * inp || dy.len() != n * out || w.len() != out * inp {
            candle_core::bail!("linear backward: operands changed size");
        }
        let dw = pair((xs, w, dy), (n, inp, out), as_uninit(sum), Dst::Add);
        *self
            .dw
            .lock()
            .map_err(|_| candle_core::Error::Msg("linear backward: lock poisoned".into()))? =
            Some(Tensor::from_vec(dw, (out, inp), &Device::Cpu)?);
        Ok(())
    }
}

impl InplaceOp3 for AddInputGrad {
    fn name(&self) -> &'static str {
        "linear-backward-add"
    }

    fn cpu_fwd(
        &self,
        s: &mut CpuStorage,
        l: &Layout,
        dys: &CpuStorage,
        dyl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<()> {
        let name = self.name();
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("{name}: the sum is not contiguous");
        };
        match s {
            CpuStorage::F32(v) => self.typed::<f32>(
                &mut v[start..end],
                contiguous(name, dys, dyl)?,
                contiguous(name, ws, wl)?,
            ),
            CpuStorage::F64(v) => self.typed::<f64>(
                &mut v[start..end],
                contiguous(name, dys, dyl)?,
                contiguous(name, ws, wl)?,
            ),
            other => candle_core::bail!("{name}: unsupported dtype {:?}", other.dtype()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::float::max_abs_diff as max_diff;

    fn randn(r: usize, c: usize, dtype: DType) -> Tensor {
        Tensor::randn(0f64, 1.0, (r, c), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    /// Both gradients equal candle's f64 products, on one, two and three threads (an odd pool
    /// splits unevenly), for a transposed (non-contiguous) `dy` too.
    #[test]
    fn gradients_equal_the_f64_products_on_any_pool() {
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for (dtype, tol) in [(DType::F64, 1e-11), (DType::F32, 1e-3)] {
                for (n, inp, out) in [(1, 1, 1), (7, 5, 3), (130, 64, 96), (0, 4, 4)] {
                    let (x, w) = (randn(n, inp, dtype), randn(out, inp, dtype));
                    let dy_t = randn(out, n, dtype);
                    for dy in [randn(n, out, dtype), dy_t.t().unwrap()] {
                        let (dx, dw) = pool.install(|| linear_backward(&x, &w, &dy)).unwrap();
                        let f = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
                        let (x64, w64, dy64) = (f(&x), f(&w), f(&dy));
                        let want_dx = dy64.matmul(&w64).unwrap();
                        let want_dw = dy64.t().unwrap().matmul(&x64).unwrap();
                        assert_eq!((dx.dims(), dw.dims()), (want_dx.dims(), want_dw.dims()));
                        // No rows: dx is empty and dW all zeros.
                        let ex = if n == 0 {
                            0.0
                        } else {
                            max_diff(&f(&dx), &want_dx)
                        };
                        let ew = max_diff(&f(&dw), &want_dw);
                        assert!(
                            ex < tol && ew < tol,
                            "{threads} threads {dtype:?} {n}x{inp}x{out}: {ex} {ew}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn shapes_that_do_not_fit_are_errors() {
        let (x, w) = (randn(4, 3, DType::F32), randn(5, 3, DType::F32));
        assert!(linear_backward(&x, &w, &randn(4, 4, DType::F32)).is_err());
        assert!(linear_backward(&x, &w, &randn(3, 5, DType::F32)).is_err());
        assert!(linear_backward(&x, &randn(5, 2, DType::F32), &randn(4, 5, DType::F32)).is_err());
        assert!(linear_backward(&x, &w, &randn(4, 5, DType::F32)).is_ok());
    }
}
