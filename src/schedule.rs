//! The learning-rate multiplier for ReLoRA training: a linear warmup, a cosine decay envelope
//! down to `min_lr_ratio`, and, after every ReLoRA reset, a short linear re-warmup back up to
//! that envelope (the "jagged cosine" of the ReLoRA paper).
//!
//! The multiplier is a pure function of the optimizer step, so a resumed run only needs the step
//! number to continue exactly where it stopped; nothing about the schedule lives in a checkpoint
//! beyond this configuration.
//!
//! # Differences from the reference implementation
//!
//! Both ramps here start at `1/len` instead of `0`:
//!
//! * The initial warmup gives step `s < W` the multiplier `(s + 1) / W`. The reference uses
//!   `s / W`, so its very first step runs at learning rate 0 and is wasted (the gradients are
//!   computed and the Adam moments are updated, but the weights do not move). With `(s + 1) / W`
//!   the last warmup step `W - 1` already reaches 1.0 and the envelope takes over at `W`.
//! * Likewise, the reference spends the step right after each reset at multiplier 0. Here the
//!   re-warmup starting at a reset step `r` gives `(t - r + 1) / RW` times the envelope value at
//!   the end of the ramp, so the first post-reset step already trains, and the ramp meets the
//!   envelope at its last step `r + RW - 1`.
//!
//! Because of this one-step shift the ramps differ from the reference by one step; the cosine
//! envelope itself has the same values at the same steps.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// When ReLoRA resets (merge the adapters, re-initialise them, prune the optimizer state) happen,
/// and how long the learning rate takes to climb back afterwards.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RestartCycle {
    /// The first optimizer step before which a reset happens. Switching from full-rank warmup to
    /// LoRA training is not a reset by itself; the caller decides whether it counts as one by
    /// choosing this value.
    pub first_reset: u64,
    /// Distance in steps between consecutive resets; resets happen at
    /// `first_reset + k * reset_every` for every `k >= 0`.
    pub reset_every: u64,
    /// Length of the linear re-warmup after each reset; 0 disables it. Must be shorter than
    /// `reset_every` so that one ramp has ended before the next reset starts another.
    pub restart_warmup_steps: u64,
}

/// A learning-rate schedule: linear warmup, cosine decay, optional restarts with re-warmup.
///
/// The schedule yields a multiplier in `[0, 1]` that the trainer applies to its peak learning
/// rate; keeping the peak out of here lets the same schedule drive several parameter groups.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Schedule {
    /// Number of optimizer steps in the whole run (`N`). The cosine reaches its floor here.
    pub total_steps: u64,
    /// Number of initial linear warmup steps (`W`); 0 means the run starts at the peak.
    pub warmup_steps: u64,
    /// The floor of the cosine as a fraction of the peak learning rate (`m`), in `[0, 1]`.
    pub min_lr_ratio: f64,
    /// ReLoRA restarts; `None` gives a plain warmup + cosine schedule.
    pub cycle: Option<RestartCycle>,
}

impl Schedule {
    /// Checks that the settings describe a usable schedule: the one place these rules live (a
    /// training configuration's validation calls it). Messages use the training option keys
    /// (`steps` is `total_steps` here).
    ///
    /// Besides the basic ranges it rejects a first reset inside the initial warmup: a reset
    /// there would start a second ramp while the first one is still climbing, which is never
    /// what a configuration means. A first reset at or after `total_steps` is accepted and simply
    /// never happens, so that a short test run can reuse a long run's cycle settings.
    pub fn validate(&self) -> Result<()> {
        if self.total_steps == 0 {
            return Err(Error::Config("steps must be positive".into()));
        }
        if self.warmup_steps >= self.total_steps {
            return Err(Error::Config(format!(
                "warmup_steps {} must be below steps {}",
                self.warmup_steps, self.total_steps
            )));
        }
        // Written so that NaN fails too.
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return Err(Error::Config(format!(
                "min_lr_ratio {} must be in [0, 1]",
                self.min_lr_ratio
            )));
        }
        if let Some(c) = &self.cycle {
            if c.reset_every == 0 {
                return Err(Error::Config("reset_every must be positive".into()));
            }
            if c.restart_warmup_steps >= c.reset_every {
                return Err(Error::Config(format!(
                    "restart_warmup_steps {} must be below reset_every {}",
                    c.restart_warmup_steps, c.reset_every
                )));
            }
            if c.first_reset < self.warmup_steps {
                return Err(Error::Config(format!(
                    "the first reset, before step {} (warmup_full_steps, or reset_every without a \
                     full-rank warm start), must not fall inside the learning-rate warm-up \
                     (warmup_steps {})",
                    c.first_reset, self.warmup_steps
                )));
            }
        }
        Ok(())
    }

    /// Whether a ReLoRA reset (merge, re-initialisation, optimizer pruning) happens right before
    /// the 0-based optimizer step `step` is taken.
    ///
    /// This is pure arithmetic on the cycle; it does not look at `total_steps`, since a step at
    /// or beyond the end is never taken anyway.
    pub(crate) fn is_reset_step(&self, step: u64) -> bool {
        match &self.cycle {
            Some(c) if c.reset_every > 0 && step >= c.first_reset => {
                (step - c.first_reset).is_multiple_of(c.reset_every)
            }
            _ => false,
        }
    }

    /// The cosine envelope at `step`: `m + (1 - m) * (1 + cos(pi * (t - W) / (N - W))) / 2`
    /// with `t` clamped to `N`. It is 1.0 at `W`, `(1 + m) / 2` halfway and `m` from `N` on.
    /// Steps inside the initial warmup return 1.0, the peak the warmup climbs to.
    pub(crate) fn envelope(&self, step: u64) -> f64 {
        let w = self.warmup_steps;
        let n = self.total_steps;
        let m = self.min_lr_ratio;
        if step < w {
            return 1.0;
        }
        let span = n.saturating_sub(w);
        // An empty decay span (only possible on an unvalidated schedule) sits at the floor
        // rather than dividing by zero.
        let progress = if span == 0 {
            1.0
        } else {
            (step.min(n) - w) as f64 / span as f64
        };
        m + (1.0 - m) * (1.0 + (std::f64::consts::PI * progress).cos()) / 2.0
    }

    /// The learning-rate multiplier for the 0-based optimizer step `step`, about to be taken.
    ///
    /// * `step < W`: `(step + 1) / W` — never zero; see the module documentation.
    /// * Within the `RW` steps starting at a reset step `r`: `(step - r + 1) / RW` times the
    ///   envelope at `r + RW - 1`, a linear climb from `1/RW` of that value to the envelope.
    /// * Otherwise: the cosine [`envelope`](Self::envelope).
    ///
    /// Meant for validated schedules, but never panics: degenerate settings give finite values.
    pub fn multiplier(&self, step: u64) -> f64 {
        let w = self.warmup_steps;
        if step < w {
            return (step + 1) as f64 / w as f64;
        }
        if let Some(c) = &self.cycle {
            let rw = c.restart_warmup_steps;
            if rw > 0 && c.reset_every > 0 && step >= c.first_reset {
                // The most recent reset at or before `step`; no overflow as it is <= step.
                let r = c.first_reset + (step - c.first_reset) / c.reset_every * c.reset_every;
                let into = step - r;
                if into < rw {
                    let target = self.envelope(r.saturating_add(rw - 1));
                    return (into + 1) as f64 / rw as f64 * target;
                }
            }
        }
        self.envelope(step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(total: u64, warmup: u64, m: f64) -> Schedule {
        Schedule {
            total_steps: total,
            warmup_steps: warmup,
            min_lr_ratio: m,
            cycle: None,
        }
    }

    fn cyclic() -> Schedule {
        Schedule {
            total_steps: 10_000,
            warmup_steps: 100,
            min_lr_ratio: 0.1,
            cycle: Some(RestartCycle {
                first_reset: 1000,
                reset_every: 1000,
                restart_warmup_steps: 50,
            }),
        }
    }

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn warmup_starts_at_one_over_w_and_ends_at_one() {
        let s = plain(1000, 100, 0.1);
        assert_eq!(s.multiplier(0), 0.01);
        assert_eq!(s.multiplier(99), 1.0);
        assert_eq!(s.multiplier(49), 0.5);
        // Strictly increasing through the warmup.
        for t in 1..100 {
            assert!(s.multiplier(t) > s.multiplier(t - 1));
        }
    }

    #[test]
    fn single_step_warmup_and_no_warmup() {
        assert_eq!(plain(10, 1, 0.0).multiplier(0), 1.0);
        let s = plain(10, 0, 0.0);
        assert_eq!(s.multiplier(0), 1.0);
        assert!(s.multiplier(1) < 1.0);
    }

    #[test]
    fn envelope_at_warmup_end_midpoint_and_end() {
        let m = 0.1;
        let s = plain(1100, 100, m);
        assert_eq!(s.multiplier(100), 1.0);
        assert!(close(s.multiplier(600), (1.0 + m) / 2.0, 1e-12));
        assert!(close(s.multiplier(1099), m, 1e-4));
        assert!(s.multiplier(1099) >= m);
        assert!(close(s.multiplier(1100), m, 1e-12));
        assert!(close(s.multiplier(5000), m, 1e-12));
    }

    #[test]
    fn envelope_matches_worked_example() {
        let s = plain(15_000, 500, 0.1);
        assert!(close(s.envelope(4999), 0.803, 1e-3), "{}", s.envelope(4999));
        assert!(
            close(s.envelope(10_100), 0.331, 1e-3),
            "{}",
            s.envelope(10_100)
        );
        assert!(
            close(s.envelope(14_999), 0.10, 1e-3),
            "{}",
            s.envelope(14_999)
        );
    }

    #[test]
    fn reset_steps_follow_the_cycle() {
        let s = cyclic();
        assert!(!s.is_reset_step(0));
        assert!(!s.is_reset_step(999));
        assert!(s.is_reset_step(1000));
        assert!(!s.is_reset_step(1001));
        assert!(!s.is_reset_step(1500));
        assert!(s.is_reset_step(2000));
        assert!(s.is_reset_step(9000));
        assert!(!plain(1000, 10, 0.1).is_reset_step(500));
    }

    #[test]
    fn reset_step_starts_the_ramp_at_one_over_rw() {
        let s = cyclic();
        let target = s.envelope(1049);
        assert!(close(s.multiplier(1000), target / 50.0, 1e-15));
        assert!(s.multiplier(1000) > 0.0);
        // The step before the reset is still on the envelope.
        assert_eq!(s.multiplier(999), s.envelope(999));
    }

    #[test]
    fn rewarmup_is_linear_and_meets_the_envelope() {
        let s = cyclic();
        let target = s.envelope(1049);
        for j in 0..50 {
            let expected = (j + 1) as f64 / 50.0 * target;
            assert!(close(s.multiplier(1000 + j), expected, 1e-15));
        }
        // Constant increments: linear.
        let d0 = s.multiplier(1001) - s.multiplier(1000);
        for t in 1001..1050 {
            assert!(close(s.multiplier(t) - s.multiplier(t - 1), d0, 1e-12));
        }
        assert!(close(s.multiplier(1049), target, 1e-15));
        assert_eq!(s.multiplier(1050), s.envelope(1050));
    }

    #[test]
    fn envelope_does_not_increase_between_resets() {
        let s = cyclic();
        for t in 1051..2000 {
            assert!(s.multiplier(t) <= s.multiplier(t - 1), "step {t}");
        }
        for t in 101..1000 {
            assert!(s.multiplier(t) <= s.multiplier(t - 1), "step {t}");
        }
    }

    #[test]
    fn zero_restart_warmup_keeps_the_envelope_at_resets() {
        let mut s = cyclic();
        s.cycle.as_mut().unwrap().restart_warmup_steps = 0;
        s.validate().unwrap();
        assert!(s.is_reset_step(2000));
        assert_eq!(s.multiplier(2000), s.envelope(2000));
    }

    #[test]
    fn validate_accepts_good_and_rejects_bad_settings() {
        cyclic().validate().unwrap();
        plain(10, 0, 0.0).validate().unwrap();
        plain(10, 9, 1.0).validate().unwrap();

        let bad = |s: Schedule| matches!(s.validate(), Err(Error::Config(_)));
        assert!(bad(plain(0, 0, 0.1)));
        assert!(bad(plain(10, 10, 0.1)));
        assert!(bad(plain(10, 11, 0.1)));
        assert!(bad(plain(10, 1, -0.1)));
        assert!(bad(plain(10, 1, 1.5)));
        assert!(bad(plain(10, 1, f64::NAN)));
        let with = |f: fn(&mut RestartCycle)| {
            let mut s = cyclic();
            f(s.cycle.as_mut().unwrap());
            s
        };
        assert!(bad(with(|c| c.reset_every = 0)));
        assert!(bad(with(|c| c.restart_warmup_steps = 1000)));
        assert!(bad(with(|c| c.restart_warmup_steps = 2000)));
        assert!(bad(with(|c| c.first_reset = 99)));
        assert!(!bad(with(|c| c.first_reset = 100)));
    }

    #[test]
    fn degenerate_schedules_do_not_panic() {
        let mut s = cyclic();
        s.cycle.as_mut().unwrap().reset_every = 0;
        assert!(!s.is_reset_step(1000));
        assert!(s.multiplier(1000).is_finite());
        let s = plain(5, 5, 0.1);
        assert!(s.multiplier(5).is_finite());
        let s = plain(0, 0, 0.1);
        assert!(s.multiplier(0).is_finite());
        let mut s = cyclic();
        s.cycle.as_mut().unwrap().first_reset = u64::MAX - 1;
        assert!(s.multiplier(u64::MAX).is_finite());
    }

    #[test]
    fn serde_roundtrip() {
        let s = cyclic();
        let json = serde_json::to_string(&s).unwrap();
        let back: Schedule = serde_json::from_str(&json).unwrap();
        assert_eq!(s, back);
    }
}
