//! The optimizer and the optimizer-state surgery that ReLoRA needs.

pub mod adamw;
pub mod clip;
pub mod reset;

pub use adamw::{AdamW, AdamWConfig, ParamState, ResetReport};
pub use reset::ResetMode;
