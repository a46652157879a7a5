//! Serving and stopping a built [`App`]: one task per listener, READY, the
//! reload handler and the watchdog; then, when `shutdown` resolves, the
//! shutdown order of `convstore serve` (docs/DURABILITY.md): refuse new
//! conversations → close the queue → drain it through embedding and
//! storage until `shutdown.timeout_ms` → stop the listeners and the
//! background tasks → close the journal and the pool.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use convstore_embed::Embedder as _;
use convstore_telemetry::metrics as m;

use super::App;
use super::embedders::warn_if_watchdog_too_short;
use crate::config::Settings;
use crate::http::listen::Listeners;
use crate::http::{self, Transport};
use crate::queue::BoundedQueue;
use crate::systemd::progress::Sample;
use crate::systemd::reload::Reloader;
use crate::systemd::supervisor::Supervisor;
use crate::ticket::Queued;

/// How the daemon ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// Everything accepted was stored.
    Clean,
    /// The drain deadline passed with conversations not stored.
    DrainIncomplete,
}

/// What the daemon answers to besides its listeners: the service manager,
/// and SIGHUP. [`Control::none`] for a daemon run in process (tests).
pub struct Control {
    pub supervisor: Arc<Supervisor>,
    /// SIGHUP, taken over at start: each one reloads `config_path` (or the
    /// environment, without one).
    pub hangup: Option<tokio::signal::unix::Signal>,
    pub config_path: Option<PathBuf>,
}

impl Control {
    /// No service manager (unless `NOTIFY_SOCKET` says so), no reload.
    pub fn none() -> Self {
        Self {
            supervisor: Supervisor::from_env(),
            hangup: None,
            config_path: None,
        }
    }
}

impl App {
    /// Serves on `listeners` until `shutdown` resolves, then drains and
    /// stops. Every listener, whatever its kind, is served by
    /// [`spawn_listener`] and stopped by the same token.
    pub async fn run(
        self,
        listeners: Listeners,
        control: Control,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<ExitStatus> {
        let App {
            settings,
            store,
            embedder,
            ctx,
            queue,
            pipeline,
            ingress,
            batch_limits,
            mut background,
            stop_background,
            stop_backfill,
            retention,
            warm,
        } = self;
        let Control {
            supervisor,
            hangup,
            config_path,
        } = control;

        let stop_listeners = CancellationToken::new();
        let mut served = JoinSet::new();
        let limits = connection_limits(&settings);
        for listener in listeners.tcp {
            let addr = listener.local_addr()?;
            let app = http::router(ingress.clone(), Transport::Tcp);
            spawn_listener(&mut served, listener, app, limits, "tcp", &stop_listeners);
            tracing::info!(addr = %addr, "Listening on TCP");
        }
        for listener in listeners.unix {
            let path = listener
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(Path::to_path_buf))
                .unwrap_or_default();
            let app = http::router(ingress.clone(), Transport::Unix);
            spawn_listener(&mut served, listener, app, limits, "unix", &stop_listeners);
            tracing::info!(path = %path.display(), "Listening on Unix socket");
        }
        if let Some(listener) = listeners.metrics {
            let addr = listener.local_addr()?;
            let app = http::stats::metrics_router(ingress.metrics.clone());
            spawn_listener(
                &mut served,
                listener,
                app,
                limits,
                "metrics",
                &stop_listeners,
            );
            tracing::info!(addr = %addr, "Serving /metrics on the metrics listener");
        }
        warn_if_watchdog_too_short(&settings, supervisor.watchdog());
        let reloader = Arc::new(Reloader::new(
            config_path,
            settings.clone(),
            ingress.clone(),
            batch_limits,
            retention,
        ));
        if let Some(hangup) = hangup {
            background.spawn(reload_on_sighup(
                hangup,
                reloader.clone(),
                supervisor.clone(),
                stop_background.clone(),
            ));
        }
        tracing::info!(
            model = %ctx.model,
            dimensions = ctx.dimensions,
            workers = settings.pipeline.workers.get(),
            queue_capacity = queue.capacity(),
            "convstore is running"
        );
        // Listeners bound, the database answered (migrations ran), the
        // backend warmed up (or is known to be down: waiting for it would
        // only make systemd's start time out while conversations can be
        // queued).
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
        ingress.begin_shutdown();
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
            while served.join_next().await.is_some() {}
            while background.join_next().await.is_some() {}
        })
        .await;
        served.abort_all();
        background.abort_all();
        // A socket passed by systemd stays: its .socket unit owns the file.
        if let Some(path) = listeners.own_socket_file {
            let _ = std::fs::remove_file(path);
        }
        if let Some(journal) = ingress.journal().cloned() {
            convstore_journal::close_at_exit(journal).await;
        }
        close_pool(&store).await;
        Ok(status)
    }
}

/// How long closing the database pool may wait for its connections to come
/// back. A statement still waiting on the database (on a lock another
/// session holds, say) would hold the close, and so the exit, forever: past
/// `shutdown.timeout_ms`, which the drain has already spent. Stopping the
/// managed cluster, or the process's exit, ends such connections.
const POOL_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Closes the pool within [`POOL_CLOSE_TIMEOUT`].
pub(super) async fn close_pool(store: &convstore_store::Store) {
    if tokio::time::timeout(POOL_CLOSE_TIMEOUT, store.close())
        .await
        .is_err()
    {
        let pool = store.pool();
        tracing::warn!(
            busy = (pool.size() as usize).saturating_sub(pool.num_idle()),
            waited_ms = POOL_CLOSE_TIMEOUT.as_millis() as u64,
            "Database connections still busy after the drain (a statement waiting on a lock?): exiting without them"
        );
    }
}

/// Serves `app` on `listener` (TCP, Unix, activated or bound: anything
/// axum can accept on) under the connection limits until `stop` is
/// cancelled, then finishes the requests in flight.
fn spawn_listener<L>(
    served: &mut JoinSet<std::io::Result<()>>,
    listener: L,
    app: axum::Router,
    limits: http::serve::ConnectionLimits,
    transport: &'static str,
    stop: &CancellationToken,
) where
    L: axum::serve::Listener,
{
    served.spawn(http::serve::serve(
        listener,
        app,
        limits,
        transport,
        stop.clone(),
    ));
}

fn connection_limits(settings: &Settings) -> http::serve::ConnectionLimits {
    http::serve::ConnectionLimits {
        max_connections: settings.server.max_connections.get(),
        header_timeout: Duration::from_millis(settings.server.header_timeout_ms.get()),
        idle_timeout: Duration::from_millis(settings.server.idle_timeout_ms.get()),
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
pub(super) async fn bind_metrics_listener(
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
pub(super) async fn sample_queue(queue: Arc<BoundedQueue<Queued>>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {
                metrics::gauge!(m::QUEUE_DEPTH).set(queue.len() as f64);
                metrics::gauge!(m::QUEUE_BYTES).set(queue.bytes() as f64);
                metrics::gauge!(m::QUEUE_OLDEST_AGE_SECONDS)
                    .set(oldest_queued_age(&queue).unwrap_or(0.0));
            }
        }
    }
}

/// Seconds since the oldest queued conversation was accepted.
pub fn oldest_queued_age(queue: &BoundedQueue<Queued>) -> Option<f64> {
    queue.oldest(|q| q.change.change.received_instant().elapsed().as_secs_f64())
}
