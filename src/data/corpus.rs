//! The built-in corpus: English-like prose produced by a small seeded grammar, so training and
//! tests run with no download and no third-party text.
//!
//! The grammar is deliberately richer than a word list: subjects and verbs agree in number
//! ("the cat sleeps" / "the cats sleep"), tense is consistent within a paragraph, articles follow
//! the next word ("a lamp" / "an old lamp"), and sentences carry commas, quotes, questions and
//! exclamations. A small model can therefore drive its loss well below the byte-level unigram
//! entropy only by learning spelling, agreement and punctuation, which is what the tests use it
//! to show. The output is pure ASCII.

use super::prose::ProseGenerator;

/// Seed of the built-in training text.
pub const BUILTIN_TRAIN_SEED: u64 = 0x7265_6c6f_7261_0001;
/// Seed of the built-in evaluation text: same grammar, different sentences.
pub const BUILTIN_EVAL_SEED: u64 = 0x7265_6c6f_7261_0002;
/// Target size in bytes of [`builtin_train_text`].
pub(crate) const BUILTIN_TRAIN_BYTES: usize = 400_000;
/// Target size in bytes of [`builtin_eval_text`].
pub(crate) const BUILTIN_EVAL_BYTES: usize = 40_000;

/// The built-in training text (about [`BUILTIN_TRAIN_BYTES`] bytes).
pub fn builtin_train_text() -> String {
    builtin_corpus(BUILTIN_TRAIN_SEED, BUILTIN_TRAIN_BYTES)
}

/// The built-in evaluation text (about [`BUILTIN_EVAL_BYTES`] bytes), disjoint in seed from the
/// training text so evaluation measures generalisation of the grammar, not memorisation.
pub fn builtin_eval_text() -> String {
    builtin_corpus(BUILTIN_EVAL_SEED, BUILTIN_EVAL_BYTES)
}

/// Generates at most `bytes` bytes of prose from `seed`; the same seed always gives the same
/// text. The text ends at a sentence boundary and falls short of `bytes` by less than one
/// sentence; only when `bytes` is smaller than the first sentence is that sentence cut.
/// Paragraphs are separated by a blank line.
pub fn builtin_corpus(seed: u64, bytes: usize) -> String {
    let mut generator = ProseGenerator::new(seed);
    // Capped: a huge `bytes` should grow the string as text arrives, not reserve it all up front.
    let mut text = String::with_capacity(bytes.min(1 << 24));
    // Where the text could be cut cleanly: after each sentence's final punctuation.
    let mut last_clean_end = 0usize;
    while text.len() < bytes {
        if !text.is_empty() {
            text.push_str("\n\n");
        }
        let sentences = generator.paragraph();
        for (i, sentence) in sentences.iter().enumerate() {
            if i > 0 {
                text.push(' ');
            }
            text.push_str(sentence);
            if text.len() <= bytes {
                last_clean_end = text.len();
            } else {
                break;
            }
        }
    }
    let cut = if last_clean_end > 0 {
        last_clean_end
    } else {
        bytes
    };
    text.truncate(cut.min(text.len()));
    text
}

/// Empirical entropy, in nats, of the byte distribution of `bytes` (0 for empty input). A model
/// that predicts every byte from its frequency alone reaches exactly this cross-entropy, so a
/// loss clearly below it proves the model learned context.
pub fn unigram_entropy_nats(bytes: &[u8]) -> f64 {
    if bytes.is_empty() {
        return 0.0;
    }
    let mut counts = [0u64; 256];
    for &b in bytes {
        counts[b as usize] += 1;
    }
    let n = bytes.len() as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.ln()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn words(text: &str) -> impl Iterator<Item = String> + '_ {
        text.split(|c: char| !c.is_ascii_alphabetic())
            .filter(|w| !w.is_empty())
            .map(|w| w.to_ascii_lowercase())
    }

    #[test]
    fn same_seed_gives_same_text_and_different_seeds_differ() {
        let a = builtin_corpus(11, 20_000);
        let b = builtin_corpus(11, 20_000);
        let c = builtin_corpus(12, 20_000);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(builtin_train_text()[..2000], builtin_eval_text()[..2000]);
    }

    #[test]
    fn sizes_are_close_to_the_request_and_end_at_a_sentence() {
        for &n in &[1usize, 50, 1_000, 77_777] {
            let text = builtin_corpus(5, n);
            assert!(text.len() <= n, "{} > {n}", text.len());
            assert!(!text.is_empty());
        }
        let text = builtin_corpus(5, 77_777);
        assert!(text.len() > 77_777 - 400, "{}", text.len());
        assert!(
            text.ends_with(['.', '?', '!']),
            "{:?}",
            &text[text.len() - 20..]
        );
        let train = builtin_train_text();
        assert!(train.len() > BUILTIN_TRAIN_BYTES - 400 && train.len() <= BUILTIN_TRAIN_BYTES);
        let eval = builtin_eval_text();
        assert!(eval.len() > BUILTIN_EVAL_BYTES - 400 && eval.len() <= BUILTIN_EVAL_BYTES);
        assert!(train.is_ascii() && eval.is_ascii());
        assert!(train.contains("\n\n"));
    }

    #[test]
    fn vocabulary_has_at_least_150_distinct_words() {
        let distinct: HashSet<String> = words(&builtin_train_text()).collect();
        assert!(
            distinct.len() >= 150,
            "only {} distinct words",
            distinct.len()
        );
        // The eval text is much shorter but must still exercise most of the grammar.
        let eval: HashSet<String> = words(&builtin_eval_text()).collect();
        assert!(eval.len() >= 150, "only {} distinct eval words", eval.len());
    }

    #[test]
    fn subjects_and_verbs_agree_and_sentences_are_capitalised() {
        let text = builtin_train_text();
        for bad in [
            "they sees",
            "we sees",
            "he sleep ",
            "she walk ",
            "cats sleeps",
            "children runs",
            "he do not",
            "they does",
            "he were",
            "they was",
            "dogs is ",
            "cat are ",
        ] {
            assert!(!text.contains(bad), "found {bad:?}");
        }
        let all: Vec<String> = words(&text).collect();
        for pair in all.windows(2) {
            let vowel = pair[1].starts_with(['a', 'e', 'i', 'o', 'u']);
            assert!(pair[0] != "a" || !vowel, "found \"a {}\"", pair[1]);
            assert!(pair[0] != "an" || vowel, "found \"an {}\"", pair[1]);
        }
        for sentence in text.split(['.', '?', '!']) {
            // A closing quote right after the terminator continues the same sentence.
            if sentence.starts_with('"') {
                continue;
            }
            let start = sentence.trim_start_matches([' ', '\n', '"']);
            if let Some(c) = start.chars().next() {
                assert!(
                    c.is_ascii_uppercase(),
                    "sentence starts lowercase: {start:?}"
                );
            }
        }
        // Both tenses and all punctuation kinds occur.
        assert!(
            !text.contains(",\" asked"),
            "a quoted statement was \"asked\""
        );
        assert!(!text.contains("?\" said"), "a quoted question was \"said\"");
        for needle in ["was", "is", "?", "!", ",", "\""] {
            assert!(text.contains(needle), "missing {needle:?}");
        }
    }

    #[test]
    fn unigram_entropy_is_zero_for_constant_input_and_plausible_for_prose() {
        assert_eq!(unigram_entropy_nats(b""), 0.0);
        assert_eq!(unigram_entropy_nats(b"aaaa"), 0.0);
        assert!((unigram_entropy_nats(b"ab") - std::f64::consts::LN_2).abs() < 1e-12);
        let h = unigram_entropy_nats(builtin_train_text().as_bytes());
        // English letter frequencies give roughly 2.8-3.0 nats per byte; a much lower value
        // would mean the grammar is too repetitive to be a meaningful benchmark.
        assert!((2.5..3.3).contains(&h), "entropy {h}");
    }
}
