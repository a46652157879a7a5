//! Ingress: one axum router, served on TCP and on a Unix socket. It
//! validates, enqueues and answers; it never waits for embedding or storage.

pub mod admin;
pub mod auth;
pub mod body;
pub mod error;
pub mod handlers;
pub mod hot_metrics;
pub mod intake;
pub mod lifecycle;
pub mod listen;
pub mod openapi;
pub mod search;
pub mod serve;
pub mod stats;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::Router;
use axum::routing::{delete, get, post};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::config::{Settings, WhenFull};
use crate::queue::BoundedQueue;
use crate::ticket::{InFlight, Queued};
use convstore_journal::Journal;
use convstore_store::Store;

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

/// The request limits and queue policy: settings a configuration reload
/// may change while requests are served.
#[derive(Debug, Clone, Copy)]
pub struct IngressLimits {
    pub validation: convstore_core::validate::Limits,
    pub max_body_bytes: usize,
    /// A request body must arrive whole within this.
    pub body_timeout: Duration,
    pub max_batch_items: usize,
    pub when_full: WhenFull,
    pub block_timeout: Duration,
    pub retry_after_secs: u32,
    /// `ack.timeout_ms`: a `?wait=` without `timeout_ms`.
    pub ack_timeout: Duration,
    /// `ack.max_timeout_ms`.
    pub max_ack_timeout: Duration,
}

impl IngressLimits {
    pub fn from_settings(settings: &Settings) -> Self {
        Self {
            validation: convstore_core::validate::Limits {
                max_messages: settings.server.max_messages.get(),
                max_content_bytes: settings.limits.max_content_bytes.get(),
                max_metadata_bytes: settings.limits.max_metadata_bytes.get(),
                max_metadata_depth: settings.limits.max_metadata_depth.get(),
                max_id_bytes: settings.limits.max_id_bytes.get(),
                max_label_bytes: settings.limits.max_label_bytes.get(),
            },
            max_body_bytes: settings.server.max_body_bytes.get(),
            body_timeout: Duration::from_millis(settings.server.body_timeout_ms.get()),
            max_batch_items: settings.server.max_batch_items.get(),
            when_full: settings.queue.when_full,
            block_timeout: Duration::from_millis(settings.queue.block_timeout_ms.get()),
            retry_after_secs: settings.queue.retry_after_secs.get(),
            ack_timeout: Duration::from_millis(settings.ack.timeout_ms.get()),
            max_ack_timeout: Duration::from_millis(settings.ack.max_timeout_ms.get()),
        }
    }
}

/// What the handlers share.
pub struct IngressState {
    pub queue: Arc<BoundedQueue<Queued>>,
    pub store: Arc<Store>,
    /// Accepted and not yet stored: `GET /v1/conversations/{id}` says
    /// `queued` for these.
    pub in_flight: Arc<InFlight>,
    /// One admission at a time per conversation (`intake::admit`).
    pub admission_order: intake::AdmissionOrder,
    /// Request bodies held in memory (`server.max_buffered_body_bytes`).
    pub body_budget: Arc<body::BodyBudget>,
    /// The journal, when `journal.enabled`.
    journal: Option<Journal>,
    /// Bearer tokens, when `[[auth.tokens]]` are configured.
    pub auth: Option<Arc<auth::Auth>>,
    /// Read once per request through [`IngressState::limits`].
    limits: ArcSwap<IngressLimits>,
    /// Set when shutdown begins: new conversations get 503.
    pub shutting_down: AtomicBool,
    pub metrics: PrometheusHandle,
    /// What an accepted request records, resolved once (`hot_metrics`).
    pub hot_metrics: hot_metrics::HotMetrics,
    /// The embedding router: `/readyz` needs one backend ready.
    embedding: Option<Arc<convstore_embed::router::Router>>,
    /// `POST /v1/search` (503 without one).
    search: Option<Arc<search::SearchService>>,
    /// The L1 embedding cache: an erasure evicts the user's texts.
    cache: Option<Arc<convstore_embed::cache::EmbeddingCache>>,
    /// The shared intake, when `nats.url` is set: accepted changes go to
    /// the stream instead of the journal and the local queue.
    shared: Option<Arc<convstore_nats::SharedIntake>>,
}

impl IngressState {
    pub fn new(
        settings: &Settings,
        queue: Arc<BoundedQueue<Queued>>,
        store: Arc<Store>,
        metrics: PrometheusHandle,
    ) -> Self {
        Self {
            queue,
            store,
            in_flight: InFlight::new(),
            admission_order: intake::AdmissionOrder::new(),
            body_budget: body::BodyBudget::new(settings.server.max_buffered_body_bytes.get()),
            journal: None,
            auth: auth::Auth::from_settings(&settings.auth),
            limits: ArcSwap::from_pointee(IngressLimits::from_settings(settings)),
            shutting_down: AtomicBool::new(false),
            metrics,
            hot_metrics: hot_metrics::HotMetrics::resolve(),
            embedding: None,
            search: None,
            cache: None,
            shared: None,
        }
    }

    /// Publishes accepted changes to the shared intake (docs/SCALING.md).
    pub fn with_shared_intake(mut self, shared: Option<Arc<convstore_nats::SharedIntake>>) -> Self {
        self.shared = shared;
        self
    }

    pub fn shared_intake(&self) -> Option<&Arc<convstore_nats::SharedIntake>> {
        self.shared.as_ref()
    }

    /// Journals every accepted conversation before acknowledging it.
    pub fn with_journal(mut self, journal: Option<Journal>) -> Self {
        self.journal = journal;
        self
    }

    pub fn journal(&self) -> Option<&Journal> {
        self.journal.as_ref()
    }

    /// Makes readiness depend on the router's backends (at least one up
    /// with its circuit not open).
    pub fn with_router(mut self, router: Arc<convstore_embed::router::Router>) -> Self {
        self.embedding = Some(router);
        self
    }

    pub fn router(&self) -> Option<&Arc<convstore_embed::router::Router>> {
        self.embedding.as_ref()
    }

    /// Serves `POST /v1/search` with `service`.
    pub fn with_search(mut self, service: Arc<search::SearchService>) -> Self {
        self.search = Some(service);
        self
    }

    pub fn search(&self) -> Option<&Arc<search::SearchService>> {
        self.search.as_ref()
    }

    /// The L1 cache an erasure evicts from.
    pub fn with_cache(mut self, cache: Arc<convstore_embed::cache::EmbeddingCache>) -> Self {
        self.cache = Some(cache);
        self
    }

    pub fn cache(&self) -> Option<&Arc<convstore_embed::cache::EmbeddingCache>> {
        self.cache.as_ref()
    }

    /// The limits in force now.
    pub fn limits(&self) -> IngressLimits {
        **self.limits.load()
    }

    /// Applies reloaded limits; requests already running keep the old ones.
    pub fn set_limits(&self, limits: IngressLimits) {
        self.limits.store(Arc::new(limits));
    }

    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }
}

/// What a router's handlers extract: the ingress state, and which
/// transport the router serves. Carried as the router's state (an `Arc`
/// and a byte, cloned per request) rather than a request extension, which
/// cost every request a boxed value in its extension map.
#[derive(Clone)]
pub struct Routed {
    ingress: Arc<IngressState>,
    transport: Transport,
}

impl axum::extract::FromRef<Routed> for Arc<IngressState> {
    fn from_ref(routed: &Routed) -> Self {
        routed.ingress.clone()
    }
}

impl axum::extract::FromRef<Routed> for Transport {
    fn from_ref(routed: &Routed) -> Self {
        routed.transport
    }
}

/// The API, for one transport.
pub fn router(state: Arc<IngressState>, transport: Transport) -> Router {
    let auth = state.auth.clone();
    let app = Router::new()
        .route("/v1/conversations", post(handlers::post_conversation))
        .route("/v1/conversations/batch", post(handlers::post_batch))
        .route(
            "/v1/conversations/{id}",
            get(handlers::get_conversation).delete(lifecycle::delete_conversation),
        )
        .route(
            "/v1/conversations/{id}/messages",
            post(lifecycle::append_messages),
        )
        .route("/v1/users/{user_id}", delete(lifecycle::erase_user))
        .route("/v1/search", post(search::post_search))
        .route("/v1/admin/redrive", post(admin::redrive))
        .route("/openapi.json", get(openapi::openapi_json))
        .route("/healthz", get(handlers::healthz))
        .route("/readyz", get(handlers::readyz))
        .route("/metrics", get(stats::metrics))
        .route("/v1/stats", get(stats::get_stats))
        .route("/", get(stats::status_page))
        .fallback(handlers::not_found)
        .with_state(Routed {
            ingress: state,
            transport,
        });
    match auth {
        Some(auth) => app.layer(axum::middleware::from_fn(move |request, next| {
            auth::require_token(auth.clone(), transport, request, next)
        })),
        None => app,
    }
}
