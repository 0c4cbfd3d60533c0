//! Looking into checkpoints and models: what a checkpoint, model directory or safetensors file
//! holds ([`inspect`]), and the singular values of each projection's update ([`spectrum`]), with
//! the small dense linear algebra it needs.

pub mod inspect;
mod linalg;
pub mod spectrum;
