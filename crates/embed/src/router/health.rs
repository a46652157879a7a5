//! Health checks: each backend is probed at start-up and then every
//! `embedding.health_interval_ms` (Ollama: `/api/version` and `/api/show`,
//! i.e. is it there, is the model pulled, can it embed, how long are its
//! vectors and its context; OpenAI-compatible: one probe embedding).
//!
//! What a probe decides:
//! - **up** (`convstore_backend_up`): the last probe succeeded with the
//!   configured dimension. Readiness needs one backend up with its circuit
//!   not open. Up or down does not route calls: the breaker does (see
//!   [`super::balance`]).
//! - **refused**: the backend answered with another dimension than
//!   `embedding.dimensions`; it gets no calls until a probe reports the
//!   right one. Its vectors could not be stored next to the others.
//! - the **context length**: the chunker cuts to the smallest context any
//!   usable backend reports, so every chunk fits every backend.
//!
//! Probes bypass the breaker and the in-flight limit (they must work while
//! the circuit is open, and must not queue behind a backlog), but are bound
//! by the backend's timeout.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Backend, Router};
use crate::{EmbedError, ModelInfo};
use convstore_telemetry::events::label;
use convstore_telemetry::metrics as m;

/// One probe's result, for start-up decisions.
#[derive(Debug)]
pub struct BackendCheck {
    pub name: String,
    pub model: String,
    pub result: Result<ModelInfo, EmbedError>,
}

/// Probes `backend` and records what it says.
pub(super) async fn check(backend: &Backend, dimensions: usize) -> BackendCheck {
    let result = backend.client.probe().await;
    let was_up = backend.health.is_up();
    let was_refused = backend.health.refused().is_some();
    match &result {
        Ok(info) if info.dimensions == dimensions => {
            backend.health.set_ok(info.clone());
            if !was_up {
                tracing::info!(
                    backend = %backend.name,
                    model = %backend.model,
                    dimensions = info.dimensions,
                    context_tokens = ?info.context_length,
                    "Embedding backend ready"
                );
            }
        }
        Ok(info) => {
            let reason = format!(
                "serves model `{}` with {}-dimensional vectors, but embedding.dimensions is {dimensions}",
                backend.model, info.dimensions
            );
            if !was_refused {
                tracing::error!(
                    backend = %backend.name,
                    reason = %reason,
                    "Embedding backend refused: its vectors cannot be stored with the others; \
                     configure the model you meant for it"
                );
            }
            backend.health.set_refused(info.clone(), reason);
        }
        Err(e) => {
            if was_up || !backend.health.was_checked() {
                tracing::warn!(
                    backend = %backend.name,
                    error = %e,
                    "Embedding backend failed its health check"
                );
            }
            backend.health.set_error(e.to_string());
        }
    }
    metrics::gauge!(m::BACKEND_UP, label::BACKEND => backend.name.clone())
        .set(if backend.health.is_up() { 1.0 } else { 0.0 });
    BackendCheck {
        name: backend.name.clone(),
        model: backend.model.clone(),
        result,
    }
}

/// Probes every backend every `interval` until `stop`.
pub async fn run(router: Arc<Router>, interval: Duration, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = router.check_all() => {}
        }
    }
}

/// Why start-up must stop, if it must: every backend that answered serves
/// another dimension (then `embedding.dimensions` itself is likely wrong).
/// Backends that did not answer are survivable: they may come up later.
pub fn startup_verdict(checks: &[BackendCheck], dimensions: usize) -> Result<(), String> {
    let answered: Vec<(&BackendCheck, &ModelInfo)> = checks
        .iter()
        .filter_map(|c| c.result.as_ref().ok().map(|info| (c, info)))
        .collect();
    if answered.is_empty() || answered.iter().any(|(_, i)| i.dimensions == dimensions) {
        return Ok(());
    }
    let lines: Vec<String> = answered
        .iter()
        .map(|(c, info)| {
            format!(
                "backend `{}` serves model `{}` with {}-dimensional vectors",
                c.name, c.model, info.dimensions
            )
        })
        .collect();
    let got = answered.first().map_or(0, |(_, i)| i.dimensions);
    Err(format!(
        "{}, but embedding.dimensions is {dimensions}; set embedding.dimensions = {got} \
         (on an empty database) or configure the model you meant",
        lines.join("; ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(name: &str, result: Result<usize, ()>) -> BackendCheck {
        BackendCheck {
            name: name.into(),
            model: "m".into(),
            result: result
                .map(|dimensions| ModelInfo {
                    dimensions,
                    context_length: None,
                })
                .map_err(|()| EmbedError::Unreachable("down".into())),
        }
    }

    #[test]
    fn start_fails_only_when_every_answer_has_the_wrong_dimension() {
        assert!(startup_verdict(&[check("a", Err(()))], 768).is_ok());
        assert!(startup_verdict(&[check("a", Ok(384)), check("b", Ok(768))], 768).is_ok());
        assert!(startup_verdict(&[check("a", Ok(384)), check("b", Err(()))], 768).is_err());
        let text = startup_verdict(&[check("a", Ok(384))], 768)
            .err()
            .unwrap_or_default();
        assert!(text.contains("backend `a`"), "{text}");
        assert!(text.contains("384-dimensional"), "{text}");
        assert!(text.contains("embedding.dimensions = 384"), "{text}");
    }
}
