//! Causal multi-head self-attention with optional grouped-query heads, composed from
//! differentiable candle ops (candle-nn's fused softmax has no backward).

use super::rope::Rope;
use crate::error::{Result, TensorContext};
use crate::ops::attention::repeat_kv;
use crate::ops::{causal_softmax, Heads};
use crate::relora::linear::reborrow;
use crate::relora::AdaptableLinear;
use crate::rng::Rng;
use candle_core::{DType, Tensor, D};

/// The four attention projections of one layer.
pub struct Attention {
    /// `[heads * head_dim, hidden]`
    pub q_proj: AdaptableLinear,
    /// `[kv_heads * head_dim, hidden]`
    pub k_proj: AdaptableLinear,
    /// `[kv_heads * head_dim, hidden]`
    pub v_proj: AdaptableLinear,
    /// `[hidden, heads * head_dim]`
    pub o_proj: AdaptableLinear,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Matmul dtype for mixed precision (`None`: the parameter dtype).
    pub compute: Option<DType>,
}

/// Softmax over the last dimension. Subtracting the (detached) row maximum changes nothing
/// mathematically and keeps `exp` finite; masked entries are -inf and become exactly 0.
pub(crate) fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&sum)
}

/// `[t, t]` additive mask: 0 on and below the diagonal, -inf above.
pub(crate) fn causal_mask(t: usize, x: &Tensor) -> candle_core::Result<Tensor> {
    let mask: Vec<f32> = (0..t * t)
        .map(|i| {
            if i % t > i / t {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    Tensor::from_vec(mask, (t, t), &candle_core::Device::Cpu)?
        .to_dtype(x.dtype())?
        .to_device(x.device())
}

impl Attention {
    /// `x [b*t, hidden]`, `b` sequences of `t` positions each, `-> [b*t, hidden]`. Flat rows in
    /// and out: a reshape is one more graph node, whose backward costs a zero-filled buffer and
    /// an add of the whole activation.
    pub fn forward(
        &self,
        x: &Tensor,
        (b, t): (usize, usize),
        rope: &Rope,
        mut dropout: Option<(&mut Rng, f64)>,
    ) -> Result<Tensor> {
        let (rows, _) = x.dims2().ctx("attention input")?;
        if rows != b * t {
            return Err(crate::error::Error::Shape {
                name: self.q_proj.name.clone(),
                message: format!("input has {rows} rows, expected {b} x {t}"),
            });
        }
        let q = self
            .q_proj
            .forward(x, reborrow(&mut dropout), self.compute)?;
        let k = self
            .k_proj
            .forward(x, reborrow(&mut dropout), self.compute)?;
        let v = self
            .v_proj
            .forward(x, reborrow(&mut dropout), self.compute)?;
        let ctx = "attention";
        let (cos, sin) = rope.tables();
        let out = if crate::ops::fused_attention_applies(&q, cos) {
            let heads = Heads {
                batch: b,
                seq: t,
                heads: self.heads,
                kv_heads: self.kv_heads,
                head_dim: self.head_dim,
            };
            crate::ops::causal_attention(&q, &k, &v, cos, sin, heads, self.compute).ctx(ctx)?
        } else {
            self.attend_composed(q, k, v, (b, t), rope).ctx(ctx)?
        };
        self.o_proj
            .forward(&out, reborrow(&mut dropout), self.compute)
    }

    /// The attention between the projections from candle's differentiable ops, for devices and
    /// dtypes without the fused node's kernels (and for `--composed-ops`):
    /// `q [b*t, heads*d]`, `k`, `v [b*t, kv_heads*d]` -> `[b*t, heads*d]`.
    fn attend_composed(
        &self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        (b, t): (usize, usize),
        rope: &Rope,
    ) -> candle_core::Result<Tensor> {
        // [b*t, heads*d] -> [b, heads, t, d]
        let split = |y: Tensor, heads: usize| -> candle_core::Result<Tensor> {
            y.reshape((b, t, heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = rope.apply(&split(q, self.heads)?)?;
        let k = rope.apply(&split(k, self.kv_heads)?)?;
        let v = split(v, self.kv_heads)?;
        let (k, v) = (repeat_kv(k, self.heads)?, repeat_kv(v, self.heads)?);
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        // [b, heads, t, d] x [b, heads, d, t] -> [b, heads, t, t]
        let dtype = q.dtype();
        let cast = |t: &Tensor| match self.compute {
            Some(dt) if dt != t.dtype() => t.to_dtype(dt),
            _ => Ok(t.clone()),
        };
        // The two attention matmuls run in the compute dtype; scores and softmax in the
        // parameter dtype.
        let (qc, kc, vc) = (cast(&q)?, cast(&k)?, cast(&v)?);
        let raw = qc.matmul(&kc.t()?)?.to_dtype(dtype)?;
        let probs = if crate::ops::has_kernel(&raw) {
            causal_softmax(&raw, scale)?
        } else {
            softmax_last_dim(&(&raw * scale)?.broadcast_add(&causal_mask(t, &raw)?)?)?
        };
        // [b, heads, t, t] x [b, heads, t, d] -> [b, heads, t, d] -> [b*t, hidden]
        cast(&probs)?
            .matmul(&vc)?
            .to_dtype(dtype)?
            .transpose(1, 2)?
            .reshape((b * t, self.heads * self.head_dim))
    }
}
