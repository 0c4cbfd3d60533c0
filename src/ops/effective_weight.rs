//! The effective weight `W + s B A` of an adapted projection: what its products read in place of
//! the frozen `W` when a call has enough rows (see [`super::lora_linear`]), and how it is built.
//!
//! On the CPU the build is one pass over `W` with the sums of `s B A` in registers
//! ([`super::low_rank_sum`]; a copy of `W` and an accumulating gemm on CPUs without fused
//! multiply-add vectors); composed from candle ops it was a product, then an add over
//! `[out, in]` on one thread, and at 60m that cost the forward more than the two rank-r
//! products it saves. On CUDA in bf16 the product `B A` comes from
//! cuBLAS in f32 and one kernel scales it, adds it to `W` and rounds the sum to bf16
//! (`add_scaled_to_bf16`), in place of the cast of `W` a mixed-precision step makes anyway.
//! Anything else is composed. In mixed precision the scale multiplies the f32 product, as the
//! adapter's own products apply it, never a bf16 rounding of `s A`.

use super::float::contiguous;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Device, Layout, Shape, Tensor};

/// Whether the calling trainer uses the effective weight `W + s B A`
/// ([`crate::engine::Engine::effective_weights`]): off, every adapted projection runs its three
/// products forward and two for the input gradient, as before the effective weight existed.
pub fn effective_weights() -> bool {
    crate::engine::current().effective_weights
}

/// Whether a call over `rows` inputs of an `[out, in]` projection does less work with the
/// effective weight: it saves `rows r (2 in + out)` multiply-adds and costs `r in out` for
/// `B A`, plus passes over `[out, in]` to add and cast it, which the factor 2 pays for. A
/// 512 x 512 projection needs 342 rows, 350m's widest (1024 to 2736) 1171: a training batch
/// passes; generating one token at a time does not.
pub(crate) fn effective_weight_pays(rows: usize, k: usize, out: usize) -> bool {
    rows.saturating_mul(2 * k + out) >= 2 * k * out
}

/// What an adapted projection's products read in place of the frozen `W [out, in]`, chosen once
/// for a forward and kept for its backward.
#[derive(Clone, Debug)]
pub(crate) enum StepWeight {
    /// `W` itself: the op casts it where it needs the compute dtype.
    Frozen,
    /// `W` cast to the compute dtype by the caller, who keeps it for the backward (a layer
    /// node), so neither pass casts it again.
    Cast(Tensor),
    /// `W + s B A`, summed in the parameters' dtype and cast to the compute dtype if there is
    /// one: the forward and the input gradient are one product each.
    Effective(Tensor),
}

impl StepWeight {
    /// The weight for a call over `rows` inputs: the effective weight when it is on and pays
    /// ([`effective_weight_pays`]), else the cast of `weight` to `compute` when `keep_cast` and
    /// the dtypes differ, else `weight` itself.
    pub(crate) fn choose(
        rows: usize,
        (weight, a, b): (&Tensor, &Tensor, &Tensor),
        scale: f64,
        compute: Option<DType>,
        keep_cast: bool,
    ) -> candle_core::Result<Self> {
        let compute = compute.filter(|&dt| dt != weight.dtype());
        let (out, k) = weight.dims2()?;
        let ((r, a_in), (b_out, b_r)) = (a.dims2()?, b.dims2()?);
        if a_in != k || b_out != out || b_r != r {
            candle_core::bail!(
                "lora linear: W [{out}, {k}], A [{r}, {a_in}], B [{b_out}, {b_r}] do not fit"
            );
        }
        if effective_weights() && effective_weight_pays(rows, k, out) {
            return Ok(StepWeight::Effective(effective_weight(
                weight, a, b, scale, compute,
            )?));
        }
        match compute {
            Some(dt) if keep_cast => Ok(StepWeight::Cast(weight.detach().to_dtype(dt)?)),
            _ => Ok(StepWeight::Frozen),
        }
    }
}

/// `W + s B A` `[out, in]` in `weight`'s dtype, cast to `compute` when given. In mixed
/// precision `B A` is a widening product of their bf16 casts, as the adapter's products read
/// them, and `s` multiplies it in f32.
pub(crate) fn effective_weight(
    weight: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    compute: Option<DType>,
) -> candle_core::Result<Tensor> {
    if let Some(w) = cpu_effective_weight(weight, a, b, scale, compute)? {
        return Ok(w);
    }
    // [out, r] x [r, in]
    if let Some(dt) = compute {
        let delta = super::widening_matmul(&b.detach().to_dtype(dt)?, &a.detach().to_dtype(dt)?)?;
        if dt == DType::BF16 && weight.dtype() == DType::F32 && super::fused_kernels() {
            return weight
                .detach()
                .apply_op2_no_bwd(&delta, &AddScaledToBf16(scale as f32));
        }
        let w = (weight.detach() + delta.affine(scale, 0.0)?.to_dtype(weight.dtype())?)?;
        return w.to_dtype(dt);
    }
    // The scale on A, the smaller operand, in the parameters' dtype.
    let delta = b.detach().matmul(&a.detach().affine(scale, 0.0)?)?;
    weight.detach() + delta
}

/// `bf16(w + s d)` for f32 `w` and `d` of one shape and the f32 `s`, in one pass: the effective
/// weight's scale, add and cast to the compute dtype.
struct AddScaledToBf16(f32);

impl AddScaledToBf16 {
    fn same_shape(wl: &Layout, dl: &Layout) -> candle_core::Result<()> {
        if wl.shape() != dl.shape() {
            candle_core::bail!(
                "effective weight: W {:?} and B A {:?} differ",
                wl.dims(),
                dl.dims()
            );
        }
        Ok(())
    }
}

impl CustomOp2 for AddScaledToBf16 {
    fn name(&self) -> &'static str {
        "add-scaled-to-bf16"
    }

    fn cpu_fwd(
        &self,
        ws: &CpuStorage,
        wl: &Layout,
        ds: &CpuStorage,
        dl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Self::same_shape(wl, dl)?;
        let w = contiguous::<f32>(self.name(), ws, wl)?;
        let d = contiguous::<f32>(self.name(), ds, dl)?;
        let out = w
            .iter()
            .zip(d)
            .map(|(&w, &d)| half::bf16::from_f32(w + self.0 * d))
            .collect();
        Ok((CpuStorage::BF16(out), wl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
        ds: &candle_core::CudaStorage,
        dl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda;
        use candle_core::backend::BackendStorage as _;
        Self::same_shape(wl, dl)?;
        let w = cuda::input(self.name(), ws, wl)?;
        let d = cuda::input(self.name(), ds, dl)?;
        let n = wl.shape().elem_count();
        let dev = ws.device();
        let out = cuda::output::<half::bf16>(dev, n)?;
        cuda::launch!(
            dev,
            "add_scaled_to_bf16",
            cuda::elementwise(n),
            &w,
            &d,
            &self.0,
            &out,
            &(n as u64)
        );
        Ok((cuda::storage(out, dev), wl.shape().clone()))
    }
}

/// The f32 elements of a CPU tensor in row-major order (a copy).
fn f32_rows(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.detach().flatten_all()?.to_vec1::<f32>()
}

/// [`effective_weight`] on the CPU for f32 parameters, cast to `compute` in the same pass that
/// builds the result. `None` for other devices and dtypes, which take the composed form.
fn cpu_effective_weight(
    weight: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    compute: Option<DType>,
) -> candle_core::Result<Option<Tensor>> {
    if !matches!(weight.device(), Device::Cpu)
        || weight.dtype() != DType::F32
        || !matches!(compute, None | Some(DType::BF16))
    {
        return Ok(None);
    }
    let ((out, k), (r, _)) = (weight.dims2()?, a.dims2()?);
    // In mixed precision the adapter's products read bf16 casts of A and B: widen those.
    let operand = |t: &Tensor| match compute {
        Some(dt) => f32_rows(&t.to_dtype(dt)?.to_dtype(DType::F32)?),
        None => f32_rows(t),
    };
    let build = BuildEffective {
        b: operand(b)?,
        a: operand(a)?,
        shape: (out, k, r),
        scale: scale as f32,
        to_bf16: compute.is_some(),
    };
    if build.b.len() != out * r || build.a.len() != r * k {
        candle_core::bail!("effective weight: W, A and B do not fit");
    }
    let w = weight.detach().contiguous()?.apply_op1_no_bwd(&build)?;
    Ok(Some(w))
}

/// `W + s B A` from `W [out, in]` (the op's input) and the f32 rows of `B [out, r]` and
/// `A [r, in]`: in one pass over `W` with the sums in registers where the CPU has fused
/// multiply-add vectors ([`super::low_rank_sum`]), else a copy of `W` into which one
/// multithreaded gemm adds `s B A` (`dst = dst + s B A`, the `gemm` crate's accumulating form).
/// With `to_bf16` the result is rounded to bf16, as the mixed-precision products read it.
struct BuildEffective {
    b: Vec<f32>,
    a: Vec<f32>,
    shape: (usize, usize, usize),
    scale: f32,
    to_bf16: bool,
}

impl BuildEffective {
    fn by_gemm(&self, w: &[f32]) -> Vec<f32> {
        let (out, k, r) = self.shape;
        let mut dst = w.to_vec();
        if dst.is_empty() || r == 0 {
            return dst;
        }
        let parallelism = super::gemm_parallelism(rayon::current_num_threads());
        // SAFETY: dst [out, k], b [out, r] and a [r, k] are row-major buffers of exactly those
        // sizes (checked by the caller and `cpu_fwd`), with column stride 1 and row strides k,
        // r and k; dst does not alias them. dst := 1 * dst + s * b a.
        unsafe {
            gemm::gemm(
                out,
                k,
                r,
                dst.as_mut_ptr(),
                1,
                k as isize,
                true,
                self.b.as_ptr(),
                1,
                r as isize,
                self.a.as_ptr(),
                1,
                k as isize,
                1f32,
                self.scale,
                false,
                false,
                false,
                parallelism,
            );
        }
        dst
    }
}

impl CustomOp1 for BuildEffective {
    fn name(&self) -> &'static str {
        "effective-weight"
    }

    fn cpu_fwd(&self, ws: &CpuStorage, wl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (out, k, _) = self.shape;
        let w = contiguous::<f32>(self.name(), ws, wl)?;
        if w.len() != out * k {
            candle_core::bail!("effective weight: W {:?} is not [{out}, {k}]", wl.dims());
        }
        let dst = super::low_rank_sum::low_rank_sum(w, &self.b, &self.a, self.shape, self.scale)
            .unwrap_or_else(|| self.by_gemm(w));
        let storage = if self.to_bf16 {
            CpuStorage::BF16(dst.iter().map(|&v| half::bf16::from_f32(v)).collect())
        } else {
            CpuStorage::F32(dst)
        };
        Ok((storage, Shape::from((out, k))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::float::max_abs_diff as max_diff;

    /// The one-pass CPU build equals `W + s B A` in float64 (f32 to f32 rounding; bf16 to one
    /// bf16 rounding of that sum, on the bf16 casts of A and B), for the shapes of a projection
    /// and for a single rank.
    #[test]
    fn the_cpu_build_is_w_plus_s_b_a() {
        let dev = Device::Cpu;
        for (out, k, r) in [(37, 50, 8), (16, 24, 1)] {
            let w = Tensor::randn(0f32, 0.3, (out, k), &dev).unwrap();
            let a = Tensor::randn(0f32, 0.3, (r, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 0.3, (out, r), &dev).unwrap();
            let s = 0.375;
            let f64_of = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
            let a_scaled = a.affine(s, 0.0).unwrap();
            let built = cpu_effective_weight(&w, &a, &b, s, None).unwrap().unwrap();
            let want = (f64_of(&w) + f64_of(&b).matmul(&f64_of(&a_scaled)).unwrap()).unwrap();
            let largest = max_diff(&want, &want.zeros_like().unwrap());
            // The gemm build that CPUs without fused multiply-add vectors run.
            let by_gemm = BuildEffective {
                b: f32_rows(&b).unwrap(),
                a: f32_rows(&a).unwrap(),
                shape: (out, k, r),
                scale: s as f32,
                to_bf16: false,
            }
            .by_gemm(&f32_rows(&w).unwrap());
            let by_gemm = Tensor::from_vec(by_gemm, (out, k), &dev).unwrap();
            assert!(
                max_diff(&f64_of(&by_gemm), &want) <= 1e-6 * largest,
                "gemm build {out}x{k} r{r}"
            );
            assert!(
                max_diff(&f64_of(&built), &want) <= 1e-6 * largest,
                "f32 {out}x{k} r{r}"
            );

            let bf = |t: &Tensor| f64_of(&t.to_dtype(DType::BF16).unwrap());
            let mixed = cpu_effective_weight(&w, &a, &b, s, Some(DType::BF16))
                .unwrap()
                .unwrap();
            assert_eq!(mixed.dtype(), DType::BF16);
            // s multiplies the product of the bf16 casts, unrounded.
            let low = bf(&b).matmul(&bf(&a)).unwrap();
            let want = (f64_of(&w) + (low * s).unwrap()).unwrap();
            // One bf16 rounding of values below `largest`: at most 2^-9 of it (the bound
            // leaves as much again for the f32 sums).
            let d = max_diff(&f64_of(&mixed), &want);
            assert!(d <= largest / 256.0, "bf16 {out}x{k} r{r}: {d}");
            // The composed form (other devices) builds the same weight.
            let composed = {
                let delta = b.matmul(&a_scaled).unwrap();
                (w.clone() + delta).unwrap()
            };
            assert!(max_diff(&built, &composed) <= 1e-6 * largest);
        }
        // The GPU's scale-add-and-cast op, run on the CPU: each element is the f32 sum rounded
        // to the nearest bf16, ties to even (1 + 3/256 lies halfway and goes to 1 + 4/256).
        let w = Tensor::new(&[1.0f32, -2.5, 1.0], &dev).unwrap();
        let d = Tensor::new(&[6.0f32 / 256.0, 0.5, 2.0 / 256.0], &dev).unwrap();
        let sum = w.apply_op2_no_bwd(&d, &AddScaledToBf16(0.5)).unwrap();
        let got: Vec<f32> = sum.to_dtype(DType::F32).unwrap().to_vec1().unwrap();
        assert_eq!(got, [1.0 + 4.0 / 256.0, -2.25, 1.0]);
        let other = Tensor::zeros(2, DType::F32, &dev).unwrap();
        assert!(w.apply_op2_no_bwd(&other, &AddScaledToBf16(1.0)).is_err());
        let f64_weight = Tensor::zeros((2, 2), DType::F64, &dev).unwrap();
        let none = cpu_effective_weight(&f64_weight, &f64_weight, &f64_weight, 1.0, None).unwrap();
        assert!(none.is_none(), "f64 takes the composed form");
    }
}
