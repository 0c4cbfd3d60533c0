//! A model's shape: the Hugging Face `LlamaConfig` fields, the paper's presets, validation that
//! names the offending field, and the tensors a model of that shape has.

use crate::error::{Error, Result};
use crate::fs::read::{read_limited_text, JSON_LIMIT};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// A LLaMA decoder's shape, with the field names of Hugging Face's `config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Number of token ids.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (grouped-query attention when below the query heads).
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Longest sequence the model is meant for.
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    /// Rotary base frequency.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// Whether lm_head shares the token embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Standard deviation of the normal initialisation of matrices.
    #[serde(default = "default_init_range")]
    pub initializer_range: f64,
}

fn default_max_positions() -> usize {
    2048
}
fn default_rms_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f64 {
    10000.0
}
fn default_init_range() -> f64 {
    0.02
}

/// Largest parameter count a model shape may have (2^40, about 1.1 trillion; the largest LLaMA
/// has 405 billion). A bigger count in a config or a manifest is corrupt; refusing it keeps every
/// size and byte count derived from a valid shape far from overflowing.
pub const MAX_PARAMETERS: usize = 1 << 40;

/// Largest rotary table (`max_position_embeddings` x `head_dim` elements) a shape may ask for:
/// 2^25, e.g. 262144 positions at head_dim 128. The model precomputes the table for every
/// position, so a larger value is refused before anything is allocated for it.
pub const MAX_ROPE_TABLE_ELEMENTS: usize = 1 << 25;

/// The named model sizes: a tiny one for tests and the paper's sizes.
pub const PRESETS: &[&str] = &["tiny", "small", "60m", "130m", "250m", "350m", "1b"];

impl ModelConfig {
    /// A preset by name (see [`PRESETS`]). `vocab_size` is a placeholder (32000, the paper's T5
    /// vocabulary) that the trainer replaces with the tokenizer's vocabulary size.
    pub fn preset(name: &str) -> Result<Self> {
        // (hidden, intermediate, heads, kv heads, layers, max positions)
        let (h, i, nh, kv, l, pos) = match name.to_ascii_lowercase().as_str() {
            // Grouped-query attention in the tiny model so the tests exercise it.
            "tiny" => (64, 172, 4, 2, 2, 256),
            // A model a 2-core machine trains in minutes; used by the default run.
            "small" => (256, 688, 8, 8, 4, 512),
            "60m" => (512, 1376, 8, 8, 8, 1024),
            "130m" => (768, 2048, 12, 12, 12, 1024),
            "250m" => (768, 2560, 16, 16, 24, 1024),
            "350m" => (1024, 2736, 16, 16, 24, 1024),
            "1b" | "1.3b" => (2048, 5461, 32, 32, 24, 1024),
            other => {
                return Err(Error::Config(format!(
                    "unknown preset '{other}' (known: {})",
                    PRESETS.join(", ")
                )))
            }
        };
        Ok(ModelConfig {
            vocab_size: 32000,
            hidden_size: h,
            intermediate_size: i,
            num_hidden_layers: l,
            num_attention_heads: nh,
            num_key_value_heads: Some(kv),
            max_position_embeddings: pos,
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            tie_word_embeddings: false,
            initializer_range: 0.02,
        })
    }

    /// Reads a Hugging Face style `config.json`; unknown fields are ignored.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = read_limited_text(path, JSON_LIMIT)?;
        let cfg: ModelConfig = serde_json::from_str(&text)
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Key/value heads, defaulting to the query heads as Hugging Face does.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }

    /// Checks that the shape is buildable; the error names the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.vocab_size == 0 {
            return bad("vocab_size must be positive".into());
        }
        if self.hidden_size == 0 || self.intermediate_size == 0 || self.num_hidden_layers == 0 {
            return bad(
                "hidden_size, intermediate_size and num_hidden_layers must be positive".into(),
            );
        }
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return bad(format!(
                "hidden_size {} must be a positive multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad(format!(
                "head_dim {} must be even for rotary embeddings",
                self.head_dim()
            ));
        }
        let kv = self.kv_heads();
        if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            return bad(format!(
                "num_attention_heads {} must be a multiple of num_key_value_heads {kv}",
                self.num_attention_heads
            ));
        }
        if self.max_position_embeddings == 0 {
            return bad("max_position_embeddings must be positive".into());
        }
        if self
            .max_position_embeddings
            .checked_mul(self.head_dim())
            .is_none_or(|n| n > MAX_ROPE_TABLE_ELEMENTS)
        {
            return bad(format!(
                "max_position_embeddings {} x head_dim {} exceeds the largest rotary table \
                 supported ({MAX_ROPE_TABLE_ELEMENTS} elements)",
                self.max_position_embeddings,
                self.head_dim()
            ));
        }
        if self
            .checked_num_parameters()
            .is_none_or(|n| n > MAX_PARAMETERS)
        {
            return bad(format!(
                "the shape (vocab_size {}, hidden_size {}, intermediate_size {}, \
                 num_hidden_layers {}) has more than {MAX_PARAMETERS} parameters",
                self.vocab_size, self.hidden_size, self.intermediate_size, self.num_hidden_layers
            ));
        }
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps.is_finite()) {
            return bad(format!(
                "rms_norm_eps {} must be positive",
                self.rms_norm_eps
            ));
        }
        if !(self.rope_theta > 0.0 && self.rope_theta.is_finite()) {
            return bad(format!("rope_theta {} must be positive", self.rope_theta));
        }
        if !(self.initializer_range > 0.0 && self.initializer_range.is_finite()) {
            return bad(format!(
                "initializer_range {} must be positive",
                self.initializer_range
            ));
        }
        Ok(())
    }

    /// Total parameter count (without adapters). Exact for a shape that validates; saturates at
    /// `usize::MAX` for one whose count overflows.
    pub fn num_parameters(&self) -> usize {
        self.checked_num_parameters().unwrap_or(usize::MAX)
    }

    /// Total parameter count (without adapters), or `None` when it overflows a `usize`.
    pub(crate) fn checked_num_parameters(&self) -> Option<usize> {
        let h = self.hidden_size;
        let kvd = self.kv_heads().checked_mul(self.head_dim())?;
        let per_layer = h
            .checked_mul(h)?
            .checked_mul(2)?
            .checked_add(h.checked_mul(kvd)?.checked_mul(2)?)?
            .checked_add(h.checked_mul(self.intermediate_size)?.checked_mul(3)?)?
            .checked_add(h.checked_mul(2)?)?;
        let embed = self.vocab_size.checked_mul(h)?;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        embed
            .checked_add(self.num_hidden_layers.checked_mul(per_layer)?)?
            .checked_add(h)?
            .checked_add(head)
    }

    /// Bytes the weights take at `elem_bytes` per parameter (saturating). A model read from a
    /// checkpoint must fit in the files that store it; callers compare this with their sizes
    /// before allocating anything for the model.
    pub(crate) fn weight_bytes(&self, elem_bytes: usize) -> u64 {
        (self.num_parameters() as u64).saturating_mul(elem_bytes as u64)
    }

    /// The tensors of a plain Llama of this shape, Hugging Face names and `[out, in]` shapes, in
    /// model order (embedding, each layer's norms and projections, final norm, head).
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let cfg = self;
        let (h, d) = (cfg.hidden_size, cfg.head_dim());
        let (q, kv, ff) = (
            cfg.num_attention_heads * d,
            cfg.kv_heads() * d,
            cfg.intermediate_size,
        );
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![cfg.vocab_size, h],
        )];
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            out.push((format!("{p}.input_layernorm.weight"), vec![h]));
            out.push((format!("{p}.self_attn.q_proj.weight"), vec![q, h]));
            out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
            out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
            out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q]));
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            out.push((format!("{p}.mlp.gate_proj.weight"), vec![ff, h]));
            out.push((format!("{p}.mlp.up_proj.weight"), vec![ff, h]));
            out.push((format!("{p}.mlp.down_proj.weight"), vec![h, ff]));
        }
        out.push(("model.norm.weight".to_string(), vec![h]));
        if !cfg.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), vec![cfg.vocab_size, h]));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_match_the_paper_and_validate() {
        let m = ModelConfig::preset("130m").unwrap();
        assert_eq!(
            (
                m.hidden_size,
                m.intermediate_size,
                m.num_attention_heads,
                m.num_hidden_layers
            ),
            (768, 2048, 12, 12)
        );
        for p in PRESETS {
            ModelConfig::preset(p).unwrap().validate().unwrap();
        }
        assert!(ModelConfig::preset("7b").is_err());
    }

    #[test]
    fn hf_config_parses_with_defaults_and_bad_values_are_named() {
        let json = r#"{"vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 4, "model_type": "llama"}"#;
        let c: ModelConfig = serde_json::from_str(json).unwrap();
        assert_eq!(c.kv_heads(), 4);
        c.validate().unwrap();
        let mut bad = c.clone();
        bad.num_key_value_heads = Some(3);
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("num_key_value_heads"));
        let mut bad = c;
        bad.hidden_size = 30;
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("hidden_size"));
    }

    #[test]
    fn implausible_shapes_are_refused_and_counting_never_overflows() {
        // Found by fuzzing (fuzz/seeds/manifest/hidden-size-overflow.json): a manifest whose
        // shape validated but whose parameter count overflowed panicked in `inspect`.
        let json = r#"{"vocab_size": 258, "hidden_size": 1099511627776, "intermediate_size": 12,
            "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 32}"#;
        let c: ModelConfig = serde_json::from_str(json).unwrap();
        assert_eq!(c.checked_num_parameters(), None);
        assert_eq!(c.num_parameters(), usize::MAX);
        assert_eq!(c.weight_bytes(4), u64::MAX);
        assert!(c.validate().is_err());
        let mut c = ModelConfig::preset("tiny").unwrap();
        c.vocab_size = 1 << 62;
        assert_eq!(c.checked_num_parameters(), None);
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("parameters"), "{err}");
        c.vocab_size = (MAX_PARAMETERS / c.hidden_size) + 1;
        assert!(c.checked_num_parameters().is_some());
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("parameters"), "{err}");

        let mut c = ModelConfig::preset("tiny").unwrap();
        c.max_position_embeddings = 1 << 36;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("rotary table"), "{err}");
        c.max_position_embeddings = usize::MAX;
        assert!(c.validate().is_err());

        // Every preset stays well inside both limits, and the count is exact.
        for p in PRESETS {
            let c = ModelConfig::preset(p).unwrap();
            assert_eq!(c.checked_num_parameters(), Some(c.num_parameters()));
            assert_eq!(c.weight_bytes(4), 4 * c.num_parameters() as u64);
        }
    }
}
