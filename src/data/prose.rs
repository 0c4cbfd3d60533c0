//! The grammar behind the built-in corpus: a seeded generator of English-like paragraphs that
//! keeps subject-verb agreement, a tense per paragraph, a/an before vowels, and a main character
//! whom later sentences refer back to with pronouns.

use super::lexicon::*;
use crate::rng::Rng;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Number {
    Singular,
    Plural,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Tense {
    Present,
    Past,
}

/// A noun phrase as a subject: its words plus what the verb must agree with.
struct Subject {
    text: String,
    number: Number,
}

/// The person a paragraph is about, so later sentences can refer back with a pronoun.
#[derive(Clone, Copy)]
struct Character {
    name: &'static str,
    female: bool,
}

impl Character {
    fn subject_pronoun(self) -> &'static str {
        if self.female {
            "she"
        } else {
            "he"
        }
    }
    fn object_pronoun(self) -> &'static str {
        if self.female {
            "her"
        } else {
            "him"
        }
    }
}

pub(super) struct ProseGenerator {
    rng: Rng,
    tense: Tense,
    topic: Option<Character>,
}

impl ProseGenerator {
    pub(super) fn new(seed: u64) -> Self {
        ProseGenerator {
            rng: Rng::derived(seed, "builtin-corpus"),
            tense: Tense::Past,
            topic: None,
        }
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.rng.below(items.len() as u64) as usize]
    }

    fn chance(&mut self, p: f64) -> bool {
        self.rng.next_f64() < p
    }

    fn number(&mut self) -> Number {
        if self.chance(0.5) {
            Number::Singular
        } else {
            Number::Plural
        }
    }

    /// Picks a template index by weight.
    fn weighted(&mut self, weights: &[u32]) -> usize {
        let total: u32 = weights.iter().sum();
        let mut r = self.rng.below(total as u64) as u32;
        for (i, &w) in weights.iter().enumerate() {
            if r < w {
                return i;
            }
            r -= w;
        }
        weights.len() - 1
    }

    /// One paragraph: a tense and a main character held for 3..=7 sentences.
    pub(super) fn paragraph(&mut self) -> Vec<String> {
        self.tense = if self.chance(0.6) {
            Tense::Past
        } else {
            Tense::Present
        };
        let topic = self.character();
        self.topic = Some(topic);
        let count = 3 + self.rng.below(5) as usize;
        let mut sentences = Vec::with_capacity(count);
        // Opening with the character by name lets the pronouns that follow refer to someone.
        sentences.push(self.introduction(topic));
        for _ in 1..count {
            sentences.push(self.sentence());
        }
        sentences
    }

    fn character(&mut self) -> Character {
        if self.chance(0.5) {
            Character {
                name: self.pick(FEMALE_NAMES),
                female: true,
            }
        } else {
            Character {
                name: self.pick(MALE_NAMES),
                female: false,
            }
        }
    }

    fn introduction(&mut self, topic: Character) -> String {
        let subject = Subject {
            text: topic.name.to_string(),
            number: Number::Singular,
        };
        let clause = if self.chance(0.5) {
            self.transitive_clause(subject)
        } else {
            self.intransitive_clause(subject)
        };
        finish(&clause, '.')
    }

    fn sentence(&mut self) -> String {
        match self.weighted(&[6, 5, 3, 2, 2, 3, 2, 2, 2, 1, 1]) {
            0 => {
                let s = self.agent_subject();
                finish(&self.transitive_clause(s), '.')
            }
            1 => {
                let s = self.agent_subject();
                finish(&self.intransitive_clause(s), '.')
            }
            2 => {
                let s = self.any_subject();
                finish(&self.copula_clause(s), '.')
            }
            3 => finish(&self.there_clause(), '.'),
            4 => self.question(),
            5 => {
                let first = self.simple_clause();
                let conj = self.pick(CLAUSE_CONJUNCTIONS);
                let second = self.simple_clause();
                // "because"/"while"/"when" subordinate clauses read naturally without a comma.
                let sep = if matches!(conj, "and" | "but" | "so") {
                    ","
                } else {
                    ""
                };
                finish(&format!("{first}{sep} {conj} {second}"), '.')
            }
            6 => {
                let time = self.pick(TIME_PHRASES);
                let clause = self.simple_clause();
                finish(&format!("{time}, {clause}"), '.')
            }
            7 => self.quotation(),
            8 => finish(&self.relative_clause_sentence(), '.'),
            9 => self.exclamation(),
            _ => finish(&self.list_clause(), '.'),
        }
    }

    fn simple_clause(&mut self) -> String {
        match self.rng.below(3) {
            0 => {
                let s = self.agent_subject();
                self.transitive_clause(s)
            }
            1 => {
                let s = self.agent_subject();
                self.intransitive_clause(s)
            }
            _ => {
                let s = self.any_subject();
                self.copula_clause(s)
            }
        }
    }

    // --- noun phrases -------------------------------------------------------------------------

    fn determiner_phrase(&mut self, number: Number, noun: &str) -> String {
        let adjectives = self.adjectives();
        let head = if adjectives.is_empty() {
            noun.to_string()
        } else {
            format!("{adjectives} {noun}")
        };
        match number {
            Number::Singular => {
                let det = self.pick(SINGULAR_DETERMINERS);
                format!("{} {head}", article_for(det, &head))
            }
            Number::Plural => {
                if self.chance(0.15) {
                    head
                } else {
                    format!("{} {head}", self.pick(PLURAL_DETERMINERS))
                }
            }
        }
    }

    fn adjectives(&mut self) -> String {
        if self.chance(0.55) {
            return String::new();
        }
        let first = self.pick(ADJECTIVES);
        if self.chance(0.15) {
            let mut second = self.pick(ADJECTIVES);
            if second == first {
                second = "little";
            }
            format!("{first} {second}")
        } else {
            first.to_string()
        }
    }

    fn animate_np(&mut self, number: Number) -> String {
        let (sg, pl) = self.pick(ANIMATE_NOUNS);
        let noun = if number == Number::Singular { sg } else { pl };
        self.determiner_phrase(number, noun)
    }

    fn thing_np(&mut self, number: Number) -> String {
        let (sg, pl) = self.pick(THING_NOUNS);
        let noun = if number == Number::Singular { sg } else { pl };
        self.determiner_phrase(number, noun)
    }

    fn place_np(&mut self) -> String {
        let place = self.pick(PLACE_NOUNS);
        if self.chance(0.3) {
            let adjective = self.pick(ADJECTIVES);
            format!("the {adjective} {place}")
        } else {
            format!("the {place}")
        }
    }

    fn prepositional_phrase(&mut self) -> String {
        let prep = self.pick(PREPOSITIONS);
        let object = if self.chance(0.7) {
            self.place_np()
        } else {
            let n = self.number();
            self.thing_np(n)
        };
        format!("{prep} {object}")
    }

    /// A subject that can act: a name, the topic's pronoun, "they"/"we", or an animate NP.
    fn agent_subject(&mut self) -> Subject {
        match self.weighted(&[3, 3, 1, 6, 5]) {
            0 => Subject {
                text: self.character().name.to_string(),
                number: Number::Singular,
            },
            1 => match self.topic {
                Some(t) => Subject {
                    text: t.subject_pronoun().to_string(),
                    number: Number::Singular,
                },
                None => Subject {
                    text: "they".to_string(),
                    number: Number::Plural,
                },
            },
            2 => Subject {
                text: self.pick(&["they", "we"]).to_string(),
                number: Number::Plural,
            },
            3 => Subject {
                text: self.animate_np(Number::Singular),
                number: Number::Singular,
            },
            _ => Subject {
                text: self.animate_np(Number::Plural),
                number: Number::Plural,
            },
        }
    }

    /// Any subject for a description: agents, things or places.
    fn any_subject(&mut self) -> Subject {
        match self.rng.below(4) {
            0 | 1 => self.agent_subject(),
            2 => {
                let number = self.number();
                Subject {
                    text: self.thing_np(number),
                    number,
                }
            }
            _ => Subject {
                text: self.place_np(),
                number: Number::Singular,
            },
        }
    }

    fn object(&mut self) -> String {
        match self.weighted(&[5, 3, 2, 1]) {
            0 => {
                let n = self.number();
                self.thing_np(n)
            }
            1 => {
                let n = self.number();
                self.animate_np(n)
            }
            2 => {
                let topic = self.topic;
                match topic {
                    Some(t) if self.chance(0.5) => t.object_pronoun().to_string(),
                    _ => self.character().name.to_string(),
                }
            }
            _ => self.pick(&["them", "us", "it"]).to_string(),
        }
    }

    // --- verbs ----------------------------------------------------------------------------------

    /// The finite verb for `subject`, with an optional negation ("does not see") whose auxiliary
    /// carries the agreement instead of the verb.
    fn finite_verb(&mut self, verb: (&str, &str, &str), number: Number) -> String {
        let (base, s3, past) = verb;
        if self.chance(0.12) {
            let aux = match (self.tense, number) {
                (Tense::Past, _) => "did",
                (Tense::Present, Number::Singular) => "does",
                (Tense::Present, Number::Plural) => "do",
            };
            return format!("{aux} not {base}");
        }
        let form = match (self.tense, number) {
            (Tense::Past, _) => past,
            (Tense::Present, Number::Singular) => s3,
            (Tense::Present, Number::Plural) => base,
        };
        if self.chance(0.15) {
            format!("{} {form}", self.pick(FREQUENCY_ADVERBS))
        } else {
            form.to_string()
        }
    }

    fn be(&self, number: Number) -> &'static str {
        match (self.tense, number) {
            (Tense::Present, Number::Singular) => "is",
            (Tense::Present, Number::Plural) => "are",
            (Tense::Past, Number::Singular) => "was",
            (Tense::Past, Number::Plural) => "were",
        }
    }

    // --- clauses --------------------------------------------------------------------------------

    fn transitive_clause(&mut self, subject: Subject) -> String {
        let verb = self.pick(TRANSITIVE_VERBS);
        let verb = self.finite_verb(verb, subject.number);
        let object = self.object();
        let mut clause = format!("{} {verb} {object}", subject.text);
        if self.chance(0.35) {
            clause.push(' ');
            clause.push_str(&self.prepositional_phrase());
        }
        if self.chance(0.15) {
            clause.push(' ');
            clause.push_str(self.pick(MANNER_ADVERBS));
        }
        clause
    }

    fn intransitive_clause(&mut self, subject: Subject) -> String {
        let verb = self.pick(INTRANSITIVE_VERBS);
        let verb = self.finite_verb(verb, subject.number);
        let mut clause = format!("{} {verb}", subject.text);
        if self.chance(0.3) {
            clause.push(' ');
            clause.push_str(self.pick(MANNER_ADVERBS));
        }
        if self.chance(0.6) {
            clause.push(' ');
            clause.push_str(&self.prepositional_phrase());
        }
        clause
    }

    fn copula_clause(&mut self, subject: Subject) -> String {
        let be = self.be(subject.number);
        let complement = match self.rng.below(5) {
            0 => format!("very {}", self.pick(ADJECTIVES)),
            1 => {
                let a = self.pick(ADJECTIVES);
                let b = self.pick(ADJECTIVES);
                if a == b {
                    a.to_string()
                } else {
                    format!("{a} and {b}")
                }
            }
            2 => self.prepositional_phrase(),
            3 => format!("not {}", self.pick(ADJECTIVES)),
            _ => self.pick(ADJECTIVES).to_string(),
        };
        format!("{} {be} {complement}", subject.text)
    }

    fn there_clause(&mut self) -> String {
        let number = self.number();
        let np = if self.chance(0.6) {
            self.thing_np(number)
        } else {
            self.animate_np(number)
        };
        let be = self.be(number);
        let pp = self.prepositional_phrase();
        format!("there {be} {np} {pp}")
    }

    /// "The farmer who sells bread is tired": the main verb agrees with the head noun, not with
    /// the nearer noun inside the relative clause, which forces a model to track the head.
    fn relative_clause_sentence(&mut self) -> String {
        let head_number = self.number();
        let head = self.animate_np(head_number);
        let inner_verb = self.pick(TRANSITIVE_VERBS);
        let inner_verb = self.finite_verb(inner_verb, head_number);
        let inner_object_number = self.number();
        let inner_object = self.thing_np(inner_object_number);
        let main = if self.chance(0.5) {
            let be = self.be(head_number);
            format!("{be} {}", self.pick(ADJECTIVES))
        } else {
            let verb = self.pick(INTRANSITIVE_VERBS);
            let verb = self.finite_verb(verb, head_number);
            format!("{verb} {}", self.prepositional_phrase())
        };
        format!("{head} who {inner_verb} {inner_object} {main}")
    }

    fn list_clause(&mut self) -> String {
        let subject = self.agent_subject();
        let verb = self.pick(&[
            ("buy", "buys", "bought"),
            ("find", "finds", "found"),
            ("carry", "carries", "carried"),
            ("sell", "sells", "sold"),
        ]);
        let verb = self.finite_verb(verb, subject.number);
        let leading = 2 + self.rng.below(2) as usize;
        let mut parts = Vec::with_capacity(leading);
        for _ in 0..leading {
            let n = self.number();
            parts.push(self.thing_np(n));
        }
        let n = self.number();
        let last = self.thing_np(n);
        format!("{} {verb} {} and {last}", subject.text, parts.join(", "))
    }

    fn question(&mut self) -> String {
        if self.chance(0.5) {
            // Yes/no question: the auxiliary agrees and the verb stays in its base form.
            let subject = self.agent_subject();
            let aux = match (self.tense, subject.number) {
                (Tense::Past, _) => "did",
                (Tense::Present, Number::Singular) => "does",
                (Tense::Present, Number::Plural) => "do",
            };
            let (base, _, _) = self.pick(TRANSITIVE_VERBS);
            let object = self.object();
            finish(&format!("{aux} {} {base} {object}", subject.text), '?')
        } else {
            let word = self.pick(QUESTION_WORDS);
            let number = self.number();
            let np = self.thing_np(number);
            let be = self.be(number);
            let tail = if word == "Where" {
                String::new()
            } else {
                format!(" {}", self.pick(ADJECTIVES))
            };
            finish(&format!("{word} {be} {np}{tail}"), '?')
        }
    }

    fn quotation(&mut self) -> String {
        // Quoted speech is in the present tense whatever the narration's tense is.
        let narration = self.tense;
        self.tense = Tense::Present;
        let asks = self.chance(0.3);
        let spoken = if asks {
            self.question()
        } else {
            capitalize(&self.simple_clause()) + ","
        };
        self.tense = narration;
        let topic = self.topic;
        let speaker = match topic {
            Some(t) if self.chance(0.5) => t.name,
            _ => self.character().name,
        };
        let verb = if asks {
            "asked"
        } else {
            self.pick(SPEECH_VERBS)
        };
        format!("\"{spoken}\" {verb} {speaker}.")
    }

    fn exclamation(&mut self) -> String {
        match self.rng.below(3) {
            0 => {
                let adjective = self.pick(ADJECTIVES);
                let (noun, _) = self.pick(THING_NOUNS);
                let article = article_for("a", adjective);
                format!("What {article} {adjective} {noun}!")
            }
            1 => {
                let adjective = self.pick(ADJECTIVES);
                let (_, nouns) = self.pick(ANIMATE_NOUNS);
                format!("What {adjective} {nouns}!")
            }
            _ => {
                let adverb = self.pick(&["quickly", "slowly", "quietly", "happily", "loudly"]);
                let (_, nouns) = self.pick(ANIMATE_NOUNS);
                let (base, _, past) = self.pick(INTRANSITIVE_VERBS);
                let verb = if self.tense == Tense::Past {
                    past
                } else {
                    base
                };
                format!("How {adverb} the {nouns} {verb}!")
            }
        }
    }
}

/// "a" becomes "an" before a vowel sound; the lexicon avoids words where spelling and sound
/// disagree ("an hour", "a unicorn"), so the first letter decides.
fn article_for<'a>(det: &'a str, next_words: &str) -> &'a str {
    if det != "a" {
        return det;
    }
    match next_words.as_bytes().first() {
        Some(b'a' | b'e' | b'i' | b'o' | b'u') => "an",
        _ => "a",
    }
}

fn capitalize(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) => c.to_ascii_uppercase().to_string() + chars.as_str(),
        None => String::new(),
    }
}

fn finish(clause: &str, terminator: char) -> String {
    let mut s = capitalize(clause);
    s.push(terminator);
    s
}
