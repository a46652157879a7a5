//! The floor under convstore's acknowledgement latency: a bare axum server
//! that reads the request body, pushes it onto a bounded channel and
//! answers 202, on TCP and on a Unix socket. Nothing else: no parsing, no
//! validation, no journal, no metrics, no database behind it.
//!
//! `scripts/bench.sh` runs `convstore bench` against it at the same loads
//! as against the daemon (docs/PERFORMANCE.md); what the transport, hyper,
//! axum and the Tokio runtime cost on the machine is then the part of the
//! daemon's latency no work on convstore can remove.
//!
//! ```text
//! cargo run --release --example ack_floor -- 127.0.0.1:0 /tmp/floor.sock
//! ```
//!
//! Prints `listening on HOST:PORT` once both listeners are bound; runs until
//! SIGTERM or Ctrl-C. Like the daemon it uses the multi-threaded runtime
//! with one worker per core, answers a full channel (the daemon's default
//! queue capacity, 10,000) with 429, and refuses bodies over 4 MiB.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::mpsc;

/// The daemon's default `queue.capacity`.
const CAPACITY: usize = 10_000;
/// The daemon's default `server.max_body_bytes`.
const MAX_BODY_BYTES: usize = 4 << 20;

#[derive(Clone)]
struct Floor {
    bodies: mpsc::Sender<Bytes>,
    /// Ids for the answers, so they are as long as the daemon's.
    next_id: Arc<AtomicU64>,
}

async fn accept(State(floor): State<Floor>, body: Bytes) -> Response {
    match floor.bodies.try_send(body) {
        Ok(()) => {
            let n = floor.next_id.fetch_add(1, Ordering::Relaxed);
            // A UUID's length, as the daemon answers with one.
            let answer =
                format!(r#"{{"id":"00000000-0000-7000-8000-{n:012x}","status":"queued"}}"#);
            (
                StatusCode::ACCEPTED,
                [(header::CONTENT_TYPE, "application/json")],
                answer,
            )
                .into_response()
        }
        Err(_) => (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, "1")],
            "queue full",
        )
            .into_response(),
    }
}

async fn run(http_addr: &str, socket: &str) -> std::io::Result<()> {
    let (bodies, mut drain) = mpsc::channel::<Bytes>(CAPACITY);
    // The consumer drops what it takes: the floor measures the handoff.
    tokio::spawn(async move { while drain.recv().await.is_some() {} });
    let app = Router::new()
        .route("/v1/conversations", post(accept))
        // `convstore bench` checks what it talks to answers /healthz.
        .route("/healthz", get(|| async { "ok" }))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(Floor {
            bodies,
            next_id: Arc::new(AtomicU64::new(0)),
        });
    let tcp = TcpListener::bind(http_addr).await?;
    let local = tcp.local_addr()?;
    let _ = std::fs::remove_file(socket);
    let unix = UnixListener::bind(socket)?;
    println!("listening on {local}");
    let stop = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        Ok::<_, std::io::Error>(())
    };
    tokio::select! {
        r = axum::serve(tcp, app.clone()) => r?,
        r = axum::serve(unix, app) => r?,
        r = stop => r?,
    }
    let _ = std::fs::remove_file(socket);
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [http_addr, socket] = args.as_slice() else {
        eprintln!("usage: ack_floor HOST:PORT SOCKET_PATH");
        return ExitCode::from(2);
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ack_floor: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(http_addr, socket)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ack_floor: {e}");
            ExitCode::FAILURE
        }
    }
}
