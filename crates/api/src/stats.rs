//! `GET /v1/stats`: the snapshot the daemon serves and `convstore status`
//! reads. Rates and latencies cover the last window (about a minute);
//! totals count since start.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The stages a conversation passes, as `/v1/stats` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Request body read → conversation on the queue.
    Enqueue,
    /// Accepted → its batch taken off the queue.
    QueueWait,
    /// One embedding request (per backend call, not per batch).
    Embed,
    /// One batch written in one transaction.
    Store,
    /// Accepted → committed.
    EndToEnd,
}

impl Stage {
    pub const ALL: [Stage; 5] = [
        Stage::Enqueue,
        Stage::QueueWait,
        Stage::Embed,
        Stage::Store,
        Stage::EndToEnd,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Stage::Enqueue => "enqueue",
            Stage::QueueWait => "queue_wait",
            Stage::Embed => "embed",
            Stage::Store => "store",
            Stage::EndToEnd => "end_to_end",
        }
    }
}

/// Milliseconds from seconds: the snapshot's unit for durations.
pub fn ms(seconds: f64) -> f64 {
    seconds * 1000.0
}

/// `GET /v1/stats`. Rates and latencies cover the last `window_seconds`
/// (about a minute); totals count since start. Durations are in
/// milliseconds (`_ms`), `null` when nothing happened in the window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatsSnapshot {
    pub version: String,
    pub uptime_seconds: f64,
    pub window_seconds: f64,
    pub health: Health,
    pub queue: QueueView,
    pub rates: Rates,
    pub latency: Latencies,
    pub cache: CacheView,
    pub backends: Vec<BackendView>,
    /// From the database every few seconds; `null` until first sampled.
    pub pending_embedding: Option<PendingView>,
    pub totals: Totals,
    /// Conversations deleted since start, by reason. Absent from the
    /// snapshot of a daemon older than the lifecycle (issue 16): zeros.
    #[serde(default)]
    pub deleted: Deleted,
    /// `null` when nothing was stored in the window.
    pub bottleneck: Option<Bottleneck>,
    /// `null` where `/proc` is not available.
    pub process: Option<ProcessView>,
    /// The embedding models whose vectors the database holds: the current
    /// one, and the previous one while a change of model re-embeds (or
    /// until it is dropped). Empty until first sampled, and in the
    /// snapshot of a daemon older than model changes (issue 20).
    #[serde(default)]
    pub models: Vec<ModelView>,
}

/// One embedding model's vectors (docs/SEARCH.md "Changing the model").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelView {
    pub model: String,
    pub dimensions: u64,
    /// `current` (the configured model) or `previous`.
    pub role: String,
    /// Whether semantic search reads these vectors now.
    pub searched: bool,
    /// Chunks with a vector of this model / all chunks.
    pub coverage: f64,
    /// Chunks with a vector of this model.
    pub vectors: u64,
    /// Current model: chunks still waiting for its vector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Healthy,
    Warning,
    Critical,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Healthy => "healthy",
            Verdict::Warning => "warning",
            Verdict::Critical => "critical",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Health {
    pub status: Verdict,
    /// Why the status is not `healthy`, worst first.
    pub reasons: Vec<Reason>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reason {
    pub severity: Verdict,
    /// Stable identifier, e.g. `embed_slow` (matches the alert's meaning).
    pub code: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueView {
    pub depth: u64,
    pub capacity: u64,
    /// Conversations admitted now: `capacity`, or fewer while
    /// `queue.max_backlog_seconds` at the measured store rate says so
    /// (`None` from a daemon that predates it).
    #[serde(default)]
    pub admission_limit: Option<u64>,
    /// depth / capacity.
    pub utilization: Option<f64>,
    pub bytes: u64,
    pub max_bytes: u64,
    /// Conversations off the queue, not yet stored.
    pub in_flight: Option<u64>,
    pub workers: Option<u64>,
    pub accepting: bool,
    /// Since the oldest queued conversation was accepted (`None`: empty).
    #[serde(default)]
    pub oldest_age_seconds: Option<f64>,
    /// The queue (and what is in flight) in seconds of storing at the
    /// window's stored rate: how long what is accepted now waits to be
    /// stored. 0 with nothing waiting; `None` when something waits and
    /// nothing was stored in the window (then see `oldest_age_seconds`).
    #[serde(default)]
    pub backlog_seconds: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rates {
    pub accepted_per_second: f64,
    pub rejected_per_second: f64,
    pub stored_per_second: f64,
    pub failed_per_second: f64,
    pub duplicates_per_second: f64,
    pub chunks_per_second: f64,
    pub embed_requests_per_second: f64,
    pub embed_inputs_per_second: f64,
    pub batches_per_second: f64,
    pub mean_batch_size: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Latencies {
    pub enqueue: StageLatency,
    pub queue_wait: StageLatency,
    /// Per embedding request.
    pub embed: StageLatency,
    /// Per batch transaction.
    pub store: StageLatency,
    pub end_to_end: StageLatency,
}

impl Latencies {
    pub fn get(&self, stage: Stage) -> &StageLatency {
        match stage {
            Stage::Enqueue => &self.enqueue,
            Stage::QueueWait => &self.queue_wait,
            Stage::Embed => &self.embed,
            Stage::Store => &self.store,
            Stage::EndToEnd => &self.end_to_end,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageLatency {
    /// Observations in the window.
    pub count: u64,
    pub mean_ms: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheView {
    /// Chunk lookups answered by any cache tier, in the window.
    pub hit_ratio: Option<f64>,
    /// The same since start.
    pub hit_ratio_total: Option<f64>,
    /// Entries in the in-memory (L1) cache.
    pub entries: u64,
    pub tiers: Vec<TierView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TierView {
    pub tier: String,
    /// Since start.
    pub hits: u64,
    pub misses: u64,
    /// In the window.
    pub hit_ratio: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendView {
    pub name: String,
    /// From the last call or probe; `null` before the first.
    pub up: Option<bool>,
    pub requests_per_second: f64,
    pub error_ratio: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    /// Since start.
    pub requests: u64,
    pub errors: u64,
    /// Other per-backend gauges (e.g. `in_flight`), as recorded.
    pub gauges: BTreeMap<String, f64>,
    /// The builtin model's engine and precision, e.g. `openvino/bf16`;
    /// absent for HTTP backends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingView {
    /// Conversations with a chunk waiting for a vector.
    pub conversations: u64,
    pub chunks: u64,
    /// Age of the sample.
    pub age_seconds: f64,
    /// More than a minute ago.
    pub growing: bool,
    /// Since the oldest conversation waiting for a vector was stored (or
    /// last changed); `None` when nothing waits.
    #[serde(default)]
    pub oldest_age_seconds: Option<f64>,
    /// Embedded chunks / all stored chunks.
    #[serde(default)]
    pub coverage: Option<f64>,
    /// Chunks stored `failed` (dead letters, visible in `GET
    /// /v1/conversations/{id}`; `convstore redrive` puts them back).
    #[serde(default)]
    pub failed_chunks: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    pub accepted: u64,
    pub rejected: u64,
    pub stored: u64,
    pub duplicates: u64,
    pub failed: u64,
    pub chunks_embedded: u64,
    pub chunks_pending: u64,
    pub chunks_failed: u64,
    pub embed_requests: u64,
    pub embed_errors: u64,
    pub embed_inputs: u64,
    pub store_retries: u64,
    /// Stored conversations replaced by a new version (a post with the
    /// same id and other content).
    #[serde(default)]
    pub replaced: u64,
    /// Appends applied, and the messages they added.
    #[serde(default)]
    pub appended: u64,
    #[serde(default)]
    pub messages_appended: u64,
    /// Changes deleted or erased before they were stored.
    #[serde(default)]
    pub discarded: u64,
}

/// Conversations deleted since start, by reason (the `reason` label of
/// `convstore_conversations_deleted_total`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deleted {
    /// `DELETE /v1/conversations/{id}`.
    pub api: u64,
    /// `DELETE /v1/users/{user_id}`.
    pub erase: u64,
    /// Past `retention.max_age`.
    pub retention: u64,
}

/// Where conversations spend their time (`convstore_telemetry::health::bottleneck`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bottleneck {
    /// `queue_wait`, `embed`, `store` or `other`.
    pub stage: String,
    /// With `embed`: the ingest backend that spent the most time answering
    /// calls in the window (`builtin` when the in-process model is what
    /// holds conversations back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// Share of the end-to-end time charged to `stage` (0..=1).
    pub share: f64,
    /// Share of the workers' time (embedding + storing over workers ×
    /// window), when the pipeline is attached.
    pub utilization: Option<f64>,
    /// Workers busy ≥ 80 %: queue wait is then caused by, and charged
    /// to, the slowest work stage.
    pub saturated: bool,
    /// One sentence for people.
    pub summary: String,
    /// Mean time per conversation in each stage.
    pub stages: Vec<StageShare>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageShare {
    pub stage: String,
    pub mean_ms: f64,
    /// Of the sum of the stages.
    pub share: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessView {
    pub rss_bytes: u64,
    pub cpu_seconds: f64,
    /// CPU seconds per second over the last few seconds (1.0 = one core).
    pub cpu_ratio: Option<f64>,
    pub open_fds: u64,
    pub max_fds: Option<u64>,
    pub threads: u64,
}
