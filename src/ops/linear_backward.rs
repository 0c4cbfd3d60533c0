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

use super::float::{contiguous, Float};
use candle_core::{DType, Device, Storage, Tensor};
use std::mem::MaybeUninit;

/// `(dx [n, in], dW [out, in])` of `y = x Wᵀ` for `x [n, in]`, `w [out, in]` and the gradient
/// `dy [n, out]`. On the CPU in f32/f64 the pair described above; elsewhere candle's matmuls.
pub(crate) fn linear_backward(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
) -> candle_core::Result<(Tensor, Tensor)> {
    let cpu_float = |t: &Tensor| matches!(t.device(), Device::Cpu) && t.dtype() == x.dtype();
    if !(cpu_float(x) && cpu_float(w) && cpu_float(dy)) {
        return Ok((dy.matmul(w)?, dy.t()?.matmul(x)?));
    }
    match x.dtype() {
        DType::F32 => typed::<f32>(x, w, dy),
        DType::F64 => typed::<f64>(x, w, dy),
        _ => Ok((dy.matmul(w)?, dy.t()?.matmul(x)?)),
    }
}

fn typed<T: Float + candle_core::WithDType>(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
) -> candle_core::Result<(Tensor, Tensor)> {
    let ((n, inp), (out, w_in), (dy_n, dy_out)) = (x.dims2()?, w.dims2()?, dy.dims2()?);
    if w_in != inp || dy_n != n || dy_out != out {
        candle_core::bail!(
            "linear backward: x {:?}, w {:?} and dy {:?} do not fit y = x wᵀ",
            x.dims(),
            w.dims(),
            dy.dims()
        );
    }
    let (x, w, dy) = (x.contiguous()?, w.contiguous()?, dy.contiguous()?);
    let (sx, lx) = x.storage_and_layout();
    let (sw, lw) = w.storage_and_layout();
    let (sdy, ldy) = dy.storage_and_layout();
    let (Storage::Cpu(sx), Storage::Cpu(sw), Storage::Cpu(sdy)) = (&*sx, &*sw, &*sdy) else {
        candle_core::bail!("linear backward: operands are not on the CPU");
    };
    let op = "linear backward";
    let (xs, ws, dys) = (
        contiguous::<T>(op, sx, lx)?,
        contiguous::<T>(op, sw, lw)?,
        contiguous::<T>(op, sdy, ldy)?,
    );
    let (mut dx, mut dw) = (
        Vec::<T>::with_capacity(n * inp),
        Vec::<T>::with_capacity(out * inp),
    );
    let (dx_buf, dw_buf) = (
        &mut dx.spare_capacity_mut()[..n * inp],
        &mut dw.spare_capacity_mut()[..out * inp],
    );
    // The calling trainer's pool: half its threads for each product.
    let threads = rayon::current_num_threads();
    let (t_dx, t_dw) = (threads.div_ceil(2), (threads / 2).max(1));
    let mut dx_task = move || {
        // dx [n, in] = dy [n, out] w [out, in]
        product(dx_buf, (n, inp, out), (dys, out, 1), (ws, inp, 1), t_dx)
    };
    let mut dw_task = move || {
        // dW [out, in] = dyᵀ [out, n] x [n, in]: dy read transposed, by its strides.
        product(dw_buf, (out, inp, n), (dys, 1, out), (xs, inp, 1), t_dw)
    };
    if threads >= 2 {
        rayon::join(dx_task, dw_task);
    } else {
        dx_task();
        dw_task();
    }
    // SAFETY: each buffer's capacity is its length, and `product` wrote every element of it.
    unsafe {
        dx.set_len(n * inp);
        dw.set_len(out * inp);
    }
    Ok((
        Tensor::from_vec(dx, (n, inp), &Device::Cpu)?,
        Tensor::from_vec(dw, (out, inp), &Device::Cpu)?,
    ))
}

/// `c [m, p] = a [m, k] b [k, p]` (row-major `c`), with `a` and `b` given as (buffer, row
/// stride, column stride), on `threads` threads of the current pool. Writes all of `c`.
fn product<T: Float>(
    c: &mut [MaybeUninit<T>],
    (m, p, k): (usize, usize, usize),
    (a, a_rs, a_cs): (&[T], usize, usize),
    (b, b_rs, b_cs): (&[T], usize, usize),
    threads: usize,
) {
    if c.is_empty() {
        return;
    }
    if k == 0 {
        c.fill(MaybeUninit::new(T::ZERO));
        return;
    }
    // The last element each operand's view reaches must be inside its buffer.
    assert!(
        c.len() == m * p
            && (m - 1) * a_rs + (k - 1) * a_cs < a.len()
            && (k - 1) * b_rs + (p - 1) * b_cs < b.len(),
        "linear backward: operand views outside their buffers"
    );
    let parallelism = super::gemm_parallelism(threads);
    // SAFETY: dst is `c`, m x p row-major (checked above); the views of a (m x k) and b (k x p)
    // stay inside their slices (checked above); dst aliases neither (a fresh buffer). With
    // read_dst false, dst := 1 * a b, every element written.
    unsafe {
        gemm::gemm(
            m,
            p,
            k,
            c.as_mut_ptr().cast::<T>(),
            1,
            p as isize,
            false,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            T::ZERO,
            T::ONE,
            false,
            false,
            false,
            parallelism,
        );
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
