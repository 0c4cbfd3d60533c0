//! Training data: tokenizers, the built-in generated corpus, loading data sets into token ids,
//! and turning token ids into seeded, resumable batches.
//!
//! The usual path is [`DataSource::parse`] -> [`load_tokens`] (with a [`Tokenizer`] from
//! [`Tokenizer::from_spec`]) -> [`Batcher::new`] -> [`Batcher::next_batch`], with
//! [`Batcher::state`] / [`Batcher::restore`] around checkpoints and [`eval_batches`] for
//! held-out loss.

pub mod batcher;
pub mod corpus;
mod lexicon;
mod prose;
pub mod tokenizer;
pub mod tokens;

pub use batcher::{eval_batches, Batch, Batcher, BatcherState};
pub use corpus::{
    builtin_corpus, builtin_eval_text, builtin_train_text, unigram_entropy_nats, BUILTIN_EVAL_SEED,
    BUILTIN_TRAIN_SEED,
};
pub use tokenizer::{Tokenizer, TokenizerKind};
pub use tokens::{check_token_range, load_tokens, DataSource};
