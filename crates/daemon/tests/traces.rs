//! Traces end to end (issue 18): a request's `traceparent` is continued
//! through the queue, the batch, embedding and storage, and the spans
//! reach a real OTLP/HTTP receiver (this test's, decoding the protobuf the
//! daemon sends); the daemon's log lines carry the trace id.
// Test code: a panic on what the test set up itself is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message;
use serde_json::json;
use support::cluster::TestCluster;
use support::daemon::{Daemon, Standin, Workspace};
use support::nats::NatsServer;

const MODEL: &str = "traced-embed";
const DIMS: usize = 16;

/// One exported span, as the receiver decoded it.
#[derive(Debug, Clone)]
struct Received {
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    name: String,
    /// (trace id, span id) of each link.
    links: Vec<(String, String)>,
}

/// An OTLP/HTTP receiver: `POST /v1/traces`, protobuf in and out.
async fn receiver() -> (String, Arc<Mutex<Vec<Received>>>) {
    let spans: Arc<Mutex<Vec<Received>>> = Arc::default();
    let sink = spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        post(move |body: Bytes| {
            let sink = sink.clone();
            async move {
                let request = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                let mut got = sink.lock().unwrap();
                for resource in request.resource_spans {
                    for scope in resource.scope_spans {
                        for span in scope.spans {
                            got.push(Received {
                                trace_id: hex(&span.trace_id),
                                span_id: hex(&span.span_id),
                                parent_span_id: hex(&span.parent_span_id),
                                name: span.name,
                                links: span
                                    .links
                                    .iter()
                                    .map(|l| (hex(&l.trace_id), hex(&l.span_id)))
                                    .collect(),
                            });
                        }
                    }
                }
                (
                    [("content-type", "application/x-protobuf")],
                    ExportTraceServiceResponse::default().encode_to_vec(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), spans)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Posts one conversation with a `traceparent` and checks its trace at the
/// receiver: every span, continued and linked as docs/MONITORING.md says,
/// and the daemon's log lines carrying the trace id.
async fn assert_traced(daemon: &Daemon, spans: &Arc<Mutex<Vec<Received>>>, trace_id: &str) {
    let caller_span = "00f067aa0ba902b7";
    let resp = reqwest::Client::new()
        .post(format!(
            "{}/v1/conversations?wait=stored",
            daemon.base_url()
        ))
        .header("traceparent", format!("00-{trace_id}-{caller_span}-01"))
        .json(
            &json!({"id": format!("traced-{trace_id}"), "user_id": "u", "channel": "web",
                      "messages": [{"role": "user", "content": "Where is my order 4417?"},
                                   {"role": "assistant", "content": "It left the depot today."}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);

    let wanted: BTreeSet<&str> = [
        "conversation.post",
        "queue.wait",
        "batch",
        "chunk",
        "embed",
        "cache.lookup",
        "embed.attempt",
        "embed.request",
        "store.transaction",
        "ack",
    ]
    .into();
    let started = Instant::now();
    let of_trace = loop {
        let of_trace: Vec<Received> = spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect();
        let names: BTreeSet<&str> = of_trace.iter().map(|s| s.name.as_str()).collect();
        if wanted.is_subset(&names) {
            break of_trace;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "spans of {trace_id} so far: {names:?}; log:\n{}",
            daemon.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let named = |name: &str| of_trace.iter().find(|s| s.name == name).unwrap();
    // Continued: the request's span is the caller's span's child.
    assert_eq!(named("conversation.post").parent_span_id, caller_span);
    let post = named("conversation.post").span_id.clone();
    assert_eq!(named("queue.wait").parent_span_id, post);
    // The batch continues the conversation's trace and links to it.
    let batch = named("batch");
    assert!(
        batch.links.contains(&(trace_id.to_string(), post.clone())),
        "{batch:?}"
    );
    for stage in ["chunk", "embed", "store.transaction"] {
        assert_eq!(named(stage).parent_span_id, batch.span_id, "{stage}");
    }
    let ack = named("ack");
    assert_eq!(ack.parent_span_id, post);
    assert!(
        ack.links.iter().any(|(_, span)| *span == batch.span_id),
        "{ack:?}"
    );
    // The log lines written inside the trace say which.
    assert!(
        daemon.log_text().contains(&format!("trace_id={trace_id}")),
        "no log line carries the trace id"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requests_traceparent_is_continued_through_queue_embedding_and_storage() {
    let (endpoint, spans) = receiver().await;
    let standin = Standin::start(MODEL, DIMS, 512, &[]);
    let ws = Workspace::new();
    // A bare endpoint: convstore adds OTLP's /v1/traces.
    let addr = ws.write_config(
        &standin.url(),
        MODEL,
        DIMS,
        &format!("[telemetry]\notlp_endpoint = \"{endpoint}\"\n"),
    );
    let daemon = Daemon::start(&ws, &addr).await;
    assert_traced(&daemon, &spans, "4bf92f3577b34da6a3ce929d0e0e4736").await;
}

/// With the shared intake, the trace crosses the stream (the
/// `traceparent` header of the published change) and goes on in the
/// instance that applies it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trace_crosses_the_shared_intakes_stream() {
    let (endpoint, spans) = receiver().await;
    let pg = TestCluster::start().await;
    let nats = NatsServer::start();
    let standin = Standin::start(MODEL, DIMS, 512, &[]);
    let ws = Workspace::new();
    let addr = ws.write_config(
        &standin.url(),
        MODEL,
        DIMS,
        &format!(
            "[database]\nurl = \"{}\"\n\n[nats]\nurl = \"{}\"\n\n[telemetry]\notlp_endpoint = \"{endpoint}/v1/traces\"\n",
            pg.url(),
            nats.url()
        ),
    );
    let daemon = Daemon::start(&ws, &addr).await;
    assert_traced(&daemon, &spans, "5cf92f3577b34da6a3ce929d0e0e4737").await;
}
