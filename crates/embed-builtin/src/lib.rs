//! The builtin backend: a sentence-transformers BERT model (by default
//! all-MiniLM-L6-v2, 384 dimensions) run on the CPU inside convstore, so
//! convstore embeds with no other service and no set-up beyond
//! `scripts/setup.sh`, which installs the model.
//!
//! ```text
//! embed(texts) ──► tokenize (refuse > max_seq_length) ──► plan batches by token budget
//!      ──► inference pool (≤ cores jobs, blocking threads) ──► BERT ──► mean pool ──► L2
//! ```
//!
//! The vectors are sentence-transformers' for the same model (cosine ≥ 0.999,
//! `tests/builtin.rs` against `tests/fixtures/builtin_parity/`), so they can
//! be mixed with Ollama's `all-minilm` in one router. Nothing is truncated:
//! an input over the model's `max_seq_length` is
//! [`EmbedError::TooLong`], and the chunker avoids sending one by asking
//! [`Embedder::token_counter`].

pub mod batching;
pub mod files;
pub mod model;
pub mod pool;
pub mod tokenize;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;

use self::files::ModelFiles;
use self::model::SentenceModel;
use self::pool::InferencePool;
use self::tokenize::{Encoded, ModelTokenizer};
use convstore_embed::answer::check_vectors;
use convstore_embed::{EmbedError, Embedder, ModelInfo, TokenCounter};
use convstore_telemetry::events::label;
use convstore_telemetry::metrics as m;

/// Embedded by `probe` to warm the model (first-touch of every weight page,
/// allocator warm-up) and to check its vectors' length.
const WARM_UP_TEXT: &str = "convstore warm-up: book a flight to Seattle on Friday.";

/// How the model is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuiltinOptions {
    /// Model batches run at once (the inference pool's size).
    pub threads: usize,
    /// Padded tokens (`inputs × longest input`) in one model batch: bounds
    /// the attention's memory (`12 heads × tokens × longest × 4 bytes` per
    /// layer) and keeps long inputs from being padded with short ones.
    pub max_batch_tokens: usize,
}

impl Default for BuiltinOptions {
    fn default() -> Self {
        Self {
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            max_batch_tokens: 4096,
        }
    }
}

/// A sentence-transformers model loaded once and shared; cheap to clone.
#[derive(Clone)]
pub struct BuiltinBackend {
    name: String,
    model_name: String,
    dir: PathBuf,
    dimensions: usize,
    tokenizer: Arc<ModelTokenizer>,
    model: Arc<SentenceModel>,
    pool: InferencePool,
    max_batch_tokens: usize,
    /// What the first successful probe found. The model is in process: it
    /// cannot go away or change, so later probes (the periodic health
    /// check) answer from here instead of queueing behind the inference
    /// pool, where a busy pool made a healthy backend look down.
    probed: Arc<std::sync::OnceLock<ModelInfo>>,
}

impl std::fmt::Debug for BuiltinBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuiltinBackend")
            .field("name", &self.name)
            .field("model", &self.model_name)
            .field("dir", &self.dir)
            .field("dimensions", &self.dimensions)
            .field("threads", &self.pool.size())
            .finish_non_exhaustive()
    }
}

impl BuiltinBackend {
    /// Loads the model for the backend `name`, serving it as `model` (the
    /// name stored with its vectors, e.g. `all-minilm`), with default
    /// options. `model_dir` is the configured directory; empty = the default
    /// places ([`files::default_model_dirs`], `state_dir/models/<model>`
    /// first). Blocking: reads and converts ~90 MB of weights (a few hundred
    /// ms); call it at start-up, not on a hot path.
    pub fn load(
        name: &str,
        model_dir: &str,
        model: &str,
        state_dir: &Path,
    ) -> Result<Self, EmbedError> {
        let dir = files::resolve_model_dir(model_dir, model, state_dir)?;
        Self::load_with(name, &dir, model, BuiltinOptions::default())
    }

    /// Loads the model in `model_dir` with explicit options.
    pub fn load_with(
        name: &str,
        model_dir: &Path,
        model: &str,
        options: BuiltinOptions,
    ) -> Result<Self, EmbedError> {
        let files = ModelFiles::read(model_dir)?;
        let tokenizer = ModelTokenizer::load(&files.tokenizer_path, files.max_seq_length)?;
        let encoder = SentenceModel::load(&files)?;
        Ok(Self {
            name: name.to_string(),
            model_name: model.to_string(),
            dir: files.dir.clone(),
            dimensions: files.dimensions,
            tokenizer: Arc::new(tokenizer),
            model: Arc::new(encoder),
            pool: InferencePool::new(options.threads),
            max_batch_tokens: options.max_batch_tokens.max(1),
            probed: Arc::default(),
        })
    }

    /// The same loaded model (weights and tokenizer shared, not copied)
    /// with an inference pool of its own, `threads` jobs at once: a second
    /// lane, for search queries, whose jobs do not queue behind this one's
    /// (see `convstore_embed::query`).
    pub fn with_own_pool(&self, threads: usize) -> Self {
        Self {
            pool: InferencePool::new(threads),
            ..self.clone()
        }
    }

    pub fn model_dir(&self) -> &Path {
        &self.dir
    }

    pub fn dimensions(&self) -> usize {
        self.dimensions
    }

    /// The longest input in tokens, special tokens included.
    pub fn max_tokens(&self) -> usize {
        self.tokenizer.max_tokens()
    }

    /// Tokens `text` costs, special tokens included.
    pub fn count_tokens(&self, text: &str) -> usize {
        self.tokenizer.count_tokens(text)
    }

    /// Runs one planned model batch on the pool.
    async fn run_batch(&self, batch: Vec<Encoded>) -> Result<Vec<Vec<f32>>, EmbedError> {
        let model = self.model.clone();
        let backend = self.name.clone();
        let real: usize = batch.iter().map(Encoded::len).sum();
        let padded = batch.iter().map(Encoded::len).max().unwrap_or(0) * batch.len();
        let vectors = self
            .pool
            .run(move || {
                let started = Instant::now();
                let refs: Vec<&Encoded> = batch.iter().collect();
                let result = model.embed(&refs);
                metrics::histogram!(m::BUILTIN_INFERENCE_SECONDS, label::BACKEND => backend)
                    .record(started.elapsed().as_secs_f64());
                result
            })
            .await?
            .map_err(|e| {
                EmbedError::ModelUnavailable(format!(
                    "builtin model `{}` failed to embed: {e}",
                    self.model_name
                ))
            })?;
        metrics::counter!(m::BUILTIN_TOKENS, label::BACKEND => self.name.clone(), label::KIND => "real")
            .increment(real as u64);
        metrics::counter!(m::BUILTIN_TOKENS, label::BACKEND => self.name.clone(), label::KIND => "padding")
            .increment(padded.saturating_sub(real) as u64);
        Ok(vectors)
    }
}

#[async_trait]
impl Embedder for BuiltinBackend {
    fn name(&self) -> &str {
        &self.name
    }

    fn model(&self) -> &str {
        &self.model_name
    }

    /// The first time, embeds one text through the whole path (pool,
    /// model, pooling): it warms the model before the daemon declares
    /// itself ready, and proves the vectors have the length the pooling
    /// config promises. Later, answers what that found, at once.
    async fn probe(&self) -> Result<ModelInfo, EmbedError> {
        if let Some(info) = self.probed.get() {
            return Ok(info.clone());
        }
        let text = [WARM_UP_TEXT.to_string()];
        let vectors = self.embed_unchecked(&text).await?;
        // Any dimension here, so a wrong one gets the message below.
        check_vectors(&self.name, text.len(), None, &vectors)?;
        let got = vectors.first().map_or(0, Vec::len);
        if got != self.dimensions {
            return Err(EmbedError::ModelUnavailable(format!(
                "builtin model in {} returns {got}-dimensional vectors, its pooling config says {}",
                self.dir.display(),
                self.dimensions
            )));
        }
        let info = ModelInfo {
            dimensions: self.dimensions,
            context_length: Some(self.max_tokens()),
        };
        let _ = self.probed.set(info.clone());
        Ok(info)
    }

    async fn embed(&self, inputs: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let vectors = self.embed_unchecked(inputs).await?;
        // The check every backend's vectors pass where they enter: a model
        // whose weights are corrupt, or a pooling that lost an input, must
        // fail like a broken remote backend, not store NaN or zero vectors.
        // Against the model's own dimension: one unlike
        // `embedding.dimensions` is refused by the health check and never
        // called, and a loaded model's dimension cannot change.
        check_vectors(&self.name, inputs.len(), Some(self.dimensions), &vectors)?;
        Ok(vectors)
    }

    fn token_counter(&self) -> Option<Arc<dyn TokenCounter>> {
        Some(self.tokenizer.clone())
    }
}

impl BuiltinBackend {
    /// The model's vectors for `inputs`, in order, before [`check_vectors`].
    async fn embed_unchecked(&self, inputs: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        let tokenizer = self.tokenizer.clone();
        let texts = inputs.to_vec();
        // Tokenizing costs ~µs per input, but tens of long inputs add up:
        // it runs on the pool too, off the runtime.
        let encoded = self
            .pool
            .run(move || {
                texts
                    .iter()
                    .map(|t| tokenizer.encode(t))
                    .collect::<Result<Vec<_>, _>>()
            })
            .await??;
        let lengths: Vec<usize> = encoded.iter().map(Encoded::len).collect();
        let plan = batching::plan(&lengths, self.max_batch_tokens);
        let mut slots: Vec<Option<Encoded>> = encoded.into_iter().map(Some).collect();
        let jobs = plan.iter().map(|indices| {
            let batch: Vec<Encoded> = indices.iter().filter_map(|&i| slots[i].take()).collect();
            self.run_batch(batch)
        });
        let results = futures::future::try_join_all(jobs).await?;
        let mut vectors: Vec<Vec<f32>> = vec![Vec::new(); inputs.len()];
        for (indices, batch_vectors) in plan.iter().zip(results) {
            for (&i, v) in indices.iter().zip(batch_vectors) {
                vectors[i] = v;
            }
        }
        Ok(vectors)
    }
}
