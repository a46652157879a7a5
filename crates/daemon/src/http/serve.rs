//! Serving one listener: accepting connections under a limit, and closing
//! the ones that hold a slot without using it.
//!
//! `axum::serve` holds every connection for as long as the client likes: a
//! client that never finishes its headers (slowloris) or keeps an idle
//! connection open costs a file descriptor and a task forever, and 12,000
//! of them exhausted the unit's 1024 descriptors, which then failed
//! database reconnects and journal rotation (issue 15). Here:
//!
//! - **Header timeout** (`server.header_timeout_ms`): hyper closes a
//!   connection whose request head is not complete in time.
//! - **Idle timeout** (`server.idle_timeout_ms`): a connection with no
//!   request in progress for that long is closed, whether it never sent a
//!   byte, sits between keep-alive requests, or dribbles a head. (hyper's
//!   header timer does not cover the wait between keep-alive requests in
//!   every version, so this watchdog does not rely on it.)
//! - **Connection limit** (`server.max_connections`, per listener): at the
//!   limit, a new connection first takes the place of the connection that
//!   has been unused the longest, as nginx reuses keep-alive connections;
//!   only when every connection is serving a request is the new one shed
//!   with a `503 too_many_connections` and `Retry-After`.
//!
//! The request body's own deadline and memory budget are enforced where it
//! is read ([`super::body`]).
//!
//! **Lingering close.** A request refused before its body is read whole
//! (413 over `server.max_body_bytes`, 503 `bodies_full`, 408, and a
//! connection shed at the limit) leaves the client still sending. Closing
//! a socket with unread input makes the kernel answer with a reset, and a
//! client that writes its whole body before reading (Python's
//! `http.client`, so `requests`) then fails with `BrokenPipeError` and
//! never sees the answer that names the problem. So after the last answer
//! the connection is shut for writing and what the client still sends is
//! read and discarded until it closes, within [`LINGER_TIME`],
//! [`LINGER_READ_TIMEOUT`] and [`LINGER_MAX_BYTES`] (nginx's
//! `lingering_close`); a shed connection within its
//! [`SHED_WRITE_TIMEOUT`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

use convstore_telemetry::events::label;
use convstore_telemetry::metrics as m;

/// How long a connection may hold its slot, and how many slots there are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections served at once on one listener.
    pub max_connections: usize,
    /// From accepting a connection (or, for the next request on it, from
    /// its first byte) to a complete request head.
    pub header_timeout: Duration,
    /// Without a request in progress.
    pub idle_timeout: Duration,
}

/// `reason` label values of connections closed by hyper's header timeout
/// and refused at the limit (the others are [`Unused`]).
const HEADER_TIMEOUT: &str = "header_timeout";
const SHED: &str = "shed";

/// At most this many refusals are being written at once; past it a shed
/// connection is closed without an answer (a flood must not turn the
/// refusals themselves into the held resource).
const MAX_SHEDDING: usize = 256;
/// A refusal that cannot be written in this time is dropped.
const SHED_WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// A connection told to close (idle, evicted) that has not closed in this
/// time is dropped: hyper finishes a request in progress first, but a
/// half-sent head is not a request.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// After the last answer, the longest a connection is kept open to take in
/// what its client is still sending (the rest of a refused body).
const LINGER_TIME: Duration = Duration::from_secs(2);
/// A lingering client that sends nothing for this long is closed on.
const LINGER_READ_TIMEOUT: Duration = Duration::from_millis(500);
/// At most this much is read and discarded after the last answer.
const LINGER_MAX_BYTES: usize = 64 << 20;

/// Serves `app` on `listener` until `stop` is cancelled, then lets the
/// requests in progress finish.
pub async fn serve<L>(
    mut listener: L,
    app: Router,
    limits: ConnectionLimits,
    transport: &'static str,
    stop: CancellationToken,
) -> std::io::Result<()>
where
    L: axum::serve::Listener,
{
    let registry = Arc::new(Registry::default());
    let shedding = Arc::new(AtomicUsize::new(0));
    let open = metrics::gauge!(m::HTTP_CONNECTIONS, label::TRANSPORT => transport);
    // Every reason exists from the start, so rate() and alerts see a 0.
    for reason in [
        Unused::Idle.as_str(),
        Unused::Evicted.as_str(),
        HEADER_TIMEOUT,
        SHED,
    ] {
        metrics::counter!(m::HTTP_CONNECTIONS_CLOSED, label::TRANSPORT => transport, label::REASON => reason)
            .increment(0);
    }
    let mut connections = JoinSet::new();
    loop {
        let (io, _peer) = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        if registry.len() >= limits.max_connections && !registry.evict_longest_unused() {
            closed(transport, SHED);
            shed(io, limits.max_connections, &shedding);
            continue;
        }
        let activity = registry.add();
        open.increment(1.0);
        let connection = serve_connection(
            io,
            app.clone(),
            activity.clone(),
            limits,
            transport,
            stop.clone(),
        );
        let registry = registry.clone();
        let open = open.clone();
        connections.spawn(async move {
            connection.await;
            registry.remove(activity.id);
            open.decrement(1.0);
        });
    }
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// One connection, until the client closes it, it breaks a timeout, it is
/// evicted, or the listener stops.
async fn serve_connection<I>(
    io: I,
    app: Router,
    activity: Arc<Activity>,
    limits: ConnectionLimits,
    transport: &'static str,
    stop: CancellationToken,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let tracked = activity.clone();
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let in_progress = tracked.begin();
        let app = app.clone();
        async move {
            let response = app.oneshot(request.map(Body::new)).await;
            drop(in_progress);
            response
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let mut connection = builder.serve_connection(TokioIo::new(io), service);
    let mut closing: Option<Instant> = None;
    loop {
        let grace = closing.map_or_else(far_future, |since| since + CLOSE_GRACE);
        tokio::select! {
            served = &mut connection => {
                match served {
                    Ok(()) => {
                        // hyper has written the last answer and shut the
                        // connection for writing; the socket is ours again.
                        let io = connection.into_parts().io.into_inner();
                        tokio::select! {
                            () = linger(io) => {}
                            // Also the deadline: LINGER_TIME after the last
                            // answer, or at once when that was long ago.
                            _ = activity.unused_for(LINGER_TIME) => {}
                        }
                    }
                    Err(e) => {
                        if e.is_timeout() {
                            closed(transport, HEADER_TIMEOUT);
                        }
                        tracing::debug!(error = %e, transport, "HTTP connection ended with an error");
                    }
                }
                return;
            }
            () = stop.cancelled(), if closing.is_none() => {
                std::pin::Pin::new(&mut connection).graceful_shutdown();
                closing = Some(Instant::now());
            }
            why = activity.unused_for(limits.idle_timeout), if closing.is_none() => {
                closed(transport, why.as_str());
                std::pin::Pin::new(&mut connection).graceful_shutdown();
                closing = Some(Instant::now());
            }
            () = tokio::time::sleep_until(grace), if closing.is_some() => {
                if !activity.is_serving() {
                    return;
                }
                // A request is still being answered: give it its time (the
                // listener's own shutdown deadline bounds a stop).
                closing = Some(Instant::now());
            }
        }
    }
}

/// Reads and discards what the client still sends, until it closes, pauses
/// for [`LINGER_READ_TIMEOUT`], fails, or [`LINGER_MAX_BYTES`] were read;
/// then the socket is closed with nothing unread, so with no reset.
async fn linger<I>(mut io: I)
where
    I: tokio::io::AsyncRead + Unpin,
{
    // On the heap: every connection's task would otherwise carry it.
    let mut discard = vec![0u8; 4096];
    let mut drained = 0usize;
    while drained < LINGER_MAX_BYTES {
        match tokio::time::timeout(LINGER_READ_TIMEOUT, io.read(&mut discard)).await {
            Ok(Ok(n)) if n > 0 => drained += n,
            // Closed by the client, broken, or silent.
            _ => break,
        }
    }
    if drained > 0 {
        tracing::debug!(
            drained,
            "Read what the client still sent after the last answer"
        );
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
}

fn closed(transport: &'static str, reason: &'static str) {
    metrics::counter!(m::HTTP_CONNECTIONS_CLOSED, label::TRANSPORT => transport, label::REASON => reason)
        .increment(1);
}

/// Answers a connection over the limit with a 503 and closes it, in the
/// background and within [`SHED_WRITE_TIMEOUT`]; lingering in that time,
/// since the client's request is left unread.
fn shed<I>(mut io: I, max_connections: usize, shedding: &Arc<AtomicUsize>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    if shedding.fetch_add(1, Ordering::Relaxed) >= MAX_SHEDDING {
        shedding.fetch_sub(1, Ordering::Relaxed);
        return;
    }
    let shedding = shedding.clone();
    tokio::spawn(async move {
        let answer = refusal(max_connections);
        let _ = tokio::time::timeout(SHED_WRITE_TIMEOUT, async {
            io.write_all(answer.as_bytes()).await?;
            io.shutdown().await?;
            linger(io).await;
            std::io::Result::Ok(())
        })
        .await;
        shedding.fetch_sub(1, Ordering::Relaxed);
    });
}

/// The whole HTTP/1.1 answer to a connection over the limit, in the API's
/// error format.
fn refusal(max_connections: usize) -> String {
    let body = serde_json::json!({"error": {
        "code": "too_many_connections",
        "message": format!(
            "this listener is serving server.max_connections ({max_connections}) connections, each with a request in progress; retry after the Retry-After seconds"
        ),
    }})
    .to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// Why a connection was closed for not being used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unused {
    /// `server.idle_timeout_ms` passed without a request.
    Idle,
    /// Its slot went to a new connection at the limit.
    Evicted,
}

impl Unused {
    fn as_str(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Evicted => "evicted",
        }
    }
}

/// What the accept loop and the idle watchdog know of one connection.
struct Activity {
    id: u64,
    /// Requests being answered (more than one only with pipelining).
    serving: AtomicUsize,
    /// Milliseconds since the registry's epoch when the connection last
    /// finished a request (or was accepted).
    last_used_ms: AtomicU64,
    evicted: AtomicBool,
    changed: Notify,
    epoch: Instant,
}

/// Ends a request's part in [`Activity`] when dropped.
struct InProgress(Arc<Activity>);

impl Drop for InProgress {
    fn drop(&mut self) {
        self.0.touch();
        self.0.serving.fetch_sub(1, Ordering::AcqRel);
        self.0.changed.notify_one();
    }
}

impl Activity {
    fn begin(self: &Arc<Self>) -> InProgress {
        self.serving.fetch_add(1, Ordering::AcqRel);
        self.changed.notify_one();
        InProgress(self.clone())
    }

    fn is_serving(&self) -> bool {
        self.serving.load(Ordering::Acquire) > 0
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn touch(&self) {
        self.last_used_ms.store(self.now_ms(), Ordering::Release);
    }

    fn evict(&self) {
        self.evicted.store(true, Ordering::Release);
        self.changed.notify_one();
    }

    /// Resolves once the connection has served no request for `idle`, or
    /// when it is evicted. Woken by [`Activity::changed`], never polled.
    async fn unused_for(&self, idle: Duration) -> Unused {
        loop {
            if self.evicted.load(Ordering::Acquire) {
                return Unused::Evicted;
            }
            if self.is_serving() {
                self.changed.notified().await;
                continue;
            }
            let last = self.last_used_ms.load(Ordering::Acquire);
            let idle_ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
            let left =
                Duration::from_millis(last.saturating_add(idle_ms).saturating_sub(self.now_ms()));
            tokio::select! {
                () = self.changed.notified() => {}
                () = tokio::time::sleep(left) => {
                    if !self.is_serving() && self.last_used_ms.load(Ordering::Acquire) == last {
                        return Unused::Idle;
                    }
                }
            }
        }
    }
}

/// The connections of one listener.
#[derive(Default)]
struct Registry {
    connections: Mutex<HashMap<u64, Arc<Activity>>>,
    next_id: AtomicU64,
    epoch: std::sync::OnceLock<Instant>,
}

impl Registry {
    fn epoch(&self) -> Instant {
        *self.epoch.get_or_init(Instant::now)
    }

    fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Activity>>> {
        // The map holds no invariant a panicking holder could break.
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn add(&self) -> Arc<Activity> {
        let epoch = self.epoch();
        let activity = Arc::new(Activity {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            serving: AtomicUsize::new(0),
            last_used_ms: AtomicU64::new(0),
            evicted: AtomicBool::new(false),
            changed: Notify::new(),
            epoch,
        });
        activity.touch();
        self.lock().insert(activity.id, activity.clone());
        activity
    }

    fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// Tells the connection unused the longest (no request in progress, not
    /// already told) to close; false when every connection is serving.
    /// A scan of at most `max_connections` entries, done only at the limit.
    fn evict_longest_unused(&self) -> bool {
        let map = self.lock();
        let victim = map
            .values()
            .filter(|a| !a.is_serving() && !a.evicted.load(Ordering::Acquire))
            .min_by_key(|a| a.last_used_ms.load(Ordering::Acquire));
        match victim {
            Some(victim) => {
                victim.evict();
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_is_a_complete_http_answer_in_the_api_error_format() {
        let answer = refusal(4096);
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "));
        assert!(head.contains("\r\nretry-after: 1"));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "too_many_connections");
        assert!(v["error"]["message"].as_str().unwrap().contains("4096"));
    }

    #[test]
    fn eviction_takes_the_longest_unused_connection_and_never_one_serving() {
        let registry = Registry::default();
        let a = registry.add();
        let b = registry.add();
        let c = registry.add();
        a.last_used_ms.store(50, Ordering::Release);
        b.last_used_ms.store(10, Ordering::Release);
        c.last_used_ms.store(0, Ordering::Release);
        let serving = c.begin();
        c.last_used_ms.store(0, Ordering::Release);

        assert!(registry.evict_longest_unused());
        assert!(b.evicted.load(Ordering::Acquire));
        assert!(registry.evict_longest_unused());
        assert!(a.evicted.load(Ordering::Acquire));
        // Only `c` is left, and it is answering a request.
        assert!(!registry.evict_longest_unused());
        assert!(!c.evicted.load(Ordering::Acquire));
        drop(serving);
        assert!(registry.evict_longest_unused());
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_unused_after_the_idle_timeout_without_a_request() {
        let registry = Registry::default();
        let a = registry.add();
        let idle = Duration::from_secs(5);
        let serving = a.begin();
        // While a request is in progress, no timeout runs.
        let waited = tokio::time::timeout(Duration::from_secs(60), a.unused_for(idle)).await;
        assert!(waited.is_err());
        drop(serving);
        let started = Instant::now();
        assert_eq!(a.unused_for(idle).await, Unused::Idle);
        assert!(started.elapsed() >= Duration::from_secs(4));
        a.evict();
        assert_eq!(a.unused_for(idle).await, Unused::Evicted);
    }
}
