//! Custom tensor operations with hand-written backward passes, for the places where candle's
//! composed operations would compute work we do not want. Each has a CPU kernel; on other
//! devices the model uses the composed operations, which these are tested against.

pub mod causal_softmax;
mod float;
pub mod frozen_matmul;
pub mod lora_linear;
pub mod rms_norm;
pub mod swiglu;

pub use causal_softmax::causal_softmax;
pub use frozen_matmul::frozen_matmul;
pub use lora_linear::lora_linear;
pub use rms_norm::rms_norm_fused;
pub use swiglu::swiglu;
