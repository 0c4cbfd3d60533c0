//! Turning command-line choices into tokenizers, token streams and thread settings.

use anyhow::{Context, Result};
use relora::data::tokenizer::Tokenizer;
use relora::data::tokens::{load_tokens, DataSource};

/// Sets the number of CPU threads for matrix kernels and element-wise ops. Must run before any
/// tensor work, since the thread pools read it once.
pub fn set_threads(threads: Option<usize>) {
    if let Some(n) = threads {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

/// Loads a tokenizer from "bytes", "gpt2" or a tokenizer.json path.
pub fn tokenizer(spec: &str) -> Result<Tokenizer> {
    Tokenizer::from_spec(spec).with_context(|| format!("loading tokenizer '{spec}'"))
}

/// Loads tokens from "builtin", "builtin-eval", a text file or a token file.
pub fn tokens(spec: &str, tok: &Tokenizer) -> Result<Vec<u32>> {
    let source = DataSource::parse(spec);
    load_tokens(&source, tok).with_context(|| format!("loading data '{spec}'"))
}
