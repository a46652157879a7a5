//! Counting tokens with the model's own tokenizer (`tokenizer.json`, the
//! Hugging Face format every sentence-transformers and most Ollama/TEI
//! models ship), for an HTTP backend whose server does not say how it
//! counts. With it the chunker cuts chunks the backend takes the first
//! time (`convstore_core::chunker::fit_exactly`), instead of learning from
//! its refusals.
//!
//! [`load`] is also how the builtin model reads its tokenizer: the file's
//! own padding and truncation are switched off, because nothing here may
//! cut text silently.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use tokenizers::Tokenizer;

use crate::{EmbedError, Embedder, ModelInfo, TokenCounter};

/// Loads `path` with padding and truncation off.
pub fn load(path: &Path) -> Result<Tokenizer, String> {
    let mut tokenizer = Tokenizer::from_file(path)
        .map_err(|e| format!("cannot load the tokenizer {}: {e}", path.display()))?;
    tokenizer.with_padding(None);
    tokenizer
        .with_truncation(None)
        .map_err(|e| format!("cannot switch off truncation in {}: {e}", path.display()))?;
    Ok(tokenizer)
}

/// A backend's token counter from its `tokenizer` file. The limit is the
/// context its last probe reported, less the one token Ollama keeps for
/// BOS/EOS (`../shared/reference/embedding-apis.md` §1); until a probe
/// reports one, nothing is re-cut by it (the estimate's cut stands).
pub struct FileTokenCounter {
    tokenizer: Tokenizer,
    max_tokens: AtomicUsize,
}

impl FileTokenCounter {
    pub fn load(path: &Path) -> Result<Self, String> {
        Ok(Self {
            tokenizer: load(path)?,
            max_tokens: AtomicUsize::new(usize::MAX),
        })
    }

    fn set_context(&self, context_length: usize) {
        self.max_tokens
            .store(context_length.saturating_sub(1).max(1), Ordering::Relaxed);
    }
}

impl TokenCounter for FileTokenCounter {
    fn count_tokens(&self, text: &str) -> usize {
        // A text this tokenizer cannot read is counted by the estimate:
        // the backend's own tokenizer may read it, and if it refuses it
        // for its length the pipeline splits it then.
        self.tokenizer.encode_fast(text, true).map_or_else(
            |_| convstore_core::chunker::estimate_tokens(text),
            |e| e.len(),
        )
    }

    fn max_tokens(&self) -> usize {
        self.max_tokens.load(Ordering::Relaxed)
    }
}

/// A backend client with a token counter from a file: everything is the
/// client's, but [`Embedder::token_counter`], and every probe tells the
/// counter the context the server reports.
pub struct WithTokenizer {
    inner: Arc<dyn Embedder>,
    counter: Arc<FileTokenCounter>,
}

impl WithTokenizer {
    pub fn new(inner: Arc<dyn Embedder>, counter: Arc<FileTokenCounter>) -> Self {
        Self { inner, counter }
    }
}

#[async_trait]
impl Embedder for WithTokenizer {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn model(&self) -> &str {
        self.inner.model()
    }

    async fn probe(&self) -> Result<ModelInfo, EmbedError> {
        let info = self.inner.probe().await?;
        if let Some(context) = info.context_length {
            self.counter.set_context(context);
        }
        Ok(info)
    }

    async fn embed(&self, inputs: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        self.inner.embed(inputs).await
    }

    fn token_counter(&self) -> Option<Arc<dyn TokenCounter>> {
        Some(self.counter.clone())
    }
}
