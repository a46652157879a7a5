//! The router: spreads embedding calls over every configured backend and
//! survives any of them failing. It is itself an [`Embedder`], so the
//! pipeline (and anything else that embeds) does not know how many backends
//! there are.
//!
//! It is built from small layers, each an [`Embedder`] wrapping the next,
//! each with its heuristic in its own module:
//!
//! ```text
//! Router
//!  └─ retry    (backoff with full jitter, until embedding.max_wait_ms)   retry.rs
//!      └─ balance  (strategy pick among callable backends; fail-over)    balance.rs, strategy.rs
//!          └─ per backend:
//!              pack       (requests within max_batch_tokens)             pack.rs
//!              └─ breaker     (closed → open → half-open trial → closed)  breaker.rs
//!                  └─ pace        (requests/tokens per minute)            pace.rs
//!                      └─ limit       (max_in_flight; outstanding count)  limit.rs
//!                          └─ instrument  (metrics; latency EWMA)         instrument.rs
//!                              └─ timeout     (timeout_ms)                timeout.rs
//!                                  └─ client  (ollama / openai / builtin)
//! ```
//!
//! The clients return only vectors that passed [`crate::answer::check_vectors`]
//! (count, dimension, finite, non-zero), so no layer checks them again; a
//! bad answer comes up as an error of that backend, which the breaker
//! counts and the balancer fails over from.
//!
//! Beside the call path, [`health`] probes each backend at start-up and
//! periodically (up, refused for a wrong dimension, context length).

pub mod balance;
pub mod breaker;
pub mod health;
pub mod instrument;
pub mod limit;
pub mod pace;
pub mod pack;
pub mod retry;
pub mod strategy;
pub mod timeout;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;

use crate::settings::{BackendSettings, EmbeddingSettings, Strategy as StrategyName};

use self::balance::Balancer;
use self::breaker::{Breaker, BreakerConfig, BreakerLayer, CircuitState};
use self::health::BackendCheck;
use self::instrument::{Ewma, InstrumentLayer};
use self::limit::{LimitLayer, Load};
use self::pace::{PaceConfig, PaceLayer};
use self::pack::PackLayer;
use self::retry::{RetryConfig, RetryLayer};
use self::timeout::TimeoutLayer;
use super::{EmbedError, Embedder, ModelInfo, TokenCounter};

/// The router's settings (from `[embedding]`).
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// The model every backend serves (the stored `model`, the cache key).
    pub model: String,
    pub dimensions: usize,
    pub strategy: StrategyName,
    pub retry: RetryConfig,
    pub breaker: BreakerConfig,
}

impl RouterConfig {
    pub fn from_settings(settings: &EmbeddingSettings) -> Self {
        Self {
            model: settings.model.clone(),
            dimensions: settings.dimensions.get(),
            strategy: settings.strategy,
            retry: RetryConfig {
                initial: Duration::from_millis(settings.retry_initial_ms.get()),
                max: Duration::from_millis(settings.retry_max_ms.get()),
                max_wait: Duration::from_millis(settings.max_wait_ms.get()),
            },
            breaker: BreakerConfig {
                failures: settings.breaker_failures.get(),
                open_for: Duration::from_millis(settings.breaker_open_ms.get()),
                max_open_for: Duration::from_millis(settings.breaker_max_open_ms.get()),
            },
        }
    }
}

/// One backend to route to: its client and its limits.
pub struct BackendSpec {
    pub client: Arc<dyn Embedder>,
    pub weight: u32,
    pub max_in_flight: usize,
    pub timeout: Duration,
    /// Most tokens in one request (0 = no limit).
    pub max_batch_tokens: usize,
    pub pace: PaceConfig,
}

impl BackendSpec {
    pub fn from_settings(client: Arc<dyn Embedder>, settings: &BackendSettings) -> Self {
        Self {
            client,
            weight: settings.weight.get(),
            max_in_flight: settings.max_in_flight.get(),
            timeout: Duration::from_millis(settings.timeout_ms.get()),
            max_batch_tokens: settings.max_batch_tokens,
            pace: PaceConfig {
                requests_per_minute: settings.requests_per_minute,
                tokens_per_minute: settings.tokens_per_minute,
            },
        }
    }
}

/// What the last health check said about a backend.
#[derive(Debug, Default)]
struct HealthDetail {
    checked: bool,
    info: Option<ModelInfo>,
    refused: Option<String>,
    last_error: Option<String>,
}

#[derive(Debug, Default)]
pub(crate) struct Health {
    up: AtomicBool,
    detail: Mutex<HealthDetail>,
}

impl Health {
    fn lock(&self) -> MutexGuard<'_, HealthDetail> {
        self.detail.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    pub(crate) fn was_checked(&self) -> bool {
        self.lock().checked
    }

    pub(crate) fn refused(&self) -> Option<String> {
        self.lock().refused.clone()
    }

    pub(crate) fn set_ok(&self, info: ModelInfo) {
        let mut d = self.lock();
        d.checked = true;
        d.info = Some(info);
        d.refused = None;
        d.last_error = None;
        self.up.store(true, Ordering::Relaxed);
    }

    pub(crate) fn set_refused(&self, info: ModelInfo, reason: String) {
        let mut d = self.lock();
        d.checked = true;
        d.info = Some(info);
        d.refused = Some(reason);
        self.up.store(false, Ordering::Relaxed);
    }

    /// A failed probe: down, but a refusal stands until a probe shows the
    /// right dimension.
    pub(crate) fn set_error(&self, error: String) {
        let mut d = self.lock();
        d.checked = true;
        d.last_error = Some(error);
        self.up.store(false, Ordering::Relaxed);
    }
}

/// One backend: its layered call stack and the state the balancer, the
/// health check and the status view read.
pub struct Backend {
    pub name: String,
    pub model: String,
    pub weight: u32,
    /// The bare client behind a timeout: for probes.
    client: Arc<dyn Embedder>,
    /// pack → breaker → pace → limit → instrument → timeout → client.
    stack: Arc<dyn Embedder>,
    breaker: Arc<Breaker>,
    load: Arc<Load>,
    latency: Arc<Ewma>,
    health: Health,
    /// What its length refusals taught (estimated tokens an input may
    /// cost), `usize::MAX` until it refuses one ([`Self::learn_from_length_refusal`]).
    learned_context: AtomicUsize,
}

/// The least a length refusal can shrink a backend's budget to, as a share
/// of its context (one strange input, say a long id run that costs 5× its
/// estimate, must not make every later chunk tiny), and in tokens.
const LEARNED_FLOOR_DIVISOR: usize = 8;
const LEARNED_FLOOR_TOKENS: usize = 32;

impl Backend {
    fn new(spec: BackendSpec, breaker: BreakerConfig) -> Self {
        let name = spec.client.name().to_string();
        let model = spec.client.model().to_string();
        let breaker = Arc::new(Breaker::new(name.clone(), breaker));
        let load = Arc::new(Load::new(name.clone(), spec.max_in_flight));
        let latency = Arc::new(Ewma::default());
        let timed: Arc<dyn Embedder> =
            Arc::new(TimeoutLayer::new(spec.client.clone(), spec.timeout));
        let instrumented: Arc<dyn Embedder> =
            Arc::new(InstrumentLayer::new(timed, latency.clone()));
        let limited: Arc<dyn Embedder> = Arc::new(LimitLayer::new(instrumented, load.clone()));
        let paced: Arc<dyn Embedder> = if spec.pace.is_off() {
            limited
        } else {
            Arc::new(PaceLayer::new(limited, spec.pace))
        };
        let guarded: Arc<dyn Embedder> = Arc::new(BreakerLayer::new(paced, breaker.clone()));
        let stack: Arc<dyn Embedder> = Arc::new(PackLayer::new(guarded, spec.max_batch_tokens));
        Self {
            client: Arc::new(TimeoutLayer::new(spec.client, spec.timeout)),
            name,
            model,
            weight: spec.weight.max(1),
            stack,
            breaker,
            load,
            latency,
            health: Health::default(),
            learned_context: AtomicUsize::new(usize::MAX),
        }
    }

    /// A length refusal of `inputs` says inputs estimated as long as the
    /// longest of them do not fit here: later chunks are cut to half of
    /// that (never below the floor), the size the pipeline then tries for
    /// the refused chunk's pieces. Halving converges in a few refusals even
    /// for text the estimate undercounts several times over (ids, code);
    /// prose, which the estimate overcounts, is rarely refused at all. The
    /// estimate is what the chunker cuts by, so the budget is kept in its
    /// units, whatever the backend's tokenizer.
    ///
    /// Only a refusal that says something about the budget teaches: one
    /// input (in a request of several, the culprit is unknown), of at
    /// least three quarters of the current budget by the estimate: a chunk
    /// the chunker cut to the budget. The halves the pipeline sends of a
    /// refused chunk, or text the estimate counts as almost free, must not
    /// drag the budget down step by step.
    fn learn_from_length_refusal(&self, inputs: &[String]) {
        let [input] = inputs else {
            return;
        };
        let longest = convstore_core::chunker::estimate_tokens(input);
        if self
            .chunk_budget()
            .is_some_and(|budget| longest < budget / 4 * 3)
        {
            return;
        }
        let context = self.context_length();
        let floor = context.map_or(LEARNED_FLOOR_TOKENS, |c| {
            (c / LEARNED_FLOOR_DIVISOR).max(LEARNED_FLOOR_TOKENS)
        });
        let learned = (longest / 2).max(floor);
        let before = self.learned_context.fetch_min(learned, Ordering::Relaxed);
        if learned < before {
            tracing::info!(
                backend = %self.name,
                refused_estimate = longest,
                context_tokens = ?context,
                budget = learned,
                "Backend refused an input as too long; cutting later chunks smaller for it"
            );
        }
    }

    /// The context its last probe reported.
    fn context_length(&self) -> Option<usize> {
        self.health
            .lock()
            .info
            .as_ref()
            .and_then(|i| i.context_length)
    }

    /// What a chunk may cost when it goes to this backend: the smaller of
    /// its reported context and what its refusals taught; `None` when it
    /// knows neither, or it is refused (another dimension).
    fn chunk_budget(&self) -> Option<usize> {
        let detail = self.health.lock();
        if detail.refused.is_some() {
            return None;
        }
        let reported = detail.info.as_ref().and_then(|i| i.context_length);
        let learned =
            Some(self.learned_context.load(Ordering::Relaxed)).filter(|&l| l != usize::MAX);
        match (reported, learned) {
            (Some(r), Some(l)) => Some(r.min(l)),
            (r, l) => r.or(l),
        }
    }

    /// Whether the balancer may send it a call now.
    fn can_take_calls(&self) -> bool {
        self.health.refused().is_none() && self.breaker.would_admit()
    }

    /// Up (last probe fine), not refused, circuit not open: counts for
    /// readiness.
    fn is_ready(&self) -> bool {
        self.health.is_up()
            && self.health.refused().is_none()
            && self.breaker.state() != CircuitState::Open
    }

    fn unavailable_reason(&self) -> String {
        if let Some(reason) = self.health.refused() {
            return format!("refused: {reason}");
        }
        match self.breaker.state() {
            CircuitState::Open => "circuit open".into(),
            CircuitState::HalfOpen if !self.breaker.would_admit() => "trial call in flight".into(),
            _ if !self.breaker.would_admit() => "holding back for Retry-After".into(),
            _ => "tried".into(),
        }
    }

    fn status(&self) -> BackendStatus {
        let detail = self.health.lock();
        BackendStatus {
            name: self.name.clone(),
            model: self.model.clone(),
            weight: self.weight,
            up: self.health.is_up(),
            ready: self.health.is_up()
                && detail.refused.is_none()
                && self.breaker.state() != CircuitState::Open,
            refused: detail.refused.clone(),
            circuit: self.breaker.state(),
            in_flight: self.load.running(),
            outstanding: self.load.outstanding(),
            max_in_flight: self.load.max_in_flight(),
            latency_ms: self.latency.get().map(|s| s * 1000.0),
            dimensions: detail.info.as_ref().map(|i| i.dimensions),
            context_length: detail.info.as_ref().and_then(|i| i.context_length),
            learned_context: Some(self.learned_context.load(Ordering::Relaxed))
                .filter(|&l| l != usize::MAX),
            last_error: detail.last_error.clone(),
        }
    }
}

/// A backend as `/v1/stats` and logs show it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BackendStatus {
    pub name: String,
    pub model: String,
    pub weight: u32,
    /// The last health probe succeeded with the right dimension.
    pub up: bool,
    /// Up, not refused and circuit not open: counts for readiness.
    pub ready: bool,
    /// Why it gets no calls, when it answered with another dimension.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    pub circuit: CircuitState,
    /// Calls running at the backend.
    pub in_flight: usize,
    /// Calls running or waiting for an in-flight slot.
    pub outstanding: usize,
    pub max_in_flight: usize,
    /// EWMA call latency.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dimensions: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context_length: Option<usize>,
    /// What its length refusals taught: the estimated tokens chunks are
    /// cut to for it, when below `context_length`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub learned_context: Option<usize>,
    /// The last failed probe's error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// The text [`Router::warm_up`] embeds.
const WARM_UP_TEXT: &str = "convstore warm-up";

/// Spreads embedding calls over the backends; see the module docs.
pub struct Router {
    model: String,
    dimensions: usize,
    backends: Arc<[Arc<Backend>]>,
    service: RetryLayer,
    /// Where the chunk budget is published for the chunker.
    budget: Arc<ChunkBudget>,
}

/// The tokens (by the chunker's estimate) a chunk may cost: the smallest
/// [`Backend::chunk_budget`] of the usable backends, published into the
/// chunker's cell after every health check and every length refusal.
#[derive(Default)]
pub(crate) struct ChunkBudget {
    sink: std::sync::OnceLock<Arc<AtomicUsize>>,
}

impl ChunkBudget {
    /// The smallest budget of the usable backends, if any knows one.
    fn of(backends: &[Arc<Backend>]) -> Option<usize> {
        backends.iter().filter_map(|b| b.chunk_budget()).min()
    }

    pub(crate) fn publish(&self, backends: &[Arc<Backend>]) {
        for b in backends {
            if let Some(budget) = b.chunk_budget() {
                metrics::gauge!(
                    convstore_telemetry::metrics::BACKEND_CHUNK_BUDGET_TOKENS,
                    convstore_telemetry::events::label::BACKEND => b.name.clone()
                )
                .set(budget as f64);
            }
        }
        let (Some(sink), Some(budget)) = (self.sink.get(), Self::of(backends)) else {
            return;
        };
        let old = sink.swap(budget, Ordering::Relaxed);
        metrics::gauge!(convstore_telemetry::metrics::CHUNK_BUDGET_TOKENS).set(budget as f64);
        if old != budget {
            tracing::info!(
                context_tokens = budget,
                "Chunks are cut to the smallest budget of the usable backends"
            );
        }
    }
}

impl Router {
    pub fn new(config: RouterConfig, specs: Vec<BackendSpec>) -> Self {
        let backends: Arc<[Arc<Backend>]> = specs
            .into_iter()
            .map(|spec| Arc::new(Backend::new(spec, config.breaker)))
            .collect();
        let strategy = strategy::from_config(config.strategy, backends.len());
        let budget = Arc::new(ChunkBudget::default());
        let balancer = Arc::new(Balancer::new(
            config.model.clone(),
            backends.clone(),
            strategy,
            budget.clone(),
        ));
        let watched = backends.clone();
        let hopeless: retry::Hopeless = Arc::new(move || {
            watched
                .iter()
                .all(|b| b.health.refused().is_some() || b.breaker.state() == CircuitState::Open)
        });
        Self {
            model: config.model,
            dimensions: config.dimensions,
            backends,
            service: RetryLayer::new(balancer, config.retry).give_up_when(hopeless),
            budget,
        }
    }

    /// Publishes the chunk budget ([`ChunkBudget`]) into `sink` (the
    /// chunker reads it). A router's sink is set once.
    pub fn with_context_sink(self, sink: Arc<AtomicUsize>) -> Self {
        if self.budget.sink.set(sink).is_err() {
            tracing::warn!("The router's context sink was already set; keeping the first");
        }
        self
    }

    /// Probes every backend at once and records the results (up, refused,
    /// context). Used at start-up and by the periodic health check.
    pub async fn check_all(&self) -> Vec<BackendCheck> {
        let checks = futures::future::join_all(
            self.backends
                .iter()
                .map(|b| health::check(b, self.dimensions)),
        )
        .await;
        metrics::gauge!(convstore_telemetry::metrics::BACKENDS_READY)
            .set(self.ready_backends() as f64);
        self.budget.publish(&self.backends);
        checks
    }

    /// The smallest context length reported by a backend that is not
    /// refused, if any reported one.
    pub fn context_length(&self) -> Option<usize> {
        self.backends
            .iter()
            .filter_map(|b| {
                let d = b.health.lock();
                if d.refused.is_some() {
                    None
                } else {
                    d.info.as_ref().and_then(|i| i.context_length)
                }
            })
            .min()
    }

    /// Backends counting for readiness (up, not refused, circuit not open).
    pub fn ready_backends(&self) -> usize {
        self.backends.iter().filter(|b| b.is_ready()).count()
    }

    /// One short embedding through each backend that is up, so each loads
    /// its model (Ollama does on the first call, which can take seconds)
    /// before the daemon reports ready. True if at least one answered.
    pub async fn warm_up(&self) -> bool {
        let up: Vec<&Arc<Backend>> = self.backends.iter().filter(|b| b.health.is_up()).collect();
        let text = [WARM_UP_TEXT.to_string()];
        let results = futures::future::join_all(up.iter().map(|b| b.stack.embed(&text))).await;
        let mut any = false;
        for (b, result) in up.iter().zip(results) {
            match result {
                Ok(_) => {
                    any = true;
                    tracing::debug!(backend = %b.name, "Embedding backend warmed up");
                }
                Err(e) => tracing::warn!(
                    backend = %b.name,
                    error = %e,
                    "Embedding backend answered its probe but not a warm-up embedding"
                ),
            }
        }
        any
    }

    pub fn backend_count(&self) -> usize {
        self.backends.len()
    }

    /// Every backend's state, in configuration order.
    pub fn snapshot(&self) -> Vec<BackendStatus> {
        self.backends.iter().map(|b| b.status()).collect()
    }

    pub fn dimensions(&self) -> usize {
        self.dimensions
    }
}

#[async_trait]
impl Embedder for Router {
    fn name(&self) -> &str {
        "router"
    }

    fn model(&self) -> &str {
        &self.model
    }

    fn token_counter(&self) -> Option<Arc<dyn TokenCounter>> {
        self.service.token_counter()
    }

    /// Probes every backend; the configured dimension and the smallest
    /// context if one serves it, else the first failure.
    async fn probe(&self) -> Result<ModelInfo, EmbedError> {
        let checks = self.check_all().await;
        let good = checks.iter().any(|c| {
            c.result
                .as_ref()
                .is_ok_and(|info| info.dimensions == self.dimensions)
        });
        if good {
            return Ok(ModelInfo {
                dimensions: self.dimensions,
                context_length: self.context_length(),
            });
        }
        let mut first_error = None;
        for c in checks {
            match c.result {
                Ok(info) => {
                    return Err(EmbedError::DimensionMismatch {
                        expected: self.dimensions,
                        got: info.dimensions,
                    });
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error
            .unwrap_or_else(|| EmbedError::Unreachable("no embedding backend configured".into())))
    }

    async fn embed(&self, inputs: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        self.service.embed(inputs).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ollama::OllamaBackend;
    use convstore_standin::{
        self as standin, FaultsUpdate, SpawnedStandin, StandinConfig, standin_vector,
    };

    const DIMS: usize = 768;

    async fn standin(config: StandinConfig) -> SpawnedStandin {
        standin::spawn(config)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn config(strategy: StrategyName) -> RouterConfig {
        RouterConfig {
            model: "nomic-embed-text".into(),
            dimensions: DIMS,
            strategy,
            retry: RetryConfig {
                initial: Duration::from_millis(5),
                max: Duration::from_millis(50),
                max_wait: Duration::from_secs(10),
            },
            breaker: BreakerConfig {
                failures: 2,
                open_for: Duration::from_millis(100),
                max_open_for: Duration::from_millis(200),
            },
        }
    }

    fn spec(name: &str, url: &str) -> BackendSpec {
        let client = OllamaBackend::new(
            name,
            url,
            "nomic-embed-text",
            crate::ClientConfig {
                timeout: Duration::from_secs(5),
                dimensions: DIMS,
                max_response_bytes: crate::response::DEFAULT_MAX_RESPONSE_BYTES,
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
        BackendSpec {
            client: Arc::new(client),
            weight: 1,
            max_in_flight: 2,
            timeout: Duration::from_secs(5),
            max_batch_tokens: 0,
            pace: PaceConfig::default(),
        }
    }

    fn texts(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("text {i}")).collect()
    }

    fn down() -> FaultsUpdate {
        FaultsUpdate {
            down: Some(true),
            ..Default::default()
        }
    }

    /// A backend at its rate limit answers 429: it is held back for its
    /// `Retry-After` (the call waits instead of hammering it) and its
    /// circuit stays closed, however many 429s it answers.
    #[tokio::test]
    async fn a_429_holds_the_backend_back_without_opening_its_circuit() {
        let limited = standin(StandinConfig {
            failure_every: 1,
            failure_status: 429,
            retry_after_secs: Some(1),
            ..StandinConfig::default()
        })
        .await;
        let mut cfg = config(StrategyName::RoundRobin);
        cfg.retry.max_wait = Duration::from_millis(2_500);
        // A hold is capped at the longest open period.
        cfg.breaker.max_open_for = Duration::from_secs(5);
        let router = Router::new(cfg, vec![spec("limited", &limited.url())]);
        // Gives up at max_wait: on the 429 or on the hold.
        let result = router.embed(&texts(1)).await;
        assert!(result.is_err(), "{result:?}");
        let calls = limited.standin.stats().calls.embed;
        // Held a second after each 429 for 2.5 s: three calls. Without the
        // hold the 5-50 ms backoff would have made dozens.
        assert!((2..=4).contains(&calls), "{calls} calls");
        assert_eq!(router.snapshot()[0].circuit, CircuitState::Closed);

        // Once the limit lifts, the same backend takes the call.
        limited
            .standin
            .set_faults(FaultsUpdate {
                failure_every: Some(0),
                ..Default::default()
            })
            .unwrap_or_else(|e| panic!("{e}"));
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        let vectors = router
            .embed(&texts(1))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(vectors.len(), 1);
    }

    #[tokio::test]
    async fn fails_over_and_opens_the_circuit_of_a_dead_backend() {
        let good = standin(StandinConfig::default()).await;
        let bad = standin(StandinConfig::default()).await;
        bad.standin
            .set_faults(down())
            .unwrap_or_else(|e| panic!("{e}"));
        let router = Router::new(
            config(StrategyName::RoundRobin),
            vec![spec("good", &good.url()), spec("bad", &bad.url())],
        );
        for i in 0..10 {
            let inputs = vec![format!("t{i}")];
            let vectors = router
                .embed(&inputs)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(vectors, vec![standin_vector(&inputs[0], DIMS)]);
        }
        let status = router.snapshot();
        assert_eq!(status[1].circuit, CircuitState::Open, "{status:?}");
        assert_eq!(
            bad.standin.stats().outcomes.down,
            2,
            "two failures opened it"
        );
        assert_eq!(good.standin.stats().outcomes.ok, 10);

        // Back up: after the open period, a trial closes it.
        bad.standin
            .set_faults(FaultsUpdate {
                down: Some(false),
                ..Default::default()
            })
            .unwrap_or_else(|e| panic!("{e}"));
        tokio::time::sleep(Duration::from_millis(250)).await;
        for _ in 0..4 {
            router
                .embed(&texts(1))
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
        assert_eq!(router.snapshot()[1].circuit, CircuitState::Closed);
        assert!(bad.standin.stats().outcomes.ok >= 1);
    }

    #[tokio::test]
    async fn every_backend_down_fails_fast_once_the_circuits_are_open() {
        let a = standin(StandinConfig::default()).await;
        let b = standin(StandinConfig::default()).await;
        for s in [&a, &b] {
            s.standin
                .set_faults(down())
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let router = Router::new(
            config(StrategyName::LeastOutstanding),
            vec![spec("a", &a.url()), spec("b", &b.url())],
        );
        // The first call opens both circuits (two failures each), then
        // gives up instead of waiting out max_wait.
        let started = std::time::Instant::now();
        assert!(router.embed(&texts(3)).await.is_err());
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(
            router
                .snapshot()
                .iter()
                .all(|b| b.circuit == CircuitState::Open)
        );
        let calls = a.standin.stats().calls.embed + b.standin.stats().calls.embed;
        assert!(router.embed(&texts(3)).await.is_err());
        assert_eq!(
            a.standin.stats().calls.embed + b.standin.stats().calls.embed,
            calls,
            "open circuits: no call at all"
        );
        assert_eq!(router.ready_backends(), 0);
    }

    #[tokio::test]
    async fn a_backend_with_another_dimension_is_refused() {
        let right = standin(StandinConfig {
            context_length: 1024,
            ..StandinConfig::default()
        })
        .await;
        let wrong = standin(StandinConfig {
            dimensions: 384,
            context_length: 512,
            ..StandinConfig::default()
        })
        .await;
        let sink = Arc::new(AtomicUsize::new(0));
        let router = Router::new(
            config(StrategyName::RoundRobin),
            vec![spec("right", &right.url()), spec("wrong", &wrong.url())],
        )
        .with_context_sink(sink.clone());
        let checks = router.check_all().await;
        assert!(health::startup_verdict(&checks, DIMS).is_ok());
        let status = router.snapshot();
        assert!(status[0].up && status[0].refused.is_none());
        assert!(!status[1].up);
        assert!(
            status[1]
                .refused
                .as_deref()
                .is_some_and(|r| r.contains("384-dimensional")),
            "{status:?}"
        );
        // The refused backend's context does not count.
        assert_eq!(sink.load(Ordering::Relaxed), 1024);
        assert_eq!(router.ready_backends(), 1);
        for _ in 0..6 {
            router
                .embed(&texts(2))
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
        assert_eq!(wrong.standin.stats().calls.embed, 0, "never called");
        assert_eq!(router.probe().await.ok().map(|i| i.dimensions), Some(DIMS));

        let only_wrong = Router::new(
            config(StrategyName::RoundRobin),
            vec![spec("w", &wrong.url())],
        );
        assert!(health::startup_verdict(&only_wrong.check_all().await, DIMS).is_err());
    }

    /// An Ollama answering every text with a zero vector (its `normalize`
    /// lets one through from a broken model), on 127.0.0.1.
    async fn zero_vector_backend() -> (String, tokio::task::JoinHandle<()>) {
        use axum::routing::post;
        let router = axum::Router::new().route(
            "/api/embed",
            post(|body: axum::Json<serde_json::Value>| async move {
                let n = body["input"].as_array().map_or(0, Vec::len);
                axum::Json(serde_json::json!({"embeddings": vec![vec![0.0f32; DIMS]; n]}))
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let url = format!(
            "http://{}",
            listener.local_addr().unwrap_or_else(|e| panic!("{e}"))
        );
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        (url, task)
    }

    #[tokio::test]
    async fn zero_vectors_fail_that_backend_and_the_router_fails_over() {
        let good = standin(StandinConfig::default()).await;
        let (zero_url, _task) = zero_vector_backend().await;
        let router = Router::new(
            config(StrategyName::RoundRobin),
            vec![spec("zero", &zero_url), spec("good", &good.url())],
        );
        for i in 0..6 {
            let inputs = vec![format!("t{i}"), format!("u{i}")];
            let vectors = router
                .embed(&inputs)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let expected: Vec<Vec<f32>> = inputs.iter().map(|t| standin_vector(t, DIMS)).collect();
            assert_eq!(vectors, expected, "only the good backend's vectors");
        }
        // Counted as that backend's failures: its breaker opened (open, or
        // half-open if its open period has passed since), never closed.
        let status = router.snapshot();
        assert_ne!(status[0].circuit, CircuitState::Closed, "{status:?}");
        assert_eq!(good.standin.stats().outcomes.ok, 6);

        // Alone, it leaves the texts unembedded (the pipeline stores them
        // pending for the backfill), and they are not rejected (stored
        // failed) either.
        let alone = Router::new(
            config(StrategyName::RoundRobin),
            vec![spec("zero", &zero_url)],
        );
        let result = alone.embed(&texts(2)).await;
        assert!(
            matches!(&result, Err(EmbedError::Protocol(m)) if m.contains("zero vector")),
            "{result:?}"
        );
    }

    #[tokio::test]
    async fn rejections_are_returned_without_failover() {
        let a = standin(StandinConfig {
            poison: vec!["BAD".into()],
            ..StandinConfig::default()
        })
        .await;
        let b = standin(StandinConfig {
            poison: vec!["BAD".into()],
            ..StandinConfig::default()
        })
        .await;
        let router = Router::new(
            config(StrategyName::LeastOutstanding),
            vec![spec("a", &a.url()), spec("b", &b.url())],
        );
        let result = router.embed(&["fine".into(), "a BAD one".into()]).await;
        assert!(
            matches!(result, Err(EmbedError::Rejected { status: 400, .. })),
            "{result:?}"
        );
        let poisoned = a.standin.stats().outcomes.poisoned + b.standin.stats().outcomes.poisoned;
        assert_eq!(poisoned, 1, "one call, no retry, no fail-over");
        assert!(
            router
                .snapshot()
                .iter()
                .all(|s| s.circuit == CircuitState::Closed)
        );
    }
}
