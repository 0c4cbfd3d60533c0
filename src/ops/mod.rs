//! Custom tensor operations with hand-written backward passes, for the places where candle's
//! composed operations would compute work we do not want.

pub mod frozen_matmul;
pub mod lora_linear;

pub use frozen_matmul::frozen_matmul;
pub use lora_linear::lora_linear;
