//! `a b` for bf16 operands with the products accumulated in f32 and the result returned in f32:
//! the matmul of bf16 mixed precision whose result the model keeps in f32 (a projection's
//! output, an input's or a master weight's gradient).
//!
//! A bf16 product rounded to bf16 and then cast to f32 costs two passes over the result and
//! throws away the accuracy that the f32 accumulation had. On CUDA the product goes to cuBLAS
//! with an f32 output (`cublasGemmEx`: bf16 A and B, f32 C, f32 compute), one pass and no cast.
//! The CPU widens both operands to f32, exactly, and multiplies in f32, so both devices compute
//! the same thing: exact products of the bf16 values, summed in f32, differing only in the
//! order of the sums.
//!
//! Operands are 2-D and each either row-major or the transpose of a row-major matrix (how
//! weights and gradients are read). There is no backward: the callers chain their backward
//! passes by hand.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

/// How a 2-D operand lies in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Orientation {
    /// Row-major: element (i, j) at `i * cols + j`.
    RowMajor,
    /// The transpose of a row-major matrix: element (i, j) at `j * rows + i`.
    Transposed,
}

/// The orientation of a 2-D layout, or `None` when it is neither (a narrowed or broadcast
/// view). A dimension of size 1 may have any stride.
pub(crate) fn orientation(l: &Layout) -> Option<Orientation> {
    let (dims, stride) = (l.dims(), l.stride());
    let [rows, cols] = *dims else { return None };
    let [s0, s1] = *stride else { return None };
    if (s1 == 1 || cols == 1) && (s0 == cols || rows == 1) {
        Some(Orientation::RowMajor)
    } else if (s0 == 1 || rows == 1) && (s1 == rows || cols == 1) {
        Some(Orientation::Transposed)
    } else {
        None
    }
}

/// `(m, k, n)` for `a [m, k]` times `b [k, n]`, both bf16 and each row-major or transposed.
fn dims(a: (DType, &Layout), b: (DType, &Layout)) -> candle_core::Result<(usize, usize, usize)> {
    if a.0 != DType::BF16 || b.0 != DType::BF16 {
        candle_core::bail!(
            "widening matmul: takes bf16 operands, got {:?} and {:?}",
            a.0,
            b.0
        );
    }
    let (m, k) = a.1.shape().dims2()?;
    let (kb, n) = b.1.shape().dims2()?;
    if k != kb {
        candle_core::bail!("widening matmul: [{m}, {k}] times [{kb}, {n}] do not fit");
    }
    if orientation(a.1).is_none() || orientation(b.1).is_none() {
        candle_core::bail!(
            "widening matmul: operands must be row-major or transposed, got strides {:?} and {:?}",
            a.1.stride(),
            b.1.stride()
        );
    }
    Ok((m, k, n))
}

/// The CPU product: both operands widened to f32 (exact) where they lie, keeping their layout,
/// then an f32 matmul, which therefore sums in the order candle's f32 matmul of the widened
/// tensors would.
pub(crate) fn cpu(
    a: &CpuStorage,
    al: &Layout,
    b: &CpuStorage,
    bl: &Layout,
) -> candle_core::Result<CpuStorage> {
    let (m, k, n) = dims((a.dtype(), al), (b.dtype(), bl))?;
    let (a32, a32l) = widen_in_place(a, al)?;
    let (b32, b32l) = widen_in_place(b, bl)?;
    a32.matmul(&b32, (1, m, n, k), &a32l, &b32l)
}

/// The f32 copy of the elements a row-major or transposed bf16 operand covers, and its layout
/// in that copy (the operand's strides, from offset 0).
fn widen_in_place(s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Layout)> {
    let CpuStorage::BF16(v) = s else {
        candle_core::bail!("widening matmul: takes bf16 operands, got {:?}", s.dtype());
    };
    // Row-major or transposed: the elements fill [start, start + len) exactly, but for a
    // dimension of size 1, whose stride reaches nothing.
    let len = l.shape().elem_count();
    let start = l.start_offset();
    let Some(range) = v.get(start..start + len) else {
        candle_core::bail!("widening matmul: the operand's layout runs past its storage");
    };
    let wide = range.iter().map(|x| x.to_f32()).collect();
    let stride = if len == 0 {
        vec![0, 0]
    } else {
        // Size-1 dimensions get the stride that keeps the copy in bounds.
        let (rows, cols) = (l.dims()[0], l.dims()[1]);
        match orientation(l) {
            Some(Orientation::RowMajor) => vec![cols, 1],
            _ => vec![1, rows],
        }
    };
    Ok((
        CpuStorage::F32(wide),
        Layout::new(l.shape().clone(), stride, 0),
    ))
}

/// The CUDA product: one `cublasGemmEx` with bf16 operands, f32 accumulation and an f32 result.
#[cfg(feature = "cuda")]
pub(crate) fn cuda(
    a: &candle_core::CudaStorage,
    al: &Layout,
    b: &candle_core::CudaStorage,
    bl: &Layout,
) -> candle_core::Result<candle_core::CudaStorage> {
    use candle_core::cuda_backend::cudarc::cublas::{result::gemm_ex, sys};
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr as _, DevicePtrMut as _};
    use candle_core::cuda_backend::WrapErr as _;
    let (m, k, n) = dims((a.dtype(), al), (b.dtype(), bl))?;
    let dev = a.device().clone();
    if m * n == 0 || k == 0 {
        // No products: cuBLAS is not called with empty operands.
        let zeros = dev.alloc_zeros::<f32>((m * n).max(1))?;
        return Ok(super::cuda::storage(zeros, &dev));
    }
    let int = |what: &str, v: usize| super::cuda::int("widening matmul", what, v);
    // cuBLAS is column-major: the row-major C [m, n] is the column-major C^T [n, m] =
    // B^T A^T, so B is its first operand and A its second. A row-major operand is, read
    // column-major, its own transpose (op N); a transposed one is the matrix itself (op T).
    let op = |l: &Layout, cols: usize, rows: usize| match orientation(l) {
        Some(Orientation::RowMajor) => (sys::cublasOperation_t::CUBLAS_OP_N, cols),
        _ => (sys::cublasOperation_t::CUBLAS_OP_T, rows),
    };
    let (op_b, ldb) = op(bl, n, k);
    let (op_a, lda) = op(al, k, m);
    let a_view = a.as_cuda_slice::<half::bf16>()?.slice(al.start_offset()..);
    let b_view = b.as_cuda_slice::<half::bf16>()?.slice(bl.start_offset()..);
    let mut c = super::cuda::output::<f32>(&dev, m * n)?;
    let (alpha, beta) = (1f32, 0f32);
    let blas = dev.cublas_handle();
    let stream = dev.cuda_stream();
    {
        let (a_ptr, _a_guard) = a_view.device_ptr(&stream);
        let (b_ptr, _b_guard) = b_view.device_ptr(&stream);
        let (c_ptr, _c_guard) = c.device_ptr_mut(&stream);
        // SAFETY: the pointers are live device buffers of the operands' element ranges (the
        // layouts were checked to be row-major or transposed [m, k] and [k, n] from their start
        // offsets) and of an [m, n] f32 output; alpha and beta are f32, as CUBLAS_COMPUTE_32F
        // requires; the handle belongs to this device and stream.
        unsafe {
            gemm_ex(
                *blas.handle(),
                op_b,
                op_a,
                int("n", n)?,
                int("m", m)?,
                int("k", k)?,
                (&alpha) as *const f32 as *const _,
                b_ptr as *const _,
                sys::cudaDataType_t::CUDA_R_16BF,
                int("ldb", ldb)?,
                a_ptr as *const _,
                sys::cudaDataType_t::CUDA_R_16BF,
                int("lda", lda)?,
                (&beta) as *const f32 as *const _,
                c_ptr as *mut _,
                sys::cudaDataType_t::CUDA_R_32F,
                int("ldc", n)?,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
            )
            .w()?;
        }
    }
    Ok(super::cuda::storage(c, &dev))
}

struct WideningMatmul;

impl CustomOp2 for WideningMatmul {
    fn name(&self) -> &'static str {
        "widening-matmul"
    }

    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        al: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = cpu(a, al, b, bl)?;
        Ok((out, Shape::from((al.dims()[0], bl.dims()[1]))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        a: &candle_core::CudaStorage,
        al: &Layout,
        b: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let out = cuda(a, al, b, bl)?;
        Ok((out, Shape::from((al.dims()[0], bl.dims()[1]))))
    }
}

/// `a [m, k] b [k, n]` as `[m, n]` f32, for bf16 `a` and `b` (each row-major or a transposed
/// view), with exact products accumulated in f32. Not differentiable: for hand-chained backward
/// passes and nodes outside the graph. Operands in another layout are copied first.
pub fn widening_matmul(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let fit = |t: &Tensor| -> candle_core::Result<Tensor> {
        match orientation(t.layout()) {
            Some(_) => Ok(t.detach()),
            None => t.detach().contiguous(),
        }
    };
    fit(a)?.apply_op2_no_bwd(&fit(b)?, &WideningMatmul)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn f64s(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// Every orientation of both operands gives the f64 product of the bf16 values to f32
    /// accumulation, and the same bits as candle's f32 matmul of the widened casts read the same
    /// way.
    #[test]
    fn products_of_bf16_values_accumulate_in_f32_in_every_orientation() {
        let dev = Device::Cpu;
        let (m, k, n) = (7, 300, 5);
        let bf = |r, c| {
            Tensor::randn(0f32, 1.0, (r, c), &dev)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap()
        };
        let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        // (bf16 operand, its f32 widening in the same layout)
        let row = |r, c| {
            let t = bf(r, c);
            let w = f32(&t);
            (t, w)
        };
        let transposed = |r, c| {
            let t = bf(c, r);
            let w = f32(&t).t().unwrap();
            (t.t().unwrap(), w)
        };
        let (a, at, b, bt) = (row(m, k), transposed(m, k), row(k, n), transposed(k, n));
        assert_eq!(orientation(at.0.layout()), Some(Orientation::Transposed));
        for (a, b) in [(&a, &b), (&at, &b), (&a, &bt), (&at, &bt)] {
            let got = widening_matmul(&a.0, &b.0).unwrap();
            assert_eq!((got.dtype(), got.dims()), (DType::F32, &[m, n][..]));
            let (a64, b64) = (f64s(&a.0), f64s(&b.0));
            let want: Vec<f64> = (0..m * n)
                .map(|i| {
                    (0..k)
                        .map(|j| a64[i / n * k + j] * b64[j * n + i % n])
                        .sum()
                })
                .collect();
            let got64 = f64s(&got);
            for (g, w) in got64.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{g} vs {w}");
            }
            assert_eq!(got64, f64s(&a.1.matmul(&b.1).unwrap()));
        }
    }

    #[test]
    fn empty_products_are_zeros_and_bad_operands_are_errors() {
        let dev = Device::Cpu;
        let z = |r, c| Tensor::zeros((r, c), DType::BF16, &dev).unwrap();
        let none = widening_matmul(&z(3, 0), &z(0, 2)).unwrap();
        assert_eq!(f64s(&none), vec![0.0; 6]);
        assert_eq!(widening_matmul(&z(0, 4), &z(4, 2)).unwrap().dims(), &[0, 2]);
        let e = widening_matmul(&z(3, 4), &z(5, 2)).unwrap_err();
        assert!(e.to_string().contains("do not fit"), "{e}");
        let f = Tensor::zeros((4, 2), DType::F32, &dev).unwrap();
        let e = widening_matmul(&z(3, 4), &f).unwrap_err();
        assert!(e.to_string().contains("bf16 operands"), "{e}");
        // A narrowed view is neither orientation: copied, then multiplied.
        let wide = Tensor::ones((4, 6), DType::BF16, &dev).unwrap();
        let view = wide.narrow(1, 1, 2).unwrap();
        assert_eq!(orientation(view.layout()), None);
        let got = widening_matmul(&Tensor::ones((3, 4), DType::BF16, &dev).unwrap(), &view);
        assert_eq!(f64s(&got.unwrap()), vec![4.0; 6]);
    }
}
