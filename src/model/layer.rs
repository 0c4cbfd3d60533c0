//! One decoder block: pre-norm attention and a pre-norm SwiGLU MLP. The model runs it on candle's
//! graph ([`super::llama`]) or as one node with a hand-chained backward ([`super::layer_node`]).

use super::attention::Attention;
use super::mlp::Mlp;
use candle_core::Var;

/// One decoder block.
pub struct Layer {
    /// RMSNorm weight before attention `[hidden]`.
    pub input_layernorm: Var,
    /// The attention projections.
    pub self_attn: Attention,
    /// RMSNorm weight before the MLP `[hidden]`.
    pub post_attention_layernorm: Var,
    /// The MLP projections.
    pub mlp: Mlp,
}
