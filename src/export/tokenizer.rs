//! The tokenizer files of an exported model: `tokenizer.json` (what `AutoTokenizer` and
//! llama.cpp's converter read), `tokenizer_config.json` and `special_tokens_map.json`.
//!
//! - `bytes`: a Llama-style byte-fallback BPE: vocabulary `<0x00>`..`<0xFF>` (ids 0..=255) except
//!   that the space (32) is the piece `▁` (U+2581), `<s>` (256) and `</s>` (257), no merges, a
//!   normaliser that writes spaces as `▁` and no pre-tokeniser, so every byte of the text becomes
//!   the token of that byte, exactly as the crate's byte tokenizer does; a `▁`-to-space,
//!   `ByteFallback` and `Fuse` decoder turns ids back into the same text. The space is a piece
//!   because llama.cpp tokenizes such a vocabulary the sentencepiece way, always writing spaces as
//!   `▁` first (and, unless `add_prefix_space` is false, adding one in front): with a `<0x20>`
//!   token every space became the three bytes of `▁`. The one text this cannot round-trip is a
//!   literal `▁`, which both tokenizers then read as a space. Models whose `vocab_size` exceeds 258
//!   get `<extra_N>` special tokens so the vocabulary size equals `vocab_size` (llama.cpp requires
//!   it).
//! - `gpt2`: GPT-2's byte-level BPE rebuilt from the `r50k_base` ranks that ship with
//!   `tiktoken-rs`: the vocabulary is each rank's bytes in GPT-2's printable byte alphabet, and
//!   the merges are derived by replaying BPE on each token with only lower ranks available.
//! - a `tokenizer.json` path: copied, with its sibling `tokenizer_config.json` /
//!   `special_tokens_map.json` when present and generated ones otherwise.

use crate::config::ModelConfig;
use crate::data::tokenizer::{
    Tokenizer, TokenizerKind, BYTE_BOS_ID, BYTE_EOS_ID, BYTE_VOCAB_SIZE, GPT2_EOT_ID,
    GPT2_VOCAB_SIZE,
};
use crate::error::{Error, Result};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;

/// The tokenizer files of an export, in memory, with the special ids `config.json` repeats.
#[derive(Clone, Debug)]
pub struct TokenizerFiles {
    /// `(file name, contents)` pairs.
    pub files: Vec<(String, Vec<u8>)>,
    /// Beginning-of-sequence id.
    pub bos: Option<u32>,
    /// End-of-sequence id.
    pub eos: Option<u32>,
}

/// Builds the tokenizer files for the tokenizer `spec` ("bytes", "gpt2" or a tokenizer.json path)
/// of a model of shape `cfg`; errors if the tokenizer needs more ids than the model has.
pub fn tokenizer_files(spec: &str, cfg: &ModelConfig) -> Result<TokenizerFiles> {
    let tok = Tokenizer::from_spec(spec)?;
    if tok.vocab_size() > cfg.vocab_size {
        return Err(Error::Tokenizer(format!(
            "{spec}: the tokenizer has {} ids but the model's vocab_size is {}",
            tok.vocab_size(),
            cfg.vocab_size
        )));
    }
    let max_len = cfg.max_position_embeddings;
    match tok.kind() {
        TokenizerKind::Bytes => Ok(byte_files(cfg.vocab_size, max_len)),
        TokenizerKind::Gpt2 => gpt2_files(max_len),
        TokenizerKind::HuggingFace(path) => copied_files(path, &tok, max_len),
    }
}

fn pretty(v: &Value) -> Vec<u8> {
    let mut s = serde_json::to_vec_pretty(v).unwrap_or_default();
    s.push(b'\n');
    s
}

fn added_token(id: u32, content: &str, normalized: bool) -> Value {
    json!({"id": id, "content": content, "single_word": false, "lstrip": false,
           "rstrip": false, "normalized": normalized, "special": true})
}

/// `tokenizer_config.json` (with the `extra` entries) and `special_tokens_map.json` for special
/// tokens `(id, text)`.
fn config_files(
    bos: &str,
    eos: &str,
    specials: &[(u32, String)],
    class: &str,
    max_len: usize,
    extra: &[(&str, Value)],
) -> Vec<(String, Vec<u8>)> {
    let decoder: serde_json::Map<String, Value> = specials
        .iter()
        .map(|(id, text)| {
            (
                id.to_string(),
                json!({"content": text, "lstrip": false, "normalized": false, "rstrip": false,
                       "single_word": false, "special": true}),
            )
        })
        .collect();
    let mut config = json!({
        "add_bos_token": false,
        "add_eos_token": false,
        "added_tokens_decoder": decoder,
        "bos_token": bos,
        "clean_up_tokenization_spaces": false,
        "eos_token": eos,
        "model_max_length": max_len,
        "tokenizer_class": class,
    });
    for (key, value) in extra {
        config[*key] = value.clone();
    }
    let map = json!({"bos_token": bos, "eos_token": eos});
    vec![
        ("tokenizer_config.json".into(), pretty(&config)),
        ("special_tokens_map.json".into(), pretty(&map)),
    ]
}

/// The piece that stands for the space byte in the byte tokenizer's export (sentencepiece's `▁`).
const SPACE_PIECE: &str = "\u{2581}";

/// The byte tokenizer as a byte-fallback BPE of exactly `vocab_size` tokens.
fn byte_files(vocab_size: usize, max_len: usize) -> TokenizerFiles {
    let mut vocab = serde_json::Map::new();
    for b in 0..256u32 {
        let piece = if b == u32::from(b' ') {
            SPACE_PIECE.to_string()
        } else {
            format!("<0x{b:02X}>")
        };
        vocab.insert(piece, json!(b));
    }
    let mut specials: Vec<(u32, String)> = vec![
        (BYTE_BOS_ID, "<s>".to_string()),
        (BYTE_EOS_ID, "</s>".to_string()),
    ];
    for (i, id) in (BYTE_VOCAB_SIZE..vocab_size).enumerate() {
        specials.push((id as u32, format!("<extra_{i}>")));
    }
    for (id, text) in &specials {
        vocab.insert(text.clone(), json!(id));
    }
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": specials.iter().map(|(id, t)| added_token(*id, t, false)).collect::<Vec<_>>(),
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": SPACE_PIECE},
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": SPACE_PIECE}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"}
        ]},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": true,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": []
        }
    });
    let mut files = vec![("tokenizer.json".to_string(), pretty(&tokenizer))];
    files.extend(config_files(
        "<s>",
        "</s>",
        &specials,
        "PreTrainedTokenizerFast",
        max_len,
        // llama.cpp's converter reads this; without it llama.cpp puts a space in front of every
        // text.
        &[("add_prefix_space", json!(false))],
    ));
    TokenizerFiles {
        files,
        bos: Some(BYTE_BOS_ID),
        eos: Some(BYTE_EOS_ID),
    }
}

/// GPT-2's map from bytes to printable characters: printable Latin-1 bytes stand for
/// themselves, the others are moved to code points 256 and up, in byte order.
pub(crate) fn gpt2_byte_alphabet() -> [char; 256] {
    let mut out = ['\0'; 256];
    let mut next = 256u32;
    for (b, slot) in out.iter_mut().enumerate() {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        let code = if printable {
            b as u32
        } else {
            next += 1;
            next - 1
        };
        *slot = char::from_u32(code).unwrap_or('\u{FFFD}');
    }
    out
}

/// The merges that produce each multi-byte token of a rank table, in rank order: for each
/// token, BPE is replayed on its bytes with only lower-ranked tokens available; it must end in
/// exactly two parts, which are the merge.
fn derive_merges(tokens: &[Vec<u8>], ranks: &HashMap<Vec<u8>, u32>) -> Result<Vec<(u32, u32)>> {
    let mut merges = Vec::new();
    for (rank, bytes) in tokens.iter().enumerate() {
        if bytes.len() < 2 {
            continue;
        }
        let mut parts: Vec<Vec<u8>> = bytes.iter().map(|b| vec![*b]).collect();
        loop {
            let mut best: Option<(u32, usize)> = None;
            for i in 0..parts.len() - 1 {
                let mut joined = parts[i].clone();
                joined.extend_from_slice(&parts[i + 1]);
                if let Some(&r) = ranks.get(&joined) {
                    if (r as usize) < rank && best.is_none_or(|(br, _)| r < br) {
                        best = Some((r, i));
                    }
                }
            }
            let Some((_, i)) = best else { break };
            let right = parts.remove(i + 1);
            parts[i].extend_from_slice(&right);
        }
        if parts.len() != 2 {
            return Err(Error::Tokenizer(format!(
                "gpt2: token {rank} is not a merge of two lower-ranked tokens"
            )));
        }
        merges.push((ranks[&parts[0]], ranks[&parts[1]]));
    }
    Ok(merges)
}

fn gpt2_files(max_len: usize) -> Result<TokenizerFiles> {
    let bpe = tiktoken_rs::r50k_base()
        .map_err(|e| Error::Tokenizer(format!("gpt2: building the r50k_base BPE failed: {e}")))?;
    let n = GPT2_EOT_ID as usize;
    let mut tokens = Vec::with_capacity(n);
    let mut ranks = HashMap::with_capacity(n);
    for r in 0..GPT2_EOT_ID {
        let bytes = bpe
            .decode_bytes(&[r])
            .map_err(|_| Error::Tokenizer(format!("gpt2: rank {r} has no bytes")))?;
        ranks.insert(bytes.clone(), r);
        tokens.push(bytes);
    }
    let alphabet = gpt2_byte_alphabet();
    let spell = |b: &[u8]| -> String { b.iter().map(|&x| alphabet[x as usize]).collect() };
    let mut vocab = serde_json::Map::new();
    for (r, t) in tokens.iter().enumerate() {
        vocab.insert(spell(t), json!(r));
    }
    vocab.insert("<|endoftext|>".into(), json!(GPT2_EOT_ID));
    let merges: Vec<String> = derive_merges(&tokens, &ranks)?
        .into_iter()
        .map(|(a, b)| {
            format!(
                "{} {}",
                spell(&tokens[a as usize]),
                spell(&tokens[b as usize])
            )
        })
        .collect();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                            "use_regex": true});
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [added_token(GPT2_EOT_ID, "<|endoftext|>", true)],
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges
        }
    });
    let mut files = vec![("tokenizer.json".to_string(), pretty(&tokenizer))];
    let eot = "<|endoftext|>";
    files.extend(config_files(
        eot,
        eot,
        &[(GPT2_EOT_ID, eot.to_string())],
        "GPT2Tokenizer",
        max_len,
        &[],
    ));
    debug_assert_eq!(GPT2_VOCAB_SIZE, n + 1);
    Ok(TokenizerFiles {
        files,
        bos: Some(GPT2_EOT_ID),
        eos: Some(GPT2_EOT_ID),
    })
}

fn copied_files(path: &Path, tok: &Tokenizer, max_len: usize) -> Result<TokenizerFiles> {
    let read = |p: &Path| crate::fs::read::read_limited(p, crate::fs::read::JSON_LIMIT);
    let mut files = vec![("tokenizer.json".to_string(), read(path)?)];
    let dir = path.parent().unwrap_or(Path::new("."));
    let siblings = ["tokenizer_config.json", "special_tokens_map.json"];
    let present: Vec<&str> = siblings
        .iter()
        .copied()
        .filter(|s| dir.join(s).is_file())
        .collect();
    if present.len() == siblings.len() {
        for s in siblings {
            files.push((s.to_string(), read(&dir.join(s))?));
        }
    } else {
        let inner = tokenizers::Tokenizer::from_bytes(&files[0].1).map_err(|e| {
            Error::Tokenizer(format!(
                "{}: not a usable tokenizer.json: {e}",
                path.display()
            ))
        })?;
        let text = |id: Option<u32>| id.and_then(|i| inner.id_to_token(i)).unwrap_or_default();
        let specials: Vec<(u32, String)> = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, t)| (id, t.content))
            .collect();
        files.extend(config_files(
            &text(tok.bos_id()),
            &text(tok.eos_id()),
            &specials,
            "PreTrainedTokenizerFast",
            max_len,
            &[],
        ));
    }
    Ok(TokenizerFiles {
        files,
        bos: tok.bos_id(),
        eos: tok.eos_id(),
    })
}

/// Recognises a `tokenizer.json` this crate wrote (or an identical one) as the spec it came
/// from: the byte tokenizer's vocabulary gives `"bytes"`, GPT-2's `"gpt2"`; anything else `None`.
pub fn recognise(path: &Path) -> Option<String> {
    let bytes = crate::fs::read::read_limited(path, crate::fs::read::JSON_LIMIT).ok()?;
    let inner = tokenizers::Tokenizer::from_bytes(&bytes).ok()?;
    let id = |s: &str| inner.token_to_id(s);
    if id("<0x00>") == Some(0)
        && id("<0xFF>") == Some(255)
        && id("<s>") == Some(BYTE_BOS_ID)
        && id("</s>") == Some(BYTE_EOS_ID)
    {
        let enc = inner.encode("Aé\n", false).ok()?;
        if enc.get_ids() == [65, 0xC3, 0xA9, 10] {
            return Some("bytes".into());
        }
    }
    if inner.get_vocab_size(true) == GPT2_VOCAB_SIZE && id("<|endoftext|>") == Some(GPT2_EOT_ID) {
        let enc = inner.encode("Hello world", false).ok()?;
        if enc.get_ids() == [15496, 995] {
            return Some("gpt2".into());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_alphabet_is_a_bijection_onto_printables() {
        let a = gpt2_byte_alphabet();
        let set: std::collections::HashSet<char> = a.iter().copied().collect();
        assert_eq!(set.len(), 256);
        assert_eq!(a[b'A' as usize], 'A');
        assert_eq!(a[b' ' as usize], '\u{120}'); // "Ġ"
        assert_eq!(a[b'\n' as usize], '\u{10A}'); // "Ċ"
        assert!(a.iter().all(|c| !c.is_whitespace() && !c.is_control()));
    }

    #[test]
    fn merges_replay_lower_ranks() {
        let tokens: Vec<Vec<u8>> = vec![
            b"a".to_vec(),
            b"b".to_vec(),
            b"ab".to_vec(),
            b"abb".to_vec(),
            b"bb".to_vec(),
        ];
        let ranks: HashMap<Vec<u8>, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        // "abb" (rank 3) must come from "ab" + "b", because "bb" has a higher rank.
        assert_eq!(
            derive_merges(&tokens, &ranks).unwrap(),
            vec![(0, 1), (2, 1), (1, 1)]
        );
    }
}
