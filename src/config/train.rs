//! Every training option, its text setter (the keys of `--set` and the C API), the schedule it
//! implies, and validation that names the offending option.

use super::ModelConfig;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::fs::read::{read_limited_text, JSON_LIMIT};
use crate::optim::reset::ResetMode;
use crate::schedule::{RestartCycle, Schedule};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Which of the paper's arms the trainer runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Ordinary full-rank training of every weight.
    Full,
    /// LoRA adapters on the target projections, never merged (after an optional warm start).
    Lora,
    /// Full-rank warm start, then LoRA adapters merged and re-initialised every `reset_every` steps.
    Relora,
}

impl std::str::FromStr for Mode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "full" => Ok(Mode::Full),
            "lora" => Ok(Mode::Lora),
            "relora" => Ok(Mode::Relora),
            other => Err(Error::Config(format!(
                "unknown mode '{other}' (full, lora, relora)"
            ))),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Full => "full",
            Mode::Lora => "lora",
            Mode::Relora => "relora",
        })
    }
}

/// The projections that can carry adapters, by their Hugging Face module names.
pub const ALL_TARGETS: &[&str] = &[
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Every training option. Defaults follow the paper's recipes scaled to a small CPU run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    /// Which arm to run.
    pub mode: Mode,
    /// Total optimizer steps the schedule is laid out for.
    pub steps: u64,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Micro-batches accumulated per optimizer step.
    pub grad_accum: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Peak learning rate once adapters are attached (the LoRA / ReLoRA phase); 0 keeps `lr`.
    /// The paper trains its ReLoRA phase at 1.5-2x the full-rank rate: a fresh adapter's update
    /// `s B A` moves the weights more slowly than a full-rank step at the same rate.
    pub adapter_lr: f64,
    /// Floor of the cosine envelope, as a fraction of the peak.
    pub min_lr_ratio: f64,
    /// Linear warm-up steps at the start of the run.
    pub warmup_steps: u64,
    /// Decoupled weight decay, applied to 2-D weights only.
    pub weight_decay: f64,
    /// Adam's first-moment decay.
    pub beta1: f64,
    /// Adam's second-moment decay.
    pub beta2: f64,
    /// Adam's denominator epsilon.
    pub eps: f64,
    /// Global gradient-norm clip (0 disables).
    pub grad_clip: f64,
    /// Full-rank steps before adapters are attached (`lora` and `relora`).
    pub warmup_full_steps: u64,
    /// Steps between merges in `relora` mode.
    pub reset_every: u64,
    /// Linear re-warm-up steps after every reset (and after the switch from full rank).
    pub restart_warmup_steps: u64,
    /// Adapter rank r.
    pub lora_rank: usize,
    /// Adapter alpha; the scale is alpha / r.
    pub lora_alpha: f64,
    /// Dropout on the adapter input (0 disables; the reference uses 0.1 for fine-tuning).
    pub lora_dropout: f64,
    /// Projection names that get adapters (subset of q,k,v,o,gate,up,down _proj).
    pub target_modules: Vec<String>,
    /// How the adapters' optimizer state is reset at each merge.
    pub reset_mode: ResetMode,
    /// Seed for initialisation, data order, adapter re-init, pruning and dropout.
    pub seed: u64,
    /// Consecutive non-finite steps tolerated before training stops with an error.
    pub max_nonfinite_steps: u32,
    /// Floating-point type of the parameters: "f32" or "f64" (f64 for gradient checks).
    pub dtype: String,
    /// Matmul type: "" (same as `dtype`) or "bf16" (mixed precision with fp32 master weights and
    /// optimizer state; meant for GPUs).
    pub compute_dtype: String,
    /// How the trainer computes (fused kernels, layer nodes, ...): its own choices, not the
    /// process's. The keys sit beside the others (`fused_kernels`, `layer_nodes`, ...).
    #[serde(flatten)]
    pub engine: Engine,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            mode: Mode::Relora,
            steps: 600,
            batch_size: 8,
            seq_len: 128,
            grad_accum: 1,
            lr: 2e-3,
            adapter_lr: 0.0,
            min_lr_ratio: 0.1,
            warmup_steps: 30,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
            warmup_full_steps: 200,
            reset_every: 100,
            restart_warmup_steps: 10,
            lora_rank: 32,
            lora_alpha: 32.0,
            lora_dropout: 0.0,
            target_modules: ALL_TARGETS.iter().map(|s| s.to_string()).collect(),
            reset_mode: ResetMode::Magnitude(0.99),
            seed: 42,
            max_nonfinite_steps: 10,
            dtype: "f32".into(),
            compute_dtype: String::new(),
            engine: Engine::default(),
        }
    }
}

impl TrainConfig {
    /// Adapter scale s = alpha / r.
    pub fn lora_scale(&self) -> f64 {
        self.lora_alpha / self.lora_rank as f64
    }

    /// Whether adapters are ever attached in this mode.
    pub(crate) fn uses_adapters(&self) -> bool {
        self.mode != Mode::Full
    }

    /// The parameter dtype.
    pub fn candle_dtype(&self) -> Result<candle_core::DType> {
        match self.dtype.as_str() {
            "f32" => Ok(candle_core::DType::F32),
            "f64" => Ok(candle_core::DType::F64),
            other => Err(Error::Config(format!(
                "dtype '{other}' (expected f32 or f64)"
            ))),
        }
    }

    /// The matmul dtype under mixed precision (`None`: the parameter dtype).
    pub fn candle_compute_dtype(&self) -> Result<Option<candle_core::DType>> {
        match self.compute_dtype.as_str() {
            "" => Ok(None),
            "f32" | "f64" if self.compute_dtype == self.dtype => Ok(None),
            "bf16" if self.dtype == "f32" => Ok(Some(candle_core::DType::BF16)),
            other => Err(Error::Config(format!(
                "compute_dtype '{other}' with dtype '{}' (expected bf16 with f32 parameters, or empty)",
                self.dtype
            ))),
        }
    }

    /// Reads a JSON training configuration; missing fields take their defaults.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = read_limited_text(path, JSON_LIMIT)?;
        let cfg: TrainConfig = serde_json::from_str(&text)
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        Ok(cfg)
    }

    /// Sets one option from text, as the CLI and the C API's `set(key, value)` do. The key is the
    /// field name; the value is parsed as that field's type.
    pub fn set(&mut self, key: &str, value: &str) -> Result<()> {
        fn num<T: std::str::FromStr>(key: &str, v: &str) -> Result<T> {
            v.trim()
                .parse()
                .map_err(|_| Error::Config(format!("{key}: cannot parse '{v}'")))
        }
        // Real-valued options must be finite: "NaN" or "inf" parse as floats, but no option means
        // anything with them, and a NaN could not be written back out as JSON.
        fn real(key: &str, v: &str) -> Result<f64> {
            let x: f64 = num(key, v)?;
            if x.is_finite() {
                Ok(x)
            } else {
                Err(Error::Config(format!(
                    "{key}: '{v}' is not a finite number"
                )))
            }
        }
        match key {
            "mode" => self.mode = value.parse()?,
            "steps" => self.steps = num(key, value)?,
            "batch_size" => self.batch_size = num(key, value)?,
            "seq_len" => self.seq_len = num(key, value)?,
            "grad_accum" => self.grad_accum = num(key, value)?,
            "lr" => self.lr = real(key, value)?,
            "adapter_lr" => self.adapter_lr = real(key, value)?,
            "min_lr_ratio" => self.min_lr_ratio = real(key, value)?,
            "warmup_steps" => self.warmup_steps = num(key, value)?,
            "weight_decay" => self.weight_decay = real(key, value)?,
            "beta1" => self.beta1 = real(key, value)?,
            "beta2" => self.beta2 = real(key, value)?,
            "eps" => self.eps = real(key, value)?,
            "grad_clip" => self.grad_clip = real(key, value)?,
            "warmup_full_steps" => self.warmup_full_steps = num(key, value)?,
            "reset_every" => self.reset_every = num(key, value)?,
            "restart_warmup_steps" => self.restart_warmup_steps = num(key, value)?,
            "lora_rank" => self.lora_rank = num(key, value)?,
            "lora_alpha" => self.lora_alpha = real(key, value)?,
            "lora_dropout" => self.lora_dropout = real(key, value)?,
            "target_modules" => {
                self.target_modules = value
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect()
            }
            "reset_mode" => self.reset_mode = value.parse()?,
            "seed" => self.seed = num(key, value)?,
            "max_nonfinite_steps" => self.max_nonfinite_steps = num(key, value)?,
            "dtype" => self.dtype = value.trim().to_string(),
            "compute_dtype" => self.compute_dtype = value.trim().to_string(),
            other => match self.engine.switch_mut(other) {
                Some(switch) => {
                    *switch = match value.trim() {
                        "true" | "1" | "on" => true,
                        "false" | "0" | "off" => false,
                        v => {
                            return Err(Error::Config(format!(
                                "{other}: '{v}' is not true or false"
                            )))
                        }
                    }
                }
                None => return Err(Error::Config(format!("unknown option '{other}'"))),
            },
        }
        Ok(())
    }

    /// Checks every option and their consistency; the error names the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        // The schedule's rules (steps, warm-ups, min_lr_ratio, reset_every) live with it.
        self.schedule().validate()?;
        if self.batch_size == 0 || self.seq_len == 0 || self.grad_accum == 0 {
            return bad("batch_size, seq_len and grad_accum must be positive".into());
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad(format!("lr {} must be positive", self.lr));
        }
        if !(self.adapter_lr >= 0.0 && self.adapter_lr.is_finite()) {
            return bad(format!(
                "adapter_lr {} must be positive, or 0 to use lr",
                self.adapter_lr
            ));
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return bad(format!("weight_decay {} must be >= 0", self.weight_decay));
        }
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return bad(format!("{name} {b} must be in [0, 1)"));
            }
        }
        if self.eps.is_nan() || self.eps <= 0.0 {
            return bad(format!("eps {} must be positive", self.eps));
        }
        if !(self.grad_clip >= 0.0 && self.grad_clip.is_finite()) {
            return bad(format!("grad_clip {} must be >= 0", self.grad_clip));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return bad(format!(
                "lora_dropout {} must be in [0, 1)",
                self.lora_dropout
            ));
        }
        if self.max_nonfinite_steps == 0 {
            return bad("max_nonfinite_steps must be at least 1".into());
        }
        self.candle_dtype()?;
        self.candle_compute_dtype()?;
        if self.uses_adapters() {
            if self.lora_rank == 0 {
                return bad("lora_rank must be positive".into());
            }
            if !(self.lora_alpha > 0.0 && self.lora_alpha.is_finite()) {
                return bad(format!("lora_alpha {} must be positive", self.lora_alpha));
            }
            if self.target_modules.is_empty() {
                return bad("target_modules is empty".into());
            }
            for t in &self.target_modules {
                if !ALL_TARGETS.contains(&t.as_str()) {
                    return bad(format!(
                        "target module '{t}' (known: {})",
                        ALL_TARGETS.join(", ")
                    ));
                }
            }
            if self.warmup_full_steps >= self.steps {
                return bad(format!(
                    "warmup_full_steps {} must be below steps {}",
                    self.warmup_full_steps, self.steps
                ));
            }
        }
        Ok(())
    }

    /// The learning-rate schedule these options imply: warm-up and cosine over `steps`, and in
    /// ReLoRA a re-warm-up after the switch to adapters and after every merge (in LoRA after the
    /// switch only). Its [`Schedule::is_reset_step`] is when the trainer merges.
    pub fn schedule(&self) -> Schedule {
        let cycle = match self.mode {
            Mode::Full => None,
            // The switch to adapters gets a re-warm-up (fresh adapter moments), and so does
            // every merge.
            Mode::Relora => Some(RestartCycle {
                first_reset: if self.warmup_full_steps > 0 {
                    self.warmup_full_steps
                } else {
                    self.reset_every
                },
                reset_every: self.reset_every,
                restart_warmup_steps: self.restart_warmup_steps,
            }),
            Mode::Lora if self.warmup_full_steps > 0 => Some(RestartCycle {
                first_reset: self.warmup_full_steps,
                reset_every: self.steps + 1,
                restart_warmup_steps: self.restart_warmup_steps,
            }),
            Mode::Lora => None,
        };
        Schedule {
            total_steps: self.steps,
            warmup_steps: self.warmup_steps,
            min_lr_ratio: self.min_lr_ratio,
            cycle,
        }
    }

    /// Every option key ([`TrainConfig::set`] takes each; they are the field names).
    pub fn keys() -> Vec<String> {
        match serde_json::to_value(TrainConfig::default()) {
            Ok(serde_json::Value::Object(map)) => map.keys().cloned().collect(),
            _ => Vec::new(),
        }
    }

    /// Checks these options against the model they train, after each on its own: the sequence
    /// fits the rotary table, and the adapters' rank does not exceed the smaller dimension of
    /// any projection they attach to (a wider adapter only costs memory and time).
    pub(crate) fn validate_for(&self, model: &ModelConfig) -> Result<()> {
        model.validate()?;
        self.validate()?;
        if self.seq_len > model.max_position_embeddings {
            return Err(Error::Config(format!(
                "seq_len {} exceeds max_position_embeddings {}",
                self.seq_len, model.max_position_embeddings
            )));
        }
        if self.uses_adapters() {
            let (h, ff) = (model.hidden_size, model.intermediate_size);
            let kv = model.kv_heads() * model.head_dim();
            // The narrowest projection the adapters attach to sets the bound.
            let narrowest = self
                .target_modules
                .iter()
                .map(|t| match t.as_str() {
                    "k_proj" | "v_proj" => (h.min(kv), t),
                    "gate_proj" | "up_proj" | "down_proj" => (h.min(ff), t),
                    _ => (h, t),
                })
                .min();
            if let Some((bound, name)) = narrowest {
                if self.lora_rank > bound {
                    return Err(Error::Config(format!(
                        "lora_rank {} exceeds {bound}, the smaller dimension of {name} \
                         (hidden_size {h}, intermediate_size {ff}, key/value width {kv})",
                        self.lora_rank
                    )));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_adapter_rank_is_bounded_by_the_projections() {
        let m = ModelConfig::preset("tiny").unwrap();
        let mut t = TrainConfig {
            mode: Mode::Relora,
            seq_len: 8,
            lora_rank: m.kv_heads() * m.head_dim(),
            ..TrainConfig::default()
        };
        // tiny has grouped-query attention: k and v are the narrowest projections.
        assert!(t.lora_rank < m.hidden_size);
        t.validate_for(&m).unwrap();
        t.lora_rank += 1;
        let err = t.validate_for(&m).unwrap_err().to_string();
        assert!(err.contains("k_proj"), "{err}");
        t.lora_rank = 100_000;
        let err = t.validate_for(&m).unwrap_err().to_string();
        assert!(
            err.contains("lora_rank 100000") && err.contains("exceeds 32"),
            "{err}"
        );
        // Full-rank training has no adapters to bound.
        t.mode = Mode::Full;
        t.validate_for(&m).unwrap();
    }

    #[test]
    fn real_options_refuse_nan_and_infinity() {
        // Found by fuzzing the C API's setter: "lr" = "NaN" was accepted and could not be read
        // back.
        let mut t = TrainConfig::default();
        for v in ["NaN", "nan", "inf", "-inf", "infinity"] {
            let err = t.set("lr", v).unwrap_err().to_string();
            assert!(err.contains("finite"), "{v}: {err}");
        }
        assert_eq!(t.lr, TrainConfig::default().lr);
        t.set("lr", "1e-3").unwrap();
        assert_eq!(t.lr, 1e-3);
    }

    #[test]
    fn text_setter_covers_fields_and_rejects_garbage() {
        let mut t = TrainConfig::default();
        t.set("lr", "0.01").unwrap();
        t.set("reset_mode", "random:0.5").unwrap();
        t.set("target_modules", "q_proj, v_proj").unwrap();
        assert_eq!(t.lr, 0.01);
        assert_eq!(t.target_modules, vec!["q_proj", "v_proj"]);
        assert!(t.set("lr", "fast").is_err());
        assert!(t.set("nope", "1").is_err());
        t.set("reset_every", "5").unwrap();
        t.set("restart_warmup_steps", "5").unwrap();
        assert!(t
            .validate()
            .unwrap_err()
            .to_string()
            .contains("restart_warmup_steps"));
    }
}
