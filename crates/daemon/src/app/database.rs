//! The database the daemon writes to: the one at `database.url`, or the
//! managed cluster (started here, watched and restarted if it dies while
//! the daemon runs, stopped at exit). The only place a managed cluster is
//! started.

use std::sync::Arc;

use anyhow::Context;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use convstore_store::managed::ManagedCluster;
use convstore_store::managed_watch::SharedCluster;

use crate::config::Settings;
use crate::systemd::supervisor::Supervisor;

/// A database to connect to, and the managed cluster behind it if any.
pub struct Database {
    /// What [`convstore_store::Store::connect_with`] connects to.
    pub url: String,
    managed: SharedCluster,
    watch: Option<(JoinHandle<()>, CancellationToken)>,
}

impl Database {
    /// `database.url`, or a managed cluster started under `state_dir` and
    /// watched (docs/DURABILITY.md, "Database outages").
    pub async fn open(settings: &Settings, supervisor: &Supervisor) -> anyhow::Result<Self> {
        if !settings.database.url.is_empty() {
            return Ok(Self {
                url: settings.database.url.clone(),
                managed: Arc::new(tokio::sync::Mutex::new(None)),
                watch: None,
            });
        }
        supervisor.starting("managed PostgreSQL");
        let cluster = start_managed(settings).await?;
        let url = cluster.url();
        let managed: SharedCluster = Arc::new(tokio::sync::Mutex::new(Some(cluster)));
        let stop = CancellationToken::new();
        let watch = tokio::spawn(convstore_store::managed_watch::watch(
            managed.clone(),
            settings.managed_cluster(),
            stop.clone(),
        ));
        Ok(Self {
            url,
            managed,
            watch: Some((watch, stop)),
        })
    }

    /// Stops watching and stops the managed cluster, if any.
    pub async fn close(self, supervisor: &Supervisor) {
        if let Some((watch, stop)) = self.watch {
            stop.cancel();
            let _ = watch.await;
        }
        let managed = self.managed.lock().await.take();
        if let Some(cluster) = managed {
            supervisor.status("Stopping: managed PostgreSQL");
            if let Err(e) = cluster.stop().await {
                tracing::error!(error = %e, "Managed PostgreSQL did not stop cleanly");
            }
        }
    }
}

/// Starts the managed cluster of `settings`.
pub async fn start_managed(settings: &Settings) -> anyhow::Result<ManagedCluster> {
    ManagedCluster::start(&settings.managed_cluster())
        .await
        .context("cannot start the managed PostgreSQL cluster")
}
