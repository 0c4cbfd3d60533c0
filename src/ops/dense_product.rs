//! One dense product on the CPU, `c = a b` or `c += a b`, straight into the caller's buffer.
//!
//! candle's matmul zero-fills a fresh result before the gemm writes every element of it, and a
//! sum of two products (a layer's input gradient from q, k and v; from gate and up) costs a
//! third pass and a buffer for the add. Here the gemm writes a result it may leave
//! uninitialised until then, or adds the product where the sum already lies (the gemm's
//! `read_dst`), on as many threads of the calling trainer's pool as it is given.

use super::float::Float;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Device, InplaceOp3, Layout, Storage, Tensor};
use std::mem::MaybeUninit;

/// `x [n, in] Wᵀ` for `w [out, in]`, as `[n, out]` ([`matmul`] of `x` and `w`'s transpose).
pub(crate) fn linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    matmul(x, &w.t()?)
}

/// `a [m, k] b [k, n]` for 2-D `a` and `b`: on the CPU in f32/f64 written once by [`product`]
/// on every thread of the calling pool, reading each operand by its strides; elsewhere
/// candle's matmul.
pub(crate) fn matmul(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let cpu = |t: &Tensor| matches!(t.device(), Device::Cpu) && t.dtype() == a.dtype();
    if !(cpu(a) && cpu(b) && a.rank() == 2 && b.rank() == 2) {
        return a.matmul(b);
    }
    let ((m, k), (k2, n)) = (a.dims2()?, b.dims2()?);
    if k2 != k {
        candle_core::bail!("matmul: {:?} and {:?} do not fit a b", a.dims(), b.dims());
    }
    let (sa, la) = a.storage_and_layout();
    let (sb, lb) = b.storage_and_layout();
    let (Storage::Cpu(sa), Storage::Cpu(sb)) = (&*sa, &*sb) else {
        candle_core::bail!("matmul: operands are not on the CPU");
    };
    let c = cpu_matmul((sa, la), (sb, lb), (m, k, n))?;
    Ok(Tensor::from_storage(
        Storage::Cpu(c),
        (m, n),
        candle_core::op::BackpropOp::none(),
        false,
    ))
}

/// `sum + a b` for 2-D `a [m, k]`, `b [k, n]` and `sum [m, n]`: on the CPU in f32/f64, when
/// `sum` is contiguous and in their dtype, the product is added where `sum` lies (which is
/// returned, so the caller must hold it alone); otherwise a new tensor.
pub(crate) fn matmul_add(sum: Tensor, a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let cpu = |t: &Tensor| matches!(t.device(), Device::Cpu) && t.dtype() == sum.dtype();
    let in_place = cpu(&sum)
        && cpu(a)
        && cpu(b)
        && matches!(sum.dtype(), DType::F32 | DType::F64)
        && sum.is_contiguous()
        && a.rank() == 2
        && b.rank() == 2;
    if !in_place {
        return sum + a.matmul(b)?;
    }
    let ((m, k), (k2, n)) = (a.dims2()?, b.dims2()?);
    if k2 != k || sum.dims() != [m, n] {
        candle_core::bail!(
            "matmul add: {:?} + {:?} x {:?} do not fit",
            sum.dims(),
            a.dims(),
            b.dims()
        );
    }
    sum.inplace_op3(a, b, &AddProduct { dims: (m, k, n) })?;
    Ok(sum)
}

/// `c += a b` in place, for [`matmul_add`].
struct AddProduct {
    /// `(m, k, n)`.
    dims: (usize, usize, usize),
}

impl AddProduct {
    fn typed<T: Float>(
        &self,
        (c, cl): (&mut [T], &Layout),
        (a, al): (&[T], &Layout),
        (b, bl): (&[T], &Layout),
    ) -> candle_core::Result<()> {
        let (m, k, n) = self.dims;
        let Some((start, end)) = cl.contiguous_offsets() else {
            candle_core::bail!("matmul add: the sum is not contiguous");
        };
        let (a, b) = (view(a, al, (m, k))?, view(b, bl, (k, n))?);
        product(
            as_uninit(&mut c[start..end]),
            (m, n, k),
            a,
            b,
            rayon::current_num_threads(),
            Dst::Add,
        );
        Ok(())
    }
}

impl InplaceOp3 for AddProduct {
    fn name(&self) -> &'static str {
        "matmul-add"
    }

    fn cpu_fwd(
        &self,
        c: &mut CpuStorage,
        cl: &Layout,
        a: &CpuStorage,
        al: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<()> {
        match (c, a, b) {
            (CpuStorage::F32(c), CpuStorage::F32(a), CpuStorage::F32(b)) => {
                self.typed((c, cl), (a, al), (b, bl))
            }
            (CpuStorage::F64(c), CpuStorage::F64(a), CpuStorage::F64(b)) => {
                self.typed((c, cl), (a, al), (b, bl))
            }
            (c, _, _) => candle_core::bail!("matmul add: unsupported dtype {:?}", c.dtype()),
        }
    }
}

/// [`matmul`] on CPU storages: `a [m, k] b [k, n]` read through their 2-D layouts, as a
/// row-major `[m, n]` storage. f32 and f64 through [`product`]; other dtypes through candle's
/// matmul.
pub(crate) fn cpu_matmul(
    (a, al): (&CpuStorage, &Layout),
    (b, bl): (&CpuStorage, &Layout),
    (m, k, n): (usize, usize, usize),
) -> candle_core::Result<CpuStorage> {
    match (a, b) {
        (CpuStorage::F32(av), CpuStorage::F32(bv)) => {
            Ok(CpuStorage::F32(typed((av, al), (bv, bl), (m, k, n))?))
        }
        (CpuStorage::F64(av), CpuStorage::F64(bv)) => {
            Ok(CpuStorage::F64(typed((av, al), (bv, bl), (m, k, n))?))
        }
        _ => a.matmul(b, (1, m, n, k), al, bl),
    }
}

/// `(buffer from the view's first element, row stride, column stride)` of a 2-D layout that
/// is `rows x cols`.
fn view<'a, T>(
    v: &'a [T],
    l: &Layout,
    (rows, cols): (usize, usize),
) -> candle_core::Result<(&'a [T], usize, usize)> {
    if l.dims() != [rows, cols] {
        candle_core::bail!(
            "matmul: operand is {:?}, expected [{rows}, {cols}]",
            l.dims()
        );
    }
    let (rs, cs) = (l.stride()[0], l.stride()[1]);
    let Some(v) = v.get(l.start_offset()..) else {
        candle_core::bail!("matmul: operand starts outside its buffer");
    };
    let reach = rows.saturating_sub(1) * rs + cols.saturating_sub(1) * cs;
    if rows * cols > 0 && reach >= v.len() {
        candle_core::bail!("matmul: operand view reaches outside its buffer");
    }
    Ok((v, rs, cs))
}

fn typed<T: Float>(
    (a, al): (&[T], &Layout),
    (b, bl): (&[T], &Layout),
    (m, k, n): (usize, usize, usize),
) -> candle_core::Result<Vec<T>> {
    let a = view(a, al, (m, k))?;
    let b = view(b, bl, (k, n))?;
    let mut c = Vec::<T>::with_capacity(m * n);
    product(
        &mut c.spare_capacity_mut()[..m * n],
        (m, n, k),
        a,
        b,
        rayon::current_num_threads(),
        Dst::Write,
    );
    // SAFETY: the capacity is the length, and `product` wrote every element.
    unsafe { c.set_len(m * n) };
    Ok(c)
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
    fn matmul_reads_transposed_and_offset_views() {
        let dev = Device::Cpu;
        let a = Tensor::randn(0f64, 1.0, (9, 40), &dev).unwrap();
        let b = Tensor::randn(0f64, 1.0, (21, 30), &dev).unwrap();
        // [7, 30] from row 2 on, and [30, 12] read transposed from column 5 on.
        let (av, bv) = (
            a.narrow(0, 2, 7).unwrap().narrow(1, 10, 30).unwrap(),
            b.narrow(0, 5, 12).unwrap().t().unwrap(),
        );
        let want = av
            .contiguous()
            .unwrap()
            .matmul(&bv.contiguous().unwrap())
            .unwrap();
        let got = matmul(&av, &bv).unwrap();
        assert!(super::super::float::max_abs_diff(&got, &want) < 1e-12);
        assert!(matmul(&av, &av).is_err());
    }

    #[test]
    fn matmul_add_adds_where_the_sum_lies() {
        let dev = Device::Cpu;
        let a = Tensor::randn(0f64, 1.0, (13, 300), &dev).unwrap();
        let b = Tensor::randn(0f64, 1.0, (17, 300), &dev).unwrap();
        let sum = Tensor::randn(0f64, 1.0, (13, 17), &dev).unwrap();
        let want = (&sum + a.matmul(&b.t().unwrap()).unwrap()).unwrap();
        let given = sum.copy().unwrap();
        let got = matmul_add(given.clone(), &a, &b.t().unwrap()).unwrap();
        assert!(super::super::float::max_abs_diff(&got, &want) < 1e-12);
        // In place: the tensor given holds the sum.
        assert!(super::super::float::max_abs_diff(&given, &want) < 1e-12);
        // A transposed sum is not written in place, and the result is still the sum.
        let st = sum.t().unwrap().contiguous().unwrap().t().unwrap();
        let got = matmul_add(st, &a, &b.t().unwrap()).unwrap();
        assert!(super::super::float::max_abs_diff(&got, &want) < 1e-12);
        assert!(matmul_add(sum, &a, &b).is_err());
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
