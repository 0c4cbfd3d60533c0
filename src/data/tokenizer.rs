//! Text <-> token id conversion behind one type, so the trainer, the sampler and the checkpoint
//! code never care which tokenizer a run uses.
//!
//! Three tokenizers are supported:
//! - `bytes`: every byte is its own token (ids 0..=255), plus [`BYTE_BOS_ID`] = 256 and
//!   [`BYTE_EOS_ID`] = 257, for a vocabulary of [`BYTE_VOCAB_SIZE`] = 258. Needs nothing on disk
//!   and keeps the embedding tiny, which is what CPU-sized experiments want.
//! - `gpt2`: the GPT-2 byte-level BPE (`r50k_base`, [`GPT2_VOCAB_SIZE`] = 50257 ids) with
//!   `<|endoftext|>` = [`GPT2_EOT_ID`] serving as both BOS and EOS. The ranks ship inside
//!   `tiktoken-rs`, so this works offline too.
//! - a `tokenizer.json` in the Hugging Face format, for models trained with their own vocabulary.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use tiktoken_rs::CoreBPE;

use crate::error::{Error, Result};

/// Id of the beginning-of-sequence marker in the byte tokenizer (one past the last byte value).
pub(crate) const BYTE_BOS_ID: u32 = 256;
/// Id of the end-of-sequence marker in the byte tokenizer.
pub(crate) const BYTE_EOS_ID: u32 = 257;
/// Vocabulary size of the byte tokenizer: 256 byte values plus BOS and EOS.
pub(crate) const BYTE_VOCAB_SIZE: usize = 258;
/// Vocabulary size of the GPT-2 tokenizer (50000 merges + 256 bytes + `<|endoftext|>`).
pub(crate) const GPT2_VOCAB_SIZE: usize = 50257;
/// Id of `<|endoftext|>` in the GPT-2 tokenizer; GPT-2 uses it as both BOS and EOS.
pub(crate) const GPT2_EOT_ID: u32 = 50256;

/// The spec string that selects the byte tokenizer.
pub(crate) const BYTES_SPEC: &str = "bytes";
/// The spec string that selects the GPT-2 tokenizer.
pub(crate) const GPT2_SPEC: &str = "gpt2";

/// Special-token spellings tried, in order, when looking for BOS / EOS in a Hugging Face
/// tokenizer, because `tokenizer.json` has no field that names them.
const HF_BOS_CANDIDATES: &[&str] = &[
    "<s>",
    "<|begin_of_text|>",
    "<bos>",
    "<|startoftext|>",
    "<|endoftext|>",
];
const HF_EOS_CANDIDATES: &[&str] = &[
    "</s>",
    "<|end_of_text|>",
    "<eos>",
    "<|endoftext|>",
    "<|im_end|>",
];

/// Which tokenizer a [`Tokenizer`] is; cheap to clone and compare, unlike the tokenizer itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenizerKind {
    /// One token per byte plus BOS (256) and EOS (257).
    Bytes,
    /// GPT-2 byte-level BPE (`r50k_base`).
    Gpt2,
    /// A Hugging Face `tokenizer.json` at this path.
    HuggingFace(PathBuf),
}

/// A loaded tokenizer. Cloning is cheap: the vocabularies are shared.
#[derive(Clone)]
pub struct Tokenizer {
    kind: TokenizerKind,
    backend: Backend,
}

#[derive(Clone)]
enum Backend {
    Bytes,
    Gpt2(&'static CoreBPE),
    HuggingFace(Arc<HfTokenizer>),
}

struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    vocab_size: usize,
    bos: Option<u32>,
    eos: Option<u32>,
}

impl Tokenizer {
    /// The byte tokenizer; it cannot fail because it needs no data.
    pub fn bytes() -> Tokenizer {
        Tokenizer {
            kind: TokenizerKind::Bytes,
            backend: Backend::Bytes,
        }
    }

    /// The GPT-2 (`r50k_base`) tokenizer. The first call builds the BPE tables (a fraction of a
    /// second); later calls share them.
    pub fn gpt2() -> Result<Tokenizer> {
        Ok(Tokenizer {
            kind: TokenizerKind::Gpt2,
            backend: Backend::Gpt2(shared_r50k()?),
        })
    }

    /// Loads a Hugging Face `tokenizer.json`.
    pub fn from_hf_file(path: impl AsRef<Path>) -> Result<Tokenizer> {
        let path = path.as_ref();
        // Read here, bounded and only from a regular file, rather than by the tokenizers crate.
        let bytes = crate::fs::read::read_limited(path, crate::fs::read::JSON_LIMIT)?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| {
            Error::Tokenizer(format!(
                "{}: not a usable tokenizer.json: {e}",
                path.display()
            ))
        })?;
        // Ids can be sparse or added tokens can sit past the base vocabulary, so the embedding
        // must cover the largest id, not just the count.
        let max_id = inner.get_vocab(true).values().copied().max();
        let vocab_size = inner
            .get_vocab_size(true)
            .max(max_id.map_or(0, |m| m as usize + 1));
        if vocab_size == 0 {
            return Err(Error::Tokenizer(format!(
                "{}: tokenizer has an empty vocabulary",
                path.display()
            )));
        }
        let find = |names: &[&str]| names.iter().find_map(|n| inner.token_to_id(n));
        let bos = find(HF_BOS_CANDIDATES);
        let eos = find(HF_EOS_CANDIDATES);
        Ok(Tokenizer {
            kind: TokenizerKind::HuggingFace(path.to_path_buf()),
            backend: Backend::HuggingFace(Arc::new(HfTokenizer {
                inner,
                vocab_size,
                bos,
                eos,
            })),
        })
    }

    /// Builds a tokenizer from the string stored by [`Tokenizer::spec`] or given by a user:
    /// `"bytes"`, `"gpt2"`, or the path of a `tokenizer.json`. A file literally named `bytes` or
    /// `gpt2` must be written with a directory, e.g. `./gpt2`.
    pub fn from_spec(spec: &str) -> Result<Tokenizer> {
        let trimmed = spec.trim();
        match trimmed {
            BYTES_SPEC => Ok(Tokenizer::bytes()),
            GPT2_SPEC => Tokenizer::gpt2(),
            "" => Err(Error::Tokenizer(
                "empty tokenizer spec; expected \"bytes\", \"gpt2\" or the path of a tokenizer.json"
                    .into(),
            )),
            path => {
                let p = Path::new(path);
                if !p.exists() {
                    return Err(Error::Tokenizer(format!(
                        "unknown tokenizer \"{path}\": expected \"bytes\", \"gpt2\" or the path \
                         of an existing tokenizer.json (no file at {})",
                        p.display()
                    )));
                }
                Tokenizer::from_hf_file(p)
            }
        }
    }

    /// Which tokenizer this is.
    pub fn kind(&self) -> &TokenizerKind {
        &self.kind
    }

    /// The string that recreates this tokenizer through [`Tokenizer::from_spec`]; this is what a
    /// checkpoint stores.
    pub fn spec(&self) -> String {
        match &self.kind {
            TokenizerKind::Bytes => BYTES_SPEC.to_string(),
            TokenizerKind::Gpt2 => GPT2_SPEC.to_string(),
            TokenizerKind::HuggingFace(p) => p.to_string_lossy().into_owned(),
        }
    }

    /// Number of token ids the model's embedding must cover (every id is below this).
    pub fn vocab_size(&self) -> usize {
        match &self.backend {
            Backend::Bytes => BYTE_VOCAB_SIZE,
            Backend::Gpt2(_) => GPT2_VOCAB_SIZE,
            Backend::HuggingFace(hf) => hf.vocab_size,
        }
    }

    /// The beginning-of-sequence id, if the tokenizer has one.
    pub fn bos_id(&self) -> Option<u32> {
        match &self.backend {
            Backend::Bytes => Some(BYTE_BOS_ID),
            Backend::Gpt2(_) => Some(GPT2_EOT_ID),
            Backend::HuggingFace(hf) => hf.bos,
        }
    }

    /// The end-of-sequence id, if the tokenizer has one.
    pub fn eos_id(&self) -> Option<u32> {
        match &self.backend {
            Backend::Bytes => Some(BYTE_EOS_ID),
            Backend::Gpt2(_) => Some(GPT2_EOT_ID),
            Backend::HuggingFace(hf) => hf.eos,
        }
    }

    /// Encodes `text` without adding any special tokens; special-token spellings inside `text`
    /// (e.g. `<|endoftext|>`) are treated as ordinary text so data cannot inject control ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match &self.backend {
            Backend::Bytes => Ok(text.bytes().map(u32::from).collect()),
            Backend::Gpt2(bpe) => Ok(bpe.encode_ordinary(text)),
            Backend::HuggingFace(hf) => hf
                .inner
                .encode(text, false)
                .map(|enc| enc.get_ids().to_vec())
                .map_err(|e| {
                    Error::Tokenizer(format!(
                        "{}: encoding {} bytes of text failed: {e}",
                        self.spec(),
                        text.len()
                    ))
                }),
        }
    }

    /// Decodes ids to text, dropping special tokens. Byte sequences that are not valid UTF-8
    /// (a sample cut mid-character) become U+FFFD rather than an error. An id outside the
    /// vocabulary is an error naming its position.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.check_ids(ids)?;
        match &self.backend {
            Backend::Bytes => {
                let bytes: Vec<u8> = ids.iter().filter_map(|&id| u8::try_from(id).ok()).collect();
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
            Backend::Gpt2(bpe) => {
                let ordinary: Vec<u32> = ids
                    .iter()
                    .copied()
                    .filter(|&id| id != GPT2_EOT_ID)
                    .collect();
                let bytes = bpe.decode_bytes(&ordinary).map_err(|e| {
                    Error::Tokenizer(format!("gpt2: cannot decode token id {}", e.token))
                })?;
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
            Backend::HuggingFace(hf) => hf.inner.decode(ids, true).map_err(|e| {
                Error::Tokenizer(format!(
                    "{}: decoding {} ids failed: {e}",
                    self.spec(),
                    ids.len()
                ))
            }),
        }
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        let vocab = self.vocab_size();
        match ids.iter().position(|&id| id as usize >= vocab) {
            None => Ok(()),
            Some(pos) => Err(Error::Tokenizer(format!(
                "{}: token id {} at position {pos} is outside the vocabulary of {vocab} ids",
                self.spec(),
                ids[pos]
            ))),
        }
    }
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("spec", &self.spec())
            .field("vocab_size", &self.vocab_size())
            .finish()
    }
}

/// One GPT-2 BPE per process: building it parses ~50k ranks, and `CoreBPE` is `Sync`.
fn shared_r50k() -> Result<&'static CoreBPE> {
    static R50K: OnceLock<CoreBPE> = OnceLock::new();
    if let Some(bpe) = R50K.get() {
        return Ok(bpe);
    }
    let built = tiktoken_rs::r50k_base()
        .map_err(|e| Error::Tokenizer(format!("gpt2: building the r50k_base BPE failed: {e}")))?;
    // A racing thread may have won; either copy is identical, so keep whichever landed first.
    Ok(R50K.get_or_init(|| built))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn tokenizer_is_send_and_sync() {
        assert_send_sync::<Tokenizer>();
    }

    #[test]
    fn bytes_round_trip_including_multibyte_text() {
        let tok = Tokenizer::bytes();
        let text = "Grüße, naïve café ✓\n\ttabs";
        let ids = tok.encode(text).unwrap();
        assert_eq!(ids.len(), text.len());
        assert!(ids.iter().all(|&i| i < 256));
        assert_eq!(ids[0], b'G' as u32);
        assert_eq!(tok.decode(&ids).unwrap(), text);
        assert_eq!(tok.vocab_size(), 258);
        assert_eq!(tok.bos_id(), Some(256));
        assert_eq!(tok.eos_id(), Some(257));
    }

    #[test]
    fn bytes_decode_skips_specials_and_rejects_out_of_range_ids() {
        let tok = Tokenizer::bytes();
        let mut ids = vec![BYTE_BOS_ID];
        ids.extend(tok.encode("hi").unwrap());
        ids.push(BYTE_EOS_ID);
        assert_eq!(tok.decode(&ids).unwrap(), "hi");
        let err = tok.decode(&[104, 105, 258]).unwrap_err().to_string();
        assert!(err.contains("258") && err.contains("position 2"), "{err}");
    }

    #[test]
    fn gpt2_encodes_hello_world_to_known_ids() {
        let tok = Tokenizer::gpt2().unwrap();
        assert_eq!(tok.encode("Hello world").unwrap(), vec![15496, 995]);
        assert_eq!(tok.vocab_size(), 50257);
        assert_eq!(tok.eos_id(), Some(50256));
        assert_eq!(tok.bos_id(), Some(50256));
        let text = "The quick brown fox, 42 times!\n\nNew paragraph.";
        let ids = tok.encode(text).unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), text);
    }

    #[test]
    fn gpt2_treats_special_spelling_in_text_as_ordinary() {
        let tok = Tokenizer::gpt2().unwrap();
        let ids = tok.encode("a<|endoftext|>b").unwrap();
        assert!(!ids.contains(&GPT2_EOT_ID), "{ids:?}");
        let mut with_eot = tok.encode("end").unwrap();
        with_eot.push(GPT2_EOT_ID);
        assert_eq!(tok.decode(&with_eot).unwrap(), "end");
        assert!(tok.decode(&[50257]).is_err());
    }

    const TINY_WORDLEVEL_JSON: &str = r#"{
      "version": "1.0",
      "truncation": null,
      "padding": null,
      "added_tokens": [
        {"id": 0, "content": "[UNK]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
        {"id": 1, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
        {"id": 2, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
      ],
      "normalizer": null,
      "pre_tokenizer": {"type": "Whitespace"},
      "post_processor": null,
      "decoder": null,
      "model": {
        "type": "WordLevel",
        "vocab": {"[UNK]": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4, "the": 5, "cat": 6},
        "unk_token": "[UNK]"
      }
    }"#;

    #[test]
    fn hugging_face_tokenizer_loads_from_json_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, TINY_WORDLEVEL_JSON).unwrap();
        let tok = Tokenizer::from_spec(path.to_str().unwrap()).unwrap();
        assert_eq!(tok.kind(), &TokenizerKind::HuggingFace(path.clone()));
        assert_eq!(tok.vocab_size(), 7);
        assert_eq!(tok.bos_id(), Some(1));
        assert_eq!(tok.eos_id(), Some(2));
        let ids = tok.encode("hello the cat dog").unwrap();
        assert_eq!(ids, vec![3, 5, 6, 0]);
        assert_eq!(tok.decode(&[1, 3, 4, 2]).unwrap(), "hello world");
        let err = tok.decode(&[3, 9]).unwrap_err().to_string();
        assert!(
            err.contains("token id 9") && err.contains("position 1"),
            "{err}"
        );
        let again = Tokenizer::from_spec(&tok.spec()).unwrap();
        assert_eq!(again.encode("world").unwrap(), vec![4]);
    }

    #[test]
    fn spec_round_trips_and_bad_specs_are_errors() {
        for spec in ["bytes", "gpt2", " gpt2\n"] {
            let tok = Tokenizer::from_spec(spec).unwrap();
            assert_eq!(tok.spec(), spec.trim());
            assert_eq!(
                Tokenizer::from_spec(&tok.spec()).unwrap().kind(),
                tok.kind()
            );
        }
        let err = Tokenizer::from_spec("/no/such/dir/tokenizer.json")
            .unwrap_err()
            .to_string();
        assert!(err.contains("/no/such/dir/tokenizer.json"), "{err}");
        assert!(Tokenizer::from_spec("").is_err());

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broken.json");
        std::fs::write(&path, "{ not json").unwrap();
        let err = Tokenizer::from_spec(path.to_str().unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("broken.json"), "{err}");
    }
}
