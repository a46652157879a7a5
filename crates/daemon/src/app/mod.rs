//! Start-up, serving and shutdown: the composition root.
//!
//! Start-up: metrics → database (managed cluster when `database.url` is
//! empty, [`database`]) → migrations and vector index → embedding backend
//! probe and warm-up (a missing backend is survivable) → queue and
//! pipeline → journal replay ([`App::build`]) → listeners (passed by
//! systemd, or bound) → `READY=1` ([`App::run`]).
//!
//! Running: SIGHUP reloads the configuration's live keys
//! ([`crate::systemd::reload`]); status and watchdog pings go to systemd
//! while the pipeline makes progress ([`crate::systemd::supervisor`]).
//!
//! Shutdown (SIGTERM/SIGINT): `STOPPING=1` → new conversations get 503 →
//! the queue closes → the pipeline drains it through embedding and storage
//! until `shutdown.timeout_ms` → listeners stop → the managed cluster stops.
//!
//! Two ways in: [`serve`] is `convstore serve` (signals, systemd, the
//! configured or activated sockets); [`run`] serves on listeners the
//! caller already bound, until a future resolves: tests bind `:0` and
//! drive the real daemon in process over real sockets.

mod build;
mod database;
mod embedders;
mod fd_limit;
mod run;
mod trim;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

pub use build::App;
pub use database::Database;
pub use run::{Control, ExitStatus, oldest_queued_age};

use crate::config::Settings;
use crate::http;
pub use crate::http::listen::Listeners;
use crate::systemd::supervisor::Supervisor;
use convstore_store::Store;

/// `convstore serve`: runs the daemon until `shutdown` resolves, then
/// drains and stops. SIGHUP re-reads `config_path` (the file the settings
/// came from; the environment only, without one).
/// With `pipeline`, everything behind the queue is built (and so runs) on
/// that runtime, the listeners on the calling one (`crate::runtimes`).
pub async fn serve(
    settings: Settings,
    config_path: Option<PathBuf>,
    shutdown: impl Future<Output = ()>,
    pipeline: Option<tokio::runtime::Handle>,
) -> anyhow::Result<ExitStatus> {
    // SIGHUP's default action ends the process: take it over before
    // anything slow, so an early reload request cannot kill start-up.
    let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot install the SIGHUP (reload) handler")?;
    let control = Control {
        supervisor: Supervisor::from_env(),
        hangup: Some(hangup),
        config_path,
    };
    let inherited = crate::systemd::activation::take_listeners()?;
    // Bound before anything slow: a metrics address that cannot be bound
    // stops start-up at once.
    let metrics_listener = run::bind_metrics_listener(&settings).await?;
    // The API's sockets are opened once the daemon is built (the journal
    // replayed), so nothing new is accepted before.
    let open = async |settings: &Settings| {
        let mut listeners = http::listen::open(&settings.server, inherited).await?;
        listeners.metrics = metrics_listener;
        if let Some(path) = &listeners.own_socket_file {
            http::auth::apply_socket_owner(path, &settings.auth).map_err(anyhow::Error::msg)?;
        }
        http::auth::warn_if_exposed(settings);
        let count =
            listeners.tcp.len() + listeners.unix.len() + usize::from(listeners.metrics.is_some());
        fd_limit::raise_and_check(count, settings.server.max_connections.get());
        anyhow::Ok(listeners)
    };
    build_and_run(settings, control, open, shutdown, pipeline).await
}

/// The daemon in this process on `listeners` the caller bound (and
/// `listeners.metrics`, if set), until `shutdown` resolves: the same
/// start-up, serving and shutdown as [`serve`], without signals, socket
/// activation or reload. Its database is `database.url`, or a managed
/// cluster under `state_dir`.
pub async fn run(
    settings: Settings,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<ExitStatus> {
    let open = async |_: &Settings| anyhow::Ok(listeners);
    build_and_run(settings, Control::none(), open, shutdown, None).await
}

/// What [`serve`] and [`run`] share: the database (stopped at the end
/// whatever happened), [`App::build`], the listeners `open` gives once the
/// daemon is built, [`App::run`].
async fn build_and_run(
    settings: Settings,
    control: Control,
    open: impl AsyncFnOnce(&Settings) -> anyhow::Result<Listeners>,
    shutdown: impl Future<Output = ()>,
    pipeline: Option<tokio::runtime::Handle>,
) -> anyhow::Result<ExitStatus> {
    let metrics = convstore_telemetry::recorder::install();
    create_state_dir(&settings.state_dir)?;
    let supervisor = control.supervisor.clone();
    let database = Database::open(&settings, &supervisor, true).await?;
    let result = async {
        let app = match &pipeline {
            // Built on the pipeline runtime: every task App::build spawns
            // (workers, batcher, backfill, samplers) runs there.
            Some(pipeline) => {
                let (settings, url, supervisor) =
                    (settings.clone(), database.url.clone(), supervisor.clone());
                pipeline
                    .spawn(async move { App::build(&settings, &url, metrics, &supervisor).await })
                    .await
                    .context("the pipeline runtime stopped during start-up")??
            }
            None => App::build(&settings, &database.url, metrics, &supervisor).await?,
        };
        let listeners = open(&settings).await?;
        app.run(listeners, control, shutdown).await
    }
    .await;
    if let Err(e) = database.close(&supervisor).await {
        tracing::error!(error = %e, "Managed PostgreSQL did not stop cleanly");
    }
    result
}

/// `convstore migrate`: migrations and the vector index, nothing else.
pub async fn migrate_only(settings: &Settings) -> anyhow::Result<()> {
    let supervisor = Supervisor::from_env();
    let database = Database::open(settings, &supervisor, false).await?;
    let result = async {
        let store = Store::connect(
            &database.url,
            2,
            Duration::from_millis(settings.database.connect_timeout_ms.get()),
        )
        .await?
        .with_partitions(settings.database.partitions)
        .with_hnsw(settings.database.hnsw());
        store.migrate().await?;
        store
            .prepare_vectors(
                &convstore_store::models::ModelId::new(
                    settings.embedding.model.clone(),
                    settings.embedding.dimensions.get(),
                ),
                settings.search.keep_previous()?,
            )
            .await?;
        store
            .ensure_text_index(&settings.search.text_search_language()?)
            .await?;
        // Bounded, as at the daemon's exit: the managed cluster is
        // stopped next whatever a connection is still doing.
        run::close_pool(&store).await;
        anyhow::Ok(())
    }
    .await;
    database.close(&supervisor).await?;
    result
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
