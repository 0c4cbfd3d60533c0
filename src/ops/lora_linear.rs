//! The adapted projection as one autograd node: `y = x W^T + s (x A^T) B^T` with W frozen.
//!
//! Composed from candle ops, this is seven graph nodes (frozen matmul, two transposes, two
//! matmuls, a scale, an add), and candle's backward allocates a zero tensor and adds into it for
//! every node's every input: a dozen passes over `[n, out]`-sized buffers per projection, which
//! cost more than the low-rank matmuls themselves. As one node the forward is three matmuls and one
//! fused scale-add, and the backward is `dx = dy W + (s dy B) A`, `dA = (s dy B)^T x`,
//! `dB = s dy^T (x A^T)`: one full-size matmul (no `dW`) and small rank-r ones.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Storage, Tensor};

struct LoraLinear {
    /// `[out, in]`, frozen, never part of the autograd graph.
    weight: Tensor,
    scale: f64,
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        a: &CpuStorage,
        al: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, k) = xl.shape().dims2()?;
        let (out, w_in) = self.weight.dims2()?;
        let (r, a_in) = al.shape().dims2()?;
        let (b_out, b_r) = bl.shape().dims2()?;
        if w_in != k || a_in != k || b_out != out || b_r != r {
            candle_core::bail!(
                "lora linear: x [{n}, {k}], W [{out}, {w_in}], A [{r}, {a_in}], B [{b_out}, {b_r}] do not fit"
            );
        }
        let wt = self.weight.t()?;
        let (w_storage, wl) = wt.storage_and_layout();
        let Storage::Cpu(w) = &*w_storage else {
            candle_core::bail!("lora linear: weight is not on the CPU");
        };
        // [n, in] x [in, out]
        let base = x.matmul(w, (1, n, out, k), xl, wl)?;
        // [n, in] x [in, r] -> [n, r] x [r, out]
        let low = x.matmul(a, (1, n, r, k), xl, &al.transpose(0, 1)?)?;
        let low_layout = Layout::contiguous((n, r));
        let up = low.matmul(b, (1, n, out, r), &low_layout, &bl.transpose(0, 1)?)?;
        let y = match (base, up) {
            (CpuStorage::F32(mut y), CpuStorage::F32(u)) => {
                let s = self.scale as f32;
                y.iter_mut().zip(&u).for_each(|(y, u)| *y += s * u);
                CpuStorage::F32(y)
            }
            (CpuStorage::F64(mut y), CpuStorage::F64(u)) => {
                y.iter_mut().zip(&u).for_each(|(y, u)| *y += self.scale * u);
                CpuStorage::F64(y)
            }
            (y, _) => candle_core::bail!("lora linear: unsupported dtype {:?}", y.dtype()),
        };
        Ok((y, Shape::from((n, out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let s = self.scale;
        // Detached so the gradients computed here are plain tensors: results that referenced the
        // (tracked) inputs would keep their whole forward graph alive inside the gradient store.
        let (x, a, b) = (&x.detach(), &a.detach(), &b.detach());
        // [n, in] x [in, r]: recomputed, it is rank-r cheap.
        let low = x.matmul(&a.t()?)?;
        // [n, out] x [out, r]
        let grad_low = grad_y.matmul(b)?.affine(s, 0.0)?;
        // [out, n] x [n, r]
        let grad_b = grad_y.t()?.matmul(&low)?.affine(s, 0.0)?;
        // [r, n] x [n, in]
        let grad_a = grad_low.t()?.matmul(x)?;
        // [n, out] x [out, in] + [n, r] x [r, in]
        let grad_x = (grad_y.matmul(&self.weight)? + grad_low.matmul(a)?)?;
        Ok((Some(grad_x), Some(grad_a), Some(grad_b)))
    }
}

/// `x [n, in] -> x W^T + scale * (x A^T) B^T [n, out]` with `weight [out, in]` frozen,
/// `a [r, in]`, `b [out, r]`. CPU only; other devices use the composed form.
pub fn lora_linear(
    x: &Tensor,
    weight: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let x = x.contiguous()?;
    x.apply_op3(
        a,
        b,
        LoraLinear {
            weight: weight.detach(),
            scale,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::float::max_abs_diff as max_diff;
    use candle_core::{Device, Var};

    #[test]
    fn values_and_gradients_equal_the_composed_ops() {
        let dev = Device::Cpu;
        let (n, k, out, r) = (7, 5, 6, 3);
        let x = Var::randn(0f64, 1.0, (n, k), &dev).unwrap();
        let w = Var::randn(0f64, 1.0, (out, k), &dev).unwrap();
        let a = Var::randn(0f64, 1.0, (r, k), &dev).unwrap();
        let b = Var::randn(0f64, 1.0, (out, r), &dev).unwrap();
        let s = 0.75;
        let fused = lora_linear(&x, &w, &a, &b, s).unwrap();
        let composed = (x.matmul(&w.t().unwrap()).unwrap()
            + x.matmul(&a.t().unwrap())
                .unwrap()
                .matmul(&b.t().unwrap())
                .unwrap()
                .affine(s, 0.0)
                .unwrap())
        .unwrap();
        assert!(max_diff(&fused, &composed) < 1e-12);
        let (gf, gc) = crate::ops::float::probed_grads(&fused, &composed);
        for v in [&x, &a, &b] {
            let d = max_diff(gf.get(v).unwrap(), gc.get(v).unwrap());
            assert!(d < 1e-10, "gradient differs by {d}");
        }
        assert!(gf.get(&w).is_none(), "frozen weight got a gradient");
    }

    #[test]
    fn f32_matches_and_bad_shapes_are_errors() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (4, 8), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (5, 8), &dev).unwrap();
        let a = Tensor::randn(0f32, 1.0, (2, 8), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, (5, 2), &dev).unwrap();
        let fused = lora_linear(&x, &w, &a, &b, 2.0).unwrap();
        let composed = (x.matmul(&w.t().unwrap()).unwrap()
            + x.matmul(&a.t().unwrap())
                .unwrap()
                .matmul(&b.t().unwrap())
                .unwrap()
                .affine(2.0, 0.0)
                .unwrap())
        .unwrap();
        assert!(
            max_diff(
                &fused.to_dtype(candle_core::DType::F64).unwrap(),
                &composed.to_dtype(candle_core::DType::F64).unwrap()
            ) < 1e-4
        );
        let bad_b = Tensor::zeros((4, 2), candle_core::DType::F32, &dev).unwrap();
        let err = lora_linear(&x, &w, &a, &bad_b, 1.0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("do not fit"), "{err}");
    }
}
