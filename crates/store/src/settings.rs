//! Settings this crate owns; the daemon's `Settings` composes them
//! (key names are a contract, DESIGN.md) and validates across sections.

use std::collections::BTreeMap;
use std::num::{NonZeroU32, NonZeroU64};
use std::path::PathBuf;

use convstore_core::duration::parse_duration;
use convstore_core::nonzero::{nz_u32, nz_u64};
use serde::{Deserialize, Serialize};

use crate::retention::RetentionPolicy;

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
    /// Managed mode: `shared_buffers` for the private cluster; `auto` = a
    /// quarter of the memory available, within 128 MB and 2 GB
    /// ([`crate::managed::memory`]).
    pub managed_shared_buffers: String,
    /// Managed mode: further server settings (`max_wal_size = "8GB"`),
    /// applied after convstore's own, which they override. The settings
    /// managed mode depends on (where and how it listens, where the data
    /// lives) are refused: [`RESERVED_MANAGED_SETTINGS`].
    pub managed_settings: BTreeMap<String, String>,
    /// Managed mode: glibc's malloc tunables the PostgreSQL processes start
    /// with (their `GLIBC_TUNABLES`); `""` = glibc's own behaviour. The
    /// default keeps each process's freed heap for reuse instead of handing
    /// it back to the kernel after every HNSW insert
    /// ([`DEFAULT_MANAGED_GLIBC_TUNABLES`]).
    pub managed_glibc_tunables: String,
    /// How long start-up waits for the database before giving up.
    pub connect_timeout_ms: NonZeroU64,
    /// `0`: plain tables. `N` (2 to 1,024): `conversations` and
    /// `conversation_chunks` are created `PARTITION BY HASH (user_id)` with
    /// `N` partitions each, on an empty database (docs/STORAGE.md).
    pub partitions: u32,
    /// HNSW build parameter `m` of the chunk index, used when the index is
    /// created (an existing index keeps its own).
    pub hnsw_m: u32,
    /// HNSW build parameter `ef_construction`, likewise.
    pub hnsw_ef_construction: u32,
    /// A streaming replica searches are sent to (`""` = the primary).
    /// Everything else, a read after a `stored` acknowledgement included,
    /// goes to the primary: a replica may lag.
    pub read_url: String,
}

/// pgvector's HNSW insert copies every graph element it visits (3 KB at
/// 768 dimensions) into a memory context freed after the row. glibc's
/// malloc returns the top of a freed heap to the kernel (`brk`) once more
/// than its trim threshold is free, and the next row faults the pages in
/// again, zeroed. The threshold slides up (to 64 MB at most) only after a
/// large block has been freed, which a backend writing small batches never
/// does: at 312 to 374 conversations/s PostgreSQL spent 1.5 to 1.85 times
/// the CPU it spends with these settings (docs/PERFORMANCE.md, "glibc's
/// heap in the managed cluster"). They are the ceilings the sliding
/// thresholds reach (mmap 32 MB, trim 64 MB), from the first allocation;
/// lower fixed ones made large COPYs slower.
pub const DEFAULT_MANAGED_GLIBC_TUNABLES: &str =
    "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=67108864";

/// The most hash partitions `database.partitions` may ask for.
pub const MAX_PARTITIONS: u32 = 1024;

/// Server settings `database.managed_settings` may not change: the daemon
/// finds its cluster by them (socket, port, no TCP listener, data and
/// configuration paths), and `shared_buffers` has its own key.
pub const RESERVED_MANAGED_SETTINGS: &[&str] = &[
    "listen_addresses",
    "port",
    "unix_socket_directories",
    "unix_socket_permissions",
    "unix_socket_group",
    "data_directory",
    "config_file",
    "hba_file",
    "ident_file",
    "external_pid_file",
    "shared_buffers",
    "logging_collector",
    "log_destination",
];

impl DatabaseSettings {
    /// The HNSW index's build parameters.
    pub fn hnsw(&self) -> crate::schema::HnswBuild {
        crate::schema::HnswBuild {
            m: self.hnsw_m,
            ef_construction: self.hnsw_ef_construction,
        }
    }

    /// What cannot be used in `[database]` on its own terms (the URL's
    /// form is checked by the daemon's config).
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if self.partitions == 1 || self.partitions > MAX_PARTITIONS {
            return Err(InvalidSetting {
                key: "database.partitions".into(),
                reason: format!(
                    "{} partitions; use 0 (plain tables) or 2 to {MAX_PARTITIONS}",
                    self.partitions
                ),
            });
        }
        if let Err((parameter, reason)) = self.hnsw().check() {
            return Err(InvalidSetting {
                key: format!("database.hnsw_{parameter}"),
                reason,
            });
        }
        if let Err(reason) = check_glibc_tunables(&self.managed_glibc_tunables) {
            return Err(InvalidSetting {
                key: "database.managed_glibc_tunables".into(),
                reason,
            });
        }
        for (name, value) in &self.managed_settings {
            let key = format!("database.managed_settings.{name}");
            let well_formed = !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.');
            if !well_formed {
                return Err(InvalidSetting {
                    key,
                    reason: "not a PostgreSQL setting name (lower-case letters, digits, `_`, `.`)"
                        .into(),
                });
            }
            if RESERVED_MANAGED_SETTINGS.contains(&name.as_str()) {
                let reason = if name == "shared_buffers" {
                    "set database.managed_shared_buffers instead".to_string()
                } else {
                    "managed mode sets it itself and depends on its value".to_string()
                };
                return Err(InvalidSetting { key, reason });
            }
            if value.trim().is_empty() || value.contains(['\0', '\n', '\r']) {
                return Err(InvalidSetting {
                    key,
                    reason: "must be a non-empty value on one line".into(),
                });
            }
        }
        Ok(())
    }
}

/// `name=value` pairs joined by `:`, every name one of glibc's
/// (`glibc.` and lower-case words): the form `GLIBC_TUNABLES` takes. glibc
/// itself ignores what it cannot read, so a typo would otherwise go
/// unnoticed.
fn check_glibc_tunables(tunables: &str) -> Result<(), String> {
    if tunables.is_empty() {
        return Ok(());
    }
    for item in tunables.split(':') {
        let Some((name, value)) = item.split_once('=') else {
            return Err(format!(
                "`{item}` is not name=value (pairs are joined by `:`, as in GLIBC_TUNABLES)"
            ));
        };
        let name_ok = name.strip_prefix("glibc.").is_some_and(|rest| {
            !rest.is_empty()
                && rest
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.')
        });
        if !name_ok {
            return Err(format!(
                "`{name}` is not a glibc tunable name (`glibc.` and lower-case words, as in glibc.malloc.top_pad)"
            ));
        }
        let value_ok = !value.is_empty()
            && value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '+' | ',' | '_' | '.'));
        if !value_ok {
            return Err(format!(
                "the value of `{name}` must be a number or word (letters, digits, `-+,_.`), got `{value}`"
            ));
        }
    }
    Ok(())
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: String::new(),
            pool_size: const { nz_u32(8) },
            write_method: WriteMethod::Copy,
            managed_bin_dir: String::new(),
            managed_user: String::new(),
            managed_shared_buffers: "auto".into(),
            managed_settings: BTreeMap::new(),
            managed_glibc_tunables: DEFAULT_MANAGED_GLIBC_TUNABLES.into(),
            connect_timeout_ms: const { nz_u64(30_000) },
            partitions: 0,
            // Measured against pgvector's 16 / 64 at 100k 768-d rows
            // (benches/hnsw_ingest.rs): 1.4x cheaper inserts, the same
            // recall@10 at search.ef_search 200 (docs/PERFORMANCE.md).
            hnsw_m: 8,
            hnsw_ef_construction: 100,
            read_url: String::new(),
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
    /// Nice value of the PostgreSQL processes (inherited by every backend):
    /// the daemon's `pipeline.nice`, so that PostgreSQL's index inserts
    /// yield the CPU to the acknowledgement path. 0 = normal priority.
    pub nice: u8,
}

/// `[retention]`: how long conversations (and the tombstones of deleted
/// ones) are kept. Durations are written `"90s"`, `"15m"`, `"1h"`, `"365d"`
/// ([`parse_duration`]); `""` where allowed means forever.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionSettings {
    /// Age past which a conversation is deleted, by `created_at`, else
    /// `received_at`; `""` = kept forever.
    pub max_age: String,
    /// How often the reaper runs.
    pub interval: String,
    /// Age past which a tombstone (what keeps a deleted conversation or an
    /// erased user from coming back) is dropped; `""` = kept forever.
    pub tombstone_max_age: String,
    /// `max_age` per channel, overriding the default; `""` = that channel
    /// is kept forever.
    pub channels: BTreeMap<String, String>,
}

impl Default for RetentionSettings {
    fn default() -> Self {
        Self {
            max_age: String::new(),
            interval: "1h".into(),
            tombstone_max_age: "90d".into(),
            channels: BTreeMap::new(),
        }
    }
}

pub use convstore_core::setting::InvalidSetting;

impl RetentionSettings {
    /// The settings as a policy, or the first key whose value is not a
    /// duration (`retention.max_age`, `retention.channels.web`, ...).
    pub fn policy(&self) -> Result<RetentionPolicy, InvalidSetting> {
        let age =
            |key: String, text: &str| -> Result<Option<std::time::Duration>, InvalidSetting> {
                if text.trim().is_empty() {
                    return Ok(None);
                }
                parse_duration(text)
                    .map(Some)
                    .map_err(|reason| InvalidSetting { key, reason })
            };
        let interval = parse_duration(&self.interval).map_err(|reason| InvalidSetting {
            key: "retention.interval".into(),
            reason,
        })?;
        let mut channels = BTreeMap::new();
        for (channel, text) in &self.channels {
            channels.insert(
                channel.clone(),
                age(format!("retention.channels.{channel}"), text)?,
            );
        }
        Ok(RetentionPolicy {
            max_age: age("retention.max_age".into(), &self.max_age)?,
            channels,
            tombstone_max_age: age(
                "retention.tombstone_max_age".into(),
                &self.tombstone_max_age,
            )?,
            interval,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_zero_or_two_to_the_maximum() {
        let with = |partitions| DatabaseSettings {
            partitions,
            ..DatabaseSettings::default()
        };
        for ok in [0, 2, 8, MAX_PARTITIONS] {
            assert_eq!(with(ok).validate(), Ok(()), "{ok}");
        }
        for bad in [1, MAX_PARTITIONS + 1, u32::MAX] {
            let err = with(bad).validate().expect_err("refused");
            assert_eq!(err.key, "database.partitions");
        }
    }

    #[test]
    fn hnsw_parameters_within_pgvectors_limits() {
        let with = |m, ef| DatabaseSettings {
            hnsw_m: m,
            hnsw_ef_construction: ef,
            ..DatabaseSettings::default()
        };
        for (m, ef) in [(16, 64), (8, 100), (2, 4), (100, 1000)] {
            assert_eq!(with(m, ef).validate(), Ok(()), "{m}/{ef}");
        }
        for (m, ef, key) in [
            (1, 64, "database.hnsw_m"),
            (101, 1000, "database.hnsw_m"),
            (16, 31, "database.hnsw_ef_construction"),
            (16, 1001, "database.hnsw_ef_construction"),
        ] {
            let err = with(m, ef).validate().expect_err("refused");
            assert_eq!(err.key, key, "{m}/{ef}: {}", err.reason);
        }
    }

    #[test]
    fn managed_settings_refuse_what_managed_mode_depends_on() {
        let with = |name: &str, value: &str| DatabaseSettings {
            managed_settings: BTreeMap::from([(name.to_string(), value.to_string())]),
            ..DatabaseSettings::default()
        };
        for (name, value) in [
            ("max_wal_size", "8GB"),
            ("jit", "on"),
            ("hnsw.ef_search", "80"),
        ] {
            assert_eq!(with(name, value).validate(), Ok(()), "{name}");
        }
        for (name, value, says) in [
            ("port", "5433", "depends on"),
            ("unix_socket_directories", "/tmp", "depends on"),
            ("shared_buffers", "1GB", "managed_shared_buffers"),
            ("Max Wal", "8GB", "not a PostgreSQL setting name"),
            ("work_mem", "", "non-empty"),
            ("work_mem", "4MB\nport=1", "one line"),
        ] {
            let err = with(name, value).validate().expect_err(name);
            assert_eq!(err.key, format!("database.managed_settings.{name}"));
            assert!(err.reason.contains(says), "{name}: {}", err.reason);
        }
    }

    #[test]
    fn glibc_tunables_are_pairs_of_glibc_names_and_values() {
        let with = |tunables: &str| DatabaseSettings {
            managed_glibc_tunables: tunables.to_string(),
            ..DatabaseSettings::default()
        };
        for ok in [
            DEFAULT_MANAGED_GLIBC_TUNABLES,
            "",
            "glibc.malloc.top_pad=0",
            "glibc.malloc.arena_max=2:glibc.malloc.trim_threshold=0x10000",
            "glibc.cpu.hwcaps=-AVX512F,-AVX512VL",
        ] {
            assert_eq!(with(ok).validate(), Ok(()), "{ok}");
        }
        for (bad, says) in [
            ("top_pad=1", "not a glibc tunable name"),
            ("glibc.=1", "not a glibc tunable name"),
            ("glibc.malloc.top_pad", "not name=value"),
            ("glibc.malloc.top_pad=1:", "not name=value"),
            ("glibc.malloc.top_pad=", "must be a number or word"),
            ("glibc.malloc.top_pad=1 2", "must be a number or word"),
            ("glibc.malloc.top_pad=1\nX=1", "must be a number or word"),
            ("GLIBC.malloc.top_pad=1", "not a glibc tunable name"),
        ] {
            let err = with(bad).validate().expect_err(bad);
            assert_eq!(err.key, "database.managed_glibc_tunables");
            assert!(err.reason.contains(says), "{bad}: {}", err.reason);
        }
    }
}
