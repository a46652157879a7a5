//! Circuit breaker layer: stops sending work to a backend that keeps
//! failing, and lets one trial call through now and then to see whether it
//! is back.
//!
//! Heuristic:
//! - **Closed** (normal): every call goes through. `failures` consecutive
//!   failed calls open the circuit. A success resets the count. A rejection
//!   (400: the *input* is bad) counts as a success: the backend answered
//!   sanely.
//! - **Open**: calls are refused at once (no socket is touched) for the open
//!   period, which starts at `open_for` and doubles after every failed
//!   trial up to `max_open_for`, so a backend that is down for an hour costs
//!   a trial every `max_open_for`, not a stream of timeouts.
//! - **Half-open**: when the open period has passed, exactly one call (a
//!   real request, routed here like any other) is the trial. Success closes
//!   the circuit and resets the open period; failure re-opens it. A trial
//!   whose caller gave up (dropped the future) lets the next call be the
//!   trial.
//!
//! `Retry-After` is honoured here too: a backend that answers 429/503 with
//! `Retry-After: N` is not called again for N seconds (capped at
//! `max_open_for`), whatever the state. A 429 (rate limited) never counts
//! towards opening the circuit, with or without `Retry-After` (without,
//! the backend is held back for a second): a hosted API at its rate limit
//! is working, and the pacing layer keeps a configured one below it.
//!
//! The breaker is the outermost per-backend layer, so it sees every outcome
//! (timeouts, bad answers) and refuses before a call waits for an in-flight
//! slot.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::{EmbedError, Embedder, ModelInfo, TokenCounter};
use convstore_telemetry::events::label;
use convstore_telemetry::metrics as m;

/// How long a backend that answered 429 without `Retry-After` is held
/// back.
const RATE_LIMITED_HOLD: Duration = Duration::from_secs(1);

/// Where a circuit stands (the gauge's value in parentheses).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CircuitState {
    /// Calls go through (0).
    Closed,
    /// One trial call may go through (1).
    HalfOpen,
    /// Calls are refused (2).
    Open,
}

impl CircuitState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::HalfOpen => "half_open",
            Self::Open => "open",
        }
    }

    /// The value of `convstore_backend_circuit_state`.
    pub fn gauge_value(self) -> f64 {
        match self {
            Self::Closed => 0.0,
            Self::HalfOpen => 1.0,
            Self::Open => 2.0,
        }
    }
}

/// The breaker's tuning.
#[derive(Debug, Clone, Copy)]
pub struct BreakerConfig {
    /// Consecutive failures that open the circuit.
    pub failures: u32,
    /// First open period.
    pub open_for: Duration,
    /// Longest open period.
    pub max_open_for: Duration,
}

#[derive(Debug)]
enum Phase {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { trial_in_flight: bool },
}

#[derive(Debug)]
struct Inner {
    phase: Phase,
    /// The next open period.
    open_for: Duration,
    /// No call before this (from `Retry-After`).
    hold_until: Option<Instant>,
}

/// One backend's breaker state; shared by the layer and the router, which
/// skips backends whose breaker would refuse.
#[derive(Debug)]
pub struct Breaker {
    backend: String,
    config: BreakerConfig,
    inner: Mutex<Inner>,
}

/// Whether a call was allowed, and if it is the half-open trial.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admission {
    Normal,
    Trial,
}

impl Breaker {
    pub fn new(backend: impl Into<String>, config: BreakerConfig) -> Self {
        let backend = backend.into();
        metrics::gauge!(m::BACKEND_CIRCUIT_STATE, label::BACKEND => backend.clone())
            .set(CircuitState::Closed.gauge_value());
        Self {
            backend,
            config: BreakerConfig {
                failures: config.failures.max(1),
                max_open_for: config.max_open_for.max(config.open_for),
                ..config
            },
            inner: Mutex::new(Inner {
                phase: Phase::Closed { failures: 0 },
                open_for: config.open_for,
                hold_until: None,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every critical section leaves the state whole.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The state as the router and metrics see it: an open circuit whose
    /// period has passed reads as half-open (its next call is the trial).
    pub fn state(&self) -> CircuitState {
        let inner = self.lock();
        match inner.phase {
            Phase::Closed { .. } => CircuitState::Closed,
            Phase::Open { until } if Instant::now() >= until => CircuitState::HalfOpen,
            Phase::Open { .. } => CircuitState::Open,
            Phase::HalfOpen { .. } => CircuitState::HalfOpen,
        }
    }

    /// Whether a call made now would be let through (without taking the
    /// trial slot): the router's filter.
    pub fn would_admit(&self) -> bool {
        let inner = self.lock();
        let now = Instant::now();
        if inner.hold_until.is_some_and(|h| now < h) {
            return false;
        }
        match inner.phase {
            Phase::Closed { .. } => true,
            Phase::Open { until } => now >= until,
            Phase::HalfOpen { trial_in_flight } => !trial_in_flight,
        }
    }

    fn admit(&self) -> Option<Admission> {
        let mut inner = self.lock();
        let now = Instant::now();
        if inner.hold_until.is_some_and(|h| now < h) {
            return None;
        }
        match inner.phase {
            Phase::Closed { .. } => Some(Admission::Normal),
            Phase::Open { until } if now >= until => {
                inner.phase = Phase::HalfOpen {
                    trial_in_flight: true,
                };
                self.transition(CircuitState::HalfOpen);
                Some(Admission::Trial)
            }
            Phase::Open { .. } => None,
            Phase::HalfOpen {
                trial_in_flight: false,
            } => {
                inner.phase = Phase::HalfOpen {
                    trial_in_flight: true,
                };
                Some(Admission::Trial)
            }
            Phase::HalfOpen {
                trial_in_flight: true,
            } => None,
        }
    }

    /// Holds the backend back for `hold` from now, unless a longer hold
    /// (a concurrent call's `Retry-After`) already runs.
    fn hold(inner: &mut Inner, hold: Duration) {
        let until = Instant::now() + hold;
        inner.hold_until = Some(inner.hold_until.map_or(until, |h| h.max(until)));
    }

    fn record(&self, admission: Admission, outcome: &Result<(), &EmbedError>) {
        let mut inner = self.lock();
        // "Slow down" (429) neither counts towards opening the circuit (a
        // rate limit is not an outage) nor resets the failures before it
        // (a backend mixing 429s with timeouts is failing); it only holds
        // the backend back (below).
        if let Err(EmbedError::Transient { status: 429, .. }) = outcome {
            let hold = match outcome {
                Err(EmbedError::Transient {
                    retry_after: Some(after),
                    ..
                }) => *after,
                _ => RATE_LIMITED_HOLD,
            };
            Self::hold(&mut inner, hold.min(self.config.max_open_for));
            if admission == Admission::Trial {
                // The trial got an answer: the backend is there.
                inner.phase = Phase::Closed { failures: 0 };
                inner.open_for = self.config.open_for;
                self.transition(CircuitState::Closed);
            }
            return;
        }
        let failed = match outcome {
            // An answer about the input: the backend works.
            Ok(()) | Err(EmbedError::Rejected { .. } | EmbedError::TooLong { .. }) => false,
            Err(_) => true,
        };
        if let Err(EmbedError::Transient {
            retry_after: Some(after),
            ..
        }) = outcome
        {
            Self::hold(&mut inner, (*after).min(self.config.max_open_for));
        }
        match (admission, failed) {
            (Admission::Trial, false) => {
                inner.phase = Phase::Closed { failures: 0 };
                inner.open_for = self.config.open_for;
                self.transition(CircuitState::Closed);
                tracing::info!(backend = %self.backend, "Circuit closed: the backend answers again");
            }
            (Admission::Trial, true) => {
                let open_for = inner.open_for;
                inner.phase = Phase::Open {
                    until: Instant::now() + open_for,
                };
                inner.open_for = (open_for * 2).min(self.config.max_open_for);
                self.transition(CircuitState::Open);
                tracing::debug!(backend = %self.backend, open_ms = open_for.as_millis() as u64, "Trial call failed; circuit open again");
            }
            (Admission::Normal, false) => {
                if let Phase::Closed { failures } = &mut inner.phase {
                    *failures = 0;
                }
            }
            (Admission::Normal, true) => {
                if let Phase::Closed { failures } = &mut inner.phase {
                    *failures += 1;
                    if *failures >= self.config.failures {
                        let open_for = inner.open_for;
                        inner.phase = Phase::Open {
                            until: Instant::now() + open_for,
                        };
                        inner.open_for = (open_for * 2).min(self.config.max_open_for);
                        self.transition(CircuitState::Open);
                        let error = outcome.err().map(ToString::to_string).unwrap_or_default();
                        tracing::warn!(
                            backend = %self.backend,
                            failures = self.config.failures,
                            open_ms = open_for.as_millis() as u64,
                            error = %error,
                            "Circuit open: the backend failed repeatedly; sending its work elsewhere"
                        );
                    }
                }
                // Already open or half-open: a call admitted before the
                // circuit opened; its failure changes nothing.
            }
        }
    }

    /// A trial whose caller went away: the next call may be the trial.
    fn abandon_trial(&self) {
        let mut inner = self.lock();
        if let Phase::HalfOpen {
            trial_in_flight: true,
        } = inner.phase
        {
            inner.phase = Phase::HalfOpen {
                trial_in_flight: false,
            };
        }
    }

    fn transition(&self, to: CircuitState) {
        metrics::gauge!(m::BACKEND_CIRCUIT_STATE, label::BACKEND => self.backend.clone())
            .set(to.gauge_value());
        metrics::counter!(
            m::BACKEND_CIRCUIT_TRANSITIONS,
            label::BACKEND => self.backend.clone(),
            label::TO => to.as_str()
        )
        .increment(1);
    }
}

/// Records the outcome of an admitted call; if dropped unrecorded (the
/// caller gave up), frees the trial slot.
struct CallGuard<'a> {
    breaker: &'a Breaker,
    admission: Admission,
    recorded: bool,
}

impl CallGuard<'_> {
    fn record(mut self, outcome: &Result<(), &EmbedError>) {
        self.recorded = true;
        self.breaker.record(self.admission, outcome);
    }
}

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        if !self.recorded && self.admission == Admission::Trial {
            self.breaker.abandon_trial();
        }
    }
}

/// The layer: refuses calls while the circuit is open.
pub struct BreakerLayer {
    inner: Arc<dyn Embedder>,
    breaker: Arc<Breaker>,
}

impl BreakerLayer {
    pub fn new(inner: Arc<dyn Embedder>, breaker: Arc<Breaker>) -> Self {
        Self { inner, breaker }
    }
}

#[async_trait]
impl Embedder for BreakerLayer {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn model(&self) -> &str {
        self.inner.model()
    }

    /// Probes bypass the breaker: they are how an operator (and the health
    /// check) sees the backend whatever its circuit says.
    fn token_counter(&self) -> Option<Arc<dyn TokenCounter>> {
        self.inner.token_counter()
    }

    async fn probe(&self) -> Result<ModelInfo, EmbedError> {
        self.inner.probe().await
    }

    async fn embed(&self, inputs: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let Some(admission) = self.breaker.admit() else {
            return Err(circuit_open(self.inner.name()));
        };
        let guard = CallGuard {
            breaker: &self.breaker,
            admission,
            recorded: false,
        };
        let result = self.inner.embed(inputs).await;
        guard.record(&result.as_ref().map(|_| ()));
        result
    }
}

/// The error of a call the breaker refused. Retryable: another backend, or
/// this one later, may take it.
pub fn circuit_open(backend: &str) -> EmbedError {
    EmbedError::Unreachable(format!(
        "backend `{backend}`: circuit open after repeated failures"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(
            "b",
            BreakerConfig {
                failures: 3,
                open_for: Duration::from_millis(100),
                max_open_for: Duration::from_millis(350),
            },
        )
    }

    fn fail() -> EmbedError {
        EmbedError::Unreachable("down".into())
    }

    fn call(b: &Breaker, ok: bool) -> bool {
        match b.admit() {
            Some(admission) => {
                let e = fail();
                b.record(admission, &if ok { Ok(()) } else { Err(&e) });
                true
            }
            None => false,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_and_closes_after_a_good_trial() {
        let b = breaker();
        assert!(call(&b, false) && call(&b, false));
        assert!(call(&b, true), "a success resets the count");
        assert!(call(&b, false) && call(&b, false));
        assert_eq!(b.state(), CircuitState::Closed);
        assert!(call(&b, false));
        assert_eq!(b.state(), CircuitState::Open);
        assert!(!b.would_admit());
        assert!(!call(&b, true), "refused while open");

        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(b.state(), CircuitState::HalfOpen);
        let trial = b.admit();
        assert_eq!(trial, Some(Admission::Trial));
        assert!(b.admit().is_none(), "one trial at a time");
        b.record(Admission::Trial, &Ok(()));
        assert_eq!(b.state(), CircuitState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_trials_double_the_open_period_up_to_the_ceiling() {
        let b = breaker();
        for _ in 0..3 {
            call(&b, false);
        }
        let mut periods = Vec::new();
        for _ in 0..4 {
            let opened = Instant::now();
            while !b.would_admit() {
                tokio::time::advance(Duration::from_millis(10)).await;
            }
            periods.push(opened.elapsed().as_millis());
            assert!(call(&b, false), "the trial goes through");
            assert_eq!(b.state(), CircuitState::Open);
        }
        assert_eq!(periods, vec![100, 200, 350, 350]);
        // A good trial resets the period.
        tokio::time::advance(Duration::from_millis(350)).await;
        assert!(call(&b, true));
        for _ in 0..3 {
            call(&b, false);
        }
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(b.would_admit());
    }

    #[tokio::test(start_paused = true)]
    async fn rejections_are_not_failures_and_abandoned_trials_free_the_slot() {
        let b = breaker();
        let rejected = EmbedError::Rejected {
            status: 400,
            message: "bad input".into(),
        };
        for _ in 0..10 {
            let a = b.admit().unwrap_or(Admission::Normal);
            b.record(a, &Err(&rejected));
        }
        assert_eq!(b.state(), CircuitState::Closed);
        for _ in 0..3 {
            call(&b, false);
        }
        tokio::time::advance(Duration::from_millis(100)).await;
        {
            let admission = b.admit();
            assert_eq!(admission, Some(Admission::Trial));
            let _guard = CallGuard {
                breaker: &b,
                admission: Admission::Trial,
                recorded: false,
            };
        }
        assert!(b.would_admit(), "the dropped trial freed the slot");
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_holds_calls_back() {
        let b = breaker();
        let busy = EmbedError::Transient {
            status: 429,
            message: "slow down".into(),
            retry_after: Some(Duration::from_millis(200)),
        };
        let a = b.admit().unwrap_or(Admission::Normal);
        b.record(a, &Err(&busy));
        assert_eq!(b.state(), CircuitState::Closed);
        assert!(!b.would_admit());
        tokio::time::advance(Duration::from_millis(200)).await;
        assert!(b.would_admit());
        // A Retry-After beyond the ceiling is capped.
        let long = EmbedError::Transient {
            status: 503,
            message: "later".into(),
            retry_after: Some(Duration::from_secs(3600)),
        };
        let a = b.admit().unwrap_or(Admission::Normal);
        b.record(a, &Err(&long));
        tokio::time::advance(Duration::from_millis(350)).await;
        assert!(b.would_admit());
    }
}
