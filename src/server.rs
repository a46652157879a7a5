//! Wires the stages together and owns start-up and shutdown order.
//!
//! Start-up: metrics → database (managed cluster when `database.url` is
//! empty) → migrations and vector index → embedding backend probe (a
//! missing backend is survivable) → queue and pipeline → listeners.
//!
//! Shutdown (SIGTERM/SIGINT): new conversations get 503 → the queue closes →
//! the pipeline drains it through embedding and storage until
//! `shutdown.timeout_ms` → listeners stop → the managed cluster stops.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{BackendKind, Settings};
use crate::embed::cache::EmbeddingCache;
use crate::embed::ollama::OllamaBackend;
use crate::embed::{EmbedError, Embedder};
use crate::ingress::{self, IngressState, Transport};
use crate::model::Conversation;
use crate::pipeline::{DrainDeadline, Pipeline, PipelineContext};
use crate::queue::BoundedQueue;
use crate::store::Store;
use crate::store::managed::ManagedCluster;
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
pub async fn run(
    settings: Settings,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<ExitStatus> {
    let metrics_handle = crate::telemetry::metrics::install();
    create_state_dir(&settings.state_dir)?;

    let mut managed = None;
    let url = if settings.database.url.is_empty() {
        let cluster = ManagedCluster::start(&settings)
            .await
            .context("cannot start the managed PostgreSQL cluster")?;
        let url = cluster.url();
        managed = Some(cluster);
        url
    } else {
        settings.database.url.clone()
    };
    let result = run_with_database(&settings, &url, metrics_handle, shutdown).await;
    if let Some(cluster) = managed
        && let Err(e) = cluster.stop().await
    {
        tracing::error!(error = %e, "Managed PostgreSQL did not stop cleanly");
    }
    result
}

async fn run_with_database(
    settings: &Settings,
    url: &str,
    metrics_handle: metrics_exporter_prometheus::PrometheusHandle,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<ExitStatus> {
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

    let embedder = build_embedder(settings)?;
    let context_tokens = Arc::new(AtomicUsize::new(
        settings.chunking.fallback_context_tokens.get(),
    ));
    let mut background = JoinSet::new();
    let stop_background = CancellationToken::new();
    probe_at_start(
        settings,
        embedder.clone(),
        context_tokens.clone(),
        &mut background,
        stop_background.clone(),
    )
    .await?;

    let queue = Arc::new(BoundedQueue::<Conversation>::new(
        settings.queue.capacity.get(),
        settings.queue.max_bytes.get(),
    ));
    metrics::gauge!(m::QUEUE_CAPACITY).set(queue.capacity() as f64);
    metrics::gauge!(m::QUEUE_MAX_BYTES).set(queue.max_bytes() as f64);
    let ctx = Arc::new(PipelineContext {
        embedder: embedder.clone(),
        cache: Arc::new(EmbeddingCache::new(settings.cache.max_entries)),
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
    });
    let pipeline = Pipeline::start(
        ctx.clone(),
        queue.clone(),
        settings.pipeline.workers.get(),
        settings.batch.max_size.get(),
        Duration::from_millis(settings.batch.max_wait_ms.get()),
    );
    background.spawn(sample_queue(queue.clone(), stop_background.clone()));

    let ingress_state = Arc::new(IngressState::new(
        settings,
        queue.clone(),
        store.clone(),
        metrics_handle,
    ));
    let stop_listeners = CancellationToken::new();
    let mut listeners = JoinSet::new();
    if !settings.server.http_addr.is_empty() {
        let listener = ingress::listen::bind_tcp(&settings.server.http_addr).await?;
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
    if !settings.server.unix_socket.is_empty() {
        let path = Path::new(&settings.server.unix_socket);
        let listener =
            ingress::listen::bind_unix(path, settings.server.socket_mode_bits()?).await?;
        let app = ingress::router(ingress_state.clone(), Transport::Unix);
        let stop = stop_listeners.clone();
        listeners.spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
        });
        tracing::info!(path = %path.display(), "Listening on Unix socket");
    }
    tracing::info!(
        model = %ctx.model,
        dimensions = ctx.dimensions,
        workers = settings.pipeline.workers.get(),
        queue_capacity = queue.capacity(),
        "convstore is running"
    );

    shutdown.await;

    tracing::info!(
        queued = queue.len(),
        "Shutting down: refusing new conversations, draining the queue"
    );
    ingress_state.begin_shutdown();
    queue.close();
    let deadline =
        tokio::time::Instant::now() + Duration::from_millis(settings.shutdown.timeout_ms.get());
    let report = pipeline.drain(&queue, deadline).await;
    let status = if report.completed && report.queued_left == 0 && report.in_flight_left == 0 {
        tracing::info!("Queue drained: everything accepted was stored");
        ExitStatus::Clean
    } else {
        tracing::error!(
            queued_left = report.queued_left,
            in_flight_left = report.in_flight_left,
            timeout_ms = settings.shutdown.timeout_ms.get(),
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
    if !settings.server.unix_socket.is_empty() {
        let _ = std::fs::remove_file(&settings.server.unix_socket);
    }
    store.close().await;
    Ok(status)
}

fn build_embedder(settings: &Settings) -> anyhow::Result<Arc<dyn Embedder>> {
    let Some(backend) = settings.embedding.backends.first() else {
        anyhow::bail!("embedding.backends is empty");
    };
    if settings.embedding.backends.len() > 1 {
        tracing::warn!(
            using = %backend.name,
            configured = settings.embedding.backends.len(),
            "Several embedding backends are configured; this version sends everything to the first one"
        );
    }
    match backend.kind {
        BackendKind::Ollama => Ok(Arc::new(OllamaBackend::new(
            &backend.name,
            &backend.url,
            settings.embedding.model_for(backend),
            Duration::from_millis(backend.timeout_ms.get()),
        )?)),
        other => anyhow::bail!(
            "embedding.backends[0].kind = {other:?} is not supported by this version; use \"ollama\""
        ),
    }
}

/// Probes the backend once. Unreachable is survivable: the daemon accepts
/// conversations up to the queue limit and a background task keeps
/// probing. A wrong dimension is not: the vectors could not be stored.
async fn probe_at_start(
    settings: &Settings,
    embedder: Arc<dyn Embedder>,
    context_tokens: Arc<AtomicUsize>,
    background: &mut JoinSet<()>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let dims = settings.embedding.dimensions.get();
    match embedder.probe().await {
        Ok(info) => {
            check_dimensions(&embedder, dims, info.dimensions)?;
            apply_context(&embedder, &context_tokens, info.context_length);
            metrics::gauge!(m::BACKEND_UP, "backend" => embedder.name().to_string()).set(1.0);
            Ok(())
        }
        Err(EmbedError::DimensionMismatch { got, .. }) => check_dimensions(&embedder, dims, got),
        Err(e) => {
            metrics::gauge!(m::BACKEND_UP, "backend" => embedder.name().to_string()).set(0.0);
            tracing::warn!(
                backend = embedder.name(),
                error = %e,
                "Embedding backend not usable at start; accepting conversations up to the queue limit and retrying"
            );
            background.spawn(reprobe(embedder, dims, context_tokens, stop));
            Ok(())
        }
    }
}

fn check_dimensions(
    embedder: &Arc<dyn Embedder>,
    expected: usize,
    got: usize,
) -> anyhow::Result<()> {
    if expected != got {
        anyhow::bail!(
            "backend `{}` serves model `{}` with {got}-dimensional vectors, but embedding.dimensions is {expected}; \
             set embedding.dimensions = {got} (on an empty database) or configure the model you meant",
            embedder.name(),
            embedder.model()
        );
    }
    Ok(())
}

fn apply_context(
    embedder: &Arc<dyn Embedder>,
    context_tokens: &AtomicUsize,
    context: Option<usize>,
) {
    if let Some(ctx) = context {
        context_tokens.store(ctx, Ordering::Relaxed);
    }
    tracing::info!(
        backend = embedder.name(),
        model = embedder.model(),
        context_tokens = context_tokens.load(Ordering::Relaxed),
        "Embedding backend ready"
    );
}

/// Keeps probing a backend that was not usable at start, until it is.
async fn reprobe(
    embedder: Arc<dyn Embedder>,
    dims: usize,
    context_tokens: Arc<AtomicUsize>,
    stop: CancellationToken,
) {
    let mut backoff =
        crate::pipeline::retry::Backoff::new(Duration::from_millis(500), Duration::from_secs(15));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff.next_delay(None)) => {}
        }
        match embedder.probe().await {
            Ok(info) if info.dimensions == dims => {
                apply_context(&embedder, &context_tokens, info.context_length);
                metrics::gauge!(m::BACKEND_UP, "backend" => embedder.name().to_string()).set(1.0);
                return;
            }
            Ok(info) => tracing::error!(
                backend = embedder.name(),
                got = info.dimensions,
                expected = dims,
                "Embedding backend returns vectors of the wrong dimension; conversations will be stored as pending"
            ),
            Err(e) => {
                tracing::debug!(backend = embedder.name(), error = %e, "Embedding backend still not usable")
            }
        }
    }
}

/// Queue gauges once a second, keeping the hot path free of them.
async fn sample_queue(queue: Arc<BoundedQueue<Conversation>>, stop: CancellationToken) {
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
