//! The daemon's HTTP API in this process, without a socket or a database:
//! what the enqueue path's benchmark (`enqueue_metrics`) and its
//! allocation budget (`tests/allocation_budget.rs`) drive. Include it with
//! `#[path = "support/ingress.rs"] mod ingress;`.
#![allow(dead_code)]

use std::sync::Arc;

use convstore::config::Settings;
use convstore::http::{IngressState, Transport};
use convstore::queue::BoundedQueue;
use convstore::ticket::Queued;
use convstore_store::Store;

/// The router of one transport over a fresh ingress state, its queue, and
/// a one-thread runtime to drive requests on.
pub struct InProcess {
    pub rt: tokio::runtime::Runtime,
    pub app: axum::Router,
    pub queue: Arc<BoundedQueue<Queued>>,
}

/// Default settings and a queue of `capacity` conversations (and
/// `max_bytes`). Build it under the recorder the requests should record
/// into: the state resolves its metric handles when it is built, as the
/// daemon's does after installing its recorder.
pub fn in_process(transport: Transport, capacity: usize, max_bytes: usize) -> InProcess {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let queue = Arc::new(BoundedQueue::new(capacity, max_bytes));
    // Never connected: the enqueue path does not touch the database.
    let pool = rt.block_on(async {
        sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://nobody@localhost/none")
            .expect("lazy pool")
    });
    let handle = convstore_telemetry::recorder::prometheus_recorder().handle();
    let state = Arc::new(IngressState::new(
        &Settings::default(),
        queue.clone(),
        Arc::new(Store::from_pool(pool)),
        handle,
    ));
    InProcess {
        rt,
        app: convstore::http::router(state, transport),
        queue,
    }
}
