//! The attention's per-head products on the CPU, `[n, m, k] x [n, k, p] -> [n, m, p]` for the
//! `n = batch * heads` heads, skipping what the causal mask makes zero.
//!
//! candle multiplies batched matrices one after another, splitting each small product
//! (`[t, d] x [d, t]` per head) over every thread, so a layer's attention pays a thread
//! hand-off and join per head, and computes all of `q kᵀ` although the softmax reads only its
//! lower triangle. Here the heads (and blocks of rows within a head) are the parallel tasks,
//! each a single-threaded gemm, and a causal product multiplies only the blocks the mask keeps:
//! a little over half the arithmetic of the full product.

use super::causal_softmax::{softmax_backward_row_in_place, softmax_row_in_place};
use super::float::{contiguous, Float};
use candle_core::{DType, Device, Storage, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Rows of the result per task: a multiple of the gemm microkernels' tiles, and small enough
/// that the causal triangle is cut finely (blocks of 64 rows of a 256-position sequence compute
/// 62% of the full product instead of 50%).
const BLOCK: usize = 64;

/// What the causal mask tells a per-head product about its operands and result, all `[t, t]`
/// matrices being lower triangular (entry `(i, j)` zero or unread for `j > i`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Causal {
    /// Only the lower triangle of the `[t, t]` result is read (`q kᵀ`, `dP = dO vᵀ`); the upper
    /// triangle is left zero.
    LowerResult,
    /// The left operand is a lower triangular `[t, t]` (`P v`, `dS k`): result row `i` sums over
    /// `0..=i` only.
    LowerLeft,
    /// The left operand is the transpose of a lower triangular `[t, t]` (`Pᵀ dO`, `dSᵀ q`):
    /// result row `j` sums over `j..t` only.
    UpperLeft,
}

/// One operand: a contiguous `[n, rows, cols]` tensor, used as stored or transposed.
pub(crate) struct Operand<'a> {
    /// The tensor, contiguous, on the CPU.
    pub tensor: &'a Tensor,
    /// Multiply by the transpose of each head's matrix (a strided read, no copy).
    pub transposed: bool,
}

/// Whether [`head_matmul`] computes products of tensors like `x`: f32 or f64 on the CPU.
pub(crate) fn head_matmul_applies(x: &Tensor) -> bool {
    matches!(x.device(), Device::Cpu) && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// `op(a[h]) op(b[h])` for each head `h`, as a contiguous `[n, m, p]` tensor, where `op`
/// transposes an operand marked so. Entries `causal` leaves out are zero.
pub(crate) fn head_matmul(a: Operand, b: Operand, causal: Causal) -> candle_core::Result<Tensor> {
    match a.tensor.dtype() {
        DType::F32 => typed::<f32>(a, b, causal, Epilogue::None),
        DType::F64 => typed::<f64>(a, b, causal, Epilogue::None),
        dt => candle_core::bail!("head matmul: unsupported dtype {dt:?}"),
    }
}

/// The attention probabilities `causal_softmax(scale q kᵀ)` per head, for contiguous
/// `q`, `k [n, t, d]`: each block of score rows goes through the softmax while it is still in
/// cache, so the scores are never written out and read back as a tensor of their own. The
/// same values as [`super::causal_softmax::causal_softmax`] of [`head_matmul`]'s `q kᵀ`.
pub(crate) fn causal_probs(q: &Tensor, k: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    let (a, b) = (
        Operand {
            tensor: q,
            transposed: false,
        },
        Operand {
            tensor: k,
            transposed: true,
        },
    );
    match q.dtype() {
        DType::F32 => typed::<f32>(a, b, Causal::LowerResult, Epilogue::Softmax(scale as f32)),
        DType::F64 => typed::<f64>(a, b, Causal::LowerResult, Epilogue::Softmax(scale)),
        dt => candle_core::bail!("attention probabilities: unsupported dtype {dt:?}"),
    }
}

/// The gradient of the attention scores from that of its result `dout [n, t, d]`, the values
/// `v [n, t, d]` and the probabilities `probs [n, t, t]`: `dP = dout vᵀ` block by block, each
/// block turned into `dS = scale P (dP - rowsum(P dP))` while still in cache (the softmax
/// backward of [`super::causal_softmax`]), so `dP` never exists as a tensor.
pub(crate) fn causal_score_grads(
    dout: &Tensor,
    v: &Tensor,
    probs: &Tensor,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let (a, b) = (
        Operand {
            tensor: dout,
            transposed: false,
        },
        Operand {
            tensor: v,
            transposed: true,
        },
    );
    let (n, t, _) = dout.dims3()?;
    if probs.dims() != [n, t, t] || probs.dtype() != dout.dtype() || !probs.is_contiguous() {
        candle_core::bail!(
            "attention score gradients: probabilities {:?} {:?} for {:?} {:?}",
            probs.dims(),
            probs.dtype(),
            dout.dims(),
            dout.dtype()
        );
    }
    let (sp, lp) = probs.storage_and_layout();
    let Storage::Cpu(sp) = &*sp else {
        candle_core::bail!("attention score gradients: probabilities are not on the CPU");
    };
    let op = "attention score gradients";
    match dout.dtype() {
        DType::F32 => typed::<f32>(
            a,
            b,
            Causal::LowerResult,
            Epilogue::SoftmaxBackward(contiguous(op, sp, lp)?, scale as f32),
        ),
        DType::F64 => typed::<f64>(
            a,
            b,
            Causal::LowerResult,
            Epilogue::SoftmaxBackward(contiguous(op, sp, lp)?, scale),
        ),
        dt => candle_core::bail!("{op}: unsupported dtype {dt:?}"),
    }
}

/// What a block of a `LowerResult` product goes through once computed, row by row over the
/// visible entries `0..=i`.
enum Epilogue<'a, T> {
    /// Nothing: the product itself.
    None,
    /// The causal softmax with this scale.
    Softmax(T),
    /// The causal softmax's backward, given the probabilities `[n, t, t]` and the scale.
    SoftmaxBackward(&'a [T], T),
}

/// A matrix inside a buffer: element `(i, j)` at `i * rs + j * cs`.
#[derive(Clone, Copy)]
struct View {
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

/// The view of each head's matrix of a contiguous `[n, r, c]` operand, and `n`.
fn view(x: &Operand) -> candle_core::Result<(usize, View)> {
    let (n, r, c) = x.tensor.dims3()?;
    Ok(if x.transposed {
        (
            n,
            View {
                rows: c,
                cols: r,
                rs: 1,
                cs: c,
            },
        )
    } else {
        (
            n,
            View {
                rows: r,
                cols: c,
                rs: c,
                cs: 1,
            },
        )
    })
}

fn typed<T: Float + candle_core::WithDType>(
    a: Operand,
    b: Operand,
    causal: Causal,
    epilogue: Epilogue<T>,
) -> candle_core::Result<Tensor> {
    let ((n, va), (nb, vb)) = (view(&a)?, view(&b)?);
    let (m, k, p) = (va.rows, va.cols, vb.cols);
    if nb != n || vb.rows != k || a.tensor.dtype() != b.tensor.dtype() {
        candle_core::bail!(
            "head matmul: {:?} (transposed {}) and {:?} (transposed {}) do not multiply",
            a.tensor.dims(),
            a.transposed,
            b.tensor.dims(),
            b.transposed
        );
    }
    let square = match causal {
        Causal::LowerResult => m == p,
        Causal::LowerLeft | Causal::UpperLeft => m == k,
    };
    if !square {
        candle_core::bail!("head matmul: {causal:?} needs a square [t, t] matrix, got {m}x{k}x{p}");
    }
    match epilogue {
        Epilogue::None => {}
        _ if causal != Causal::LowerResult => {
            candle_core::bail!("head matmul: a softmax epilogue needs the lower result")
        }
        Epilogue::SoftmaxBackward(probs, _) if probs.len() != n * m * p => {
            candle_core::bail!("head matmul: {} probabilities for {n}x{m}x{p}", probs.len())
        }
        _ => {}
    }
    let (sa, la) = a.tensor.storage_and_layout();
    let (sb, lb) = b.tensor.storage_and_layout();
    let (Storage::Cpu(sa), Storage::Cpu(sb)) = (&*sa, &*sb) else {
        candle_core::bail!("head matmul: operands are not on the CPU");
    };
    let (xa, xb) = (
        contiguous::<T>("head matmul", sa, la)?,
        contiguous::<T>("head matmul", sb, lb)?,
    );
    // Every element is written once below (computed or zeroed), so no zero-fill first.
    let len = n * m * p;
    let mut out: Vec<T> = Vec::with_capacity(len);
    if len > 0 {
        // Each task: one block of result rows of one head.
        out.spare_capacity_mut()[..len]
            .par_chunks_mut(m * p)
            .zip(xa.par_chunks(m * k).zip(xb.par_chunks(k * p)))
            .enumerate()
            .for_each(|(head, (c, (ha, hb)))| {
                c.par_chunks_mut(BLOCK * p)
                    .enumerate()
                    .for_each(|(blk, cb)| {
                        let r0 = blk * BLOCK;
                        let r1 = (r0 + BLOCK).min(m);
                        // Columns of the result and the summed range this block needs.
                        let (cols, ks) = match causal {
                            Causal::LowerResult => (r1, 0..k),
                            Causal::LowerLeft => (p, 0..r1),
                            Causal::UpperLeft => (p, r0..k),
                        };
                        block_product(cb, p, (ha, va), (hb, vb), (r0..r1, cols, ks));
                        if causal == Causal::LowerResult {
                            // The block's columns reach its last row's diagonal: clear what
                            // lies above the diagonal of its earlier rows.
                            for (r, row) in cb.chunks_mut(p).enumerate() {
                                row[r0 + r + 1..r1].fill(MaybeUninit::new(T::ZERO));
                            }
                        }
                        // SAFETY: block_product and the fill above wrote every element of the
                        // block, so it is initialised; MaybeUninit<T> has T's layout.
                        let block = unsafe { &mut *(cb as *mut [MaybeUninit<T>] as *mut [T]) };
                        let rows = block
                            .chunks_mut(p)
                            .enumerate()
                            .map(|(r, row)| (r0 + r, row));
                        match &epilogue {
                            Epilogue::None => {}
                            Epilogue::Softmax(scale) => {
                                for (i, row) in rows {
                                    softmax_row_in_place(&mut row[..=i], *scale);
                                }
                            }
                            Epilogue::SoftmaxBackward(probs, scale) => {
                                let head_probs = &probs[head * m * p..(head + 1) * m * p];
                                for (i, row) in rows {
                                    let y = &head_probs[i * p..i * p + i + 1];
                                    softmax_backward_row_in_place(y, &mut row[..=i], *scale);
                                }
                            }
                        }
                    });
            });
    }
    // SAFETY: the capacity is len, and the tasks above cover the first len elements (heads of
    // m * p, zipped with exactly n heads of each operand, checked in the shapes above; blocks of
    // whole rows), each writing its block in full (see `block_product`).
    unsafe { out.set_len(len) };
    Tensor::from_vec(out, (n, m, p), &Device::Cpu)
}

/// `c[.., ..cols] = a[rows, ks] b[ks, ..cols]` and `c[.., cols..] = 0`, with `c` the block's
/// rows (row stride `ldc`, every element written).
fn block_product<T: Float>(
    c: &mut [MaybeUninit<T>],
    ldc: usize,
    (a, va): (&[T], View),
    (b, vb): (&[T], View),
    (rows, cols, ks): (std::ops::Range<usize>, usize, std::ops::Range<usize>),
) {
    let (m, k) = (rows.len(), ks.len());
    // The product over an empty range is zero, and so is what lies right of `cols`.
    let computed = if k == 0 { 0 } else { cols };
    for row in c.chunks_mut(ldc) {
        row[computed..].fill(MaybeUninit::new(T::ZERO));
    }
    if m == 0 || computed == 0 {
        return;
    }
    // Every index the gemm reads is inside its slice: rows < va.rows, ks < va.cols = vb.rows,
    // cols <= vb.cols, and the views describe the contiguous head matrices the slices hold.
    assert!(rows.end <= va.rows && ks.end <= va.cols && cols <= vb.cols);
    assert!(
        c.len() == m * ldc && cols <= ldc,
        "head matmul: block of the wrong size"
    );
    let a0 = rows.start * va.rs + ks.start * va.cs;
    let b0 = ks.start * vb.rs;
    // SAFETY: dst is `c`, m rows of stride ldc by `cols` columns, inside `c`, and the ranges inside the views (asserted above);
    // lhs starts at a0 and reads (rows, ks) of a through its strides, rhs starts at b0 and reads
    // (ks, ..cols) of b, all inside the head's slices because the ranges lie within the views'
    // dimensions (checked against the tensors' dims in `typed`). dst aliases neither. With
    // read_dst false, dst := 1 * lhs rhs.
    unsafe {
        gemm::gemm(
            m,
            cols,
            k,
            c.as_mut_ptr().cast::<T>(),
            1,
            ldc as isize,
            false,
            a.as_ptr().add(a0),
            va.cs as isize,
            va.rs as isize,
            b.as_ptr().add(b0),
            vb.cs as isize,
            vb.rs as isize,
            T::ZERO,
            T::ONE,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::float::max_abs_diff as max_diff;

    /// `[n, t, t]` random, lower triangular (zero above the diagonal), as the softmax leaves
    /// probabilities and their gradients.
    fn lower(n: usize, t: usize, dtype: DType) -> Tensor {
        let x = Tensor::randn(0f64, 1.0, (n, t, t), &Device::Cpu).unwrap();
        let mask: Vec<f64> = (0..t * t)
            .map(|e| if e % t <= e / t { 1.0 } else { 0.0 })
            .collect();
        let mask = Tensor::from_vec(mask, (1, t, t), &Device::Cpu).unwrap();
        x.broadcast_mul(&mask).unwrap().to_dtype(dtype).unwrap()
    }

    fn randn(n: usize, r: usize, c: usize, dtype: DType) -> Tensor {
        Tensor::randn(0f64, 1.0, (n, r, c), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    /// The reference: candle's batched matmul in f64 on the transposes asked for.
    fn reference(a: &Tensor, ta: bool, b: &Tensor, tb: bool) -> Tensor {
        let op = |x: &Tensor, t: bool| {
            let x = x.to_dtype(DType::F64).unwrap();
            if t {
                x.t().unwrap().contiguous().unwrap()
            } else {
                x
            }
        };
        op(a, ta).matmul(&op(b, tb)).unwrap()
    }

    fn product(a: &Tensor, ta: bool, b: &Tensor, tb: bool, causal: Causal) -> Tensor {
        head_matmul(
            Operand {
                tensor: a,
                transposed: ta,
            },
            Operand {
                tensor: b,
                transposed: tb,
            },
            causal,
        )
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
    }

    /// Every attention product (the full reference is f64), on lengths below, at and across the row block (and a ragged
    /// last block), in both dtypes, equals the full f64 product where the mask keeps it.
    #[test]
    fn each_causal_form_equals_the_full_product() {
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-4)] {
            for (n, t, d) in [(1, 1, 2), (3, 5, 4), (2, 64, 8), (2, 130, 16), (1, 200, 3)] {
                let (q, k) = (randn(n, t, d, dtype), randn(n, t, d, dtype));
                let p = lower(n, t, dtype);
                // q kᵀ: the lower triangle, zeros above.
                let want = reference(&q, false, &k, true);
                let got = product(&q, false, &k, true, Causal::LowerResult);
                let keep = lower(1, t, DType::F64).ne(0.0).unwrap();
                let want_lower = keep
                    .broadcast_as(want.shape())
                    .unwrap()
                    .where_cond(&want, &want.zeros_like().unwrap())
                    .unwrap();
                let diff = max_diff(&got, &want_lower);
                assert!(diff < tol, "{dtype:?} {n}x{t}x{d} q kᵀ: {diff}");
                // P v, Pᵀ v, and the full product with both operands transposed.
                for (ta, causal) in [(false, Causal::LowerLeft), (true, Causal::UpperLeft)] {
                    let diff = max_diff(
                        &product(&p, ta, &k, false, causal),
                        &reference(&p, ta, &k, false),
                    );
                    assert!(diff < tol, "{dtype:?} {n}x{t}x{d} {causal:?}: {diff}");
                }
            }
        }
    }

    /// The fused softmax blocks equal the unfused ops (the product, then the causal softmax
    /// or its backward over whole tensors), across the block boundary and a ragged last block.
    #[test]
    fn softmax_blocks_equal_the_separate_ops() {
        use crate::ops::causal_softmax::{causal_softmax, causal_softmax_backward};
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
            for (n, t, d) in [(1, 1, 2), (2, 64, 8), (3, 150, 16)] {
                let (q, k) = (randn(n, t, d, dtype), randn(n, t, d, dtype));
                let scale = 1.0 / (d as f64).sqrt();
                let scores = product(&q, false, &k, true, Causal::LowerResult);
                let want = causal_softmax(&scores, scale).unwrap();
                let got = causal_probs(&q, &k, scale).unwrap();
                let diff = max_diff(&got.to_dtype(DType::F64).unwrap(), &want);
                assert!(diff < tol, "{dtype:?} {n}x{t}x{d} probabilities: {diff}");
                let (dout, v) = (randn(n, t, d, dtype), randn(n, t, d, dtype));
                let dprobs = product(&dout, false, &v, true, Causal::LowerResult);
                let want =
                    causal_softmax_backward(&got.to_dtype(DType::F64).unwrap(), &dprobs, scale)
                        .unwrap();
                let got = causal_score_grads(&dout, &v, &got, scale).unwrap();
                let diff = max_diff(&got.to_dtype(DType::F64).unwrap(), &want);
                assert!(diff < tol, "{dtype:?} {n}x{t}x{d} score gradients: {diff}");
            }
        }
        // Probabilities of the wrong shape or dtype are errors, not a read out of bounds.
        let (q, p) = (randn(2, 5, 4, DType::F32), randn(2, 5, 4, DType::F32));
        assert!(causal_score_grads(&q, &q, &p, 1.0).is_err());
        let p64 = randn(2, 5, 5, DType::F64);
        assert!(causal_score_grads(&q, &q, &p64, 1.0).is_err());
    }

    #[test]
    fn shapes_that_do_not_multiply_are_errors() {
        let (a, b) = (randn(2, 4, 4, DType::F32), randn(2, 3, 4, DType::F32));
        let op = |tensor, transposed| Operand { tensor, transposed };
        assert!(head_matmul(op(&a, false), op(&b, false), Causal::LowerLeft).is_err());
        let c = randn(3, 4, 4, DType::F32);
        assert!(head_matmul(op(&a, false), op(&c, false), Causal::LowerLeft).is_err());
        // A causal form of a non-square product.
        let d = randn(2, 4, 5, DType::F32);
        assert!(head_matmul(op(&a, false), op(&d, false), Causal::LowerResult).is_err());
        let e = randn(2, 3, 4, DType::F32);
        assert!(head_matmul(op(&e, false), op(&d, false), Causal::LowerLeft).is_err());
        let mixed = randn(2, 4, 4, DType::F64);
        assert!(head_matmul(op(&a, false), op(&mixed, false), Causal::LowerLeft).is_err());
        assert!(head_matmul(op(&a, false), op(&d, false), Causal::LowerLeft).is_ok());
        assert!(head_matmul(op(&b, true), op(&b, false), Causal::LowerResult).is_ok());
    }
}
