//! Every metric name convstore exports, in one place, with its buckets,
//! description and the series that exist from the start. The recorder
//! that exports them is [`crate::recorder`].
//!
//! Conventions (Prometheus): `convstore_` prefix, `_total` for counters,
//! base units in the name (`_seconds`, `_bytes`), label values from small
//! fixed sets (transport, outcome, backend name from config, tier, table).
//! Hot paths record once per batch where the number is the same for every
//! item.

use crate::events::{change, deletion, label, retention_run};

pub const INGEST_REQUESTS: &str = "convstore_ingest_requests_total";
pub const INGEST_CONVERSATIONS: &str = "convstore_ingest_conversations_total";
pub const ENQUEUE_SECONDS: &str = "convstore_enqueue_duration_seconds";
pub const QUEUE_DEPTH: &str = "convstore_queue_depth";
pub const QUEUE_CAPACITY: &str = "convstore_queue_capacity";
pub const QUEUE_ADMISSION_LIMIT: &str = "convstore_queue_admission_limit";
pub const QUEUE_STORE_RATE: &str = "convstore_queue_store_rate";
pub const QUEUE_BYTES: &str = "convstore_queue_bytes";
pub const QUEUE_MAX_BYTES: &str = "convstore_queue_max_bytes";
pub const QUEUE_WAIT_SECONDS: &str = "convstore_queue_wait_seconds";
pub const BATCH_CONVERSATIONS: &str = "convstore_batch_conversations";
pub const BATCH_CHUNKS: &str = "convstore_batch_chunks";
pub const EMBED_REQUESTS: &str = "convstore_embed_requests_total";
pub const EMBED_INPUTS: &str = "convstore_embed_inputs_total";
pub const EMBED_SECONDS: &str = "convstore_embed_duration_seconds";
/// The embedding stage of one batch: cache tiers, backend calls, retries.
pub const EMBED_BATCH_SECONDS: &str = "convstore_embed_batch_duration_seconds";
pub const BACKEND_UP: &str = "convstore_backend_up";
pub const BUILTIN_TOKENS: &str = "convstore_builtin_tokens_total";
pub const BUILTIN_INFERENCE_SECONDS: &str = "convstore_builtin_inference_seconds";
/// Inputs in one model batch of the builtin model (merged across calls).
pub const BUILTIN_BATCH_INPUTS: &str = "convstore_builtin_batch_inputs";
/// Builtin inputs dropped before they ran because their caller had gone.
pub const BUILTIN_INPUTS_WITHDRAWN: &str = "convstore_builtin_inputs_withdrawn_total";
/// 1 for the engine and precision a builtin backend runs on.
pub const BUILTIN_ENGINE: &str = "convstore_builtin_engine";
/// Share of chunks with a vector of each embedding model (`model`, `role`:
/// current or previous), sampled from the database.
pub const MODEL_COVERAGE: &str = "convstore_embedding_model_coverage_ratio";
/// 1 while a change of model re-embeds and search reads the previous
/// model's vectors.
pub const MODEL_MIGRATING: &str = "convstore_embedding_model_migrating";
/// Semantic searches by the vectors that answered (`vectors`: current,
/// previous).
pub const SEARCH_VECTORS: &str = "convstore_search_vectors_total";
pub const CACHE_HITS: &str = "convstore_cache_hits_total";
pub const CACHE_MISSES: &str = "convstore_cache_misses_total";
pub const CACHE_ENTRIES: &str = "convstore_cache_entries";
pub const STORE_SECONDS: &str = "convstore_store_duration_seconds";
pub const STORE_ROWS: &str = "convstore_store_rows_total";
pub const STORE_RETRIES: &str = "convstore_store_retries_total";
pub const CONVERSATIONS_STORED: &str = "convstore_conversations_stored_total";
pub const CONVERSATIONS_DUPLICATE: &str = "convstore_conversations_duplicate_total";
pub const CONVERSATIONS_FAILED: &str = "convstore_conversations_failed_total";
/// Changes to conversations (posts and appends) by what they came to.
pub const CONVERSATION_CHANGES: &str = "convstore_conversation_changes_total";
pub const MESSAGES_APPENDED: &str = "convstore_messages_appended_total";
pub const CHUNKS_STORED: &str = "convstore_chunks_stored_total";
pub const END_TO_END_SECONDS: &str = "convstore_end_to_end_seconds";
pub const READY: &str = "convstore_ready";
/// Conversations/chunks stored without a vector yet, sampled from the
/// database by the daemon's `telemetry_task`.
pub const CONVERSATIONS_PENDING_EMBEDDING: &str = "convstore_conversations_pending_embedding";
pub const CHUNKS_PENDING_EMBEDDING: &str = "convstore_chunks_pending_embedding";
/// Freshness (issue 18): since the oldest stored conversation waiting for
/// a vector was stored, and the share of chunks with one (sampled from the
/// database with the pending counts); since the oldest queued conversation
/// was accepted (sampled from the queue).
pub const PENDING_OLDEST_AGE_SECONDS: &str = "convstore_pending_embedding_oldest_age_seconds";
pub const EMBEDDING_COVERAGE: &str = "convstore_embedding_coverage_ratio";
pub const QUEUE_OLDEST_AGE_SECONDS: &str = "convstore_queue_oldest_age_seconds";
/// Embedding requests a backend is serving now (recorded by the router).
pub const BACKEND_IN_FLIGHT: &str = "convstore_backend_in_flight";
pub const PIPELINE_IN_FLIGHT: &str = "convstore_pipeline_in_flight_conversations";
pub const PIPELINE_WORKERS: &str = "convstore_pipeline_workers";
pub const BUILD_INFO: &str = "convstore_build_info";
/// Read from `/proc/self` at scrape time and rendered by
/// [`crate::process`], not through the facade.
pub const PROCESS_CPU_SECONDS: &str = "convstore_process_cpu_seconds_total";
pub const PROCESS_RESIDENT_MEMORY_BYTES: &str = "convstore_process_resident_memory_bytes";
pub const PROCESS_VIRTUAL_MEMORY_BYTES: &str = "convstore_process_virtual_memory_bytes";
pub const PROCESS_OPEN_FDS: &str = "convstore_process_open_fds";
pub const PROCESS_MAX_FDS: &str = "convstore_process_max_fds";
pub const PROCESS_THREADS: &str = "convstore_process_threads";
pub const PROCESS_START_TIME_SECONDS: &str = "convstore_process_start_time_seconds";
// Routing across backends, backfill, dead letters (issue 4).
pub const BACKEND_CIRCUIT_STATE: &str = "convstore_backend_circuit_state";
pub const BACKEND_CIRCUIT_TRANSITIONS: &str = "convstore_backend_circuit_transitions_total";
pub const BACKENDS_READY: &str = "convstore_backends_ready";
pub const CHUNK_BUDGET_TOKENS: &str = "convstore_chunk_budget_tokens";
pub const BACKEND_CHUNK_BUDGET_TOKENS: &str = "convstore_backend_chunk_budget_tokens";
pub const EMBED_PACING_WAIT_SECONDS: &str = "convstore_embed_pacing_wait_seconds";
pub const EMBED_FAILOVERS: &str = "convstore_embed_failovers_total";
pub const EMBED_RETRIES: &str = "convstore_embed_retries_total";
pub const BACKFILL_CHUNKS: &str = "convstore_backfill_chunks_total";
pub const CHUNKS_FAILED_EMBEDDING: &str = "convstore_chunks_failed_embedding";
/// Failed chunks put back to pending by `POST /v1/admin/redrive`.
pub const CHUNKS_REDRIVEN: &str = "convstore_chunks_redriven_total";
pub const CHUNKS_SPLIT_ON_REFUSAL: &str = "convstore_chunks_split_on_refusal_total";
pub const CONVERSATIONS_FAILED_EMBEDDING: &str = "convstore_conversations_failed_embedding";
// Search (issue 9; docs/SEARCH.md). Recorded by the daemon's `http::search`.
/// Searches by transport and outcome (`ok`, or the error code).
pub const SEARCH_REQUESTS: &str = "convstore_search_requests_total";
/// Whole search requests, slot wait, query embedding and database included.
pub const SEARCH_SECONDS: &str = "convstore_search_duration_seconds";
/// Embedding the query (cache hits included).
pub const SEARCH_EMBED_SECONDS: &str = "convstore_search_embed_duration_seconds";
/// The database part of a search (all index rounds, exact scans).
pub const SEARCH_DATABASE_SECONDS: &str = "convstore_search_database_duration_seconds";
/// Waiting for one of `search.max_concurrent` slots.
pub const SEARCH_WAIT_SECONDS: &str = "convstore_search_wait_seconds";
/// Query vectors by `result` (`hit` in the L1 cache, `miss`).
pub const SEARCH_EMBED_CACHE: &str = "convstore_search_embed_cache_total";
/// Searches by how they were answered (`strategy`: hnsw, hnsw_overfetch,
/// hnsw_iterative, exact, exact_fallback).
pub const SEARCH_STRATEGY: &str = "convstore_search_strategy_total";
/// Searches running now.
pub const SEARCH_IN_FLIGHT: &str = "convstore_search_in_flight";
// Journal, acknowledgements, access control (issue 5; docs/DURABILITY.md).
pub const JOURNAL_BYTES: &str = "convstore_journal_bytes";
pub const JOURNAL_MAX_BYTES: &str = "convstore_journal_max_bytes";
pub const JOURNAL_FSYNC_SECONDS: &str = "convstore_journal_fsync_duration_seconds";
pub const JOURNAL_REPLAYED: &str = "convstore_journal_replayed_total";
pub const JOURNAL_DAMAGED_BYTES: &str = "convstore_journal_damaged_bytes_total";
/// 1 while the journal can write, 0 while appends are refused because a
/// write failed (disk full: it recovers by itself) or an fsync did.
pub const JOURNAL_WRITABLE: &str = "convstore_journal_writable";
pub const ACK_WAIT_SECONDS: &str = "convstore_ack_wait_duration_seconds";
pub const AUTH_REJECTED: &str = "convstore_auth_rejected_total";
// Connections and request bodies (issue 15; the daemon's `http::serve`,
// `http::body`).
/// Connections open now, by transport.
pub const HTTP_CONNECTIONS: &str = "convstore_http_connections";
/// Connections convstore closed or refused, by transport and reason
/// (`idle`, `header_timeout`, `evicted`, `shed`).
pub const HTTP_CONNECTIONS_CLOSED: &str = "convstore_http_connections_closed_total";
/// Bytes of request bodies held in memory now.
pub const HTTP_BODY_BUFFERED_BYTES: &str = "convstore_http_body_buffered_bytes";
// Conversation lifecycle (issue 16; docs/LIFECYCLE.md).
/// Conversations deleted, by reason (`events::deletion`: api, erase,
/// retention).
pub const CONVERSATIONS_DELETED: &str = "convstore_conversations_deleted_total";
/// Runs of the retention reaper, by outcome (ok, failed, busy).
pub const RETENTION_RUNS: &str = "convstore_retention_runs_total";
/// Tombstones dropped by the reaper past `retention.tombstone_max_age`.
pub const TOMBSTONES_DROPPED: &str = "convstore_tombstones_dropped_total";
// The shared intake on NATS JetStream (issue 17; docs/SCALING.md), per
// instance; the crate `convstore-nats` and the daemon's `pipeline::shared`.
/// Changes published to the stream, by outcome (ok, duplicate, full, error).
pub const NATS_PUBLISHED: &str = "convstore_nats_published_total";
/// From sending a change to the stream's acknowledgement.
pub const NATS_PUBLISH_SECONDS: &str = "convstore_nats_publish_duration_seconds";
/// Changes this instance pulled from the shared consumer.
pub const NATS_PULLED: &str = "convstore_nats_messages_pulled_total";
/// Of those, deliveries after the first (an instance died or was slow).
pub const NATS_REDELIVERED: &str = "convstore_nats_messages_redelivered_total";
/// Acknowledged after their commit (or found moot).
pub const NATS_ACKED: &str = "convstore_nats_messages_acked_total";
/// Acknowledgements not confirmed in time (each becomes a redelivery).
pub const NATS_ACK_FAILURES: &str = "convstore_nats_ack_failures_total";
/// Handed back for later: an earlier change of the conversation was still
/// elsewhere, or this instance was stopping.
pub const NATS_DEFERRED: &str = "convstore_nats_messages_deferred_total";
/// Terminated (never delivered again) and recorded in `dead_letters`.
pub const NATS_TERMINATED: &str = "convstore_nats_messages_terminated_total";
/// The shared consumer's state as JetStream reports it (sampled).
pub const NATS_CONSUMER_PENDING: &str = "convstore_nats_consumer_pending";
pub const NATS_CONSUMER_ACK_PENDING: &str = "convstore_nats_consumer_ack_pending";
/// 1 while connected to NATS and the stream answers.
pub const NATS_UP: &str = "convstore_nats_up";
/// Rows in `dead_letters` (sampled from the database).
pub const DEAD_LETTERS: &str = "convstore_dead_letters";

/// Every metric name above, in declaration order. A unit test checks that
/// it lists every `convstore_` constant of this file and that
/// docs/MONITORING.md documents each of them: a new metric needs a line
/// here and an entry there.
pub const ALL: &[&str] = &[
    INGEST_REQUESTS,
    INGEST_CONVERSATIONS,
    ENQUEUE_SECONDS,
    QUEUE_DEPTH,
    QUEUE_CAPACITY,
    QUEUE_ADMISSION_LIMIT,
    QUEUE_STORE_RATE,
    QUEUE_BYTES,
    QUEUE_MAX_BYTES,
    QUEUE_WAIT_SECONDS,
    BATCH_CONVERSATIONS,
    BATCH_CHUNKS,
    EMBED_REQUESTS,
    EMBED_INPUTS,
    EMBED_SECONDS,
    EMBED_BATCH_SECONDS,
    BACKEND_UP,
    BUILTIN_TOKENS,
    BUILTIN_INFERENCE_SECONDS,
    BUILTIN_BATCH_INPUTS,
    BUILTIN_INPUTS_WITHDRAWN,
    BUILTIN_ENGINE,
    MODEL_COVERAGE,
    MODEL_MIGRATING,
    SEARCH_VECTORS,
    CACHE_HITS,
    CACHE_MISSES,
    CACHE_ENTRIES,
    STORE_SECONDS,
    STORE_ROWS,
    STORE_RETRIES,
    CONVERSATIONS_STORED,
    CONVERSATIONS_DUPLICATE,
    CONVERSATIONS_FAILED,
    CONVERSATION_CHANGES,
    MESSAGES_APPENDED,
    CHUNKS_STORED,
    END_TO_END_SECONDS,
    READY,
    CONVERSATIONS_PENDING_EMBEDDING,
    CHUNKS_PENDING_EMBEDDING,
    PENDING_OLDEST_AGE_SECONDS,
    EMBEDDING_COVERAGE,
    QUEUE_OLDEST_AGE_SECONDS,
    BACKEND_IN_FLIGHT,
    PIPELINE_IN_FLIGHT,
    PIPELINE_WORKERS,
    BUILD_INFO,
    PROCESS_CPU_SECONDS,
    PROCESS_RESIDENT_MEMORY_BYTES,
    PROCESS_VIRTUAL_MEMORY_BYTES,
    PROCESS_OPEN_FDS,
    PROCESS_MAX_FDS,
    PROCESS_THREADS,
    PROCESS_START_TIME_SECONDS,
    BACKEND_CIRCUIT_STATE,
    BACKEND_CIRCUIT_TRANSITIONS,
    BACKENDS_READY,
    CHUNK_BUDGET_TOKENS,
    BACKEND_CHUNK_BUDGET_TOKENS,
    EMBED_PACING_WAIT_SECONDS,
    EMBED_FAILOVERS,
    EMBED_RETRIES,
    BACKFILL_CHUNKS,
    CHUNKS_FAILED_EMBEDDING,
    CHUNKS_REDRIVEN,
    CHUNKS_SPLIT_ON_REFUSAL,
    CONVERSATIONS_FAILED_EMBEDDING,
    SEARCH_REQUESTS,
    SEARCH_SECONDS,
    SEARCH_EMBED_SECONDS,
    SEARCH_DATABASE_SECONDS,
    SEARCH_WAIT_SECONDS,
    SEARCH_EMBED_CACHE,
    SEARCH_STRATEGY,
    SEARCH_IN_FLIGHT,
    JOURNAL_BYTES,
    JOURNAL_MAX_BYTES,
    JOURNAL_FSYNC_SECONDS,
    JOURNAL_REPLAYED,
    JOURNAL_DAMAGED_BYTES,
    JOURNAL_WRITABLE,
    ACK_WAIT_SECONDS,
    AUTH_REJECTED,
    HTTP_CONNECTIONS,
    HTTP_CONNECTIONS_CLOSED,
    HTTP_BODY_BUFFERED_BYTES,
    CONVERSATIONS_DELETED,
    RETENTION_RUNS,
    TOMBSTONES_DROPPED,
    NATS_PUBLISHED,
    NATS_PUBLISH_SECONDS,
    NATS_PULLED,
    NATS_REDELIVERED,
    NATS_ACKED,
    NATS_ACK_FAILURES,
    NATS_DEFERRED,
    NATS_TERMINATED,
    NATS_CONSUMER_PENDING,
    NATS_CONSUMER_ACK_PENDING,
    NATS_UP,
    DEAD_LETTERS,
];

/// Microseconds to tens of milliseconds: enqueue is meant to take µs.
pub const ENQUEUE_BUCKETS: &[f64] = &[
    0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.005, 0.01, 0.05,
];
/// Milliseconds to a minute: embedding, storage, queue wait, end to end.
/// The alert thresholds (store 50/100 ms, embedding 200/500 ms) are bucket
/// bounds, so `histogram_quantile` is exact where it matters; 150 ms sizes
/// a miss of the 100 ms received → committed target. 12.5, 15 and
/// 20 s resolve a saturated daemon: admission holds the backlog to
/// `queue.max_backlog_seconds` (10 by default), so its queue waits and end
/// to end times sit just above 10 s, where one 10–30 s bucket made every
/// quantile read as ~27 s.
pub const STAGE_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 12.5,
    15.0, 20.0, 30.0, 60.0,
];
/// Tens of microseconds to seconds: a publish waits for the stream's
/// acknowledgement (and its fsync, with `sync_interval: always`).
pub const PUBLISH_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 5.0,
];
/// Counts per batch.
pub const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

/// Series that must exist from the start at 0, so that `rate()`, ratios
/// and alerts see a number rather than nothing before the first event.
pub fn init_series() {
    for name in [CONVERSATIONS_STORED, CONVERSATIONS_DUPLICATE, STORE_RETRIES] {
        metrics::counter!(name).absolute(0);
    }
    for reason in ["database_unavailable", "rejected_by_database", "lost"] {
        metrics::counter!(CONVERSATIONS_FAILED, label::REASON => reason).absolute(0);
    }
    for status in ["embedded", "pending", "failed"] {
        metrics::counter!(CHUNKS_STORED, label::STATUS => status).absolute(0);
    }
    for outcome in change::ALL {
        metrics::counter!(CONVERSATION_CHANGES, label::OUTCOME => outcome).absolute(0);
    }
    metrics::counter!(MESSAGES_APPENDED).absolute(0);
    for table in ["conversations", "conversation_chunks"] {
        metrics::counter!(STORE_ROWS, label::TABLE => table).absolute(0);
    }
    for reason in deletion::ALL {
        metrics::counter!(CONVERSATIONS_DELETED, label::REASON => reason).absolute(0);
    }
    for outcome in retention_run::ALL {
        metrics::counter!(RETENTION_RUNS, label::OUTCOME => outcome).absolute(0);
    }
    metrics::counter!(TOMBSTONES_DROPPED).absolute(0);
    metrics::counter!(CACHE_HITS, label::TIER => "l1").absolute(0);
    metrics::counter!(CACHE_MISSES, label::TIER => "l1").absolute(0);
    for vectors in ["current", "previous"] {
        metrics::counter!(SEARCH_VECTORS, label::VECTORS => vectors).absolute(0);
    }
    metrics::gauge!(MODEL_MIGRATING).set(0.0);
    metrics::gauge!(BUILD_INFO, label::VERSION => env!("CARGO_PKG_VERSION")).set(1.0);
}

/// Descriptions and units of every metric, for the recorder installed.
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(
        JOURNAL_BYTES,
        Unit::Bytes,
        "Bytes of journal segments on disk (live, and stored ones not deleted yet)."
    );
    describe_gauge!(JOURNAL_MAX_BYTES, Unit::Bytes, "journal.max_bytes.");
    describe_histogram!(
        JOURNAL_FSYNC_SECONDS,
        Unit::Seconds,
        "One group-commit fsync of the journal."
    );
    describe_counter!(
        JOURNAL_REPLAYED,
        "Journal records read back at start-up, by outcome (queued, already_stored, undecodable)."
    );
    describe_counter!(
        JOURNAL_DAMAGED_BYTES,
        Unit::Bytes,
        "Journal bytes skipped at replay because they failed their checksum, by kind (torn_tail, corrupt, bad_header)."
    );
    describe_gauge!(
        JOURNAL_WRITABLE,
        "1 while the journal can write; 0 while it refuses conversations after a failed write (disk full; recovers by itself) or fsync (until a restart)."
    );
    describe_histogram!(
        ACK_WAIT_SECONDS,
        Unit::Seconds,
        "Time a request waited for its acknowledgement level (?wait=durable|stored), by level and outcome."
    );
    describe_gauge!(HTTP_CONNECTIONS, "HTTP connections open now, by transport.");
    describe_counter!(
        HTTP_CONNECTIONS_CLOSED,
        "HTTP connections closed or refused by convstore, by transport and reason (idle: no request for server.idle_timeout_ms; header_timeout: no complete request head within server.header_timeout_ms; evicted: replaced at server.max_connections; shed: refused with 503 at server.max_connections)."
    );
    describe_gauge!(
        HTTP_BODY_BUFFERED_BYTES,
        Unit::Bytes,
        "Bytes of request bodies held in memory now (bounded by server.max_buffered_body_bytes)."
    );
    describe_counter!(
        AUTH_REJECTED,
        "Requests refused by access control, by reason (missing, invalid, rate_limited)."
    );
    describe_counter!(
        CONVERSATIONS_DELETED,
        "Conversations deleted, by reason (api: DELETE /v1/conversations/{id}; erase: DELETE /v1/users/{user_id}; retention: past retention.max_age)."
    );
    describe_counter!(
        RETENTION_RUNS,
        "Runs of the retention reaper, by outcome (ok; failed: a database error, retried next interval; busy: another instance was reaping)."
    );
    describe_counter!(
        TOMBSTONES_DROPPED,
        "Tombstones dropped by the retention reaper, past retention.tombstone_max_age."
    );
    describe_counter!(
        NATS_PUBLISHED,
        "Shared intake: changes published to the JetStream stream, by outcome (ok; duplicate: a publisher retry the broker dropped; full: the stream is at its limits, 429; error)."
    );
    describe_histogram!(
        NATS_PUBLISH_SECONDS,
        Unit::Seconds,
        "Shared intake: from sending a change to the stream's acknowledgement (what ?wait=queued and durable wait for)."
    );
    describe_counter!(
        NATS_PULLED,
        "Shared intake: changes this instance pulled from the shared consumer."
    );
    describe_counter!(
        NATS_REDELIVERED,
        "Shared intake: pulled changes on their second or later delivery."
    );
    describe_counter!(
        NATS_ACKED,
        "Shared intake: changes acknowledged after the commit that applied them."
    );
    describe_counter!(
        NATS_ACK_FAILURES,
        "Shared intake: acknowledgements not confirmed in time (each is a redelivery the store absorbs)."
    );
    describe_counter!(
        NATS_DEFERRED,
        "Shared intake: changes held back (an append waiting for an earlier change of its conversation held elsewhere) or handed back to the stream (the instance stopping, its queue full)."
    );
    describe_counter!(
        NATS_TERMINATED,
        "Shared intake: changes terminated and recorded in dead_letters (refused by the database, or not a change)."
    );
    describe_gauge!(
        NATS_CONSUMER_PENDING,
        "Shared intake: changes in the stream no instance has pulled yet (sampled from JetStream)."
    );
    describe_gauge!(
        NATS_CONSUMER_ACK_PENDING,
        "Shared intake: changes pulled by some instance and not yet acknowledged (sampled from JetStream)."
    );
    describe_gauge!(
        DEAD_LETTERS,
        "Shared intake: changes kept in the dead_letters table (sampled from the database)."
    );
    describe_gauge!(
        NATS_UP,
        "Shared intake: 1 while connected to NATS and the stream answers."
    );
    describe_counter!(
        INGEST_REQUESTS,
        "HTTP requests to the ingest API by transport, endpoint and outcome."
    );
    describe_counter!(
        INGEST_CONVERSATIONS,
        "Conversations offered to ingest by transport and outcome."
    );
    describe_histogram!(
        ENQUEUE_SECONDS,
        Unit::Seconds,
        "Time from request body read to conversation queued."
    );
    describe_gauge!(QUEUE_DEPTH, "Conversations waiting in the in-memory queue.");
    describe_gauge!(QUEUE_CAPACITY, "queue.capacity.");
    describe_gauge!(
        QUEUE_ADMISSION_LIMIT,
        "Conversations the queue admits now: queue.max_backlog_seconds at the measured store rate, within queue.capacity."
    );
    describe_gauge!(
        QUEUE_STORE_RATE,
        "Conversations the pipeline finishes per second while it has work (the admission limit's estimate)."
    );
    describe_gauge!(
        QUEUE_BYTES,
        Unit::Bytes,
        "Bytes of conversations waiting in the queue."
    );
    describe_gauge!(QUEUE_MAX_BYTES, Unit::Bytes, "queue.max_bytes.");
    describe_histogram!(
        QUEUE_WAIT_SECONDS,
        Unit::Seconds,
        "Time a conversation waited from acceptance to its batch starting."
    );
    describe_histogram!(BATCH_CONVERSATIONS, "Conversations per batch.");
    describe_histogram!(BATCH_CHUNKS, "Chunks per batch.");
    describe_counter!(EMBED_REQUESTS, "Embedding requests by backend and outcome.");
    describe_counter!(
        EMBED_INPUTS,
        "Texts sent for embedding by backend and outcome."
    );
    describe_histogram!(
        EMBED_SECONDS,
        Unit::Seconds,
        "Embedding request latency by backend."
    );
    describe_histogram!(
        EMBED_BATCH_SECONDS,
        Unit::Seconds,
        "Time one batch spent getting its vectors: cache lookups, backend calls and retries."
    );
    describe_gauge!(
        BACKEND_UP,
        "1 when the backend's last call or probe succeeded."
    );
    describe_counter!(
        BUILTIN_TOKENS,
        "Tokens run through the builtin model by backend, `kind` real or padding."
    );
    describe_histogram!(
        BUILTIN_INFERENCE_SECONDS,
        Unit::Seconds,
        "Builtin model: time of one model batch on an inference thread, by backend."
    );
    describe_histogram!(
        BUILTIN_BATCH_INPUTS,
        Unit::Count,
        "Builtin model: inputs in one model batch, merged across concurrent calls."
    );
    describe_counter!(
        BUILTIN_INPUTS_WITHDRAWN,
        "Builtin model: inputs dropped before they ran because their caller had gone."
    );
    describe_gauge!(
        BUILTIN_ENGINE,
        "1 for the engine (openvino, candle) and precision (bf16, f32) a builtin backend runs on."
    );
    describe_gauge!(
        MODEL_COVERAGE,
        "Share of chunks with a vector of each embedding model (role: current, previous)."
    );
    describe_gauge!(
        MODEL_MIGRATING,
        "1 while a change of embedding model re-embeds and search reads the previous model's vectors."
    );
    describe_counter!(
        SEARCH_VECTORS,
        "Semantic searches by the vectors that answered (current, previous)."
    );
    describe_counter!(CACHE_HITS, "Embedding cache hits by tier.");
    describe_counter!(CACHE_MISSES, "Embedding cache misses by tier.");
    describe_gauge!(CACHE_ENTRIES, "Entries in the L1 embedding cache.");
    describe_histogram!(
        STORE_SECONDS,
        Unit::Seconds,
        "Time to write one batch in one transaction."
    );
    describe_counter!(STORE_ROWS, "Rows written by table.");
    describe_counter!(
        STORE_RETRIES,
        "Batch writes retried after a database error."
    );
    describe_counter!(
        CONVERSATIONS_STORED,
        "Conversations committed to PostgreSQL."
    );
    describe_counter!(
        CONVERSATIONS_DUPLICATE,
        "Conversations whose id was already stored (idempotent replays)."
    );
    describe_counter!(
        CONVERSATIONS_FAILED,
        "Accepted conversations that could not be stored, by reason."
    );
    describe_counter!(CHUNKS_STORED, "Chunks committed, by embedding status.");
    describe_counter!(
        CONVERSATION_CHANGES,
        "Posts and appends applied, by outcome: created, replaced (a new version of a stored conversation), appended, unchanged (a retry), superseded (a later change was there), discarded (deleted or erased before it was stored)."
    );
    describe_counter!(
        MESSAGES_APPENDED,
        "Messages added to stored conversations by appends (repeated message ids not counted)."
    );
    describe_histogram!(
        END_TO_END_SECONDS,
        Unit::Seconds,
        "Time from acceptance to commit in PostgreSQL."
    );
    describe_gauge!(READY, "1 when /readyz answers 200.");
    describe_gauge!(
        CONVERSATIONS_PENDING_EMBEDDING,
        "Stored conversations with a chunk still waiting for its vector (sampled from the database)."
    );
    describe_gauge!(
        CHUNKS_PENDING_EMBEDDING,
        "Stored chunks still waiting for their vector (sampled from the database)."
    );
    describe_gauge!(
        PENDING_OLDEST_AGE_SECONDS,
        Unit::Seconds,
        "Since the oldest stored conversation still waiting for a vector was stored or last changed; 0 when none waits (sampled from the database)."
    );
    describe_gauge!(
        EMBEDDING_COVERAGE,
        "Embedded chunks / all stored chunks, 0 to 1 (sampled from the database)."
    );
    describe_gauge!(
        QUEUE_OLDEST_AGE_SECONDS,
        Unit::Seconds,
        "Since the oldest conversation on the queue was accepted; 0 when the queue is empty."
    );
    describe_gauge!(
        BACKEND_IN_FLIGHT,
        "Embedding requests a backend is serving now."
    );
    describe_gauge!(
        PIPELINE_IN_FLIGHT,
        "Conversations taken off the queue and not yet stored."
    );
    describe_gauge!(PIPELINE_WORKERS, "pipeline.workers.");
    describe_gauge!(BUILD_INFO, "Always 1; the version is in the label.");
    describe_gauge!(
        BACKEND_CIRCUIT_STATE,
        "Circuit breaker per backend: 0 closed, 1 half-open (trial due), 2 open."
    );
    describe_counter!(
        BACKEND_CIRCUIT_TRANSITIONS,
        "Circuit breaker state changes per backend, by new state."
    );
    describe_gauge!(
        BACKENDS_READY,
        "Backends up (last probe fine, right dimension) with their circuit not open."
    );
    describe_gauge!(
        CHUNK_BUDGET_TOKENS,
        "Estimated tokens a chunk may cost: the smallest context of the usable backends, or less after a backend refused an input as too long."
    );
    describe_gauge!(
        BACKEND_CHUNK_BUDGET_TOKENS,
        "Estimated tokens a chunk may cost at this backend: its reported context, or less after it refused an input as too long."
    );
    describe_histogram!(
        EMBED_PACING_WAIT_SECONDS,
        Unit::Seconds,
        "Time a request waited to stay within its backend's requests_per_minute / tokens_per_minute."
    );
    describe_counter!(
        EMBED_FAILOVERS,
        "Embedding calls a backend failed that were sent on to another backend."
    );
    describe_counter!(
        EMBED_RETRIES,
        "Embedding calls retried after backoff, every backend tried having failed."
    );
    describe_counter!(
        BACKFILL_CHUNKS,
        "Pending chunks the backfill handled, by outcome (embedded, failed, deferred, split)."
    );
    describe_counter!(
        CHUNKS_SPLIT_ON_REFUSAL,
        "Chunks a backend refused as too long that were stored as smaller pieces instead."
    );
    describe_counter!(
        CHUNKS_REDRIVEN,
        "Failed chunks put back to pending by POST /v1/admin/redrive (convstore redrive)."
    );
    describe_gauge!(
        CHUNKS_FAILED_EMBEDDING,
        "Chunks a backend rejected for good (dead letters; sampled from the database)."
    );
    describe_gauge!(
        CONVERSATIONS_FAILED_EMBEDDING,
        "Conversations with a dead-lettered chunk (sampled from the database)."
    );
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::{ALL, INGEST_REQUESTS, QUEUE_DEPTH, STORE_SECONDS};

    /// This file's source, to find the metric constants themselves.
    const SOURCE: &str = include_str!("metrics.rs");
    const MONITORING_MD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/MONITORING.md");
    /// Series a histogram adds to its name in the exposition format.
    const HISTOGRAM_SUFFIXES: &[&str] = &["_bucket", "_sum", "_count"];

    /// The value of every top-level `pub const NAME: &str = "convstore_…";`
    /// in `source`, whatever rustfmt does to the line.
    fn declared_in(source: &str) -> BTreeSet<&str> {
        let mut names = BTreeSet::new();
        for item in source.split("\npub const ").skip(1) {
            let Some((declaration, _)) = item.split_once(';') else {
                continue;
            };
            let Some((lhs, rhs)) = declaration.split_once('=') else {
                continue;
            };
            let Some((ident, ty)) = lhs.split_once(':') else {
                continue;
            };
            let is_ident = !ident.is_empty()
                && ident
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
            if !is_ident || ty.trim() != "&str" {
                continue;
            }
            let value = rhs.trim();
            if let Some(name) = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .filter(|v| v.starts_with("convstore_"))
                .filter(|v| {
                    v.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                })
            {
                names.insert(name);
            }
        }
        names
    }

    /// Every `convstore_…` name in `text` (a word of lowercase letters,
    /// digits and `_`), except the bare prefix and other prefixes ending in
    /// `_` (`convstore_`, `convstore_.*` in a selector).
    fn mentioned_in(text: &str) -> BTreeSet<&str> {
        let bytes = text.as_bytes();
        let is_word = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_';
        let mut names = BTreeSet::new();
        let mut i = 0;
        while let Some(pos) = text[i..].find("convstore_") {
            let start = i + pos;
            let mut end = start;
            while end < bytes.len() && is_word(bytes[end]) {
                end += 1;
            }
            let standalone = start == 0
                || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
            let name = &text[start..end];
            if standalone && !name.ends_with('_') {
                names.insert(name);
            }
            i = end;
        }
        names
    }

    /// A name as documented, with a histogram's `_bucket`/`_sum`/`_count`
    /// taken off when what remains is declared.
    fn family<'a>(name: &'a str, declared: &BTreeSet<&str>) -> &'a str {
        HISTOGRAM_SUFFIXES
            .iter()
            .filter_map(|suffix| name.strip_suffix(suffix))
            .find(|base| declared.contains(base))
            .unwrap_or(name)
    }

    fn monitoring_md() -> String {
        std::fs::read_to_string(MONITORING_MD)
            .unwrap_or_else(|e| panic!("cannot read {MONITORING_MD}: {e}"))
    }

    #[test]
    fn all_lists_every_metric_constant() {
        let in_source = declared_in(SOURCE);
        assert!(
            in_source.len() >= 10,
            "found only {} metric constants in metrics.rs: is the parser broken?",
            in_source.len()
        );
        let in_all: BTreeSet<&str> = ALL.iter().copied().collect();
        assert_eq!(in_all.len(), ALL.len(), "metrics::ALL lists a name twice");
        let missing: Vec<&str> = in_source.difference(&in_all).copied().collect();
        assert!(
            missing.is_empty(),
            "metrics declared in crates/telemetry/src/metrics.rs but not listed in \
             metrics::ALL: {missing:?}; add each to ALL and document it in docs/MONITORING.md"
        );
        let stray: Vec<&str> = in_all.difference(&in_source).copied().collect();
        assert!(
            stray.is_empty(),
            "metrics::ALL lists {stray:?}, which no string constant in \
             crates/telemetry/src/metrics.rs declares"
        );
    }

    #[test]
    fn monitoring_md_documents_every_metric_and_only_those() {
        let doc = monitoring_md();
        let declared: BTreeSet<&str> = ALL.iter().copied().collect();
        let documented: BTreeSet<&str> = mentioned_in(&doc)
            .into_iter()
            .map(|name| family(name, &declared))
            .collect();

        let undocumented: Vec<&str> = declared.difference(&documented).copied().collect();
        assert!(
            undocumented.is_empty(),
            "{} metric(s) declared in crates/telemetry/src/metrics.rs are missing from \
             docs/MONITORING.md: {}. Document each in docs/MONITORING.md (type, labels and \
             their values, unit, what it means and when to look at it).",
            undocumented.len(),
            undocumented.join(", ")
        );

        let undeclared: Vec<&str> = documented.difference(&declared).copied().collect();
        assert!(
            undeclared.is_empty(),
            "docs/MONITORING.md mentions {}, which crates/telemetry/src/metrics.rs does not \
             declare: fix the name in docs/MONITORING.md, or declare the metric in metrics.rs \
             (and list it in metrics::ALL)",
            undeclared.join(", ")
        );
    }

    #[test]
    fn the_checks_see_what_they_should() {
        let declared: BTreeSet<&str> = ALL.iter().copied().collect();
        // Built from the constants: a made-up name in this file would count
        // as declared for tests that scan it (crates/daemon/tests/monitoring.rs).
        let text = format!(
            "`{QUEUE_DEPTH}`, {INGEST_REQUESTS}{{outcome}} and {STORE_SECONDS}_bucket; the \
             `{PREFIX}` prefix, {{__name__=~\"{PREFIX}.*\"}}, x{QUEUE_DEPTH}",
            PREFIX = "convstore_"
        );
        let found: BTreeSet<&str> = mentioned_in(&text)
            .into_iter()
            .map(|name| family(name, &declared))
            .collect();
        let expected: BTreeSet<&str> = [QUEUE_DEPTH, INGEST_REQUESTS, STORE_SECONDS].into();
        assert_eq!(found, expected);
        assert!(declared_in(SOURCE).contains(QUEUE_DEPTH));
        assert!(!declared_in(SOURCE).contains("convstore_batch_"));
    }
}
