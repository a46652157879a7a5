//! The stand-in's "model": deterministic unit vectors and a token count.
//!
//! Nothing here is a real embedding model. What tests and benchmarks need is:
//! - the same text always gives the same vector (so a test can recompute
//!   what the daemon should have stored, with [`standin_vector`]);
//! - different texts give different vectors;
//! - every vector has unit length, like Ollama's `/api/embed`;
//! - texts that share words point roughly the same way, so a search over
//!   stand-in vectors ranks "texts mentioning the query's words" first and
//!   search demos are not pure noise.
//!
//! The vector is `normalise(0.8 * W + 0.6 * R)`, where `W` is a normalised
//! bag of words (feature hashing: each lower-cased word adds ±1/2 to four
//! dimensions picked by its hash) and `R` is a normalised random vector drawn
//! from a splitmix64 stream seeded with sha256(text) and the dimension. `R`
//! makes any two distinct texts distinct, `W` gives the shared-words signal.
//! Everything is computed in `f64` and rounded to `f32` once at the end, so
//! the result is identical on every platform.

use sha2::{Digest, Sha256};

/// Weight of the bag-of-words part. `0.8² + 0.6² = 1`, so a text whose words
/// are all shared with another (but which differs in punctuation or order)
/// has a cosine of about 0.64 with it, and unrelated texts about 0.
const WORDS_WEIGHT: f64 = 0.8;
/// Weight of the per-text random part.
const NOISE_WEIGHT: f64 = 0.6;
/// Dimensions each word touches.
const DIMS_PER_WORD: usize = 4;
/// ASCII alphanumeric characters per token in [`count_tokens`].
const CHARS_PER_TOKEN: usize = 5;

/// The vector the stand-in returns for `text` at `dims` dimensions: a
/// deterministic unit vector (see the module docs for the construction).
///
/// `dims == 0` gives an empty vector.
pub fn standin_vector(text: &str, dims: usize) -> Vec<f32> {
    if dims == 0 {
        return Vec::new();
    }
    let noise = noise_vector(text, dims);
    let words = words_vector(text, dims);
    let mut v: Vec<f64> = match words {
        Some(w) => w
            .iter()
            .zip(&noise)
            .map(|(w, r)| WORDS_WEIGHT * w + NOISE_WEIGHT * r)
            .collect(),
        None => noise,
    };
    normalise(&mut v);
    v.into_iter().map(|x| x as f32).collect()
}

/// Ollama's `dimensions` option (Matryoshka): keep the first `dims`
/// components and normalise again. Ignored (the vector is returned as is)
/// when `dims` is 0 or not smaller than the vector, as Ollama does.
pub fn shorten(vector: Vec<f32>, dims: usize) -> Vec<f32> {
    if dims == 0 || dims >= vector.len() {
        return vector;
    }
    let mut v: Vec<f64> = vector[..dims].iter().map(|&x| f64::from(x)).collect();
    normalise(&mut v);
    v.into_iter().map(|x| x as f32).collect()
}

/// The stand-in's token count, a deterministic stand-in for a tokenizer:
/// every maximal run of ASCII letters and digits costs one token per started
/// group of 5 characters (`"hello"` = 1, `"tokenizer"` = 2,
/// `"internationalization"` = 4); every other character costs one token,
/// except whitespace and ASCII control characters, which cost nothing.
///
/// For English prose that is about 1.2 tokens per word, close to what
/// WordPiece/BPE tokenizers give. It is never more than the number of
/// non-whitespace characters, and never more than the chunker's own estimate
/// (`pipeline::chunker::estimate_tokens`, which charges the same for ASCII
/// and more for everything else), so what the daemon's chunker cuts to fit a
/// context always fits the stand-in's; a test pins this.
pub fn count_tokens(text: &str) -> usize {
    let mut run = 0;
    text.chars().filter(|&c| starts_token(c, &mut run)).count()
}

/// The longest prefix of `text` that holds at most `limit` tokens by
/// [`count_tokens`]: what Ollama's `truncate: true` keeps. Cuts only on
/// character boundaries, and drops the whitespace the cut leaves at the end.
pub fn truncate_to_tokens(text: &str, limit: usize) -> &str {
    let mut run = 0;
    let mut tokens = 0;
    for (i, c) in text.char_indices() {
        if starts_token(c, &mut run) {
            if tokens == limit {
                return text[..i].trim_end();
            }
            tokens += 1;
        }
    }
    text
}

/// Whether `c` starts a new token under [`count_tokens`]'s rule; `run`
/// counts the ASCII alphanumerics seen in a row so far.
fn starts_token(c: char, run: &mut usize) -> bool {
    if c.is_ascii_alphanumeric() {
        let starts = run.is_multiple_of(CHARS_PER_TOKEN);
        *run += 1;
        starts
    } else {
        *run = 0;
        !(c.is_whitespace() || c.is_ascii_control())
    }
}

/// splitmix64 (Steele, Lea, Flood 2014): tiny, fast, good enough statistics
/// for test vectors, and fully specified, so vectors never change when a
/// crate is upgraded.
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)` with 53 bits of precision.
    pub(crate) fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A unit vector drawn from a stream seeded by sha256(text) and `dims`.
fn noise_vector(text: &str, dims: usize) -> Vec<f64> {
    let digest = Sha256::digest(text.as_bytes());
    let mut seed = (dims as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for chunk in digest.chunks(8) {
        let mut word = [0u8; 8];
        word[..chunk.len()].copy_from_slice(chunk);
        seed = SplitMix64::new(seed ^ u64::from_le_bytes(word)).next_u64();
    }
    let mut rng = SplitMix64::new(seed);
    let mut v: Vec<f64> = (0..dims).map(|_| rng.next_f64() * 2.0 - 1.0).collect();
    normalise(&mut v);
    v
}

/// The normalised bag-of-words vector, or `None` when the text has no words.
fn words_vector(text: &str, dims: usize) -> Option<Vec<f64>> {
    let mut v = vec![0.0f64; dims];
    let mut any = false;
    for word in text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        any = true;
        let mut rng = SplitMix64::new(fnv1a(word));
        for _ in 0..DIMS_PER_WORD {
            let r = rng.next_u64();
            let index = (r >> 1) as usize % dims;
            let sign = if r & 1 == 0 { 0.5 } else { -0.5 };
            v[index] += sign;
        }
    }
    if !any {
        return None;
    }
    // Signs can cancel out completely (e.g. a word whose four picks collide);
    // then there is no direction to add.
    normalise(&mut v).then_some(v)
}

/// FNV-1a over the lower-cased word, so "Postgres" and "postgres" count as
/// the same word.
fn fnv1a(word: &str) -> u64 {
    let mut hash: u64 = 0xCBF2_9CE4_8422_2325;
    for c in word.chars().flat_map(char::to_lowercase) {
        let mut buf = [0u8; 4];
        for &b in c.encode_utf8(&mut buf).as_bytes() {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0000_0100_0000_01B3);
        }
    }
    hash
}

/// Scales `v` to unit length; returns false (leaving `v` as is) when it is
/// all zeros.
fn normalise(v: &mut [f64]) -> bool {
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    if norm == 0.0 || !norm.is_finite() {
        return false;
    }
    for x in v.iter_mut() {
        *x /= norm;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(v: &[f32]) -> f64 {
        v.iter()
            .map(|&x| f64::from(x) * f64::from(x))
            .sum::<f64>()
            .sqrt()
    }

    fn cosine(a: &[f32], b: &[f32]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(&x, &y)| f64::from(x) * f64::from(y))
            .sum::<f64>()
            / (norm(a) * norm(b))
    }

    #[test]
    fn vectors_are_deterministic_unit_and_sized() {
        for text in [
            "",
            "hello",
            "Hello, world!",
            "日本語のテキスト",
            "   ",
            "?!",
        ] {
            for dims in [1, 2, 3, 384, 768, 1024] {
                let a = standin_vector(text, dims);
                let b = standin_vector(text, dims);
                assert_eq!(a, b, "{text:?} at {dims}");
                assert_eq!(a.len(), dims);
                assert!((norm(&a) - 1.0).abs() < 1e-6, "{text:?} {dims}");
                assert!(a.iter().all(|x| x.is_finite()));
            }
        }
        assert!(standin_vector("x", 0).is_empty());
    }

    #[test]
    fn vectors_are_pinned() {
        // If this changes, every stored test vector and benchmark baseline
        // changes with it: do it on purpose only.
        let v = standin_vector("hello world", 4);
        let bits: Vec<u32> = v.iter().map(|x| x.to_bits()).collect();
        assert_eq!(bits, PINNED_HELLO_WORLD_4);
    }
    const PINNED_HELLO_WORLD_4: [u32; 4] =
        [1_057_794_525, 1_059_865_869, 1_035_199_356, 3_204_024_756];

    #[test]
    fn distinct_texts_distinct_vectors_and_dims_matter() {
        let a = standin_vector("the cat sat", 768);
        let b = standin_vector("the cat sat.", 768);
        let c = standin_vector("a dog ran far", 768);
        assert_ne!(a, b);
        // Same words, different punctuation: clearly related.
        assert!(cosine(&a, &b) > 0.5, "{}", cosine(&a, &b));
        // Nothing shared: about orthogonal.
        assert!(cosine(&a, &c).abs() < 0.3, "{}", cosine(&a, &c));
        // A different dimension is a different vector, not a prefix.
        let short = standin_vector("the cat sat", 384);
        assert_ne!(&a[..384], &short[..]);
    }

    #[test]
    fn shared_words_rank_first() {
        let query = standin_vector("postgres backup", 768);
        let related = standin_vector("How do I restore a postgres backup from last week?", 768);
        let unrelated = standin_vector("What should I cook for dinner tonight with rice?", 768);
        assert!(cosine(&query, &related) > cosine(&query, &unrelated));
    }

    #[test]
    fn token_rule() {
        assert_eq!(count_tokens(""), 0);
        assert_eq!(count_tokens("   \n\t"), 0);
        assert_eq!(count_tokens("the"), 1);
        assert_eq!(count_tokens("hello"), 1);
        assert_eq!(count_tokens("tokenizer"), 2);
        assert_eq!(count_tokens("internationalization"), 4);
        assert_eq!(count_tokens("Hello, world!"), 1 + 1 + 1 + 1);
        assert_eq!(count_tokens("a-b"), 3);
        assert_eq!(count_tokens("café"), 2);
        assert_eq!(count_tokens("日本語"), 3);
        assert_eq!(count_tokens("a\u{1}b\u{a0}c"), 3);
        // Never more than the non-whitespace characters.
        for text in ["a b c", "!!!", "abcd efgh", "x, y; z.", "日本 語"] {
            let chars = text.chars().filter(|c| !c.is_whitespace()).count();
            assert!(count_tokens(text) <= chars);
        }
    }

    proptest::proptest! {
        /// The contract with the daemon's chunker: a chunk it estimates to
        /// fit never costs the stand-in more.
        #[test]
        fn never_more_than_the_chunkers_estimate(text in "\\PC*|[a-z0-9 ,.!?-]*|[\\x00-\\x7f]*") {
            let estimate = convstore_core::chunker::estimate_tokens(&text);
            proptest::prop_assert!(count_tokens(&text) <= estimate, "{} > {}", count_tokens(&text), estimate);
        }
    }

    #[test]
    fn truncation_keeps_exactly_the_limit() {
        let text = "Hello, world! This is a tokenizer test.";
        let total = count_tokens(text);
        for limit in 0..=total + 2 {
            let cut = truncate_to_tokens(text, limit);
            assert!(text.starts_with(cut));
            assert_eq!(
                count_tokens(cut),
                limit.min(total),
                "limit {limit}: {cut:?}"
            );
        }
        assert_eq!(truncate_to_tokens(text, total), text);
        assert_eq!(truncate_to_tokens("internationalization", 1), "inter");
        assert_eq!(truncate_to_tokens("日本語テキスト", 1), "日");
    }

    #[test]
    fn shorten_renormalises_a_prefix() {
        let v = standin_vector("matryoshka", 768);
        let s = shorten(v.clone(), 256);
        assert_eq!(s.len(), 256);
        assert!((norm(&s) - 1.0).abs() < 1e-6);
        assert!(cosine(&s, &v[..256]) > 0.999_999);
        assert_eq!(shorten(v.clone(), 0), v);
        assert_eq!(shorten(v.clone(), 768), v);
        assert_eq!(shorten(v.clone(), 4096), v);
    }

    #[test]
    fn json_round_trips_f32_exactly() {
        for i in 0..200 {
            let v = standin_vector(&format!("text number {i}"), 768);
            let json = serde_json::to_string(&v).unwrap_or_default();
            let back: Vec<f32> = serde_json::from_str(&json).unwrap_or_default();
            let a: Vec<u32> = v.iter().map(|x| x.to_bits()).collect();
            let b: Vec<u32> = back.iter().map(|x| x.to_bits()).collect();
            assert_eq!(a, b);
        }
    }
}
