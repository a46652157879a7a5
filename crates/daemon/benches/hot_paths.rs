//! The daemon's per-conversation hot paths, without I/O:
//!
//! - `ingest`: what a `POST /v1/conversations` handler does between reading
//!   the body and answering: parse + validate + push onto the bounded queue,
//!   beside the floor of parsing the same bytes into a `serde_json::Value`;
//! - `copy_encode`: binary COPY encoding of a batch's chunk rows, as
//!   `store::write` sends them (768-dimension vectors);
//! - `cache`: L1 embedding cache lookups (hits, misses) and inserts;
//! - `chunker`: splitting conversations into embeddable chunks.
//!
//! Data: the shared sample when it is there (`CONVSTORE_SAMPLE` or
//! `../shared/data/conversations-sample.jsonl`), else the generator. The
//! "typical" conversation is the one of median JSON size; "largest" is the
//! largest.
//!
//! `cargo bench --bench hot_paths` (≈40 s); `cargo test --benches` runs each
//! once as a smoke test.
//!
//! Times are the benchmark thread's **CPU time** (`CLOCK_THREAD_CPUTIME_ID`),
//! not wall time: on a machine shared with other work (the 2-core build
//! machine usually is), wall time mostly measures how often the thread was
//! preempted. `BENCH_CLOCK=wall` switches to wall time.
// Test code: a panic on what the test set up itself is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use convstore::queue::BoundedQueue;
use convstore_core::batch_body::split_items;
use convstore_core::chunker::Chunker;
use convstore_core::model::{Chunk, Conversation, content_hash};
use convstore_core::validate::{Limits, parse_batch_item, parse_conversation};
use convstore_embed::cache::{CacheKey, EmbeddingCache};
use convstore_store::copy::CopyEncoder;
use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use serde_json::Value;
use uuid::Uuid;

const LIMITS: Limits = Limits::DEFAULT;
/// nomic-embed-text's dimension and context (the default model).
const DIMS: usize = 768;
const CONTEXT: usize = 2048;
/// The default `batch.max_size`.
const BATCH: usize = 64;

/// The benchmark thread's CPU time (or wall time with `BENCH_CLOCK=wall`).
struct Clock {
    wall: bool,
}

impl Clock {
    fn from_env() -> Self {
        Self {
            wall: std::env::var("BENCH_CLOCK").is_ok_and(|v| v == "wall"),
        }
    }

    /// Time since an arbitrary origin, on this clock.
    fn now(&self) -> Duration {
        if self.wall {
            static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
            return ORIGIN.get_or_init(Instant::now).elapsed();
        }
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec for the call's duration.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }
}

impl Measurement for Clock {
    type Intermediate = Duration;
    type Value = Duration;

    fn start(&self) -> Duration {
        self.now()
    }

    fn end(&self, started: Duration) -> Duration {
        self.now().saturating_sub(started)
    }

    fn add(&self, a: &Duration, b: &Duration) -> Duration {
        *a + *b
    }

    fn zero(&self) -> Duration {
        Duration::ZERO
    }

    fn to_f64(&self, value: &Duration) -> f64 {
        value.as_nanos() as f64
    }

    fn formatter(&self) -> &dyn ValueFormatter {
        // Both clocks count nanoseconds: format like wall time.
        WallTime.formatter()
    }
}

struct Data {
    /// Every conversation, as API JSON bodies.
    bodies: Vec<Vec<u8>>,
    conversations: Vec<Conversation>,
    typical: usize,
    largest: usize,
}

fn data() -> Data {
    let values: Vec<Value> =
        convstore_dataset::sample_or_generated(4000).expect("the sample or generated data");
    let bodies: Vec<Vec<u8>> = values
        .iter()
        .map(|v| serde_json::to_vec(v).expect("serialise"))
        .collect();
    let conversations: Vec<Conversation> = bodies
        .iter()
        .map(|body| parse_conversation(body, LIMITS).expect("the data passes validation"))
        .collect();
    let mut by_size: Vec<usize> = (0..bodies.len()).collect();
    by_size.sort_by_key(|&i| bodies[i].len());
    Data {
        typical: by_size[by_size.len() / 2],
        largest: by_size[by_size.len() - 1],
        bodies,
        conversations,
    }
}

/// A deterministic unit vector (what an embedder would return).
fn vector(seed: u64) -> Arc<[f32]> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v: Vec<f32> = (0..DIMS)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect();
    let norm = v.iter().map(|a| a * a).sum::<f32>().sqrt();
    v.iter_mut().for_each(|a| *a /= norm);
    Arc::from(v)
}

fn ingest(c: &mut Criterion<Clock>, d: &Data) {
    let mut group = c.benchmark_group("ingest");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    // The default queue bounds; drained outside the timed section so it
    // never fills and dropping conversations is not measured.
    let queue = BoundedQueue::<Conversation>::new(10_000, 256 << 20);
    for (name, index) in [("typical", d.typical), ("largest", d.largest)] {
        let body = &d.bodies[index];
        group.throughput(Throughput::Bytes(body.len() as u64));
        // The floor: parsing the same bytes into an untyped JSON value,
        // with no validation and no queue.
        group.bench_function(BenchmarkId::new("json_value_floor", name), |b| {
            b.iter(|| serde_json::from_slice::<Value>(black_box(body)).expect("valid JSON"))
        });
        group.bench_function(BenchmarkId::new("parse_validate", name), |b| {
            b.iter(|| parse_conversation(black_box(body), LIMITS).expect("valid"))
        });
        group.bench_function(BenchmarkId::new("parse_validate_enqueue", name), |b| {
            let clock = Clock::from_env();
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                let mut done = 0;
                while done < iters {
                    let n = (iters - done).min(1000);
                    let started = clock.now();
                    for _ in 0..n {
                        let conversation =
                            parse_conversation(black_box(body), LIMITS).expect("valid");
                        let bytes = conversation.approx_bytes();
                        if queue.try_push(conversation, bytes).is_err() {
                            panic!("the drained queue refused a conversation");
                        }
                    }
                    timed += clock.now().saturating_sub(started);
                    let n_usize = usize::try_from(n).expect("at most 1000");
                    let drained = runtime.block_on(queue.pop_batch(n_usize, Duration::ZERO));
                    drop(black_box(drained));
                    done += n;
                }
                timed
            })
        });
    }
    group.finish();
}

/// The default `server.max_batch_items` is 1,000; `convstore enqueue`
/// sends 500 per request.
const BATCH_ITEMS: usize = 500;

/// What a `POST /v1/conversations/batch` handler does with the body
/// before admitting anything: split it into items, then parse and validate
/// each (a JSON array of the data's first 500 conversations).
fn batch_ingest(c: &mut Criterion<Clock>, d: &Data) {
    let mut body = b"[".to_vec();
    for (i, one) in d.bodies.iter().take(BATCH_ITEMS).enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(one);
    }
    body.push(b']');
    let mut group = c.benchmark_group("ingest_batch");
    group.throughput(Throughput::Elements(BATCH_ITEMS as u64));
    group.bench_function(BenchmarkId::new("split_parse_validate", BATCH_ITEMS), |b| {
        b.iter(|| {
            let items = split_items(black_box(&body), false, 1000).expect("a valid array");
            for item in items {
                black_box(parse_batch_item(item, LIMITS).expect("valid"));
            }
        })
    });
    group.finish();
}

/// The chunk rows of one batch, as `store::write` encodes them: nine
/// fields (conversation_id, seq, content, content_hash, model, embedding,
/// embedding_status, error, embedded_at).
fn encode_rows(rows: &[(Uuid, Chunk, Arc<[f32]>)]) -> Vec<u8> {
    let now = Utc::now();
    let mut enc = CopyEncoder::with_capacity((1 << 20) + 64 * 1024);
    let mut sent = 0usize;
    for (id, chunk, v) in rows {
        enc.begin_row(9).expect("row");
        enc.uuid(id);
        enc.int4(chunk.seq);
        enc.text(&chunk.content).expect("text");
        enc.bytea(&chunk.content_hash).expect("hash");
        enc.text("nomic-embed-text").expect("model");
        enc.vector(v).expect("vector");
        enc.text("embedded").expect("status");
        enc.null();
        enc.timestamptz(now).expect("time");
        // store::write flushes at 1 MiB; the bytes go to the socket there.
        if enc.len() >= 1 << 20 {
            sent += black_box(enc.take()).len();
        }
    }
    let tail = enc.finish().expect("finish");
    black_box(sent);
    tail
}

fn copy_encode(c: &mut Criterion<Clock>, d: &Data) {
    let chunker = Chunker::new(CONTEXT, 0);
    let rows: Vec<(Uuid, Chunk, Arc<[f32]>)> = d
        .conversations
        .iter()
        .take(BATCH)
        .flat_map(|conv| {
            chunker
                .chunk(conv)
                .into_iter()
                .map(|chunk| (conv.id, chunk, vector(conv.id.as_u128() as u64)))
        })
        .collect();
    let mut group = c.benchmark_group("copy_encode");
    group.throughput(Throughput::Elements(rows.len() as u64));
    group.bench_function(BenchmarkId::new("batch_rows", rows.len()), |b| {
        b.iter(|| encode_rows(black_box(&rows)))
    });
    group.finish();
}

fn cache(c: &mut Criterion<Clock>, d: &Data) {
    let model: Arc<str> = Arc::from("nomic-embed-text");
    let chunker = Chunker::new(CONTEXT, 0);
    let keys: Vec<CacheKey> = d
        .conversations
        .iter()
        .flat_map(|conv| chunker.chunk(conv))
        .map(|chunk| CacheKey {
            model: model.clone(),
            hash: chunk.content_hash,
        })
        .collect();
    // The default cache.max_entries, filled with the sample's chunks.
    let cache = EmbeddingCache::new(NonZeroUsize::new(50_000).expect("non-zero"));
    cache.insert_many(
        keys.iter()
            .enumerate()
            .map(|(i, k)| (k.clone(), vector(i as u64))),
    );
    let batch: Vec<CacheKey> = keys.iter().take(BATCH * 2).cloned().collect();
    let misses: Vec<CacheKey> = (0..BATCH * 2)
        .map(|i| CacheKey {
            model: model.clone(),
            hash: content_hash(&format!("never stored {i}")),
        })
        .collect();

    let mut group = c.benchmark_group("cache");
    group.throughput(Throughput::Elements(1));
    group.bench_function("get_hit", |b| {
        b.iter(|| cache.get(black_box(&batch[7])).expect("hit"))
    });
    group.bench_function("get_miss", |b| {
        b.iter(|| assert!(cache.get(black_box(&misses[7])).is_none()))
    });
    group.throughput(Throughput::Elements(batch.len() as u64));
    group.bench_function(BenchmarkId::new("get_many_hits", batch.len()), |b| {
        b.iter(|| cache.get_many(black_box(&batch)))
    });
    let mut fresh = 0u64;
    group.bench_function(BenchmarkId::new("insert_many_evicting", batch.len()), |b| {
        b.iter_batched(
            || {
                (0..batch.len())
                    .map(|_| {
                        fresh += 1;
                        let key = CacheKey {
                            model: model.clone(),
                            hash: content_hash(&format!("fresh {fresh}")),
                        };
                        (key, vector(fresh))
                    })
                    .collect::<Vec<_>>()
            },
            |items| cache.insert_many(items),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn chunker(c: &mut Criterion<Clock>, d: &Data) {
    let mut group = c.benchmark_group("chunker");
    for (model, context) in [("nomic-embed-text", CONTEXT), ("all-minilm", 512)] {
        let chunker = Chunker::new(context, 0);
        for (name, index) in [("typical", d.typical), ("largest", d.largest)] {
            let conv = &d.conversations[index];
            group.throughput(Throughput::Bytes(conv.full_text().len() as u64));
            group.bench_function(BenchmarkId::new(model, name), |b| {
                b.iter(|| chunker.chunk(black_box(conv)))
            });
        }
    }
    group.finish();
}

/// A caller's `traceparent` (W3C trace context, sampled).
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// What traces add to the ack path per conversation: the request's span
/// (continuing its `traceparent`) and the `queue.wait` span, opened and
/// then closed as the batch closes it; around the same parse + validate.
fn traced_admission(body: &[u8]) {
    // What `post_conversation` does with the header (off: `Span::none`).
    let span =
        convstore_telemetry::traces::request_span("conversation.post", Some(TRACEPARENT), None);
    let carried = span.in_scope(|| {
        let conversation = parse_conversation(black_box(body), LIMITS).expect("valid");
        black_box(conversation);
        convstore_telemetry::traces::Carried::enqueued()
    });
    if let Some(mut carried) = carried {
        black_box(carried.dequeued());
    }
}

/// Traces off (the default) and on, on the same admission work: off must
/// cost nothing measurable. Runs last: "on" installs the exporter (to a
/// port nothing listens on; the spans are exported from a thread of its
/// own, which is not this thread's CPU time).
fn traces(c: &mut Criterion<Clock>, d: &Data) {
    let mut group = c.benchmark_group("traces");
    let body = &d.bodies[d.typical];
    group.bench_function("admission_traces_off", |b| {
        b.iter(|| traced_admission(body))
    });
    let log = convstore_telemetry::settings::LogSettings {
        level: "warn".into(),
        ..Default::default()
    };
    let telemetry = convstore_telemetry::traces::TelemetrySettings {
        otlp_endpoint: "http://127.0.0.1:9".into(),
        ..Default::default()
    };
    convstore_telemetry::logging::init_with_traces(&log, &telemetry).expect("traces");
    group.bench_function("admission_traces_on", |b| b.iter(|| traced_admission(body)));
    group.finish();
}

fn hot_paths(c: &mut Criterion<Clock>) {
    let d = data();
    ingest(c, &d);
    batch_ingest(c, &d);
    copy_encode(c, &d);
    cache(c, &d);
    chunker(c, &d);
    traces(c, &d);
}

criterion_group! {
    name = benches;
    // Short windows: the whole file runs in well under a minute, and the
    // paths measured take micro- to milliseconds, so 2 s gives thousands of
    // samples each.
    config = Criterion::default()
        .with_measurement(Clock::from_env())
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50);
    targets = hot_paths
}
criterion_main!(benches);
