//! Every metric name convstore exports, in one place, with its buckets.
//!
//! Conventions (Prometheus): `convstore_` prefix, `_total` for counters,
//! base units in the name (`_seconds`, `_bytes`), label values from small
//! fixed sets (transport, outcome, backend name from config, tier, table).
//! Hot paths record once per batch where the number is the same for every
//! item.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const INGEST_REQUESTS: &str = "convstore_ingest_requests_total";
pub const INGEST_CONVERSATIONS: &str = "convstore_ingest_conversations_total";
pub const ENQUEUE_SECONDS: &str = "convstore_enqueue_duration_seconds";
pub const QUEUE_DEPTH: &str = "convstore_queue_depth";
pub const QUEUE_CAPACITY: &str = "convstore_queue_capacity";
pub const QUEUE_BYTES: &str = "convstore_queue_bytes";
pub const QUEUE_MAX_BYTES: &str = "convstore_queue_max_bytes";
pub const QUEUE_WAIT_SECONDS: &str = "convstore_queue_wait_seconds";
pub const BATCH_CONVERSATIONS: &str = "convstore_batch_conversations";
pub const BATCH_CHUNKS: &str = "convstore_batch_chunks";
pub const EMBED_REQUESTS: &str = "convstore_embed_requests_total";
pub const EMBED_INPUTS: &str = "convstore_embed_inputs_total";
pub const EMBED_SECONDS: &str = "convstore_embed_duration_seconds";
pub const BACKEND_UP: &str = "convstore_backend_up";
pub const CACHE_HITS: &str = "convstore_cache_hits_total";
pub const CACHE_MISSES: &str = "convstore_cache_misses_total";
pub const CACHE_ENTRIES: &str = "convstore_cache_entries";
pub const STORE_SECONDS: &str = "convstore_store_duration_seconds";
pub const STORE_ROWS: &str = "convstore_store_rows_total";
pub const STORE_RETRIES: &str = "convstore_store_retries_total";
pub const CONVERSATIONS_STORED: &str = "convstore_conversations_stored_total";
pub const CONVERSATIONS_DUPLICATE: &str = "convstore_conversations_duplicate_total";
pub const CONVERSATIONS_FAILED: &str = "convstore_conversations_failed_total";
pub const CHUNKS_STORED: &str = "convstore_chunks_stored_total";
pub const END_TO_END_SECONDS: &str = "convstore_end_to_end_seconds";
pub const READY: &str = "convstore_ready";

/// Microseconds to tens of milliseconds: enqueue is meant to take µs.
const ENQUEUE_BUCKETS: &[f64] = &[
    0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.005, 0.01, 0.05,
];
/// Milliseconds to a minute: embedding, storage, queue wait, end to end.
const STAGE_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Counts per batch.
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the global Prometheus recorder once and returns its handle;
/// later calls return the same handle.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(ENQUEUE_SECONDS.into()), ENQUEUE_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Suffix("_seconds".into()), STAGE_BUCKETS)
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Prefix("convstore_batch_".into()),
                        BATCH_BUCKETS,
                    )
                });
            let recorder = match builder {
                Ok(b) => b.build_recorder(),
                // Only fails for empty bucket lists, which the constants are not.
                Err(_) => PrometheusBuilder::new().build_recorder(),
            };
            let handle = recorder.handle();
            // Fails only if another recorder is installed (a test harness):
            // then this handle renders nothing, which tests notice.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            handle
        })
        .clone()
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
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
    describe_gauge!(
        BACKEND_UP,
        "1 when the backend's last call or probe succeeded."
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
    describe_histogram!(
        END_TO_END_SECONDS,
        Unit::Seconds,
        "Time from acceptance to commit in PostgreSQL."
    );
    describe_gauge!(READY, "1 when /readyz answers 200.");
}
