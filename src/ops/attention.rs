//! Causal self-attention between the projections as one autograd node: split heads, rotate
//! queries and keys, share key/value heads across their query groups, `q kᵀ`, the scaled causal
//! softmax, `p v`, merge heads.
//!
//! Composed from candle's ops this is about seventeen graph nodes a layer. candle's backward adds
//! every node's gradient into a freshly zeroed buffer, so each node costs a full-size allocation,
//! a fill, a read of two operands and a write, plus a kernel launch on a GPU; and the graph keeps
//! every intermediate alive until the backward pass (the `[batch, heads, t, t]` scores as well as
//! the probabilities, and f32 and bf16 copies of the heads). As one node the forward runs the
//! same kernels on tensors outside the graph and keeps only what the backward reads: the rotated
//! heads in the matmul dtype and the probabilities. The backward is written out below; it runs
//! the products candle's backward would, so the result matches the composed ops to rounding. On
//! the CPU the per-head products skip the blocks the causal mask zeroes (`ops/head_matmul.rs`).

use super::causal_softmax::{causal_softmax, causal_softmax_backward};
use super::head_matmul::{
    causal_probs, causal_score_grads, head_matmul, head_matmul_applies, Causal, Operand,
};
use super::precomputed::Precomputed;
use super::rotary::{rotary, rotary_inverse, rotate_moving_heads, HeadMove};
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};

/// The head layout of one attention layer for a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heads {
    /// Sequences in the batch.
    pub batch: usize,
    /// Positions per sequence.
    pub seq: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (a divisor of `heads`).
    pub kv_heads: usize,
    /// Width of one head (even, for the rotation).
    pub head_dim: usize,
}

/// What the backward pass reads, all computed outside the graph by [`attention_forward`].
pub(crate) struct AttentionSaved {
    heads: Heads,
    scale: f64,
    /// Rotary tables `[positions >= t, d]`, in the parameter dtype.
    cos: Tensor,
    sin: Tensor,
    /// dtype of the inputs and of the result.
    param: DType,
    /// Rotated queries `[b, heads, t, d]`, matmul dtype.
    q: Tensor,
    /// Rotated keys, repeated to the query heads, `[b, heads, t, d]`, matmul dtype.
    k: Tensor,
    /// Values, repeated to the query heads, `[b, heads, t, d]`, matmul dtype.
    v: Tensor,
    /// Softmax output `[b, heads, t, t]` in the dtype the softmax ran in.
    probs: Tensor,
    /// `probs` in the matmul dtype (the same tensor when the dtypes agree).
    probs_mm: Tensor,
}

struct AttentionNode {
    saved: AttentionSaved,
    /// The result, computed before the node was built.
    out: Precomputed,
}

impl CustomOp3 for AttentionNode {
    fn name(&self) -> &'static str {
        "causal-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.out.cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.out.cuda()
    }

    fn bwd(
        &self,
        _q: &Tensor,
        _k: &Tensor,
        _v: &Tensor,
        _out: &Tensor,
        dout: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dq, dk, dv) = self.saved.backward(dout)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

impl AttentionSaved {
    /// `(dq, dk, dv)`, shaped as the forward's inputs, from the gradient of its result
    /// `dout [b*t, heads*d]`.
    pub(crate) fn backward(&self, dout: &Tensor) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let Heads {
            batch: b,
            seq: t,
            heads,
            kv_heads,
            head_dim: d,
        } = self.heads;
        let s = self;
        let mm = s.q.dtype();
        // [b*t, heads*d] -> [b, heads, t, d] in the matmul dtype.
        let dout = cast(&dout.reshape((b, t, heads, d))?.transpose(1, 2)?, mm)?.contiguous()?;
        // out = p v
        let dv = heads_product((&s.probs_mm, true), (&dout, false), Causal::UpperLeft)?;
        // p = softmax(scale * q kᵀ)
        let dscores = if softmax_fuses(&dout, s.probs.dtype()) {
            let flat = (flat_heads(&dout)?, flat_heads(&s.v)?, flat_heads(&s.probs)?);
            causal_score_grads(&flat.0, &flat.1, &flat.2, self.scale)?.reshape((b, heads, t, t))?
        } else {
            let dprobs = cast(
                &heads_product((&dout, false), (&s.v, true), Causal::LowerResult)?,
                s.probs.dtype(),
            )?;
            cast(&causal_softmax_backward(&s.probs, &dprobs, self.scale)?, mm)?
        };
        let dq = heads_product((&dscores, false), (&s.k, false), Causal::LowerLeft)?;
        let dk = heads_product((&dscores, true), (&s.q, false), Causal::UpperLeft)?;
        // Back to the parameter dtype, summed over each key/value head's query group, unrotated,
        // and merged to [b*t, heads*d].
        let unshare = |x: Tensor| -> candle_core::Result<Tensor> {
            let x = cast(&x, self.param)?;
            if kv_heads == heads {
                return Ok(x);
            }
            x.reshape((b, kv_heads, heads / kv_heads, t, d))?.sum(2)
        };
        let merge = |x: Tensor, n: usize| x.transpose(1, 2)?.reshape((b * t, n * d));
        // Unrotated and merged in one pass where the CPU kernel applies.
        let unrotate = |x: Tensor, n: usize| -> candle_core::Result<Tensor> {
            let way = HeadMove::MergeInverse;
            match rotate_moving_heads(&x, &self.cos, &self.sin, (b, t, n, d), way)? {
                Some(merged) => Ok(merged),
                None => merge(rotary_inverse(&x, &self.cos, &self.sin)?, n),
            }
        };
        let dq = unrotate(cast(&dq, self.param)?, heads)?;
        let dk = unrotate(unshare(dk)?, kv_heads)?;
        let dv = merge(unshare(dv)?, kv_heads)?;
        Ok((dq, dk, dv))
    }
}

/// `op(a) op(b)` for each head of contiguous `[b, heads, r, c]` tensors, `op` transposing an
/// operand marked `true`: on the CPU in f32/f64 the causal-aware per-head products (about half
/// the arithmetic, heads as the parallel tasks), elsewhere candle's batched matmul, which
/// computes the entries `causal` marks as unneeded too (they are zero or never read).
fn heads_product(
    (a, ta): (&Tensor, bool),
    (b, tb): (&Tensor, bool),
    causal: Causal,
) -> candle_core::Result<Tensor> {
    let op = |x: &Tensor, t: bool| if t { x.t() } else { Ok(x.clone()) };
    if !head_matmul_applies(a) {
        return op(a, ta)?.matmul(&op(b, tb)?);
    }
    let (n0, n1, _, _) = a.dims4()?;
    let (fa, fb) = (flat_heads(a)?, flat_heads(b)?);
    let operand = |tensor, transposed| Operand { tensor, transposed };
    let c = head_matmul(operand(&fa, ta), operand(&fb, tb), causal)?;
    let (_, m, p) = c.dims3()?;
    c.reshape((n0, n1, m, p))
}

/// `[b, heads, r, c] -> [b * heads, r, c]`, contiguous.
fn flat_heads(x: &Tensor) -> candle_core::Result<Tensor> {
    let (n0, n1, r, c) = x.dims4()?;
    x.contiguous()?.reshape((n0 * n1, r, c))
}

/// Whether the probabilities and their gradients can come from the blockwise products with
/// the softmax fused ([`causal_probs`], [`causal_score_grads`]): the CPU products apply and the
/// softmax runs in the products' dtype.
fn softmax_fuses(x: &Tensor, softmax: DType) -> bool {
    head_matmul_applies(x) && x.dtype() == softmax
}

fn cast(x: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
    x.to_dtype(dtype)
}

/// `[b, kv_heads, t, d] -> [b, heads, t, d]`, each key/value head shared by its query group.
pub(crate) fn repeat_kv(x: Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (b, kv, t, d) = x.dims4()?;
    if heads == kv {
        return Ok(x);
    }
    let rep = heads / kv;
    x.unsqueeze(2)?
        .broadcast_as((b, kv, rep, t, d))?
        .contiguous()?
        .reshape((b, kv * rep, t, d))
}

/// Whether [`causal_attention`] has kernels for projections like `q` with tables like `cos`: the
/// fused ops are on, and `q` is f32/f64 on the CPU or f32 on CUDA, in the tables' dtype.
pub fn fused_attention_applies(q: &Tensor, cos: &Tensor) -> bool {
    super::has_kernel(q) && q.dtype() == cos.dtype()
}

/// Causal attention over projected `q [b*t, heads*d]`, `k`, `v [b*t, kv_heads*d]`, with rotary
/// tables `cos`, `sin [positions >= t, d]`: `softmax(q kᵀ / sqrt(d)) v` per head, as
/// `[b*t, heads*d]` in `q`'s dtype, and one node of the autograd graph. `matmul` is the dtype of
/// the two products (bf16 for mixed precision; `None`: `q`'s). On CUDA with bf16 products the
/// softmax reads and writes bf16 (its arithmetic is f32); elsewhere it runs in `q`'s dtype.
///
/// Needs [`fused_attention_applies`]; the model uses the composed ops otherwise.
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    h: Heads,
    matmul: Option<DType>,
) -> candle_core::Result<Tensor> {
    let (out, saved) = attention_forward(q, k, v, cos, sin, h, (matmul, q.dtype()))?;
    let node = AttentionNode {
        saved,
        out: Precomputed::new("attention", out),
    };
    q.apply_op3(k, v, node)
}

/// [`causal_attention`] outside the graph: the result in `result` and what
/// [`AttentionSaved::backward`] needs, for code that chains backward passes by hand. A caller
/// that feeds the result to a bf16 product asks for it in bf16: the heads are merged in the
/// dtype of their product, with no round trip through `q`'s dtype (the same values: widening
/// a bf16 value and rounding it back is exact).
pub(crate) fn attention_forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    h: Heads,
    (matmul, result): (Option<DType>, DType),
) -> candle_core::Result<(Tensor, AttentionSaved)> {
    let Heads {
        batch: b,
        seq: t,
        heads,
        kv_heads,
        head_dim: d,
    } = h;
    if kv_heads == 0 || heads % kv_heads != 0 || d % 2 != 0 {
        candle_core::bail!("attention: {heads} query heads, {kv_heads} key/value heads, width {d}");
    }
    for (name, x, n) in [("q", q, heads), ("k", k, kv_heads), ("v", v, kv_heads)] {
        if x.dims() != [b * t, n * d] {
            candle_core::bail!(
                "attention: {name} is {:?}, expected [{}, {}]",
                x.dims(),
                b * t,
                n * d
            );
        }
    }
    let param = q.dtype();
    let mm = matmul.unwrap_or(param);
    // [b*t, n*d] -> [b, n, t, d], outside the graph.
    let split = |x: &Tensor, n: usize| -> candle_core::Result<Tensor> {
        x.detach()
            .reshape((b, t, n, d))?
            .transpose(1, 2)?
            .contiguous()
    };
    // Rotated heads, in one pass where the CPU kernel applies.
    let rotated = |x: &Tensor, n: usize| -> candle_core::Result<Tensor> {
        match rotate_moving_heads(&x.detach(), cos, sin, (b, t, n, d), HeadMove::Split)? {
            Some(r) => Ok(r),
            None => rotary(&split(x, n)?, cos, sin),
        }
    };
    let qr = cast(&rotated(q, heads)?, mm)?;
    let kr = cast(&repeat_kv(rotated(k, kv_heads)?, heads)?, mm)?;
    let vr = cast(&repeat_kv(split(v, kv_heads)?, heads)?, mm)?;
    let scale = 1.0 / (d as f64).sqrt();
    // [b, heads, t, d] x [b, heads, d, t] -> [b, heads, t, t]
    let probs = if softmax_fuses(&qr, param) {
        causal_probs(&flat_heads(&qr)?, &flat_heads(&kr)?, scale)?.reshape((b, heads, t, t))?
    } else {
        let scores = heads_product((&qr, false), (&kr, true), Causal::LowerResult)?;
        if scores.dtype() == DType::BF16 && scores.device().is_cuda() {
            causal_softmax(&scores, scale)?
        } else {
            causal_softmax(&cast(&scores, param)?, scale)?
        }
    };
    let probs_mm = cast(&probs, mm)?;
    // [b, heads, t, t] x [b, heads, t, d] -> [b, heads, t, d] -> [b*t, heads*d]
    let out = cast(
        &heads_product((&probs_mm, false), (&vr, false), Causal::LowerLeft)?,
        result,
    )?
    .transpose(1, 2)?
    .reshape((b * t, heads * d))?
    .contiguous()?;
    let saved = AttentionSaved {
        heads: h,
        scale,
        cos: cos.clone(),
        sin: sin.clone(),
        param,
        q: qr,
        k: kr,
        v: vr,
        probs,
        probs_mm,
    };
    Ok((out, saved))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::attention::{causal_mask, softmax_last_dim};
    use crate::model::rope::Rope;
    use crate::ops::float::max_abs_diff as max_diff;
    use candle_core::{Device, Var};

    /// The same attention from candle's differentiable ops, the reference.
    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, rope: &Rope, h: Heads) -> Tensor {
        let Heads {
            batch: b,
            seq: t,
            heads,
            kv_heads,
            head_dim: d,
        } = h;
        let split = |x: &Tensor, n: usize| {
            x.reshape((b, t, n, d))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let q = rope.apply_composed(&split(q, heads)).unwrap();
        let k = repeat_kv(rope.apply_composed(&split(k, kv_heads)).unwrap(), heads).unwrap();
        let v = repeat_kv(split(v, kv_heads), heads).unwrap();
        let scores = (q.matmul(&k.t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
        let probs = softmax_last_dim(
            &scores
                .broadcast_add(&causal_mask(t, &scores).unwrap())
                .unwrap(),
        )
        .unwrap();
        probs
            .matmul(&v)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b * t, heads * d))
            .unwrap()
    }

    #[test]
    fn values_and_gradients_equal_the_composed_ops() {
        for (b, t, heads, kv_heads, d) in [
            (1, 1, 1, 1, 2),
            (2, 5, 4, 4, 6),
            (1, 9, 4, 2, 8),
            (2, 7, 6, 1, 4),
        ] {
            let h = Heads {
                batch: b,
                seq: t,
                heads,
                kv_heads,
                head_dim: d,
            };
            let rope = Rope::new(d, 16, 10_000.0, DType::F64, &Device::Cpu).unwrap();
            let var = |n: usize| Var::randn(0f64, 1.0, (b * t, n * d), &Device::Cpu).unwrap();
            let (q, k, v) = (var(heads), var(kv_heads), var(kv_heads));
            let (cos, sin) = rope.tables();
            let fused = causal_attention(&q, &k, &v, cos, sin, h, None).unwrap();
            let reference = composed(&q, &k, &v, &rope, h);
            let case = format!("b {b} t {t} heads {heads}/{kv_heads} d {d}");
            assert!(max_diff(&fused, &reference) < 1e-13, "values, {case}");
            let (gf, gc) = crate::ops::float::probed_grads(&fused, &reference);
            for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
                let diff = max_diff(gf.get(x).unwrap(), gc.get(x).unwrap());
                assert!(diff < 1e-12, "d{name} differs by {diff}, {case}");
            }
        }
    }

    /// With bf16 products (mixed precision) the node runs the products in bf16 both ways:
    /// values and gradients agree with the f32 reference to bf16 rounding, not better.
    #[test]
    fn bf16_products_agree_with_f32_to_bf16_rounding() {
        let h = Heads {
            batch: 2,
            seq: 12,
            heads: 4,
            kv_heads: 2,
            head_dim: 8,
        };
        let rope = Rope::new(8, 16, 10_000.0, DType::F32, &Device::Cpu).unwrap();
        let var = |n: usize| Var::randn(0f32, 1.0, (24, n * 8), &Device::Cpu).unwrap();
        let (q, k, v) = (var(4), var(2), var(2));
        let (cos, sin) = rope.tables();
        let mixed = causal_attention(&q, &k, &v, cos, sin, h, Some(DType::BF16)).unwrap();
        let full = causal_attention(&q, &k, &v, cos, sin, h, None).unwrap();
        assert_eq!(mixed.dtype(), DType::F32);
        let scale = full
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        let diff = max_diff(&mixed, &full);
        assert!(
            diff > 0.0 && diff < 0.05 * scale,
            "bf16 values differ by {diff}"
        );
        let (gm, gf) = crate::ops::float::probed_grads(&mixed, &full);
        for x in [&q, &k, &v] {
            let (a, b) = (gm.get(x).unwrap(), gf.get(x).unwrap());
            let scale = b
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64;
            let diff = max_diff(a, b);
            assert!(
                diff < 0.05 * scale,
                "bf16 gradient differs by {diff} (scale {scale})"
            );
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let rope = Rope::new(4, 8, 10_000.0, DType::F32, &Device::Cpu).unwrap();
        let (cos, sin) = rope.tables();
        let x = |r: usize, c: usize| Tensor::zeros((r, c), DType::F32, &Device::Cpu).unwrap();
        let h = Heads {
            batch: 1,
            seq: 3,
            heads: 2,
            kv_heads: 2,
            head_dim: 4,
        };
        assert!(causal_attention(&x(3, 8), &x(3, 8), &x(3, 8), cos, sin, h, None).is_ok());
        assert!(causal_attention(&x(3, 8), &x(3, 4), &x(3, 8), cos, sin, h, None).is_err());
        let three_of_two = Heads { kv_heads: 3, ..h };
        assert!(
            causal_attention(&x(3, 8), &x(3, 12), &x(3, 12), cos, sin, three_of_two, None).is_err()
        );
        // Longer than the rotary tables.
        let long = Heads { seq: 9, ..h };
        assert!(causal_attention(&x(9, 8), &x(9, 8), &x(9, 8), cos, sin, long, None).is_err());
    }
}
