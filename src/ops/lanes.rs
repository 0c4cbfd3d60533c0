//! Reductions along a row in sixteen interleaved running values, then the sixteen in order.
//!
//! A loop that folds into one running value (`sum += x`) is one chain of dependent
//! floating-point operations, which the compiler may not reorder: it runs at one element per
//! add latency, unvectorised. Sixteen running values (element `i` into value `i % 16`) give it
//! independent chains it vectorises, and fix the order of every operation, so a result is the
//! same on every CPU and every thread count. Measured: the RMSNorm and the softmax backward
//! spent most of their time in such chains.

use super::float::Float;

/// How many running values.
const L: usize = 16;

/// `f` folded over `xs` in [`L`] interleaved lanes, then the lanes in order.
#[inline(always)]
pub(crate) fn fold<T: Copy>(xs: &[T], init: T, f: impl Fn(T, T) -> T) -> T {
    let mut acc = [init; L];
    let mut chunks = xs.chunks_exact(L);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = f(*a, v);
        }
    }
    for (a, &v) in acc.iter_mut().zip(chunks.remainder()) {
        *a = f(*a, v);
    }
    acc.into_iter().fold(init, f)
}

/// `sum(f(x))` in f64 over `xs`: element `i` of the whole groups of [`L`] goes to running sum
/// `i % L`, the tail after them to one more, then the sums in order and the tail.
#[inline(always)]
pub(crate) fn sum_map<T: Copy>(xs: &[T], f: impl Fn(T) -> f64) -> f64 {
    let mut acc = [0f64; L];
    let mut groups = xs.chunks_exact(L);
    for g in &mut groups {
        for (a, &x) in acc.iter_mut().zip(g) {
            *a += f(x);
        }
    }
    let tail: f64 = groups.remainder().iter().map(|&x| f(x)).sum();
    acc.iter().sum::<f64>() + tail
}

/// `sum_i a_i b_i` over the common length, in [`L`] lanes.
#[inline(always)]
pub(crate) fn dot<T: Float>(a: &[T], b: &[T]) -> T {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [T::ZERO; L];
    let (ac, bc) = (a.chunks_exact(L), b.chunks_exact(L));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for ((s, &x), &y) in acc.iter_mut().zip(x).zip(y) {
            *s += x * y;
        }
    }
    for ((s, &x), &y) in acc.iter_mut().zip(ar).zip(br) {
        *s += x * y;
    }
    acc.into_iter().fold(T::ZERO, |s, v| s + v)
}

/// `sum_i a_i b_i c_i` over the common length, in [`L`] lanes (each term rounded as
/// `(a b) c`).
#[inline(always)]
pub(crate) fn dot3<T: Float>(a: &[T], b: &[T], c: &[T]) -> T {
    let n = a.len().min(b.len()).min(c.len());
    let (a, b, c) = (&a[..n], &b[..n], &c[..n]);
    let mut acc = [T::ZERO; L];
    let (ac, bc, cc) = (a.chunks_exact(L), b.chunks_exact(L), c.chunks_exact(L));
    let (ar, br, cr) = (ac.remainder(), bc.remainder(), cc.remainder());
    for ((x, y), z) in ac.zip(bc).zip(cc) {
        for (((s, &x), &y), &z) in acc.iter_mut().zip(x).zip(y).zip(z) {
            *s += x * y * z;
        }
    }
    for (((s, &x), &y), &z) in acc.iter_mut().zip(ar).zip(br).zip(cr) {
        *s += x * y * z;
    }
    acc.into_iter().fold(T::ZERO, |s, v| s + v)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against an f64 sum, for lengths around the lane count, and in the documented order.
    #[test]
    fn sums_equal_f64_and_follow_the_lane_order() {
        for n in [0, 1, 15, 16, 17, 33, 500] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let c: Vec<f32> = (0..n).map(|i| 1.0 + i as f32 * 1e-3).collect();
            let want2: f64 = (0..n).map(|i| f64::from(a[i]) * f64::from(b[i])).sum();
            let want3: f64 = (0..n)
                .map(|i| f64::from(a[i]) * f64::from(b[i]) * f64::from(c[i]))
                .sum();
            assert!((f64::from(dot(&a, &b)) - want2).abs() < 1e-4, "{n}");
            assert!((f64::from(dot3(&a, &b, &c)) - want3).abs() < 1e-4, "{n}");
            let mut lanes = [0f32; L];
            for i in 0..n {
                lanes[i % L] += a[i] * b[i];
            }
            let ordered = lanes.iter().fold(0f32, |s, &v| s + v);
            assert_eq!(dot(&a, &b).to_bits(), ordered.to_bits(), "{n}");
            let folded = fold(&a, f32::NEG_INFINITY, f32::max);
            assert_eq!(folded, a.iter().copied().fold(f32::NEG_INFINITY, f32::max));
        }
    }
}
