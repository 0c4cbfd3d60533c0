//! The current (unmerged) adapter as a PEFT LoRA adapter, with the base it applies to.
//!
//! The output directory holds `adapter_model.safetensors` (for each adapted projection
//! `base_model.model.{module}.lora_A.weight [r, in]` and `.lora_B.weight [out, r]`),
//! `adapter_config.json`, and `base/`: a Hugging Face model directory whose projections are merged
//! through every completed phase (the weights the adapter was trained against) and whose other
//! tensors are current. PEFT's `merge_and_unload()` computes `W + (lora_alpha / r) B A`, which is
//! exactly the trainer's last merge, so base + adapter equals `relora-convert merge` of the same
//! checkpoint within f32 rounding.

use super::hf::{payload, write_file, write_hf_into, HfExportOptions, Payload};
use super::recognise::PEFT_DIR;
use super::tokenizer::tokenizer_files;
use crate::checkpoint::source::CheckpointSource;
use crate::error::{Error, Result};
use crate::fs::output::{check_target, write_synced, Staged};
use crate::tensor_file::safetensors::PlannedTensor;
use serde_json::json;
use std::path::Path;

/// The adapter weights' file name.
pub const ADAPTER_FILE: &str = "adapter_model.safetensors";
/// The adapter configuration's file name.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// The base model's subdirectory.
pub const BASE_DIR: &str = "base";

/// PEFT's name for one factor of a module's adapter (`factor` is `lora_A` or `lora_B`).
pub fn peft_name(module: &str, factor: &str) -> String {
    format!("base_model.model.{module}.{factor}.weight")
}

/// Writes the checkpoint `ckpt`'s current adapter as a PEFT LoRA adapter in `out`, plus the
/// base model in `out/base` (see the module documentation). Errors if no adapters are attached.
/// `opts` applies to both the base and the adapter (dtype, shards of the base, `force`).
pub fn write_peft(ckpt: &Path, out: &Path, opts: &HfExportOptions) -> Result<()> {
    check_target(out, &PEFT_DIR, opts.force)?;
    let src = CheckpointSource::open(ckpt)?;
    if !src.has_adapters() {
        return Err(Error::checkpoint(
            ckpt,
            "no adapters are attached (the run is full-rank, or still in its warm start): \
             there is no adapter to export; use `merge`",
        ));
    }
    let m = src.manifest();
    let tok = m
        .tokenizer
        .as_deref()
        .map(|s| tokenizer_files(s, src.config()))
        .transpose()?;
    let staged = Staged::new(out, &PEFT_DIR, opts.force)?;
    let base_dir = staged.path().join(BASE_DIR);
    std::fs::create_dir(&base_dir).map_err(|e| Error::io(&base_dir, e))?;
    let phases = src.phase_count();
    let mut base_payload = |name: &str| payload(&src, name, phases, false);
    write_hf_into(
        &base_dir,
        src.config(),
        tok.as_ref(),
        &mut base_payload,
        opts,
    )?;

    let adapters = src.current_adapter_file()?;
    let mut plan = Vec::new();
    for module in src.adapted_modules() {
        for factor in ["lora_A", "lora_B"] {
            let info = adapters.info(&format!("{module}.{factor}"))?;
            plan.push(PlannedTensor {
                name: peft_name(module, factor),
                dtype: opts.dtype.st(),
                shape: info.shape.clone(),
            });
        }
    }
    let mut adapter_payload = |name: &str| -> Result<Payload<'_>> {
        let stored = name
            .strip_prefix("base_model.model.")
            .and_then(|n| n.strip_suffix(".weight"))
            .unwrap_or(name);
        Ok(Payload::Stored(adapters, stored.to_string()))
    };
    write_file(
        &staged.path().join(ADAPTER_FILE),
        plan,
        &mut adapter_payload,
    )?;

    let final_base = std::path::absolute(out)
        .map_err(|e| Error::io(out, e))?
        .join(BASE_DIR);
    let t = &m.train;
    let config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": t.lora_rank,
        "lora_alpha": t.lora_alpha,
        "lora_dropout": t.lora_dropout,
        "target_modules": t.target_modules,
        "bias": "none",
        "base_model_name_or_path": final_base.to_string_lossy(),
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
        "use_rslora": false,
        "use_dora": false,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
    });
    let mut text = serde_json::to_vec_pretty(&config).unwrap_or_default();
    text.push(b'\n');
    write_synced(&staged.path().join(ADAPTER_CONFIG), &text)?;
    staged.commit()
}
