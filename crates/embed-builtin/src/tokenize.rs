//! The model's own tokenizer, used exactly as sentence-transformers uses it,
//! except that nothing is ever cut: an input longer than the model's
//! `max_seq_length` is refused, so the chunker (which asks
//! [`TokenCounter::count_tokens`]) can size chunks to fit instead.

use std::path::Path;

use tokenizers::Tokenizer;

use convstore_embed::{EmbedError, TokenCounter};

/// One input, tokenized: `[CLS] … [SEP]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
}

impl Encoded {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// A WordPiece tokenizer from `tokenizer.json`, with the longest input the
/// model reads.
pub struct ModelTokenizer {
    tokenizer: Tokenizer,
    max_tokens: usize,
}

impl ModelTokenizer {
    /// Loads `tokenizer.json`. The file's own truncation and padding
    /// (all-MiniLM-L6-v2's cuts at 128 and pads to 128) are switched off:
    /// batches are padded by the model code, and truncation never happens.
    pub fn load(path: &Path, max_tokens: usize) -> Result<Self, EmbedError> {
        let tokenizer = convstore_embed::tokenizer::load(path)
            .map_err(|e| EmbedError::ModelUnavailable(format!("builtin model: {e}")))?;
        Ok(Self {
            tokenizer,
            max_tokens,
        })
    }

    /// Tokenizes `text` with the special tokens; `TooLong` when it is
    /// longer than the model reads (sentence-transformers would silently
    /// drop the end).
    pub fn encode(&self, text: &str) -> Result<Encoded, EmbedError> {
        let encoding =
            self.tokenizer
                .encode_fast(text, true)
                .map_err(|e| EmbedError::Rejected {
                    status: 400,
                    message: format!("the builtin model's tokenizer refused the input: {e}"),
                })?;
        if encoding.len() > self.max_tokens {
            return Err(EmbedError::TooLong {
                status: 413,
                message: format!(
                    "input is {} tokens, the model reads at most {}; it would be truncated",
                    encoding.len(),
                    self.max_tokens
                ),
            });
        }
        Ok(Encoded {
            ids: encoding.get_ids().to_vec(),
            type_ids: encoding.get_type_ids().to_vec(),
        })
    }
}

impl TokenCounter for ModelTokenizer {
    fn count_tokens(&self, text: &str) -> usize {
        // A text the tokenizer cannot read counts as too long, so the
        // chunker splits it rather than sending it whole.
        self.tokenizer
            .encode_fast(text, true)
            .map_or(usize::MAX, |e| e.len())
    }

    fn max_tokens(&self) -> usize {
        self.max_tokens
    }
}
