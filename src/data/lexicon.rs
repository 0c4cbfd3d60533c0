//! Word lists of the built-in corpus grammar. Nouns are split into animate ones (which act)
//! and things/places (which are acted on or located), so the generated sentences read as
//! plausible rather than word salad. Every list must stay non-empty because the generator
//! picks from each of them unconditionally.

pub(super) const FEMALE_NAMES: &[&str] = &[
    "Anna", "Clara", "Elena", "Greta", "Iris", "Karin", "Mira", "Olga", "Rosa", "Tara", "Nadia",
];
pub(super) const MALE_NAMES: &[&str] = &[
    "Boris", "Daniel", "Felix", "Hugo", "Jonas", "Leo", "Nils", "Peter", "Simon", "Victor", "Omar",
];

/// (singular, plural)
pub(super) const ANIMATE_NOUNS: &[(&str, &str)] = &[
    ("cat", "cats"),
    ("dog", "dogs"),
    ("child", "children"),
    ("teacher", "teachers"),
    ("farmer", "farmers"),
    ("bird", "birds"),
    ("horse", "horses"),
    ("wolf", "wolves"),
    ("woman", "women"),
    ("man", "men"),
    ("mouse", "mice"),
    ("friend", "friends"),
    ("doctor", "doctors"),
    ("baker", "bakers"),
    ("sailor", "sailors"),
    ("fox", "foxes"),
    ("neighbour", "neighbours"),
    ("girl", "girls"),
    ("boy", "boys"),
    ("goose", "geese"),
];

pub(super) const THING_NOUNS: &[(&str, &str)] = &[
    ("house", "houses"),
    ("garden", "gardens"),
    ("tree", "trees"),
    ("boat", "boats"),
    ("letter", "letters"),
    ("window", "windows"),
    ("box", "boxes"),
    ("story", "stories"),
    ("song", "songs"),
    ("lamp", "lamps"),
    ("table", "tables"),
    ("book", "books"),
    ("bridge", "bridges"),
    ("knife", "knives"),
    ("key", "keys"),
    ("clock", "clocks"),
    ("stone", "stones"),
    ("apple", "apples"),
    ("basket", "baskets"),
    ("chair", "chairs"),
    ("cup", "cups"),
    ("map", "maps"),
    ("coat", "coats"),
    ("door", "doors"),
    ("candle", "candles"),
    ("shell", "shells"),
];

pub(super) const PLACE_NOUNS: &[&str] = &[
    "river", "forest", "market", "village", "mountain", "island", "city", "road", "harbour",
    "kitchen", "field", "station", "library", "hill", "valley", "castle", "lake", "school",
];

pub(super) const ADJECTIVES: &[&str] = &[
    "old", "young", "small", "large", "quiet", "loud", "bright", "dark", "green", "red", "blue",
    "yellow", "happy", "tired", "clever", "gentle", "brave", "heavy", "empty", "warm", "cold",
    "narrow", "wide", "strange", "famous", "careful", "hungry", "wooden", "silver", "ancient",
    "early", "shiny", "odd", "proud", "busy", "lazy", "curious",
];

/// (base, third person singular, past)
pub(super) const TRANSITIVE_VERBS: &[(&str, &str, &str)] = &[
    ("see", "sees", "saw"),
    ("carry", "carries", "carried"),
    ("watch", "watches", "watched"),
    ("find", "finds", "found"),
    ("build", "builds", "built"),
    ("paint", "paints", "painted"),
    ("follow", "follows", "followed"),
    ("open", "opens", "opened"),
    ("visit", "visits", "visited"),
    ("clean", "cleans", "cleaned"),
    ("sell", "sells", "sold"),
    ("buy", "buys", "bought"),
    ("hold", "holds", "held"),
    ("push", "pushes", "pushed"),
    ("catch", "catches", "caught"),
    ("remember", "remembers", "remembered"),
    ("love", "loves", "loved"),
    ("fix", "fixes", "fixed"),
    ("hide", "hides", "hid"),
    ("bring", "brings", "brought"),
    ("forget", "forgets", "forgot"),
    ("study", "studies", "studied"),
];

/// (base, third person singular, past)
pub(super) const INTRANSITIVE_VERBS: &[(&str, &str, &str)] = &[
    ("sleep", "sleeps", "slept"),
    ("run", "runs", "ran"),
    ("sing", "sings", "sang"),
    ("wait", "waits", "waited"),
    ("laugh", "laughs", "laughed"),
    ("walk", "walks", "walked"),
    ("swim", "swims", "swam"),
    ("dance", "dances", "danced"),
    ("rest", "rests", "rested"),
    ("arrive", "arrives", "arrived"),
    ("cry", "cries", "cried"),
    ("hurry", "hurries", "hurried"),
    ("listen", "listens", "listened"),
    ("sit", "sits", "sat"),
];

/// Verbs that introduce a quoted statement, in the past tense because the narrator reports them.
/// "asked" is left out: it is reserved for quoted questions so punctuation and verb agree.
pub(super) const SPEECH_VERBS: &[&str] = &[
    "said",
    "whispered",
    "shouted",
    "replied",
    "answered",
    "explained",
];

pub(super) const PREPOSITIONS: &[&str] = &[
    "in", "on", "under", "near", "behind", "beside", "across", "through", "over", "above", "along",
    "inside", "toward", "around", "below", "beyond",
];

pub(super) const SINGULAR_DETERMINERS: &[&str] = &[
    "the", "the", "the", "a", "a", "this", "that", "every", "my", "her", "his", "our", "their",
    "one",
];
pub(super) const PLURAL_DETERMINERS: &[&str] = &[
    "the", "the", "the", "these", "those", "some", "many", "two", "three", "several", "our",
    "their", "my", "few", "four",
];

/// Frequency adverbs sit before the verb; manner adverbs after it.
pub(super) const FREQUENCY_ADVERBS: &[&str] =
    &["often", "never", "always", "sometimes", "rarely", "usually"];
pub(super) const MANNER_ADVERBS: &[&str] = &[
    "quickly",
    "slowly",
    "quietly",
    "carefully",
    "again",
    "happily",
    "loudly",
    "together",
    "alone",
    "badly",
];

pub(super) const TIME_PHRASES: &[&str] = &[
    "In the morning",
    "At night",
    "Every day",
    "Later that day",
    "After the storm",
    "Before dinner",
    "On Sunday",
    "In winter",
    "At noon",
    "Once a week",
    "In the evening",
    "After a while",
];

pub(super) const CLAUSE_CONJUNCTIONS: &[&str] = &["and", "but", "because", "while", "so", "when"];

pub(super) const QUESTION_WORDS: &[&str] = &["Where", "Why", "When"];
