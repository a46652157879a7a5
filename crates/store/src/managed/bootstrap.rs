//! The last step of a start: waiting until the new server accepts
//! connections (or exits, or runs out of `database.connect_timeout_ms`), then
//! creating database `convstore` and extension `vector` if missing, so that
//! the caller gets a cluster its migrations can run against.

use std::time::Duration;

use sqlx::{ConnectOptions, Connection};
use tracing::info;

use super::process::log_tail;
use super::{DATABASE, ManagedCluster, ManagedError, connect_options, io_err};

impl ManagedCluster {
    /// Polls the socket until the server answers, then creates what
    /// convstore needs in it. Fails early if the server exits meanwhile.
    pub(super) async fn wait_ready_and_prepare(
        &mut self,
        timeout: Duration,
    ) -> Result<(), ManagedError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let admin = connect_options(&self.layout.run_dir, "postgres");
        let mut last_error = String::from("none yet");
        let mut conn = loop {
            if let Some(child) = self.child.as_mut() {
                match child.try_wait() {
                    Ok(None) => {}
                    Ok(Some(status)) => {
                        self.child = None;
                        return Err(ManagedError::Exited {
                            status: status.to_string(),
                            log: self.layout.log_path.clone(),
                            tail: log_tail(&self.layout.log_path),
                        });
                    }
                    Err(e) => {
                        return Err(io_err("wait for", &self.layout.data_dir)(e));
                    }
                }
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(ManagedError::StartTimeout {
                    timeout_ms: timeout.as_millis() as u64,
                    last_error,
                    log: self.layout.log_path.clone(),
                    tail: log_tail(&self.layout.log_path),
                });
            }
            match tokio::time::timeout(deadline - now, admin.connect()).await {
                Ok(Ok(conn)) => break conn,
                Ok(Err(e)) => last_error = e.to_string(),
                Err(_) => last_error = "connection attempt timed out".into(),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };

        let log = self.layout.log_path.clone();
        let sql_err = |action: &'static str| {
            let log = log.clone();
            move |source| ManagedError::Sql {
                action,
                log,
                source,
            }
        };
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind(DATABASE)
                .fetch_one(&mut conn)
                .await
                .map_err(sql_err("looking up database convstore"))?;
        if !exists {
            info!("Creating database {DATABASE} in the managed cluster");
            sqlx::raw_sql("CREATE DATABASE convstore")
                .execute(&mut conn)
                .await
                .map_err(sql_err("CREATE DATABASE convstore"))?;
        }
        conn.close().await.ok();

        let mut conn = self
            .connect_options()
            .connect()
            .await
            .map_err(sql_err("connecting to database convstore"))?;
        sqlx::raw_sql("CREATE EXTENSION IF NOT EXISTS vector")
            .execute(&mut conn)
            .await
            .map_err(sql_err(
                "CREATE EXTENSION vector (is pgvector installed for these binaries?)",
            ))?;
        conn.close().await.ok();
        Ok(())
    }
}
