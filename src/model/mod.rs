//! The LLaMA model: shapes named `[batch, seq, hidden]` throughout, Hugging Face tensor names.
//! Its projections are ReLoRA's adaptable linear layers ([`crate::relora`]); [`adapters`]
//! attaches, merges and restarts their adapters across the whole model.

pub mod adapters;
pub mod attention;
pub mod layer;
pub mod layer_node;
pub mod llama;
pub mod loss;
pub mod mlp;
pub mod norm;
pub mod rope;

pub use layer::Layer;
pub use layer_node::ParamGrads;
pub use llama::Llama;
