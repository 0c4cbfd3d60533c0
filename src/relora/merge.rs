//! The merge: a ReLoRA model's weights are `W = W_base + sum_k s_k B_k A_k` over the completed
//! phases in order, computed in fp32 (f64 for f64 weights). The trainer's own merges, checkpoint
//! loading and the exports all call [`merge_delta`] (or the one-pass [`merge_steps`], which
//! rounds exactly as it does), so re-merging a checkpoint reproduces its weights bit for bit.

use crate::error::{Error, Result, TensorContext};
use crate::tensor_file::dtype;
use candle_core::{DType, Tensor};
use std::collections::HashMap;

/// One projection's adapter as it stood when its phase ended.
#[derive(Clone, Debug)]
pub struct PhaseAdapter {
    /// The projection's module path, e.g. `model.layers.0.self_attn.q_proj`.
    pub module: String,
    /// `[r, in]`
    pub a: Tensor,
    /// `[out, r]`
    pub b: Tensor,
    /// `alpha / r` for this phase.
    pub scale: f64,
}

/// A completed ReLoRA phase: every adapted projection's adapter at the moment of its merge.
#[derive(Clone, Debug)]
pub struct Phase {
    /// 1-based phase number, in merge order.
    pub index: usize,
    /// The optimizer step at which the merge happened.
    pub step: u64,
    /// The adapters, one per adapted projection.
    pub adapters: Vec<PhaseAdapter>,
}

/// The dtype merges are computed in: fp32, or f64 when the weights are f64.
fn merge_dtype(w: DType) -> DType {
    if w == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// `w + scale * b a`, computed in fp32 (f64 for f64 weights) and returned in `w`'s dtype.
/// `w [out, in]`, `a [r, in]`, `b [out, r]`.
pub fn merge_delta(module: &str, w: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    let (out, inp) = w.dims2().with_ctx(|| format!("{module}.weight"))?;
    let (r, a_in) = a.dims2().with_ctx(|| format!("{module}.lora_A"))?;
    let (b_out, b_r) = b.dims2().with_ctx(|| format!("{module}.lora_B"))?;
    if a_in != inp || b_out != out || b_r != r {
        return Err(Error::Shape {
            name: module.to_string(),
            message: format!(
                "cannot merge A [{r}, {a_in}] and B [{b_out}, {b_r}] into W [{out}, {inp}]"
            ),
        });
    }
    let dt = merge_dtype(w.dtype());
    let ctx = || format!("merging {module}");
    let product = b
        .to_dtype(dt)
        .and_then(|b| b.matmul(&a.to_dtype(dt)?))
        .with_ctx(ctx)?;
    if w.dtype() == dt && w.device().is_cpu() {
        return add_scaled_cpu(w, &product, scale).with_ctx(ctx);
    }
    let delta = product.affine(scale, 0.0).with_ctx(ctx)?;
    w.to_dtype(dt)
        .and_then(|w| w + delta)
        .and_then(|m| m.to_dtype(w.dtype()))
        .with_ctx(ctx)
}

/// `w + (p * scale + 0)` elementwise in one pass, for CPU tensors of the merge dtype. Each step
/// rounds exactly as candle's `affine(scale, 0.0)` followed by `+` does (scale cast to the element
/// type, multiply, add zero, add; no fused multiply-add), so the result is bit-identical to the
/// composed ops, without their two intermediate tensors.
fn add_scaled_cpu(w: &Tensor, p: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    use candle_core::{CpuStorage, Storage};
    let (w, p) = (w.contiguous()?, p.contiguous()?);
    let (ws, wl) = w.storage_and_layout();
    let (ps, pl) = p.storage_and_layout();
    let (Some((w0, w1)), Some((p0, p1))) = (wl.contiguous_offsets(), pl.contiguous_offsets())
    else {
        candle_core::bail!("merge operands are not contiguous");
    };
    let out = match (&*ws, &*ps) {
        (Storage::Cpu(CpuStorage::F32(wv)), Storage::Cpu(CpuStorage::F32(pv))) => {
            let m = scale as f32;
            let v: Vec<f32> = wv[w0..w1]
                .iter()
                .zip(&pv[p0..p1])
                .map(|(&x, &d)| x + (d * m + 0.0))
                .collect();
            Tensor::from_vec(v, w.shape(), w.device())
        }
        (Storage::Cpu(CpuStorage::F64(wv)), Storage::Cpu(CpuStorage::F64(pv))) => {
            let v: Vec<f64> = wv[w0..w1]
                .iter()
                .zip(&pv[p0..p1])
                .map(|(&x, &d)| x + (d * scale + 0.0))
                .collect();
            Tensor::from_vec(v, w.shape(), w.device())
        }
        _ => candle_core::bail!("merge operands must both be f32 or both f64 on the CPU"),
    };
    out
}

/// `B A` in the merge dtype of `dtype` (`[out, r] x [r, in]`): the product that [`merge_delta`]
/// scales and adds, computed by the same call.
pub(crate) fn merge_product(module: &str, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let dt = merge_dtype(b.dtype());
    b.to_dtype(dt)
        .and_then(|b| b.matmul(&a.to_dtype(dt)?))
        .with_ctx(|| format!("merging {module}"))
}

/// Applies several merges to a base weight held as little-endian bytes of `dtype` (f32 or f64)
/// in one pass: for each element, `w = w + (p_k * s_k + 0)` for k in order, rounding after each
/// step exactly as one [`merge_delta`] call per step would. `steps` are the products
/// ([`merge_product`]) with their scales; the result is a CPU tensor of `shape`.
pub(crate) fn merge_steps(
    module: &str,
    base: &[u8],
    dtype: dtype::StDType,
    shape: &[usize],
    steps: &[(Tensor, f64)],
) -> Result<Tensor> {
    use candle_core::{CpuStorage, Device, Storage};
    const BLOCK: usize = 4096;
    let n: usize = shape.iter().product();
    let bad = |m: String| Error::Shape {
        name: module.to_string(),
        message: m,
    };
    if base.len() != n * dtype.size() {
        return Err(bad(format!(
            "{} base bytes for shape {shape:?}",
            base.len()
        )));
    }
    let steps: Vec<(Tensor, f64)> = steps
        .iter()
        .map(|(t, s)| Ok((t.contiguous().with_ctx(|| module.to_string())?, *s)))
        .collect::<Result<_>>()?;
    for (t, _) in &steps {
        if t.dims() != shape {
            return Err(bad(format!(
                "an adapter product is {:?}, the weight {shape:?}",
                t.dims()
            )));
        }
    }
    let guards: Vec<_> = steps.iter().map(|(t, _)| t.storage_and_layout()).collect();
    macro_rules! run {
        ($ty:ty, $variant:ident, $width:expr) => {{
            let mut prods: Vec<(&[$ty], $ty)> = Vec::with_capacity(steps.len());
            for ((g, l), (_, s)) in guards.iter().zip(&steps) {
                let (Storage::Cpu(CpuStorage::$variant(v)), Some((o0, o1))) =
                    (&**g, l.contiguous_offsets())
                else {
                    return Err(bad(format!(
                        "adapter products must be {} CPU tensors",
                        stringify!($ty)
                    )));
                };
                prods.push((&v[o0..o1], *s as $ty));
            }
            let mut out: Vec<$ty> = Vec::with_capacity(n);
            for start in (0..n).step_by(BLOCK) {
                let end = (start + BLOCK).min(n);
                let o0 = out.len();
                out.extend(
                    base[start * $width..end * $width]
                        .chunks_exact($width)
                        .map(|c| {
                            let mut b = [0u8; $width];
                            b.copy_from_slice(c);
                            <$ty>::from_le_bytes(b)
                        }),
                );
                for (p, m) in &prods {
                    for (x, &d) in out[o0..].iter_mut().zip(&p[start..end]) {
                        *x += d * *m + 0.0;
                    }
                }
            }
            Tensor::from_vec(out, shape, &Device::Cpu).with_ctx(|| module.to_string())
        }};
    }
    match dtype {
        dtype::StDType::F32 => run!(f32, F32, 4),
        dtype::StDType::F64 => run!(f64, F64, 8),
        other => Err(bad(format!("cannot merge into a {other} weight"))),
    }
}

/// Applies `phases` in order to `weights` (Hugging Face names, `{module}.weight`), in place.
/// Stops after phase `upto` when given (1-based, inclusive).
pub fn merge_phases(
    weights: &mut HashMap<String, Tensor>,
    phases: &[Phase],
    upto: Option<usize>,
) -> Result<()> {
    for phase in phases {
        if upto.is_some_and(|u| phase.index > u) {
            break;
        }
        for ad in &phase.adapters {
            let key = format!("{}.weight", ad.module);
            let w = weights.get(&key).ok_or_else(|| Error::Shape {
                name: key.clone(),
                message: format!(
                    "phase {} adapts a weight the base does not have",
                    phase.index
                ),
            })?;
            let merged = merge_delta(&ad.module, w, &ad.a, &ad.b, ad.scale)?;
            weights.insert(key, merged);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn merge_equals_float64_reference() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (5, 4), &dev).unwrap();
        let a = Tensor::randn(0f32, 1.0, (2, 4), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, (5, 2), &dev).unwrap();
        let m = merge_delta("p", &w, &a, &b, 0.25).unwrap();
        let wv: Vec<Vec<f32>> = w.to_vec2().unwrap();
        let av: Vec<Vec<f32>> = a.to_vec2().unwrap();
        let bv: Vec<Vec<f32>> = b.to_vec2().unwrap();
        let mv: Vec<Vec<f32>> = m.to_vec2().unwrap();
        for i in 0..5 {
            for j in 0..4 {
                let mut d = 0f64;
                for k in 0..2 {
                    d += bv[i][k] as f64 * av[k][j] as f64;
                }
                let expect = wv[i][j] as f64 + 0.25 * d;
                assert!((mv[i][j] as f64 - expect).abs() < 1e-5);
            }
        }
        // The fused CPU pass rounds exactly like the composed candle ops, signed zeros included.
        for dt in [DType::F32, DType::F64] {
            let w = Tensor::randn(0f32, 1.0, (64, 48), &dev)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            let w = w
                .slice_assign(
                    &[0..1, 0..1],
                    &Tensor::new(&[[-0.0f32]], &dev)
                        .unwrap()
                        .to_dtype(dt)
                        .unwrap(),
                )
                .unwrap();
            let a = Tensor::randn(0f32, 1.0, (3, 48), &dev)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            let mut b = Tensor::randn(0f32, 1.0, (64, 3), &dev)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            b = b
                .slice_assign(&[0..1, 0..3], &Tensor::zeros((1, 3), dt, &dev).unwrap())
                .unwrap();
            let fused = merge_delta("p", &w, &a, &b, 0.3).unwrap();
            let composed = (&w + b.matmul(&a).unwrap().affine(0.3, 0.0).unwrap()).unwrap();
            let bits = |t: &Tensor| -> Vec<u64> {
                t.flatten_all()
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect()
            };
            assert_eq!(bits(&fused), bits(&composed), "{dt:?}");
        }
        let bad = Tensor::zeros((3, 2), DType::F32, &dev).unwrap();
        assert!(merge_delta("p", &w, &a, &bad, 1.0).is_err());
    }
}
