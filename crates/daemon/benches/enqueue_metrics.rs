//! What metrics cost on the enqueue path: the real `POST /v1/conversations`
//! handler (axum router, body read, parse, validate, queue push, metrics),
//! driven in process without a socket, under three recorders:
//!
//! - `none`: no recorder (the `metrics` macros do nothing);
//! - `prometheus`: the Prometheus recorder with convstore's buckets;
//! - `prometheus+stats`: what the daemon runs, the Prometheus recorder with
//!   the `/v1/stats` tap in front ([`convstore_telemetry::tap`]).
//!
//! Plus the metric calls of one accepted request on their own
//! (`record_only`): two labelled counters and the enqueue histogram, by
//! the macros (a registry look-up each) and through the handles the
//! handler resolves once (`convstore::http::hot_metrics`).
//!
//! The body is the shared sample's conversation of median JSON size (the
//! generator's when the sample is absent). Only the request is timed; the
//! queue is emptied between samples, outside the timing.
//!
//! `cargo bench --bench enqueue_metrics` (≈1 min); `cargo test --benches`
//! runs each once as a smoke test.
// Test code: a panic on what the test set up itself is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, header};
use convstore::http::Transport;
use convstore::http::hot_metrics::HotMetrics;
use convstore_telemetry::events::label;
use convstore_telemetry::metrics as m;
use convstore_telemetry::stats::Stats;
use convstore_telemetry::tap::StatsRecorder;
use criterion::{Criterion, criterion_group, criterion_main};
use metrics::Recorder;
use tower::ServiceExt;

#[path = "support/ingress.rs"]
mod ingress;
use ingress::{InProcess, in_process};

/// The conversation of median JSON size.
fn typical_body() -> bytes::Bytes {
    let values = convstore_dataset::sample_or_generated(4000).expect("data");
    let mut bodies: Vec<Vec<u8>> = values
        .iter()
        .map(|v| serde_json::to_vec(v).expect("serialise"))
        .collect();
    bodies.sort_by_key(Vec::len);
    bytes::Bytes::from(bodies.swap_remove(bodies.len() / 2))
}

struct Fixture {
    daemon: InProcess,
    body: bytes::Bytes,
}

fn fixture() -> Fixture {
    Fixture {
        daemon: in_process(Transport::Tcp, 1 << 20, 1 << 34),
        body: typical_body(),
    }
}

/// `iters` requests; returns the time spent in them only.
fn post_many(f: &Fixture, iters: u64) -> Duration {
    let mut spent = Duration::ZERO;
    for _ in 0..iters {
        let request = Request::post("/v1/conversations")
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::CONTENT_LENGTH, f.body.len())
            .body(Body::from(f.body.clone()))
            .expect("request");
        let app = f.daemon.app.clone();
        let started = Instant::now();
        let response = f
            .daemon
            .rt
            .block_on(app.oneshot(request))
            .expect("infallible");
        spent += started.elapsed();
        assert_eq!(response.status(), 202);
        if f.daemon.queue.len() > 50_000 {
            f.daemon.rt.block_on(async {
                while !f.daemon.queue.is_empty() {
                    black_box(f.daemon.queue.pop_batch(4096, Duration::ZERO).await);
                }
            });
        }
    }
    spent
}

fn enqueue(c: &mut Criterion) {
    let mut group = c.benchmark_group("enqueue_handler");
    group.measurement_time(Duration::from_secs(8));
    let f = fixture();
    group.bench_function("none", |b| b.iter_custom(|iters| post_many(&f, iters)));
    // Each fixture is built under its recorder, as the daemon builds its
    // state after installing one: the handles the handler resolved at
    // construction (`http::hot_metrics`) record into it.
    let prometheus = convstore_telemetry::recorder::prometheus_recorder();
    let f = metrics::with_local_recorder(&prometheus, fixture);
    group.bench_function("prometheus", |b| {
        b.iter_custom(|iters| metrics::with_local_recorder(&prometheus, || post_many(&f, iters)))
    });
    let tapped = StatsRecorder::new(
        convstore_telemetry::recorder::prometheus_recorder(),
        Arc::new(Stats::new(Instant::now())),
    );
    let f = metrics::with_local_recorder(&tapped, fixture);
    group.bench_function("prometheus+stats", |b| {
        b.iter_custom(|iters| metrics::with_local_recorder(&tapped, || post_many(&f, iters)))
    });
    group.finish();
}

/// The metric calls of one accepted single-conversation request.
fn record_request() {
    metrics::counter!(m::INGEST_REQUESTS, label::TRANSPORT => "tcp", label::ENDPOINT => "conversations", label::OUTCOME => "accepted")
        .increment(1);
    metrics::counter!(m::INGEST_CONVERSATIONS, label::TRANSPORT => "tcp", label::OUTCOME => "accepted")
        .increment(1);
    metrics::histogram!(m::ENQUEUE_SECONDS).record(black_box(0.000_021));
}

/// The same records through the handles the handler resolves once
/// (`convstore::http::hot_metrics`).
fn record_resolved(hot: &HotMetrics) {
    let accepted = hot.accepted_on(Transport::Tcp);
    accepted.conversation_requests.increment(1);
    accepted.conversations.increment(1);
    hot.enqueue_seconds.record(black_box(0.000_021));
}

fn record_only(c: &mut Criterion) {
    let mut group = c.benchmark_group("record_only");
    group.bench_function("none", |b| b.iter(record_request));
    let prometheus = convstore_telemetry::recorder::prometheus_recorder();
    let tapped = StatsRecorder::new(
        convstore_telemetry::recorder::prometheus_recorder(),
        Arc::new(Stats::new(Instant::now())),
    );
    for (name, recorder) in [
        ("prometheus", &prometheus as &dyn Recorder),
        ("prometheus+stats", &tapped as &dyn Recorder),
    ] {
        group.bench_function(format!("{name}/macros"), |b| {
            metrics::with_local_recorder(recorder, || b.iter(record_request))
        });
        let hot = metrics::with_local_recorder(recorder, HotMetrics::resolve);
        group.bench_function(format!("{name}/resolved"), |b| {
            b.iter(|| record_resolved(&hot))
        });
    }
    group.finish();
}

criterion_group!(benches, enqueue, record_only);
criterion_main!(benches);
