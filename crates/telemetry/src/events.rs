//! Typed events for the metrics `/v1/stats` reads.
//!
//! `/v1/stats` is fed by a tap on the recorder ([`crate::tap`]) that picks
//! these metrics out by name, label key and label value. Each function here
//! records one event with the label keys of [`label`] and the values of
//! [`outcome`], [`chunk_status`] and [`Tier`], and the tap matches the same
//! constants: a label renamed on one side is renamed on the other, instead
//! of leaving the status view blank. Metrics `/v1/stats` does not read are
//! still recorded directly, with their names from [`crate::metrics`] and
//! their label keys from [`label`]: no metric call spells a label key.

use crate::metrics as m;

/// Label keys, for every metric (`docs/MONITORING.md` lists which metric
/// carries which).
pub mod label {
    pub const BACKEND: &str = "backend";
    pub const ENDPOINT: &str = "endpoint";
    pub const ENGINE: &str = "engine";
    pub const KIND: &str = "kind";
    pub const LEVEL: &str = "level";
    pub const MODEL: &str = "model";
    pub const OUTCOME: &str = "outcome";
    pub const PRECISION: &str = "precision";
    pub const REASON: &str = "reason";
    pub const RESULT: &str = "result";
    pub const ROLE: &str = "role";
    pub const STATUS: &str = "status";
    pub const STRATEGY: &str = "strategy";
    pub const TABLE: &str = "table";
    pub const TIER: &str = "tier";
    pub const TO: &str = "to";
    pub const TRANSPORT: &str = "transport";
    pub const VECTORS: &str = "vectors";
    pub const VERSION: &str = "version";
}

/// Values of the `outcome` label that `/v1/stats` tells apart. Any other
/// ingest outcome (an error code) counts as rejected; any other embedding
/// outcome as a failed request.
pub mod outcome {
    /// A conversation taken (ingest).
    pub const ACCEPTED: &str = "accepted";
    /// A conversation refused in a batch, whatever the reason.
    pub const REJECTED: &str = "rejected";
    /// A conversation refused because the queue was full: the API's error
    /// code for it is the same word.
    pub const QUEUE_FULL: &str = "queue_full";
    /// An embedding request answered.
    pub const OK: &str = "ok";
}

/// Values of the `status` label of stored chunks.
pub mod chunk_status {
    pub const EMBEDDED: &str = "embedded";
    pub const PENDING: &str = "pending";
    pub const FAILED: &str = "failed";
}

/// Values of the `reason` label of `convstore_conversations_deleted_total`,
/// which `/v1/stats` counts apart.
pub mod deletion {
    /// `DELETE /v1/conversations/{id}`.
    pub const API: &str = "api";
    /// `DELETE /v1/users/{user_id}`.
    pub const ERASE: &str = "erase";
    /// Past `retention.max_age` (or its channel's override).
    pub const RETENTION: &str = "retention";
    pub const ALL: [&str; 3] = [API, ERASE, RETENTION];
}

/// Values of the `outcome` label of `convstore_conversation_changes_total`:
/// what a post or an append came to (`convstore_core::lifecycle::Applied`).
pub mod change {
    pub const CREATED: &str = "created";
    pub const REPLACED: &str = "replaced";
    pub const APPENDED: &str = "appended";
    pub const UNCHANGED: &str = "unchanged";
    pub const SUPERSEDED: &str = "superseded";
    pub const DISCARDED: &str = "discarded";
    pub const ALL: [&str; 6] = [
        CREATED, REPLACED, APPENDED, UNCHANGED, SUPERSEDED, DISCARDED,
    ];
}

/// Values of the `outcome` label of `convstore_retention_runs_total`.
pub mod retention_run {
    pub const OK: &str = super::outcome::OK;
    /// A database error; the reaper tries again next interval.
    pub const FAILED: &str = "failed";
    /// Another instance was reaping; this one left it the work.
    pub const BUSY: &str = "busy";
    pub const ALL: [&str; 3] = [OK, FAILED, BUSY];
}

/// An embedding cache tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// In memory, per process.
    L1,
    /// The `embedding_cache` table, shared by every instance.
    L2,
}

impl Tier {
    pub const fn as_str(self) -> &'static str {
        match self {
            Tier::L1 => "l1",
            Tier::L2 => "l2",
        }
    }
}

/// `n` conversations of one request over `transport` ended as `outcome`
/// ([`outcome::ACCEPTED`], [`outcome::REJECTED`] or an error code).
pub fn ingest(transport: &'static str, outcome: &'static str, n: u64) {
    metrics::counter!(m::INGEST_CONVERSATIONS, label::TRANSPORT => transport, label::OUTCOME => outcome)
        .increment(n);
}

/// Chunk rows committed by one batch, by embedding status.
pub fn chunks_stored(embedded: u64, pending: u64, failed: u64) {
    for (status, n) in [
        (chunk_status::EMBEDDED, embedded),
        (chunk_status::PENDING, pending),
        (chunk_status::FAILED, failed),
    ] {
        metrics::counter!(m::CHUNKS_STORED, label::STATUS => status).increment(n);
    }
}

/// Lookups of one batch in one cache tier.
pub fn cache_lookups(tier: Tier, hits: u64, misses: u64) {
    metrics::counter!(m::CACHE_HITS, label::TIER => tier.as_str()).increment(hits);
    metrics::counter!(m::CACHE_MISSES, label::TIER => tier.as_str()).increment(misses);
}

/// One embedding request to `backend`: how it ended ([`outcome::OK`] or
/// the error kind), its inputs and how long it took.
pub fn embed_request(backend: &str, outcome: &'static str, inputs: u64, seconds: f64) {
    metrics::histogram!(m::EMBED_SECONDS, label::BACKEND => backend.to_string()).record(seconds);
    metrics::counter!(m::EMBED_REQUESTS, label::BACKEND => backend.to_string(), label::OUTCOME => outcome)
        .increment(1);
    metrics::counter!(m::EMBED_INPUTS, label::BACKEND => backend.to_string(), label::OUTCOME => outcome)
        .increment(inputs);
}

/// `n` conversations deleted for `reason` ([`deletion`]).
pub fn conversations_deleted(reason: &'static str, n: u64) {
    metrics::counter!(m::CONVERSATIONS_DELETED, label::REASON => reason).increment(n);
}
