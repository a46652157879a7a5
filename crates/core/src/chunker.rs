//! Conversation text → chunks that fit the model's context.
//!
//! Chunks are cut on message boundaries: whole `role: content` lines are
//! packed greedily until the next one would pass the token budget. A single
//! message longer than the budget is split on sentence ends, then on
//! whitespace, then (last resort, e.g. a long token-free string) on character
//! boundaries, each piece keeping its `role: ` prefix. Nothing is ever cut
//! off: every byte of the conversation text is in exactly one chunk, and
//! backends are asked with truncation off so an estimate that came out too
//! low fails loudly instead of losing text.

use crate::model::{Chunk, Conversation, content_hash};

/// Counts tokens exactly as one model reads them. The chunker needs only
/// this of a model; embedding backends that hold the model's tokenizer
/// implement it.
pub trait TokenCounter: Send + Sync {
    /// Tokens `text` costs, the model's special tokens included.
    fn count_tokens(&self, text: &str) -> usize;

    /// The most tokens the model reads at once (special tokens included).
    fn max_tokens(&self) -> usize;
}

/// Upper-bound estimate of the tokens a text costs in a WordPiece/BPE model.
///
/// Heuristic: an ASCII alphanumeric run costs 1 token plus 1 per 5 further
/// characters (real English words average ~1.3 word pieces); each ASCII
/// punctuation character costs 1; a non-ASCII character costs its UTF-8
/// length (byte-level BPE's worst case, and BERT's `[UNK]` costs less).
/// Whitespace is free. This overestimates typical English by ~20–40 %, which
/// is the side we want to err on.
///
/// Counted byte by byte, without decoding UTF-8: every byte of a non-ASCII
/// character is 0x80 or above and costs 1, so a character costs its UTF-8
/// length, as the rule says. It runs over every message and chunk several
/// times (chunking, packing requests, the router's context check).
pub fn estimate_tokens(text: &str) -> usize {
    let mut tokens = 0;
    let mut run = 0usize;
    for &byte in text.as_bytes() {
        if byte.is_ascii_alphanumeric() {
            run += 1;
            continue;
        }
        if run > 0 {
            tokens += 1 + (run - 1) / 5;
            run = 0;
        }
        if byte.is_ascii_punctuation() || !byte.is_ascii() {
            tokens += 1;
        }
    }
    if run > 0 {
        tokens += 1 + (run - 1) / 5;
    }
    tokens
}

/// Splits conversations into chunks of at most `budget` estimated tokens.
#[derive(Debug, Clone, Copy)]
pub struct Chunker {
    budget: usize,
}

/// Tokens reserved for the model's own special tokens ([CLS], [SEP], BOS…).
const SPECIAL_TOKENS: usize = 4;
/// Smallest budget that still makes sense; below it every word is a chunk.
const MIN_BUDGET: usize = 16;

impl Chunker {
    /// `context_tokens`: what the model reads at once; `max_tokens`: the
    /// operator's ceiling (0 = none).
    pub fn new(context_tokens: usize, max_tokens: usize) -> Self {
        let mut budget = context_tokens.saturating_sub(SPECIAL_TOKENS);
        if max_tokens > 0 {
            budget = budget.min(max_tokens);
        }
        Self {
            budget: budget.max(MIN_BUDGET),
        }
    }

    pub fn budget(&self) -> usize {
        self.budget
    }

    pub fn chunk(&self, conversation: &Conversation) -> Vec<Chunk> {
        let mut pieces: Vec<String> = Vec::new();
        match &conversation.transcript {
            Some(transcript) => {
                for line in transcript.split_inclusive('\n') {
                    self.split_line("", line, &mut pieces);
                }
            }
            None => {
                for m in &conversation.messages {
                    let prefix = format!("{}: ", m.role);
                    let line = format!("{}\n", m.content);
                    self.split_line(&prefix, &line, &mut pieces);
                }
            }
        }
        self.pack(pieces)
    }

    /// Adds `prefix + line` to `out`, split into pieces within the budget.
    fn split_line(&self, prefix: &str, line: &str, out: &mut Vec<String>) {
        let prefix_cost = estimate_tokens(prefix);
        if prefix_cost + estimate_tokens(line) <= self.budget {
            out.push(format!("{prefix}{line}"));
            return;
        }
        let room = self.budget.saturating_sub(prefix_cost).max(1);
        for piece in split_to_budget(line, room) {
            out.push(format!("{prefix}{piece}"));
        }
    }

    /// Greedily joins consecutive pieces while they fit in the budget.
    fn pack(&self, pieces: Vec<String>) -> Vec<Chunk> {
        let mut chunks = Vec::new();
        let mut current = String::new();
        let mut current_cost = 0;
        for piece in pieces {
            let cost = estimate_tokens(&piece);
            if !current.is_empty() && current_cost + cost > self.budget {
                chunks.push(std::mem::take(&mut current));
                current_cost = 0;
            }
            current.push_str(&piece);
            current_cost += cost;
        }
        if !current.trim().is_empty() || chunks.is_empty() {
            chunks.push(current);
        } else if let Some(last) = chunks.last_mut() {
            // Trailing whitespace only: keep it with the last chunk so no
            // byte is dropped.
            last.push_str(&current);
        }
        numbered(chunks)
    }
}

/// Re-cuts every chunk the model would have to truncate, by the model's own
/// token count (a backend with the tokenizer in process offers one through
/// `Embedder::token_counter`). The estimate sizes prose well, but ids,
/// hashes and digit strings can cost WordPiece more than it guesses. Chunks
/// that fit come back unchanged; an oversized one is split in place (same
/// bytes, same order; pieces after the first lose the role prefix), on
/// sentence ends or whitespace, halving until every piece fits. Chunks are
/// renumbered only when something was split.
pub fn fit_exactly(chunks: Vec<Chunk>, counter: &dyn TokenCounter) -> Vec<Chunk> {
    let limit = counter.max_tokens();
    if chunks
        .iter()
        .all(|c| counter.count_tokens(&c.content) <= limit)
    {
        return chunks;
    }
    let mut pieces = Vec::with_capacity(chunks.len() + 1);
    for chunk in &chunks {
        split_exactly(&chunk.content, counter, limit, &mut pieces);
    }
    numbered(pieces)
}

/// Pushes `text` whole when the model reads it whole, else its halves (by
/// estimate, on natural boundaries), recursively. A single character is
/// pushed as it is: nothing smaller exists.
fn split_exactly(text: &str, counter: &dyn TokenCounter, limit: usize, out: &mut Vec<String>) {
    if counter.count_tokens(text) <= limit {
        out.push(text.to_string());
        return;
    }
    match halves(text) {
        Some(pieces) => {
            for piece in pieces {
                split_exactly(piece, counter, limit, out);
            }
        }
        None => out.push(text.to_string()),
    }
}

/// `text` cut in about half by estimated tokens, on a sentence end, else
/// whitespace, else a character boundary: two or more consecutive pieces
/// (a natural boundary early in the text can make a third) holding every
/// byte; `None` for a single character, which nothing can cut.
pub fn halves(text: &str) -> Option<Vec<&str>> {
    // A single character: nothing to cut.
    text.chars().nth(1)?;
    let pieces = split_to_budget(text, (estimate_tokens(text) / 2).max(1));
    if pieces.len() >= 2 {
        return Some(pieces);
    }
    // The estimate saw nothing to halve (e.g. control characters it counts
    // as free): cut at the middle character instead.
    let middle = text
        .char_indices()
        .nth(text.chars().count() / 2)
        .map_or(text.len(), |(i, _)| i);
    Some(vec![&text[..middle], &text[middle..]])
}

/// Which messages (or transcript lines) each chunk covers, derived from the
/// text alone, for showing a search hit in place.
///
/// `units` are what [`Chunker::chunk`] cut: per message its `role: ` prefix
/// and `content + "\n"`, or per transcript line (`split_inclusive('\n')`)
/// an empty prefix and the line. `chunks` are the stored chunk contents in
/// `seq` order. The chunker keeps every byte in order and only adds the
/// prefix again in front of each piece of a message it had to split
/// ([`fit_exactly`] and [`halves`] move chunk boundaries without adding
/// anything), so walking both texts side by side finds where each unit
/// starts and ends. Returns `(first, last)` unit indices per chunk, or
/// `None` when the chunks are not a cut of these units (the conversation
/// changed since, or it was chunked another way).
pub fn chunk_units(units: &[(&str, &str)], chunks: &[&str]) -> Option<Vec<(usize, usize)>> {
    let text: String = chunks.concat();
    let bytes = text.as_bytes();
    // End offset in `text` of each unit.
    let mut unit_ends = Vec::with_capacity(units.len());
    let mut cur = 0usize;
    for (prefix, body) in units {
        let prefix = prefix.as_bytes();
        if !bytes.get(cur..)?.starts_with(prefix) {
            return None;
        }
        cur += prefix.len();
        let body = body.as_bytes();
        let mut j = 0usize;
        while j < body.len() {
            let rest = bytes.get(cur..)?;
            // A piece after a split starts with the prefix again; the text
            // itself saying the same is the rarer reading.
            if !prefix.is_empty() && rest.starts_with(prefix) && !body[j..].starts_with(prefix) {
                cur += prefix.len();
                continue;
            }
            if rest.first() != Some(&body[j]) {
                return None;
            }
            cur += 1;
            j += 1;
        }
        unit_ends.push(cur);
    }
    if cur != bytes.len() {
        return None;
    }
    let unit_at = |offset: usize| -> usize {
        unit_ends
            .iter()
            .position(|&end| offset < end)
            .unwrap_or(units.len().saturating_sub(1))
    };
    let mut out = Vec::with_capacity(chunks.len());
    let mut start = 0usize;
    for chunk in chunks {
        let end = start + chunk.len();
        let first = unit_at(start);
        let last = if end > start { unit_at(end - 1) } else { first };
        out.push((first, last));
        start = end;
    }
    Some(out)
}

/// Chunks of `contents`, numbered from 0.
fn numbered(contents: Vec<String>) -> Vec<Chunk> {
    contents
        .into_iter()
        .enumerate()
        .map(|(i, content)| Chunk {
            seq: i32::try_from(i).unwrap_or(i32::MAX),
            content_hash: content_hash(&content),
            content,
        })
        .collect()
}

/// Splits `text` into consecutive pieces of at most `room` estimated tokens,
/// preferring sentence ends, then whitespace, then character boundaries.
fn split_to_budget(text: &str, room: usize) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let cut = best_cut(rest, room);
        let (head, tail) = rest.split_at(cut);
        out.push(head);
        rest = tail;
    }
    out
}

/// The length of the next piece: all of `text` when it fits in `room`
/// tokens, else the largest prefix within `room`, ending after a sentence end
/// or whitespace when the prefix has one; always > 0. Linear in the piece.
fn best_cut(text: &str, room: usize) -> usize {
    // Longest prefix within budget, in one pass: the same arithmetic as
    // `estimate_tokens`, kept incrementally (a prefix that ends inside a word
    // is charged for the partial run, never more than the whole word costs).
    let mut fit = 0;
    let mut closed_tokens = 0usize;
    let mut run = 0usize;
    for (idx, ch) in text.char_indices() {
        if ch.is_ascii_alphanumeric() {
            run += 1;
        } else {
            if run > 0 {
                closed_tokens += 1 + (run - 1) / 5;
                run = 0;
            }
            if ch.is_ascii_punctuation() {
                closed_tokens += 1;
            } else if !ch.is_ascii() {
                closed_tokens += ch.len_utf8();
            }
        }
        let cost = closed_tokens + if run > 0 { 1 + (run - 1) / 5 } else { 0 };
        if cost > room {
            break;
        }
        fit = idx + ch.len_utf8();
    }
    if fit == text.len() {
        return fit;
    }
    if fit == 0 {
        // Not even one character fits (a budget below one character's cost):
        // take one character anyway so the loop always advances.
        return text.chars().next().map_or(text.len(), char::len_utf8);
    }
    let prefix = &text[..fit];
    let sentence_end = prefix
        .char_indices()
        .filter(|&(i, c)| {
            matches!(c, '.' | '!' | '?' | '\n')
                && prefix[i + c.len_utf8()..]
                    .chars()
                    .next()
                    .is_none_or(char::is_whitespace)
        })
        .map(|(i, c)| i + c.len_utf8())
        .next_back();
    if let Some(end) = sentence_end.filter(|&e| e > fit / 3) {
        return end;
    }
    if let Some(ws) = prefix.rfind(char::is_whitespace).filter(|&w| w > 0) {
        let ws_len = prefix[ws..].chars().next().map_or(1, char::len_utf8);
        return ws + ws_len;
    }
    fit
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Message;
    use proptest::prelude::*;
    use std::time::Instant;

    fn conversation(messages: &[(&str, &str)]) -> Conversation {
        Conversation {
            id: uuid::Uuid::nil(),
            client_id: None,
            user_id: "u".into(),
            channel: "c".into(),
            messages: messages
                .iter()
                .map(|(r, c)| Message {
                    role: crate::model::Role::from_word(r).expect("a role"),
                    content: c.to_string(),
                    ts: None,
                    message_id: None,
                })
                .collect(),
            transcript: None,
            summary: None,
            metadata: serde_json::json!({}),
            created_at: None,
            received_at: chrono::Utc::now(),
            received_instant: Instant::now(),
        }
    }

    #[test]
    fn short_conversation_is_one_chunk() {
        let c = conversation(&[
            ("user", "Book a flight to Seattle."),
            ("assistant", "Sure, when?"),
        ]);
        let chunks = Chunker::new(2048, 0).chunk(&c);
        assert_eq!(chunks.len(), 1);
        assert_eq!(
            chunks[0].content,
            "user: Book a flight to Seattle.\nassistant: Sure, when?\n"
        );
        assert_eq!(chunks[0].seq, 0);
        assert_eq!(chunks[0].content_hash, content_hash(&chunks[0].content));
    }

    #[test]
    fn splits_on_message_boundaries() {
        let long = "word ".repeat(30);
        let c = conversation(&[("user", &long), ("assistant", &long), ("user", &long)]);
        // Each message costs ~32 tokens: a budget of 46 holds one, not two.
        let chunker = Chunker::new(50, 0);
        let chunks = chunker.chunk(&c);
        assert_eq!(chunks.len(), 3, "{chunks:?}");
        for chunk in &chunks {
            assert!(estimate_tokens(&chunk.content) <= chunker.budget());
            assert!(
                chunk.content.starts_with("user: ") || chunk.content.starts_with("assistant: ")
            );
        }
    }

    #[test]
    fn long_message_split_within_budget_keeping_role() {
        let long = "This is a sentence about flights. ".repeat(100);
        let c = conversation(&[("user", &long)]);
        let chunker = Chunker::new(64, 0);
        let chunks = chunker.chunk(&c);
        assert!(chunks.len() > 5);
        for chunk in &chunks {
            assert!(
                estimate_tokens(&chunk.content) <= chunker.budget(),
                "{}",
                chunk.content
            );
            assert!(chunk.content.starts_with("user: "));
        }
    }

    #[test]
    fn max_tokens_caps_budget() {
        assert_eq!(Chunker::new(2048, 100).budget(), 100);
        assert_eq!(Chunker::new(512, 0).budget(), 508);
        assert_eq!(Chunker::new(8, 0).budget(), MIN_BUDGET);
    }

    #[test]
    fn estimate_counts_punctuation_and_non_ascii() {
        assert_eq!(estimate_tokens("hello"), 1);
        assert_eq!(estimate_tokens("hello, world!"), 4);
        assert_eq!(estimate_tokens("internationalization"), 4);
        assert_eq!(estimate_tokens("日本"), 6);
        assert_eq!(estimate_tokens("   "), 0);
    }

    /// A tokenizer far hungrier than the estimate: one token per byte,
    /// plus two special tokens.
    struct PerByte(usize);

    impl TokenCounter for PerByte {
        fn count_tokens(&self, text: &str) -> usize {
            text.len() + 2
        }
        fn max_tokens(&self) -> usize {
            self.0
        }
    }

    #[test]
    fn fit_exactly_leaves_fitting_chunks_alone_and_recuts_the_rest() {
        let c = conversation(&[
            (
                "user",
                "Track order 1Z999AA10123456784 and e3b0c44298fc1c149afbf4c8996fb924.",
            ),
            ("assistant", "Done."),
        ]);
        let chunks = Chunker::new(2048, 0).chunk(&c);
        assert_eq!(chunks.len(), 1);
        let unchanged = fit_exactly(chunks.clone(), &PerByte(1000));
        assert_eq!(unchanged[0].content, chunks[0].content);

        let counter = PerByte(32);
        let fitted = fit_exactly(chunks.clone(), &counter);
        assert!(fitted.len() > 1, "{fitted:?}");
        let joined: String = fitted.iter().map(|c| c.content.as_str()).collect();
        assert_eq!(joined, chunks[0].content);
        for (i, chunk) in fitted.iter().enumerate() {
            assert!(counter.count_tokens(&chunk.content) <= 32, "{chunk:?}");
            assert_eq!(chunk.seq, i as i32);
            assert_eq!(chunk.content_hash, content_hash(&chunk.content));
        }
    }

    /// The estimate's rule as its docs state it, per word and per
    /// character: each ASCII alphanumeric run costs 1 plus 1 per 5 further
    /// characters; each other character its own cost.
    fn estimate_tokens_by_the_rule(text: &str) -> usize {
        let runs: usize = text
            .split(|c: char| !c.is_ascii_alphanumeric())
            .filter(|run| !run.is_empty())
            .map(|run| 1 + (run.len() - 1) / 5)
            .sum();
        let others: usize = text
            .chars()
            .filter(|c| !c.is_ascii_alphanumeric())
            .map(|c| match c {
                c if c.is_ascii_punctuation() => 1,
                c if c.is_ascii() => 0,
                c => c.len_utf8(),
            })
            .sum();
        runs + others
    }

    proptest! {
        /// Counting bytes gives what the rule gives, for any
        /// text: ASCII words, punctuation, whitespace, controls, and
        /// characters of 2, 3 and 4 bytes next to words.
        #[test]
        fn estimate_by_bytes_is_the_per_character_rule(
            text in "([a-zA-Z0-9]{0,12}[ .,!?\n\t\u{1}é日😀\u{80}\u{7ff}\u{800}\u{ffff}\u{10000}]{0,3}){0,40}",
            any in any::<String>(),
        ) {
            prop_assert_eq!(estimate_tokens(&text), estimate_tokens_by_the_rule(&text));
            prop_assert_eq!(estimate_tokens(&any), estimate_tokens_by_the_rule(&any));
        }

        /// Nothing is lost: the chunks, stripped of the role prefixes the
        /// chunker adds, concatenate to the original content, and every chunk
        /// fits the budget.
        #[test]
        fn chunks_cover_text_exactly(text in "[a-zA-Z .,!?\\n日é😀]{0,600}", budget in 16usize..200) {
            let c = Conversation { transcript: Some(text.clone()), ..conversation(&[]) };
            let chunker = Chunker::new(budget + SPECIAL_TOKENS, 0);
            let chunks = chunker.chunk(&c);
            let joined: String = chunks.iter().map(|c| c.content.as_str()).collect();
            prop_assert_eq!(joined, text);
            for chunk in &chunks {
                prop_assert!(estimate_tokens(&chunk.content) <= chunker.budget());
            }
        }

        /// `halves` cuts anything longer than a character into two or more
        /// non-empty consecutive pieces, each shorter than the text.
        #[test]
        fn halves_keep_every_byte_and_shrink(text in "[a-z0-9 .!\n日😀\u{1}]{0,400}") {
            match halves(&text) {
                None => prop_assert!(text.chars().count() <= 1),
                Some(pieces) => {
                    prop_assert!(pieces.len() >= 2, "{:?}", pieces);
                    prop_assert_eq!(pieces.concat(), text.clone());
                    for p in &pieces {
                        prop_assert!(!p.is_empty() && p.len() < text.len());
                    }
                }
            }
        }

        /// Whatever the tokenizer, `fit_exactly` keeps every byte in order
        /// and leaves no piece the model would truncate (but single
        /// characters, which cannot be split).
        #[test]
        fn fit_exactly_covers_text_and_fits(text in "[a-z0-9 .\n日😀\u{1}]{0,400}", limit in 3usize..60) {
            let c = Conversation { transcript: Some(text.clone()), ..conversation(&[]) };
            let counter = PerByte(limit);
            let chunks = fit_exactly(Chunker::new(512, 0).chunk(&c), &counter);
            let joined: String = chunks.iter().map(|c| c.content.as_str()).collect();
            prop_assert_eq!(joined, text);
            for chunk in &chunks {
                prop_assert!(
                    counter.count_tokens(&chunk.content) <= limit || chunk.content.chars().count() == 1,
                    "{:?}", chunk.content
                );
            }
        }
    }
    #[test]
    fn chunk_units_finds_the_messages_of_each_chunk() {
        let c = conversation(&[
            ("user", "Where is my order ORD-88213? It was due on Monday."),
            (
                "assistant",
                "Let me check. user: this text quotes a prefix.",
            ),
            ("user", "Thanks. Also, can you change the address?"),
            ("assistant", "Done."),
        ]);
        let chunks = Chunker::new(20, 0).chunk(&c);
        assert!(chunks.len() > 2, "{chunks:?}");
        let units: Vec<(String, String)> = c
            .messages
            .iter()
            .map(|m| (format!("{}: ", m.role), format!("{}\n", m.content)))
            .collect();
        let units: Vec<(&str, &str)> = units
            .iter()
            .map(|(p, b)| (p.as_str(), b.as_str()))
            .collect();
        let texts: Vec<&str> = chunks.iter().map(|k| k.content.as_str()).collect();
        let ranges = chunk_units(&units, &texts).expect("aligned");
        assert_eq!(ranges.first(), Some(&(0, 0)));
        assert_eq!(ranges.last().map(|r| r.1), Some(3));
        for (chunk, (first, last)) in chunks.iter().zip(&ranges) {
            // Every line of the chunk is in one of its messages.
            for piece in chunk.content.split_inclusive('\n') {
                let words = piece.split_whitespace().last().unwrap_or_default();
                assert!(
                    (*first..=*last).any(
                        |i| c.messages[i].content.contains(words) || units[i].0.contains(words)
                    ),
                    "{piece:?} not in messages {first}..={last}"
                );
            }
        }
        // Not a cut of these messages.
        assert_eq!(chunk_units(&units, &["something else"]), None);
    }

    proptest! {
        #[test]
        fn chunk_units_ranges_are_ordered_and_cover_everything(
            messages in proptest::collection::vec(("(user|assistant)", "[a-z .:]{0,80}"), 1..8),
            budget in 16usize..60,
        ) {
            let pairs: Vec<(&str, &str)> = messages.iter().map(|(r, c)| (r.as_str(), c.as_str())).collect();
            let c = conversation(&pairs);
            let chunks = Chunker::new(budget + 4, 0).chunk(&c);
            let units: Vec<(String, String)> = c.messages.iter()
                .map(|m| (format!("{}: ", m.role), format!("{}\n", m.content))).collect();
            let units: Vec<(&str, &str)> = units.iter().map(|(p, b)| (p.as_str(), b.as_str())).collect();
            let texts: Vec<&str> = chunks.iter().map(|k| k.content.as_str()).collect();
            let ranges = chunk_units(&units, &texts);
            prop_assert!(ranges.is_some(), "{units:?} / {texts:?}");
            let ranges = ranges.unwrap_or_default();
            prop_assert_eq!(ranges.len(), chunks.len());
            prop_assert_eq!(ranges[0].0, 0);
            prop_assert_eq!(ranges[ranges.len() - 1].1, units.len() - 1);
            for w in ranges.windows(2) {
                prop_assert!(w[0].0 <= w[0].1 && w[0].1 <= w[1].0 && w[1].0 <= w[0].1 + 1, "{ranges:?}");
            }
        }
    }
}
