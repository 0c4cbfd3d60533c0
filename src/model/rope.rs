//! Rotary position embeddings in Hugging Face's half-rotation layout: the first and second halves
//! of each head are the two coordinates of each rotated pair.

use candle_core::{DType, Device, Tensor, D};

/// Precomputed `cos` and `sin` tables `[max_positions, head_dim]`.
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// Tables for positions `0..max_positions`, computed in f64 and stored in `dtype`.
    pub fn new(
        head_dim: usize,
        max_positions: usize,
        theta: f64,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(max_positions * head_dim);
        let mut sin = Vec::with_capacity(max_positions * head_dim);
        for pos in 0..max_positions {
            // Both halves use the same frequencies: emb = cat(freqs, freqs).
            for j in 0..head_dim {
                let i = j % half;
                let inv_freq = 1.0 / theta.powf((2 * i) as f64 / head_dim as f64);
                let angle = pos as f64 * inv_freq;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let shape = (max_positions, head_dim);
        Ok(Rope {
            cos: Tensor::from_vec(cos, shape, device)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?,
        })
    }

    /// The `(cos, sin)` tables, `[max_positions, head_dim]` each.
    pub fn tables(&self) -> (&Tensor, &Tensor) {
        (&self.cos, &self.sin)
    }

    /// Rotates `x [b, heads, t, d]` by its positions `0..t`: the fused op where it has a kernel,
    /// the composed ops elsewhere.
    pub fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if crate::ops::has_kernel(x) && x.dtype() == self.cos.dtype() {
            x.dims4()?;
            return crate::ops::rotary(x, &self.cos, &self.sin);
        }
        self.apply_composed(x)
    }

    /// [`Self::apply`] from candle's differentiable ops, for any device and dtype.
    pub(crate) fn apply_composed(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (_, _, t, d) = x.dims4()?;
        let cos = self.cos.narrow(0, 0, t)?;
        let sin = self.sin.narrow(0, 0, t)?;
        let x1 = x.narrow(D::Minus1, 0, d / 2)?;
        let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
    }
}
