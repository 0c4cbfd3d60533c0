//! The LLaMA model: shapes named `[batch, seq, hidden]` throughout, Hugging Face tensor names.

pub mod attention;
pub mod init;
pub mod layer_node;
pub mod llama;
pub mod loss;
pub mod mlp;
pub mod norm;
pub mod rope;

pub use layer_node::ParamGrads;
pub use llama::{Layer, Llama};
