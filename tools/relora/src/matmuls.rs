//! `relora bench --matmuls`: the matmuls of one training step on their exact shapes and
//! layouts, each timed alone, so the matmul library can be compared with PyTorch's `torch.mm`
//! on the same products (`bench/compare.py --matmuls` runs both) apart from everything else a
//! step does.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use relora::config::ModelConfig;
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// One product `C [m, n] = op(A) op(B)` of a step. `A` is stored `[m, k]`, or `[k, m]` and read
/// transposed; `B` is stored `[k, n]`, or `[n, k]` and read transposed: the layouts the
/// trainer's own calls hand the matmul library (a weight `[out, in]` is read transposed forward).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Product {
    /// What the product is, e.g. "gate/up fwd" or "q/k/v/o dW".
    pub name: String,
    /// Rows of `C`.
    pub m: usize,
    /// Columns of `C`.
    pub n: usize,
    /// The summed dimension.
    pub k: usize,
    /// Whether `A` is stored `[k, m]`.
    pub a_transposed: bool,
    /// Whether `B` is stored `[n, k]`.
    pub b_transposed: bool,
    /// How often a full-rank step runs it.
    pub per_full_step: usize,
    /// How often an adapter-phase step runs it (with the effective weight `W + s B A`).
    pub per_relora_step: usize,
    /// Median milliseconds of one product, once timed.
    #[serde(default)]
    pub ms: f64,
}

impl Product {
    fn gflop(&self) -> f64 {
        2.0 * (self.m * self.n * self.k) as f64 / 1e9
    }
}

/// The products of a step of `model` over `rows` tokens with adapters of rank `rank`, distinct
/// shapes once each with their counts.
pub fn step_products(model: &ModelConfig, rows: usize, rank: usize) -> Vec<Product> {
    let (h, i) = (model.hidden_size, model.intermediate_size);
    let q = model.num_attention_heads * model.head_dim();
    let kv = model.kv_heads() * model.head_dim();
    let layers = model.num_hidden_layers;
    // (name, in, out, per layer): projections sharing a shape are timed once.
    let mut groups: Vec<(String, usize, usize, usize)> = Vec::new();
    for (name, inp, out) in [
        ("q", h, q),
        ("k", h, kv),
        ("v", h, kv),
        ("o", q, h),
        ("gate", h, i),
        ("up", h, i),
        ("down", i, h),
    ] {
        match groups.iter_mut().find(|g| g.1 == inp && g.2 == out) {
            Some(g) => {
                g.0 = format!("{}/{name}", g.0);
                g.3 += 1;
            }
            None => groups.push((name.to_string(), inp, out, 1)),
        }
    }
    let mut v = Vec::new();
    let mut push = |name: String, (m, n, k), (a_t, b_t), (full, relora)| {
        v.push(Product {
            name,
            m,
            n,
            k,
            a_transposed: a_t,
            b_transposed: b_t,
            per_full_step: full,
            per_relora_step: relora,
            ms: 0.0,
        })
    };
    for (name, inp, out, count) in groups {
        let c = count * layers;
        // Forward x Wᵀ (W' in the adapter phase), input gradient dy W, weight gradient dyᵀ x.
        push(
            format!("{name} fwd"),
            (rows, out, inp),
            (false, true),
            (c, c),
        );
        push(
            format!("{name} dX"),
            (rows, inp, out),
            (false, false),
            (c, c),
        );
        push(
            format!("{name} dW"),
            (out, inp, rows),
            (true, false),
            (c, 0),
        );
        // The adapter phase: x Aᵀ, dy B, dB = dyᵀ (x Aᵀ), dA = (dy B)ᵀ x, and W' = W + s B A.
        push(
            format!("{name} x·Aᵀ"),
            (rows, rank, inp),
            (false, true),
            (0, c),
        );
        push(
            format!("{name} dy·B"),
            (rows, rank, out),
            (false, false),
            (0, c),
        );
        push(
            format!("{name} dB"),
            (out, rank, rows),
            (true, false),
            (0, c),
        );
        push(
            format!("{name} dA"),
            (rank, inp, rows),
            (true, false),
            (0, c),
        );
        push(
            format!("{name} B·A"),
            (out, inp, rank),
            (false, false),
            (0, c),
        );
    }
    let vocab = model.vocab_size;
    push(
        "lm_head fwd".into(),
        (rows, vocab, h),
        (false, true),
        (1, 1),
    );
    push(
        "lm_head dX".into(),
        (rows, h, vocab),
        (false, false),
        (1, 1),
    );
    push("lm_head dW".into(), (vocab, h, rows), (true, false), (1, 1));
    v
}

/// Times each product: the median of `reps` products after two untimed ones, allocating the
/// output each time as a step does.
pub fn time_products(products: &mut [Product], device: &Device, reps: usize) -> Result<()> {
    for p in products.iter_mut() {
        let operand = |rows: usize, cols: usize, transposed: bool| -> Result<Tensor> {
            let (r, c) = if transposed {
                (cols, rows)
            } else {
                (rows, cols)
            };
            let t = Tensor::randn(0f32, 1.0, (r, c), device)?.to_dtype(DType::F32)?;
            Ok(if transposed { t.t()? } else { t })
        };
        let a =
            operand(p.m, p.k, p.a_transposed).with_context(|| format!("allocating {}", p.name))?;
        let b =
            operand(p.k, p.n, p.b_transposed).with_context(|| format!("allocating {}", p.name))?;
        let mut times = Vec::with_capacity(reps);
        for rep in 0..reps + 2 {
            device.synchronize()?;
            let t0 = Instant::now();
            let c = a
                .matmul(&b)
                .with_context(|| format!("product {}", p.name))?;
            device.synchronize()?;
            if rep >= 2 {
                times.push(t0.elapsed().as_secs_f64() * 1e3);
            }
            drop(c);
        }
        times.sort_by(f64::total_cmp);
        p.ms = times[times.len() / 2];
    }
    Ok(())
}

/// Prints the timed products and each mode's matmul milliseconds per step.
pub fn print_table(products: &[Product]) {
    println!(
        "{:<22} {:>6} {:>6} {:>6} {:>6} {:>8} {:>9} {:>5} {:>7}",
        "product", "m", "n", "k", "layout", "ms", "GFLOP/s", "full", "relora"
    );
    for p in products {
        let layout = format!(
            "{}{}",
            if p.a_transposed { "T" } else { "N" },
            if p.b_transposed { "T" } else { "N" }
        );
        println!(
            "{:<22} {:>6} {:>6} {:>6} {:>6} {:>8.3} {:>9.1} {:>5} {:>7}",
            p.name,
            p.m,
            p.n,
            p.k,
            layout,
            p.ms,
            p.gflop() / (p.ms / 1e3),
            p.per_full_step,
            p.per_relora_step
        );
    }
    let total = |count: fn(&Product) -> usize| -> f64 {
        products.iter().map(|p| count(p) as f64 * p.ms).sum()
    };
    println!(
        "matmul ms per step: full {:.1}, adapter phase {:.1}",
        total(|p| p.per_full_step),
        total(|p| p.per_relora_step)
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use relora::config::Mode;

    #[test]
    fn products_add_up_to_the_step_flops() {
        let mut m = ModelConfig::preset("60m").unwrap();
        m.vocab_size = 258;
        let (seq, rows, rank) = (256, 1024, 32);
        let ps = step_products(&m, rows, rank);
        let flops = |count: fn(&Product) -> usize| -> f64 {
            ps.iter().map(|p| count(p) as f64 * p.gflop() * 1e9).sum()
        };
        let attention = 8.0 * 3.0 * 4.0 * seq as f64 * 512.0 * rows as f64;
        let full = crate::flops::per_token(&m, Mode::Full, seq, rank) * rows as f64;
        assert!((flops(|p| p.per_full_step) + attention - full).abs() < 1e-6 * full);
        // The adapter phase runs W' instead of the forward rank products: per_token counts those
        // (2 r (in + out) per projection), the step runs B·A (2 r in out per projection) instead.
        let relora = crate::flops::per_token(&m, Mode::Relora, seq, rank) * rows as f64;
        let projections =
            [(512, 512); 4]
                .into_iter()
                .chain([(512, 1376), (512, 1376), (1376, 512)]);
        let (fwd_rank, build): (f64, f64) = projections
            .map(|(i, o)| {
                (
                    8.0 * 2.0 * (rank * (i + o) * rows) as f64,
                    8.0 * 2.0 * (rank * i * o) as f64,
                )
            })
            .fold((0.0, 0.0), |s, x| (s.0 + x.0, s.1 + x.1));
        let want = relora - fwd_rank + build;
        assert!((flops(|p| p.per_relora_step) + attention - want).abs() < 1e-6 * want);
        // q, k, v and o share a shape at 60m: timed once, counted four times a layer.
        assert_eq!(ps[0].name, "q/k/v/o fwd");
        assert_eq!(ps[0].per_full_step, 32);
    }
}
