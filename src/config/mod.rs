//! Model and training configuration: a model's shape ([`model`]) and every training option
//! ([`train`]), each validated with messages that name the offending field.

pub mod model;
pub mod train;

pub use model::{ModelConfig, MAX_PARAMETERS, MAX_ROPE_TABLE_ELEMENTS, PRESETS};
pub use train::{Mode, TrainConfig, ALL_TARGETS};
