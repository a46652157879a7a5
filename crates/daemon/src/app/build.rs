//! Building the daemon: everything but the listeners, in start-up order.
//! When [`App::build`] returns, the schema is migrated, the embedding
//! backends were probed (and warmed where they answered), the pipeline
//! runs, and whatever an earlier run journaled and did not store is back on
//! the queue: the daemon is ready to take conversations.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use convstore_embed::Embedder as _;
use convstore_embed::cache::EmbeddingCache;
use convstore_embed::router::Router;
use convstore_store::Store;
use convstore_store::models::ModelId;
use convstore_store::retention::RetentionPolicy;
use convstore_telemetry::metrics as m;

use super::embedders::{build_embedder, probe_at_start};
use crate::config::Settings;
use crate::http::IngressState;
use crate::http::search::SearchService;
use crate::pipeline::batcher::BatchLimits;
use crate::pipeline::{DrainDeadline, Pipeline, PipelineContext};
use crate::queue::BoundedQueue;
use crate::systemd::supervisor::Supervisor;
use crate::ticket::Queued;

/// The running daemon before it serves: built by [`App::build`], served by
/// [`App::run`](super::App::run), which also stops it.
pub struct App {
    pub(super) settings: Settings,
    pub(super) store: Arc<Store>,
    pub(super) embedder: Arc<Router>,
    pub(super) ctx: Arc<PipelineContext>,
    pub(super) queue: Arc<BoundedQueue<Queued>>,
    pub(super) pipeline: Pipeline,
    pub(super) ingress: Arc<IngressState>,
    pub(super) batch_limits: Arc<BatchLimits>,
    /// Health checks, backfill, telemetry, queue gauges: stopped by
    /// `stop_background` after the drain.
    pub(super) background: JoinSet<()>,
    pub(super) stop_background: CancellationToken,
    /// Stopped when shutdown begins: the drain gets the backends and the
    /// database to itself (the backfill, the retention reaper).
    pub(super) stop_backfill: CancellationToken,
    /// The retention reaper's policy; a reload sends it a new one.
    pub(super) retention: watch::Sender<RetentionPolicy>,
    /// Whether a backend answered the warm-up.
    pub(super) warm: bool,
}

impl App {
    /// Connects to the database at `database_url` and builds every stage.
    /// `supervisor` hears each step (systemd's status line).
    pub async fn build(
        settings: &Settings,
        database_url: &str,
        metrics: PrometheusHandle,
        supervisor: &Supervisor,
    ) -> anyhow::Result<App> {
        supervisor.starting("connecting to PostgreSQL, applying migrations");
        let store = Arc::new(
            Store::connect_with(database_url, &settings.database)
                .await
                .context("cannot connect to PostgreSQL (database.url)")?,
        );
        store.migrate().await.context("cannot apply migrations")?;
        let configured_model = ModelId::new(
            settings.embedding.model.clone(),
            settings.embedding.dimensions.get(),
        );
        let keep_previous = settings.search.keep_previous()?;
        let models = store
            .prepare_vectors(&configured_model, keep_previous)
            .await
            .context("cannot prepare the vector column and HNSW index")?;
        if models.migrating() && !settings.backfill.enabled {
            tracing::warn!(
                "backfill.enabled is false: nothing re-embeds the chunks for the new model, and \
                 search keeps reading the previous model's vectors until it is turned on"
            );
        }
        store
            .ensure_text_index(&settings.search.text_search_language()?)
            .await
            .context("cannot prepare the full-text index of lexical search (search.language)")?;

        let context_tokens = Arc::new(AtomicUsize::new(
            settings.chunking.fallback_context_tokens.get(),
        ));
        let (embedder, search_embedder) = build_embedder(settings)?;
        let embedder = Arc::new(embedder.with_context_sink(context_tokens.clone()));
        let mut background = JoinSet::new();
        let stop_background = CancellationToken::new();
        supervisor.starting(&format!(
            "probing and warming up {} embedding backend(s)",
            embedder.backend_count()
        ));
        let warm = probe_at_start(
            settings,
            embedder.clone(),
            &mut background,
            stop_background.clone(),
        )
        .await?;

        // The shared intake replaces the journal: the stream is durable,
        // and every instance's workers pull from it.
        let shared = if settings.nats.enabled() {
            supervisor.starting("connecting to the shared intake (NATS JetStream)");
            let intake = settings
                .nats
                .resolve()
                .map_err(|e| anyhow::anyhow!("invalid value for `{}`: {}", e.key, e.reason))?;
            let instance = uuid::Uuid::new_v4();
            let shared = convstore_nats::SharedIntake::connect(intake, instance)
                .await
                .context("cannot start the shared intake (nats.url)")?;
            if settings.journal.enabled {
                tracing::info!(
                    "nats.url is set: the JetStream stream is the journal; the local journal is not used"
                );
            }
            tracing::info!(
                stream = %settings.nats.stream,
                consumer = %settings.nats.consumer,
                %instance,
                "Shared intake: publishing to and pulling from JetStream"
            );
            Some(Arc::new(shared))
        } else {
            None
        };
        // Before the pipeline: a journal that cannot be opened stops
        // start-up before anything is accepted.
        let journal = if shared.is_some() {
            None
        } else {
            crate::journal_startup::open_from_settings(settings)?
        };
        let queue = Arc::new(BoundedQueue::<Queued>::new(
            settings.queue.capacity.get(),
            settings.queue.max_bytes.get(),
        ));
        metrics::gauge!(m::QUEUE_CAPACITY).set(queue.capacity() as f64);
        metrics::gauge!(m::QUEUE_MAX_BYTES).set(queue.max_bytes() as f64);
        let ctx = Arc::new(PipelineContext {
            embedder: embedder.clone(),
            cache: Arc::new(EmbeddingCache::new(settings.cache.max_entries)),
            shared_cache: settings.cache.shared,
            store: store.clone(),
            model: Arc::from(embedder.model()),
            dimensions: settings.embedding.dimensions.get(),
            context_tokens,
            max_chunk_tokens: settings.chunking.max_tokens,
            max_batch_inputs: settings.embedding.max_batch_inputs.get(),
            retry_initial: Duration::from_millis(settings.embedding.retry_initial_ms.get()),
            retry_max: Duration::from_millis(settings.embedding.retry_max_ms.get()),
            drain: Arc::new(DrainDeadline::default()),
            in_flight: Arc::new(AtomicUsize::new(0)),
            batches_done: Arc::new(AtomicU64::new(0)),
            conversations_done: Arc::new(AtomicU64::new(0)),
            calls_done: Arc::new(AtomicU64::new(0)),
        });
        let batch_limits = Arc::new(BatchLimits::new(
            settings.batch.max_size.get(),
            Duration::from_millis(settings.batch.max_wait_ms.get()),
        ));
        let pipeline = Pipeline::start(
            ctx.clone(),
            queue.clone(),
            settings.pipeline.workers.get(),
            batch_limits.clone(),
        );
        background.spawn(super::run::sample_queue(
            queue.clone(),
            stop_background.clone(),
        ));
        if settings.queue.max_backlog_seconds > 0 {
            let done = ctx.conversations_done.clone();
            let in_flight = ctx.in_flight.clone();
            // Two full batches per worker: the pipeline never waits for
            // intake because of the limit.
            let floor = settings
                .batch
                .max_size
                .get()
                .saturating_mul(settings.pipeline.workers.get())
                .saturating_mul(2);
            let admission = crate::admission::AdmissionSettings {
                max_backlog: Duration::from_secs(u64::from(settings.queue.max_backlog_seconds)),
                floor,
                busy_at: settings.batch.max_size.get(),
            };
            let mut saved = crate::admission::saved::SavedRate::new(
                &settings.state_dir,
                &settings.embedding.model,
            );
            let rate = crate::admission::resume(&queue, &mut saved, admission);
            background.spawn(crate::admission::run(
                queue.clone(),
                move || done.load(Ordering::Relaxed),
                move || in_flight.load(Ordering::Relaxed),
                admission,
                rate,
                saved,
                stop_background.clone(),
            ));
        }
        background.spawn(super::trim::return_freed_memory(stop_background.clone()));
        let stop_backfill = stop_background.child_token();
        if settings.backfill.enabled {
            background.spawn(crate::pipeline::backfill::run(
                ctx.clone(),
                embedder.clone(),
                crate::pipeline::backfill::BackfillConfig::from_settings(&settings.backfill),
                stop_backfill.clone(),
            ));
        }
        // Always started, even when everything is kept: a reload may turn
        // retention on, and an idle reaper touches nothing.
        let policy = settings
            .retention
            .policy()
            .map_err(|e| anyhow::anyhow!("invalid value for `{}`: {}", e.key, e.reason))?;
        let (retention, retention_policy) = watch::channel(policy);
        background.spawn(crate::retention_task::run(
            store.clone(),
            retention_policy,
            stop_backfill.clone(),
        ));
        let probe = convstore_telemetry::stats::PipelineProbe {
            in_flight: ctx.in_flight.clone(),
            workers: settings.pipeline.workers.get(),
        };
        convstore_telemetry::stats::global().attach_pipeline(probe.clone());
        background.spawn(crate::telemetry_task::run(
            convstore_telemetry::stats::global().clone(),
            metrics.clone(),
            Some(store.clone()),
            Some(probe),
            stop_background.clone(),
        ));

        // Searches may go to a streaming replica; everything else (a read
        // after a `stored` acknowledgement included) stays on the primary.
        let search_store = if settings.database.read_url.is_empty() {
            (*store).clone()
        } else {
            let replica = Store::connect_with(&settings.database.read_url, &settings.database)
                .await
                .context("cannot connect to the read replica (database.read_url)")?;
            tracing::info!("Searches go to the read replica (database.read_url)");
            replica
        };
        let previous_lane = match models.previous.as_ref().filter(|_| models.migrating()) {
            Some(previous) => {
                let lane = super::embedders::build_previous_lane(settings, &previous.id)?;
                if lane.is_none() {
                    tracing::warn!(
                        previous = %previous.id,
                        "No HTTP backend is configured to embed queries with the previous model: \
                         until the new model covers every chunk, semantic search reads its vectors, \
                         which cover only the chunks re-embedded so far"
                    );
                }
                lane.map(|router| {
                    convstore_embed::query::QueryEmbedder::new(
                        Arc::new(router),
                        ctx.cache.clone(),
                        &previous.id.model,
                        previous.id.dimensions,
                    )
                })
            }
            None => None,
        };
        let (model_state, model_watch) = watch::channel(models);
        background.spawn(crate::model_task::run(
            crate::model_task::ModelTask {
                store: store.clone(),
                configured: configured_model,
                keep: keep_previous,
                state: model_state,
            },
            stop_background.clone(),
        ));
        let search = SearchService::new(
            convstore_embed::query::QueryEmbedder::new(
                Arc::new(search_embedder),
                ctx.cache.clone(),
                &ctx.model,
                ctx.dimensions,
            ),
            convstore_store::search::Searcher::new(
                search_store,
                settings.search.exact_threshold.get(),
            )
            .with_language(settings.search.text_search_language()?)
            .with_lexical_max_matches(settings.search.lexical_max_matches.get()),
            &settings.search,
        )
        .with_models(model_watch, previous_lane);
        let ingress = Arc::new(
            IngressState::new(settings, queue.clone(), store.clone(), metrics)
                .with_journal(journal.as_ref().map(|(j, _)| j.clone()))
                .with_router(embedder.clone())
                .with_search(Arc::new(search))
                .with_cache(ctx.cache.clone())
                .with_shared_intake(shared.clone()),
        );
        if let Some(shared) = &shared {
            background.spawn(crate::pipeline::shared::run(
                shared.clone(),
                queue.clone(),
                ingress.in_flight.clone(),
                store.clone(),
                batch_limits.clone(),
                stop_backfill.clone(),
            ));
            background.spawn(crate::pipeline::shared::sample(
                shared.clone(),
                store.clone(),
                stop_background.clone(),
            ));
        }
        // What an earlier run journaled and did not store goes back on the
        // queue before anything new is accepted.
        if let Some((journal, recovery)) = journal {
            supervisor.starting("replaying the journal");
            crate::journal_startup::replay_at_start(
                &journal,
                recovery,
                &store,
                &queue,
                &ingress.in_flight,
            )
            .await?;
        }
        Ok(App {
            settings: settings.clone(),
            store,
            embedder,
            ctx,
            queue,
            pipeline,
            ingress,
            batch_limits,
            background,
            stop_background,
            stop_backfill,
            retention,
            warm,
        })
    }
}
