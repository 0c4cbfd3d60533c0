//! Running an element-wise kernel in the widest vectors the CPU has.
//!
//! The library is built for the baseline x86-64 instruction set, so a loop the compiler
//! vectorises uses 128-bit SSE registers: four f32 lanes. Memory-bound passes that also divide
//! and take square roots (AdamW) or widen to f64 (the gradient norm) were bound by those narrow
//! instructions. [`widest`] runs a kernel inlined into a function compiled for AVX-512F or AVX2,
//! whichever the CPU reports at run time (checked once, then cached by the standard library).
//!
//! Every path gives the same bits: each operation (sum, product, division, square root,
//! conversion) is correctly rounded at every vector width, Rust never contracts a multiply and
//! an add into a fused multiply-add, and the kernels fix their order of operations themselves
//! (for example in interleaved running sums, [`super::lanes`]).

/// A kernel [`widest`] can run: `run` must be `#[inline(always)]`, and so must what it calls,
/// so that the whole loop is compiled inside the wide function. (A closure would not do: the
/// compiler keeps a closure's body as a function of its own, compiled for the baseline.)
pub(crate) trait WideKernel {
    /// What the kernel returns.
    type Output;
    /// Runs the kernel.
    fn run(self) -> Self::Output;
}

/// Runs `kernel` compiled for the widest vector instructions this CPU has.
#[inline(always)]
pub(crate) fn widest<K: WideKernel>(kernel: K) -> K::Output {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F, the only feature the function was compiled for.
            return unsafe { avx512(kernel) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, the only feature the function was compiled for.
            return unsafe { avx2(kernel) };
        }
    }
    kernel.run()
}

/// Whether [`widest_fma`] runs kernels on this CPU: it has AVX-512F, or AVX2 with FMA.
pub(crate) fn fma_vectors() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            || (std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Runs `kernel` compiled for AVX-512F or AVX2 with FMA, for kernels built on fused
/// multiply-adds (`f32::mul_add`), which elsewhere would be a slow library call; `None` on a CPU
/// with neither ([`fma_vectors`]).
#[inline(always)]
pub(crate) fn widest_fma<K: WideKernel>(kernel: K) -> Option<K::Output> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (which implies FMA), the features the function was
            // compiled for.
            return Some(unsafe { avx512(kernel) });
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has AVX2 and FMA, the features the function was compiled for.
            return Some(unsafe { avx2_fma(kernel) });
        }
    }
    let _ = kernel;
    None
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2_fma<K: WideKernel>(kernel: K) -> K::Output {
    kernel.run()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn avx512<K: WideKernel>(kernel: K) -> K::Output {
    kernel.run()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn avx2<K: WideKernel>(kernel: K) -> K::Output {
    kernel.run()
}

/// `kernel()` run on every path this CPU has, each output with the path's name: the baseline,
/// then AVX2, AVX2 with FMA and AVX-512F where the CPU has them. For tests that compare paths.
#[cfg(test)]
pub(crate) fn every_path<K: WideKernel>(kernel: impl Fn() -> K) -> Vec<(&'static str, K::Output)> {
    let mut out = vec![("baseline", kernel().run())];
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx2") {
            // SAFETY: the CPU has AVX2.
            out.push(("AVX2", unsafe { avx2(kernel()) }));
        }
        if has!("avx2") && has!("fma") {
            // SAFETY: the CPU has AVX2 and FMA.
            out.push(("AVX2 with FMA", unsafe { avx2_fma(kernel()) }));
        }
        if has!("avx512f") {
            // SAFETY: the CPU has AVX-512F (which implies FMA).
            out.push(("AVX-512F", unsafe { avx512(kernel()) }));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Kernel<'a>(&'a [f32]);

    impl WideKernel for Kernel<'_> {
        type Output = (Vec<f32>, f64);
        #[inline(always)]
        fn run(self) -> Self::Output {
            let ys: Vec<f32> = self
                .0
                .iter()
                .map(|&x| x / (x.sqrt() * 1.3 + 1e-8))
                .collect();
            let s = super::super::lanes::sum_map(&ys, |y| f64::from(y) * f64::from(y));
            (ys, s)
        }
    }

    /// Each path this CPU can run (AVX-512F, AVX2, the baseline) gives the same bits on a
    /// division, square root and f64 sum that a vectoriser widens.
    #[test]
    fn every_path_gives_the_baseline_bits() {
        let xs: Vec<f32> = (0..1000)
            .map(|i| (i as f32 * 0.37).sin() * 3.0 + 3.5)
            .collect();
        let bits = |(v, s): (Vec<f32>, f64)| {
            (
                v.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                s.to_bits(),
            )
        };
        let base = bits(Kernel(&xs).run());
        assert_eq!(bits(widest(Kernel(&xs))), base);
        for (path, got) in every_path(|| Kernel(&xs)) {
            assert_eq!(bits(got), base, "{path}");
        }
    }
}
