//! The enqueue path's allocation budget, counted by the allocator itself:
//! the real `POST /v1/conversations` handler (router, body, parse,
//! validate, stamp, ticket, queue push, metrics, answer) driven in process,
//! as `benches/enqueue_metrics.rs` drives it, under the daemon's recorder.
//!
//! Most of what a request allocates is the conversation itself (its
//! strings, its message list), which the queue then holds. The rest is the
//! budget: [`ALLOCATION_BUDGET`] allocations a request, whatever the
//! conversation's size (but for the doublings of the list serde reads the
//! messages into). A change that adds an allocation to every request (a
//! formatted label, a cloned header map, a boxed value) fails here, with a
//! count that does not depend on the machine's load, instead of hiding in
//! a benchmark's noise.
//!
//! `TRACE_ALLOC=1 cargo test --test allocation_budget -- --nocapture`
//! prints where each allocation of one request comes from.
// Test code: a panic on what the test set up itself is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use axum::body::Body;
use axum::http::{Request, header};
use convstore::http::Transport;
use convstore_telemetry::stats::Stats;
use convstore_telemetry::tap::StatsRecorder;
use serde_json::{Value, json};
use tower::ServiceExt;

#[path = "../benches/support/ingress.rs"]
mod ingress;
use ingress::{InProcess, in_process};

/// The system allocator, counting this thread's allocations (fresh blocks
/// and moves to a larger one) while counting is on.
struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

thread_local! {
    /// Set while a trace is taken (taking one allocates).
    static TRACING: Cell<bool> = const { Cell::new(false) };
    /// Where each counted allocation came from, with `TRACE_ALLOC` set.
    static TRACES: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `TRACE_ALLOC` is set (read once: reading it allocates).
static TRACE: AtomicBool = AtomicBool::new(false);

fn count_one() {
    // `try_with`: the allocator runs while thread locals are torn down too.
    let counting = COUNTING.try_with(Cell::get).unwrap_or(false);
    if !counting {
        return;
    }
    let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
    if TRACE.load(Ordering::Relaxed) && !TRACING.with(Cell::get) {
        TRACING.with(|t| t.set(true));
        let trace = where_from(&std::backtrace::Backtrace::force_capture().to_string());
        TRACES.with(|t| t.borrow_mut().push(trace));
        TRACING.with(|t| t.set(false));
    }
}

/// The first frames of a backtrace above the allocator, on one line.
fn where_from(backtrace: &str) -> String {
    // Frames come as a `N: name` line and an `at file:line` line; the
    // standard library's (under /rustc/) and this test's are skipped.
    let lines: Vec<&str> = backtrace.lines().map(str::trim).collect();
    lines
        .windows(2)
        .filter_map(|pair| {
            let (_, name) = pair[0].split_once(": ")?;
            let at = pair[1].strip_prefix("at ")?;
            let ours = at.contains("/rustc/") || at.contains("allocation_budget.rs");
            (!ours).then(|| format!("{name} ({})", at.rsplit('/').next().unwrap_or(at)))
        })
        .take(3)
        .collect::<Vec<_>>()
        .join(" <- ")
}

// SAFETY: every call is forwarded to `System` unchanged; only counted.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_one();
        // SAFETY: forwarded as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_one();
        // SAFETY: forwarded as is.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as is.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_one();
        // SAFETY: forwarded as is.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Allocations `f` makes on this thread.
fn allocations_of<T>(f: impl FnOnce() -> T) -> (T, u64) {
    ALLOCATIONS.with(|n| n.set(0));
    COUNTING.with(|on| on.set(true));
    let out = f();
    COUNTING.with(|on| on.set(false));
    (out, ALLOCATIONS.with(Cell::get))
}

/// Posts `body`; the status, and the allocations made from the request's
/// arrival at the router to its answer (building the request is the
/// test's, not the daemon's).
fn post(f: &InProcess, body: &bytes::Bytes) -> (u16, u64) {
    let request = Request::post("/v1/conversations")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, body.len())
        .body(Body::from(body.clone()))
        .expect("request");
    let app = f.app.clone();
    let (response, n) = allocations_of(|| f.rt.block_on(app.oneshot(request)));
    (response.expect("infallible").status().as_u16(), n)
}

/// A conversation of `messages` messages, each with a timestamp and an id,
/// and a small metadata object: every field the hot path reads.
fn conversation(id: usize, messages: usize) -> Value {
    json!({
        "id": format!("budget-{id}"),
        "user_id": "u-17",
        "channel": "web",
        "messages": (0..messages).map(|i| json!({
            "role": if i % 2 == 0 { "user" } else { "assistant" },
            "content": format!("Message {i} of the conversation, long enough to be a real turn of a chat."),
            "ts": "2024-05-01T10:00:00Z",
            "message_id": format!("m-{i}"),
        })).collect::<Vec<_>>(),
        "metadata": {"source": "test", "turns": messages},
    })
}

/// The allocations the conversation itself is made of once validated:
/// its message list, and per message the content and message id (a role
/// is a `Role`, no allocation); the client id, user id and channel; the
/// metadata object (one node, two keys, one string value).
fn own_allocations(messages: u64) -> u64 {
    1 + 2 * messages + 3 + 4
}

/// Reallocations of a list read by serde, which starts at 4 entries and
/// doubles: it cannot know the length of a JSON array before reading it.
fn doublings(messages: u64) -> u64 {
    let mut capacity = 4;
    let mut n = 0;
    while capacity < messages {
        capacity *= 2;
        n += 1;
    }
    n
}

/// What an accepted request may allocate beyond the conversation's own,
/// for a conversation of up to 4 messages. Where they go (`TRACE_ALLOC`):
/// - axum's routing: 6 (the route's boxed service and futures, its URL
///   parameters);
/// - the change's own bookkeeping: 3 (the id answered, the in-flight
///   registry's copy of the user id, the conversation's change chain);
/// - serde's list of messages as read, before validation: 1;
/// - the answer: 6 (its JSON, the body, the header map, the length).
const ALLOCATION_BUDGET: u64 = 16;

/// Allocations per accepted request beyond the conversation's own, for
/// conversations of 1, 8 and 64 messages: within the budget, and growing
/// with the size only by the message list's doublings.
#[test]
fn an_accepted_conversation_costs_a_bounded_number_of_allocations() {
    TRACE.store(std::env::var_os("TRACE_ALLOC").is_some(), Ordering::Relaxed);
    let prometheus = convstore_telemetry::recorder::prometheus_recorder();
    let tapped = StatsRecorder::new(prometheus, Arc::new(Stats::new(Instant::now())));
    metrics::with_local_recorder(&tapped, || {
        let f = in_process(Transport::Unix, 100_000, 1 << 32);
        for messages in [1u64, 8, 64] {
            let bodies: Vec<bytes::Bytes> = (0..200)
                .map(|i| {
                    let id = (messages * 1000 + i) as usize;
                    bytes::Bytes::from(
                        serde_json::to_vec(&conversation(id, messages as usize)).unwrap(),
                    )
                })
                .collect();
            // Warm-up: first-use allocations (series registered, buffers
            // grown, the runtime's first task) are not per request.
            for body in &bodies[..100] {
                assert_eq!(post(&f, body).0, 202);
            }
            let mut counts = Vec::with_capacity(100);
            for body in &bodies[100..] {
                TRACES.with(|t| t.borrow_mut().clear());
                let (status, n) = post(&f, body);
                assert_eq!(status, 202);
                counts.push(n);
            }
            // The median request: now and then one also grows a shared
            // structure (the queue's ring, the in-flight registry's table)
            // by doubling, which is amortised, not per request.
            counts.sort_unstable();
            let typical = counts[counts.len() / 2];
            if TRACE.load(Ordering::Relaxed) {
                TRACING.with(|t| t.set(true));
                eprintln!("where the last request's allocations came from ({messages} messages):");
                TRACES.with(|t| t.borrow().iter().for_each(|l| eprintln!("  {l}")));
                TRACING.with(|t| t.set(false));
            }
            let overhead = typical.saturating_sub(own_allocations(messages));
            let allowed = ALLOCATION_BUDGET + doublings(messages);
            eprintln!(
                "{messages} messages: {typical} allocations a request (median), {overhead} beyond the conversation's own (allowed {allowed})"
            );
            assert!(
                overhead <= allowed,
                "an accepted conversation of {messages} messages costs {overhead} allocations beyond its own; the budget allows {allowed} (run with TRACE_ALLOC=1 to see where they come from)"
            );
            // Drained outside the counting.
            f.rt.block_on(f.queue.pop_batch(100_000, std::time::Duration::ZERO));
        }
    });
}
