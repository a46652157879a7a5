//! How the stand-in counts tokens: by its own rule ([`count_tokens`], never
//! more than convstore's estimate), or, with `--tokenizer`, by a real
//! `tokenizer.json` (WordPiece/BPE), which counts ids, code and short
//! alphanumeric words at more than any estimate: what makes a real backend
//! refuse a chunk the estimate let through.

use std::path::Path;

use tokenizers::Tokenizer;

use crate::vectors::{count_tokens, truncate_to_tokens};

#[derive(Debug)]
pub(crate) enum TokenRule {
    Standin,
    Tokenizer(Box<Tokenizer>),
}

impl TokenRule {
    /// The tokenizer at `path`, padding and truncation off.
    pub(crate) fn load(path: &Path) -> Result<Self, String> {
        let mut tokenizer = Tokenizer::from_file(path)
            .map_err(|e| format!("cannot load the tokenizer {}: {e}", path.display()))?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| format!("cannot switch off truncation in {}: {e}", path.display()))?;
        Ok(Self::Tokenizer(Box::new(tokenizer)))
    }

    /// Tokens `text` costs, special tokens included.
    pub(crate) fn count(&self, text: &str) -> usize {
        match self {
            Self::Standin => count_tokens(text),
            Self::Tokenizer(t) => t.encode_fast(text, true).map_or(usize::MAX, |e| e.len()),
        }
    }

    /// The longest prefix of `text` within `limit` tokens (Ollama's
    /// `truncate: true`).
    pub(crate) fn truncate<'a>(&self, text: &'a str, limit: usize) -> &'a str {
        match self {
            Self::Standin => truncate_to_tokens(text, limit),
            Self::Tokenizer(t) => {
                let Ok(encoding) = t.encode_fast(text, true) else {
                    return "";
                };
                // Byte offsets; special tokens have an empty span. Keep
                // one place for the closing special token.
                let end = encoding
                    .get_offsets()
                    .iter()
                    .take(limit.saturating_sub(1))
                    .map(|&(_, end)| end)
                    .max()
                    .unwrap_or(0);
                let mut end = end.min(text.len());
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                text[..end].trim_end()
            }
        }
    }
}
