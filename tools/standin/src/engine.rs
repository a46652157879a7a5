//! The part both embedding routes share: model lookup, injected faults, the
//! context limit, poison inputs, the serial compute slot and the counters.
//! Each route parses its own request shape into an [`EmbedJob`] and writes
//! the result or [`Failure`] in its own response shape.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::http::StatusCode;

use super::faults::Outcome;
use super::vectors::{shorten, standin_vector};
use super::{Shared, lock};

/// Ollama's text for the 503 its scheduler answers when its queue is full
/// (two spaces included, as in `server/sched.go`).
pub(crate) const BUSY_MESSAGE: &str =
    "server busy, please try again.  maximum pending requests exceeded";

/// Ollama's text (0.12.6+) for an over-long input with `truncate: false`.
pub(crate) const TOO_LONG_MESSAGE: &str = "the input length exceeds the context length";

/// The routes a call can come in on, for the per-route counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    Root,
    Version,
    Show,
    Embed,
    OpenAi,
}

/// One embedding request, whichever route it came in on.
#[derive(Debug)]
pub(crate) struct EmbedJob {
    pub model: String,
    pub inputs: Vec<String>,
    /// Cut over-long inputs (true) or refuse them (false).
    pub truncate: bool,
    /// The request's `options.num_ctx`, when positive.
    pub num_ctx: Option<usize>,
    /// Matryoshka shortening, when `0 < dimensions < native`.
    pub dimensions: Option<usize>,
}

/// A successful embedding call.
#[derive(Debug)]
pub(crate) struct EmbedOutput {
    pub embeddings: Vec<Vec<f32>>,
    /// Tokens in all inputs (after truncation).
    pub tokens: u64,
    /// Time spent waiting for the compute slot.
    pub load: Duration,
}

/// Why a call failed, in route-neutral terms.
#[derive(Debug)]
pub(crate) struct Failure {
    pub status: StatusCode,
    pub message: String,
    pub outcome: Outcome,
    /// Seconds for a `Retry-After` header.
    pub retry_after: Option<u64>,
}

impl Failure {
    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            outcome: Outcome::BadRequest,
            retry_after: None,
        }
    }
}

/// Counts a request while it is in the stand-in. An embedding call gets
/// exactly one outcome: the one given to [`CallGuard::finish`], or
/// "abandoned" if the client went away first (axum then drops the handler).
pub(crate) struct CallGuard<'a> {
    shared: &'a Shared,
    embedding: bool,
    finished: bool,
}

impl CallGuard<'_> {
    pub(crate) fn finish(mut self, outcome: Outcome) {
        self.record(outcome);
    }

    fn record(&mut self, outcome: Outcome) {
        if self.embedding && !self.finished {
            lock(&self.shared.stats).outcomes.count(outcome);
        }
        self.finished = true;
    }
}

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        if self.embedding {
            self.shared.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
        if !self.finished {
            self.record(Outcome::Abandoned);
        }
    }
}

impl Shared {
    /// Counts a request on `route`; embedding calls also count in flight.
    pub(crate) fn begin(&self, route: Route) -> CallGuard<'_> {
        let embedding = matches!(route, Route::Embed | Route::OpenAi);
        let mut stats = lock(&self.stats);
        let calls = &mut stats.calls;
        match route {
            Route::Root => calls.root += 1,
            Route::Version => calls.version += 1,
            Route::Show => calls.show += 1,
            Route::Embed => calls.embed += 1,
            Route::OpenAi => calls.openai += 1,
        }
        if embedding {
            let now = self.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
            stats.max_in_flight = stats.max_in_flight.max(now);
        }
        CallGuard {
            shared: self,
            embedding,
            finished: false,
        }
    }

    /// The 503 every route but `/_standin/` answers while down.
    pub(crate) fn down_failure(&self) -> Option<Failure> {
        let state = lock(&self.faults);
        state.faults.down.then(|| Failure {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: BUSY_MESSAGE.into(),
            outcome: Outcome::Down,
            retry_after: state.faults.retry_after_secs,
        })
    }

    /// Whether `name` names a served model.
    pub(crate) fn serves(&self, name: &str) -> bool {
        self.dimensions_of(name).is_some()
    }

    /// The length of the vectors of the served model `name`, if served.
    /// Ollama compares the parts of `model[:tag]` case-insensitively, and
    /// no tag means `latest`.
    pub(crate) fn dimensions_of(&self, name: &str) -> Option<usize> {
        fn canonical(name: &str) -> String {
            let name = name.trim().to_lowercase();
            // A tag follows the last ':' after the last '/' (a registry host
            // may carry a port, `host:5000/ns/model`).
            let base = name.rsplit('/').next().unwrap_or(&name);
            if base.contains(':') {
                name
            } else {
                format!("{name}:latest")
            }
        }
        if name.trim().is_empty() {
            return None;
        }
        let wanted = canonical(name);
        if wanted == canonical(&self.model) {
            return Some(self.dimensions);
        }
        self.other_models
            .iter()
            .find(|(model, _)| canonical(model) == wanted)
            .map(|(_, dims)| *dims)
    }

    /// The 404 for a model this stand-in does not serve, in Ollama's words.
    pub(crate) fn model_not_found(&self, name: &str) -> Failure {
        let message = if name.is_empty() {
            "model '' not found".to_string()
        } else {
            format!("model \"{name}\" not found, try pulling it first")
        };
        Failure {
            status: StatusCode::NOT_FOUND,
            message,
            outcome: Outcome::NotFound,
            retry_after: None,
        }
    }

    /// Embeds a parsed request: the model check, injected failures, the
    /// context limit, poison, then the serial compute. All-or-nothing, like
    /// Ollama: one bad input fails the whole request.
    pub(crate) async fn embed(&self, job: EmbedJob) -> Result<EmbedOutput, Failure> {
        let Some(native) = self.dimensions_of(&job.model) else {
            return Err(self.model_not_found(&job.model));
        };
        lock(&self.stats).inputs += job.inputs.len() as u64;
        if job.inputs.is_empty() {
            // Ollama's preload: loads the model, computes nothing.
            return Ok(EmbedOutput {
                embeddings: Vec::new(),
                tokens: 0,
                load: Duration::ZERO,
            });
        }
        if let Some(failure) = self.injected_failure() {
            return Err(failure);
        }

        let limit = job
            .num_ctx
            .filter(|&n| n > 0)
            .map_or(self.context_length, |n| n.min(self.context_length))
            .saturating_sub(1);
        let counts: Vec<usize> = job.inputs.iter().map(|i| self.tokens.count(i)).collect();
        {
            let mut stats = lock(&self.stats);
            let call: u64 = counts.iter().map(|&c| c as u64).sum();
            stats.max_call_tokens = stats.max_call_tokens.max(call);
            stats.max_call_inputs = stats.max_call_inputs.max(job.inputs.len() as u64);
        }
        let mut texts: Vec<&str> = Vec::with_capacity(job.inputs.len());
        let mut tokens = 0u64;
        for (input, &count) in job.inputs.iter().zip(&counts) {
            let mut text = input.as_str();
            let mut count = count;
            if count > limit {
                if !job.truncate {
                    return Err(Failure {
                        status: StatusCode::BAD_REQUEST,
                        message: TOO_LONG_MESSAGE.into(),
                        outcome: Outcome::TooLong,
                        retry_after: None,
                    });
                }
                text = self.tokens.truncate(text, limit);
                count = self.tokens.count(text);
            }
            tokens += count as u64;
            texts.push(text);
        }
        if let Some(failure) = self.poisoned(&job.inputs) {
            return Err(failure);
        }

        let queued = Instant::now();
        let slot = self.compute.lock().await;
        let load = queued.elapsed();
        let (per_request, per_input) = {
            let state = lock(&self.faults);
            (
                state.faults.latency_per_request,
                state.faults.latency_per_input,
            )
        };
        let n = u32::try_from(texts.len()).unwrap_or(u32::MAX);
        let delay = per_request.saturating_add(per_input.checked_mul(n).unwrap_or(Duration::MAX));
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let embeddings: Vec<Vec<f32>> = texts
            .iter()
            .map(|text| {
                let v = standin_vector(text, native);
                match job.dimensions {
                    Some(d) => shorten(v, d),
                    None => v,
                }
            })
            .collect();
        drop(slot);

        let mut stats = lock(&self.stats);
        stats.embedded += embeddings.len() as u64;
        stats.tokens += tokens;
        Ok(EmbedOutput {
            embeddings,
            tokens,
            load,
        })
    }

    fn injected_failure(&self) -> Option<Failure> {
        let mut state = lock(&self.faults);
        if !state.next_call_fails() {
            return None;
        }
        let status = StatusCode::from_u16(state.faults.failure_status)
            .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        Some(Failure {
            status,
            message: injected_message(status),
            outcome: Outcome::Injected,
            retry_after: state.faults.retry_after_secs,
        })
    }

    fn poisoned(&self, inputs: &[String]) -> Option<Failure> {
        let state = lock(&self.faults);
        inputs.iter().enumerate().find_map(|(i, input)| {
            let poison = state
                .faults
                .poison
                .iter()
                .find(|p| input.contains(p.as_str()))?;
            Some(Failure {
                status: StatusCode::BAD_REQUEST,
                message: format!("standin: input {i} contains the poison substring {poison:?}"),
                outcome: Outcome::Poisoned,
                retry_after: None,
            })
        })
    }
}

/// What Ollama says with each status it can answer an embedding call with,
/// so injected failures read like real ones.
fn injected_message(status: StatusCode) -> String {
    match status.as_u16() {
        503 => BUSY_MESSAGE.into(),
        500 => "llama runner process has terminated: exit status 2".into(),
        499 => "request canceled".into(),
        429 => "too many requests".into(),
        400 => "standin: injected failure".into(),
        _ => format!("standin: injected failure ({status})"),
    }
}
