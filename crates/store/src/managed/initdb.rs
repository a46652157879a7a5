//! Creating the cluster on first start: `initdb` with convstore's superuser,
//! trust authentication on the socket only, UTF-8 and no locale, into a
//! scratch directory that is renamed into place only once complete, so an
//! interrupted initdb never leaves a half-made cluster.

use std::fs;

use tracing::info;

use super::layout::Plan;
use super::process::{base_command, log_marker, log_stdio, log_tail};
use super::{ManagedError, SUPERUSER, io_err};

/// Runs initdb into `initdb_dir` as the cluster's account, output appended
/// to `postgres.log`, then renames the result to `data_dir`.
pub(super) async fn run_initdb(plan: &Plan) -> Result<(), ManagedError> {
    let layout = &plan.layout;
    info!(
        data_dir = %layout.data_dir.display(),
        version = %plan.bins.version,
        user = plan.run_as.as_ref().map_or("(current user)", |a| a.name.as_str()),
        "Creating a new managed PostgreSQL cluster (initdb)"
    );
    let log = log_marker(&layout.log_path, "initdb")?;
    let (stdout, stderr) = log_stdio(&log, &layout.log_path)?;
    let mut cmd = base_command(&plan.bins.initdb, plan);
    cmd.arg("-D")
        .arg(&layout.initdb_dir)
        .args([
            "-U",
            SUPERUSER,
            "--auth-local=trust",
            "--auth-host=reject",
            "-E",
            "UTF8",
            "--no-locale",
            "--no-instructions",
        ])
        .stdout(stdout)
        .stderr(stderr)
        .kill_on_drop(true);
    let status = cmd
        .status()
        .await
        .map_err(io_err("run", &plan.bins.initdb))?;
    if !status.success() {
        return Err(ManagedError::Initdb {
            status: status.to_string(),
            log: layout.log_path.clone(),
            tail: log_tail(&layout.log_path),
        });
    }
    fs::rename(&layout.initdb_dir, &layout.data_dir)
        .map_err(io_err("rename the new cluster to", &layout.data_dir))?;
    Ok(())
}
