//! Pruning of optimizer state at ReLoRA resets.
//!
//! After the adapters are merged and re-initialised, the Adam moments still describe the old
//! adapters. ReLoRA keeps only a small part of that state: it zeroes most entries and lets the
//! optimizer rebuild the rest. The functions here do that on plain `f32` slices so that they are
//! independent of where the tensors live; the caller copies a moment to the host, prunes it and
//! writes it back.
//!
//! Every mode selects an exact number of entries, `k = round(p * n)` (`n` for [`ResetMode::Zero`]),
//! rather than flipping a coin per entry, so that the amount of surviving state is the same on
//! every run and every tensor size, and tests can check it exactly.

use crate::error::{Error, Result};
use crate::rng::Rng;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// How optimizer state is pruned at a reset. `p` is the fraction of entries set to zero.
///
/// Text form (for configuration files and command lines): `zero`, `random:<p>`,
/// `magnitude:<p>`, with `p` in `[0, 1]`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum ResetMode {
    /// Zero every entry.
    Zero,
    /// Zero `round(p * n)` entries chosen uniformly at random.
    Random(f64),
    /// Zero the `round(p * n)` entries with the smallest magnitude; the rest keep their values.
    Magnitude(f64),
}

impl ResetMode {
    /// Parses the text form, `zero`, `random:<p>` or `magnitude:<p>`. Names are matched without
    /// regard to case or surrounding spaces.
    pub fn parse(text: &str) -> Result<Self> {
        let text = text.trim();
        let (name, p) = match text.split_once(':') {
            Some((name, p)) => (name.trim(), Some(p.trim())),
            None => (text, None),
        };
        let name = name.to_ascii_lowercase();
        let mode = match (name.as_str(), p) {
            ("zero", None) => ResetMode::Zero,
            ("zero", Some(_)) => {
                return Err(Error::Config(format!(
                    "reset mode '{text}': 'zero' takes no fraction"
                )))
            }
            ("random", Some(p)) => ResetMode::Random(parse_fraction(text, p)?),
            ("magnitude", Some(p)) => ResetMode::Magnitude(parse_fraction(text, p)?),
            ("random" | "magnitude", None) => {
                return Err(Error::Config(format!(
                    "reset mode '{text}': missing the pruned fraction, e.g. '{name}:0.9'"
                )))
            }
            _ => {
                return Err(Error::Config(format!(
                    "unknown reset mode '{text}'; expected 'zero', 'random:<p>' or 'magnitude:<p>'"
                )))
            }
        };
        mode.validate()?;
        Ok(mode)
    }

    /// Checks that the fraction is within `[0, 1]`. [`parse`](Self::parse) already does this;
    /// call it on modes that were built directly or deserialised.
    pub fn validate(&self) -> Result<()> {
        match *self {
            ResetMode::Zero => Ok(()),
            ResetMode::Random(p) | ResetMode::Magnitude(p) => {
                // Written so that NaN fails too.
                if (0.0..=1.0).contains(&p) {
                    Ok(())
                } else {
                    Err(Error::Config(format!(
                        "reset mode '{self}': the pruned fraction must be in [0, 1]"
                    )))
                }
            }
        }
    }

    /// How many of `n` entries this mode selects: `n` for `Zero`, `round(p * n)` otherwise.
    /// `p` is clamped to `[0, 1]` and NaN counts as 0, so an unvalidated mode cannot ask for
    /// more entries than exist.
    pub(crate) fn selected_count(&self, n: usize) -> usize {
        let p = match *self {
            ResetMode::Zero => return n,
            ResetMode::Random(p) | ResetMode::Magnitude(p) => p,
        };
        if p.is_nan() || p <= 0.0 {
            return 0;
        }
        let k = (p.min(1.0) * n as f64).round();
        // The float product can round past n for huge n; never select more than exist.
        (k as usize).min(n)
    }
}

fn parse_fraction(text: &str, p: &str) -> Result<f64> {
    p.parse::<f64>().map_err(|_| {
        Error::Config(format!(
            "reset mode '{text}': '{p}' is not a number; expected a fraction in [0, 1]"
        ))
    })
}

impl FromStr for ResetMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        ResetMode::parse(s)
    }
}

impl fmt::Display for ResetMode {
    /// Writes the text form that [`ResetMode::parse`] reads back; `f64`'s shortest round-trip
    /// formatting makes the round trip exact.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResetMode::Zero => write!(f, "zero"),
            ResetMode::Random(p) => write!(f, "random:{p}"),
            ResetMode::Magnitude(p) => write!(f, "magnitude:{p}"),
        }
    }
}

/// Zeroes the entries of `values` that `mode` selects and returns how many were selected.
///
/// The count is of selected entries, including ones that already held zero, so it is always
/// exactly [`ResetMode::selected_count`] of `values.len()`.
///
/// * `Zero` zeroes everything.
/// * `Random(p)` zeroes exactly `round(p * n)` entries drawn uniformly without replacement.
/// * `Magnitude(p)` zeroes exactly the `round(p * n)` entries of smallest `|x|`; among equal
///   magnitudes the lower index goes first, and NaN counts as larger than any number.
///
/// `rng` is drawn from only by `Random` with `0 < k < n`. A fraction outside `[0, 1]` is
/// clamped (see [`ResetMode::selected_count`]); validate modes when reading configuration.
#[cfg(test)]
pub(crate) fn prune_in_place(values: &mut [f32], mode: ResetMode, rng: &mut Rng) -> usize {
    let n = values.len();
    let k = mode.selected_count(n);
    if k == 0 {
        return 0;
    }
    if k == n {
        values.fill(0.0);
        return n;
    }
    match mode {
        // Zero always selects every entry, handled above.
        ResetMode::Zero => {}
        ResetMode::Random(_) => {
            let drawn = random_subset(n, k, rng);
            if drawn.zeroed {
                for &i in &drawn.indices {
                    values[i] = 0.0;
                }
            } else {
                let kept: Vec<f32> = drawn.indices.iter().map(|&i| values[i]).collect();
                values.fill(0.0);
                for (&i, &x) in drawn.indices.iter().zip(&kept) {
                    values[i] = x;
                }
            }
        }
        ResetMode::Magnitude(_) => {
            let mut cut = MagnitudeCut::new(values, k);
            for x in values.iter_mut() {
                if cut.take(*x) {
                    *x = 0.0;
                }
            }
        }
    }
    k
}

/// Prunes Adam's first and second moments of one parameter with a single mask, and returns
/// how many positions were zeroed (each position counts once, though it is zeroed in both).
///
/// The ReLoRA paper prunes both moments; using the same positions for both keeps them
/// consistent. Zeroing `m` but not `v` would leave a stale `v` that shrinks the next updates at
/// those positions for no reason, and zeroing `v` but not `m` would divide an old momentum by a
/// tiny fresh `v` and produce huge steps. So `Random` draws one mask for both, and `Magnitude`
/// ranks positions by `|m|` (the moment that carries the direction) and zeroes those positions
/// in `v` as well.
///
/// `m` and `v` should have the same length. If they do not (a caller bug: they cannot then
/// belong to one parameter), only the positions they share are considered, so that the bug
/// shows up as untouched state rather than a panic in the middle of a run. Counting and clamping
/// are as in [`prune_in_place`].
pub(crate) fn prune_pair(m: &mut [f32], v: &mut [f32], mode: ResetMode, rng: &mut Rng) -> usize {
    let shared = m.len().min(v.len());
    let (m, v) = (&mut m[..shared], &mut v[..shared]);
    let n = m.len();
    let k = mode.selected_count(n);
    if k == 0 {
        return 0;
    }
    if k == n {
        m.fill(0.0);
        v.fill(0.0);
        return n;
    }
    match mode {
        ResetMode::Zero => {}
        ResetMode::Random(_) => {
            let drawn = random_subset(n, k, rng);
            if drawn.zeroed {
                for &i in &drawn.indices {
                    m[i] = 0.0;
                    v[i] = 0.0;
                }
            } else {
                let kept: Vec<(f32, f32)> = drawn.indices.iter().map(|&i| (m[i], v[i])).collect();
                m.fill(0.0);
                v.fill(0.0);
                for (&i, &(a, b)) in drawn.indices.iter().zip(&kept) {
                    m[i] = a;
                    v[i] = b;
                }
            }
        }
        ResetMode::Magnitude(_) => {
            let mut cut = MagnitudeCut::new(m, k);
            for (a, b) in m.iter_mut().zip(v.iter_mut()) {
                if cut.take(*a) {
                    *a = 0.0;
                    *b = 0.0;
                }
            }
        }
    }
    k
}

/// Positions drawn by [`random_subset`]: either the ones to zero or the ones to keep.
struct RandomSubset {
    indices: Vec<usize>,
    /// `true`: `indices` are the positions to zero; `false`: the positions to keep.
    zeroed: bool,
}

/// Draws a uniformly random set of `k` of `n` positions (`0 < k < n`).
///
/// A uniform `k`-subset is the complement of a uniform `(n - k)`-subset, so when most entries
/// are pruned (the usual `p = 0.99`) it draws the few survivors instead: that costs
/// `min(k, n - k)` random numbers instead of `k`.
fn random_subset(n: usize, k: usize, rng: &mut Rng) -> RandomSubset {
    let zeroed = k <= n - k;
    let count = if zeroed { k } else { n - k };
    // The index table is the largest allocation here; 32-bit entries halve it for every tensor
    // that fits, which is all of them in practice.
    let indices = if u32::try_from(n).is_ok() {
        partial_shuffle::<u32>(n, count, rng)
    } else {
        partial_shuffle::<usize>(n, count, rng)
    };
    RandomSubset { indices, zeroed }
}

/// An index type for the shuffle table.
trait TableIndex: Copy {
    fn from_usize(i: usize) -> Self;
    fn to_usize(self) -> usize;
}

impl TableIndex for u32 {
    // Only used when every index fits, checked in `random_subset`.
    fn from_usize(i: usize) -> Self {
        i as u32
    }
    fn to_usize(self) -> usize {
        self as usize
    }
}

impl TableIndex for usize {
    fn from_usize(i: usize) -> Self {
        i
    }
    fn to_usize(self) -> usize {
        self
    }
}

/// The first `count` positions of a Fisher–Yates shuffle of `0..n`: a uniform sample without
/// replacement, in random order.
fn partial_shuffle<I: TableIndex>(n: usize, count: usize, rng: &mut Rng) -> Vec<usize> {
    let mut table: Vec<I> = (0..n).map(I::from_usize).collect();
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        // n - i >= 1 because count < n.
        let j = i + rng.below((n - i) as u64) as usize;
        table.swap(i, j);
        out.push(table[i].to_usize());
    }
    out
}

/// Sort key for magnitude pruning: the bit pattern of `|x|`, which orders non-negative floats
/// like their values (and puts +0 and -0 together), with every NaN mapped above infinity so that
/// NaN entries are pruned last and all NaNs tie with each other.
fn magnitude_key(x: f32) -> u32 {
    if x.is_nan() {
        u32::MAX
    } else {
        x.abs().to_bits()
    }
}

/// The exact boundary of the `k` smallest magnitudes, applied in one pass in index order:
/// everything with a key below `threshold` is taken, and of the entries whose key equals it only
/// the first `ties` (lowest indices) are.
struct MagnitudeCut {
    threshold: u32,
    ties: usize,
}

impl MagnitudeCut {
    /// Finds the boundary for `0 < k < values.len()` with an O(n) selection on a copy of the
    /// keys, never a sampled quantile, so that exactly `k` entries are taken.
    fn new(values: &[f32], k: usize) -> Self {
        let mut keys: Vec<u32> = values.iter().map(|&x| magnitude_key(x)).collect();
        let (below, &mut threshold, _) = keys.select_nth_unstable_by(k - 1, |a, b| a.cmp(b));
        // Everything after the k-th smallest is >= it, so the entries strictly below the
        // threshold all sit in `below`.
        let strictly_below = below.iter().filter(|&&key| key < threshold).count();
        MagnitudeCut {
            threshold,
            ties: k - strictly_below,
        }
    }

    /// Whether the next entry in index order is pruned.
    fn take(&mut self, x: f32) -> bool {
        let key = magnitude_key(x);
        if key < self.threshold {
            true
        } else if key == self.threshold && self.ties > 0 {
            self.ties -= 1;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZES: [usize; 4] = [1, 7, 1000, 12_345];
    const FRACTIONS: [f64; 5] = [0.0, 0.5, 0.9, 0.99, 1.0];

    /// Distinct non-zero values of both signs, in a scrambled order.
    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = Rng::new(seed);
        (0..n)
            .map(|_| (rng.normal() as f32) + if rng.below(2) == 0 { 1e-3 } else { -1e-3 })
            .collect()
    }

    fn zeros(values: &[f32]) -> usize {
        values.iter().filter(|&&x| x == 0.0).count()
    }

    fn expected(n: usize, p: f64) -> usize {
        (p * n as f64).round() as usize
    }

    #[test]
    fn every_mode_zeroes_exactly_k() {
        let mut rng = Rng::new(1);
        for &n in &SIZES {
            let mut v = data(n, n as u64);
            assert_eq!(prune_in_place(&mut v, ResetMode::Zero, &mut rng), n);
            assert_eq!(zeros(&v), n);
            for &p in &FRACTIONS {
                for mode in [ResetMode::Random(p), ResetMode::Magnitude(p)] {
                    let mut v = data(n, n as u64 + 17);
                    assert_eq!(zeros(&v), 0);
                    let k = prune_in_place(&mut v, mode, &mut rng);
                    assert_eq!(k, expected(n, p), "{mode} n={n}");
                    assert_eq!(zeros(&v), k, "{mode} n={n}");
                }
            }
        }
    }

    #[test]
    fn empty_slices_are_fine() {
        let mut rng = Rng::new(0);
        for mode in [
            ResetMode::Zero,
            ResetMode::Random(0.5),
            ResetMode::Magnitude(0.5),
        ] {
            assert_eq!(prune_in_place(&mut [], mode, &mut rng), 0);
            assert_eq!(prune_pair(&mut [], &mut [], mode, &mut rng), 0);
        }
    }

    #[test]
    fn p_zero_changes_nothing_and_draws_nothing() {
        let mut rng = Rng::new(5);
        let before = rng.clone();
        let original = data(100, 3);
        for mode in [ResetMode::Random(0.0), ResetMode::Magnitude(0.0)] {
            let mut v = original.clone();
            assert_eq!(prune_in_place(&mut v, mode, &mut rng), 0);
            assert_eq!(v, original);
        }
        assert_eq!(rng, before);
    }

    #[test]
    fn count_includes_entries_that_were_already_zero() {
        let mut rng = Rng::new(2);
        let mut v = vec![0.0, 0.0, 3.0, -4.0, 5.0, 0.0, 7.0, 8.0];
        assert_eq!(
            prune_in_place(&mut v, ResetMode::Magnitude(0.5), &mut rng),
            4
        );
        assert_eq!(v, vec![0.0, 0.0, 0.0, -4.0, 5.0, 0.0, 7.0, 8.0]);
    }

    #[test]
    fn magnitude_zeroes_exactly_the_smallest() {
        let mut rng = Rng::new(3);
        for &n in &SIZES {
            for &p in &FRACTIONS {
                let original = data(n, 99);
                let mut v = original.clone();
                let k = prune_in_place(&mut v, ResetMode::Magnitude(p), &mut rng);
                let mut max_zeroed = 0.0f32;
                let mut min_kept = f32::INFINITY;
                for (&o, &x) in original.iter().zip(&v) {
                    if x == 0.0 {
                        max_zeroed = max_zeroed.max(o.abs());
                    } else {
                        assert_eq!(x, o, "kept entries keep their value");
                        min_kept = min_kept.min(o.abs());
                    }
                }
                assert!(min_kept >= max_zeroed, "n={n} p={p}");
                assert_eq!(zeros(&v), k);
            }
        }
    }

    #[test]
    fn magnitude_ties_take_lower_indices_first() {
        let mut rng = Rng::new(4);
        let mut v = vec![1.0f32; 1000];
        assert_eq!(
            prune_in_place(&mut v, ResetMode::Magnitude(0.5), &mut rng),
            500
        );
        assert!(v[..500].iter().all(|&x| x == 0.0));
        assert!(v[500..].iter().all(|&x| x == 1.0));

        // Ties at the boundary, mixed with signs and smaller values.
        let mut v = vec![2.0, -1.0, 1.0, 0.5, -1.0, 1.0, 3.0, 1.0];
        assert_eq!(
            prune_in_place(&mut v, ResetMode::Magnitude(0.5), &mut rng),
            4
        );
        assert_eq!(v, vec![2.0, 0.0, 0.0, 0.0, 0.0, 1.0, 3.0, 1.0]);
    }

    #[test]
    fn magnitude_treats_nan_as_largest() {
        let mut rng = Rng::new(6);
        let mut v = vec![f32::NAN, 5.0, -f32::NAN, f32::INFINITY, 1.0, -2.0];
        assert_eq!(
            prune_in_place(&mut v, ResetMode::Magnitude(0.5), &mut rng),
            3
        );
        assert!(v[0].is_nan() && v[2].is_nan());
        assert_eq!(&v[3..], &[f32::INFINITY, 0.0, 0.0]);
        assert_eq!(v[1], 0.0);

        // Once all numbers are gone, NaNs go in index order.
        let mut v = vec![f32::NAN, 1.0, f32::NAN, f32::NAN];
        assert_eq!(
            prune_in_place(&mut v, ResetMode::Magnitude(0.5), &mut rng),
            2
        );
        assert_eq!(v[0], 0.0);
        assert_eq!(v[1], 0.0);
        assert!(v[2].is_nan() && v[3].is_nan());
    }

    #[test]
    fn random_is_reproducible_from_the_seed() {
        for p in [0.3, 0.9] {
            let original = data(1000, 8);
            let mut a = original.clone();
            let mut b = original.clone();
            prune_in_place(&mut a, ResetMode::Random(p), &mut Rng::new(42));
            prune_in_place(&mut b, ResetMode::Random(p), &mut Rng::new(42));
            assert_eq!(a, b);
            let mut c = original.clone();
            prune_in_place(&mut c, ResetMode::Random(p), &mut Rng::new(43));
            assert_ne!(a, c);
            // Survivors keep their value.
            for (&o, &x) in original.iter().zip(&a) {
                assert!(x == 0.0 || x == o);
            }
        }
    }

    #[test]
    fn random_is_roughly_uniform() {
        // Both code paths: drawing the pruned set (p < 0.5) and drawing the survivors (p > 0.5).
        let n = 50;
        let trials = 10_000;
        let mut rng = Rng::new(7);
        for p in [0.3, 0.7] {
            let mut hits = vec![0u32; n];
            for _ in 0..trials {
                let mut v = vec![1.0f32; n];
                prune_in_place(&mut v, ResetMode::Random(p), &mut rng);
                for (h, &x) in hits.iter_mut().zip(&v) {
                    *h += (x == 0.0) as u32;
                }
            }
            let mean = trials as f64 * p;
            let sd = (trials as f64 * p * (1.0 - p)).sqrt();
            for (i, &h) in hits.iter().enumerate() {
                assert!((h as f64 - mean).abs() < 5.0 * sd, "p={p} pos {i}: {h}");
            }
        }
    }

    #[test]
    fn pair_uses_the_same_positions() {
        let n = 1000;
        for mode in [
            ResetMode::Random(0.9),
            ResetMode::Random(0.2),
            ResetMode::Magnitude(0.9),
            ResetMode::Magnitude(0.2),
        ] {
            let m0 = data(n, 10);
            // v is unrelated to m, so a mask computed from v would differ.
            let v0: Vec<f32> = data(n, 11).iter().map(|x| x * x + 0.1).collect();
            let (mut m, mut v) = (m0.clone(), v0.clone());
            let k = prune_pair(&mut m, &mut v, mode, &mut Rng::new(1));
            assert_eq!(k, mode.selected_count(n));
            for i in 0..n {
                assert_eq!(m[i] == 0.0, v[i] == 0.0, "{mode} pos {i}");
                if m[i] != 0.0 {
                    assert_eq!((m[i], v[i]), (m0[i], v0[i]));
                }
            }
            assert_eq!(zeros(&m), k);
            // The pair mask equals the single-slice mask on m with the same seed.
            let mut single = m0.clone();
            prune_in_place(&mut single, mode, &mut Rng::new(1));
            assert_eq!(single, m, "{mode}");
        }
        let (mut m, mut v) = (data(9, 1), data(9, 2));
        assert_eq!(
            prune_pair(&mut m, &mut v, ResetMode::Zero, &mut Rng::new(0)),
            9
        );
        assert_eq!(zeros(&m) + zeros(&v), 18);
    }

    #[test]
    fn pair_with_mismatched_lengths_only_touches_shared_positions() {
        let (mut m, mut v) = (vec![1.0; 4], vec![1.0; 5]);
        assert_eq!(
            prune_pair(&mut m, &mut v, ResetMode::Zero, &mut Rng::new(0)),
            4
        );
        assert_eq!(m, vec![0.0; 4]);
        assert_eq!(v, vec![0.0, 0.0, 0.0, 0.0, 1.0]);
    }

    #[test]
    fn parse_and_display_round_trip() {
        for (text, mode) in [
            ("zero", ResetMode::Zero),
            ("random:0.99", ResetMode::Random(0.99)),
            ("magnitude:0.9", ResetMode::Magnitude(0.9)),
            ("random:0", ResetMode::Random(0.0)),
            ("magnitude:1", ResetMode::Magnitude(1.0)),
        ] {
            assert_eq!(ResetMode::parse(text).unwrap(), mode);
            assert_eq!(text.parse::<ResetMode>().unwrap(), mode);
            assert_eq!(mode.to_string(), text);
        }
        for p in [0.1, 1.0 / 3.0, 0.123456789, 1e-7] {
            let mode = ResetMode::Magnitude(p);
            assert_eq!(mode.to_string().parse::<ResetMode>().unwrap(), mode);
        }
        assert_eq!(
            " Magnitude : 0.5 ".parse::<ResetMode>().unwrap(),
            ResetMode::Magnitude(0.5)
        );
    }

    #[test]
    fn parse_rejects_bad_text() {
        for text in [
            "",
            "zeros",
            "zero:0.5",
            "random",
            "magnitude",
            "random:",
            "random:abc",
            "random:-0.1",
            "magnitude:1.01",
            "magnitude:NaN",
            "random:inf",
            "prune:0.5",
        ] {
            assert!(
                matches!(ResetMode::parse(text), Err(Error::Config(_))),
                "{text:?} should fail"
            );
        }
    }

    #[test]
    fn validate_and_clamping_of_unvalidated_modes() {
        assert!(ResetMode::Random(1.5).validate().is_err());
        assert!(ResetMode::Magnitude(f64::NAN).validate().is_err());
        assert!(ResetMode::Zero.validate().is_ok());
        let mut rng = Rng::new(0);
        let mut v = vec![1.0f32; 10];
        assert_eq!(prune_in_place(&mut v, ResetMode::Random(1.5), &mut rng), 10);
        let mut v = vec![1.0f32; 10];
        assert_eq!(
            prune_in_place(&mut v, ResetMode::Magnitude(-1.0), &mut rng),
            0
        );
        assert_eq!(
            prune_in_place(&mut v, ResetMode::Magnitude(f64::NAN), &mut rng),
            0
        );
    }

    #[test]
    fn serde_roundtrip() {
        for mode in [
            ResetMode::Zero,
            ResetMode::Random(0.99),
            ResetMode::Magnitude(0.9),
        ] {
            let json = serde_json::to_string(&mode).unwrap();
            assert_eq!(serde_json::from_str::<ResetMode>(&json).unwrap(), mode);
        }
    }
}
