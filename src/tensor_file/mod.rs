//! Tensor files: safetensors read and written a tensor (or a window of one) at a time, the
//! element types they hold and the conversions between them. Checkpoints, the base weights of the
//! adapter phase, exports and imports are all built on these.

pub mod dtype;
pub mod safetensors;
pub mod windows;
