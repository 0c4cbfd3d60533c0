//! Turning a data set (the built-in corpus, a text file, or a pre-tokenised binary file) into one
//! flat sequence of token ids, with every failure reported against the file it came from.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::data::corpus::{builtin_eval_text, builtin_train_text};
use crate::data::tokenizer::Tokenizer;
use crate::error::{Error, Result};

/// Spec string of the built-in training corpus.
pub(crate) const BUILTIN_TRAIN_SPEC: &str = "builtin";
/// Spec string of the built-in evaluation corpus.
pub(crate) const BUILTIN_EVAL_SPEC: &str = "builtin-eval";

/// Text is tokenised in pieces of about this many bytes so that the tokenizer's intermediate
/// structures (which can be many times the text size) stay bounded on large files.
const TEXT_CHUNK_BYTES: usize = 1 << 20;

/// Where a data set comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataSource {
    /// The generated corpus of [`crate::data::corpus`]; `eval` selects the evaluation split.
    Builtin {
        /// True for the evaluation text, false for the training text.
        eval: bool,
    },
    /// A UTF-8 text file, tokenised on load.
    TextFile(PathBuf),
    /// Little-endian `u16` token ids, as written by common GPT-2 preprocessing scripts.
    TokenFileU16(PathBuf),
    /// Little-endian `u32` token ids, for vocabularies beyond 65536.
    TokenFileU32(PathBuf),
}

impl DataSource {
    /// Interprets a user-supplied data spec: `"builtin"` / `"builtin-eval"` select the built-in
    /// corpus; a path ending in `.u16` or `.bin16` (any case) holds little-endian `u16` ids;
    /// `.u32` or `.bin32` little-endian `u32` ids; any other path is UTF-8 text. Every string
    /// names some source, so this cannot fail; whether the file exists and is usable is checked
    /// by [`load_tokens`], which lets a spec be recorded before its data is present.
    pub fn parse(spec: &str) -> DataSource {
        let spec = spec.trim();
        match spec {
            BUILTIN_TRAIN_SPEC => DataSource::Builtin { eval: false },
            BUILTIN_EVAL_SPEC => DataSource::Builtin { eval: true },
            path => {
                let path = PathBuf::from(path);
                let ext = path
                    .extension()
                    .and_then(|e| e.to_str())
                    .map(str::to_ascii_lowercase);
                match ext.as_deref() {
                    Some("u16" | "bin16") => DataSource::TokenFileU16(path),
                    Some("u32" | "bin32") => DataSource::TokenFileU32(path),
                    _ => DataSource::TextFile(path),
                }
            }
        }
    }

    /// The spec string that [`DataSource::parse`] maps back to this source.
    pub fn spec(&self) -> String {
        match self {
            DataSource::Builtin { eval: false } => BUILTIN_TRAIN_SPEC.to_string(),
            DataSource::Builtin { eval: true } => BUILTIN_EVAL_SPEC.to_string(),
            DataSource::TextFile(p) | DataSource::TokenFileU16(p) | DataSource::TokenFileU32(p) => {
                p.to_string_lossy().into_owned()
            }
        }
    }
}

impl fmt::Display for DataSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.spec())
    }
}

/// Loads `source` as token ids. Text (built-in or from a file) is encoded with `tok`; binary
/// token files are read as-is and then checked against `tok.vocab_size()`, because the model's
/// embedding is sized from the tokenizer and an id beyond it could not be looked up.
///
/// Errors: a missing or unreadable file (with its path), invalid UTF-8 in a text file (with the
/// byte offset), a token file whose size is not a whole number of ids, an id out of range, or a
/// data set with no tokens at all.
pub fn load_tokens(source: &DataSource, tok: &Tokenizer) -> Result<Vec<u32>> {
    let tokens = match source {
        DataSource::Builtin { eval } => {
            let text = if *eval {
                builtin_eval_text()
            } else {
                builtin_train_text()
            };
            encode_in_chunks(&text, tok)?
        }
        DataSource::TextFile(path) => {
            let bytes = read_file(path)?;
            let text = String::from_utf8(bytes).map_err(|e| {
                let err = e.utf8_error();
                Error::Data(format!(
                    "{}: not valid UTF-8 at byte offset {}",
                    path.display(),
                    err.valid_up_to()
                ))
            })?;
            encode_in_chunks(&text, tok)?
        }
        DataSource::TokenFileU16(path) => {
            let bytes = read_file(path)?;
            let ids = decode_le(&bytes, path, 2, |c| u16::from_le_bytes([c[0], c[1]]) as u32)?;
            check_token_range(&ids, tok.vocab_size(), &path.display().to_string())?;
            ids
        }
        DataSource::TokenFileU32(path) => {
            let bytes = read_file(path)?;
            let ids = decode_le(&bytes, path, 4, |c| {
                u32::from_le_bytes([c[0], c[1], c[2], c[3]])
            })?;
            check_token_range(&ids, tok.vocab_size(), &path.display().to_string())?;
            ids
        }
    };
    if tokens.is_empty() {
        return Err(Error::Data(format!(
            "{source}: data set contains no tokens"
        )));
    }
    Ok(tokens)
}

/// Checks that every id is below `vocab_size`; the error names `origin`, the first offending
/// position and id, and how many ids are out of range in total.
pub fn check_token_range(tokens: &[u32], vocab_size: usize, origin: &str) -> Result<()> {
    let out_of_range = |id: &u32| *id as usize >= vocab_size;
    let Some(first) = tokens.iter().position(out_of_range) else {
        return Ok(());
    };
    let count = tokens[first..].iter().filter(|id| out_of_range(id)).count();
    let max = tokens[first..]
        .iter()
        .copied()
        .max()
        .unwrap_or(tokens[first]);
    Err(Error::Data(format!(
        "{origin}: token id {} at position {first} is out of range for vocabulary size \
         {vocab_size} ({count} ids out of range, largest {max})",
        tokens[first]
    )))
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    // An empty spec parses to an empty path, whose OS error would name no file at all.
    if path.as_os_str().is_empty() {
        return Err(Error::Data(
            "no data given: expected \"builtin\", \"builtin-eval\" or a file path".into(),
        ));
    }
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

fn decode_le(
    bytes: &[u8],
    path: &Path,
    width: usize,
    from_le: impl Fn(&[u8]) -> u32,
) -> Result<Vec<u32>> {
    if !bytes.len().is_multiple_of(width) {
        return Err(Error::Data(format!(
            "{}: {} bytes is not a multiple of {width} (the size of one u{} token id); the file \
             looks truncated",
            path.display(),
            bytes.len(),
            width * 8
        )));
    }
    Ok(bytes.chunks_exact(width).map(from_le).collect())
}

/// Encodes `text` piece by piece, cutting only after a paragraph break (or, failing that, a line
/// break or a space) so no word is split. With BPE tokenizers the ids at a cut can differ slightly
/// from encoding the whole text at once (the blank line may become one token instead of two);
/// that is harmless for training and keeps memory proportional to the chunk, not the file.
fn encode_in_chunks(text: &str, tok: &Tokenizer) -> Result<Vec<u32>> {
    let mut ids = Vec::with_capacity(text.len() / 3);
    let mut start = 0;
    while start < text.len() {
        let end = chunk_end(text, start, TEXT_CHUNK_BYTES);
        ids.extend(tok.encode(&text[start..end])?);
        start = end;
    }
    Ok(ids)
}

/// End (exclusive) of the chunk that starts at `start`: just after the last separator within
/// `target` bytes, preferring paragraph breaks over line breaks over spaces, or at a character
/// boundary if the window has no separator at all. Always advances past `start`.
fn chunk_end(text: &str, start: usize, target: usize) -> usize {
    if text.len() - start <= target {
        return text.len();
    }
    let mut limit = start + target;
    while !text.is_char_boundary(limit) {
        limit -= 1;
    }
    let window = &text[start..limit];
    for separator in ["\n\n", "\n", " "] {
        if let Some(pos) = window.rfind(separator) {
            let end = start + pos + separator.len();
            if end > start {
                return end;
            }
        }
    }
    if limit > start {
        return limit;
    }
    // `target` is smaller than the first character: take that whole character.
    start + text[start..].chars().next().map_or(1, char::len_utf8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn parse_recognises_builtin_and_extensions() {
        assert_eq!(
            DataSource::parse("builtin"),
            DataSource::Builtin { eval: false }
        );
        assert_eq!(
            DataSource::parse("builtin-eval"),
            DataSource::Builtin { eval: true }
        );
        assert_eq!(
            DataSource::parse("a/b.u16"),
            DataSource::TokenFileU16("a/b.u16".into())
        );
        assert_eq!(
            DataSource::parse("x.BIN16"),
            DataSource::TokenFileU16("x.BIN16".into())
        );
        assert_eq!(
            DataSource::parse("x.bin32"),
            DataSource::TokenFileU32("x.bin32".into())
        );
        assert_eq!(
            DataSource::parse("x.u32"),
            DataSource::TokenFileU32("x.u32".into())
        );
        assert_eq!(
            DataSource::parse("notes.txt"),
            DataSource::TextFile("notes.txt".into())
        );
        let err = load_tokens(&DataSource::parse("  "), &Tokenizer::bytes())
            .unwrap_err()
            .to_string();
        assert!(err.contains("no data given"), "{err}");
        for spec in ["builtin", "builtin-eval", "d/t.u16", "d/t.txt"] {
            assert_eq!(DataSource::parse(spec).spec(), spec);
            assert_eq!(DataSource::parse(spec).to_string(), spec);
        }
    }

    #[test]
    fn u16_and_u32_token_files_load_little_endian() {
        let dir = tempfile::tempdir().unwrap();
        let tok = Tokenizer::gpt2().unwrap();
        let ids = [0u32, 1, 255, 256, 50256, 12345];
        let b16: Vec<u8> = ids.iter().flat_map(|&i| (i as u16).to_le_bytes()).collect();
        let b32: Vec<u8> = ids.iter().flat_map(|&i| i.to_le_bytes()).collect();
        let p16 = write(dir.path(), "t.u16", &b16);
        let p32 = write(dir.path(), "t.bin32", &b32);
        let src16 = DataSource::parse(p16.to_str().unwrap());
        let src32 = DataSource::parse(p32.to_str().unwrap());
        assert_eq!(load_tokens(&src16, &tok).unwrap(), ids);
        assert_eq!(load_tokens(&src32, &tok).unwrap(), ids);
    }

    #[test]
    fn truncated_token_files_are_rejected_with_size() {
        let dir = tempfile::tempdir().unwrap();
        let tok = Tokenizer::bytes();
        let p16 = write(dir.path(), "bad.u16", &[1, 0, 2]);
        let err = load_tokens(&DataSource::TokenFileU16(p16), &tok)
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad.u16") && err.contains("3 bytes"), "{err}");
        let p32 = write(dir.path(), "bad.u32", &[1, 0, 0, 0, 2, 0]);
        let err = load_tokens(&DataSource::TokenFileU32(p32), &tok)
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad.u32") && err.contains("6 bytes"), "{err}");
    }

    #[test]
    fn token_file_ids_beyond_the_vocabulary_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let bytes: Vec<u8> = [65u16, 66, 300, 67]
            .iter()
            .flat_map(|i| i.to_le_bytes())
            .collect();
        let path = write(dir.path(), "wide.u16", &bytes);
        let err = load_tokens(&DataSource::TokenFileU16(path), &Tokenizer::bytes())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("wide.u16") && err.contains("position 2"),
            "{err}"
        );
    }

    #[test]
    fn token_range_error_names_origin_position_and_id() {
        assert!(check_token_range(&[0, 5, 9], 10, "x").is_ok());
        assert!(check_token_range(&[], 10, "x").is_ok());
        let err = check_token_range(&[1, 2, 3, 10, 4, 12], 10, "train.u16")
            .unwrap_err()
            .to_string();
        assert!(err.contains("train.u16"), "{err}");
        assert!(err.contains("token id 10 at position 3"), "{err}");
        assert!(
            err.contains("2 ids out of range") && err.contains("largest 12"),
            "{err}"
        );
    }

    #[test]
    fn missing_empty_and_non_utf8_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let tok = Tokenizer::bytes();
        let missing = dir.path().join("nope.txt");
        let err = load_tokens(&DataSource::TextFile(missing), &tok)
            .unwrap_err()
            .to_string();
        assert!(err.contains("nope.txt"), "{err}");

        let empty = write(dir.path(), "empty.txt", b"");
        let err = load_tokens(&DataSource::TextFile(empty), &tok)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("empty.txt") && err.contains("no tokens"),
            "{err}"
        );
        let empty16 = write(dir.path(), "empty.u16", b"");
        assert!(load_tokens(&DataSource::TokenFileU16(empty16), &tok).is_err());

        let latin1 = write(dir.path(), "latin1.txt", b"caf\xe9 ok");
        let err = load_tokens(&DataSource::TextFile(latin1), &tok)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("latin1.txt") && err.contains("offset 3"),
            "{err}"
        );
    }

    #[test]
    fn text_files_and_builtin_corpus_encode_to_the_same_ids_as_direct_encoding() {
        let dir = tempfile::tempdir().unwrap();
        let tok = Tokenizer::bytes();
        let text = "First paragraph.\n\nSecond one, with caf\u{e9}.\n";
        let path = write(dir.path(), "doc.txt", text.as_bytes());
        let ids = load_tokens(&DataSource::TextFile(path), &tok).unwrap();
        assert_eq!(ids, tok.encode(text).unwrap());

        let train = load_tokens(&DataSource::Builtin { eval: false }, &tok).unwrap();
        assert_eq!(train, tok.encode(&builtin_train_text()).unwrap());
        let eval = load_tokens(&DataSource::Builtin { eval: true }, &tok).unwrap();
        assert!(eval.len() < train.len() / 5);
    }

    #[test]
    fn chunking_cuts_only_at_separators_and_covers_the_text() {
        let text = "aa bb\n\ncc dd ee\nff \u{e9}\u{e9}\u{e9}\u{e9}gg";
        for target in 1..text.len() + 2 {
            let mut start = 0;
            let mut pieces = Vec::new();
            while start < text.len() {
                let end = chunk_end(text, start, target);
                assert!(end > start && text.is_char_boundary(end));
                pieces.push(&text[start..end]);
                start = end;
            }
            assert_eq!(pieces.concat(), text);
        }
        // With room for the paragraph break, the cut is right after it.
        assert_eq!(chunk_end(text, 0, 10), "aa bb\n\n".len());
    }
}
