//! ReLoRA's own building blocks, below the model that is made of them: the adaptable projection
//! `W x + s B (A x)`, the merge math and its phases, and the base weights kept for the
//! checkpoint. The cycle over a whole model (attach, merge, restart) is
//! [`crate::model::adapters`], driven by the trainer.

pub mod base_weights;
pub mod linear;
pub mod merge;

pub use base_weights::BaseWeights;
pub use linear::{AdaptableLinear, Adapter};
pub use merge::{merge_delta, merge_phases, Phase, PhaseAdapter};
