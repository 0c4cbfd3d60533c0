//! ReLoRA's own pieces: the adaptable projection and the merge-and-restart cycle.

pub mod cycle;
pub mod linear;

pub use linear::{AdaptableLinear, Adapter};
