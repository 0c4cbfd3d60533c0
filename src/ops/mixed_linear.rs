//! A full-rank projection in mixed precision as one autograd node: `y = x W^T` with the matmul
//! in a compute dtype (bf16) on casts of the f32 `x [n, in]` and master weight `W [out, in]`, and
//! `y [n, out]` back in f32.
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
/// in it already).
fn forward<S: BackendStorage>(
    x: &S,
    xl: &Layout,
    w: &S,
    wl: &Layout,
    (compute, out_dtype): (DType, DType),
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
    let y = xc.matmul(wc, (1, n, out, k), &xcl, &wcl.transpose(0, 1)?)?;
    let y = y.to_dtype(&Layout::contiguous((n, out)), out_dtype)?;
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
        forward(x, xl, w, wl, (self.compute, self.out))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        forward(x, xl, w, wl, (self.compute, self.out))
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
    // [n, out] x [out, in] and [out, n] x [n, in]
    let dx = gc.matmul(&wc)?.to_dtype(grad_y.dtype())?;
    let dw = gc.t()?.matmul(&xc)?.to_dtype(w.dtype())?;
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

    #[test]
    fn values_and_gradients_equal_the_composed_casts() {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1.0, (9, 24), &dev).unwrap();
        let w = Var::randn(0f32, 0.2, (13, 24), &dev).unwrap();
        let fused = mixed_linear(&x, &w, DType::BF16).unwrap();
        let composed = x
            .to_dtype(DType::BF16)
            .unwrap()
            .matmul(&w.to_dtype(DType::BF16).unwrap().t().unwrap())
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        assert_eq!(fused.dtype(), DType::F32);
        let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(values(&fused), values(&composed));
        let (gf, gc) = crate::ops::float::probed_grads(&fused, &composed);
        for (v, what) in [(&x, "dx"), (&w, "dw")] {
            let (a, b) = (gf.get(v).unwrap(), gc.get(v).unwrap());
            assert_eq!(a.dtype(), DType::F32, "{what}");
            assert_eq!(values(a), values(b), "{what}");
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
