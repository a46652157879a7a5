//! An Ollama stand-in: an in-project HTTP server that speaks Ollama's
//! embedding protocol (see `shared/reference/embedding-apis.md`) with a fake,
//! deterministic model, for tests and benchmarks on machines where a real
//! embedding server cannot run.
//!
//! What it serves:
//! - `GET|HEAD /` → `Ollama is running`; `GET|HEAD /api/version` →
//!   `{"version":"0.12.6"}`; `POST /api/show` → the model's metadata;
//!   `POST /api/embed` → vectors ([`ollama_api`]).
//! - `POST /v1/embeddings`, the OpenAI-compatible route, float or base64
//!   ([`openai_api`]).
//! - `/_standin/...`: counters and run-time faults ([`faults`]).
//!
//! The "model" returns [`standin_vector`] for each text: deterministic unit
//! vectors, so a test can recompute what should have been stored. Tokens are
//! counted with [`count_tokens`]; the context limit is enforced like Ollama
//! enforces it (cut silently, or 400 with `truncate: false`).
//!
//! Like Ollama with an embedding model, one instance computes one request at
//! a time: concurrent requests queue for a single compute slot, each holding
//! it for `latency_per_request + n_inputs × latency_per_input`. Throughput
//! therefore scales only with the number of instances, as with the real
//! server.
//!
//! In process: [`spawn`] (tests), [`serve`] or [`router`]. As a process:
//! `convstore standin --listen 127.0.0.1:0 ...` ([`cli`]), which prints
//! `listening on ADDR` as its first line on stdout.

pub mod cli;
mod engine;
pub mod faults;
pub mod ollama_api;
pub mod openai_api;
mod tokens;
pub mod vectors;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use faults::{CallCounts, FaultsUpdate, FaultsView, Outcomes, StandinStats};
pub use vectors::{count_tokens, standin_vector};

use faults::{FaultState, Faults};
use tokens::TokenRule;

/// The version `/api/version` reports: the one whose error texts the
/// reference documents and this stand-in reproduces.
pub const OLLAMA_VERSION: &str = "0.12.6";

/// Largest request body accepted. Ollama has no limit; axum's default (2 MiB)
/// would refuse big batches that Ollama takes.
const MAX_BODY_BYTES: usize = 256 << 20;

/// How a stand-in starts. The fault fields can be changed later with
/// [`Standin::set_faults`] or `POST /_standin/faults`.
#[derive(Debug, Clone, PartialEq)]
pub struct StandinConfig {
    /// The one model it serves, e.g. `nomic-embed-text`. Matched like
    /// Ollama: case-insensitive, and a missing tag means `:latest`.
    pub model: String,
    /// GGUF architecture name reported by `/api/show`; it prefixes the
    /// `model_info` keys (`<arch>.embedding_length`).
    pub architecture: String,
    /// Length of every vector.
    pub dimensions: usize,
    /// Further models it serves, with the length of their vectors, as an
    /// Ollama that has pulled several (`--also-serve NAME=DIMS`): same
    /// context, faults and compute slot.
    pub other_models: Vec<(String, usize)>,
    /// The model's context in tokens. As in Ollama, one token is kept for
    /// BOS/EOS, so an input may hold at most `context_length - 1` tokens
    /// (fewer if the request's `options.num_ctx` is smaller).
    pub context_length: usize,
    /// `capabilities` reported by `/api/show`; `None` leaves the field out,
    /// as Ollama before 0.9 did. `["completion"]` imitates a chat model.
    pub capabilities: Option<Vec<String>>,
    /// Compute time for every embedding request that has inputs.
    pub latency_per_request: Duration,
    /// Extra compute time per input text.
    pub latency_per_input: Duration,
    /// Every Nth embedding call fails with `failure_status` (0 = never).
    pub failure_every: u64,
    /// Share of embedding calls (0..=1) failing with `failure_status`,
    /// drawn from a stream seeded with `seed`.
    pub failure_rate: f64,
    /// Status of injected failures: 503 (Ollama overloaded), 500 (runner
    /// crashed), 429, 499...
    pub failure_status: u16,
    /// `Retry-After` in seconds on injected failures and while down.
    pub retry_after_secs: Option<u64>,
    /// Every route but `/_standin/` answers 503.
    pub down: bool,
    /// A request with an input containing any of these substrings fails
    /// whole with 400, as Ollama does when one input breaks the runner.
    pub poison: Vec<String>,
    /// Seed of the `failure_rate` stream.
    pub seed: u64,
    /// Count tokens with this `tokenizer.json` instead of the stand-in's
    /// rule (`--tokenizer`).
    pub tokenizer: Option<std::path::PathBuf>,
}

impl Default for StandinConfig {
    /// nomic-embed-text as Ollama serves it: 768 dimensions, 2048 tokens,
    /// no latency, no faults.
    fn default() -> Self {
        Self {
            model: "nomic-embed-text".into(),
            architecture: "nomic-bert".into(),
            dimensions: 768,
            other_models: Vec::new(),
            context_length: 2048,
            capabilities: Some(vec!["embedding".into()]),
            latency_per_request: Duration::ZERO,
            latency_per_input: Duration::ZERO,
            failure_every: 0,
            failure_rate: 0.0,
            failure_status: 503,
            retry_after_secs: None,
            down: false,
            poison: Vec::new(),
            seed: 0,
            tokenizer: None,
        }
    }
}

impl StandinConfig {
    /// Checks what the type cannot: sizes, rates and statuses in range.
    pub fn validate(&self) -> Result<(), String> {
        if self.model.trim().is_empty() {
            return Err("model must not be empty".into());
        }
        if self.dimensions == 0 {
            return Err("dimensions must be at least 1".into());
        }
        for (name, dims) in &self.other_models {
            if name.trim().is_empty() || *dims == 0 {
                return Err(format!(
                    "another model needs a name and at least 1 dimension, got `{name}={dims}`"
                ));
            }
        }
        if self.context_length < 2 {
            return Err("context_length must be at least 2 (one token is kept for BOS/EOS)".into());
        }
        if let Some(path) = &self.tokenizer {
            TokenRule::load(path)?;
        }
        self.faults().validate()
    }

    fn faults(&self) -> Faults {
        Faults {
            latency_per_request: self.latency_per_request,
            latency_per_input: self.latency_per_input,
            failure_every: self.failure_every,
            failure_rate: self.failure_rate,
            failure_status: self.failure_status,
            retry_after_secs: self.retry_after_secs,
            down: self.down,
            poison: self.poison.clone(),
            seed: self.seed,
        }
    }
}

/// What every handler shares: the model, the faults, the counters and the
/// single compute slot.
#[derive(Debug)]
pub(crate) struct Shared {
    model: String,
    architecture: String,
    dimensions: usize,
    other_models: Vec<(String, usize)>,
    context_length: usize,
    capabilities: Option<Vec<String>>,
    tokens: TokenRule,
    faults: Mutex<FaultState>,
    stats: Mutex<StandinStats>,
    /// Held while "computing": one request at a time, like an Ollama runner
    /// for an embedding model (loaded with parallel = 1).
    compute: tokio::sync::Mutex<()>,
    in_flight: AtomicU64,
}

/// A stand-in instance: cheap to clone, shared by its router and by tests
/// that read its counters or change its faults in process.
#[derive(Debug, Clone)]
pub struct Standin {
    shared: Arc<Shared>,
}

impl Standin {
    /// A stand-in with `config`. Out-of-range values are clamped to the
    /// nearest valid ones rather than refused, so tests can build one
    /// without error handling; use [`StandinConfig::validate`] (as the CLI
    /// does) to refuse them.
    pub fn new(config: StandinConfig) -> Self {
        let mut faults = config.faults();
        faults.failure_rate = faults.failure_rate.clamp(0.0, 1.0);
        if faults.failure_rate.is_nan() {
            faults.failure_rate = 0.0;
        }
        if !(400..=599).contains(&faults.failure_status) {
            faults.failure_status = 503;
        }
        faults.poison.retain(|p| !p.is_empty());
        let tokens = match &config.tokenizer {
            None => TokenRule::Standin,
            Some(path) => TokenRule::load(path).unwrap_or_else(|e| {
                tracing::error!(error = %e, "Counting tokens by the stand-in's rule instead");
                TokenRule::Standin
            }),
        };
        Self {
            shared: Arc::new(Shared {
                model: config.model,
                architecture: config.architecture,
                dimensions: config.dimensions.max(1),
                other_models: config
                    .other_models
                    .into_iter()
                    .map(|(name, dims)| (name, dims.max(1)))
                    .collect(),
                context_length: config.context_length.max(2),
                capabilities: config.capabilities,
                tokens,
                faults: Mutex::new(FaultState::new(faults)),
                stats: Mutex::new(StandinStats::default()),
                compute: tokio::sync::Mutex::new(()),
                in_flight: AtomicU64::new(0),
            }),
        }
    }

    /// Every route: Ollama's, the OpenAI-compatible one and `/_standin/`.
    pub fn router(&self) -> Router {
        Router::new()
            .merge(ollama_api::routes())
            .merge(openai_api::routes())
            .merge(faults::routes())
            .fallback(ollama_api::not_found)
            .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
            .with_state(Arc::clone(&self.shared))
    }

    /// Serves on `listener` until `shutdown` completes, then finishes the
    /// requests in flight.
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await
    }

    /// Counters since start or the last reset.
    pub fn stats(&self) -> StandinStats {
        self.shared.stats()
    }

    /// Zeroes the counters; returns what they were.
    pub fn reset_stats(&self) -> StandinStats {
        self.shared.reset_stats()
    }

    /// The current faults.
    pub fn faults(&self) -> FaultsView {
        self.shared.faults()
    }

    /// Changes the faults (absent fields stay) and restarts the failure
    /// sequence; refuses out-of-range values and then changes nothing.
    pub fn set_faults(&self, update: FaultsUpdate) -> Result<FaultsView, String> {
        self.shared.set_faults(update)
    }
}

impl Shared {
    pub(crate) fn stats(&self) -> StandinStats {
        lock(&self.stats).clone()
    }

    pub(crate) fn reset_stats(&self) -> StandinStats {
        std::mem::take(&mut *lock(&self.stats))
    }

    pub(crate) fn faults(&self) -> FaultsView {
        lock(&self.faults).view()
    }

    pub(crate) fn set_faults(&self, update: FaultsUpdate) -> Result<FaultsView, String> {
        lock(&self.faults).apply(update)
    }
}

/// Locks a std mutex, ignoring poisoning: every critical section here only
/// bumps counters or swaps a value, so a panic cannot leave it half-done.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The router of a fresh stand-in with `config`.
pub fn router(config: StandinConfig) -> Router {
    Standin::new(config).router()
}

/// Serves a fresh stand-in with `config` on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    config: StandinConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    Standin::new(config).serve(listener, shutdown).await
}

/// A stand-in serving on a loopback port in this process, for tests. It
/// stops when [`SpawnedStandin::stop`] is called or when it is dropped.
#[derive(Debug)]
pub struct SpawnedStandin {
    /// Where it listens (127.0.0.1, a free port).
    pub addr: SocketAddr,
    /// The instance, for its counters and faults.
    pub standin: Standin,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl SpawnedStandin {
    /// `http://127.0.0.1:PORT`, the base URL to give a client.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops listening and waits until the server is gone: afterwards,
    /// connections to [`Self::addr`] are refused (a backend that is down).
    /// Requests in flight are finished first.
    pub async fn stop(mut self) -> std::io::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => task.await.map_err(std::io::Error::other)?,
            None => Ok(()),
        }
    }
}

impl Drop for SpawnedStandin {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Starts a stand-in with `config` on `127.0.0.1:0` in the current runtime.
pub async fn spawn(config: StandinConfig) -> std::io::Result<SpawnedStandin> {
    let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    let standin = Standin::new(config);
    let (stop, stopped) = oneshot::channel::<()>();
    let server = standin.clone();
    let task = tokio::spawn(async move {
        server
            .serve(listener, async move {
                let _ = stopped.await;
            })
            .await
    });
    Ok(SpawnedStandin {
        addr,
        standin,
        stop: Some(stop),
        task: Some(task),
    })
}
