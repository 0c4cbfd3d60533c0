//! `e^x` over a slice of f32, in a form the compiler turns into vector code, for the fused CPU
//! kernels that spend their time in it (SwiGLU's sigmoid, the causal softmax).
//!
//! The C library's `expf` is one call per element: in the 60m profile it was 2.5 % of a step,
//! and it kept the loops around it scalar. Here the range reduction and polynomial are plain
//! branch-free arithmetic on each element, compiled three times (AVX-512, AVX2, and the
//! target's baseline) and picked at run time ([`widest`]), so every x86-64 CPU runs its widest vectors and
//! other targets run the same arithmetic. There are no fused multiply-adds, so all three give
//! the same bits on every CPU.
//!
//! Accuracy: within 2 ulp of the exact `e^x` over the normal range (tested against f64 on a
//! dense sweep). Results below `f32::MIN_POSITIVE` are flushed to zero instead of becoming
//! subnormal; above `ln(f32::MAX)` they are infinite, and NaN stays NaN.

use super::widest::{widest, WideKernel};

/// Largest input whose exponential is finite in f32.
const HI: f32 = 88.722_83;
/// Smallest input whose exponential is a normal f32.
const LO: f32 = -87.336_55;
const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split so that `n * LN2_HI` is exact for the `n` that occur.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;

/// `e^x` for one element, branch-free so that loops over it vectorise: every step is lane-wise
/// arithmetic or a select, with no conversion that needs a per-lane check.
#[inline(always)]
fn exp_lane(x: f32) -> f32 {
    // max/min return the other operand for NaN, so c is always in [LO, HI] (NaN is restored
    // at the end); `clamp` would keep the NaN, which the exponent conversion below must not see.
    #[allow(clippy::manual_clamp)]
    let c = x.max(LO).min(HI);
    // n = round(x / ln 2); r = x - n ln 2 in [-ln2/2, ln2/2].
    let n = (c * LOG2E + 0.5).floor();
    let r = (c - n * LN2_HI) - n * LN2_LO;
    // e^r - 1 - r ≈ r² P(r), minimax on that interval (relative error below 2^-24).
    let p = 1.987_569_2e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 0.166_666_65;
    let p = p * r + 0.5;
    let er = (p * (r * r) + r) + 1.0;
    // SAFETY: n is an integer in [-126, 128] (c is clamped above), so it fits an i32.
    let ni: i32 = unsafe { n.to_int_unchecked() };
    // 2^n as two normal powers of two (2^128 itself is not an f32): each half is within
    // [-63, 64], and scaling by them is exact while the result is normal.
    let h = ni >> 1;
    let pow2 = |e: i32| f32::from_bits(((e + 127) as u32) << 23);
    let y = er * pow2(h) * pow2(ni - h);
    let y = if x > HI { f32::INFINITY } else { y };
    let y = if x < LO { 0.0 } else { y };
    if x.is_nan() {
        x
    } else {
        y
    }
}

#[inline(always)]
fn exp_in_place_body(xs: &mut [f32]) {
    for x in xs {
        *x = exp_lane(*x);
    }
}

/// [`exp_in_place_body`] as a kernel for [`widest`].
struct ExpInPlace<'a>(&'a mut [f32]);

impl WideKernel for ExpInPlace<'_> {
    type Output = ();
    #[inline(always)]
    fn run(self) {
        exp_in_place_body(self.0)
    }
}

/// Replaces each element `x` of `xs` by `e^x` (see the module documentation for accuracy), in
/// the widest vectors the CPU has.
pub(crate) fn exp_in_place(xs: &mut [f32]) {
    widest(ExpInPlace(xs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(got: f32, want: f64) -> f64 {
        let w = want as f32;
        if got == w {
            return 0.0;
        }
        // One ulp at the exact value's magnitude.
        let ulp = f64::from(f32::from_bits(w.to_bits() + 1)) - f64::from(w);
        ((f64::from(got) - want) / ulp).abs()
    }

    #[test]
    fn within_two_ulp_of_f64_over_the_normal_range() {
        let n = 2_000_001;
        let mut xs: Vec<f32> = (0..n)
            .map(|i| LO + (HI - LO) * i as f32 / (n - 1) as f32)
            .collect();
        // Small arguments, where e^x - 1 - x matters most.
        xs.extend((0..20_001).map(|i| (i as f32 - 10_000.0) * 1e-5));
        let want: Vec<f64> = xs.iter().map(|&x| f64::from(x).exp()).collect();
        let mut got = xs.clone();
        exp_in_place(&mut got);
        let mut worst = (0.0, 0.0f32);
        for ((&g, &w), &x) in got.iter().zip(&want).zip(&xs) {
            let u = ulps(g, w);
            if u > worst.0 {
                worst = (u, x);
            }
        }
        assert!(worst.0 <= 2.0, "{} ulp at x = {}", worst.0, worst.1);
    }

    #[test]
    fn edges_overflow_flush_and_nan() {
        let mut xs = vec![
            0.0,
            -0.0,
            1.0,
            HI,
            HI + 0.01,
            1e30,
            f32::INFINITY,
            LO,
            LO - 0.01,
            -1e30,
            f32::NEG_INFINITY,
            f32::NAN,
        ];
        exp_in_place(&mut xs);
        assert_eq!(xs[0], 1.0);
        assert_eq!(xs[1], 1.0);
        assert!((xs[2] - std::f32::consts::E).abs() <= f32::EPSILON * 3.0);
        assert!(xs[3].is_finite() && xs[3] > 3.4e38, "{}", xs[3]);
        assert_eq!(&xs[4..7], &[f32::INFINITY; 3]);
        assert!(xs[7] > 0.0 && xs[7] < 1.2e-38, "{}", xs[7]);
        assert_eq!(&xs[8..11], &[0.0; 3]);
        assert!(xs[11].is_nan());
    }

    #[test]
    fn every_instruction_set_gives_the_same_bits() {
        struct Exp(Vec<f32>);
        impl WideKernel for Exp {
            type Output = Vec<f32>;
            #[inline(always)]
            fn run(mut self) -> Vec<f32> {
                exp_in_place_body(&mut self.0);
                self.0
            }
        }
        let xs: Vec<f32> = (0..100_003)
            .map(|i| (i as f32 * 0.618_034).sin() * 90.0)
            .collect();
        let bits = |v: Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let mut base = xs.clone();
        exp_in_place_body(&mut base);
        let mut picked = xs.clone();
        exp_in_place(&mut picked);
        assert_eq!(bits(picked), bits(base.clone()));
        for (path, got) in super::super::widest::every_path(|| Exp(xs.clone())) {
            assert_eq!(bits(got), bits(base.clone()), "{path}");
        }
    }
}
