//! One dense product on the CPU, `c = a b` or `c += a b`, straight into the caller's buffer.
//!
//! candle's matmul zero-fills a fresh result before the gemm writes every element of it, and a
//! sum of two products (a layer's input gradient from q, k and v; from gate and up) costs a
//! third pass and a buffer for the add. Here the gemm writes a result it may leave
//! uninitialised until then, or adds the product where the sum already lies (the gemm's
//! `read_dst`), on as many threads of the calling trainer's pool as it is given.

use super::float::{contiguous, Float};
use candle_core::{DType, Device, Storage, Tensor};
use std::mem::MaybeUninit;

/// `x [n, in] Wᵀ` for `w [out, in]`, as `[n, out]`: on the CPU in f32/f64 written once by
/// [`product`] on every thread of the calling pool; elsewhere candle's matmul.
pub(crate) fn linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let cpu = |t: &Tensor| matches!(t.device(), Device::Cpu) && t.dtype() == x.dtype();
    if !(cpu(x) && cpu(w)) {
        return x.matmul(&w.t()?);
    }
    match x.dtype() {
        DType::F32 => linear_typed::<f32>(x, w),
        DType::F64 => linear_typed::<f64>(x, w),
        _ => x.matmul(&w.t()?),
    }
}

fn linear_typed<T: Float + candle_core::WithDType>(
    x: &Tensor,
    w: &Tensor,
) -> candle_core::Result<Tensor> {
    let ((n, inp), (out, w_in)) = (x.dims2()?, w.dims2()?);
    if w_in != inp {
        candle_core::bail!(
            "linear: x {:?} and w {:?} do not fit x wᵀ",
            x.dims(),
            w.dims()
        );
    }
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    let (sx, lx) = x.storage_and_layout();
    let (sw, lw) = w.storage_and_layout();
    let (Storage::Cpu(sx), Storage::Cpu(sw)) = (&*sx, &*sw) else {
        candle_core::bail!("linear: operands are not on the CPU");
    };
    let (xs, ws) = (
        contiguous::<T>("linear", sx, lx)?,
        contiguous::<T>("linear", sw, lw)?,
    );
    let mut y = Vec::<T>::with_capacity(n * out);
    // y [n, out] = x [n, in] wᵀ [in, out]: w read transposed, by its strides.
    product(
        &mut y.spare_capacity_mut()[..n * out],
        (n, out, inp),
        (xs, inp, 1),
        (ws, 1, inp),
        rayon::current_num_threads(),
        Dst::Write,
    );
    // SAFETY: the capacity is the length, and `product` wrote every element.
    unsafe { y.set_len(n * out) };
    Tensor::from_vec(y, (n, out), &Device::Cpu)
}

/// What [`product`] does with `c`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dst {
    /// `c = a b`: `c` may be uninitialised; every element is written.
    Write,
    /// `c += a b`: `c` holds initialised values the product is added to.
    Add,
}

/// `c [m, p] (=|+=) a [m, k] b [k, p]` (row-major `c`), with `a` and `b` given as (buffer, row
/// stride, column stride), on `threads` threads of the current pool. With [`Dst::Add`] every
/// element of `c` must be initialised.
pub(crate) fn product<T: Float>(
    c: &mut [MaybeUninit<T>],
    (m, p, k): (usize, usize, usize),
    (a, a_rs, a_cs): (&[T], usize, usize),
    (b, b_rs, b_cs): (&[T], usize, usize),
    threads: usize,
    dst: Dst,
) {
    if c.is_empty() {
        return;
    }
    if k == 0 {
        if dst == Dst::Write {
            c.fill(MaybeUninit::new(T::ZERO));
        }
        return;
    }
    // The last element each operand's view reaches must be inside its buffer.
    assert!(
        c.len() == m * p
            && (m - 1) * a_rs + (k - 1) * a_cs < a.len()
            && (k - 1) * b_rs + (p - 1) * b_cs < b.len(),
        "dense product: operand views outside their buffers"
    );
    let parallelism = super::gemm_parallelism(threads);
    let (read_dst, alpha) = match dst {
        Dst::Write => (false, T::ZERO),
        Dst::Add => (true, T::ONE),
    };
    // SAFETY: dst is `c`, m x p row-major (checked above); the views of a (m x k) and b (k x p)
    // stay inside their slices (checked above); dst aliases neither (the borrows are disjoint:
    // `c` is the only mutable one). dst := alpha dst + 1 * a b: with read_dst false every
    // element is written without being read; with it true every element was initialised by
    // the caller (`Dst::Add`).
    unsafe {
        gemm::gemm(
            m,
            p,
            k,
            c.as_mut_ptr().cast::<T>(),
            1,
            p as isize,
            read_dst,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            alpha,
            T::ONE,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// `c` as the initialised buffer [`product`] adds to.
pub(crate) fn as_uninit<T>(c: &mut [T]) -> &mut [MaybeUninit<T>] {
    // SAFETY: MaybeUninit<T> has T's layout; the callers only ever write initialised values
    // through the result (`product` writes T values), so `c` stays initialised.
    unsafe { &mut *(c as *mut [T] as *mut [MaybeUninit<T>]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Write` overwrites whatever `c` held and `Add` adds to it, against an f64 loop, for
    /// a transposed operand, on one and two threads.
    #[test]
    fn writes_and_adds_equal_the_f64_loop() {
        let (m, p, k) = (37, 23, 300);
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7) % 13) as f32 * 0.1 - 0.6)
            .collect();
        // b stored transposed: element (kk, j) at j * k + kk.
        let b: Vec<f32> = (0..k * p)
            .map(|i| ((i * 5) % 11) as f32 * 0.1 - 0.5)
            .collect();
        let base: Vec<f32> = (0..m * p).map(|i| i as f32 * 0.25).collect();
        let want = |add: bool| -> Vec<f64> {
            (0..m * p)
                .map(|ij| {
                    let (i, j) = (ij / p, ij % p);
                    let dot: f64 = (0..k)
                        .map(|kk| f64::from(a[i * k + kk]) * f64::from(b[j * k + kk]))
                        .sum();
                    dot + if add { f64::from(base[ij]) } else { 0.0 }
                })
                .collect()
        };
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for (dst, add) in [(Dst::Write, false), (Dst::Add, true)] {
                let mut c = base.clone();
                pool.install(|| {
                    product(
                        as_uninit(&mut c),
                        (m, p, k),
                        (&a, k, 1),
                        (&b, 1, k),
                        threads,
                        dst,
                    )
                });
                let worst = c
                    .iter()
                    .zip(want(add))
                    .map(|(&g, w)| (f64::from(g) - w).abs())
                    .fold(0.0, f64::max);
                assert!(worst < 1e-3, "{dst:?} on {threads} threads: {worst}");
            }
        }
    }

    #[test]
    fn linear_equals_candles_matmul_in_f64() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f64, 1.0, (70, 48), &dev).unwrap();
        let w = Tensor::randn(0f64, 1.0, (33, 48), &dev).unwrap();
        let want = x.matmul(&w.t().unwrap()).unwrap();
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-4)] {
            let (xc, wc) = (x.to_dtype(dtype).unwrap(), w.to_dtype(dtype).unwrap());
            let got = linear(&xc, &wc).unwrap().to_dtype(DType::F64).unwrap();
            assert!(
                super::super::float::max_abs_diff(&got, &want) < tol,
                "{dtype:?}"
            );
        }
        let bad = Tensor::zeros((33, 47), DType::F32, &dev).unwrap();
        assert!(linear(&x.to_dtype(DType::F32).unwrap(), &bad).is_err());
    }

    #[test]
    fn an_empty_inner_dimension_writes_zeros_or_leaves_the_sum() {
        let mut c = vec![5f32; 6];
        product(
            as_uninit(&mut c),
            (2, 3, 0),
            (&[], 0, 1),
            (&[], 3, 1),
            1,
            Dst::Add,
        );
        assert_eq!(c, vec![5.0; 6]);
        product(
            as_uninit(&mut c),
            (2, 3, 0),
            (&[], 0, 1),
            (&[], 3, 1),
            1,
            Dst::Write,
        );
        assert_eq!(c, vec![0.0; 6]);
    }
}
