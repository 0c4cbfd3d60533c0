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
//!
//! A trainer's `widening_products` choice ([`crate::engine::Engine`]) turns this off: the products
//! are then rounded to bf16 and cast to f32, as before, through candle's own matmul (to measure
//! what widening buys, and as a way round a cuBLAS fault).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

/// Whether the calling trainer's products widen to f32
/// ([`crate::engine::Engine::widening_products`]): off, every product this module computes is
/// rounded to bf16 by candle's matmul and then cast to f32.
pub fn widening_products() -> bool {
    crate::engine::current().widening_products
}

/// The product rounded to bf16 by the backend's matmul, then cast to f32: what the module
/// computes with widening off.
fn rounded<S: BackendStorage>(
    (a, al): (&S, &Layout),
    (b, bl): (&S, &Layout),
    (m, k, n): (usize, usize, usize),
) -> candle_core::Result<S> {
    a.matmul(b, (1, m, n, k), al, bl)?
        .to_dtype(&Layout::contiguous((m, n)), DType::F32)
}

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
    if !widening_products() {
        return rounded((a, al), (b, bl), (m, k, n));
    }
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
    let (m, k, n) = dims((a.dtype(), al), (b.dtype(), bl))?;
    let dev = a.device().clone();
    if !widening_products() && m * n * k > 0 {
        return rounded((a, al), (b, bl), (m, k, n));
    }
    if m * n == 0 {
        return Ok(super::cuda::storage(dev.alloc_zeros::<f32>(1)?, &dev));
    }
    let mut c = super::cuda::output::<f32>(&dev, m * n)?;
    cuda_into((a, al), (b, bl), &mut c.slice_mut(..), (1.0, 0.0))?;
    Ok(super::cuda::storage(c, &dev))
}

/// `c = alpha a b + beta c` on CUDA for `c [m, n]` f32, row-major, from its first element: one
/// `cublasGemmEx` (bf16 operands, f32 accumulation). With `beta = 1` a second product adds
/// into the first where it lies, without a buffer or a pass of its own. `beta = 0` ignores what
/// `c` held, so it may be uninitialised.
#[cfg(feature = "cuda")]
pub(crate) fn cuda_into(
    (a, al): (&candle_core::CudaStorage, &Layout),
    (b, bl): (&candle_core::CudaStorage, &Layout),
    c: &mut candle_core::cuda_backend::cudarc::driver::CudaViewMut<f32>,
    (alpha, beta): (f32, f32),
) -> candle_core::Result<()> {
    use candle_core::cuda_backend::cudarc::cublas::{result::gemm_ex, sys};
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr as _, DevicePtrMut as _};
    use candle_core::cuda_backend::WrapErr as _;
    let (m, k, n) = dims((a.dtype(), al), (b.dtype(), bl))?;
    if c.len() < m * n {
        candle_core::bail!(
            "widening matmul: [{m}, {n}] does not fit an output of {}",
            c.len()
        );
    }
    if m * n == 0 {
        return Ok(());
    }
    let dev = a.device().clone();
    let int = |what: &str, v: usize| super::cuda::int("widening matmul", what, v);
    if k == 0 {
        // No products, and cuBLAS is not called with empty operands: c = beta c, for the betas
        // the callers use.
        if beta == 1.0 {
            return Ok(());
        }
        if beta == 0.0 {
            return dev.cuda_stream().memset_zeros(c).w();
        }
        candle_core::bail!("widening matmul: an empty product with beta {beta}");
    }
    if !widening_products() {
        // c += alpha p with the rounded product p, for the one use with widening off.
        if beta != 1.0 {
            candle_core::bail!("widening matmul: rounded products only add into c (beta 1)");
        }
        let p = rounded((a, al), (b, bl), (m, k, n))?;
        let p = p.as_cuda_slice::<f32>()?;
        let (cfg, len) = (super::cuda::elementwise(m * n), (m * n) as u64);
        super::cuda::launch!(dev, "add_scaled", cfg, c, p, &alpha, &len);
        return Ok(());
    }
    let g = GemmArgs::new(al, bl, (m, k, n))?;
    let op = |transposed: bool| {
        if transposed {
            sys::cublasOperation_t::CUBLAS_OP_T
        } else {
            sys::cublasOperation_t::CUBLAS_OP_N
        }
    };
    let a_view = a.as_cuda_slice::<half::bf16>()?.slice(al.start_offset()..);
    let b_view = b.as_cuda_slice::<half::bf16>()?.slice(bl.start_offset()..);
    let blas = dev.cublas_handle();
    let stream = dev.cuda_stream();
    let (a_ptr, _a_guard) = a_view.device_ptr(&stream);
    let (b_ptr, _b_guard) = b_view.device_ptr(&stream);
    let (c_ptr, _c_guard) = c.device_ptr_mut(&stream);
    // SAFETY: the pointers are live device buffers of the operands' element ranges (the
    // layouts were checked to be row-major or transposed [m, k] and [k, n] from their start
    // offsets) and of at least [m, n] f32 outputs; alpha and beta are f32, as
    // CUBLAS_COMPUTE_32F requires; the handle belongs to this device and stream.
    unsafe {
        gemm_ex(
            *blas.handle(),
            op(g.first_transposed),
            op(g.second_transposed),
            int("n", g.rows)?,
            int("m", g.cols)?,
            int("k", g.inner)?,
            (&alpha) as *const f32 as *const _,
            b_ptr as *const _,
            sys::cudaDataType_t::CUDA_R_16BF,
            int("ldb", g.ld_first)?,
            a_ptr as *const _,
            sys::cudaDataType_t::CUDA_R_16BF,
            int("lda", g.ld_second)?,
            (&beta) as *const f32 as *const _,
            c_ptr as *mut _,
            sys::cudaDataType_t::CUDA_R_32F,
            int("ldc", g.ld_c)?,
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
        )
        .w()?;
    }
    Ok(())
}

/// The arguments of the column-major `gemm` (cuBLAS's) that computes the row-major
/// `C [m, n] = A [m, k] B [k, n]`: read column-major, C's memory is `C^T [n, m] = B^T A^T`, so B
/// is the first operand and A the second. A row-major operand read column-major is its own
/// transpose (no op); a transposed one is the matrix itself (op T). Pure, so the CPU tests check
/// it against a column-major gemm written from cuBLAS's definition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) struct GemmArgs {
    /// Whether the first operand (B) is transposed by the gemm (op T).
    pub first_transposed: bool,
    /// Whether the second operand (A) is transposed by the gemm (op T).
    pub second_transposed: bool,
    /// The column-major result's rows: `n`.
    pub rows: usize,
    /// Its columns: `m`.
    pub cols: usize,
    /// The summed dimension: `k`.
    pub inner: usize,
    /// The first operand's leading dimension.
    pub ld_first: usize,
    /// The second operand's leading dimension.
    pub ld_second: usize,
    /// The result's leading dimension: `n`.
    pub ld_c: usize,
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
impl GemmArgs {
    /// The arguments for `a [m, k]` and `b [k, n]` laid out as `al` and `bl` (each row-major or
    /// transposed, from their start offsets).
    pub fn new(
        al: &Layout,
        bl: &Layout,
        (m, k, n): (usize, usize, usize),
    ) -> candle_core::Result<Self> {
        // (op T, leading dimension) of an operand with `rows` x `cols` in row-major terms.
        let op = |l: &Layout, rows: usize, cols: usize| match orientation(l) {
            Some(Orientation::RowMajor) => Ok((false, cols.max(1))),
            Some(Orientation::Transposed) => Ok((true, rows.max(1))),
            None => candle_core::bail!(
                "widening matmul: operand strides {:?} are neither row-major nor transposed",
                l.stride()
            ),
        };
        let (first_transposed, ld_first) = op(bl, k, n)?;
        let (second_transposed, ld_second) = op(al, m, k)?;
        Ok(GemmArgs {
            first_transposed,
            second_transposed,
            rows: n,
            cols: m,
            inner: k,
            ld_first,
            ld_second,
            ld_c: n.max(1),
        })
    }
}

/// `c += alpha a b` on the CPU for `c [m, n]` f32: the widening product, then one add.
pub(crate) fn cpu_accumulate(
    (a, al): (&CpuStorage, &Layout),
    (b, bl): (&CpuStorage, &Layout),
    c: &mut [f32],
    alpha: f32,
) -> candle_core::Result<()> {
    let CpuStorage::F32(p) = cpu(a, al, b, bl)? else {
        candle_core::bail!("widening matmul: the product came back in another dtype");
    };
    if c.len() != p.len() {
        candle_core::bail!(
            "widening matmul: {} products for {} outputs",
            p.len(),
            c.len()
        );
    }
    c.iter_mut().zip(&p).for_each(|(c, p)| *c += alpha * p);
    Ok(())
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

/// `t` as an operand: itself when row-major or transposed, else a row-major copy.
fn operand(t: &Tensor) -> candle_core::Result<Tensor> {
    match orientation(t.layout()) {
        Some(_) => Ok(t.detach()),
        None => t.detach().contiguous(),
    }
}

/// `a [m, k] b [k, n]` as `[m, n]` f32, for bf16 `a` and `b` (each row-major or a transposed
/// view), with exact products accumulated in f32. Not differentiable: for hand-chained backward
/// passes and nodes outside the graph. Operands in another layout are copied first.
pub fn widening_matmul(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    operand(a)?.apply_op2_no_bwd(&operand(b)?, &WideningMatmul)
}

/// `c += alpha a b` in place (see [`widening_matmul_add`]).
struct WideningMatmulAdd {
    alpha: f64,
}

impl WideningMatmulAdd {
    /// The range of `c` the product adds to: all of a contiguous `[m, n]` f32 tensor.
    fn target(
        c: (DType, &Layout),
        a: &Layout,
        b: &Layout,
    ) -> candle_core::Result<std::ops::Range<usize>> {
        let (m, n) = (a.dims()[0], b.dims()[1]);
        let Some((start, end)) = c.1.contiguous_offsets() else {
            candle_core::bail!("widening matmul: the sum is not contiguous");
        };
        if c.0 != DType::F32 || c.1.dims() != [m, n] {
            candle_core::bail!(
                "widening matmul: adds [{m}, {n}] products to an f32 [{m}, {n}], got {:?} {:?}",
                c.0,
                c.1.dims()
            );
        }
        Ok(start..end)
    }
}

impl candle_core::InplaceOp3 for WideningMatmulAdd {
    fn name(&self) -> &'static str {
        "widening-matmul-add"
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
        dims((a.dtype(), al), (b.dtype(), bl))?;
        let range = Self::target((c.dtype(), cl), al, bl)?;
        let CpuStorage::F32(c) = c else {
            candle_core::bail!("widening matmul: the sum is not f32");
        };
        cpu_accumulate((a, al), (b, bl), &mut c[range], self.alpha as f32)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        c: &mut candle_core::CudaStorage,
        cl: &Layout,
        a: &candle_core::CudaStorage,
        al: &Layout,
        b: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<()> {
        dims((a.dtype(), al), (b.dtype(), bl))?;
        let range = Self::target((c.dtype(), cl), al, bl)?;
        let mut out = c.as_cuda_slice_mut::<f32>()?.slice_mut(range);
        cuda_into((a, al), (b, bl), &mut out, (self.alpha as f32, 1.0))
    }
}

/// `c += alpha a b` in place, for a contiguous f32 `c [m, n]` and bf16 `a [m, k]`, `b [k, n]`
/// (each row-major or a transposed view): the second product of a sum added where the first
/// lies. On CUDA cuBLAS adds it (`beta = 1`), with no buffer or pass of its own; the CPU adds
/// the widening product. Not differentiable; `c` must not share memory with `a` or `b`.
pub fn widening_matmul_add(
    c: &Tensor,
    a: &Tensor,
    b: &Tensor,
    alpha: f64,
) -> candle_core::Result<()> {
    c.inplace_op3(&operand(a)?, &operand(b)?, &WideningMatmulAdd { alpha })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// `C = alpha op(X) op(Y) + beta C`, column-major, as cuBLAS's `gemm` defines it: `op(X)`
    /// is `rows x inner`, `op(Y)` is `inner x cols`, element (i, j) of a stored matrix with
    /// leading dimension `ld` at `i + j ld`.
    fn column_major_gemm(
        g: &GemmArgs,
        x: &[f64],
        y: &[f64],
        c: &mut [f64],
        (alpha, beta): (f64, f64),
    ) {
        let at = |m: &[f64], transposed: bool, ld: usize, i: usize, j: usize| {
            if transposed {
                m[j + i * ld]
            } else {
                m[i + j * ld]
            }
        };
        for i in 0..g.rows {
            for j in 0..g.cols {
                let mut sum = 0.0;
                for p in 0..g.inner {
                    sum += at(x, g.first_transposed, g.ld_first, i, p)
                        * at(y, g.second_transposed, g.ld_second, p, j);
                }
                let slot = &mut c[i + j * g.ld_c];
                *slot = alpha * sum + beta * *slot;
            }
        }
    }

    /// The cuBLAS arguments computed from each operand orientation, given to a column-major gemm
    /// written from cuBLAS's definition over the operands' memory, give the row-major product,
    /// with `beta = 1` adding into what the output held; vectors and single rows included.
    #[test]
    fn cublas_arguments_give_the_row_major_product_in_every_orientation() {
        let dev = Device::Cpu;
        for (m, k, n) in [(5, 7, 3), (1, 4, 6), (6, 4, 1), (3, 1, 4), (1, 1, 1)] {
            let a = Tensor::randn(0f64, 1.0, (m, k), &dev).unwrap();
            let b = Tensor::randn(0f64, 1.0, (k, n), &dev).unwrap();
            let c0 = Tensor::randn(0f64, 1.0, (m, n), &dev).unwrap();
            let want = (a.matmul(&b).unwrap() * 0.5 + &c0).unwrap();
            let want = f64s(&want);
            // Each operand as stored: row-major, or the transpose of a row-major copy.
            let stored = |t: &Tensor, transposed: bool| {
                if transposed {
                    let mem = t.t().unwrap().contiguous().unwrap();
                    (f64s(&mem), mem.t().unwrap().layout().clone())
                } else {
                    (f64s(t), t.layout().clone())
                }
            };
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let (a_mem, al) = stored(&a, ta);
                let (b_mem, bl) = stored(&b, tb);
                let g = GemmArgs::new(&al, &bl, (m, k, n)).unwrap();
                let mut c = f64s(&c0);
                column_major_gemm(&g, &b_mem, &a_mem, &mut c, (0.5, 1.0));
                let d = c
                    .iter()
                    .zip(&want)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0.0, f64::max);
                assert!(
                    d < 1e-12,
                    "[{m}, {k}] x [{k}, {n}], transposed {ta} {tb}: {d}"
                );
            }
        }
        // A narrowed view is neither orientation: refused, not misread.
        let wide = Tensor::zeros((4, 6), DType::F64, &dev).unwrap();
        let narrow = wide.narrow(1, 0, 3).unwrap();
        let b = Tensor::zeros((3, 2), DType::F64, &dev).unwrap();
        assert!(GemmArgs::new(narrow.layout(), b.layout(), (4, 3, 2)).is_err());
    }

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

    /// Adding a second product in place gives the sum of the two products, the scale applied
    /// to the second, as two products and an add would.
    #[test]
    fn a_second_product_adds_in_place() {
        let dev = Device::Cpu;
        let bf = |r, c| {
            Tensor::randn(0f32, 1.0, (r, c), &dev)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap()
        };
        let (x, w, l, a) = (bf(6, 20), bf(20, 9), bf(6, 3), bf(9, 3).t().unwrap());
        let first = widening_matmul(&x, &w).unwrap();
        let want = (&first + widening_matmul(&l, &a).unwrap().affine(0.25, 0.0).unwrap()).unwrap();
        widening_matmul_add(&first, &l, &a, 0.25).unwrap();
        assert_eq!(f64s(&first), f64s(&want));
        let wrong = Tensor::zeros((6, 8), DType::F32, &dev).unwrap();
        let e = widening_matmul_add(&wrong, &l, &a, 1.0).unwrap_err();
        assert!(e.to_string().contains("adds [6, 9] products"), "{e}");
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
