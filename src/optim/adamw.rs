//! AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization") with state that callers
//! can read, prune and reset by parameter name — ReLoRA resets the adapters' moments at every merge.
//!
//! The update follows PyTorch's `torch.optim.AdamW` exactly: `p *= 1 - lr * wd` (2-D weights only),
//! `m = b1 m + (1 - b1) g`, `v = b2 v + (1 - b2) g^2`,
//! `p -= (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`.

use super::reset::{prune_pair, ResetMode};
use crate::error::{Result, TensorContext};
use crate::ops::adamw_update::{adamw_update, adamw_update_in_place, AdamWConstants};
use crate::rng::Rng;
use candle_core::{DType, Device, Tensor, Var};
use std::collections::{BTreeMap, BTreeSet};

/// Adam's moments for one parameter.
#[derive(Clone, Debug)]
pub struct ParamState {
    /// First moment, same shape as the parameter.
    pub exp_avg: Tensor,
    /// Second moment, same shape as the parameter.
    pub exp_avg_sq: Tensor,
    /// Updates applied so far; kept across resets so bias correction continues.
    pub step: u64,
}

/// Hyper-parameters of the update (the learning rate is passed per step).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay for 2-D parameters.
    pub weight_decay: f64,
}

/// What an optimizer-state reset did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResetReport {
    /// Parameters whose state was pruned.
    pub params: usize,
    /// State positions considered (per parameter: its element count).
    pub positions: usize,
    /// Positions set to zero in both moments.
    pub zeroed: usize,
}

/// The optimizer: hyper-parameters and per-parameter state keyed by parameter name.
///
/// On CUDA the update is one grouped kernel that writes the moments in place
/// ([`crate::ops::adamw_group`]); on the CPU, from a parameter's first update on, its moments
/// are the two rows of one buffer that each update writes in place, in the same pass as the
/// parameter ([`crate::ops::adamw_update::adamw_update_in_place`]); elsewhere each step gives every
/// parameter new moment tensors. To keep a snapshot of a state across a step, copy its tensors
/// (`Tensor::force_contiguous`): a clone shares their memory.
pub struct AdamW {
    /// Hyper-parameters.
    pub config: AdamWConfig,
    states: BTreeMap<String, ParamState>,
    /// The parameters whose moments this optimizer allocated itself, each in memory of its
    /// own, so that the grouped update may write them in place. Moments from elsewhere
    /// ([`AdamW::set_state`]) or from the per-tensor update (views of one buffer) are copied
    /// before their first grouped update.
    exclusive: BTreeSet<String>,
    /// CPU parameters whose moments are the rows of one contiguous `[2, n]` buffer this
    /// optimizer made (kept here), which their updates write in place.
    paired: BTreeMap<String, Tensor>,
}

/// The update from candle's element-wise ops, for devices and dtypes without the fused kernel:
/// sets `var` and returns the new `(exp_avg, exp_avg_sq)`.
fn composed_update(
    var: &Var,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    c: &AdamWConstants,
) -> candle_core::Result<(Tensor, Tensor)> {
    let scaled;
    let g = if c.grad_scale == 1.0 {
        g
    } else {
        scaled = g.affine(c.grad_scale, 0.0)?;
        &scaled
    };
    let m = (m.affine(c.beta1, 0.0)? + g.affine(1.0 - c.beta1, 0.0)?)?;
    let v = (v.affine(c.beta2, 0.0)? + g.sqr()?.affine(1.0 - c.beta2, 0.0)?)?;
    let denom = v.sqrt()?.affine(c.inv_sqrt_bc2, c.eps)?;
    let update = (&m / denom)?.affine(c.step_size, 0.0)?;
    let p = var.as_tensor();
    let kept = match c.decay {
        Some(d) => p.affine(d, 0.0)?,
        None => p.clone(),
    };
    var.set(&(kept - update)?)?;
    Ok((m, v))
}

impl AdamW {
    /// An optimizer with no state yet; state appears on a parameter's first update.
    pub fn new(config: AdamWConfig) -> Self {
        AdamW {
            config,
            states: BTreeMap::new(),
            exclusive: BTreeSet::new(),
            paired: BTreeMap::new(),
        }
    }

    /// The state of one parameter, if it has been updated.
    pub fn state(&self, name: &str) -> Option<&ParamState> {
        self.states.get(name)
    }

    /// All states, ordered by name.
    pub fn states(&self) -> &BTreeMap<String, ParamState> {
        &self.states
    }

    /// Replaces (or inserts) the state of one parameter, e.g. when resuming.
    pub fn set_state(&mut self, name: &str, state: ParamState) {
        self.exclusive.remove(name);
        self.paired.remove(name);
        self.states.insert(name.to_string(), state);
    }

    /// Drops a parameter's state (a weight that became frozen), freeing its memory.
    pub fn remove(&mut self, name: &str) {
        self.exclusive.remove(name);
        self.paired.remove(name);
        self.states.remove(name);
    }

    /// Bytes held by the moments.
    pub fn state_bytes(&self) -> usize {
        self.states
            .values()
            .map(|s| 2 * s.exp_avg.elem_count() * s.exp_avg.dtype().size_in_bytes())
            .sum()
    }

    /// Applies one update to each `(name, var)` with its gradient, at learning rate `lr`.
    /// `decay[i]` says whether parameter i gets weight decay.
    pub fn step(
        &mut self,
        params: &[(String, Var)],
        grads: &[Tensor],
        decay: &[bool],
        lr: f64,
    ) -> Result<()> {
        self.step_scaled(params, grads, decay, lr, 1.0)
    }

    /// [`AdamW::step`] with every gradient first multiplied by `grad_scale`, as gradient
    /// clipping scales them, within the update's own pass over the gradient.
    pub fn step_scaled(
        &mut self,
        params: &[(String, Var)],
        grads: &[Tensor],
        decay: &[bool],
        lr: f64,
        grad_scale: f64,
    ) -> Result<()> {
        let c = self.config;
        let mut constants = Vec::with_capacity(params.len());
        for ((name, var), &wd) in params.iter().zip(decay) {
            if !self.states.contains_key(name) {
                // Two allocations, not one zero tensor shared: the grouped update writes
                // moments in place.
                let zeros = || {
                    var.zeros_like()
                        .with_ctx(|| format!("AdamW state of {name}"))
                };
                let state = ParamState {
                    exp_avg: zeros()?,
                    exp_avg_sq: zeros()?,
                    step: 0,
                };
                self.states.insert(name.clone(), state);
                self.exclusive.insert(name.clone());
            }
            let st = self.states.get_mut(name).expect("inserted above");
            st.step += 1;
            let t = st.step as i32;
            let bc1 = 1.0 - c.beta1.powi(t);
            let bc2 = 1.0 - c.beta2.powi(t);
            constants.push(AdamWConstants {
                beta1: c.beta1,
                beta2: c.beta2,
                inv_sqrt_bc2: 1.0 / bc2.sqrt(),
                eps: c.eps,
                step_size: lr / bc1,
                decay: (wd && c.weight_decay != 0.0).then_some(1.0 - lr * c.weight_decay),
                grad_scale,
            });
        }
        if self.step_grouped(params, grads, &constants)? {
            return Ok(());
        }
        for (((name, var), g), k) in params.iter().zip(grads).zip(constants) {
            let ctx = || format!("AdamW update of {name}");
            let st = self.states.get_mut(name).expect("created above");
            let p = var.as_tensor();
            let in_place = matches!(p.device(), Device::Cpu)
                && crate::ops::has_kernel(p)
                && g.dtype() == p.dtype()
                && st.exp_avg.dtype() == p.dtype()
                && st.exp_avg_sq.dtype() == p.dtype()
                && p.is_contiguous();
            if in_place {
                let both = match self.paired.get(name) {
                    Some(both) => both.clone(),
                    None => {
                        // Once per parameter (and after a reset or a loaded state): the
                        // moments copied into one buffer of this optimizer's own.
                        let row = |t: &Tensor| t.flatten_all()?.unsqueeze(0);
                        let both = row(&st.exp_avg)
                            .and_then(|m| Tensor::cat(&[m, row(&st.exp_avg_sq)?], 0))
                            .with_ctx(ctx)?;
                        let shape = p.shape();
                        st.exp_avg = both.get(0).and_then(|m| m.reshape(shape)).with_ctx(ctx)?;
                        st.exp_avg_sq = both.get(1).and_then(|v| v.reshape(shape)).with_ctx(ctx)?;
                        self.exclusive.remove(name);
                        self.paired.insert(name.clone(), both.clone());
                        both
                    }
                };
                adamw_update_in_place(p, g, &both, k).with_ctx(ctx)?;
                continue;
            }
            let (m, v) =
                if crate::ops::has_kernel(p) && g.dtype() == p.dtype() && p.is_contiguous() {
                    // The same arithmetic in two passes (bit-identical on the CPU).
                    adamw_update(p, g, &st.exp_avg, &st.exp_avg_sq, k)
                } else {
                    composed_update(var, g, &st.exp_avg, &st.exp_avg_sq, &k)
                }
                .with_ctx(ctx)?;
            st.exp_avg = m;
            st.exp_avg_sq = v;
            // Now views of one buffer (the fused kernel) or of anything (the composed ops).
            self.exclusive.remove(name);
        }
        Ok(())
    }

    /// The whole step as one grouped CUDA update, when every parameter qualifies
    /// ([`crate::ops::adamw_group::group_applies`]); `false` (nothing done) otherwise.
    #[cfg(feature = "cuda")]
    fn step_grouped(
        &mut self,
        params: &[(String, Var)],
        grads: &[Tensor],
        constants: &[AdamWConstants],
    ) -> Result<bool> {
        use crate::ops::adamw_group::{adamw_update_group, grouping_on, GroupMember};
        let Some((_, first)) = params.first() else {
            return Ok(false);
        };
        let device = first.device().clone();
        if !grouping_on(&device) {
            return Ok(false);
        }
        let n = params.len().min(grads.len()).min(constants.len());
        let mut grads_c = Vec::with_capacity(n);
        for ((name, var), g) in params.iter().zip(grads).take(n) {
            let st = &self.states[name];
            let f32_here = |t: &Tensor| {
                t.dtype() == DType::F32
                    && t.device().same_device(&device)
                    && t.shape() == var.shape()
            };
            // Gradients may be transposed views, and the moments are copied below unless this
            // optimizer allocated them: only the parameter must already be contiguous.
            if !(var.is_contiguous()
                && [var.as_tensor(), g, &st.exp_avg, &st.exp_avg_sq]
                    .into_iter()
                    .all(f32_here))
            {
                return Ok(false);
            }
            grads_c.push(g.contiguous().with_ctx(|| format!("gradient of {name}"))?);
        }
        for (name, _) in params.iter().take(n) {
            if self.exclusive.contains(name) {
                continue;
            }
            let st = self.states.get_mut(name).expect("checked above");
            let ctx = || format!("AdamW state of {name}");
            st.exp_avg = st.exp_avg.force_contiguous().with_ctx(ctx)?;
            st.exp_avg_sq = st.exp_avg_sq.force_contiguous().with_ctx(ctx)?;
            self.exclusive.insert(name.clone());
        }
        let members: Vec<GroupMember> = params
            .iter()
            .zip(&grads_c)
            .zip(constants)
            .map(|(((name, var), grad), &constants)| {
                let st = &self.states[name];
                GroupMember {
                    name,
                    param: var.as_tensor(),
                    grad,
                    exp_avg: &st.exp_avg,
                    exp_avg_sq: &st.exp_avg_sq,
                    constants,
                }
            })
            .collect();
        adamw_update_group(&members).ctx("grouped AdamW update")?;
        Ok(true)
    }

    /// Without the `cuda` feature there is no grouped update.
    #[cfg(not(feature = "cuda"))]
    fn step_grouped(
        &mut self,
        _params: &[(String, Var)],
        _grads: &[Tensor],
        _constants: &[AdamWConstants],
    ) -> Result<bool> {
        Ok(false)
    }

    /// Prunes the moments of every parameter whose name satisfies `select` (ReLoRA: the adapters),
    /// leaving all other state untouched. Step counters are kept.
    pub fn reset(
        &mut self,
        select: impl Fn(&str) -> bool,
        mode: ResetMode,
        rng: &mut Rng,
    ) -> Result<ResetReport> {
        let mut report = ResetReport::default();
        for (name, st) in self.states.iter_mut().filter(|(n, _)| select(n)) {
            let ctx = || format!("optimizer reset of {name}");
            let shape = st.exp_avg.shape().clone();
            let (dtype, device) = (st.exp_avg.dtype(), st.exp_avg.device().clone());
            let mut m: Vec<f32> = st
                .exp_avg
                .flatten_all()
                .and_then(|t| t.to_dtype(DType::F32))
                .and_then(|t| t.to_vec1())
                .with_ctx(ctx)?;
            let mut v: Vec<f32> = st
                .exp_avg_sq
                .flatten_all()
                .and_then(|t| t.to_dtype(DType::F32))
                .and_then(|t| t.to_vec1())
                .with_ctx(ctx)?;
            let zeroed = prune_pair(&mut m, &mut v, mode, rng);
            // A keep-mask rather than the pruned f32 copies, so f64 state keeps its precision.
            // Positions where both pruned values are zero are either selected or were already
            // zero in both moments, so multiplying them by 0 is exact either way.
            let keep: Vec<f32> = m
                .iter()
                .zip(&v)
                .map(|(a, b)| if *a == 0.0 && *b == 0.0 { 0.0 } else { 1.0 })
                .collect();
            let keep = Tensor::from_vec(keep, shape, &Device::Cpu)
                .and_then(|k| k.to_dtype(dtype))
                .and_then(|k| k.to_device(&device))
                .with_ctx(ctx)?;
            st.exp_avg = (&st.exp_avg * &keep).with_ctx(ctx)?;
            st.exp_avg_sq = (&st.exp_avg_sq * &keep).with_ctx(ctx)?;
            self.paired.remove(name);
            // Two fresh products, each in memory of its own.
            self.exclusive.insert(name.clone());
            report.params += 1;
            report.positions += m.len();
            report.zeroed += zeroed;
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PyTorch's AdamW written out in f64 for one scalar.
    fn reference(p0: f64, grads: &[f64], lr: f64, c: AdamWConfig, decay: bool) -> f64 {
        let (mut p, mut m, mut v) = (p0, 0.0, 0.0);
        for (t, g) in grads.iter().enumerate() {
            let t = (t + 1) as i32;
            if decay {
                p *= 1.0 - lr * c.weight_decay;
            }
            m = c.beta1 * m + (1.0 - c.beta1) * g;
            v = c.beta2 * v + (1.0 - c.beta2) * g * g;
            let denom = (v / (1.0 - c.beta2.powi(t))).sqrt() + c.eps;
            p -= lr / (1.0 - c.beta1.powi(t)) * m / denom;
        }
        p
    }

    #[test]
    fn updates_match_the_reference_and_decay_only_matrices() {
        let dev = Device::Cpu;
        let c = AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let init = [0.5f64, -1.5, 2.0, 0.25];
        let matrix = Var::from_vec(init.to_vec(), (2, 2), &dev).unwrap();
        let vector = Var::from_vec(init.to_vec(), 4, &dev).unwrap();
        let params = vec![
            ("m".to_string(), matrix.clone()),
            ("v".to_string(), vector.clone()),
        ];
        let steps: Vec<[f64; 4]> = vec![
            [0.1, -0.2, 0.3, 0.0],
            [0.05, 0.4, -0.1, 1.0],
            [-0.3, 0.1, 0.2, -0.5],
        ];
        let mut opt = AdamW::new(c);
        for g in &steps {
            let grads = vec![
                Tensor::from_vec(g.to_vec(), (2, 2), &dev).unwrap(),
                Tensor::from_vec(g.to_vec(), 4, &dev).unwrap(),
            ];
            opt.step(&params, &grads, &[true, false], 0.01).unwrap();
        }
        let got_m: Vec<f64> = matrix.flatten_all().unwrap().to_vec1().unwrap();
        let got_v: Vec<f64> = vector.to_vec1().unwrap();
        for i in 0..4 {
            let gs: Vec<f64> = steps.iter().map(|g| g[i]).collect();
            let want_decayed = reference(init[i], &gs, 0.01, c, true);
            let want_plain = reference(init[i], &gs, 0.01, c, false);
            assert!((got_m[i] - want_decayed).abs() < 1e-12, "matrix[{i}]");
            assert!((got_v[i] - want_plain).abs() < 1e-12, "vector[{i}]");
            assert!(want_decayed != want_plain);
        }
        assert_eq!(opt.state("m").unwrap().step, 3);
        assert_eq!(opt.state_bytes(), 2 * 2 * 4 * 8);
    }

    #[test]
    fn fused_and_in_place_updates_are_bit_identical_to_the_composed_ops() {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::F64] {
            for (decay, grad_scale, shape) in [
                (None, 1.0, (33, 70)),
                (Some(1.0 - 3e-3 * 0.1), 0.37, (33, 70)),
                // Above the serial limit: the passes run in parallel chunks.
                (Some(1.0 - 3e-3 * 0.1), 0.37, (300, 300)),
            ] {
                let p0 = Tensor::randn(0f64, 1.0, shape, &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let (fused_p, composed_p, in_place_p) = (
                    Var::from_tensor(&p0.copy().unwrap()).unwrap(),
                    Var::from_tensor(&p0.copy().unwrap()).unwrap(),
                    Var::from_tensor(&p0.copy().unwrap()).unwrap(),
                );
                // The in-place form's buffer: m then v.
                let both = Tensor::zeros((2, p0.elem_count()), dtype, &dev).unwrap();
                // Zero moments sharing one storage, as a fresh state has them.
                let z = p0.zeros_like().unwrap();
                let (mut fm, mut fv) = (z.clone(), z.clone());
                let (mut cm, mut cv) = (z.clone(), z);
                for t in 1..=4 {
                    let g = Tensor::randn(0f64, 0.3, shape, &dev)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap();
                    let k = AdamWConstants {
                        beta1: 0.9,
                        beta2: 0.95,
                        inv_sqrt_bc2: 1.0 / (1.0 - 0.95f64.powi(t)).sqrt(),
                        eps: 1e-8,
                        step_size: 3e-3 / (1.0 - 0.9f64.powi(t)),
                        decay,
                        grad_scale,
                    };
                    (fm, fv) = adamw_update(fused_p.as_tensor(), &g, &fm, &fv, k).unwrap();
                    (cm, cv) = composed_update(&composed_p, &g, &cm, &cv, &k).unwrap();
                    adamw_update_in_place(in_place_p.as_tensor(), &g, &both, k).unwrap();
                }
                let bits = |t: &Tensor| -> Vec<u64> {
                    let t = t.flatten_all().unwrap();
                    match dtype {
                        DType::F32 => t
                            .to_vec1::<f32>()
                            .unwrap()
                            .iter()
                            .map(|x| u64::from(x.to_bits()))
                            .collect(),
                        _ => t
                            .to_vec1::<f64>()
                            .unwrap()
                            .iter()
                            .map(|x| x.to_bits())
                            .collect(),
                    }
                };
                assert!(bits(&fm) == bits(&cm), "{dtype:?} {decay:?}: exp_avg");
                assert!(bits(&fv) == bits(&cv), "{dtype:?} {decay:?}: exp_avg_sq");
                assert!(
                    bits(fused_p.as_tensor()) == bits(composed_p.as_tensor()),
                    "{dtype:?} {decay:?}: parameter"
                );
                assert!(
                    bits(&both.get(0).unwrap()) == bits(&cm),
                    "in place: exp_avg"
                );
                assert!(
                    bits(&both.get(1).unwrap()) == bits(&cv),
                    "in place: exp_avg_sq"
                );
                assert!(
                    bits(in_place_p.as_tensor()) == bits(composed_p.as_tensor()),
                    "in place: parameter"
                );
                assert!(
                    bits(fused_p.as_tensor()) != bits(&p0),
                    "nothing was updated"
                );
            }
        }
    }
}
