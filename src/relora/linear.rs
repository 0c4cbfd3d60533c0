//! The projection that ReLoRA adapts: `y = W x` while full-rank, `y = W x + s B (A x)` with W
//! frozen while an adapter is attached.

use crate::error::{Result, TensorContext};
use crate::init;
use crate::ops::{frozen_matmul, lora_linear, mixed_linear};
use crate::rng::Rng;
use candle_core::{DType, Tensor, Var};

/// One low-rank adapter: `A [r, in]`, `B [out, r]`, scale `s = alpha / r`.
pub struct Adapter {
    /// Down projection `[r, in]`, Kaiming-uniform at (re-)initialisation.
    pub a: Var,
    /// Up projection `[out, r]`, zero at (re-)initialisation so the function is unchanged.
    pub b: Var,
    /// The adapter's scale `alpha / r`.
    pub scale: f64,
}

/// A bias-free linear layer named with its Hugging Face module path, optionally carrying an adapter.
pub struct AdaptableLinear {
    /// Module path, e.g. `model.layers.3.self_attn.q_proj`; the weight is `{name}.weight`.
    pub name: String,
    /// `[out, in]`; trainable while no adapter is attached, frozen otherwise.
    pub weight: Var,
    /// The current adapter, if any.
    pub adapter: Option<Adapter>,
}

impl AdaptableLinear {
    /// Input width.
    pub fn in_dim(&self) -> usize {
        self.weight.dims()[1]
    }

    /// Output width.
    pub fn out_dim(&self) -> usize {
        self.weight.dims()[0]
    }

    /// `x [n, in] -> [n, out]`. `dropout` is `(rng, p)` for adapter-input dropout in training.
    /// With `compute` set (bf16 mixed precision) the matmuls run in that dtype on copies of the
    /// fp32 master weights and the result comes back in the parameter dtype; gradients flow to
    /// the fp32 masters through the casts.
    pub fn forward(
        &self,
        x: &Tensor,
        dropout: Option<(&mut Rng, f64)>,
        compute: Option<DType>,
    ) -> Result<Tensor> {
        let ctx = || format!("{} forward", self.name);
        let out_dtype = x.dtype();
        let cast = |t: &Tensor| -> candle_core::Result<Tensor> {
            match compute {
                Some(dt) if dt != t.dtype() => t.to_dtype(dt),
                _ => Ok(t.clone()),
            }
        };
        let y = match &self.adapter {
            None => match compute {
                // Mixed precision as one node (see ops::mixed_linear).
                Some(dt) if dt != x.dtype() && crate::ops::fused_kernels() => {
                    mixed_linear(x, self.weight.as_tensor(), dt).with_ctx(ctx)?
                }
                _ => {
                    let w = cast(self.weight.as_tensor()).with_ctx(ctx)?;
                    cast(x).and_then(|x| x.matmul(&w.t()?)).with_ctx(ctx)?
                }
            },
            Some(ad) => {
                let drop = dropout.filter(|(_, p)| *p > 0.0);
                if drop.is_none() && lora_kernel_applies(x, compute) {
                    return lora_linear(
                        x,
                        self.weight.as_tensor(),
                        ad.a.as_tensor(),
                        ad.b.as_tensor(),
                        ad.scale,
                        compute,
                    )
                    .with_ctx(ctx);
                }
                // Composed form: adapter-input dropout, or devices and dtypes without the fused
                // op.
                let xc = cast(x).with_ctx(ctx)?;
                let w = cast(self.weight.as_tensor()).with_ctx(ctx)?;
                let base = frozen_matmul(&xc, &w).with_ctx(ctx)?;
                let x_in = match drop {
                    Some((rng, p)) => apply_dropout(&xc, rng, p).with_ctx(ctx)?,
                    None => xc,
                };
                // The scale goes on A ([r, in], cheaper than the output) in the parameters'
                // dtype: candle's `affine` on a bf16 tensor rounds the multiplier to bf16.
                let a =
                    ad.a.as_tensor()
                        .affine(ad.scale, 0.0)
                        .and_then(|a| cast(&a))
                        .with_ctx(ctx)?;
                let b = cast(ad.b.as_tensor()).with_ctx(ctx)?;
                // [n, in] x [in, r] -> [n, r] x [r, out] -> [n, out]
                let low = x_in.matmul(&a.t().with_ctx(ctx)?).with_ctx(ctx)?;
                let up = low.matmul(&b.t().with_ctx(ctx)?).with_ctx(ctx)?;
                (base + up).with_ctx(ctx)?
            }
        };
        if y.dtype() == out_dtype {
            Ok(y)
        } else {
            y.to_dtype(out_dtype).with_ctx(ctx)
        }
    }

    /// The weight with the current adapter merged in (fp32, via [`super::merge::merge_delta`]),
    /// or `None` without an adapter. Nothing is changed.
    pub(crate) fn merged_weight(&self) -> Result<Option<Tensor>> {
        let Some(ad) = &self.adapter else {
            return Ok(None);
        };
        super::merge::merge_delta(
            &self.name,
            self.weight.as_tensor(),
            ad.a.as_tensor(),
            ad.b.as_tensor(),
            ad.scale,
        )
        .map(Some)
    }

    /// Attaches a freshly initialised adapter of rank `r` (A Kaiming-uniform, B zero).
    pub(crate) fn attach_adapter(&mut self, rank: usize, scale: f64, rng: &mut Rng) -> Result<()> {
        let (dtype, dev) = (self.weight.dtype(), self.weight.device().clone());
        let a = init::kaiming_uniform(&[rank, self.in_dim()], dtype, &dev, rng)?;
        let b = init::zeros(&[self.out_dim(), rank], dtype, &dev)?;
        self.adapter = Some(Adapter {
            a: Var::from_tensor(&a).ctx("adapter A")?,
            b: Var::from_tensor(&b).ctx("adapter B")?,
            scale,
        });
        Ok(())
    }

    /// Re-initialises the attached adapter in place (A Kaiming-uniform, B zero); the `Var`s keep
    /// their identity so optimizer state stays addressable by name.
    pub(crate) fn reinit_adapter(&mut self, rng: &mut Rng) -> Result<()> {
        let in_dim = self.in_dim();
        let Some(ad) = &self.adapter else {
            return Ok(());
        };
        let (dtype, dev) = (ad.a.dtype(), ad.a.device().clone());
        let rank = ad.a.dims()[0];
        let a = init::kaiming_uniform(&[rank, in_dim], dtype, &dev, rng)?;
        ad.a.set(&a)
            .with_ctx(|| format!("{} re-init A", self.name))?;
        ad.b.set(&ad.b.zeros_like().ctx("zeros")?)
            .with_ctx(|| format!("{} re-init B", self.name))?;
        Ok(())
    }
}

/// Whether the fused LoRA projection ([`lora_linear`]) has a kernel for `x` with products in
/// `compute`: it computes in the parameter dtype anywhere it has a kernel, and in bf16 from f32
/// inputs on the CPU and on CUDA.
pub(crate) fn lora_kernel_applies(x: &Tensor, compute: Option<DType>) -> bool {
    let computes = match compute {
        None => true,
        Some(dt) => dt == x.dtype() || (dt == DType::BF16 && x.dtype() == DType::F32),
    };
    computes && crate::ops::has_kernel(x)
}

/// Inverted dropout with a mask drawn from the crate's generator (deterministic per seed).
fn apply_dropout(x: &Tensor, rng: &mut Rng, p: f64) -> candle_core::Result<Tensor> {
    let keep = 1.0 - p;
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| {
            if rng.next_f64() < keep {
                (1.0 / keep) as f32
            } else {
                0.0
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, x.shape(), &candle_core::Device::Cpu)?
        .to_dtype(x.dtype())?
        .to_device(x.device())?;
    x * mask
}

/// Re-borrows an optional dropout source so it can be passed to several projections in turn.
pub(crate) fn reborrow<'a>(d: &'a mut Option<(&mut Rng, f64)>) -> Option<(&'a mut Rng, f64)> {
    d.as_mut().map(|(r, p)| (&mut **r, *p))
}
