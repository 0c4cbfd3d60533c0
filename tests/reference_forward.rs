//! The model's logits against an independent float64 LLaMA written with plain loops here, sharing
//! no code with the library (Hugging Face `LlamaForCausalLM` semantics: half-rotation rotary,
//! RMSNorm, SwiGLU, grouped-query causal attention, no biases).

// Plain index loops on purpose: the reference mirrors the formulas, not idiomatic iterators.
#![allow(clippy::needless_range_loop)]

mod common;

use candle_core::{DType, Device, Tensor};
use common::{tiny, values};
use relora::model::Llama;
use relora::rng::Rng;
use std::collections::HashMap;

struct Weights(HashMap<String, (Vec<f64>, Vec<usize>)>);

impl Weights {
    fn get(&self, name: &str) -> &[f64] {
        &self.0[name].0
    }
    /// y[o] = sum_i W[o][i] x[i] for W [out, in].
    fn linear(&self, name: &str, x: &[f64]) -> Vec<f64> {
        let (w, shape) = &self.0[name];
        let (out, inp) = (shape[0], shape[1]);
        assert_eq!(x.len(), inp);
        (0..out)
            .map(|o| (0..inp).map(|i| w[o * inp + i] * x[i]).sum())
            .collect()
    }
}

fn rms_norm(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let inv = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(v, g)| v * inv * g).collect()
}

/// Half-rotation rotary on one head vector at position `pos`.
fn rotate(x: &[f64], pos: usize, theta: f64) -> Vec<f64> {
    let d = x.len();
    let half = d / 2;
    let mut out = vec![0.0; d];
    for i in 0..half {
        let freq = 1.0 / theta.powf(2.0 * i as f64 / d as f64);
        let (s, c) = (pos as f64 * freq).sin_cos();
        out[i] = x[i] * c - x[i + half] * s;
        out[i + half] = x[i + half] * c + x[i] * s;
    }
    out
}

fn reference_logits(cfg: &relora::ModelConfig, w: &Weights, ids: &[u32]) -> Vec<Vec<f64>> {
    let h = cfg.hidden_size;
    let nh = cfg.num_attention_heads;
    let nkv = cfg.kv_heads();
    let d = h / nh;
    let t = ids.len();
    let emb = w.get("model.embed_tokens.weight");
    let mut xs: Vec<Vec<f64>> = ids
        .iter()
        .map(|&id| emb[id as usize * h..(id as usize + 1) * h].to_vec())
        .collect();
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        let normed: Vec<Vec<f64>> = xs
            .iter()
            .map(|x| {
                rms_norm(
                    x,
                    w.get(&format!("{p}.input_layernorm.weight")),
                    cfg.rms_norm_eps,
                )
            })
            .collect();
        let q: Vec<Vec<f64>> = normed
            .iter()
            .map(|x| w.linear(&format!("{p}.self_attn.q_proj.weight"), x))
            .collect();
        let k: Vec<Vec<f64>> = normed
            .iter()
            .map(|x| w.linear(&format!("{p}.self_attn.k_proj.weight"), x))
            .collect();
        let v: Vec<Vec<f64>> = normed
            .iter()
            .map(|x| w.linear(&format!("{p}.self_attn.v_proj.weight"), x))
            .collect();
        let mut attn_out = vec![vec![0.0; nh * d]; t];
        for head in 0..nh {
            let kvh = head / (nh / nkv);
            for i in 0..t {
                let qi = rotate(&q[i][head * d..(head + 1) * d], i, cfg.rope_theta);
                let mut scores = Vec::with_capacity(i + 1);
                for j in 0..=i {
                    let kj = rotate(&k[j][kvh * d..(kvh + 1) * d], j, cfg.rope_theta);
                    scores.push(
                        qi.iter().zip(&kj).map(|(a, b)| a * b).sum::<f64>() / (d as f64).sqrt(),
                    );
                }
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for (j, ej) in e.iter().enumerate() {
                    for c in 0..d {
                        attn_out[i][head * d + c] += ej / z * v[j][kvh * d + c];
                    }
                }
            }
        }
        for i in 0..t {
            let o = w.linear(&format!("{p}.self_attn.o_proj.weight"), &attn_out[i]);
            for c in 0..h {
                xs[i][c] += o[c];
            }
            let n2 = rms_norm(
                &xs[i],
                w.get(&format!("{p}.post_attention_layernorm.weight")),
                cfg.rms_norm_eps,
            );
            let g = w.linear(&format!("{p}.mlp.gate_proj.weight"), &n2);
            let u = w.linear(&format!("{p}.mlp.up_proj.weight"), &n2);
            let act: Vec<f64> = g
                .iter()
                .zip(&u)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let dn = w.linear(&format!("{p}.mlp.down_proj.weight"), &act);
            for c in 0..h {
                xs[i][c] += dn[c];
            }
        }
    }
    let head = if cfg.tie_word_embeddings {
        "model.embed_tokens.weight"
    } else {
        "lm_head.weight"
    };
    xs.iter()
        .map(|x| {
            w.linear(
                head,
                &rms_norm(x, w.get("model.norm.weight"), cfg.rms_norm_eps),
            )
        })
        .collect()
}

fn compare(dtype: DType, tie: bool, tol: f64) {
    let mut cfg = tiny(50);
    cfg.tie_word_embeddings = tie;
    cfg.rms_norm_eps = 1e-5;
    cfg.rope_theta = 500.0;
    let model = Llama::new(&cfg, dtype, &Device::Cpu, &mut Rng::new(9)).unwrap();
    // Non-trivial norm weights, so a norm that ignored its weight would fail.
    let mut rng = Rng::new(10);
    for (name, var) in model.dense_params() {
        if name.contains("norm") {
            let vals: Vec<f64> = (0..var.elem_count())
                .map(|_| 1.0 + 0.3 * rng.normal())
                .collect();
            let t = Tensor::from_vec(vals, var.shape(), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            var.set(&t).unwrap();
        }
    }
    let weights = Weights(
        model
            .weights()
            .into_iter()
            .map(|(n, t)| (n, (values(&t), t.dims().to_vec())))
            .collect(),
    );
    let ids: Vec<u32> = vec![3, 17, 42, 0, 49, 8, 8, 21, 5, 33, 12];
    let reference = reference_logits(&cfg, &weights, &ids);
    let input = Tensor::from_slice(&ids, (1, ids.len()), &Device::Cpu).unwrap();
    let logits = model.forward(&input, None).unwrap();
    let got = values(&logits);
    let mut worst = 0.0f64;
    for (i, row) in reference.iter().enumerate() {
        let scale = row.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        for (j, r) in row.iter().enumerate() {
            let rel = (got[i * cfg.vocab_size + j] - r).abs() / scale;
            worst = worst.max(rel);
        }
    }
    assert!(
        worst < tol,
        "{dtype:?} tie={tie}: worst relative error {worst:e} >= {tol:e}"
    );
}

#[test]
fn float64_logits_equal_the_loop_reference() {
    compare(DType::F64, false, 1e-10);
    compare(DType::F64, true, 1e-10);
}

#[test]
fn float32_logits_equal_the_loop_reference_within_1e_5() {
    compare(DType::F32, false, 1e-5);
}
