//! Embedding: the `Embedder` trait every backend implements, the backends,
//! and the in-memory cache in front of them.
//!
//! Nothing here knows about HTTP ingress or the database.

pub mod answer;
pub mod cache;
pub mod ollama;
pub mod openai;
pub mod prefix;
pub mod query;
pub mod response;
pub mod router;
pub mod settings;
pub mod tokenizer;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::settings::{BackendSettings, EmbeddingSettings};

/// What a backend says about its model at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    /// Length of every vector the model returns.
    pub dimensions: usize,
    /// Tokens the model can read at once, when the backend says.
    pub context_length: Option<usize>,
}

/// What an HTTP backend client (Ollama, OpenAI-compatible) needs besides
/// its URL and model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientConfig {
    /// Bounds each HTTP call, from connecting to the last byte of the
    /// answer.
    pub timeout: Duration,
    /// `embedding.dimensions`: the length every vector of an embed call must
    /// have ([`answer::check_vectors`]).
    pub dimensions: usize,
    /// The most of one answer read into memory ([`response::read_body`]).
    pub max_response_bytes: u64,
}

impl ClientConfig {
    pub fn from_settings(embedding: &EmbeddingSettings, backend: &BackendSettings) -> Self {
        Self {
            timeout: Duration::from_millis(backend.timeout_ms.get()),
            dimensions: embedding.dimensions.get(),
            max_response_bytes: backend.max_response_bytes.get(),
        }
    }
}

/// Why an embedding call failed, sorted by what the caller should do next.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EmbedError {
    /// Connection refused, reset, DNS: the backend is not there. Retry later.
    #[error("backend unreachable: {0}")]
    Unreachable(String),
    /// No answer within the configured timeout. Retry later.
    #[error("backend timed out after {0:?}")]
    Timeout(Duration),
    /// The backend is overloaded or broken (429, 5xx). Retry later,
    /// after `retry_after` when it said so.
    #[error("backend busy or failing: HTTP {status}: {message}")]
    Transient {
        status: u16,
        message: String,
        retry_after: Option<Duration>,
    },
    /// The backend refused these inputs (400): retrying cannot help; one of
    /// the inputs is at fault.
    #[error("backend rejected the input: HTTP {status}: {message}")]
    Rejected { status: u16, message: String },
    /// The backend refused an input as longer than its model reads
    /// (Ollama's 400 "the input length exceeds the context length", an
    /// OpenAI-compatible server's "maximum context length", TEI's 413/422
    /// "must have less than N tokens"): the input is at fault, and a
    /// shorter one would be taken. The pipeline splits it
    /// (`convstore_core::chunker::halves`); it is never retried as is.
    #[error("backend refused an input as too long: HTTP {status}: {message}")]
    TooLong { status: u16, message: String },
    /// The model is missing or cannot embed (404, no embedding capability):
    /// an operator must act.
    #[error("model unavailable: {0}")]
    ModelUnavailable(String),
    /// The backend answered something that does not follow its protocol.
    #[error("backend broke protocol: {0}")]
    Protocol(String),
    /// The model's vectors are not as long as `embedding.dimensions`.
    #[error("model returns {got}-dimensional vectors but embedding.dimensions is {expected}")]
    DimensionMismatch { expected: usize, got: usize },
}

impl EmbedError {
    /// The error for a refused input (400, 413, 422): [`Self::TooLong`] when
    /// the backend says the input is over its length, else
    /// [`Self::Rejected`]. Backends word it differently (see
    /// `../shared/reference/embedding-apis.md`): Ollama's texts changed
    /// across versions but all say "context length"; OpenAI and vLLM say
    /// "maximum context length"; TEI says "must have less than N tokens".
    pub fn refused(status: u16, message: String) -> Self {
        let lower = message.to_ascii_lowercase();
        let too_long = lower.contains("context length")
            || lower.contains("context_length")
            || (lower.contains("tokens")
                && (lower.contains("less than")
                    || lower.contains("too long")
                    || lower.contains("maximum")
                    || lower.contains("exceed")))
            || lower.contains("input is too long");
        if too_long {
            Self::TooLong { status, message }
        } else {
            Self::Rejected { status, message }
        }
    }

    /// The input, not the backend, is at fault: another backend or a retry
    /// would refuse it too.
    pub fn is_input_refusal(&self) -> bool {
        matches!(self, Self::Rejected { .. } | Self::TooLong { .. })
    }

    /// Whether the same request may succeed later unchanged.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Unreachable(_) | Self::Timeout(_) | Self::Transient { .. }
        )
    }
}

/// One embedding backend serving one model.
#[async_trait]
pub trait Embedder: Send + Sync {
    /// The configured backend name (for logs and metric labels).
    fn name(&self) -> &str;

    /// The model this backend embeds with.
    fn model(&self) -> &str;

    /// Checks that the backend is up and serves an embedding model; returns
    /// its dimension and context length.
    async fn probe(&self) -> Result<ModelInfo, EmbedError>;

    /// Embeds `inputs` in order: one vector per input, checked where it
    /// entered the process by [`answer::check_vectors`] (count, configured
    /// dimension, finite, non-zero); callers do not check again.
    async fn embed(&self, inputs: &[String]) -> Result<Vec<Vec<f32>>, EmbedError>;

    /// The model's exact token counter, when this backend has the model's
    /// tokenizer in process (the builtin backend). The chunker uses it to
    /// re-cut any chunk its estimate let grow past the model's limit.
    fn token_counter(&self) -> Option<Arc<dyn TokenCounter>> {
        None
    }
}

pub use convstore_core::chunker::TokenCounter;
