//! What `relora bench` divides by: the matmul work of a training step, and the matmul rate the
//! machine reaches, measured in the same run.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use relora::config::{Mode, ModelConfig};
use std::time::Instant;

/// Matmul FLOPs per trained token of one optimizer step in `mode`: the work the hardware must
/// do, for utilisation.
///
/// A projection `[out, in]` costs `2 in out` forward. Full rank adds `4 in out` backward (input
/// and weight gradients); the adapter modes add only the input gradient, `2 in out`, plus the
/// rank-r products (`2 r (in + out)` forward, `4 r (in + out)` backward). The two attention
/// products cost `4 t d` per token forward (`d` = heads x head_dim, no causal discount) and twice
/// that backward; the lm_head `2 h V` forward and `4 h V` backward.
pub fn per_token(m: &ModelConfig, mode: Mode, seq: usize, rank: usize) -> f64 {
    let (h, i) = (m.hidden_size as f64, m.intermediate_size as f64);
    let (q, kv) = (
        (m.num_attention_heads * m.head_dim()) as f64,
        (m.kv_heads() * m.head_dim()) as f64,
    );
    // (in, out) of the seven projections of a layer.
    let projections = [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)];
    let dense: f64 = projections.iter().map(|(a, b)| 2.0 * a * b).sum();
    let low_rank: f64 = projections
        .iter()
        .map(|(a, b)| 2.0 * rank as f64 * (a + b))
        .sum();
    let per_layer = match mode {
        Mode::Full => 3.0 * dense,
        _ => 2.0 * dense + 3.0 * low_rank,
    };
    let attention = 3.0 * 4.0 * seq as f64 * q;
    let head = 3.0 * 2.0 * h * m.vocab_size as f64;
    m.num_hidden_layers as f64 * (per_layer + attention) + head
}

/// The rate of a square matmul (n = 1024 on the CPU, 4096 on a GPU) in `dtype` on `device`, in
/// GFLOP/s: the median of 10 products after 3 untimed ones, with the thread count already set.
pub fn gemm_peak_gflops(device: &Device, dtype: DType) -> Result<f64> {
    let n = if device.is_cpu() { 1024 } else { 4096 };
    let make = || -> Result<Tensor> {
        Tensor::randn(0f32, 1.0, (n, n), device)
            .and_then(|t| t.to_dtype(dtype))
            .context("allocating the gemm-peak operands")
    };
    let (a, b) = (make()?, make()?);
    let mut times = Vec::new();
    for rep in 0..13 {
        device.synchronize()?;
        let t0 = Instant::now();
        let c = a.matmul(&b).context("gemm-peak product")?;
        device.synchronize()?;
        let dt = t0.elapsed().as_secs_f64();
        drop(c);
        if rep >= 3 {
            times.push(dt);
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(2.0 * (n as f64).powi(3) / times[times.len() / 2] / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapter_phase_counts_less_than_full_rank_and_attention_grows_with_length() {
        let mut m = ModelConfig::preset("60m").unwrap();
        m.vocab_size = 258;
        let full = per_token(&m, Mode::Full, 256, 32);
        let relora = per_token(&m, Mode::Relora, 256, 32);
        // Dense projections: 8 layers x (4 h^2 + 3 h i) parameters, 6 FLOPs each per token.
        let params = 8.0 * (4.0 * 512.0 * 512.0 + 3.0 * 512.0 * 1376.0);
        let attn = 8.0 * 3.0 * 4.0 * 256.0 * 512.0;
        let head = 6.0 * 512.0 * 258.0;
        assert_eq!(full, 6.0 * params + attn + head);
        assert!(relora < full && relora > 4.0 * params);
        assert!(per_token(&m, Mode::Full, 512, 32) > full);
    }
}
