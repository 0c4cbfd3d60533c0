//! `y = x W^T` for a frozen weight W whose gradient must never be computed.
//!
//! candle's matmul backward always computes the gradient of both operands, even when one of them
//! is a plain tensor, so a LoRA layer written with an ordinary matmul pays for the frozen weight's
//! gradient (`x^T dy`, as many FLOPs as the forward) and throws it away. This op is a unary op in
//! `x` that holds W on the side: its backward returns `dy W` only.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Storage, Tensor};

struct FrozenMatmul {
    /// `[out, in]`, never part of the autograd graph.
    weight: Tensor,
}

impl FrozenMatmul {
    fn dims(&self, layout: &Layout) -> candle_core::Result<(usize, usize, usize)> {
        let (n, k) = layout.shape().dims2()?;
        let (out, in_dim) = self.weight.dims2()?;
        if in_dim != k {
            candle_core::bail!(
                "frozen matmul: input has {k} features, weight is [{out}, {in_dim}]"
            );
        }
        Ok((n, k, out))
    }
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, k, out) = self.dims(layout)?;
        // W^T is a strided view of W; gemm reads it without a copy.
        let wt = self.weight.t()?;
        let (storage, wl) = wt.storage_and_layout();
        let Storage::Cpu(w) = &*storage else {
            candle_core::bail!("frozen matmul: weight is not on the CPU");
        };
        let y = x.matmul(w, (1, n, out, k), layout, wl)?;
        Ok((y, Shape::from((n, out))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (n, k, out) = self.dims(layout)?;
        let wt = self.weight.t()?;
        let (storage, wl) = wt.storage_and_layout();
        let Storage::Cuda(w) = &*storage else {
            candle_core::bail!("frozen matmul: weight is not on the GPU");
        };
        let y = x.matmul(w, (1, n, out, k), layout, wl)?;
        Ok((y, Shape::from((n, out))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        // dL/dx = dL/dy W: [n, out] x [out, in] -> [n, in]. No dL/dW.
        Ok(Some(grad_y.matmul(&self.weight)?))
    }
}

/// `x [n, in] -> x W^T [n, out]` where `weight [out, in]` receives no gradient and costs no
/// gradient computation. `weight` is detached, so passing a `Var`'s tensor is fine.
pub fn frozen_matmul(x: &Tensor, weight: &Tensor) -> candle_core::Result<Tensor> {
    let x = x.contiguous()?;
    x.apply_op1(FrozenMatmul {
        weight: weight.detach(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    #[test]
    fn forward_and_input_gradient_equal_plain_matmul_without_weight_gradient() {
        let dev = Device::Cpu;
        let x = Var::randn(0f64, 1.0, (5, 7), &dev).unwrap();
        let w = Var::randn(0f64, 1.0, (3, 7), &dev).unwrap();
        let y = frozen_matmul(x.as_tensor(), w.as_tensor()).unwrap();
        let reference = x.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap();
        let diff = (&y - &reference).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f64>().unwrap() < 1e-12);

        let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let ref_grads = reference
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gx = grads.get(x.as_tensor()).unwrap();
        let rx = ref_grads.get(x.as_tensor()).unwrap();
        let diff = (gx - rx).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f64>().unwrap() < 1e-10);
        assert!(
            grads.get(w.as_tensor()).is_none(),
            "frozen weight got a gradient"
        );
        assert!(ref_grads.get(w.as_tensor()).is_some());
        assert_eq!(y.dtype(), DType::F64);
    }

    #[test]
    fn mismatched_width_is_an_error_not_a_panic() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 4), DType::F32, &dev).unwrap();
        let w = Tensor::zeros((3, 5), DType::F32, &dev).unwrap();
        let err = frozen_matmul(&x, &w).unwrap_err().to_string();
        assert!(err.contains("4 features"), "{err}");
    }
}
