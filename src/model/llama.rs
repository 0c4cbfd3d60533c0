//! The LLaMA decoder: token embedding, `num_hidden_layers` pre-norm blocks of attention and
//! SwiGLU, a final RMSNorm and the language-model head, with Hugging Face tensor names.

use super::attention::Attention;
use super::layer::Layer;
use super::layer_node::{layer_node, layer_node_applies, ParamGrads};
use super::mlp::Mlp;
use super::norm::rms_norm;
use super::rope::Rope;
use crate::config::ModelConfig;
use crate::error::{Error, Result, TensorContext};
use crate::init;
use crate::profile::region;
use crate::relora::linear::reborrow;
use crate::relora::AdaptableLinear;
use crate::rng::Rng;
use candle_core::{DType, Device, Tensor, Var};
use std::collections::HashMap;

/// A LLaMA causal language model whose parameters are candle `Var`s.
pub struct Llama {
    /// The shape of the model.
    pub config: ModelConfig,
    /// `model.embed_tokens.weight [vocab, hidden]`.
    pub embed_tokens: Var,
    /// The decoder blocks.
    pub layers: Vec<Layer>,
    /// `model.norm.weight [hidden]`.
    pub norm: Var,
    /// `lm_head.weight [vocab, hidden]`; `None` when tied to the embedding.
    pub lm_head: Option<Var>,
    rope: Rope,
    dtype: DType,
    compute: Option<DType>,
    device: Device,
}

/// Whether a parameter is a matrix that receives weight decay (2-D) or a vector that does not.
pub(crate) fn is_decayed(name: &str, shape: &[usize]) -> bool {
    let _ = name;
    shape.len() >= 2
}

impl Llama {
    /// A freshly initialised model: matrices Normal(0, initializer_range), norms 1.
    pub fn new(config: &ModelConfig, dtype: DType, device: &Device, rng: &mut Rng) -> Result<Self> {
        config.validate()?;
        let c = config;
        let (h, d) = (c.hidden_size, c.head_dim());
        let std = c.initializer_range;
        let mat =
            |name: String, out: usize, inp: usize, rng: &mut Rng| -> Result<AdaptableLinear> {
                let w = init::normal(&[out, inp], std, dtype, device, rng)?;
                Ok(AdaptableLinear {
                    weight: Var::from_tensor(&w).with_ctx(|| name.clone())?,
                    name,
                    adapter: None,
                })
            };
        let embed = init::normal(&[c.vocab_size, h], std, dtype, device, rng)?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let self_attn = Attention {
                q_proj: mat(
                    format!("{p}.self_attn.q_proj"),
                    c.num_attention_heads * d,
                    h,
                    rng,
                )?,
                k_proj: mat(format!("{p}.self_attn.k_proj"), c.kv_heads() * d, h, rng)?,
                v_proj: mat(format!("{p}.self_attn.v_proj"), c.kv_heads() * d, h, rng)?,
                o_proj: mat(
                    format!("{p}.self_attn.o_proj"),
                    h,
                    c.num_attention_heads * d,
                    rng,
                )?,
                heads: c.num_attention_heads,
                kv_heads: c.kv_heads(),
                head_dim: d,
                compute: None,
            };
            let mlp = Mlp {
                gate_proj: mat(format!("{p}.mlp.gate_proj"), c.intermediate_size, h, rng)?,
                up_proj: mat(format!("{p}.mlp.up_proj"), c.intermediate_size, h, rng)?,
                down_proj: mat(format!("{p}.mlp.down_proj"), h, c.intermediate_size, rng)?,
                compute: None,
            };
            layers.push(Layer {
                input_layernorm: Var::from_tensor(&init::ones(&[h], dtype, device)?).ctx("norm")?,
                self_attn,
                post_attention_layernorm: Var::from_tensor(&init::ones(&[h], dtype, device)?)
                    .ctx("norm")?,
                mlp,
            });
        }
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            let w = init::normal(&[c.vocab_size, h], std, dtype, device, rng)?;
            Some(Var::from_tensor(&w).ctx("lm_head")?)
        };
        let rope = Rope::new(d, c.max_position_embeddings, c.rope_theta, dtype, device)
            .ctx("rotary tables")?;
        Ok(Llama {
            config: c.clone(),
            embed_tokens: Var::from_tensor(&embed).ctx("embed_tokens")?,
            layers,
            norm: Var::from_tensor(&init::ones(&[h], dtype, device)?).ctx("norm")?,
            lm_head,
            rope,
            dtype,
            compute: None,
            device: device.clone(),
        })
    }

    /// The parameter dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Runs the matmuls in `compute` (e.g. bf16) on copies of the parameters, keeping the
    /// parameters, norms, softmax, residual stream and loss in the parameter dtype. `None` or the
    /// parameter dtype itself turns mixed precision off.
    pub fn set_compute_dtype(&mut self, compute: Option<DType>) {
        let compute = compute.filter(|c| *c != self.dtype);
        self.compute = compute;
        for l in &mut self.layers {
            l.self_attn.compute = compute;
            l.mlp.compute = compute;
        }
    }

    /// The matmul dtype under mixed precision, if any.
    pub fn compute_dtype(&self) -> Option<DType> {
        self.compute
    }

    /// The device holding the parameters.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Logits `[b, t, vocab]` for token ids `[b, t]` (u32). `dropout` applies to adapter inputs.
    /// Every op is a node of candle's graph, so `backward()` on a loss of these logits gives
    /// every parameter's gradient.
    pub fn forward(&self, ids: &Tensor, dropout: Option<(&mut Rng, f64)>) -> Result<Tensor> {
        self.forward_impl(ids, dropout, None)
    }

    /// [`Self::forward`] for training: each decoder layer whose ops all have fused kernels runs
    /// as one graph node with a hand-chained backward (`model/layer_node.rs`), which saves
    /// candle's per-edge gradient buffers. Those layers' parameter gradients arrive in `grads`
    /// during `backward()`; [`ParamGrads::merge_into`] then moves them into the gradient store,
    /// which afterwards holds what [`Self::forward`]'s graph would have given.
    pub fn forward_for_training(
        &self,
        ids: &Tensor,
        dropout: Option<(&mut Rng, f64)>,
        grads: &ParamGrads,
    ) -> Result<Tensor> {
        self.forward_impl(ids, dropout, Some(grads))
    }

    fn forward_impl(
        &self,
        ids: &Tensor,
        mut dropout: Option<(&mut Rng, f64)>,
        sink: Option<&ParamGrads>,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2().ctx("token ids must be [batch, seq]")?;
        if t > self.config.max_position_embeddings {
            return Err(Error::Data(format!(
                "sequence length {t} exceeds max_position_embeddings {}",
                self.config.max_position_embeddings
            )));
        }
        let eps = self.config.rms_norm_eps;
        let flat_ids = ids.flatten_all().ctx("ids")?;
        // [b*t] -> [b*t, hidden]
        let dev = ids.device();
        let mut x = region("fwd embedding", dev, || {
            self.embed_tokens.as_tensor().embedding(&flat_ids)
        })
        .ctx("embedding lookup")?;
        let dropout_p = dropout.as_ref().map_or(0.0, |d| d.1);
        let (cos, sin) = self.rope.tables();
        for (i, layer) in self.layers.iter().enumerate() {
            if let Some(sink) = sink {
                if layer_node_applies(layer, &x, cos, dropout_p) {
                    x = layer_node(layer, &x, (b, t), (cos, sin), eps, sink)
                        .with_ctx(|| format!("layer {i}"))?;
                    continue;
                }
            }
            x = region("graph layer fwd", dev, || {
                let normed = rms_norm(&x, layer.input_layernorm.as_tensor(), eps)
                    .with_ctx(|| format!("layer {i} input_layernorm"))?;
                let attn =
                    layer
                        .self_attn
                        .forward(&normed, (b, t), &self.rope, reborrow(&mut dropout))?;
                let x = (&x + attn).with_ctx(|| format!("layer {i} attention residual"))?;
                let normed = rms_norm(&x, layer.post_attention_layernorm.as_tensor(), eps)
                    .with_ctx(|| format!("layer {i} post_attention_layernorm"))?;
                let mlp = layer.mlp.forward(&normed, reborrow(&mut dropout))?;
                (x + mlp).with_ctx(|| format!("layer {i} mlp residual"))
            })?;
        }
        let x = region("fwd final norm", dev, || {
            rms_norm(&x, self.norm.as_tensor(), eps)
        })
        .ctx("final norm")?;
        let head = self
            .lm_head
            .as_ref()
            .unwrap_or(&self.embed_tokens)
            .as_tensor();
        // [b*t, hidden] x [hidden, vocab] -> [b, t, vocab]
        region("fwd lm_head", dev, || {
            let logits = match self.compute {
                Some(dt) => x
                    .to_dtype(dt)?
                    .matmul(&head.to_dtype(dt)?.t()?)?
                    .to_dtype(self.dtype)?,
                None => x.matmul(&head.t()?)?,
            };
            logits.reshape((b, t, self.config.vocab_size))
        })
        .ctx("lm_head")
    }

    /// Every projection, in a fixed order (layer by layer: q, k, v, o, gate, up, down).
    pub fn projections(&self) -> Vec<&AdaptableLinear> {
        self.layers
            .iter()
            .flat_map(|l| {
                [
                    &l.self_attn.q_proj,
                    &l.self_attn.k_proj,
                    &l.self_attn.v_proj,
                    &l.self_attn.o_proj,
                    &l.mlp.gate_proj,
                    &l.mlp.up_proj,
                    &l.mlp.down_proj,
                ]
            })
            .collect()
    }

    /// Mutable access to every projection, in the order of [`Llama::projections`].
    pub(crate) fn projections_mut(&mut self) -> Vec<&mut AdaptableLinear> {
        self.layers
            .iter_mut()
            .flat_map(|l| {
                [
                    &mut l.self_attn.q_proj,
                    &mut l.self_attn.k_proj,
                    &mut l.self_attn.v_proj,
                    &mut l.self_attn.o_proj,
                    &mut l.mlp.gate_proj,
                    &mut l.mlp.up_proj,
                    &mut l.mlp.down_proj,
                ]
            })
            .collect()
    }

    /// The parameters that are never adapted (embedding, norms, lm_head), with their HF names.
    pub fn dense_params(&self) -> Vec<(String, Var)> {
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            self.embed_tokens.clone(),
        )];
        for (i, l) in self.layers.iter().enumerate() {
            out.push((
                format!("model.layers.{i}.input_layernorm.weight"),
                l.input_layernorm.clone(),
            ));
            out.push((
                format!("model.layers.{i}.post_attention_layernorm.weight"),
                l.post_attention_layernorm.clone(),
            ));
        }
        out.push(("model.norm.weight".to_string(), self.norm.clone()));
        if let Some(h) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), h.clone()));
        }
        out
    }

    /// The parameters that currently receive gradients, in a fixed order: the dense parameters,
    /// then per projection either its weight (no adapter) or its adapter's A and B.
    pub fn trainable_params(&self) -> Vec<(String, Var)> {
        let mut out = self.dense_params();
        for p in self.projections() {
            match &p.adapter {
                None => out.push((format!("{}.weight", p.name), p.weight.clone())),
                Some(ad) => {
                    out.push((format!("{}.lora_A", p.name), ad.a.clone()));
                    out.push((format!("{}.lora_B", p.name), ad.b.clone()));
                }
            }
        }
        out
    }

    /// The model's current weights under Hugging Face names (projection weights as they are, without
    /// any unmerged adapter).
    pub fn weights(&self) -> Vec<(String, Tensor)> {
        let mut out: Vec<(String, Tensor)> = self
            .dense_params()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect();
        for p in self.projections() {
            out.push((format!("{}.weight", p.name), p.weight.as_tensor().clone()));
        }
        out
    }

    /// Overwrites weights by Hugging Face name. Every name must exist and every shape must match;
    /// names absent from `weights` are left unchanged unless `require_all`.
    pub fn load_weights(
        &mut self,
        weights: &HashMap<String, Tensor>,
        require_all: bool,
    ) -> Result<()> {
        let mut targets: Vec<(String, Var)> = self.dense_params();
        for p in self.projections() {
            targets.push((format!("{}.weight", p.name), p.weight.clone()));
        }
        for (name, var) in &targets {
            match weights.get(name) {
                Some(t) => set_checked(name, var, t)?,
                None if require_all => {
                    return Err(Error::Shape {
                        name: name.clone(),
                        message: "missing".into(),
                    })
                }
                None => {}
            }
        }
        for name in weights.keys() {
            if !targets.iter().any(|(n, _)| n == name) {
                return Err(Error::Shape {
                    name: name.clone(),
                    message: "not a parameter of this model".into(),
                });
            }
        }
        Ok(())
    }
}

/// Copies `src` into `var` after checking the shape; converts dtype and device as needed.
pub(crate) fn set_checked(name: &str, var: &Var, src: &Tensor) -> Result<()> {
    if src.dims() != var.dims() {
        return Err(Error::Shape {
            name: name.to_string(),
            message: format!("expected {:?}, found {:?}", var.dims(), src.dims()),
        });
    }
    let t = src
        .to_dtype(var.dtype())
        .and_then(|t| t.to_device(var.device()))
        .with_ctx(|| format!("loading {name}"))?;
    var.set(&t).with_ctx(|| format!("loading {name}"))
}
