//! A whole decoder layer as one autograd node, for training.
//!
//! candle's backward pass adds the gradient of every node into a freshly zeroed buffer, so each
//! edge of the graph costs an allocation, a fill and a full read-add-write of the activation, and
//! on a GPU two more kernel launches. A layer built from the fused ops is still about seventeen
//! such edges (the residual stream, the normalised inputs that three or two projections read,
//! each projection's output, the MLP's `[n, intermediate]` activations). As one node the layer's
//! forward runs the same ops outside the graph and keeps what the backward reads; the backward
//! chains the ops' own backward functions by hand, adds each activation's gradients directly,
//! and hands the parameters' gradients to a [`ParamGrads`] collector, since a custom op passes
//! gradients only to its (at most three) inputs. The trainer merges them into candle's gradient
//! store after `backward()`.
//!
//! The node applies where every op of the layer has its fused kernel and no adapter input is
//! dropped out (dropout masks would have to be saved too); elsewhere the layer runs on the graph.

use super::layer::Layer;
use crate::ops::add_in_place::{add_in_place, add_to_sum};
use crate::ops::attention::{attention_forward, fused_attention_applies, AttentionSaved};
use crate::ops::linear_backward::{linear_backward, linear_backward_add};
use crate::ops::lora_linear::{lora_linear_backward, lora_linear_step, StepWeight};
use crate::ops::mixed_linear::{mixed_linear_backward, mixed_linear_cast};
use crate::ops::precomputed::Precomputed;
use crate::ops::rms_norm::rms_norm_backward;
use crate::ops::swiglu::swiglu_backward;
use crate::ops::{rms_norm_fused, swiglu, Heads};
use crate::profile::region;
use crate::relora::linear::lora_kernel_applies;
use crate::relora::AdaptableLinear;
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use std::sync::{Arc, Mutex};

/// Gradients of parameters computed inside hand-chained backward passes, collected during
/// `backward()` and merged into its gradient store afterwards.
#[derive(Clone, Default)]
pub struct ParamGrads(Arc<Mutex<Vec<(Tensor, Tensor)>>>);

impl ParamGrads {
    /// An empty collector.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `grad` for the parameter tensor `param`.
    fn push(&self, param: &Tensor, grad: Tensor) -> candle_core::Result<()> {
        self.0
            .lock()
            .map_err(|_| candle_core::Error::Msg("parameter gradients lock poisoned".into()))?
            .push((param.clone(), grad));
        Ok(())
    }

    /// Moves every collected gradient into `grads`, adding to a gradient the store already has
    /// for the same parameter.
    pub fn merge_into(&self, grads: &mut GradStore) -> candle_core::Result<()> {
        let collected =
            std::mem::take(&mut *self.0.lock().map_err(|_| {
                candle_core::Error::Msg("parameter gradients lock poisoned".into())
            })?);
        for (param, grad) in collected {
            let grad = match grads.remove(&param) {
                Some(existing) => (existing + grad)?,
                None => grad,
            };
            grads.insert(&param, grad);
        }
        Ok(())
    }
}

/// How one projection ran forward, and what its backward needs besides its input.
///
/// In mixed precision the weight's cast to the compute dtype is made once, in the forward, and
/// kept for the backward (as PyTorch's autocast caches the casts of its weights), instead of
/// each pass casting the f32 master again: half the weight casts of a step, for the memory of
/// the casts of one step's weights.
enum Projection {
    /// `x Wᵀ` in the parameter dtype; `W` trainable.
    Plain { weight: Tensor },
    /// `x Wᵀ` with the product in `compute` (bf16 mixed precision) on `weight_compute`, `W`'s
    /// cast; `W` trainable.
    Mixed {
        weight: Tensor,
        weight_compute: Tensor,
        compute: DType,
    },
    /// `x Wᵀ + s (x Aᵀ) Bᵀ` with `W` frozen; `step` is what its products read: the effective
    /// weight `W + s B A`, or in mixed precision `W`'s cast.
    Adapter {
        weight: Tensor,
        step: StepWeight,
        a: Tensor,
        b: Tensor,
        scale: f64,
        compute: Option<DType>,
    },
}

impl Projection {
    /// Runs `p` on `x [n, in]` outside the graph, as `AdaptableLinear::forward` does without
    /// dropout: `[n, out]` in the parameter dtype and how to differentiate it. With `compute`
    /// set, `x` may already be in it ([`to_compute`]).
    fn forward(
        p: &AdaptableLinear,
        x: &Tensor,
        compute: Option<DType>,
    ) -> candle_core::Result<(Tensor, Self)> {
        let weight = p.weight.as_tensor().clone();
        match &p.adapter {
            Some(ad) => {
                let (a, b) = (ad.a.as_tensor().clone(), ad.b.as_tensor().clone());
                let (ad_a, ad_b) = (&a.detach(), &b.detach());
                let rows = x.dim(0)?;
                let step =
                    StepWeight::choose(rows, (&weight, ad_a, ad_b), ad.scale, compute, true)?;
                let y = lora_linear_step(x, (&weight, &step), (ad_a, ad_b), ad.scale, compute)?;
                let back = Projection::Adapter {
                    weight,
                    step,
                    a,
                    b,
                    scale: ad.scale,
                    compute,
                };
                Ok((y, back))
            }
            None => match compute {
                Some(dt) if dt != weight.dtype() => {
                    let weight_compute = weight.detach().to_dtype(dt)?;
                    let y = mixed_linear_cast(x, (&weight, &weight_compute), dt)?;
                    Ok((
                        y,
                        Projection::Mixed {
                            weight,
                            weight_compute,
                            compute: dt,
                        },
                    ))
                }
                _ => {
                    let y = crate::ops::dense_product::linear(x, &weight.detach())?;
                    Ok((y, Projection::Plain { weight }))
                }
            },
        }
    }

    /// The input's gradient from the output's `dy`; the parameters' gradients go to `sink`.
    /// With `dx_sum` (the input gradients of the projections before it that read the same
    /// input), `dx_sum` plus that gradient, added where `dx_sum` lies when the op can (a plain
    /// projection on the CPU adds its product into it), so the caller must hold it alone.
    fn backward(
        &self,
        x: &Tensor,
        dy: &Tensor,
        sink: &ParamGrads,
        dx_sum: Option<Tensor>,
    ) -> candle_core::Result<Tensor> {
        match self {
            Projection::Plain { weight } => {
                // [n, out] x [out, in] and [out, n] x [n, in], side by side.
                let w = weight.detach();
                let (dx, dw) = match dx_sum {
                    Some(sum) => linear_backward_add(x, &w, dy, sum)?,
                    None => linear_backward(x, &w, dy)?,
                };
                sink.push(weight, dw)?;
                Ok(dx)
            }
            Projection::Mixed {
                weight,
                weight_compute,
                compute,
            } => {
                let (dx, dw) =
                    mixed_linear_backward(x, (weight, Some(weight_compute)), dy, *compute)?;
                sink.push(weight, dw)?;
                add_to_sum(dx, dx_sum)
            }
            Projection::Adapter {
                weight,
                step,
                a,
                b,
                scale,
                compute,
            } => {
                let (dx, da, db) = lora_linear_backward(
                    x,
                    (weight, step),
                    (&a.detach(), &b.detach()),
                    *scale,
                    *compute,
                    dy,
                    dx_sum,
                )?;
                sink.push(a, da)?;
                sink.push(b, db)?;
                Ok(dx)
            }
        }
    }
}

/// Whether [`layer_node`] can run `layer` on `x [n, hidden]`: the calling trainer uses layer
/// nodes ([`crate::engine::Engine::layer_nodes`]; off, every layer runs on candle's graph as
/// [`super::Llama::forward`] does), every op has its fused kernel for `x`'s device and dtype,
/// and no adapter input is dropped out.
pub(crate) fn layer_node_applies(layer: &Layer, x: &Tensor, cos: &Tensor, dropout_p: f64) -> bool {
    if !crate::engine::current().layer_nodes || !fused_attention_applies(x, cos) {
        return false;
    }
    let adapters_fit = |p: &AdaptableLinear, compute: Option<DType>| {
        p.adapter.is_none() || (dropout_p == 0.0 && lora_kernel_applies(x, compute))
    };
    let (att, mlp) = (&layer.self_attn, &layer.mlp);
    [&att.q_proj, &att.k_proj, &att.v_proj, &att.o_proj]
        .into_iter()
        .all(|p| adapters_fit(p, att.compute))
        && [&mlp.gate_proj, &mlp.up_proj, &mlp.down_proj]
            .into_iter()
            .all(|p| adapters_fit(p, mlp.compute))
}

/// Everything the layer's backward reads, computed by its forward outside the graph.
struct LayerNode {
    eps: f64,
    /// The layer's input `[n, hidden]`, detached.
    x: Tensor,
    /// RMSNorm weights (the parameters, for their gradients' keys).
    input_norm: Tensor,
    post_norm: Tensor,
    /// `rmsnorm(x)`, the input of q, k and v `[n, hidden]`; in mixed precision its cast to the
    /// compute dtype, which is all the products read.
    normed: Tensor,
    q: Projection,
    k: Projection,
    v: Projection,
    attention: AttentionSaved,
    /// The attention's result, the input of o `[n, heads*d]` (cast as `normed` is).
    attended: Tensor,
    o: Projection,
    /// `x + o(attended)`, the residual stream after attention `[n, hidden]`.
    mid: Tensor,
    /// `rmsnorm(mid)`, the input of gate and up `[n, hidden]` (cast as `normed` is).
    normed_mid: Tensor,
    gate: Projection,
    up: Projection,
    /// gate and up outputs `[n, intermediate]`.
    g: Tensor,
    u: Tensor,
    /// `swiglu(g, u)`, the input of down `[n, intermediate]` (cast as `normed` is).
    act: Tensor,
    down: Projection,
    sink: ParamGrads,
    out: Precomputed,
}

impl LayerNode {
    /// The input gradient of the RMSNorm with weight `w` at input `x` from its output's `dy`;
    /// the weight's gradient goes to the sink.
    fn norm_backward(&self, x: &Tensor, w: &Tensor, dy: &Tensor) -> candle_core::Result<Tensor> {
        region("layer bwd norm", dy.device(), || {
            let (dx, dw) = rms_norm_backward(x, w, dy, self.eps)?;
            self.sink.push(w, dw)?;
            Ok(dx)
        })
    }
}

impl CustomOp1 for LayerNode {
    fn name(&self) -> &'static str {
        "decoder-layer"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.out.cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.out.cuda()
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let s = &self.sink;
        let dev = dy.device();
        // y = mid + down(swiglu(gate(c), up(c))), c = rmsnorm(mid)
        let dact = region("layer bwd down", dev, || {
            self.down.backward(&self.act, dy, s, None)
        })?;
        let (dg, du) = region("layer bwd swiglu", dev, || {
            swiglu_backward(&self.g, &self.u, &dact)
        })?;
        let dc = region("layer bwd gate up", dev, || {
            let dc = self.gate.backward(&self.normed_mid, &dg, s, None)?;
            self.up.backward(&self.normed_mid, &du, s, Some(dc))
        })?;
        let dmid = self.norm_backward(&self.mid, &self.post_norm, &dc)?;
        let dmid = region("layer bwd residual", dev, || add_in_place(dmid, dy))?;
        // mid = x + o(attention(q(a), k(a), v(a))), a = rmsnorm(x)
        let dattended = region("layer bwd o", dev, || {
            self.o.backward(&self.attended, &dmid, s, None)
        })?;
        let (dq, dk, dv) = region("layer bwd attention", dev, || {
            self.attention.backward(&dattended)
        })?;
        let da = region("layer bwd q k v", dev, || {
            let da = self.q.backward(&self.normed, &dq, s, None)?;
            let da = self.k.backward(&self.normed, &dk, s, Some(da))?;
            self.v.backward(&self.normed, &dv, s, Some(da))
        })?;
        let dx = self.norm_backward(&self.x, &self.input_norm, &da)?;
        Ok(Some(region("layer bwd residual", dev, || {
            add_in_place(dx, &dmid)
        })?))
    }
}

/// `t` in the compute dtype when there is one: the input of one or more mixed-precision
/// projections, cast once for all of them and kept in that dtype for their backward, instead of
/// each projection casting its own copy forward and again backward.
fn to_compute(t: Tensor, compute: Option<DType>) -> candle_core::Result<Tensor> {
    match compute {
        Some(dt) => t.to_dtype(dt),
        None => Ok(t),
    }
}

/// `layer` on `x [b*t, hidden]` as one node of the graph (see the module documentation); the
/// parameters' gradients go to `sink` during `backward()`. Needs [`layer_node_applies`].
pub(crate) fn layer_node(
    layer: &Layer,
    x: &Tensor,
    (b, t): (usize, usize),
    (cos, sin): (&Tensor, &Tensor),
    eps: f64,
    sink: &ParamGrads,
) -> candle_core::Result<Tensor> {
    let (att, mlp) = (&layer.self_attn, &layer.mlp);
    let dev = x.device();
    let xd = x.detach();
    let input_norm = layer.input_layernorm.as_tensor().clone();
    let post_norm = layer.post_attention_layernorm.as_tensor().clone();
    let normed = region("layer fwd norm", dev, || {
        to_compute(rms_norm_fused(&xd, &input_norm.detach(), eps)?, att.compute)
    })?;
    let ((q_out, q), (k_out, k), (v_out, v)) = region("layer fwd q k v", dev, || {
        Ok::<_, candle_core::Error>((
            Projection::forward(&att.q_proj, &normed, att.compute)?,
            Projection::forward(&att.k_proj, &normed, att.compute)?,
            Projection::forward(&att.v_proj, &normed, att.compute)?,
        ))
    })?;
    let heads = Heads {
        batch: b,
        seq: t,
        heads: att.heads,
        kv_heads: att.kv_heads,
        head_dim: att.head_dim,
    };
    let (attended, attention) = region("layer fwd attention", dev, || {
        // The result in the compute dtype, which is all o's product reads.
        let dtypes = (att.compute, att.compute.unwrap_or(q_out.dtype()));
        attention_forward(&q_out, &k_out, &v_out, cos, sin, heads, dtypes)
    })?;
    drop((q_out, k_out, v_out));
    let (o_out, o) = region("layer fwd o", dev, || {
        Projection::forward(&att.o_proj, &attended, att.compute)
    })?;
    let mid = region("layer fwd residual", dev, || add_in_place(o_out, &xd))?;
    let normed_mid = region("layer fwd norm", dev, || {
        to_compute(rms_norm_fused(&mid, &post_norm.detach(), eps)?, mlp.compute)
    })?;
    let ((g, gate), (u, up)) = region("layer fwd gate up", dev, || {
        Ok::<_, candle_core::Error>((
            Projection::forward(&mlp.gate_proj, &normed_mid, mlp.compute)?,
            Projection::forward(&mlp.up_proj, &normed_mid, mlp.compute)?,
        ))
    })?;
    let act = region("layer fwd swiglu", dev, || {
        to_compute(swiglu(&g, &u)?, mlp.compute)
    })?;
    let (down_out, down) = region("layer fwd down", dev, || {
        Projection::forward(&mlp.down_proj, &act, mlp.compute)
    })?;
    let y = region("layer fwd residual", dev, || add_in_place(down_out, &mid))?;
    let node = LayerNode {
        eps,
        x: xd,
        input_norm,
        post_norm,
        normed,
        q,
        k,
        v,
        attention,
        attended,
        o,
        mid,
        normed_mid,
        gate,
        up,
        g,
        u,
        act,
        down,
        sink: sink.clone(),
        out: Precomputed::new("decoder layer", y),
    };
    x.apply_op1(node)
}
