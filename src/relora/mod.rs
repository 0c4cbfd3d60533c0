//! ReLoRA's own pieces: the adaptable projection, the merge math and its phases, the
//! merge-and-restart cycle, and the base weights kept for the checkpoint.

pub mod base_weights;
pub mod cycle;
pub mod linear;
pub mod merge;

pub use base_weights::BaseWeights;
pub use linear::{AdaptableLinear, Adapter};
pub use merge::{merge_delta, merge_phases, Phase, PhaseAdapter};
