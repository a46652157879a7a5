//! Settings this crate owns; the daemon's `Settings` composes them
//! (key names are a contract, DESIGN.md) and validates across sections.

use std::num::{NonZeroU32, NonZeroU64};
use std::path::PathBuf;

use convstore_core::nonzero::{nz_u32, nz_u64};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseSettings {
    /// Empty means managed mode: a private cluster under `state_dir/postgres`.
    pub url: String,
    pub pool_size: NonZeroU32,
    /// How a batch's chunk rows reach PostgreSQL (see docs/STORAGE.md).
    pub write_method: WriteMethod,
    /// Managed mode: directory holding `initdb` and `postgres`. Empty = search.
    pub managed_bin_dir: String,
    /// Managed mode when convstore runs as root: the unprivileged account the
    /// PostgreSQL processes run as (PostgreSQL refuses to run as root).
    /// Empty = `convstore` if that account exists, else `nobody`.
    pub managed_user: String,
    /// Managed mode: `shared_buffers` for the private cluster.
    pub managed_shared_buffers: String,
    /// How long start-up waits for the database before giving up.
    pub connect_timeout_ms: NonZeroU64,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: String::new(),
            pool_size: const { nz_u32(8) },
            write_method: WriteMethod::Copy,
            managed_bin_dir: String::new(),
            managed_user: String::new(),
            managed_shared_buffers: "256MB".into(),
            connect_timeout_ms: const { nz_u64(30_000) },
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum WriteMethod {
    /// Binary `COPY ... FROM STDIN` for chunk rows.
    Copy,
    /// `INSERT ... SELECT FROM UNNEST($1::..[])` for chunk rows.
    Unnest,
}

/// What the managed cluster needs: `[database]` and where its cluster
/// lives (`state_dir/postgres`, resolved by the daemon's settings).
#[derive(Debug, Clone, PartialEq)]
pub struct ManagedClusterSettings {
    pub database: DatabaseSettings,
    pub cluster_dir: PathBuf,
}
