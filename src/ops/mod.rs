//! Custom tensor operations with hand-written backward passes, for the places where candle's
//! composed operations would compute work we do not want. Each has a CPU kernel (f32, f64) and,
//! in builds with the `cuda` feature, a CUDA kernel (f32; `kernels.cu`, compiled with NVRTC at
//! run time).
//! The attention node ([`attention`]) has no kernel of its own: it runs these kernels and the
//! matmuls outside the graph and differentiates them by hand.
//! Where no kernel applies the model uses the composed operations, which these are tested
//! against.

pub mod adamw_group;
pub mod adamw_update;
pub(crate) mod add_in_place;
pub mod attention;
pub mod causal_softmax;
pub mod cross_entropy;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
pub(crate) mod dense_product;
mod effective_weight;
mod float;
// Launched only by the CUDA kernels; compiled everywhere so its unit tests run on the CPU.
pub mod frozen_matmul;
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
mod grouped;
mod head_matmul;
mod lanes;
pub(crate) mod linear_backward;
pub mod lora_linear;
mod low_rank_sum;
pub mod mixed_linear;
pub(crate) mod precomputed;
pub mod rms_norm;
pub mod rotary;
pub mod sum_squares;
pub mod swiglu;
mod vector_exp;
pub mod widening_matmul;
mod widest;

pub use adamw_group::grouped_updates;
pub use attention::{causal_attention, fused_attention_applies, Heads};
pub use causal_softmax::causal_softmax;
pub use cross_entropy::cross_entropy_rows;
pub use effective_weight::effective_weights;
pub use frozen_matmul::frozen_matmul;
pub use lora_linear::lora_linear;
pub use mixed_linear::mixed_linear;
pub use rms_norm::rms_norm_fused;
pub use rotary::rotary;
pub use sum_squares::sum_squares;
pub use swiglu::swiglu;
pub use widening_matmul::{widening_matmul, widening_matmul_add};

use candle_core::{DType, Tensor};

/// How a gemm call on the CPU spreads over `threads` threads of the current pool.
pub(crate) fn gemm_parallelism(threads: usize) -> gemm::Parallelism {
    if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    }
}

/// Whether the calling trainer uses the fused ops ([`crate::engine::Engine::fused_kernels`]):
/// off, the model uses candle's composed operations everywhere.
pub fn fused_kernels() -> bool {
    crate::engine::current().fused_kernels
}

/// Whether a fused op has a kernel for tensors like `t` (its device and dtype) and the fused ops
/// are on: f32 or f64 on the CPU, f32 on CUDA.
pub fn has_kernel(t: &Tensor) -> bool {
    if !fused_kernels() {
        return false;
    }
    match t.device() {
        candle_core::Device::Cpu => matches!(t.dtype(), DType::F32 | DType::F64),
        candle_core::Device::Cuda(_) => cfg!(feature = "cuda") && t.dtype() == DType::F32,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Zero-width rows (and no rows) give empty results and gradients, not a panic.
    #[test]
    fn empty_inputs_give_empty_results() {
        let var = |s: &[usize]| Var::zeros(s, DType::F32, &Device::Cpu).unwrap();
        let z = |s: &[usize]| Tensor::zeros(s, DType::F32, &Device::Cpu).unwrap();
        let backward = |y: &Tensor| y.sum_all().unwrap().backward().unwrap();
        let x = var(&[1, 1, 0, 0]);
        let y = causal_softmax(&x, 1.0).unwrap();
        assert_eq!(y.dims(), &[1, 1, 0, 0]);
        backward(&y);
        for (n, h) in [(2, 0), (0, 4)] {
            let x = var(&[n, h]);
            let y = rms_norm_fused(&x, &z(&[h]), 1e-5).unwrap();
            assert_eq!(y.dims(), &[n, h]);
            backward(&y);
        }
        let x = var(&[0, 3]);
        backward(&swiglu(&x, &z(&[0, 3])).unwrap());
        let logits = var(&[0, 5]);
        let targets = Tensor::zeros(0, DType::U32, &Device::Cpu).unwrap();
        let loss = cross_entropy_rows(&logits, &targets).unwrap();
        assert_eq!(loss.dims(), &[0]);
        backward(&loss);
        let no_vocab = Tensor::zeros(2, DType::U32, &Device::Cpu).unwrap();
        assert!(cross_entropy_rows(&var(&[2, 0]), &no_vocab).is_err());
        for (t, d) in [(1, 0), (0, 4)] {
            let x = var(&[1, 1, t, d]);
            let y = rotary(&x, &z(&[4, d]), &z(&[4, d])).unwrap();
            assert_eq!(y.dims(), &[1, 1, t, d]);
            backward(&y);
        }
        let no_positions = Heads {
            batch: 2,
            seq: 0,
            heads: 2,
            kv_heads: 1,
            head_dim: 4,
        };
        let (q, kv) = (var(&[0, 8]), var(&[0, 4]));
        let y =
            causal_attention(&q, &kv, &kv, &z(&[4, 4]), &z(&[4, 4]), no_positions, None).unwrap();
        assert_eq!(y.dims(), &[0, 8]);
        backward(&y);
    }
}
