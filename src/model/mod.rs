//! The LLaMA model: shapes named `[batch, seq, hidden]` throughout, Hugging Face tensor names.

pub mod attention;
pub mod init;
pub mod llama;
pub mod loss;
pub mod mlp;
pub mod norm;
pub mod rope;

pub use llama::{Layer, Llama};
