//! ReLoRA's own pieces: the adaptable projection, the merge-and-restart cycle, and the base
//! weights kept for the checkpoint.

pub mod base_weights;
pub mod cycle;
pub mod linear;

pub use base_weights::BaseWeights;
pub use linear::{AdaptableLinear, Adapter};
