//! Text sampling from a model: temperature and top-k over the last position's logits, seeded.

use crate::error::{Error, Result, TensorContext};
use crate::model::Llama;
use crate::rng::Rng;
use candle_core::{DType, Tensor};

/// Sampling options.
#[derive(Clone, Copy, Debug)]
pub struct SampleOptions {
    /// Tokens to generate.
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 means greedy.
    pub temperature: f64,
    /// Keep only the k most likely tokens (0: all).
    pub top_k: usize,
}

/// Continues `prompt` (token ids) by up to `max_new_tokens`, stopping early at `stop` if given.
/// The context is the last `max_position_embeddings` tokens.
pub fn sample(
    model: &Llama,
    prompt: &[u32],
    opts: SampleOptions,
    stop: Option<u32>,
    rng: &mut Rng,
) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        return Err(Error::Data("the prompt encodes to no tokens".into()));
    }
    let vocab = model.config.vocab_size;
    if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
        return Err(Error::Data(format!(
            "prompt token {bad} is >= vocab_size {vocab}"
        )));
    }
    let window = model.config.max_position_embeddings;
    let mut ids = prompt.to_vec();
    let mut out = Vec::new();
    for _ in 0..opts.max_new_tokens {
        let ctx = &ids[ids.len().saturating_sub(window)..];
        let input = Tensor::from_slice(ctx, (1, ctx.len()), model.device()).ctx("prompt")?;
        let logits = model.forward(&input, None)?.detach();
        let last: Vec<f64> = logits
            .narrow(1, ctx.len() - 1, 1)
            .and_then(|l| l.flatten_all())
            .and_then(|l| l.to_dtype(DType::F64))
            .and_then(|l| l.to_vec1())
            .ctx("last logits")?;
        let next = pick(&last, opts, rng);
        ids.push(next);
        out.push(next);
        if Some(next) == stop {
            break;
        }
    }
    Ok(out)
}

/// Chooses a token from logits under the options.
fn pick(logits: &[f64], opts: SampleOptions, rng: &mut Rng) -> u32 {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if opts.temperature <= 0.0 {
        return order[0] as u32;
    }
    let k = if opts.top_k == 0 {
        order.len()
    } else {
        opts.top_k.min(order.len())
    };
    let top = &order[..k];
    let max = logits[top[0]];
    let weights: Vec<f64> = top
        .iter()
        .map(|&i| ((logits[i] - max) / opts.temperature).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut u = rng.next_f64() * total;
    for (&i, w) in top.iter().zip(&weights) {
        if u < *w {
            return i as u32;
        }
        u -= w;
    }
    top[k - 1] as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_argmax_and_top1_is_greedy() {
        let logits = [0.1, 3.0, -1.0, 2.9];
        let mut rng = Rng::new(1);
        let greedy = SampleOptions {
            max_new_tokens: 1,
            temperature: 0.0,
            top_k: 0,
        };
        assert_eq!(pick(&logits, greedy, &mut rng), 1);
        let top1 = SampleOptions {
            max_new_tokens: 1,
            temperature: 1.0,
            top_k: 1,
        };
        for _ in 0..20 {
            assert_eq!(pick(&logits, top1, &mut rng), 1);
        }
        let top2 = SampleOptions {
            max_new_tokens: 1,
            temperature: 1.0,
            top_k: 2,
        };
        let mut seen = [0; 4];
        for _ in 0..400 {
            seen[pick(&logits, top2, &mut rng) as usize] += 1;
        }
        assert_eq!(seen[0] + seen[2], 0);
        assert!(seen[1] > 100 && seen[3] > 100, "{seen:?}");
    }
}
