//! The settings, loaded and validated once.
//!
//! Sources, later ones winning: built-in defaults, the TOML file given with
//! `--config`, then environment variables `CONVSTORE_SECTION__KEY` (for
//! example `CONVSTORE_QUEUE__CAPACITY=500`). Unknown keys are errors, so a typo
//! never silently falls back to a default.

use convstore_nats::settings::NatsSettings;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};
use std::path::{Path, PathBuf};

use convstore_core::nonzero::{nz_u32, nz_u64, nz_usize};
use serde::{Deserialize, Serialize};

pub use convstore_embed::settings::{
    BackendKind, BackendSettings, BuiltinEngine, BuiltinPrecision, CacheSettings,
    EmbeddingSettings, EncodingFormat, Strategy,
};
pub use convstore_store::settings::{
    DatabaseSettings, ManagedClusterSettings, RetentionSettings, WriteMethod,
};
pub use convstore_telemetry::settings::{LogFormat, LogSettings};
pub use convstore_telemetry::traces::TelemetrySettings;

/// The least `max_batch_tokens` may be: a request must hold a chunk.
const MIN_BATCH_TOKENS: usize = 64;

/// Everything convstore can be told. Key names are a contract (DESIGN.md).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Managed cluster, journal and models live here.
    pub state_dir: PathBuf,
    pub log: LogSettings,
    /// Traces (OTLP/HTTP); off by default.
    pub telemetry: TelemetrySettings,
    pub server: ServerSettings,
    pub database: DatabaseSettings,
    pub queue: QueueSettings,
    pub batch: BatchSettings,
    pub pipeline: PipelineSettings,
    pub chunking: ChunkingSettings,
    pub embedding: EmbeddingSettings,
    pub cache: CacheSettings,
    pub backfill: BackfillSettings,
    pub journal: JournalSettings,
    pub ack: AckSettings,
    pub limits: LimitsSettings,
    pub auth: AuthSettings,
    pub shutdown: ShutdownSettings,
    pub metrics: MetricsSettings,
    pub search: SearchSettings,
    pub retention: RetentionSettings,
    /// The shared intake (docs/SCALING.md); off by default.
    pub nats: NatsSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            state_dir: default_state_dir(),
            log: LogSettings::default(),
            telemetry: TelemetrySettings::default(),
            server: ServerSettings::default(),
            database: DatabaseSettings::default(),
            queue: QueueSettings::default(),
            batch: BatchSettings::default(),
            pipeline: PipelineSettings::default(),
            chunking: ChunkingSettings::default(),
            embedding: EmbeddingSettings::default(),
            cache: CacheSettings::default(),
            backfill: BackfillSettings::default(),
            journal: JournalSettings::default(),
            ack: AckSettings::default(),
            limits: LimitsSettings::default(),
            auth: AuthSettings::default(),
            shutdown: ShutdownSettings::default(),
            metrics: MetricsSettings::default(),
            search: SearchSettings::default(),
            retention: RetentionSettings::default(),
            nats: NatsSettings::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    /// `""` disables TCP.
    pub http_addr: String,
    /// `""` disables the Unix socket.
    pub unix_socket: String,
    /// Octal permission bits of the socket file.
    pub socket_mode: String,
    pub max_body_bytes: NonZeroUsize,
    /// Upper bound on messages in one conversation.
    pub max_messages: NonZeroUsize,
    /// Upper bound on items in one batch request.
    pub max_batch_items: NonZeroUsize,
    /// Connections served at once, per listener (TCP, Unix socket,
    /// metrics). At the limit a new connection replaces the one unused the
    /// longest; when all are busy it gets 503 `too_many_connections`.
    pub max_connections: NonZeroUsize,
    /// A request head (line and headers) must arrive within this.
    pub header_timeout_ms: NonZeroU64,
    /// A request body must arrive whole within this (408 `body_timeout`).
    pub body_timeout_ms: NonZeroU64,
    /// A connection without a request in progress for this long is closed.
    pub idle_timeout_ms: NonZeroU64,
    /// Request bodies held in memory by all requests together; past it a
    /// request gets 503 `bodies_full` with `Retry-After`.
    pub max_buffered_body_bytes: NonZeroUsize,
    /// Threads of the acknowledgement path (accept, parse, validate,
    /// enqueue, answer), apart from the pipeline's; 0 = one per core.
    pub ingress_threads: usize,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            http_addr: "127.0.0.1:7070".into(),
            unix_socket: default_unix_socket(),
            socket_mode: "0660".into(),
            max_body_bytes: const { nz_usize(1_048_576) },
            max_messages: const { nz_usize(1_000) },
            max_batch_items: const { nz_usize(1_000) },
            max_connections: const { nz_usize(4_096) },
            header_timeout_ms: const { nz_u64(10_000) },
            body_timeout_ms: const { nz_u64(30_000) },
            idle_timeout_ms: const { nz_u64(60_000) },
            max_buffered_body_bytes: const { nz_usize(64 << 20) },
            ingress_threads: 0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct QueueSettings {
    /// Conversations held in memory between acknowledgement and storage.
    pub capacity: NonZeroUsize,
    /// Bytes of conversation text held in memory, whatever the count.
    pub max_bytes: NonZeroUsize,
    pub when_full: WhenFull,
    /// With `when_full = "block"`: how long a request may wait for room.
    pub block_timeout_ms: NonZeroU64,
    /// Seconds a 429 tells the client to wait.
    pub retry_after_secs: NonZeroU32,
    /// Admit only what the pipeline stores in this many seconds at its
    /// measured rate (never fewer than keep the workers fed); 0 = by
    /// `capacity` and `max_bytes` alone. See `convstore::admission`.
    pub max_backlog_seconds: u32,
}

impl Default for QueueSettings {
    fn default() -> Self {
        Self {
            capacity: const { nz_usize(10_000) },
            max_bytes: const { nz_usize(268_435_456) },
            when_full: WhenFull::Reject,
            block_timeout_ms: const { nz_u64(5_000) },
            retry_after_secs: const { nz_u32(1) },
            max_backlog_seconds: 10,
        }
    }
}

/// What ingress does when the queue has no room.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Answer 429 with `Retry-After` at once: the caller keeps control.
    Reject,
    /// Hold the request up to `queue.block_timeout_ms`, then 429: smooths
    /// bursts at the price of caller latency.
    Block,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BatchSettings {
    /// Conversations per batch.
    pub max_size: NonZeroUsize,
    /// A batch closes this long after its first item at the latest.
    pub max_wait_ms: NonZeroU64,
}

impl Default for BatchSettings {
    fn default() -> Self {
        Self {
            max_size: const { nz_usize(64) },
            max_wait_ms: const { nz_u64(20) },
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineSettings {
    /// Batches embedded and stored concurrently.
    pub workers: NonZeroUsize,
    /// Nice value (1 to 19) of the pipeline's threads, which also run
    /// under `SCHED_BATCH`, and of a managed PostgreSQL: the acknowledgement
    /// path keeps the CPU when storage saturates the machine. 0 = one
    /// runtime at one priority.
    pub nice: u8,
}

impl Default for PipelineSettings {
    fn default() -> Self {
        Self {
            workers: const { nz_usize(4) },
            nice: 10,
        }
    }
}

impl PipelineSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.nice > 19 {
            return Err(ConfigError::invalid(
                "pipeline.nice",
                format!("{} is above 19, the lowest priority there is", self.nice),
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ChunkingSettings {
    /// Largest chunk in (estimated) tokens; 0 = the model's context length.
    /// Never above the model's context length, whatever is set here.
    pub max_tokens: usize,
    /// Used when no backend has reported its context length yet.
    pub fallback_context_tokens: NonZeroUsize,
}

impl Default for ChunkingSettings {
    fn default() -> Self {
        Self {
            max_tokens: 0,
            fallback_context_tokens: const { nz_usize(512) },
        }
    }
}

/// The backfill: embeds chunks stored as `pending` once a backend is
/// healthy again (issue 4; docs/ROUTING.md).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BackfillSettings {
    pub enabled: bool,
    /// Pending chunks claimed (and embedded) per round.
    pub batch_size: NonZeroUsize,
    /// Pause between rounds when nothing is pending or no backend is up.
    pub interval_ms: NonZeroU64,
    /// Ceiling of the delay before chunks whose round failed are tried
    /// again (the delay doubles per failed round from `interval_ms`).
    pub max_defer_ms: NonZeroU64,
}

impl Default for BackfillSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            batch_size: const { nz_usize(64) },
            interval_ms: const { nz_u64(5_000) },
            max_defer_ms: const { nz_u64(600_000) },
        }
    }
}

/// `[journal]`: durable intake (docs/DURABILITY.md).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct JournalSettings {
    /// Append every accepted conversation to `state_dir/journal` before
    /// acknowledging it; replay what was not stored after a crash.
    pub enabled: bool,
    /// Group commit: at most one fsync per this many milliseconds; every
    /// record written meanwhile shares it.
    pub fsync_interval_ms: NonZeroU64,
    /// Segments on disk may hold at most this many bytes; beyond, new
    /// conversations get 429 until stored ones free space.
    pub max_bytes: NonZeroU64,
    /// A new segment file is started at this size; a segment is deleted
    /// once every conversation in it is stored.
    pub segment_bytes: NonZeroU64,
}

impl Default for JournalSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            fsync_interval_ms: const { nz_u64(2) },
            max_bytes: const { nz_u64(1 << 30) },
            segment_bytes: const { nz_u64(16 << 20) },
        }
    }
}

/// `[ack]`: how long `?wait=durable|stored` may hold a request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AckSettings {
    /// The wait when the request gives no `timeout_ms`; past it, 504 with
    /// the id (poll `GET /v1/conversations/{id}`).
    pub timeout_ms: NonZeroU64,
    /// The most a request's `?timeout_ms=` may ask for.
    pub max_timeout_ms: NonZeroU64,
}

impl Default for AckSettings {
    fn default() -> Self {
        Self {
            timeout_ms: const { nz_u64(30_000) },
            max_timeout_ms: const { nz_u64(300_000) },
        }
    }
}

/// `[limits]`: what one conversation may hold, beyond `server.max_body_bytes`
/// and `server.max_messages`. Checked before acknowledgement.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSettings {
    /// Bytes of one text field: a message's content, the transcript, the summary.
    pub max_content_bytes: NonZeroUsize,
    /// Bytes of `metadata` as compact JSON.
    pub max_metadata_bytes: NonZeroUsize,
    /// Nesting depth of `metadata` (an object directly under it is depth 1).
    pub max_metadata_depth: NonZeroUsize,
    /// Bytes of the client `id`.
    pub max_id_bytes: NonZeroUsize,
    /// Bytes of `user_id` and `channel`.
    pub max_label_bytes: NonZeroUsize,
}

impl Default for LimitsSettings {
    fn default() -> Self {
        Self {
            max_content_bytes: const { nz_usize(262_144) },
            max_metadata_bytes: const { nz_usize(65_536) },
            max_metadata_depth: const { nz_usize(16) },
            max_id_bytes: const { nz_usize(256) },
            max_label_bytes: const { nz_usize(256) },
        }
    }
}

/// `[auth]`: who may talk to the API (docs/DURABILITY.md, "Access control").
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSettings {
    /// Bearer tokens, by their sha256; none = no token needed.
    pub tokens: Vec<TokenSettings>,
    /// Ask for a token on the Unix socket too (by default the socket file's
    /// owner, group and mode are its access control).
    pub require_on_unix_socket: bool,
    /// Owner of the socket file (user name or uid); `""` = convstore's own.
    pub socket_owner: String,
    /// Group of the socket file (group name or gid); `""` = convstore's own.
    pub socket_group: String,
}

/// One bearer token of `[[auth.tokens]]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TokenSettings {
    /// Names the client in logs and metrics; never the token itself.
    pub name: String,
    /// Hex sha256 of the token (`printf %s "$TOKEN" | sha256sum`).
    pub sha256: String,
    /// Requests per second this token may make on average; 0 = no limit.
    pub rate_per_sec: u32,
    /// Requests it may make at once above the rate; 0 = `rate_per_sec`.
    pub burst: u32,
    /// What it may do ([`Scope`] names); default `["ingest", "read"]`.
    pub scopes: Vec<String>,
}

impl Default for TokenSettings {
    fn default() -> Self {
        Self {
            name: String::new(),
            sha256: String::new(),
            rate_per_sec: 0,
            burst: 0,
            scopes: Scope::DEFAULT.iter().map(|s| s.as_str().into()).collect(),
        }
    }
}

/// A right a bearer token may be given (`[[auth.tokens]] scopes`). Which
/// route needs which is decided in `http::auth::required_scope`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// Hand conversations over: post, batch, append.
    Ingest,
    /// Read them back: get, search.
    Read,
    /// Delete a conversation, erase a user.
    Delete,
    /// Everything under `/v1/admin/`, and every other scope too.
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 4] = [Scope::Ingest, Scope::Read, Scope::Delete, Scope::Admin];
    /// What a token is given when its `scopes` is not set: what every
    /// token could do before scopes existed, except deleting.
    pub const DEFAULT: [Scope; 2] = [Scope::Ingest, Scope::Read];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Ingest => "ingest",
            Scope::Read => "read",
            Scope::Delete => "delete",
            Scope::Admin => "admin",
        }
    }

    pub fn parse(name: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl TokenSettings {
    /// The scopes named in `scopes`, or the first name that is not one.
    pub fn parsed_scopes(&self) -> Result<Vec<Scope>, String> {
        if self.scopes.is_empty() {
            return Err(format!(
                "a token without scopes can do nothing; give at least one of {}",
                scope_names()
            ));
        }
        self.scopes
            .iter()
            .map(|name| {
                Scope::parse(name.trim()).ok_or_else(|| {
                    format!("`{name}` is not a scope; the scopes are {}", scope_names())
                })
            })
            .collect()
    }
}

fn scope_names() -> String {
    Scope::ALL
        .iter()
        .map(|s| format!("\"{s}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownSettings {
    /// Deadline for draining the queue on SIGTERM.
    pub timeout_ms: NonZeroU64,
}

impl Default for ShutdownSettings {
    fn default() -> Self {
        Self {
            timeout_ms: const { nz_u64(30_000) },
        }
    }
}

/// `[metrics]`: where Prometheus scrapes. `/metrics` is always served on
/// the API listeners too; `listen` adds a listener that serves nothing
/// else, so a Prometheus server can reach it without reaching the API.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSettings {
    /// `IP:port` of the metrics-only listener; `""` = none. Meant for a
    /// loopback address (a non-loopback one logs a warning).
    pub listen: String,
}

/// `[search]`: `POST /v1/search` (docs/SEARCH.md).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SearchSettings {
    /// `hnsw.ef_search` of a search that does not give its own (1..=1000):
    /// candidates the HNSW graph walk keeps; more = better recall, slower.
    pub ef_search: NonZeroU32,
    /// A filter matching fewer conversations than this is answered by an
    /// exact scan of their chunks instead of the index.
    pub exact_threshold: NonZeroU64,
    /// Searches running at once (each holds a database connection while it
    /// runs); more wait for a slot within `timeout_ms`.
    pub max_concurrent: NonZeroUsize,
    /// Query embeddings each backend serves at once, apart from (and on
    /// top of) its `max_in_flight` for ingest; for a builtin backend, its
    /// inference threads for queries.
    pub backend_in_flight: NonZeroUsize,
    /// Deadline of one search: waiting for a slot, embedding the query,
    /// the database.
    pub timeout_ms: NonZeroU64,
    /// PostgreSQL text search configuration of lexical search (`simple`:
    /// every word, id and CJK run is a token, no stemming; `english` etc.
    /// stem and drop stop words). The full-text index is rebuilt for it at
    /// start when it changes.
    pub language: String,
    /// `k` of reciprocal rank fusion in hybrid search: a conversation
    /// scores `1/(rrf_k + rank)` per list that found it.
    pub rrf_k: NonZeroU32,
    /// After a change of `embedding.model`, how long the previous model's
    /// vectors are kept once search switched to the new one:
    /// `"until-next-start"` (dropped by the next start), or a duration
    /// (`"1h"`, `"7d"`; dropped by the running daemon).
    pub keep_previous_model: String,
    /// Matching chunks a lexical search ranks at most: a query of common
    /// words matches a large share of the chunks, and ranking reads each
    /// one's text; past this many, the first the index gives are ranked.
    pub lexical_max_matches: NonZeroUsize,
}

impl Default for SearchSettings {
    fn default() -> Self {
        Self {
            ef_search: const { nz_u32(200) },
            exact_threshold: const { nz_u64(2_000) },
            max_concurrent: const { nz_usize(4) },
            backend_in_flight: const { nz_usize(1) },
            timeout_ms: const { nz_u64(10_000) },
            language: "simple".into(),
            rrf_k: const { nz_u32(60) },
            keep_previous_model: KEEP_UNTIL_NEXT_START.into(),
            lexical_max_matches: const { nz_usize(convstore_store::search::DEFAULT_LEXICAL_MAX_MATCHES) },
        }
    }
}

/// `search.keep_previous_model`'s default.
pub const KEEP_UNTIL_NEXT_START: &str = "until-next-start";

impl SearchSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.ef_search.get() > 1000 {
            return Err(ConfigError::invalid(
                "search.ef_search",
                format!("{} is above pgvector's limit of 1000", self.ef_search.get()),
            ));
        }
        self.text_search_language()?;
        self.keep_previous()?;
        Ok(())
    }

    /// `keep_previous_model` as the store takes it.
    pub fn keep_previous(&self) -> Result<convstore_store::models::KeepPrevious, ConfigError> {
        use convstore_store::models::KeepPrevious;
        let value = self.keep_previous_model.trim();
        if value == KEEP_UNTIL_NEXT_START {
            return Ok(KeepPrevious::UntilNextStart);
        }
        convstore_core::duration::parse_duration(value)
            .map(KeepPrevious::For)
            .map_err(|reason| {
                ConfigError::invalid(
                    "search.keep_previous_model",
                    format!("{reason}; or \"{KEEP_UNTIL_NEXT_START}\""),
                )
            })
    }

    /// `language` as the store takes it (a checked identifier).
    pub fn text_search_language(
        &self,
    ) -> Result<convstore_store::search::TextSearchLanguage, ConfigError> {
        convstore_store::search::TextSearchLanguage::parse(&self.language)
            .map_err(|reason| ConfigError::invalid("search.language", reason))
    }
}

/// A configuration that cannot be used, with the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot load configuration: {0}")]
    Load(String),
    #[error("invalid value for `{key}`: {reason}")]
    Invalid { key: String, reason: String },
}

impl ConfigError {
    fn invalid(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

impl Settings {
    /// Defaults, then the file (if any), then `CONVSTORE_*` variables; validated.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_from(file, std::env::vars())
    }

    /// [`Settings::load`] with an explicit environment (tests pass their own).
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let defaults = config::Config::try_from(&Settings::default())
            .map_err(|e| ConfigError::Load(e.to_string()))?;
        let mut builder = config::Config::builder().add_source(defaults);
        if let Some(path) = file {
            if !path.is_file() {
                return Err(ConfigError::Load(format!(
                    "config file {} does not exist or is not a file",
                    path.display()
                )));
            }
            builder = builder.add_source(
                config::File::from(path)
                    .format(config::FileFormat::Toml)
                    .required(true),
            );
        }
        let env_map: std::collections::HashMap<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("CONVSTORE_") && k.contains("__") || is_top_level_env(k))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix("CONVSTORE")
                .prefix_separator("_")
                .separator("__")
                .try_parsing(true)
                .source(Some(env_map)),
        );
        let merged = builder
            .build()
            .map_err(|e| ConfigError::Load(e.to_string()))?;
        let settings: Settings = merged
            .try_deserialize()
            .map_err(describe_deserialize_error)?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks that serde cannot express: addresses, modes, relations between keys.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.search.validate()?;
        self.pipeline.validate()?;
        if self.state_dir.as_os_str().is_empty() {
            return Err(ConfigError::invalid("state_dir", "must not be empty"));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err(ConfigError::invalid(
                "log.level",
                format!(
                    "`{}` is not a tracing filter like `info` or `convstore=debug,sqlx=warn` ({e})",
                    self.log.level
                ),
            ));
        }
        if let Err((key, reason)) = self.telemetry.validate() {
            return Err(ConfigError::invalid(format!("telemetry.{key}"), reason));
        }
        if self.server.http_addr.is_empty() && self.server.unix_socket.is_empty() {
            return Err(ConfigError::invalid(
                "server.http_addr",
                "both server.http_addr and server.unix_socket are empty: convstore would not listen anywhere",
            ));
        }
        if !self.server.http_addr.is_empty() {
            self.server.http_addr.parse::<SocketAddr>().map_err(|e| {
                ConfigError::invalid(
                    "server.http_addr",
                    format!(
                        "`{}` is not an IP:port address ({e})",
                        self.server.http_addr
                    ),
                )
            })?;
        }
        if !self.server.unix_socket.is_empty() && !Path::new(&self.server.unix_socket).is_absolute()
        {
            return Err(ConfigError::invalid(
                "server.unix_socket",
                "must be an absolute path",
            ));
        }
        self.server.socket_mode_bits()?;
        // Looked up here, not only when the socket is created: check-config
        // must say a name is wrong, and serve must refuse it before it
        // starts the database and the pipeline (it used to pass both).
        if !self.auth.socket_owner.is_empty() {
            crate::unix_ids::user_id(&self.auth.socket_owner)
                .map_err(|e| ConfigError::invalid("auth.socket_owner", e))?;
        }
        if !self.auth.socket_group.is_empty() {
            crate::unix_ids::group_id(&self.auth.socket_group)
                .map_err(|e| ConfigError::invalid("auth.socket_group", e))?;
        }
        if !self.metrics.listen.is_empty() {
            let addr = self.metrics.listen.parse::<SocketAddr>().map_err(|e| {
                ConfigError::invalid(
                    "metrics.listen",
                    format!(
                        "`{}` is not an IP:port address ({e}); use e.g. 127.0.0.1:9187, or \"\" for none",
                        self.metrics.listen
                    ),
                )
            })?;
            if !self.server.http_addr.is_empty()
                && self.server.http_addr.parse::<SocketAddr>().ok() == Some(addr)
                && addr.port() != 0
            {
                return Err(ConfigError::invalid(
                    "metrics.listen",
                    "must differ from server.http_addr (/metrics is served there already)",
                ));
            }
        }
        self.validate_intake()?;
        self.validate_shared_intake()?;
        self.retention
            .policy()
            .map_err(|e| ConfigError::invalid(e.key, e.reason))?;
        self.database
            .validate()
            .map_err(|e| ConfigError::invalid(e.key, e.reason))?;
        let url = &self.database.url;
        if !(url.is_empty() || url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(ConfigError::invalid(
                "database.url",
                "must start with postgres:// or postgresql:// (empty = managed cluster)",
            ));
        }
        let read_url = &self.database.read_url;
        if !(read_url.is_empty()
            || read_url.starts_with("postgres://")
            || read_url.starts_with("postgresql://"))
        {
            return Err(ConfigError::invalid(
                "database.read_url",
                "must start with postgres:// or postgresql:// (empty = searches go to the primary)",
            ));
        }
        if self.embedding.model.trim().is_empty() {
            return Err(ConfigError::invalid("embedding.model", "must not be empty"));
        }
        if self.embedding.dimensions.get() > 2000 {
            return Err(ConfigError::invalid(
                "embedding.dimensions",
                "pgvector's HNSW index takes at most 2000 dimensions",
            ));
        }
        if self.embedding.retry_max_ms < self.embedding.retry_initial_ms {
            return Err(ConfigError::invalid(
                "embedding.retry_max_ms",
                "must not be below embedding.retry_initial_ms",
            ));
        }
        if self.embedding.breaker_max_open_ms < self.embedding.breaker_open_ms {
            return Err(ConfigError::invalid(
                "embedding.breaker_max_open_ms",
                "must not be below embedding.breaker_open_ms",
            ));
        }
        if self.embedding.backends.is_empty() {
            return Err(ConfigError::invalid(
                "embedding.backends",
                "at least one backend is needed",
            ));
        }
        let mut names = std::collections::HashSet::new();
        for (i, backend) in self.embedding.backends.iter().enumerate() {
            let key = |field: &str| format!("embedding.backends[{i}].{field}");
            if backend.name.trim().is_empty() {
                return Err(ConfigError::invalid(key("name"), "must not be empty"));
            }
            if !names.insert(backend.name.as_str()) {
                return Err(ConfigError::invalid(
                    key("name"),
                    format!("`{}` is used by two backends", backend.name),
                ));
            }
            if backend.kind != BackendKind::Builtin {
                let url = reqwest::Url::parse(&backend.url).map_err(|e| {
                    ConfigError::invalid(
                        key("url"),
                        format!("`{}` is not a URL ({e})", backend.url),
                    )
                })?;
                if url.scheme() != "http" {
                    return Err(ConfigError::invalid(
                        key("url"),
                        "only http:// is supported (put a local TLS proxy in front of remote servers)",
                    ));
                }
            }
            if backend.kind != BackendKind::Builtin {
                // A cap below a full batch's answer would fail every full
                // batch on a healthy backend, leaving its texts pending.
                let needed = convstore_embed::response::largest_expected_answer(
                    self.embedding.max_batch_inputs.get(),
                    self.embedding.dimensions.get(),
                );
                if backend.max_response_bytes.get() < needed {
                    return Err(ConfigError::invalid(
                        key("max_response_bytes"),
                        format!(
                            "{} is below the largest answer a batch of embedding.max_batch_inputs = {} \
                             texts of embedding.dimensions = {} may take ({needed} bytes); raise it to \
                             at least {needed}",
                            backend.max_response_bytes,
                            self.embedding.max_batch_inputs,
                            self.embedding.dimensions
                        ),
                    ));
                }
            }
            if !backend.tokenizer.is_empty() {
                if backend.kind == BackendKind::Builtin {
                    return Err(ConfigError::invalid(
                        key("tokenizer"),
                        "a kind = \"builtin\" backend counts with its model's own tokenizer",
                    ));
                }
                if !Path::new(&backend.tokenizer).is_absolute() {
                    return Err(ConfigError::invalid(
                        key("tokenizer"),
                        format!("`{}` must be an absolute path", backend.tokenizer),
                    ));
                }
            }
            if backend.max_batch_tokens != 0 && backend.max_batch_tokens < MIN_BATCH_TOKENS {
                return Err(ConfigError::invalid(
                    key("max_batch_tokens"),
                    format!(
                        "{} is below {MIN_BATCH_TOKENS}, less than one chunk; 0 means no limit",
                        backend.max_batch_tokens
                    ),
                ));
            }
            if !backend.model_dir.is_empty() {
                if backend.kind != BackendKind::Builtin {
                    return Err(ConfigError::invalid(
                        key("model_dir"),
                        "only a kind = \"builtin\" backend reads a model directory",
                    ));
                }
                if !Path::new(&backend.model_dir).is_absolute() {
                    return Err(ConfigError::invalid(
                        key("model_dir"),
                        format!("`{}` must be an absolute path", backend.model_dir),
                    ));
                }
            }
            if !backend.openvino_dir.is_empty() && !Path::new(&backend.openvino_dir).is_absolute() {
                return Err(ConfigError::invalid(
                    key("openvino_dir"),
                    format!("`{}` must be an absolute path", backend.openvino_dir),
                ));
            }
            if backend.kind != BackendKind::Builtin {
                let set = [
                    ("engine", backend.engine != BuiltinEngine::Auto),
                    ("precision", backend.precision != BuiltinPrecision::Auto),
                    ("openvino_dir", !backend.openvino_dir.is_empty()),
                ];
                if let Some((name, _)) = set.iter().find(|(_, set)| *set) {
                    return Err(ConfigError::invalid(
                        key(name),
                        "only a kind = \"builtin\" backend has an engine, a precision and an openvino_dir",
                    ));
                }
            }
            if backend.engine == BuiltinEngine::Candle
                && backend.precision == BuiltinPrecision::Bf16
            {
                return Err(ConfigError::invalid(
                    key("precision"),
                    "engine = \"candle\" computes in f32 only; use precision = \"auto\" or \"f32\", or engine = \"openvino\"",
                ));
            }
        }
        Ok(())
    }

    /// The effective configuration as TOML, for `check-config`.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }

    /// Where managed PostgreSQL keeps its data directory.
    pub fn managed_cluster_dir(&self) -> PathBuf {
        self.state_dir.join("postgres")
    }

    /// What the managed cluster is started with.
    pub fn managed_cluster(&self) -> ManagedClusterSettings {
        ManagedClusterSettings {
            database: self.database.clone(),
            cluster_dir: self.managed_cluster_dir(),
            nice: self.pipeline.nice,
        }
    }
}

impl Settings {
    /// `[journal]`, `[ack]`, `[limits]`, `[auth]`: relations serde cannot check.
    /// `[nats]`: every instance on one stream must write to one database,
    /// and a managed cluster is private to the instance that runs it.
    fn validate_shared_intake(&self) -> Result<(), ConfigError> {
        if !self.nats.enabled() {
            return Ok(());
        }
        self.nats
            .resolve()
            .map_err(|e| ConfigError::invalid(e.key, e.reason))?;
        if self.database.url.is_empty() {
            return Err(ConfigError::invalid(
                "nats.url",
                "a shared intake needs every instance on the same PostgreSQL, and the managed \
                 cluster (database.url = \"\") is private to one instance: set database.url to \
                 the PostgreSQL all instances share, or nats.url = \"\" for the local queue",
            ));
        }
        Ok(())
    }

    fn validate_intake(&self) -> Result<(), ConfigError> {
        if self.server.max_buffered_body_bytes < self.server.max_body_bytes {
            return Err(ConfigError::invalid(
                "server.max_buffered_body_bytes",
                format!(
                    "{} cannot hold one body of server.max_body_bytes ({}): every large request would get 503",
                    self.server.max_buffered_body_bytes, self.server.max_body_bytes
                ),
            ));
        }
        let j = &self.journal;
        if j.segment_bytes > j.max_bytes {
            return Err(ConfigError::invalid(
                "journal.segment_bytes",
                "must not exceed journal.max_bytes",
            ));
        }
        // Room for at least two of the largest conversations a request can
        // carry (JSON re-encoding can grow text a little).
        let needed = 2 * self.server.max_body_bytes.get() as u64 + 4096;
        if j.max_bytes.get() < needed {
            return Err(ConfigError::invalid(
                "journal.max_bytes",
                format!(
                    "{} bytes cannot hold two conversations of server.max_body_bytes ({}); set at least {needed}",
                    j.max_bytes, self.server.max_body_bytes
                ),
            ));
        }
        if j.fsync_interval_ms.get() > 1_000 {
            return Err(ConfigError::invalid(
                "journal.fsync_interval_ms",
                "at most 1000: a longer interval holds every ?wait=durable request that long",
            ));
        }
        if self.ack.max_timeout_ms < self.ack.timeout_ms {
            return Err(ConfigError::invalid(
                "ack.max_timeout_ms",
                "must not be below ack.timeout_ms",
            ));
        }
        if self.limits.max_metadata_depth.get() > 64 {
            return Err(ConfigError::invalid(
                "limits.max_metadata_depth",
                "at most 64 (JSON nested deeper is refused by the parser anyway)",
            ));
        }
        let mut names = std::collections::HashSet::new();
        let mut hashes = std::collections::HashSet::new();
        for (i, token) in self.auth.tokens.iter().enumerate() {
            let key = |field: &str| format!("auth.tokens[{i}].{field}");
            if token.name.trim().is_empty() {
                return Err(ConfigError::invalid(key("name"), "must not be empty"));
            }
            if !names.insert(token.name.as_str()) {
                return Err(ConfigError::invalid(
                    key("name"),
                    format!("`{}` is used by two tokens", token.name),
                ));
            }
            let hash = token.sha256.trim().to_ascii_lowercase();
            if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(ConfigError::invalid(
                    key("sha256"),
                    "must be 64 hex digits: the sha256 of the token (printf %s \"$TOKEN\" | sha256sum), never the token itself",
                ));
            }
            if !hashes.insert(hash) {
                return Err(ConfigError::invalid(
                    key("sha256"),
                    "the same token hash is listed twice",
                ));
            }
            token
                .parsed_scopes()
                .map_err(|reason| ConfigError::invalid(key("scopes"), reason))?;
        }
        Ok(())
    }
}

impl ServerSettings {
    pub fn socket_mode_bits(&self) -> Result<u32, ConfigError> {
        let bits =
            u32::from_str_radix(self.socket_mode.trim_start_matches("0o"), 8).map_err(|_| {
                ConfigError::invalid(
                    "server.socket_mode",
                    format!("`{}` is not an octal mode like 0660", self.socket_mode),
                )
            })?;
        if bits > 0o777 {
            return Err(ConfigError::invalid(
                "server.socket_mode",
                format!("`{}` has bits beyond 0777", self.socket_mode),
            ));
        }
        Ok(bits)
    }
}

/// `CONVSTORE_STATE_DIR` is the one top-level key: no `__` in it.
fn is_top_level_env(key: &str) -> bool {
    key == "CONVSTORE_STATE_DIR"
}

/// serde's messages name the field but not where it sits; config's name the
/// key path ("… for key `queue` in the environment"). Put the two together
/// so the message names the full key, e.g. `queue.capacty`.
fn describe_deserialize_error(e: config::ConfigError) -> ConfigError {
    let text = e.to_string();
    let Some(pos) = text.find(" for key `") else {
        return ConfigError::Load(text);
    };
    let reason = &text[..pos];
    let after = &text[pos + " for key `".len()..];
    let (mut key, origin) = match after.find('`') {
        Some(end) => (after[..end].to_string(), after[end + 1..].trim()),
        None => (after.to_string(), ""),
    };
    let mut reason = reason.to_string();
    if let Some(field) = reason
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split('`').next())
    {
        key = if key.is_empty() {
            field.to_string()
        } else {
            format!("{key}.{field}")
        };
        let expected = reason.split_once(", expected ").map(|(_, e)| e.to_string());
        reason = match expected {
            Some(e) => format!("unknown key (expected {e})"),
            None => "unknown key".to_string(),
        };
    } else if reason.contains("does not have variant constructor") {
        reason = format!("{reason}; see README.md for the accepted values");
    }
    if !origin.is_empty() {
        reason = format!("{reason} (set {origin})");
    }
    ConfigError::Invalid { key, reason }
}

fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// `/var/lib/convstore` for root (as systemd's StateDirectory); otherwise the
/// XDG state directory, so a developer's `convstore serve` needs no sudo.
fn default_state_dir() -> PathBuf {
    if running_as_root() {
        return PathBuf::from("/var/lib/convstore");
    }
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("convstore");
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(home) => PathBuf::from(home).join(".local/state/convstore"),
        None => PathBuf::from("convstore-state"),
    }
}

/// `/run/convstore/convstore.sock` for root; otherwise under `XDG_RUNTIME_DIR`.
fn default_unix_socket() -> String {
    if running_as_root() {
        return "/run/convstore/convstore.sock".into();
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir)
            .join("convstore/convstore.sock")
            .to_string_lossy()
            .into_owned(),
        None => default_state_dir()
            .join("convstore.sock")
            .to_string_lossy()
            .into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn write(contents: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::Builder::new()
            .suffix(".toml")
            .tempfile()
            .expect("temp file");
        std::io::Write::write_all(&mut file, contents.as_bytes()).expect("write");
        file
    }

    #[test]
    fn defaults_are_valid_and_match_design() {
        let s = Settings::load_from(None, env(&[])).expect("defaults load");
        assert_eq!(s.server.http_addr, "127.0.0.1:7070");
        assert_eq!(s.queue.capacity.get(), 10_000);
        assert_eq!(s.batch.max_size.get(), 64);
        assert_eq!(s.pipeline.workers.get(), 4);
        assert_eq!(s.queue.when_full, WhenFull::Reject);
    }

    #[test]
    fn default_embedding_is_the_builtin_model() {
        let s = Settings::load_from(None, env(&[])).expect("defaults load");
        assert_eq!(s.embedding.model, "all-minilm");
        assert_eq!(s.embedding.dimensions.get(), 384);
        assert_eq!(s.embedding.backends.len(), 1);
        assert_eq!(s.embedding.backends[0].kind, BackendKind::Builtin);
        assert_eq!(s.embedding.backends[0].model_dir, "");
    }

    #[test]
    fn model_dir_must_be_absolute_and_builtin() {
        let file = write(
            "[[embedding.backends]]\nname = \"b\"\nkind = \"builtin\"\nmodel_dir = \"models/x\"\n",
        );
        let err = Settings::load_from(Some(file.path()), env(&[])).unwrap_err();
        assert!(
            err.to_string().contains("embedding.backends[0].model_dir"),
            "{err}"
        );
        let file = write(
            "[[embedding.backends]]\nname = \"o\"\nkind = \"ollama\"\nurl = \"http://127.0.0.1:1\"\nmodel_dir = \"/m\"\n",
        );
        let err = Settings::load_from(Some(file.path()), env(&[])).unwrap_err();
        assert!(
            err.to_string().contains("embedding.backends[0].model_dir"),
            "{err}"
        );
        let file = write(
            "[[embedding.backends]]\nname = \"b\"\nkind = \"builtin\"\nmodel_dir = \"/opt/m\"\n",
        );
        let s = Settings::load_from(Some(file.path()), env(&[])).expect("loads");
        assert_eq!(s.embedding.backends[0].model_dir, "/opt/m");
    }

    #[test]
    fn engine_keys_are_builtin_only_and_consistent() {
        let cases = [
            (
                "kind = \"ollama\"\nurl = \"http://127.0.0.1:1\"\nengine = \"openvino\"\n",
                "embedding.backends[0].engine",
            ),
            (
                "kind = \"builtin\"\nengine = \"candle\"\nprecision = \"bf16\"\n",
                "embedding.backends[0].precision",
            ),
            (
                "kind = \"builtin\"\nopenvino_dir = \"lib/openvino\"\n",
                "embedding.backends[0].openvino_dir",
            ),
            ("kind = \"builtin\"\nengine = \"tensorflow\"\n", "engine"),
        ];
        for (keys, field) in cases {
            let file = write(&format!("[[embedding.backends]]\nname = \"b\"\n{keys}"));
            let err = Settings::load_from(Some(file.path()), env(&[])).unwrap_err();
            assert!(err.to_string().contains(field), "{keys}: {err}");
        }
        let file = write(
            "[[embedding.backends]]\nname = \"b\"\nkind = \"builtin\"\nengine = \"openvino\"\nprecision = \"f32\"\nopenvino_dir = \"/opt/openvino\"\n",
        );
        let s = Settings::load_from(Some(file.path()), env(&[])).expect("loads");
        let b = &s.embedding.backends[0];
        assert_eq!(
            (b.engine, b.precision, b.openvino_dir.as_str()),
            (
                BuiltinEngine::Openvino,
                BuiltinPrecision::F32,
                "/opt/openvino"
            )
        );
    }

    #[test]
    fn file_then_env_override() {
        let file = write("[queue]\ncapacity = 50\n[batch]\nmax_size = 8\n");
        let s = Settings::load_from(
            Some(file.path()),
            env(&[
                ("CONVSTORE_QUEUE__CAPACITY", "77"),
                ("CONVSTORE_SERVER__HTTP_ADDR", "127.0.0.1:9999"),
                ("CONVSTORE_STATE_DIR", "/tmp/x"),
            ]),
        )
        .expect("loads");
        assert_eq!(s.queue.capacity.get(), 77);
        assert_eq!(s.batch.max_size.get(), 8);
        assert_eq!(s.server.http_addr, "127.0.0.1:9999");
        assert_eq!(s.state_dir, PathBuf::from("/tmp/x"));
    }

    #[test]
    fn unknown_key_is_named() {
        let file = write("[queue]\ncapacty = 50\n");
        let err = Settings::load_from(Some(file.path()), env(&[])).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("capacty"), "{text}");
    }

    #[test]
    fn zero_size_is_rejected() {
        let file = write("[batch]\nmax_size = 0\n");
        let err = Settings::load_from(Some(file.path()), env(&[])).unwrap_err();
        assert!(
            err.to_string().contains("max_size") || err.to_string().contains("batch"),
            "{err}"
        );
    }

    #[test]
    fn negative_size_is_rejected() {
        let err =
            Settings::load_from(None, env(&[("CONVSTORE_QUEUE__CAPACITY", "-5")])).unwrap_err();
        assert!(
            err.to_string().contains("capacity") || err.to_string().contains("queue"),
            "{err}"
        );
    }

    #[test]
    fn bad_address_is_named() {
        let err = Settings::load_from(None, env(&[("CONVSTORE_SERVER__HTTP_ADDR", "localhost")]))
            .unwrap_err();
        match err {
            ConfigError::Invalid { key, .. } => assert_eq!(key, "server.http_addr"),
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn bad_socket_mode_is_named() {
        let err = Settings::load_from(None, env(&[("CONVSTORE_SERVER__SOCKET_MODE", "rw-rw")]))
            .unwrap_err();
        assert!(err.to_string().contains("server.socket_mode"), "{err}");
    }

    #[test]
    fn backends_from_file() {
        let file = write(
            "[embedding]\nmodel = \"all-minilm\"\ndimensions = 384\n\
             [[embedding.backends]]\nname = \"a\"\nkind = \"ollama\"\nurl = \"http://127.0.0.1:1\"\n\
             [[embedding.backends]]\nname = \"b\"\nkind = \"openai\"\nurl = \"http://127.0.0.1:2\"\nweight = 3\n",
        );
        let s = Settings::load_from(Some(file.path()), env(&[])).expect("loads");
        assert_eq!(s.embedding.backends.len(), 2);
        assert_eq!(s.embedding.backends[1].weight.get(), 3);
        assert_eq!(s.embedding.backends[1].kind, BackendKind::Openai);
    }

    #[test]
    fn max_response_bytes_must_hold_a_full_batch() {
        let file = write(
            "[embedding]\ndimensions = 768\nmax_batch_inputs = 64\n\
             [[embedding.backends]]\nname = \"a\"\nurl = \"http://127.0.0.1:1\"\nmax_response_bytes = 1000000\n",
        );
        let err = Settings::load_from(Some(file.path()), env(&[])).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("embedding.backends[0].max_response_bytes"),
            "{text}"
        );
        // 64 × 768 × 40 bytes + 1 MiB of envelope.
        assert!(text.contains("at least 3014656"), "{text}");
        let file = write(
            "[embedding]\ndimensions = 768\nmax_batch_inputs = 64\n\
             [[embedding.backends]]\nname = \"a\"\nurl = \"http://127.0.0.1:1\"\nmax_response_bytes = 3014656\n",
        );
        let s = Settings::load_from(Some(file.path()), env(&[])).expect("loads");
        assert_eq!(s.embedding.backends[0].max_response_bytes.get(), 3_014_656);
        // The default holds the default batch.
        let s = Settings::load_from(None, env(&[])).expect("defaults load");
        assert_eq!(s.embedding.backends[0].max_response_bytes.get(), 16 << 20);
    }

    #[test]
    fn duplicate_backend_names_rejected() {
        let file = write(
            "[[embedding.backends]]\nname = \"a\"\nurl = \"http://127.0.0.1:1\"\n\
             [[embedding.backends]]\nname = \"a\"\nurl = \"http://127.0.0.1:2\"\n",
        );
        let err = Settings::load_from(Some(file.path()), env(&[])).unwrap_err();
        assert!(
            err.to_string().contains("embedding.backends[1].name"),
            "{err}"
        );
    }

    #[test]
    fn metrics_listen_is_checked() {
        let s = Settings::load_from(
            None,
            env(&[("CONVSTORE_METRICS__LISTEN", "127.0.0.1:9187")]),
        )
        .expect("loads");
        assert_eq!(s.metrics.listen, "127.0.0.1:9187");
        for bad in ["localhost:9187", "9187", "127.0.0.1:7070"] {
            let err =
                Settings::load_from(None, env(&[("CONVSTORE_METRICS__LISTEN", bad)])).unwrap_err();
            assert!(err.to_string().contains("metrics.listen"), "{bad}: {err}");
        }
    }

    #[test]
    fn retention_durations_are_parsed_and_bad_ones_named() {
        let s = Settings::load_from(None, env(&[])).expect("defaults load");
        let policy = s.retention.policy().expect("default policy");
        assert_eq!(policy.max_age, None, "kept forever by default");
        assert_eq!(policy.interval, std::time::Duration::from_secs(3_600));
        assert_eq!(
            policy.tombstone_max_age,
            Some(std::time::Duration::from_secs(90 * 86_400))
        );

        let file = write(
            "[retention]\nmax_age = \"365d\"\ninterval = \"90m\"\ntombstone_max_age = \"\"\n\
             [retention.channels]\nweb = \"30d\"\nLegal = \"\"\n",
        );
        let s = Settings::load_from(Some(file.path()), env(&[])).expect("loads");
        let policy = s.retention.policy().expect("policy");
        assert_eq!(
            policy.max_age,
            Some(std::time::Duration::from_secs(365 * 86_400))
        );
        assert_eq!(policy.interval, std::time::Duration::from_secs(5_400));
        assert_eq!(policy.tombstone_max_age, None);
        assert_eq!(
            policy.channels.get("web"),
            Some(&Some(std::time::Duration::from_secs(30 * 86_400)))
        );
        // Channel names keep their case: they are matched as stored.
        assert_eq!(policy.channels.get("Legal"), Some(&None));

        for (toml, key) in [
            ("[retention]\nmax_age = \"1y\"\n", "retention.max_age"),
            ("[retention]\ninterval = \"\"\n", "retention.interval"),
            ("[retention]\ninterval = \"0s\"\n", "retention.interval"),
            (
                "[retention]\ntombstone_max_age = \"90\"\n",
                "retention.tombstone_max_age",
            ),
            (
                "[retention.channels]\nweb = \"30 days\"\n",
                "retention.channels.web",
            ),
        ] {
            let file = write(toml);
            match Settings::load_from(Some(file.path()), env(&[])).unwrap_err() {
                ConfigError::Invalid { key: k, reason } => {
                    assert_eq!(k, key, "{toml}: {reason}");
                    assert!(reason.contains('`'), "the value is quoted: {reason}");
                }
                other => panic!("{toml}: unexpected {other}"),
            }
        }
        let err =
            Settings::load_from(None, env(&[("CONVSTORE_RETENTION__MAX_AGE", "2w")])).unwrap_err();
        assert!(err.to_string().contains("retention.max_age"), "{err}");
    }

    #[test]
    fn token_scopes_default_to_ingest_and_read_and_unknown_ones_are_named() {
        let hash = "ab".repeat(32);
        let file = write(&format!(
            "[[auth.tokens]]\nname = \"a\"\nsha256 = \"{hash}\"\n"
        ));
        let s = Settings::load_from(Some(file.path()), env(&[])).expect("loads");
        assert_eq!(
            s.auth.tokens[0].parsed_scopes().expect("scopes"),
            vec![Scope::Ingest, Scope::Read]
        );

        let file = write(&format!(
            "[[auth.tokens]]\nname = \"a\"\nsha256 = \"{hash}\"\nscopes = [\"delete\", \"admin\"]\n"
        ));
        let s = Settings::load_from(Some(file.path()), env(&[])).expect("loads");
        assert_eq!(
            s.auth.tokens[0].parsed_scopes().expect("scopes"),
            vec![Scope::Delete, Scope::Admin]
        );

        for (scopes, needle) in [
            ("[\"ingest\", \"wirte\"]", "`wirte`"),
            ("[]", "at least one"),
        ] {
            let file = write(&format!(
                "[[auth.tokens]]\nname = \"a\"\nsha256 = \"{}\"\n\
                 [[auth.tokens]]\nname = \"b\"\nsha256 = \"{hash}\"\nscopes = {scopes}\n",
                "cd".repeat(32)
            ));
            match Settings::load_from(Some(file.path()), env(&[])).unwrap_err() {
                ConfigError::Invalid { key, reason } => {
                    assert_eq!(key, "auth.tokens[1].scopes", "{reason}");
                    assert!(reason.contains(needle), "{reason}");
                }
                other => panic!("unexpected {other}"),
            }
        }
    }

    #[test]
    fn rendered_config_loads_back_identically() {
        let s = Settings::load_from(None, env(&[])).expect("defaults");
        let file = write(&s.to_toml());
        let again = Settings::load_from(Some(file.path()), env(&[])).expect("reloads");
        assert_eq!(s, again);
    }
}
