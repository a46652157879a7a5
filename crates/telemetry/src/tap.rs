//! A recorder layer that copies what the pipeline records into [`Stats`].
//!
//! [`StatsRecorder`] wraps the Prometheus recorder: registration goes to
//! the wrapped recorder as before, and for the names `/v1/stats` needs it
//! returns a handle that forwards every value to the Prometheus handle and
//! also adds it to the matching rolling window. Every other name is passed
//! through untouched. Call sites stay plain `metrics::histogram!(...)`.
//!
//! Cost: the `metrics` macros register on every call. For the label-less
//! histograms on the hot path (enqueue latency, queue wait, store, end to
//! end, batch size) the combined handle is built once and cloned after,
//! which skips the Prometheus registry's lookup. Labelled names (per
//! backend, per tier, per outcome) are recorded per batch or per request
//! and pay one small allocation for their combined handle.

use std::sync::{Arc, OnceLock};

use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};

use super::events::{change, chunk_status, deletion, label as key_of, outcome};
use super::metrics as m;
use super::stats::{BackendStats, Count, Stage, Stats, TierStats};

/// Label-less histograms whose combined handle is cached.
const CACHED: usize = 6;

/// The Prometheus recorder (or any other) with `/v1/stats` tapped in.
pub struct StatsRecorder<R> {
    inner: R,
    stats: Arc<Stats>,
    cached: [OnceLock<Histogram>; CACHED],
}

impl<R> StatsRecorder<R> {
    pub fn new(inner: R, stats: Arc<Stats>) -> Self {
        Self {
            inner,
            stats,
            cached: std::array::from_fn(|_| OnceLock::new()),
        }
    }
}

fn label<'a>(key: &'a Key, name: &str) -> Option<&'a str> {
    key.labels().find(|l| l.key() == name).map(|l| l.value())
}

/// Where a histogram's values go besides Prometheus.
enum HistTap {
    Stage(Stage, Option<Arc<BackendStats>>),
    BatchSize,
    EmbedBatch,
}

struct HistTee {
    inner: Histogram,
    stats: Arc<Stats>,
    tap: HistTap,
}

impl HistogramFn for HistTee {
    #[inline]
    fn record(&self, value: f64) {
        self.inner.record(value);
        match &self.tap {
            HistTap::Stage(stage, backend) => {
                self.stats.record_stage(*stage, value);
                if let Some(b) = backend {
                    b.latency.record(self.stats.slots.current(), value);
                }
            }
            HistTap::BatchSize => self
                .stats
                .batch_size
                .record(self.stats.slots.current(), value),
            HistTap::EmbedBatch => self
                .stats
                .embed_batch
                .record(self.stats.slots.current(), value),
        }
    }
}

enum CounterTap {
    Count(Count),
    /// Rejected, and also counted as refused because the queue was full.
    QueueFull,
    Embed {
        ok: bool,
        backend: Option<Arc<BackendStats>>,
    },
    CacheHits(Arc<TierStats>),
    CacheMisses(Arc<TierStats>),
}

struct CounterTee {
    inner: Counter,
    stats: Arc<Stats>,
    tap: CounterTap,
}

impl CounterFn for CounterTee {
    #[inline]
    fn increment(&self, value: u64) {
        self.inner.increment(value);
        if value == 0 {
            return;
        }
        let slot = self.stats.slots.current();
        match &self.tap {
            CounterTap::Count(c) => self.stats.count(*c, value),
            CounterTap::QueueFull => {
                self.stats.count(Count::Rejected, value);
                self.stats.count(Count::RejectedQueueFull, value);
            }
            CounterTap::Embed { ok, backend } => {
                let c = if *ok {
                    Count::EmbedRequestsOk
                } else {
                    Count::EmbedRequestsFailed
                };
                self.stats.count(c, value);
                if let Some(b) = backend {
                    let counter = if *ok { &b.ok } else { &b.failed };
                    counter.add(slot, value);
                }
            }
            CounterTap::CacheHits(t) => t.hits.add(slot, value),
            CounterTap::CacheMisses(t) => t.misses.add(slot, value),
        }
    }

    fn absolute(&self, value: u64) {
        // Only set at start-up (zeroed series); nothing to window.
        self.inner.absolute(value);
    }
}

enum GaugeTap {
    BackendUp(Arc<BackendStats>),
    /// Another `convstore_backend_*` gauge, by its name without prefix.
    Backend(Arc<BackendStats>, String),
    /// `convstore_builtin_engine`: its labels name the engine.
    BuiltinEngine(Arc<BackendStats>, String),
    CacheEntries,
}

struct GaugeTee {
    inner: Gauge,
    stats: Arc<Stats>,
    tap: GaugeTap,
}

impl GaugeFn for GaugeTee {
    fn increment(&self, value: f64) {
        self.inner.increment(value);
        if let GaugeTap::Backend(b, name) = &self.tap {
            b.gauge_add(name, value);
        }
    }

    fn decrement(&self, value: f64) {
        self.inner.decrement(value);
        if let GaugeTap::Backend(b, name) = &self.tap {
            b.gauge_add(name, -value);
        }
    }

    fn set(&self, value: f64) {
        self.inner.set(value);
        match &self.tap {
            GaugeTap::BackendUp(b) => b.set_up(value),
            GaugeTap::Backend(b, name) => b.gauge_set(name, value),
            GaugeTap::BuiltinEngine(b, engine) if value > 0.0 => b.set_engine(engine.clone()),
            GaugeTap::BuiltinEngine(..) => {}
            GaugeTap::CacheEntries => self.stats.set_cache_entries(value),
        }
    }
}

impl<R: Recorder> StatsRecorder<R> {
    fn backend_of(&self, key: &Key) -> Option<Arc<BackendStats>> {
        label(key, key_of::BACKEND).map(|b| self.stats.backend(b))
    }

    fn histogram_tap(&self, key: &Key) -> Option<(HistTap, Option<usize>)> {
        Some(match key.name() {
            m::ENQUEUE_SECONDS => (HistTap::Stage(Stage::Enqueue, None), Some(0)),
            m::QUEUE_WAIT_SECONDS => (HistTap::Stage(Stage::QueueWait, None), Some(1)),
            m::STORE_SECONDS => (HistTap::Stage(Stage::Store, None), Some(2)),
            m::END_TO_END_SECONDS => (HistTap::Stage(Stage::EndToEnd, None), Some(3)),
            m::BATCH_CONVERSATIONS => (HistTap::BatchSize, Some(4)),
            m::EMBED_BATCH_SECONDS => (HistTap::EmbedBatch, Some(5)),
            m::EMBED_SECONDS => (HistTap::Stage(Stage::Embed, self.backend_of(key)), None),
            _ => return None,
        })
    }

    fn counter_tap(&self, key: &Key) -> Option<CounterTap> {
        Some(match key.name() {
            m::INGEST_CONVERSATIONS => match label(key, key_of::OUTCOME) {
                Some(outcome::ACCEPTED) => CounterTap::Count(Count::Accepted),
                Some(outcome::QUEUE_FULL) => CounterTap::QueueFull,
                _ => CounterTap::Count(Count::Rejected),
            },
            m::CONVERSATIONS_STORED => CounterTap::Count(Count::Stored),
            m::CONVERSATIONS_DUPLICATE => CounterTap::Count(Count::Duplicates),
            m::CONVERSATIONS_FAILED => CounterTap::Count(Count::Failed),
            m::CHUNKS_STORED => match label(key, key_of::STATUS) {
                Some(chunk_status::EMBEDDED) => CounterTap::Count(Count::ChunksEmbedded),
                Some(chunk_status::PENDING) => CounterTap::Count(Count::ChunksPending),
                Some(chunk_status::FAILED) => CounterTap::Count(Count::ChunksFailed),
                _ => return None,
            },
            m::EMBED_REQUESTS => CounterTap::Embed {
                ok: label(key, key_of::OUTCOME) == Some(outcome::OK),
                backend: self.backend_of(key),
            },
            m::EMBED_INPUTS if label(key, key_of::OUTCOME) == Some(outcome::OK) => {
                CounterTap::Count(Count::EmbedInputs)
            }
            m::CACHE_HITS => CounterTap::CacheHits(self.stats.tier(label(key, key_of::TIER)?)),
            m::CACHE_MISSES => CounterTap::CacheMisses(self.stats.tier(label(key, key_of::TIER)?)),
            m::STORE_RETRIES => CounterTap::Count(Count::StoreRetries),
            m::CONVERSATION_CHANGES => match label(key, key_of::OUTCOME) {
                Some(change::REPLACED) => CounterTap::Count(Count::Replaced),
                Some(change::APPENDED) => CounterTap::Count(Count::Appended),
                Some(change::DISCARDED) => CounterTap::Count(Count::Discarded),
                _ => return None,
            },
            m::MESSAGES_APPENDED => CounterTap::Count(Count::MessagesAppended),
            m::CONVERSATIONS_DELETED => match label(key, key_of::REASON) {
                Some(deletion::API) => CounterTap::Count(Count::DeletedApi),
                Some(deletion::ERASE) => CounterTap::Count(Count::DeletedErase),
                Some(deletion::RETENTION) => CounterTap::Count(Count::DeletedRetention),
                _ => return None,
            },
            _ => return None,
        })
    }

    fn gauge_tap(&self, key: &Key) -> Option<GaugeTap> {
        let name = key.name();
        if name == m::CACHE_ENTRIES {
            return Some(GaugeTap::CacheEntries);
        }
        if name == m::BUILTIN_ENGINE {
            let engine = label(key, key_of::ENGINE)?;
            let precision = label(key, key_of::PRECISION)?;
            return Some(GaugeTap::BuiltinEngine(
                self.backend_of(key)?,
                format!("{engine}/{precision}"),
            ));
        }
        let rest = name.strip_prefix("convstore_backend_")?;
        let backend = self.backend_of(key)?;
        Some(if name == m::BACKEND_UP {
            GaugeTap::BackendUp(backend)
        } else {
            GaugeTap::Backend(backend, rest.to_string())
        })
    }
}

impl<R: Recorder> Recorder for StatsRecorder<R> {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_counter(key, unit, description);
    }

    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_gauge(key, unit, description);
    }

    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_histogram(key, unit, description);
    }

    fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> Counter {
        let inner = self.inner.register_counter(key, metadata);
        match self.counter_tap(key) {
            Some(tap) => Counter::from_arc(Arc::new(CounterTee {
                inner,
                stats: self.stats.clone(),
                tap,
            })),
            None => inner,
        }
    }

    fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> Gauge {
        let inner = self.inner.register_gauge(key, metadata);
        match self.gauge_tap(key) {
            Some(tap) => Gauge::from_arc(Arc::new(GaugeTee {
                inner,
                stats: self.stats.clone(),
                tap,
            })),
            None => inner,
        }
    }

    fn register_histogram(&self, key: &Key, metadata: &Metadata<'_>) -> Histogram {
        let Some((tap, cache_slot)) = self.histogram_tap(key) else {
            return self.inner.register_histogram(key, metadata);
        };
        let build = || {
            Histogram::from_arc(Arc::new(HistTee {
                inner: self.inner.register_histogram(key, metadata),
                stats: self.stats.clone(),
                tap,
            }))
        };
        match cache_slot {
            // A label-less key always names the same series.
            Some(slot) if key.labels().len() == 0 => self.cached[slot].get_or_init(build).clone(),
            _ => build(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    use super::*;
    use crate::stats::{Deleted, LiveQueue};

    #[test]
    fn values_reach_both_the_inner_recorder_and_the_stats() {
        let debug = DebuggingRecorder::new();
        let snapshotter = debug.snapshotter();
        let stats = Arc::new(Stats::new(Instant::now()));
        let recorder = StatsRecorder::new(debug, stats.clone());
        metrics::with_local_recorder(&recorder, || {
            // The same name twice: the cached combined handle is reused.
            for _ in 0..3 {
                metrics::histogram!(m::ENQUEUE_SECONDS).record(0.000_02);
            }
            metrics::histogram!(m::EMBED_SECONDS, "backend" => "a").record(0.25);
            metrics::counter!(m::INGEST_CONVERSATIONS, "transport" => "tcp", "outcome" => "accepted")
                .increment(5);
            metrics::counter!(m::INGEST_CONVERSATIONS, "transport" => "unix", "outcome" => "queue_full")
                .increment(2);
            metrics::counter!(m::EMBED_REQUESTS, "backend" => "a", "outcome" => "timeout")
                .increment(1);
            metrics::counter!(m::CACHE_HITS, "tier" => "l1").increment(7);
            metrics::counter!(m::CACHE_MISSES, "tier" => "l1").increment(3);
            metrics::gauge!(m::BACKEND_UP, "backend" => "a").set(0.0);
            metrics::gauge!(m::BACKEND_IN_FLIGHT, "backend" => "a").increment(2.0);
            metrics::gauge!(m::BUILTIN_ENGINE, "backend" => "a", "engine" => "openvino", "precision" => "bf16")
                .set(1.0);
            metrics::counter!("convstore_something_else_total").increment(1);
        });
        let snap = stats.snapshot(LiveQueue::default());
        assert_eq!(snap.latency.enqueue.count, 3);
        assert_eq!(snap.latency.embed.count, 1);
        assert_eq!(snap.totals.accepted, 5);
        assert_eq!(snap.totals.rejected, 2);
        assert_eq!(snap.totals.embed_errors, 1);
        assert_eq!(snap.cache.hit_ratio, Some(0.7));
        let a = &snap.backends[0];
        assert_eq!((a.name.as_str(), a.up, a.requests), ("a", Some(false), 1));
        assert_eq!(a.gauges.get("in_flight"), Some(&2.0));
        assert_eq!(a.engine.as_deref(), Some("openvino/bf16"));

        // The inner recorder saw every value, tapped or not.
        let seen = snapshotter.snapshot().into_vec();
        let find = |name: &str| {
            seen.iter()
                .filter(|(k, ..)| k.key().name() == name)
                .map(|(_, _, _, v)| v)
                .collect::<Vec<_>>()
        };
        match &find(m::ENQUEUE_SECONDS)[..] {
            [DebugValue::Histogram(values)] => assert_eq!(values.len(), 3),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            find("convstore_something_else_total"),
            vec![&DebugValue::Counter(1)]
        );
        assert_eq!(find(m::INGEST_CONVERSATIONS).len(), 2);
    }

    /// Every typed event `/v1/stats` reads lands in the snapshot: the
    /// events and the tap agree on names, label keys and label values.
    #[test]
    fn every_typed_event_reaches_the_snapshot() {
        use crate::events::{self, Tier, outcome};
        let stats = Arc::new(Stats::new(Instant::now()));
        let recorder = StatsRecorder::new(DebuggingRecorder::new(), stats.clone());
        metrics::with_local_recorder(&recorder, || {
            events::ingest("tcp", outcome::ACCEPTED, 5);
            events::ingest("tcp", outcome::REJECTED, 1);
            events::ingest("unix", outcome::QUEUE_FULL, 2);
            events::chunks_stored(4, 2, 1);
            events::cache_lookups(Tier::L1, 6, 2);
            events::cache_lookups(Tier::L2, 1, 1);
            events::embed_request("a", outcome::OK, 3, 0.01);
            events::embed_request("a", "timeout", 3, 0.5);
            events::conversations_deleted(events::deletion::API, 2);
            events::conversations_deleted(events::deletion::ERASE, 3);
            events::conversations_deleted(events::deletion::RETENTION, 4);
        });
        let snap = stats.snapshot(LiveQueue::default());
        assert_eq!(snap.totals.accepted, 5);
        assert_eq!(snap.totals.rejected, 3);
        assert_eq!(snap.totals.chunks_embedded, 4);
        assert_eq!(snap.totals.chunks_pending, 2);
        assert_eq!(snap.totals.chunks_failed, 1);
        assert_eq!(snap.totals.embed_errors, 1);
        assert_eq!(snap.latency.embed.count, 2);
        assert_eq!(
            snap.deleted,
            Deleted {
                api: 2,
                erase: 3,
                retention: 4
            }
        );
        let tiers: Vec<(&str, u64, u64)> = snap
            .cache
            .tiers
            .iter()
            .map(|t| (t.tier.as_str(), t.hits, t.misses))
            .collect();
        assert_eq!(tiers, [("l1", 6, 2), ("l2", 1, 1)]);
        // 8 lookups; 1 missed the last tier too.
        assert_eq!(snap.cache.hit_ratio, Some(0.875));
        let a = &snap.backends[0];
        assert_eq!((a.name.as_str(), a.requests), ("a", 2));
    }
}
