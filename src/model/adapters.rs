//! The ReLoRA cycle on a whole model: attach adapters to the target projections at the switch
//! from full rank, and at each reset merge `W += s B A` (fp32, via
//! [`crate::relora::merge_delta`]) and re-initialise A (Kaiming-uniform) and B (zero). The
//! trainer decides when; this is what happens to every projection.

use super::Llama;
use crate::error::{Result, TensorContext};
use crate::relora::merge::{merge_delta, Phase, PhaseAdapter};
use crate::rng::Rng;

/// The module's short name (`q_proj`) from its path (`model.layers.0.self_attn.q_proj`).
pub(crate) fn short_name(module: &str) -> &str {
    module.rsplit('.').next().unwrap_or(module)
}

/// Attaches a fresh adapter to every projection whose short name is in `targets`.
/// Returns the module paths that received one.
pub fn attach_adapters(
    model: &mut Llama,
    targets: &[String],
    rank: usize,
    scale: f64,
    rng: &mut Rng,
) -> Result<Vec<String>> {
    let mut adapted = Vec::new();
    for p in model.projections_mut() {
        if targets.iter().any(|t| t == short_name(&p.name)) {
            p.attach_adapter(rank, scale, rng)?;
            adapted.push(p.name.clone());
        }
    }
    Ok(adapted)
}

/// Merges every attached adapter into its frozen weight and re-initialises it. Returns the
/// completed phase (copies of the adapters as merged), numbered `index`.
pub(crate) fn merge_and_reinit(
    model: &mut Llama,
    index: usize,
    step: u64,
    rng: &mut Rng,
) -> Result<Phase> {
    let mut adapters = Vec::new();
    for p in model.projections_mut() {
        let Some(ad) = &p.adapter else { continue };
        // Copies: the Vars are updated in place below, and the phase must keep the merged values.
        let a = ad.a.as_tensor().copy().ctx("copy A")?;
        let b = ad.b.as_tensor().copy().ctx("copy B")?;
        let merged = merge_delta(&p.name, p.weight.as_tensor(), &a, &b, ad.scale)?;
        p.weight
            .set(&merged)
            .with_ctx(|| format!("{} merge", p.name))?;
        adapters.push(PhaseAdapter {
            module: p.name.clone(),
            a,
            b,
            scale: ad.scale,
        });
        p.reinit_adapter(rng)?;
    }
    Ok(Phase {
        index,
        step,
        adapters,
    })
}

/// Folds every attached adapter into its weight (fp32 merge) and detaches it, leaving a plain
/// LLaMA for inference or export. Unlike [`merge_and_reinit`], no phase is recorded.
pub fn fold_adapters(model: &mut Llama) -> Result<()> {
    for p in model.projections_mut() {
        if let Some(merged) = p.merged_weight()? {
            p.weight
                .set(&merged)
                .with_ctx(|| format!("{} fold adapter", p.name))?;
            p.adapter = None;
        }
    }
    Ok(())
}
