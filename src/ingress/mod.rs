//! Ingress: one axum router, served on TCP and on a Unix socket. It
//! validates, enqueues and answers; it never waits for embedding or storage.

pub mod error;
pub mod handlers;
pub mod listen;
pub mod validate;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::config::{Settings, WhenFull};
use crate::model::Conversation;
use crate::queue::BoundedQueue;
use crate::store::Store;

/// Which listener a request came through (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Unix,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Unix => "unix",
        }
    }
}

/// What the handlers share.
pub struct IngressState {
    pub queue: Arc<BoundedQueue<Conversation>>,
    pub store: Arc<Store>,
    pub limits: validate::Limits,
    pub max_body_bytes: usize,
    pub max_batch_items: usize,
    pub when_full: WhenFull,
    pub block_timeout: Duration,
    pub retry_after_secs: u32,
    /// Set when shutdown begins: new conversations get 503.
    pub shutting_down: AtomicBool,
    pub metrics: PrometheusHandle,
}

impl IngressState {
    pub fn new(
        settings: &Settings,
        queue: Arc<BoundedQueue<Conversation>>,
        store: Arc<Store>,
        metrics: PrometheusHandle,
    ) -> Self {
        Self {
            queue,
            store,
            limits: validate::Limits {
                max_messages: settings.server.max_messages.get(),
            },
            max_body_bytes: settings.server.max_body_bytes.get(),
            max_batch_items: settings.server.max_batch_items.get(),
            when_full: settings.queue.when_full,
            block_timeout: Duration::from_millis(settings.queue.block_timeout_ms.get()),
            retry_after_secs: settings.queue.retry_after_secs.get(),
            shutting_down: AtomicBool::new(false),
            metrics,
        }
    }

    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }
}

/// The API, for one transport.
pub fn router(state: Arc<IngressState>, transport: Transport) -> Router {
    Router::new()
        .route("/v1/conversations", post(handlers::post_conversation))
        .route("/v1/conversations/batch", post(handlers::post_batch))
        .route("/v1/conversations/{id}", get(handlers::get_conversation))
        .route("/healthz", get(handlers::healthz))
        .route("/readyz", get(handlers::readyz))
        .route("/metrics", get(handlers::metrics))
        .fallback(handlers::not_found)
        .layer(axum::Extension(transport))
        .with_state(state)
}
