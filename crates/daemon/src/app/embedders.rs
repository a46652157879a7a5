//! The embedding side of start-up: one client per configured backend (by
//! kind), the ingest router and the search lane's router over them, the
//! start-up probe and warm-up, and the watchdog check against the longest
//! call the pipeline may wait on.

use std::sync::Arc;
use std::time::Duration;

#[cfg(feature = "builtin")]
use anyhow::Context;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use convstore_embed::ollama::OllamaBackend;
use convstore_embed::openai::OpenAiBackend;
use convstore_embed::router::{BackendSpec, Router, RouterConfig};
use convstore_embed::tokenizer::{FileTokenCounter, WithTokenizer};
use convstore_embed::{ClientConfig, Embedder};
#[cfg(feature = "builtin")]
use convstore_embed_builtin::BuiltinBackend;
#[cfg(feature = "builtin")]
use convstore_embed_builtin::engine::EngineOptions;

use crate::config::{BackendKind, Settings};

/// The router over every configured backend, and the search lane's router
/// over the same clients (`convstore_embed::query`).
pub(super) fn build_embedder(settings: &Settings) -> anyhow::Result<(Router, Router)> {
    let mut specs = Vec::with_capacity(settings.embedding.backends.len());
    let mut search_clients = Vec::with_capacity(settings.embedding.backends.len());
    for (i, backend) in settings.embedding.backends.iter().enumerate() {
        let (client, search_client) = build_backend(settings, i, backend)?;
        let (client, search_client) = with_tokenizer(i, backend, client, search_client)?;
        search_clients.push((search_client, backend));
        specs.push(BackendSpec::from_settings(client, backend));
    }
    if specs.is_empty() {
        anyhow::bail!("embedding.backends is empty");
    }
    Ok((
        Router::new(RouterConfig::from_settings(&settings.embedding), specs),
        convstore_embed::query::search_router(
            &settings.embedding,
            Duration::from_millis(settings.search.timeout_ms.get()),
            settings.search.backend_in_flight.get(),
            search_clients,
        ),
    ))
}

/// The clients of backend `i` with its `tokenizer` file as their token
/// counter, when one is configured.
fn with_tokenizer(
    i: usize,
    backend: &crate::config::BackendSettings,
    client: Arc<dyn Embedder>,
    search_client: Arc<dyn Embedder>,
) -> anyhow::Result<(Arc<dyn Embedder>, Arc<dyn Embedder>)> {
    if backend.tokenizer.is_empty() {
        return Ok((client, search_client));
    }
    let counter = FileTokenCounter::load(std::path::Path::new(&backend.tokenizer))
        .map_err(|e| anyhow::anyhow!("embedding.backends[{i}].tokenizer: {e}"))?;
    let counter = Arc::new(counter);
    tracing::info!(backend = %backend.name, tokenizer = %backend.tokenizer, "Chunks for this backend are counted with its tokenizer");
    Ok((
        Arc::new(WithTokenizer::new(client, counter.clone())),
        Arc::new(WithTokenizer::new(search_client, counter)),
    ))
}

/// The client of backend `i`, by its kind, for ingest and for search
/// queries: the same HTTP client; for builtin, the same model with a
/// set of inference threads of its own for queries.
fn build_backend(
    settings: &Settings,
    i: usize,
    backend: &crate::config::BackendSettings,
) -> anyhow::Result<(Arc<dyn Embedder>, Arc<dyn Embedder>)> {
    let config = ClientConfig::from_settings(&settings.embedding, backend);
    let model = settings.embedding.model_for(backend);
    match http_client(i, backend, &backend.name, model, config)? {
        Some(client) => Ok((client.clone(), client)),
        None => builtin_backend(settings, backend),
    }
}

/// The HTTP client of backend `i` (Ollama or OpenAI-compatible) under
/// `name`, embedding with `model`; `None` for a builtin backend.
fn http_client(
    i: usize,
    backend: &crate::config::BackendSettings,
    name: &str,
    model: &str,
    config: ClientConfig,
) -> anyhow::Result<Option<Arc<dyn Embedder>>> {
    let client: Arc<dyn Embedder> = match backend.kind {
        BackendKind::Ollama => Arc::new(OllamaBackend::new(name, &backend.url, model, config)?),
        BackendKind::Openai => {
            let key = if backend.api_key_env.is_empty() {
                None
            } else {
                match std::env::var(&backend.api_key_env) {
                    Ok(key) if !key.trim().is_empty() => Some(key),
                    _ => anyhow::bail!(
                        "embedding.backends[{i}].api_key_env names `{}`, but that environment \
                         variable is not set (or empty); export the key in it, or set api_key_env = \"\" \
                         for a server without keys",
                        backend.api_key_env
                    ),
                }
            };
            Arc::new(OpenAiBackend::new(
                name,
                &backend.url,
                model,
                key.as_deref(),
                backend.encoding_format,
                config,
            )?)
        }
        BackendKind::Builtin => return Ok(None),
    };
    Ok(Some(client))
}

/// Suffix of the backend names of the previous model's query lane.
const PREVIOUS_SUFFIX: &str = ":previous";

/// The query lane of the previous model while a change of model
/// re-embeds (docs/SEARCH.md "Changing the model"): every configured HTTP
/// backend asked for the previous model by name (an Ollama or
/// OpenAI-compatible server serves each model it has), under the name
/// `<backend>:previous`. `None` when no backend is an HTTP one (the builtin
/// serves one model); search then reads the new model's vectors.
pub(super) fn build_previous_lane(
    settings: &Settings,
    previous: &convstore_store::models::ModelId,
) -> anyhow::Result<Option<Router>> {
    let mut clients = Vec::new();
    for (i, backend) in settings.embedding.backends.iter().enumerate() {
        let mut config = ClientConfig::from_settings(&settings.embedding, backend);
        config.dimensions = previous.dimensions;
        let name = format!("{}{PREVIOUS_SUFFIX}", backend.name);
        if let Some(client) = http_client(i, backend, &name, &previous.model, config)? {
            clients.push((client, backend));
        }
    }
    if clients.is_empty() {
        return Ok(None);
    }
    Ok(Some(convstore_embed::query::search_router(
        &settings.embedding,
        Duration::from_millis(settings.search.timeout_ms.get()),
        settings.search.backend_in_flight.get(),
        clients,
    )))
}

/// The builtin model (`kind = "builtin"`), with inference threads of its
/// own for search queries.
#[cfg(feature = "builtin")]
fn builtin_backend(
    settings: &Settings,
    backend: &crate::config::BackendSettings,
) -> anyhow::Result<(Arc<dyn Embedder>, Arc<dyn Embedder>)> {
    let engine = EngineOptions {
        engine: backend.engine,
        precision: backend.precision,
        openvino_dir: backend.openvino_dir.clone(),
        ..EngineOptions::default()
    };
    let builtin = BuiltinBackend::load(
        &backend.name,
        &backend.model_dir,
        settings.embedding.model_for(backend),
        &settings.state_dir,
        engine,
    )
    .with_context(|| {
        format!(
            "cannot load the builtin embedding model of backend `{}`",
            backend.name
        )
    })?;
    if let Some(why) = builtin.fallback_reason() {
        tracing::warn!(backend = %backend.name, reason = %why, "OpenVINO not used: the builtin model runs on candle, 10-25x slower (engine = \"auto\"; scripts/setup.sh installs OpenVINO on x86_64)");
    }
    tracing::info!(
        backend = %backend.name,
        model = builtin.model(),
        dir = %builtin.model_dir().display(),
        engine = builtin.engine(),
        precision = builtin.precision(),
        "Builtin embedding model loaded"
    );
    let search = builtin
        .with_own_threads(settings.search.backend_in_flight.get())
        .with_context(|| format!("cannot start the search lane of backend `{}`", backend.name))?;
    Ok((Arc::new(builtin), Arc::new(search)))
}

/// Built without the `builtin` feature: no model to load, and a clear
/// error naming the backend rather than a missing symbol.
#[cfg(not(feature = "builtin"))]
fn builtin_backend(
    _settings: &Settings,
    backend: &crate::config::BackendSettings,
) -> anyhow::Result<(Arc<dyn Embedder>, Arc<dyn Embedder>)> {
    anyhow::bail!(
        "backend `{}` has kind = \"builtin\", but this convstore was built without the builtin model (cargo feature `builtin`, on by default): configure an Ollama or OpenAI-compatible backend, or build with the default features",
        backend.name
    )
}

/// Probes every backend once and warms up those that answer. A backend
/// that does not answer is survivable (it gets calls, its breaker decides;
/// the health check keeps probing). A backend with another dimension is
/// refused; if every backend that answered has another dimension, start-up
/// fails: `embedding.dimensions` itself is likely wrong. Returns whether a
/// backend is warm.
pub(super) async fn probe_at_start(
    settings: &Settings,
    router: Arc<Router>,
    background: &mut JoinSet<()>,
    stop: CancellationToken,
) -> anyhow::Result<bool> {
    let dims = settings.embedding.dimensions.get();
    let checks = router.check_all().await;
    convstore_embed::router::health::startup_verdict(&checks, dims).map_err(anyhow::Error::msg)?;
    for check in &checks {
        if let Err(e) = &check.result {
            tracing::warn!(
                backend = %check.name,
                error = %e,
                "Embedding backend not usable at start; conversations are accepted, and stored \
                 as pending for the backfill if no backend embeds them within embedding.max_wait_ms"
            );
        }
    }
    let warm = router.warm_up().await;
    background.spawn(convstore_embed::router::health::run(
        router,
        Duration::from_millis(settings.embedding.health_interval_ms.get()),
        stop,
    ));
    Ok(warm)
}

/// The watchdog counts a call that has not returned as no progress: one
/// router call may legitimately last `embedding.max_wait_ms` (retries and
/// fail-over) and one backend call `timeout_ms`. A shorter watchdog could
/// restart convstore in the middle of such a call.
pub(super) fn warn_if_watchdog_too_short(settings: &Settings, watchdog: Option<Duration>) {
    let Some(watchdog) = watchdog else { return };
    let mut longest = (
        "embedding.max_wait_ms".to_string(),
        settings.embedding.max_wait_ms.get(),
    );
    for (i, backend) in settings.embedding.backends.iter().enumerate() {
        if backend.timeout_ms.get() > longest.1 {
            longest = (
                format!("embedding.backends[{i}].timeout_ms"),
                backend.timeout_ms.get(),
            );
        }
    }
    if Duration::from_millis(longest.1) >= watchdog {
        tracing::warn!(
            key = %longest.0,
            value_ms = longest.1,
            watchdog_ms = watchdog.as_millis() as u64,
            "WatchdogSec is not longer than the longest call convstore may wait on: a slow backend can get convstore restarted; raise WatchdogSec or lower the key"
        );
    }
}
