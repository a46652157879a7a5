//! What can be changed while the stand-in runs (latency, injected failures,
//! the down switch, poison inputs), what it counts, and the control routes
//! under `/_standin/` that read and change both.
//!
//! Control routes (a prefix no real embedding server has):
//! - `GET /_standin/stats` → [`StandinStats`]
//! - `POST /_standin/stats/reset` → zeroes the counters, answers the old ones
//! - `GET /_standin/faults` → [`FaultsView`]
//! - `POST /_standin/faults` with a [`FaultsUpdate`] (every field optional)
//!   → the new [`FaultsView`], or 400 `{"error": "..."}` naming the bad field
//!
//! They keep working while the stand-in is "down", so a test can bring it
//! back.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};

use super::Shared;
use super::vectors::SplitMix64;

/// The behaviour that can change at run time. Built from
/// [`super::StandinConfig`], changed with `POST /_standin/faults`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Faults {
    pub latency_per_request: Duration,
    pub latency_per_input: Duration,
    pub failure_every: u64,
    pub failure_rate: f64,
    pub failure_status: u16,
    pub retry_after_secs: Option<u64>,
    pub down: bool,
    pub poison: Vec<String>,
    pub seed: u64,
}

/// The current faults, as `GET /_standin/faults` shows them. Durations are
/// in (fractional) milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaultsView {
    pub latency_per_request_ms: f64,
    pub latency_per_input_ms: f64,
    /// Every Nth embedding call fails (0 = never).
    pub failure_every: u64,
    /// Share of embedding calls that fail, drawn from a seeded stream.
    pub failure_rate: f64,
    /// HTTP status of an injected failure.
    pub failure_status: u16,
    /// `Retry-After` (seconds) sent with injected failures and while down.
    pub retry_after_secs: Option<u64>,
    pub down: bool,
    pub poison: Vec<String>,
    pub seed: u64,
}

/// A change to the faults: absent fields stay as they are. To clear
/// `retry_after_secs`, send `0`.
///
/// Any update restarts the failure sequence (the call counter behind
/// `failure_every` and the random stream behind `failure_rate`), so what
/// fails from then on depends only on the update and the calls after it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultsUpdate {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_per_request_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_per_input_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure_every: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure_rate: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure_status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_secs: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub down: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub poison: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

/// Counters since start (or the last reset). `outcomes` covers the
/// embedding calls (`/api/embed` and `/v1/embeddings`) only, and its fields
/// add up to `calls.embed + calls.openai`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StandinStats {
    pub calls: CallCounts,
    /// Texts received in embedding calls that got past parsing and the
    /// model check, whatever their outcome.
    pub inputs: u64,
    /// Vectors returned.
    pub embedded: u64,
    /// Tokens (by the stand-in's rule or `--tokenizer`) in the embedded
    /// texts.
    pub tokens: u64,
    /// Most tokens in one embedding call (all its inputs, before the
    /// context check): what a client's `max_batch_tokens` must bound.
    pub max_call_tokens: u64,
    /// Most inputs in one embedding call.
    pub max_call_inputs: u64,
    pub outcomes: Outcomes,
    /// Most embedding calls in the stand-in at once (waiting for the
    /// compute slot or computing). Above 1 means clients sent in parallel;
    /// the compute itself is always one call at a time.
    pub max_in_flight: u64,
}

/// Requests per route, whatever their outcome.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallCounts {
    /// `POST /api/embed`
    pub embed: u64,
    /// `POST /v1/embeddings`
    pub openai: u64,
    /// `POST /api/show`
    pub show: u64,
    /// `GET|HEAD /api/version`
    pub version: u64,
    /// `GET|HEAD /`
    pub root: u64,
}

/// How embedding calls ended; each call counts once.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcomes {
    /// 200 with vectors (or the empty preload answer).
    pub ok: u64,
    /// 400: no body, bad JSON, wrong input type, bad encoding_format.
    pub bad_request: u64,
    /// 400: an input over the context length with `truncate: false`.
    pub too_long: u64,
    /// 400: an input contained a poison substring.
    pub poisoned: u64,
    /// 404: unknown model.
    pub not_found: u64,
    /// An injected failure (`failure_every` / `failure_rate`).
    pub injected: u64,
    /// 503 because the down switch was on.
    pub down: u64,
    /// The client went away (timed out, cancelled) before the answer.
    pub abandoned: u64,
}

/// Which counter an embedding call's outcome goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Ok,
    BadRequest,
    TooLong,
    Poisoned,
    NotFound,
    Injected,
    Down,
    Abandoned,
}

impl Outcomes {
    pub(crate) fn count(&mut self, outcome: Outcome) {
        let slot = match outcome {
            Outcome::Ok => &mut self.ok,
            Outcome::BadRequest => &mut self.bad_request,
            Outcome::TooLong => &mut self.too_long,
            Outcome::Poisoned => &mut self.poisoned,
            Outcome::NotFound => &mut self.not_found,
            Outcome::Injected => &mut self.injected,
            Outcome::Down => &mut self.down,
            Outcome::Abandoned => &mut self.abandoned,
        };
        *slot += 1;
    }
}

/// The faults plus the state of the failure sequence they drive.
#[derive(Debug)]
pub(crate) struct FaultState {
    pub faults: Faults,
    /// Embedding calls judged since the faults were last set.
    calls: u64,
    rng: SplitMix64,
}

impl FaultState {
    pub(crate) fn new(faults: Faults) -> Self {
        let rng = SplitMix64::new(faults.seed);
        Self {
            faults,
            calls: 0,
            rng,
        }
    }

    /// Decides whether the next embedding call fails. Both rules may be on;
    /// either one failing fails the call. The random stream advances only
    /// when `failure_rate` is set, so `failure_every` alone is exact.
    pub(crate) fn next_call_fails(&mut self) -> bool {
        self.calls += 1;
        let every = self.faults.failure_every;
        let by_count = every > 0 && self.calls.is_multiple_of(every);
        let by_rate =
            self.faults.failure_rate > 0.0 && self.rng.next_f64() < self.faults.failure_rate;
        by_count || by_rate
    }

    pub(crate) fn view(&self) -> FaultsView {
        let f = &self.faults;
        FaultsView {
            latency_per_request_ms: f.latency_per_request.as_secs_f64() * 1000.0,
            latency_per_input_ms: f.latency_per_input.as_secs_f64() * 1000.0,
            failure_every: f.failure_every,
            failure_rate: f.failure_rate,
            failure_status: f.failure_status,
            retry_after_secs: f.retry_after_secs,
            down: f.down,
            poison: f.poison.clone(),
            seed: f.seed,
        }
    }

    /// Applies `update` whole or not at all, and restarts the failure
    /// sequence.
    pub(crate) fn apply(&mut self, update: FaultsUpdate) -> Result<FaultsView, String> {
        let mut f = self.faults.clone();
        if let Some(ms) = update.latency_per_request_ms {
            f.latency_per_request = millis("latency_per_request_ms", ms)?;
        }
        if let Some(ms) = update.latency_per_input_ms {
            f.latency_per_input = millis("latency_per_input_ms", ms)?;
        }
        if let Some(n) = update.failure_every {
            f.failure_every = n;
        }
        if let Some(rate) = update.failure_rate {
            f.failure_rate = rate;
        }
        if let Some(status) = update.failure_status {
            f.failure_status = status;
        }
        if let Some(secs) = update.retry_after_secs {
            f.retry_after_secs = (secs > 0).then_some(secs);
        }
        if let Some(down) = update.down {
            f.down = down;
        }
        if let Some(poison) = update.poison {
            f.poison = poison;
        }
        if let Some(seed) = update.seed {
            f.seed = seed;
        }
        f.validate()?;
        *self = Self::new(f);
        Ok(self.view())
    }
}

impl Faults {
    pub(crate) fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.failure_rate) {
            return Err(format!(
                "failure_rate must be between 0 and 1, not {}",
                self.failure_rate
            ));
        }
        if !(400..=599).contains(&self.failure_status) {
            return Err(format!(
                "failure_status must be an HTTP error status (400-599), not {}",
                self.failure_status
            ));
        }
        if self.poison.iter().any(String::is_empty) {
            // An empty substring is in every text: almost surely a mistake.
            return Err("poison must not contain an empty string".into());
        }
        Ok(())
    }
}

/// Milliseconds (fractions allowed, e.g. 0.5) as a `Duration`.
pub(crate) fn millis(field: &str, ms: f64) -> Result<Duration, String> {
    if !ms.is_finite() || ms < 0.0 {
        return Err(format!(
            "{field} must be a non-negative number of milliseconds, not {ms}"
        ));
    }
    Duration::try_from_secs_f64(ms / 1000.0).map_err(|e| format!("{field}: {e}"))
}

pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/_standin/stats", get(get_stats))
        .route("/_standin/stats/reset", post(reset_stats))
        .route("/_standin/faults", get(get_faults).post(set_faults))
}

async fn get_stats(State(shared): State<Arc<Shared>>) -> Json<StandinStats> {
    Json(shared.stats())
}

async fn reset_stats(State(shared): State<Arc<Shared>>) -> Json<StandinStats> {
    Json(shared.reset_stats())
}

async fn get_faults(State(shared): State<Arc<Shared>>) -> Json<FaultsView> {
    Json(shared.faults())
}

async fn set_faults(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let update: FaultsUpdate = match serde_json::from_slice(&body) {
        Ok(update) => update,
        Err(e) => return control_error(format!("invalid faults update: {e}")),
    };
    match shared.set_faults(update) {
        Ok(view) => Json(view).into_response(),
        Err(message) => control_error(message),
    }
}

fn control_error(message: String) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(serde_json::json!({ "error": message })),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn faults() -> Faults {
        Faults {
            latency_per_request: Duration::ZERO,
            latency_per_input: Duration::ZERO,
            failure_every: 0,
            failure_rate: 0.0,
            failure_status: 503,
            retry_after_secs: None,
            down: false,
            poison: Vec::new(),
            seed: 7,
        }
    }

    #[test]
    fn every_nth_call_fails() {
        let mut state = FaultState::new(Faults {
            failure_every: 3,
            ..faults()
        });
        let pattern: Vec<bool> = (0..9).map(|_| state.next_call_fails()).collect();
        assert_eq!(
            pattern,
            [false, false, true, false, false, true, false, false, true]
        );
    }

    #[test]
    fn failure_rate_is_seeded_and_roughly_right() {
        let run = |seed| {
            let mut state = FaultState::new(Faults {
                failure_rate: 0.5,
                seed,
                ..faults()
            });
            (0..1000)
                .map(|_| state.next_call_fails())
                .collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
        let failed = run(1).iter().filter(|&&f| f).count();
        assert!((400..600).contains(&failed), "{failed}");
    }

    #[test]
    fn update_restarts_the_sequence_and_validates() {
        let mut state = FaultState::new(Faults {
            failure_every: 2,
            ..faults()
        });
        assert!(!state.next_call_fails());
        let view = state
            .apply(FaultsUpdate {
                latency_per_input_ms: Some(0.5),
                ..Default::default()
            })
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(view.latency_per_input_ms, 0.5);
        assert_eq!(view.failure_every, 2);
        // Counter restarted: the first call after the update passes again.
        assert!(!state.next_call_fails());
        assert!(state.next_call_fails());

        for bad in [
            FaultsUpdate {
                failure_rate: Some(1.5),
                ..Default::default()
            },
            FaultsUpdate {
                failure_status: Some(200),
                ..Default::default()
            },
            FaultsUpdate {
                latency_per_request_ms: Some(-1.0),
                ..Default::default()
            },
            FaultsUpdate {
                poison: Some(vec![String::new()]),
                ..Default::default()
            },
        ] {
            let before = state.view();
            assert!(state.apply(bad).is_err());
            assert_eq!(state.view(), before, "a rejected update changes nothing");
        }
    }
}
