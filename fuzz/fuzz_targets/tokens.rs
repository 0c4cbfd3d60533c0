//! Training data: the input's first three bytes pick the kind of data file (a `.u16` or `.u32`
//! token file, or text for the byte or the GPT-2 tokenizer), the batch size and the sequence
//! length; the rest is the file, loaded with `load_tokens` as the trainer loads `--data`, then
//! batched (with a checkpoint round trip of the batcher's state) and, for text, decoded back.
//!
//! Must hold: no panic, no hang; loaded ids are below the vocabulary size; a token file holds one
//! id per 2 or 4 bytes; text encodes and decodes back to itself; batches have the asked shape and
//! a restored batcher continues identically; every error has a message.

#![no_main]

use libfuzzer_sys::fuzz_target;
use relora::data::{eval_batches, load_tokens, Batcher, DataSource, Tokenizer};
use relora_fuzz::{check_err, scratch_dir};
use std::path::PathBuf;
use std::sync::OnceLock;

fn gpt2() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| Tokenizer::gpt2().expect("gpt2 tables ship with the crate"))
}

fuzz_target!(|data: &[u8]| {
    let [kind, batch, seq_len, content @ ..] = data else {
        return;
    };
    let (file, tok) = match kind % 4 {
        0 => ("data.u16", gpt2().clone()),
        1 => ("data.bin32", Tokenizer::bytes()),
        2 => ("data.txt", Tokenizer::bytes()),
        _ => ("data.txt", gpt2().clone()),
    };
    let path: PathBuf = scratch_dir().join(file);
    std::fs::write(&path, content).expect("write input");
    let source = DataSource::parse(path.to_str().expect("temp paths are UTF-8"));
    assert_eq!(DataSource::parse(&source.spec()), source);

    let Some(ids) = check_err(load_tokens(&source, &tok)) else {
        return;
    };
    assert!(!ids.is_empty());
    assert!(ids.iter().all(|&id| (id as usize) < tok.vocab_size()));
    match &source {
        DataSource::TokenFileU16(_) => assert_eq!(ids.len() * 2, content.len()),
        DataSource::TokenFileU32(_) => assert_eq!(ids.len() * 4, content.len()),
        DataSource::TextFile(_) => {
            let text = std::str::from_utf8(content).expect("loaded text is UTF-8");
            assert_eq!(tok.decode(&ids).expect("ids from encode decode"), text);
        }
        DataSource::Builtin { .. } => unreachable!("a temp path is never a builtin spec"),
    }

    let (batch, seq_len) = (1 + *batch as usize % 8, 1 + *seq_len as usize % 32);
    for b in eval_batches(&ids, batch, seq_len, Some(4)) {
        assert_eq!(b.inputs.len(), b.batch * seq_len);
        assert_eq!(b.targets.len(), b.batch * seq_len);
    }
    let Some(mut batcher) = check_err(Batcher::new(ids.clone(), batch, seq_len, 7)) else {
        assert!(
            ids.len() <= seq_len,
            "enough tokens for a window but no batcher"
        );
        return;
    };
    batcher.next_batch();
    let state = batcher.state();
    let expected = batcher.next_batch();
    assert_eq!(expected.inputs.len(), batch * seq_len);
    assert_eq!(expected.targets.len(), batch * seq_len);
    let mut resumed = Batcher::new(ids, batch, seq_len, 7).expect("same arguments");
    resumed.restore(state).expect("state of the same data");
    assert_eq!(resumed.next_batch(), expected);
});
