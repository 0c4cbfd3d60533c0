//! The merge math, shared by the trainer, the converter and the C API: a ReLoRA model's weights
//! are `W = W_base + sum_k s_k B_k A_k` over the completed phases in order. The trainer's own merges
//! call [`merge_delta`] too, so re-merging a checkpoint reproduces its weights bit for bit.

use crate::error::{Error, Result, TensorContext};
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
    let delta = b
        .to_dtype(dt)
        .and_then(|b| b.matmul(&a.to_dtype(dt)?))
        .and_then(|d| d.affine(scale, 0.0))
        .with_ctx(ctx)?;
    w.to_dtype(dt)
        .and_then(|w| w + delta)
        .and_then(|m| m.to_dtype(w.dtype()))
        .with_ctx(ctx)
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
        let bad = Tensor::zeros((3, 2), DType::F32, &dev).unwrap();
        assert!(merge_delta("p", &w, &a, &bad, 1.0).is_err());
    }
}
