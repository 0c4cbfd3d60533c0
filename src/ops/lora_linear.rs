//! The adapted projection as one autograd node: `y = x W^T + s (x A^T) B^T` with W frozen.
//!
//! Composed from candle ops, this is seven graph nodes (frozen matmul, two transposes, two
//! matmuls, a scale, an add), and candle's backward allocates a zero tensor and adds into it for
//! every node's every input: a dozen passes over `[n, out]`-sized buffers per projection, which
//! cost more than the low-rank matmuls themselves. As one node the forward is three matmuls and one
//! fused scale-add, and the backward is `dx = dy W + (s dy B) A`, `dA = (s dy B)^T x`,
//! `dB = s dy^T (x A^T)`: one full-size matmul (no `dW`) and small rank-r ones.
//!
//! With a compute dtype (bf16 mixed precision) the op casts its f32 inputs for the
//! matmuls inside the node, so the graph keeps none of the bf16 copies or `[n, out]`
//! intermediates the composed form would; the result and the gradients come back in f32. The
//! products whose results are kept in f32 (the frozen product, the adapter's up-projection, and
//! every gradient) accumulate in f32 and stay there ([`super::widening_matmul`]); only the
//! rank-r intermediates that feed another product are rounded to bf16. An input already in the
//! compute dtype (a layer node casts the input q, k and v share once) is read as it is.
//!
//! When a call has enough rows (a training batch), the op first forms the effective weight
//! `W' = W + s B A` ([`StepWeight::Effective`], in the parameters' dtype, then cast to the compute
//! dtype) and runs `y = x W'^T` and `dx = dy W'`: one product each way instead of three and two.
//! That skips `x A^T`, its up-projection and `(s dy B) A`, `rows r (2 in + out)` multiply-adds,
//! for the `r in out` of `B A`. It is the same function: the gradients of A and B are unchanged,
//! and the forward differs only in rounding (in bf16 mixed precision the adapters' share is
//! rounded into W' as full-rank training rounds its updates into the cast of W).
//! A trainer's `effective_weights` choice ([`crate::engine::Engine`]) turns it off; the weight
//! itself is built in [`super::effective_weight`].

use super::add_in_place::add_to_sum;
pub(crate) use super::effective_weight::StepWeight;
use super::mixed_linear::in_compute;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Storage, Tensor};

struct LoraLinear {
    /// `[out, in]`, frozen, never part of the autograd graph.
    weight: Tensor,
    /// What the products read in place of `weight`.
    step: StepWeight,
    scale: f64,
    /// Matmul dtype when it differs from the parameters' (bf16 mixed precision).
    compute: Option<DType>,
}

impl LoraLinear {
    /// `(n, in, out, r)` once the shapes are checked to fit together.
    fn dims(
        &self,
        xl: &Layout,
        al: &Layout,
        bl: &Layout,
    ) -> candle_core::Result<(usize, usize, usize, usize)> {
        let (n, k) = xl.shape().dims2()?;
        let (out, w_in) = self.weight.dims2()?;
        let (r, a_in) = al.shape().dims2()?;
        let (b_out, b_r) = bl.shape().dims2()?;
        if w_in != k || a_in != k || b_out != out || b_r != r {
            candle_core::bail!(
                "lora linear: x [{n}, {k}], W [{out}, {w_in}], A [{r}, {a_in}], B [{b_out}, {b_r}] do not fit"
            );
        }
        Ok((n, k, out, r))
    }

    /// The CPU forward with the products in `compute` (bf16) on casts of the f32 inputs, as the
    /// CUDA kernel does: `base` and `up` in f32 from widening products, the rank-r `low` rounded
    /// to bf16, then `y = base + s * up` in f32. It lets the CPU run, and the tests check, the
    /// mixed-precision paths the GPU takes.
    fn cpu_fwd_mixed(
        &self,
        (n, k, out, r): (usize, usize, usize, usize),
        (x, xl): (&CpuStorage, &Layout),
        (w, wl): (&CpuStorage, &Layout),
        (a, al): (&CpuStorage, &Layout),
        (b, bl): (&CpuStorage, &Layout),
        compute: DType,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let fits = |t: DType| t == DType::F32 || t == compute;
        if compute != DType::BF16 || !fits(x.dtype()) || !fits(w.dtype()) {
            candle_core::bail!(
                "lora linear: mixed precision takes f32 parameters, f32 or bf16 inputs and bf16 products, got {:?}, {:?} and {compute:?}",
                w.dtype(),
                x.dtype()
            );
        }
        let (mut cast, mut w_cast) = (None, None);
        let (xb, xbl) = in_compute(x, xl, compute, &mut cast)?;
        let (wb, wbl) = in_compute(w, wl, compute, &mut w_cast)?;
        // W [out, in] read transposed; the casts of A and B are contiguous [r, in] and [out, r].
        let wt = wbl.transpose(0, 1)?;
        // [n, in] x [in, out]; [n, in] x [in, r] -> [n, r] x [r, out]
        let base = super::widening_matmul::cpu(xb, &xbl, wb, &wt)?;
        if self.effective() {
            return Ok((base, Shape::from((n, out))));
        }
        let (ab, bb) = (a.to_dtype(al, compute)?, b.to_dtype(bl, compute)?);
        let at = Layout::contiguous((r, k)).transpose(0, 1)?;
        let bt = Layout::contiguous((out, r)).transpose(0, 1)?;
        let low = xb.matmul(&ab, (1, n, r, k), &xbl, &at)?;
        let CpuStorage::F32(mut y) = base else {
            candle_core::bail!("lora linear: the widening product came back in another dtype");
        };
        let low = (&low, &Layout::contiguous((n, r)));
        let s = self.scale as f32;
        super::widening_matmul::cpu_accumulate(low, (&bb, &bt), &mut y, s)?;
        Ok((CpuStorage::F32(y), Shape::from((n, out))))
    }
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
        let (n, k, out, r) = self.dims(xl, al, bl)?;
        let (w_storage, w_layout) = self.compute_weight().storage_and_layout();
        let Storage::Cpu(w) = &*w_storage else {
            candle_core::bail!("lora linear: weight is not on the CPU");
        };
        if let Some(compute) = self.compute {
            let dims = (n, k, out, r);
            return self.cpu_fwd_mixed(dims, (x, xl), (w, w_layout), (a, al), (b, bl), compute);
        }
        let wl = &w_layout.transpose(0, 1)?;
        // [n, in] x [in, out]
        let base = super::dense_product::cpu_matmul((x, xl), (w, wl), (n, k, out))?;
        if self.effective() {
            return Ok((base, Shape::from((n, out))));
        }
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        a: &candle_core::CudaStorage,
        al: &Layout,
        b: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda;
        let (n, k, out, r) = self.dims(xl, al, bl)?;
        // f32, or already in the compute dtype (a cast that several projections share).
        if x.dtype() != DType::F32 && Some(x.dtype()) != self.compute {
            candle_core::bail!(
                "lora linear: the CUDA kernel takes f32, got {:?}",
                x.dtype()
            );
        }
        let (w_storage, w_layout) = self.compute_weight().storage_and_layout();
        let Storage::Cuda(w) = &*w_storage else {
            candle_core::bail!("lora linear: weight is not on the GPU");
        };
        let (len, s) = ((n * out) as u64, self.scale as f32);
        let cfg = cuda::elementwise(n * out);
        // Transposed views of the contiguous casts of [r, in] and [out, r].
        let at = Layout::contiguous((r, k)).transpose(0, 1)?;
        let bt = Layout::contiguous((out, r)).transpose(0, 1)?;
        let low_l = Layout::contiguous((n, r));
        match self.compute {
            None => {
                // Three cuBLAS products as on the CPU, then one fused `base += s * up` pass.
                let base = x.matmul(w, (1, n, out, k), xl, &w_layout.transpose(0, 1)?)?;
                if self.effective() {
                    return Ok((base, Shape::from((n, out))));
                }
                let low = x.matmul(a, (1, n, r, k), xl, &al.transpose(0, 1)?)?;
                let up = low.matmul(b, (1, n, out, r), &low_l, &bl.transpose(0, 1)?)?;
                {
                    let (y, u) = (base.as_cuda_slice::<f32>()?, up.as_cuda_slice::<f32>()?);
                    cuda::launch!(x.device(), "add_scaled", cfg, y, u, &s, &len);
                }
                Ok((base, Shape::from((n, out))))
            }
            Some(DType::BF16) => {
                let (mut cast, mut w_cast) = (None, None);
                let (xb, xbl) = in_compute(x, xl, DType::BF16, &mut cast)?;
                let (wb, wbl) = in_compute(w, w_layout, DType::BF16, &mut w_cast)?;
                // [n, in] x [in, out]; [n, in] x [in, r] -> [n, r] x [r, out]: the frozen
                // product straight to f32, and cuBLAS adds `s up` into it where it lies.
                use super::widening_matmul as wm;
                let mut base = wm::cuda(xb, &xbl, wb, &wbl.transpose(0, 1)?)?;
                if self.effective() {
                    return Ok((base, Shape::from((n, out))));
                }
                let ab = a.to_dtype(al, DType::BF16)?;
                let bb = b.to_dtype(bl, DType::BF16)?;
                let low = xb.matmul(&ab, (1, n, r, k), &xbl, &at)?;
                {
                    let mut y = base.as_cuda_slice_mut::<f32>()?.slice_mut(..);
                    wm::cuda_into((&low, &low_l), (&bb, &bt), &mut y, (s, 1.0))?;
                }
                Ok((base, Shape::from((n, out))))
            }
            Some(other) => candle_core::bail!("lora linear: no CUDA kernel computes in {other:?}"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, da, db) = self.backward(x, a, b, grad_y, None)?;
        Ok((Some(dx.to_dtype(x.dtype())?), Some(da), Some(db)))
    }
}

impl LoraLinear {
    /// The weight the products read: `W`, its cast, or the effective weight.
    fn compute_weight(&self) -> &Tensor {
        match &self.step {
            StepWeight::Frozen => &self.weight,
            StepWeight::Cast(w) | StepWeight::Effective(w) => w,
        }
    }

    /// Whether the products read the effective weight `W + s B A`, which carries the adapter.
    fn effective(&self) -> bool {
        matches!(self.step, StepWeight::Effective(_))
    }

    /// `(dx, da, db)` from the inputs and the output's gradient; `dx` in the output gradient's
    /// dtype, `da` and `db` in the adapter's.
    /// `(dx, da, db)`; with `dx_sum`, `dx_sum + dx` in place of `dx` (added where `dx_sum`
    /// lies when the op can, so the caller must hold it alone).
    fn backward(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        grad_y: &Tensor,
        dx_sum: Option<Tensor>,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let s = self.scale;
        // Detached so the gradients computed here are plain tensors: results that referenced the
        // (tracked) inputs would keep their whole forward graph alive inside the gradient store.
        // In mixed precision every product runs in the compute dtype, as in the forward.
        let cast = |t: &Tensor| match self.compute {
            Some(dt) if dt != t.dtype() => t.detach().to_dtype(dt),
            _ => Ok(t.detach()),
        };
        let (xc, ac, bc) = (&cast(x)?, &cast(a)?, &cast(b)?);
        let (gy, w) = (&cast(grad_y)?, &cast(self.compute_weight())?);
        let back = |g: Tensor, like: &Tensor| {
            if g.dtype() == like.dtype() {
                Ok(g)
            } else {
                g.to_dtype(like.dtype())
            }
        };
        // The products kept as results: in bf16, widening to f32.
        let widening = self.compute == Some(DType::BF16);
        let kept = |l: &Tensor, r: &Tensor| {
            if widening {
                super::widening_matmul(l, r)
            } else {
                super::dense_product::matmul(l, r)
            }
        };
        // [n, in] x [in, r]: recomputed, it is rank-r cheap.
        let low = super::dense_product::matmul(xc, &ac.t()?)?;
        // [n, out] x [out, r]: the gradient of `low`, over s.
        let grad_low = super::dense_product::matmul(gy, bc)?;
        // [out, n] x [n, r]
        let grad_b = back(kept(&gy.t()?, &low)?, b)?.affine(s, 0.0)?;
        // [r, n] x [n, in]
        let grad_a = back(kept(&grad_low.t()?, xc)?, a)?.affine(s, 0.0)?;
        // [n, out] x [out, in] + [n, r] x [r, in]; in bf16 the second product is added where
        // the first lies. The effective weight carries the second term already.
        if self.effective() {
            // Full precision: the product is added straight into the sum.
            let grad_x = match dx_sum {
                Some(sum) if !widening && w.dtype() == sum.dtype() => {
                    super::dense_product::matmul_add(sum, gy, w)?
                }
                sum => add_to_sum(back(kept(gy, w)?, grad_y)?, sum)?,
            };
            return Ok((grad_x, grad_a, grad_b));
        }
        let grad_x = kept(gy, w)?;
        // The scale is applied in the parameters' dtype, to the small rank-r tensors: on a bf16
        // tensor candle's `affine` rounds the multiplier itself to bf16, which would make the
        // gradient that of `s' = bf16(s)` (1/3 becomes 0.3340, +0.2 %) while the forward
        // used `s`.
        let a_scaled = &cast(&a.detach().affine(s, 0.0)?)?;
        let grad_x = if widening {
            super::widening_matmul_add(&grad_x, &grad_low, a_scaled, 1.0)?;
            grad_x
        } else {
            (grad_x + grad_low.matmul(a_scaled)?)?
        };
        Ok((add_to_sum(back(grad_x, grad_y)?, dx_sum)?, grad_a, grad_b))
    }
}

/// `x [n, in] -> x W^T + scale * (x A^T) B^T [n, out]` with `weight [out, in]` frozen,
/// `a [r, in]`, `b [out, r]`: f32 or f64 on the CPU, f32 on CUDA ([`super::has_kernel`]).
/// `compute` (bf16, with f32 parameters) runs the matmuls in that dtype on casts of the inputs;
/// `x` may already be in `compute` (a cast that several projections share). The result is in
/// the parameters' dtype. With enough rows the products read the effective weight `W + s B A`
/// (see the module's documentation).
pub fn lora_linear(
    x: &Tensor,
    weight: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    compute: Option<DType>,
) -> candle_core::Result<Tensor> {
    let x = x.contiguous()?;
    let rows = x.dims().first().copied().unwrap_or(0);
    let step = StepWeight::choose(rows, (weight, a, b), scale, compute, false)?;
    x.apply_op3(a, b, LoraLinear::new(weight, step, scale, compute)?)
}

impl LoraLinear {
    /// The op for `weight` and what its products read (a cast must be in `compute`, the
    /// effective weight in `compute` or, without one, in the weight's dtype; both of the
    /// weight's shape).
    fn new(
        weight: &Tensor,
        step: StepWeight,
        scale: f64,
        compute: Option<DType>,
    ) -> candle_core::Result<Self> {
        let compute = compute.filter(|&dt| dt != weight.dtype());
        let (what, want) = match &step {
            StepWeight::Frozen => ("", None),
            StepWeight::Cast(w) => ("cast", Some((w, compute))),
            StepWeight::Effective(w) => (
                "effective weight",
                Some((w, Some(compute.unwrap_or(weight.dtype())))),
            ),
        };
        if let Some((w, dtype)) = want {
            if Some(w.dtype()) != dtype || w.shape() != weight.shape() {
                candle_core::bail!(
                    "lora linear: the weight's {what} is {:?} {:?}, the weight {:?} computed in {compute:?}",
                    w.dtype(),
                    w.dims(),
                    weight.dims()
                );
            }
        }
        let step = match step {
            StepWeight::Cast(w) => StepWeight::Cast(w.detach()),
            StepWeight::Effective(w) => StepWeight::Effective(w.detach()),
            frozen => frozen,
        };
        Ok(LoraLinear {
            weight: weight.detach(),
            step,
            scale,
            compute,
        })
    }
}

/// [`lora_linear`] on what the caller chose for the products to read ([`StepWeight::choose`]),
/// which it keeps for the backward ([`lora_linear_backward`]) of the same step: a layer node,
/// outside the graph.
pub(crate) fn lora_linear_step(
    x: &Tensor,
    (weight, step): (&Tensor, &StepWeight),
    (a, b): (&Tensor, &Tensor),
    scale: f64,
    compute: Option<DType>,
) -> candle_core::Result<Tensor> {
    let x = x.contiguous()?;
    let op = LoraLinear::new(weight, step.clone(), scale, compute)?;
    x.apply_op3(a, b, op)
}

/// The backward of [`lora_linear_step`] with the same arguments and the output's gradient `dy`:
/// `(dx, da, db)`, for code that chains backward passes by hand. With `dx_sum` (the sum of the
/// input gradients so far, for projections that read one input), `dx_sum + dx` in place of `dx`,
/// added where `dx_sum` lies when the op can (the caller must hold it alone).
pub(crate) fn lora_linear_backward(
    x: &Tensor,
    (weight, step): (&Tensor, &StepWeight),
    (a, b): (&Tensor, &Tensor),
    scale: f64,
    compute: Option<DType>,
    dy: &Tensor,
    dx_sum: Option<Tensor>,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    LoraLinear::new(weight, step.clone(), scale, compute)?.backward(x, a, b, dy, dx_sum)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::effective_weight::{effective_weight, effective_weight_pays};
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
        let fused = lora_linear(&x, &w, &a, &b, s, None).unwrap();
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

    /// With bf16 products on the CPU the op computes as the CUDA kernel does: the frozen
    /// product and the up-projection as f32 sums of exact bf16 products, the rank-r `low`
    /// rounded to bf16, then `base + s * up` in f32, so it equals those casts composed bit for
    /// bit; its gradients agree with the composed casts' to bf16 rounding.
    #[test]
    fn bf16_products_on_the_cpu_equal_the_composed_casts() {
        let dev = Device::Cpu;
        let (n, k, out, r) = (9, 24, 13, 4);
        let x = Var::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let w = Var::randn(0f32, 0.3, (out, k), &dev).unwrap();
        let a = Var::randn(0f32, 0.3, (r, k), &dev).unwrap();
        let b = Var::randn(0f32, 0.3, (out, r), &dev).unwrap();
        let s = 0.5;
        let bf = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
        let fused = lora_linear(&x, &w, &a, &b, s, Some(DType::BF16)).unwrap();
        assert_eq!(fused.dtype(), DType::F32);
        let f32 = |t: Tensor| t.to_dtype(DType::F32).unwrap();
        let base = f32(bf(&x)).matmul(&f32(bf(&w)).t().unwrap()).unwrap();
        let low = bf(&x).matmul(&bf(&a).t().unwrap()).unwrap();
        let up = f32(low).matmul(&f32(bf(&b)).t().unwrap()).unwrap();
        let composed = (base + up.affine(s, 0.0).unwrap()).unwrap();
        assert_eq!(max_diff(&fused, &composed), 0.0);
        let (gf, gc) = crate::ops::float::probed_grads(&fused, &composed);
        for (name, v) in [("x", &x), ("a", &a), ("b", &b)] {
            let (f, c) = (gf.get(v).unwrap(), gc.get(v).unwrap());
            assert_eq!(f.dtype(), DType::F32, "{name}");
            let scale = max_diff(c, &c.zeros_like().unwrap());
            let d = max_diff(f, c);
            assert!(
                d <= 2e-2 * scale,
                "{name}: gradient differs by {d} (largest {scale})"
            );
        }
        // An input cast beforehand (a layer node shares one cast among projections) gives the
        // same bits, forward and backward, with `dx` in the output gradient's dtype.
        let pre = lora_linear(&bf(&x), &w, &a, &b, s, Some(DType::BF16)).unwrap();
        assert_eq!(max_diff(&pre, &fused), 0.0);
        let dy = Tensor::randn(0f32, 1.0, (n, out), &dev).unwrap();
        let back = |x: &Tensor| {
            lora_linear_backward(
                x,
                (&w, &StepWeight::Frozen),
                (&a, &b),
                s,
                Some(DType::BF16),
                &dy,
                None,
            )
            .unwrap()
        };
        let (own, shared) = (back(&x), back(&bf(&x)));
        assert_eq!(shared.0.dtype(), DType::F32);
        for (o, p) in [
            (&own.0, &shared.0),
            (&own.1, &shared.1),
            (&own.2, &shared.2),
        ] {
            assert_eq!(max_diff(o, p), 0.0);
        }
        // The weight cast beforehand too (a layer node keeps it for the step): the same bits,
        // forward and backward; a cast that is not the weight's is refused.
        let wb = bf(&w);
        let cast = StepWeight::Cast(wb.clone());
        let kept = lora_linear_step(&bf(&x), (&w, &cast), (&a, &b), s, Some(DType::BF16)).unwrap();
        assert_eq!(kept.dtype(), DType::F32);
        assert_eq!(max_diff(&kept, &fused), 0.0);
        let kept_back = lora_linear_backward(
            &bf(&x),
            (&w, &cast),
            (&a, &b),
            s,
            Some(DType::BF16),
            &dy,
            None,
        )
        .unwrap();
        for (o, p) in [
            (&own.0, &kept_back.0),
            (&own.1, &kept_back.1),
            (&own.2, &kept_back.2),
        ] {
            assert_eq!(max_diff(o, p), 0.0);
        }
        let wrong = w
            .narrow(0, 0, out - 1)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let step = |t: &Tensor| StepWeight::Cast(t.clone());
        let mixed = Some(DType::BF16);
        let err = lora_linear_step(&x, (&w, &step(&wrong)), (&a, &b), s, mixed).unwrap_err();
        assert!(err.to_string().contains("the weight's cast"), "{err}");
        assert!(lora_linear_step(&x, (&w, &step(&w)), (&a, &b), s, mixed).is_err());
        let f64_input = x.to_dtype(DType::F64).unwrap();
        let err = lora_linear(&f64_input, &w, &a, &b, s, Some(DType::BF16)).unwrap_err();
        assert!(err.to_string().contains("f32 or bf16 inputs"), "{err}");
    }

    /// In mixed precision the adapters' gradients carry the scale `s` itself, not `s` rounded
    /// to bf16. The inputs are small integers, so every bf16 product here is exact and the only
    /// error left would be the scale's: bf16(1/3) is 0.2 % off, f32(1/3) 3e-8.
    #[test]
    fn mixed_precision_gradients_use_the_exact_scale() {
        let dev = Device::Cpu;
        let ints = |shape: (usize, usize)| {
            Tensor::randn(0f32, 1.0, shape, &dev)
                .and_then(|t| t.round())
                .and_then(|t| t.clamp(-2f32, 2f32))
                .unwrap()
        };
        let (n, k, out, r) = (6, 10, 7, 3);
        let (x, w, a, b, dy) = (
            ints((n, k)),
            ints((out, k)),
            ints((r, k)),
            ints((out, r)),
            ints((n, out)),
        );
        let s = 1.0 / 3.0;
        let (_, da, db) = lora_linear_backward(
            &x,
            (&w, &StepWeight::Frozen),
            (&a, &b),
            s,
            Some(DType::BF16),
            &dy,
            None,
        )
        .unwrap();
        let f = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let low = f(&x).matmul(&f(&a).t().unwrap()).unwrap();
        let db_want = (f(&dy).t().unwrap().matmul(&low).unwrap() * s).unwrap();
        let grad_low = (f(&dy).matmul(&f(&b)).unwrap() * s).unwrap();
        let da_want = grad_low.t().unwrap().matmul(&f(&x)).unwrap();
        for (name, got, want) in [("dA", &da, &da_want), ("dB", &db, &db_want)] {
            let scale = max_diff(want, &want.zeros_like().unwrap());
            assert!(scale > 0.0, "{name}: all zero, pick other inputs");
            let d = max_diff(&f(got), want);
            assert!(d <= 1e-6 * scale, "{name}: {d} off (largest {scale})");
        }
    }

    /// The effective weight gives the separate products' output and input gradient to the
    /// compute dtype's rounding, and the very same adapter gradients (the same products compute
    /// them either way), in f32 and in bf16. It is chosen for a training batch, not for a row.
    #[test]
    fn the_effective_weight_is_the_same_function() {
        let dev = Device::Cpu;
        let (n, k, out, r) = (64, 24, 16, 4);
        let x = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let w = Tensor::randn(0f32, 0.3, (out, k), &dev).unwrap();
        let a = Tensor::randn(0f32, 0.3, (r, k), &dev).unwrap();
        let b = Tensor::randn(0f32, 0.3, (out, r), &dev).unwrap();
        let dy = Tensor::randn(0f32, 1.0, (n, out), &dev).unwrap();
        let s = 0.75;
        let largest = |t: &Tensor| max_diff(t, &t.zeros_like().unwrap());
        for (compute, tol) in [(None, 1e-5), (Some(DType::BF16), 2e-2)] {
            let eff = StepWeight::Effective(effective_weight(&w, &a, &b, s, compute).unwrap());
            let frozen = StepWeight::Frozen;
            let run = |step: &StepWeight| {
                let y = lora_linear_step(&x, (&w, step), (&a, &b), s, compute).unwrap();
                let grads = lora_linear_backward(&x, (&w, step), (&a, &b), s, compute, &dy, None);
                (y, grads.unwrap())
            };
            let ((ye, (dxe, dae, dbe)), (yf, (dxf, daf, dbf))) = (run(&eff), run(&frozen));
            assert!(max_diff(&ye, &yf) <= tol * largest(&yf), "y ({compute:?})");
            assert!(
                max_diff(&dxe, &dxf) <= tol * largest(&dxf),
                "dx ({compute:?})"
            );
            assert_eq!(max_diff(&dae, &daf), 0.0, "dA ({compute:?})");
            assert_eq!(max_diff(&dbe, &dbf), 0.0, "dB ({compute:?})");
        }
        // Training batches take it; a few rows (generation) keep the separate products.
        assert!(effective_weight_pays(1024, 512, 512));
        assert!(!effective_weight_pays(100, 512, 512));
        assert!(!effective_weight_pays(1, 512, 512));
        // An effective weight in the wrong dtype or shape is refused.
        let wrong = StepWeight::Effective(w.to_dtype(DType::F64).unwrap());
        let err = lora_linear_step(&x, (&w, &wrong), (&a, &b), s, None).unwrap_err();
        assert!(err.to_string().contains("effective weight"), "{err}");
        let wrong = StepWeight::Effective(w.narrow(0, 0, out - 1).unwrap());
        assert!(lora_linear_step(&x, (&w, &wrong), (&a, &b), s, None).is_err());
    }

    #[test]
    fn f32_matches_and_bad_shapes_are_errors() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (4, 8), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (5, 8), &dev).unwrap();
        let a = Tensor::randn(0f32, 1.0, (2, 8), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, (5, 2), &dev).unwrap();
        let fused = lora_linear(&x, &w, &a, &b, 2.0, None).unwrap();
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
        let err = lora_linear(&x, &w, &a, &bad_b, 1.0, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("do not fit"), "{err}");
    }
}
