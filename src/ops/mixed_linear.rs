//! A full-rank projection in mixed precision as one autograd node: `y = x W^T` with the matmul
//! in a compute dtype (bf16) on casts of the f32 `x [n, in]` and master weight `W [out, in]`, and
//! `y [n, out]` in f32. In bf16 the products accumulate in f32 and stay there
//! ([`super::widening_matmul`]), for `y` and for both gradients.
//!
//! Composed (cast x, cast W, transpose, matmul, cast y) the graph keeps the bf16 copies of the
//! activation and of the weight alive until the backward, and each of the five nodes accumulates
//! its gradient into a fresh zero tensor. As one node it keeps only its f32 inputs, which the
//! model holds anyway, and its backward is the two products `dx = dy W`, `dW = dy^T x` in the
//! compute dtype, cast back to f32. Built from candle's storage operations, so it runs on every
//! device.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

struct MixedLinear {
    compute: DType,
    /// The result's dtype: the master weight's.
    out: DType,
}

/// `x W^T` in `out`, with the product in `compute` on `x` and `w` cast to it (either may be
/// in it already); in bf16 through `widen`, the device's widening matmul.
fn forward<S: BackendStorage>(
    (x, xl): (&S, &Layout),
    (w, wl): (&S, &Layout),
    (compute, out_dtype): (DType, DType),
    widen: impl Fn(&S, &Layout, &S, &Layout) -> candle_core::Result<S>,
) -> candle_core::Result<(S, Shape)> {
    let (n, k) = xl.shape().dims2()?;
    let (out, w_in) = wl.shape().dims2()?;
    if w_in != k {
        candle_core::bail!("mixed linear: x [{n}, {k}] and W [{out}, {w_in}] do not fit");
    }
    let (mut cast, mut w_cast) = (None, None);
    let (xc, xcl) = in_compute(x, xl, compute, &mut cast)?;
    let (wc, wcl) = in_compute(w, wl, compute, &mut w_cast)?;
    // [n, in] x [in, out]: W [out, in] read transposed.
    let wt = wcl.transpose(0, 1)?;
    let (y, y_dtype) = if compute == DType::BF16 {
        (widen(xc, &xcl, wc, &wt)?, DType::F32)
    } else {
        (xc.matmul(wc, (1, n, out, k), &xcl, &wt)?, compute)
    };
    let y = if y_dtype == out_dtype {
        y
    } else {
        y.to_dtype(&Layout::contiguous((n, out)), out_dtype)?
    };
    Ok((y, Shape::from((n, out))))
}

/// `x` in `compute`, with the layout to read it by: `x` itself when it already is (a layer node
/// casts an input that several projections share once, and keeps a weight's cast for the
/// step), else its cast, kept in `slot`.
pub(crate) fn in_compute<'a, S: BackendStorage>(
    x: &'a S,
    xl: &Layout,
    compute: DType,
    slot: &'a mut Option<S>,
) -> candle_core::Result<(&'a S, Layout)> {
    if x.dtype() == compute {
        return Ok((x, xl.clone()));
    }
    let cast = slot.insert(x.to_dtype(xl, compute)?);
    Ok((cast, Layout::contiguous(xl.shape().clone())))
}

impl CustomOp2 for MixedLinear {
    fn name(&self) -> &'static str {
        "mixed-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let widen = super::widening_matmul::cpu;
        forward((x, xl), (w, wl), (self.compute, self.out), widen)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let widen = super::widening_matmul::cuda;
        forward((x, xl), (w, wl), (self.compute, self.out), widen)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = mixed_linear_backward(x, (w, None), grad_y, self.compute)?;
        Ok((Some(dx.to_dtype(x.dtype())?), Some(dw)))
    }
}

/// The backward of [`mixed_linear`] (or [`mixed_linear_cast`], passing its `w_compute`):
/// `(dx, dweight)` from the inputs and the output's gradient, with both products in `compute`,
/// `dx` in the output gradient's dtype and `dweight` in `w`'s, for code that chains backward
/// passes by hand.
pub(crate) fn mixed_linear_backward(
    x: &Tensor,
    (w, w_compute): (&Tensor, Option<&Tensor>),
    grad_y: &Tensor,
    compute: DType,
) -> candle_core::Result<(Tensor, Tensor)> {
    let wc = match w_compute {
        Some(wc) => wc.detach(),
        None => w.detach().to_dtype(compute)?,
    };
    let (xc, gc) = (x.detach().to_dtype(compute)?, grad_y.to_dtype(compute)?);
    let product = |a: &Tensor, b: &Tensor| match compute {
        DType::BF16 => super::widening_matmul(a, b),
        _ => a.matmul(b),
    };
    // [n, out] x [out, in] and [out, n] x [n, in]
    let dx = product(&gc, &wc)?.to_dtype(grad_y.dtype())?;
    let dw = product(&gc.t()?, &xc)?.to_dtype(w.dtype())?;
    Ok((dx, dw))
}

/// `x [n, in] -> x W^T [n, out]` with the product in `compute` and the result in `weight`'s
/// dtype; gradients flow to `weight` in its dtype and to `x` in the output's. `x` may already be
/// in `compute` (a cast that several projections share).
pub fn mixed_linear(x: &Tensor, weight: &Tensor, compute: DType) -> candle_core::Result<Tensor> {
    let out = weight.dtype();
    x.apply_op2(weight, MixedLinear { compute, out })
}

/// [`mixed_linear`] with the weight's cast to `compute` made by the caller, who keeps it for the
/// backward ([`mixed_linear_backward`]) of the same step: a layer node, outside the graph. The
/// result is in `weight`'s dtype.
pub(crate) fn mixed_linear_cast(
    x: &Tensor,
    (weight, weight_compute): (&Tensor, &Tensor),
    compute: DType,
) -> candle_core::Result<Tensor> {
    if weight_compute.dtype() != compute || weight_compute.shape() != weight.shape() {
        candle_core::bail!(
            "mixed linear: the weight's cast is {:?} {:?}, the weight {:?} computed in {compute:?}",
            weight_compute.dtype(),
            weight_compute.dims(),
            weight.dims()
        );
    }
    let out = weight.dtype();
    x.apply_op2(&weight_compute.detach(), MixedLinear { compute, out })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The product and both gradients are the exact products of the bf16 casts, summed in f32:
    /// the forward equals the f32 matmul of the widened casts bit for bit, and the gradients
    /// equal the f64 products of the casts of the output's gradient and the other operand to
    /// f32 rounding (a gradient rounded to bf16 on the way, as a composed cast would round it,
    /// is 100 times further off).
    #[test]
    fn values_and_gradients_are_f32_sums_of_bf16_products() {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1.0, (9, 24), &dev).unwrap();
        let w = Var::randn(0f32, 0.2, (13, 24), &dev).unwrap();
        let fused = mixed_linear(&x, &w, DType::BF16).unwrap();
        let widened = |t: &Tensor| {
            t.to_dtype(DType::BF16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
        };
        let composed = widened(&x).matmul(&widened(&w).t().unwrap()).unwrap();
        assert_eq!(fused.dtype(), DType::F32);
        let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(values(&fused), values(&composed));
        let probe = Tensor::randn(0f32, 1.0, (9, 13), &dev).unwrap();
        let grads = (&fused * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let f64_cast = |t: &Tensor| widened(t).to_dtype(DType::F64).unwrap();
        let want_dx = f64_cast(&probe).matmul(&f64_cast(&w)).unwrap();
        let want_dw = f64_cast(&probe).t().unwrap().matmul(&f64_cast(&x)).unwrap();
        for (v, want, what) in [(&x, want_dx, "dx"), (&w, want_dw, "dw")] {
            let got = grads.get(v).unwrap();
            assert_eq!(got.dtype(), DType::F32, "{what}");
            let got = got.to_dtype(DType::F64).unwrap();
            let scale = crate::ops::float::max_abs_diff(&want, &want.zeros_like().unwrap());
            let d = crate::ops::float::max_abs_diff(&got, &want);
            assert!(d <= 1e-6 * scale, "{what}: off by {d} (largest {scale})");
        }
        // An input cast beforehand (shared among projections) gives the same bits, and the
        // result and `dx` still in f32.
        let xb = x.to_dtype(DType::BF16).unwrap();
        let pre = mixed_linear(&xb, &w, DType::BF16).unwrap();
        assert_eq!(pre.dtype(), DType::F32);
        assert_eq!(values(&pre), values(&fused));
        let dy = Tensor::randn(0f32, 1.0, (9, 13), &dev).unwrap();
        let (own, shared) = (
            mixed_linear_backward(&x, (&w, None), &dy, DType::BF16).unwrap(),
            mixed_linear_backward(&xb, (&w, None), &dy, DType::BF16).unwrap(),
        );
        assert_eq!(shared.0.dtype(), DType::F32);
        assert_eq!(values(&own.0), values(&shared.0));
        assert_eq!(values(&own.1), values(&shared.1));
        // The weight cast beforehand too (a layer node keeps it for the step): the same bits,
        // the result and `dw` in the master's dtype; a cast that is not the weight's is refused.
        let wb = w.to_dtype(DType::BF16).unwrap();
        let kept = mixed_linear_cast(&xb, (&w, &wb), DType::BF16).unwrap();
        assert_eq!(kept.dtype(), DType::F32);
        assert_eq!(values(&kept), values(&fused));
        let kept_back = mixed_linear_backward(&xb, (&w, Some(&wb)), &dy, DType::BF16).unwrap();
        assert_eq!(kept_back.1.dtype(), DType::F32);
        assert_eq!(values(&own.0), values(&kept_back.0));
        assert_eq!(values(&own.1), values(&kept_back.1));
        assert!(mixed_linear_cast(&xb, (&w, &w), DType::BF16).is_err());
        let bad = Tensor::zeros((13, 23), DType::F32, &dev).unwrap();
        assert!(mixed_linear(&x, &bad, DType::BF16).is_err());
    }
}
