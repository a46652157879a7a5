//! The builtin backend: a sentence-transformers BERT model (by default
//! all-MiniLM-L6-v2, 384 dimensions) run on the CPU inside convstore, so
//! convstore embeds with no other service and no set-up beyond
//! `scripts/setup.sh`, which installs the model.
//!
//! ```text
//! embed(texts) ──► tokenize (refuse > max_seq_length)
//!      ──► scheduler: merged with concurrent calls, batched by length within a padded-token budget
//!      ──► inference threads (one per core) ──► engine: OpenVINO (bf16/f32) or candle (f32)
//!      ──► BERT ──► mean pool ──► L2
//! ```
//!
//! The engine is chosen at load ([`engine`]): OpenVINO where its runtime is
//! installed (bf16 on CPUs with AMX or AVX512-BF16), candle otherwise.
//!
//! The vectors are sentence-transformers' for the same model (cosine ≥ 0.999,
//! `tests/builtin.rs` against `tests/fixtures/builtin_parity/`), so they can
//! be mixed with Ollama's `all-minilm` in one router. Nothing is truncated:
//! an input over the model's `max_seq_length` is
//! [`EmbedError::TooLong`], and the chunker avoids sending one by asking
//! [`Embedder::token_counter`].

pub mod batching;
pub mod engine;
pub mod files;
pub mod model;
pub mod openvino;
pub mod scheduler;
pub mod tokenize;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use self::engine::{Engine, EngineOptions};
use self::files::ModelFiles;
use self::scheduler::Scheduler;
use self::tokenize::{Encoded, ModelTokenizer};
use convstore_embed::answer::check_vectors;
use convstore_embed::{EmbedError, Embedder, ModelInfo, TokenCounter};
use convstore_telemetry::events::label;
use convstore_telemetry::metrics as m;

/// Embedded by `probe` to warm the model (first-touch of every weight page,
/// allocator warm-up) and to check its vectors' length.
const WARM_UP_TEXT: &str = "convstore warm-up: book a flight to Seattle on Friday.";

/// How the model is run.
#[derive(Debug, Clone)]
pub struct BuiltinOptions {
    /// Which engine, at which precision ([`engine`]).
    pub engine: EngineOptions,
    /// Model batches run at once: inference threads, and OpenVINO streams
    /// of one thread each.
    pub threads: usize,
    /// Padded tokens (`inputs × longest input`) in one model batch: bounds
    /// the attention's memory (`heads × tokens × longest × 4 bytes` per
    /// layer) and keeps long inputs from being padded with short ones.
    pub max_batch_tokens: usize,
    /// How long a free inference thread waits for concurrent calls to merge
    /// with ([`scheduler`]).
    pub linger: Duration,
}

impl Default for BuiltinOptions {
    fn default() -> Self {
        Self {
            engine: EngineOptions::default(),
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            max_batch_tokens: 2048,
            linger: scheduler::DEFAULT_LINGER,
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
    engine: Arc<Engine>,
    scheduler: Scheduler,
    options: BuiltinOptions,
    /// Why OpenVINO was not used when `engine = "auto"` fell back to candle.
    fallback_reason: Option<String>,
    /// What the first successful probe found. The model is in process: it
    /// cannot go away or change, so later probes (the periodic health
    /// check) answer from here instead of queueing behind inference, where
    /// a busy model made a healthy backend look down.
    probed: Arc<std::sync::OnceLock<ModelInfo>>,
}

impl std::fmt::Debug for BuiltinBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuiltinBackend")
            .field("name", &self.name)
            .field("model", &self.model_name)
            .field("dir", &self.dir)
            .field("dimensions", &self.dimensions)
            .field("engine", &self.engine)
            .field("threads", &self.scheduler.threads())
            .finish_non_exhaustive()
    }
}

impl BuiltinBackend {
    /// Loads the model for the backend `name`, serving it as `model` (the
    /// name stored with its vectors, e.g. `all-minilm`), on the engine
    /// `engine` asks for. `model_dir` is the configured directory; empty =
    /// the default places ([`files::default_model_dirs`],
    /// `state_dir/models/<model>` first). Blocking: reads ~90 MB of weights
    /// and compiles or converts them (a second or two); call it at
    /// start-up, not on a hot path.
    pub fn load(
        name: &str,
        model_dir: &str,
        model: &str,
        state_dir: &Path,
        engine: EngineOptions,
    ) -> Result<Self, EmbedError> {
        let dir = files::resolve_model_dir(model_dir, model, state_dir)?;
        let options = BuiltinOptions {
            engine,
            ..BuiltinOptions::default()
        };
        Self::load_with(name, &dir, model, state_dir, options)
    }

    /// Loads the model in `model_dir` with explicit options.
    pub fn load_with(
        name: &str,
        model_dir: &Path,
        model: &str,
        state_dir: &Path,
        options: BuiltinOptions,
    ) -> Result<Self, EmbedError> {
        let files = ModelFiles::read(model_dir)?;
        let tokenizer = ModelTokenizer::load(&files.tokenizer_path, files.max_seq_length)?;
        let threads = options.threads.max(1);
        let (dir, dimensions) = (files.dir.clone(), files.dimensions);
        let (engine, fallback_reason) = Engine::load(files, &options.engine, state_dir, threads)
            .map_err(|e| {
                EmbedError::ModelUnavailable(format!("builtin model in {}: {e}", dir.display()))
            })?;
        let engine = Arc::new(engine);
        let scheduler = Scheduler::start(
            engine.clone(),
            name,
            threads,
            options.max_batch_tokens,
            options.linger,
        )?;
        metrics::gauge!(
            m::BUILTIN_ENGINE,
            label::BACKEND => name.to_string(),
            label::ENGINE => engine.name(),
            label::PRECISION => engine.precision().as_str()
        )
        .set(1.0);
        Ok(Self {
            name: name.to_string(),
            model_name: model.to_string(),
            dir,
            dimensions,
            tokenizer: Arc::new(tokenizer),
            engine,
            scheduler,
            options,
            fallback_reason,
            probed: Arc::default(),
        })
    }

    /// The same loaded model (weights, compiled engine and tokenizer
    /// shared, not copied) with inference threads of its own, `threads` of
    /// them: a second lane, for search queries, whose batches do not queue
    /// behind this one's (see `convstore_embed::query`).
    pub fn with_own_threads(&self, threads: usize) -> Result<Self, EmbedError> {
        let scheduler = Scheduler::start(
            self.engine.clone(),
            &self.name,
            threads,
            self.options.max_batch_tokens,
            self.options.linger,
        )?;
        Ok(Self {
            scheduler,
            ..self.clone()
        })
    }

    pub fn model_dir(&self) -> &Path {
        &self.dir
    }

    pub fn dimensions(&self) -> usize {
        self.dimensions
    }

    /// The engine the model runs on: `openvino` or `candle`.
    pub fn engine(&self) -> &'static str {
        self.engine.name()
    }

    /// The precision it computes in: `bf16` or `f32`.
    pub fn precision(&self) -> &'static str {
        self.engine.precision().as_str()
    }

    /// Why `engine = "auto"` runs on candle, when it does.
    pub fn fallback_reason(&self) -> Option<&str> {
        self.fallback_reason.as_deref()
    }

    /// The longest input in tokens, special tokens included.
    pub fn max_tokens(&self) -> usize {
        self.tokenizer.max_tokens()
    }

    /// Tokens `text` costs, special tokens included.
    pub fn count_tokens(&self, text: &str) -> usize {
        self.tokenizer.count_tokens(text)
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

    /// The first time, embeds one text through the whole path (scheduler,
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
        // off the runtime's threads.
        let encoded: Vec<Encoded> = tokio::task::spawn_blocking(move || {
            texts
                .iter()
                .map(|t| tokenizer.encode(t))
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|e| {
            EmbedError::ModelUnavailable(format!("builtin model: tokenizing failed: {e}"))
        })??;
        self.scheduler.embed(encoded).await
    }
}
