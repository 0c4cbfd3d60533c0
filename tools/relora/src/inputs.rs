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

/// Runs `f` on a worker of a fresh rayon pool (of `RAYON_NUM_THREADS` threads, as
/// [`set_threads`] leaves it, else one per core) and waits for it. The calling thread sleeps
/// meanwhile; run from it, the step's serial parts competed for the cores with the pool's
/// spinning workers (one thread too many: measured 4-12 % fewer tokens/s on 2 cores).
pub fn on_compute_pool<T: Send>(f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let pool = rayon::ThreadPoolBuilder::new()
        .build()
        .context("starting the compute threads")?;
    pool.install(f)
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
