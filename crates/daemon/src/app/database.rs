//! The database the daemon writes to: the one at `database.url`, or the
//! managed cluster (started here, watched and restarted if it dies while
//! the daemon runs, stopped at exit). The only place a managed cluster is
//! started.

use std::sync::Arc;

use anyhow::Context;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use convstore_store::managed::{ManagedCluster, ManagedError};
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
    /// `database.url`, or a managed cluster started under `state_dir`;
    /// with `watch`, restarted if it dies while the daemon runs
    /// (docs/DURABILITY.md, "Database outages").
    pub async fn open(
        settings: &Settings,
        supervisor: &Supervisor,
        watch: bool,
    ) -> anyhow::Result<Self> {
        if !settings.database.url.is_empty() {
            return Ok(Self {
                url: settings.database.url.clone(),
                managed: Arc::new(tokio::sync::Mutex::new(None)),
                watch: None,
            });
        }
        supervisor.starting("managed PostgreSQL");
        let cluster = ManagedCluster::start(&settings.managed_cluster())
            .await
            .context("cannot start the managed PostgreSQL cluster")?;
        let url = cluster.url();
        let managed: SharedCluster = Arc::new(tokio::sync::Mutex::new(Some(cluster)));
        let watch = watch.then(|| {
            let stop = CancellationToken::new();
            let task = tokio::spawn(convstore_store::managed_watch::watch(
                managed.clone(),
                settings.managed_cluster(),
                stop.clone(),
            ));
            (task, stop)
        });
        Ok(Self {
            url,
            managed,
            watch,
        })
    }

    /// Stops watching and stops the managed cluster, if any.
    pub async fn close(self, supervisor: &Supervisor) -> Result<(), ManagedError> {
        if let Some((watch, stop)) = self.watch {
            stop.cancel();
            let _ = watch.await;
        }
        let managed = self.managed.lock().await.take();
        match managed {
            Some(cluster) => {
                supervisor.status("Stopping: managed PostgreSQL");
                cluster.stop().await
            }
            None => Ok(()),
        }
    }
}
