//! Wires the stages together and owns start-up and shutdown order.
//!
//! Start-up: metrics → database (managed cluster when `database.url` is
//! empty) → migrations and vector index → embedding backend probe and
//! warm-up (a missing backend is survivable) → queue and pipeline →
//! listeners (passed by systemd, or bound) → `READY=1`.
//!
//! Running: SIGHUP reloads the configuration's live keys
//! ([`crate::systemd::reload`]); status and watchdog pings go to systemd
//! while the pipeline makes progress ([`crate::systemd::supervisor`]).
//!
//! Shutdown (SIGTERM/SIGINT): `STOPPING=1` → new conversations get 503 →
//! the queue closes → the pipeline drains it through embedding and storage
//! until `shutdown.timeout_ms` → listeners stop → the managed cluster stops.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{BackendKind, Settings};
use crate::embed::Embedder;
use crate::embed::builtin::BuiltinBackend;
use crate::embed::cache::EmbeddingCache;
use crate::embed::ollama::OllamaBackend;
use crate::embed::openai::OpenAiBackend;
use crate::embed::router::{BackendSpec, Router, RouterConfig};
use crate::ingress::{self, IngressState, Transport};
use crate::pipeline::ack::Queued;
use crate::pipeline::batcher::BatchLimits;
use crate::pipeline::{DrainDeadline, Pipeline, PipelineContext};
use crate::queue::BoundedQueue;
use crate::store::Store;
use crate::store::managed::ManagedCluster;
use crate::systemd::progress::Sample;
use crate::systemd::reload::Reloader;
use crate::systemd::supervisor::Supervisor;
use crate::telemetry::metrics as m;

/// How the daemon ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// Everything accepted was stored.
    Clean,
    /// The drain deadline passed with conversations not stored.
    DrainIncomplete,
}

/// Runs the daemon until `shutdown` resolves, then drains and stops.
/// SIGHUP reloads from the environment only; see [`serve`].
pub async fn run(
    settings: Settings,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<ExitStatus> {
    serve(settings, None, shutdown).await
}

/// [`run`], with SIGHUP re-reading `config_path` (the file the settings
/// came from).
pub async fn serve(
    settings: Settings,
    config_path: Option<PathBuf>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<ExitStatus> {
    // SIGHUP's default action ends the process: take it over before
    // anything slow, so an early reload request cannot kill start-up.
    let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot install the SIGHUP (reload) handler")?;
    let supervisor = Supervisor::from_env();
    let inherited = crate::systemd::activation::take_listeners()?;
    let metrics_handle = crate::telemetry::metrics::install();
    create_state_dir(&settings.state_dir)?;

    let mut managed = None;
    let url = if settings.database.url.is_empty() {
        supervisor.starting("managed PostgreSQL");
        let cluster = ManagedCluster::start(&settings)
            .await
            .context("cannot start the managed PostgreSQL cluster")?;
        let url = cluster.url();
        managed = Some(cluster);
        url
    } else {
        settings.database.url.clone()
    };
    let started = Started {
        supervisor: supervisor.clone(),
        inherited,
        hangup,
        config_path,
    };
    // The managed server is restarted if it dies while we run
    // (docs/DURABILITY.md, "Database outages").
    let managed: crate::store::managed_watch::SharedCluster =
        Arc::new(tokio::sync::Mutex::new(managed));
    let stop_watch = CancellationToken::new();
    let watch = settings.database.url.is_empty().then(|| {
        tokio::spawn(crate::store::managed_watch::watch(
            managed.clone(),
            settings.clone(),
            stop_watch.clone(),
        ))
    });
    let result = run_with_database(&settings, &url, metrics_handle, started, shutdown).await;
    stop_watch.cancel();
    if let Some(watch) = watch {
        let _ = watch.await;
    }
    let managed = managed.lock().await.take();
    if managed.is_some() {
        supervisor.status("Stopping: managed PostgreSQL");
    }
    if let Some(cluster) = managed
        && let Err(e) = cluster.stop().await
    {
        tracing::error!(error = %e, "Managed PostgreSQL did not stop cleanly");
    }
    result
}

/// What [`serve`] set up before the database.
struct Started {
    supervisor: Arc<Supervisor>,
    inherited: ingress::listen::Inherited,
    hangup: tokio::signal::unix::Signal,
    config_path: Option<PathBuf>,
}

async fn run_with_database(
    settings: &Settings,
    url: &str,
    metrics_handle: metrics_exporter_prometheus::PrometheusHandle,
    started: Started,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<ExitStatus> {
    let Started {
        supervisor,
        inherited,
        hangup,
        config_path,
    } = started;
    supervisor.starting("connecting to PostgreSQL, applying migrations");
    let store = Arc::new(
        Store::connect_with(url, &settings.database)
            .await
            .context("cannot connect to PostgreSQL (database.url)")?,
    );
    store.migrate().await.context("cannot apply migrations")?;
    store
        .ensure_vector_column(settings.embedding.dimensions.get())
        .await
        .context("cannot prepare the vector column and HNSW index")?;

    let context_tokens = Arc::new(AtomicUsize::new(
        settings.chunking.fallback_context_tokens.get(),
    ));
    let (embedder, search_embedder) = build_embedder(settings)?;
    let embedder = Arc::new(embedder.with_context_sink(context_tokens.clone()));
    let mut background = JoinSet::new();
    let stop_background = CancellationToken::new();
    supervisor.starting(&format!(
        "probing and warming up {} embedding backend(s)",
        embedder.backend_count()
    ));
    let warm = probe_at_start(
        settings,
        embedder.clone(),
        &mut background,
        stop_background.clone(),
    )
    .await?;

    // Before the pipeline: a journal that cannot be opened stops start-up
    // before anything is accepted.
    let journal = crate::journal::open_from_settings(settings)?;
    let queue = Arc::new(BoundedQueue::<Queued>::new(
        settings.queue.capacity.get(),
        settings.queue.max_bytes.get(),
    ));
    metrics::gauge!(m::QUEUE_CAPACITY).set(queue.capacity() as f64);
    metrics::gauge!(m::QUEUE_MAX_BYTES).set(queue.max_bytes() as f64);
    let ctx = Arc::new(PipelineContext {
        embedder: embedder.clone(),
        cache: Arc::new(EmbeddingCache::new(settings.cache.max_entries)),
        shared_cache: settings.cache.shared,
        store: store.clone(),
        model: Arc::from(embedder.model()),
        dimensions: settings.embedding.dimensions.get(),
        context_tokens,
        max_chunk_tokens: settings.chunking.max_tokens,
        max_batch_inputs: settings.embedding.max_batch_inputs.get(),
        retry_initial: Duration::from_millis(settings.embedding.retry_initial_ms.get()),
        retry_max: Duration::from_millis(settings.embedding.retry_max_ms.get()),
        drain: Arc::new(DrainDeadline::default()),
        in_flight: Arc::new(AtomicUsize::new(0)),
        batches_done: Arc::new(AtomicU64::new(0)),
        conversations_done: Arc::new(AtomicU64::new(0)),
        calls_done: Arc::new(AtomicU64::new(0)),
    });
    let batch_limits = Arc::new(BatchLimits::new(
        settings.batch.max_size.get(),
        Duration::from_millis(settings.batch.max_wait_ms.get()),
    ));
    let pipeline = Pipeline::start(
        ctx.clone(),
        queue.clone(),
        settings.pipeline.workers.get(),
        batch_limits.clone(),
    );
    background.spawn(sample_queue(queue.clone(), stop_background.clone()));
    // Stopped when shutdown begins: the drain gets the backends to itself.
    let stop_backfill = stop_background.child_token();
    if settings.backfill.enabled {
        background.spawn(crate::pipeline::backfill::run(
            ctx.clone(),
            embedder.clone(),
            crate::pipeline::backfill::BackfillConfig::from_settings(&settings.backfill),
            stop_backfill.clone(),
        ));
    }
    let probe = crate::telemetry::stats::PipelineProbe {
        in_flight: ctx.in_flight.clone(),
        workers: settings.pipeline.workers.get(),
    };
    crate::telemetry::stats::global().attach_pipeline(probe.clone());
    background.spawn(crate::telemetry::background::run(
        crate::telemetry::stats::global().clone(),
        metrics_handle.clone(),
        Some(store.clone()),
        Some(probe),
        stop_background.clone(),
    ));
    let metrics_listener = bind_metrics_listener(settings).await?;

    let ingress_state = Arc::new(
        IngressState::new(settings, queue.clone(), store.clone(), metrics_handle)
            .with_journal(journal.as_ref().map(|(j, _)| j.clone())),
    );
    ingress_state.attach_router(embedder.clone());
    ingress_state.attach_search(Arc::new(crate::ingress::search::SearchService::new(
        crate::embed::query::QueryEmbedder::new(
            Arc::new(search_embedder),
            ctx.cache.clone(),
            &ctx.model,
            ctx.dimensions,
        ),
        crate::store::search::Searcher::new(
            (*store).clone(),
            settings.search.exact_threshold.get(),
        ),
        &settings.search,
    )));
    // What an earlier run journaled and did not store goes back on the
    // queue before anything new is accepted.
    if let Some((journal, recovery)) = journal {
        supervisor.starting("replaying the journal");
        crate::journal::replay_at_start(
            &journal,
            recovery,
            &store,
            &queue,
            &ingress_state.in_flight,
        )
        .await?;
    }
    let stop_listeners = CancellationToken::new();
    let mut listeners = JoinSet::new();
    let opened = ingress::listen::open(&settings.server, inherited).await?;
    let own_socket_file = opened.own_socket_file.clone();
    if let Some(path) = &own_socket_file {
        ingress::auth::apply_socket_owner(path, &settings.auth).map_err(anyhow::Error::msg)?;
    }
    ingress::auth::warn_if_exposed(settings);
    for listener in opened.tcp {
        let addr = listener.local_addr()?;
        let app = ingress::router(ingress_state.clone(), Transport::Tcp);
        let stop = stop_listeners.clone();
        listeners.spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
        });
        tracing::info!(addr = %addr, "Listening on TCP");
    }
    for listener in opened.unix {
        let path = listener
            .local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(Path::to_path_buf))
            .unwrap_or_default();
        let app = ingress::router(ingress_state.clone(), Transport::Unix);
        let stop = stop_listeners.clone();
        listeners.spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
        });
        tracing::info!(path = %path.display(), "Listening on Unix socket");
    }
    if let Some(listener) = metrics_listener {
        let addr = listener.local_addr()?;
        let app = ingress::stats::metrics_router(ingress_state.metrics.clone());
        let stop = stop_listeners.clone();
        listeners.spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
        });
        tracing::info!(addr = %addr, "Serving /metrics on the metrics listener");
    }
    warn_if_watchdog_too_short(settings, supervisor.watchdog());
    let reloader = Arc::new(Reloader::new(
        config_path,
        settings.clone(),
        ingress_state.clone(),
        batch_limits,
    ));
    background.spawn(reload_on_sighup(
        hangup,
        reloader.clone(),
        supervisor.clone(),
        stop_background.clone(),
    ));
    tracing::info!(
        model = %ctx.model,
        dimensions = ctx.dimensions,
        workers = settings.pipeline.workers.get(),
        queue_capacity = queue.capacity(),
        "convstore is running"
    );
    // Listeners bound, the database answered (migrations ran), the backend
    // warmed up (or is known to be down: waiting for it would only make
    // systemd's start time out while conversations can be queued).
    supervisor.ready(&if warm {
        format!("Ready: model {} warm", ctx.model)
    } else {
        format!(
            "Ready without embedding: backend {} not usable yet; conversations wait in the queue",
            embedder.name()
        )
    });
    {
        let queue = queue.clone();
        let ctx = ctx.clone();
        background.spawn(supervisor.clone().run(
            move || Sample {
                queued: queue.len(),
                in_flight: ctx.in_flight.load(Ordering::Relaxed),
                batches_done: ctx.batches_done.load(Ordering::Relaxed),
                conversations_done: ctx.conversations_done.load(Ordering::Relaxed),
                calls_done: ctx.calls_done.load(Ordering::Relaxed),
            },
            stop_background.clone(),
        ));
    }

    shutdown.await;

    // A reload may have changed the deadline.
    let timeout_ms = reloader.current().shutdown.timeout_ms.get();
    tracing::info!(
        queued = queue.len(),
        "Shutting down: refusing new conversations, draining the queue"
    );
    ingress_state.begin_shutdown();
    stop_backfill.cancel();
    queue.close();
    let drain_for = Duration::from_millis(timeout_ms);
    supervisor.stopping(std::time::Instant::now() + drain_for, queue.len());
    let deadline = tokio::time::Instant::now() + drain_for;
    let report = pipeline.drain(&queue, deadline).await;
    let status = if report.completed && report.queued_left == 0 && report.in_flight_left == 0 {
        tracing::info!("Queue drained: everything accepted was stored");
        ExitStatus::Clean
    } else {
        tracing::error!(
            queued_left = report.queued_left,
            in_flight_left = report.in_flight_left,
            timeout_ms,
            "Shutdown deadline passed: these accepted conversations were NOT stored"
        );
        ExitStatus::DrainIncomplete
    };

    stop_listeners.cancel();
    stop_background.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while listeners.join_next().await.is_some() {}
        while background.join_next().await.is_some() {}
    })
    .await;
    listeners.abort_all();
    background.abort_all();
    // A socket passed by systemd stays: its .socket unit owns the file.
    if let Some(path) = own_socket_file {
        let _ = std::fs::remove_file(path);
    }
    if let Some(journal) = ingress_state.journal().cloned() {
        crate::journal::close_at_exit(journal).await;
    }
    store.close().await;
    Ok(status)
}

/// The router over every configured backend, and the search lane's router
/// over the same clients (`crate::embed::query`).
fn build_embedder(settings: &Settings) -> anyhow::Result<(Router, Router)> {
    let mut specs = Vec::with_capacity(settings.embedding.backends.len());
    let mut search_clients = Vec::with_capacity(settings.embedding.backends.len());
    for (i, backend) in settings.embedding.backends.iter().enumerate() {
        let (client, search_client) = build_backend(settings, i, backend)?;
        search_clients.push((search_client, backend));
        specs.push(BackendSpec::from_settings(client, backend));
    }
    if specs.is_empty() {
        anyhow::bail!("embedding.backends is empty");
    }
    Ok((
        Router::new(RouterConfig::from_settings(&settings.embedding), specs),
        crate::embed::query::search_router(settings, search_clients),
    ))
}

/// The client of backend `i`, by its kind, for ingest and for search
/// queries: the same HTTP client; for builtin, the same model with an
/// inference pool of its own for queries.
fn build_backend(
    settings: &Settings,
    i: usize,
    backend: &crate::config::BackendSettings,
) -> anyhow::Result<(Arc<dyn Embedder>, Arc<dyn Embedder>)> {
    let timeout = Duration::from_millis(backend.timeout_ms.get());
    let shared = |client: Arc<dyn Embedder>| Ok((client.clone(), client));
    match backend.kind {
        BackendKind::Ollama => shared(Arc::new(OllamaBackend::new(
            &backend.name,
            &backend.url,
            settings.embedding.model_for(backend),
            timeout,
        )?)),
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
            shared(Arc::new(OpenAiBackend::new(
                &backend.name,
                &backend.url,
                settings.embedding.model_for(backend),
                key.as_deref(),
                backend.encoding_format,
                timeout,
            )?))
        }
        BackendKind::Builtin => {
            let builtin = BuiltinBackend::load(
                &backend.name,
                &backend.model_dir,
                settings.embedding.model_for(backend),
                &settings.state_dir,
            )
            .with_context(|| {
                format!(
                    "cannot load the builtin embedding model of backend `{}`",
                    backend.name
                )
            })?;
            tracing::info!(backend = %backend.name, model = builtin.model(), dir = %builtin.model_dir().display(), "Builtin embedding model loaded");
            let search = builtin.with_own_pool(settings.search.backend_in_flight.get());
            Ok((Arc::new(builtin), Arc::new(search)))
        }
    }
}

/// Probes every backend once and warms up those that answer. A backend
/// that does not answer is survivable (it gets calls, its breaker decides;
/// the health check keeps probing). A backend with another dimension is
/// refused; if every backend that answered has another dimension, start-up
/// fails: `embedding.dimensions` itself is likely wrong. Returns whether a
/// backend is warm.
async fn probe_at_start(
    settings: &Settings,
    router: Arc<Router>,
    background: &mut JoinSet<()>,
    stop: CancellationToken,
) -> anyhow::Result<bool> {
    let dims = settings.embedding.dimensions.get();
    let checks = router.check_all().await;
    crate::embed::router::health::startup_verdict(&checks, dims).map_err(anyhow::Error::msg)?;
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
    background.spawn(crate::embed::router::health::run(
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
fn warn_if_watchdog_too_short(settings: &Settings, watchdog: Option<Duration>) {
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

/// SIGHUP: reload the configuration, bracketed by RELOADING=1 / READY=1.
async fn reload_on_sighup(
    mut hangup: tokio::signal::unix::Signal,
    reloader: Arc<Reloader>,
    supervisor: Arc<Supervisor>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            got = hangup.recv() => {
                if got.is_none() {
                    return;
                }
                tracing::info!("SIGHUP received: reloading the configuration");
                supervisor.reloading();
                let outcome = reloader.reload();
                supervisor.reloaded(&outcome.summary(), outcome.lasting_note());
            }
        }
    }
}

/// The metrics-only listener (`metrics.listen`), when configured.
async fn bind_metrics_listener(
    settings: &Settings,
) -> anyhow::Result<Option<tokio::net::TcpListener>> {
    let addr = &settings.metrics.listen;
    if addr.is_empty() {
        return Ok(None);
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (metrics.listen)"))?;
    if listener.local_addr().is_ok_and(|a| !a.ip().is_loopback()) {
        tracing::warn!(addr = %addr, "metrics.listen is not a loopback address: anyone who can reach it can read the metrics");
    }
    Ok(Some(listener))
}

/// Queue gauges once a second, keeping the hot path free of them.
async fn sample_queue(queue: Arc<BoundedQueue<Queued>>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {
                metrics::gauge!(m::QUEUE_DEPTH).set(queue.len() as f64);
                metrics::gauge!(m::QUEUE_BYTES).set(queue.bytes() as f64);
            }
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = int.recv() => tracing::info!("SIGINT received"),
            }
        }
        _ => {
            tracing::warn!("Cannot install signal handlers; stop with Ctrl-C");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Creates `state_dir` (mode 0711) if missing. 0711, not the umask's 0700
/// under systemd's `UMask=0077`: as root, the managed cluster's unprivileged
/// account must be able to traverse it to reach its own data directory.
fn create_state_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(dir)
        .with_context(|| format!("cannot create state_dir {}", dir.display()))?;
    // The mode given to mkdir is filtered by the umask; set it explicitly.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
        .with_context(|| format!("cannot set the mode of state_dir {}", dir.display()))
}

/// `convstore migrate`: migrations and the vector index, nothing else.
pub async fn migrate_only(settings: &Settings) -> anyhow::Result<()> {
    let mut managed = None;
    let url = if settings.database.url.is_empty() {
        let cluster = ManagedCluster::start(settings)
            .await
            .context("cannot start the managed PostgreSQL cluster")?;
        let url = cluster.url();
        managed = Some(cluster);
        url
    } else {
        settings.database.url.clone()
    };
    let result = async {
        let store = Store::connect(
            &url,
            2,
            Duration::from_millis(settings.database.connect_timeout_ms.get()),
        )
        .await?;
        store.migrate().await?;
        store
            .ensure_vector_column(settings.embedding.dimensions.get())
            .await?;
        store.close().await;
        anyhow::Ok(())
    }
    .await;
    if let Some(cluster) = managed {
        cluster.stop().await?;
    }
    result
}
