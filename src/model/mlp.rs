//! The SwiGLU feed-forward block: `down(silu(gate(x)) * up(x))`.

use crate::error::{Result, TensorContext};
use crate::ops::swiglu;
use crate::relora::linear::reborrow;
use crate::relora::AdaptableLinear;
use crate::rng::Rng;
use candle_core::{DType, Tensor};

/// The three MLP projections of one layer.
pub struct Mlp {
    /// `[intermediate, hidden]`
    pub gate_proj: AdaptableLinear,
    /// `[intermediate, hidden]`
    pub up_proj: AdaptableLinear,
    /// `[hidden, intermediate]`
    pub down_proj: AdaptableLinear,
    /// Matmul dtype for mixed precision (`None`: the parameter dtype).
    pub compute: Option<DType>,
}

impl Mlp {
    /// `x [n, hidden] -> [n, hidden]`.
    pub fn forward(&self, x: &Tensor, mut dropout: Option<(&mut Rng, f64)>) -> Result<Tensor> {
        let gate = self
            .gate_proj
            .forward(x, reborrow(&mut dropout), self.compute)?;
        let up = self
            .up_proj
            .forward(x, reborrow(&mut dropout), self.compute)?;
        let act = if crate::ops::has_kernel(&gate) && gate.dtype() == up.dtype() {
            swiglu(&gate, &up).ctx("mlp swiglu")?
        } else {
            (gate.silu().ctx("mlp silu")? * up).ctx("mlp gate*up")?
        };
        self.down_proj
            .forward(&act, reborrow(&mut dropout), self.compute)
    }
}
