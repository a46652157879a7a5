//! The live numbers behind `GET /v1/stats` and `convstore status`.
//!
//! [`Stats`] is fed by [`super::tap::StatsRecorder`], which sits between the
//! `metrics` facade and the Prometheus recorder: every histogram, counter
//! and gauge recorded under a name of [`super::metrics`] also lands here,
//! in one-minute rolling windows ([`super::window`]). The pipeline records
//! each number once, through the facade, and both Prometheus and
//! `/v1/stats` see it.
//!
//! [`Stats::snapshot`] turns the windows into a [`StatsSnapshot`]: rates,
//! percentiles per stage, cache hit ratio, backend health, totals, the
//! bottleneck stage and a health verdict ([`super::health`]).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

pub use convstore_api::stats::*;

use super::health;
use super::process;
use super::window::{SLOT, Slots, Summary, WindowCounter, WindowHistogram};

/// The counters `/v1/stats` keeps (rates over the window and totals).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    Accepted,
    Rejected,
    /// Of `Rejected`: refused with 429 on the single-conversation route.
    RejectedQueueFull,
    Stored,
    Duplicates,
    Failed,
    ChunksEmbedded,
    ChunksPending,
    ChunksFailed,
    EmbedRequestsOk,
    EmbedRequestsFailed,
    EmbedInputs,
    StoreRetries,
    DeletedApi,
    DeletedErase,
    DeletedRetention,
    Replaced,
    Appended,
    MessagesAppended,
    Discarded,
}

const COUNTS: usize = 20;

impl Count {
    fn index(self) -> usize {
        self as usize
    }
}

/// What one embedding backend did, by its configured name.
#[derive(Debug)]
pub struct BackendStats {
    pub(crate) ok: WindowCounter,
    pub(crate) failed: WindowCounter,
    pub(crate) latency: WindowHistogram,
    /// `convstore_backend_up` as f64 bits; NaN until first set.
    up: AtomicU64,
    /// Other `convstore_backend_*` gauges (in flight, circuit state, …),
    /// by name without the prefix.
    gauges: Mutex<BTreeMap<String, f64>>,
    /// `engine/precision` of a builtin backend.
    engine: Mutex<Option<String>>,
}

impl Default for BackendStats {
    fn default() -> Self {
        Self {
            ok: WindowCounter::default(),
            failed: WindowCounter::default(),
            latency: WindowHistogram::seconds(),
            up: AtomicU64::new(f64::NAN.to_bits()),
            gauges: Mutex::new(BTreeMap::new()),
            engine: Mutex::new(None),
        }
    }
}

impl BackendStats {
    pub fn set_up(&self, value: f64) {
        self.up.store(value.to_bits(), Ordering::Relaxed);
    }

    /// Adds `delta` to a gauge (`set` replaces it).
    pub fn gauge_add(&self, name: &str, delta: f64) {
        let mut gauges = self.gauges.lock().unwrap_or_else(|p| p.into_inner());
        *gauges.entry(name.to_string()).or_insert(0.0) += delta;
    }

    pub fn gauge_set(&self, name: &str, value: f64) {
        let mut gauges = self.gauges.lock().unwrap_or_else(|p| p.into_inner());
        gauges.insert(name.to_string(), value);
    }

    /// The engine a builtin backend runs on (`engine/precision`).
    pub fn set_engine(&self, engine: String) {
        *self.engine.lock().unwrap_or_else(|p| p.into_inner()) = Some(engine);
    }

    fn up(&self) -> Option<bool> {
        let v = f64::from_bits(self.up.load(Ordering::Relaxed));
        (!v.is_nan()).then_some(v >= 1.0)
    }

    fn clear(&self, slot: usize) {
        self.ok.clear(slot);
        self.failed.clear(slot);
        self.latency.clear(slot);
    }
}

/// Hits and misses of one cache tier (`l1`, `l2`).
#[derive(Debug, Default)]
pub struct TierStats {
    pub(crate) hits: WindowCounter,
    pub(crate) misses: WindowCounter,
}

/// The pipeline's own counters, attached once the pipeline starts.
#[derive(Debug, Clone)]
pub struct PipelineProbe {
    /// Conversations taken off the queue and not yet stored.
    pub in_flight: Arc<AtomicUsize>,
    pub workers: usize,
}

/// The queue as the caller of [`Stats::snapshot`] sees it now.
#[derive(Debug, Clone, Copy, Default)]
pub struct LiveQueue {
    pub depth: usize,
    pub capacity: usize,
    /// What the queue admits now (`capacity`, or less under
    /// `queue.max_backlog_seconds`).
    pub admission_limit: usize,
    pub bytes: usize,
    pub max_bytes: usize,
    /// False once shutdown began.
    pub accepting: bool,
    /// Whether the journal can write: `None` without a journal, `false`
    /// while it refuses conversations (disk full, or a failed fsync).
    pub journal_writable: Option<bool>,
    /// Since the oldest queued conversation was accepted; `None` when the
    /// queue is empty.
    pub oldest_age_seconds: Option<f64>,
}

#[derive(Debug, Clone, Copy)]
struct PendingSample {
    at: Instant,
    conversations: u64,
    chunks: u64,
    oldest_age_seconds: Option<f64>,
    coverage: Option<f64>,
    failed_chunks: Option<u64>,
}

/// What the database said about embedding, sampled by the daemon.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PendingCounts {
    pub conversations: u64,
    pub chunks: u64,
    /// Since the oldest conversation waiting for a vector was stored.
    pub oldest_age_seconds: Option<f64>,
    /// Embedded chunks / all chunks.
    pub coverage: Option<f64>,
    /// Chunks stored `failed` (dead letters).
    pub failed_chunks: Option<u64>,
}

/// `waiting` conversations in seconds at `stored_per_second`; `Some(0)`
/// when nothing waits, `None` when something waits and nothing is stored.
fn backlog_seconds(waiting: u64, stored_per_second: f64) -> Option<f64> {
    if waiting == 0 {
        Some(0.0)
    } else if stored_per_second > 0.0 {
        Some(waiting as f64 / stored_per_second)
    } else {
        None
    }
}

/// How long pending-embedding samples are kept to tell whether the count
/// grows.
const PENDING_HISTORY: Duration = Duration::from_secs(60);

/// Everything `/v1/stats` reports, fed through the metrics facade.
pub struct Stats {
    started: Instant,
    pub(crate) slots: Slots,
    stages: [WindowHistogram; 5],
    pub(crate) batch_size: WindowHistogram,
    /// A batch's whole embedding stage (cache, backend calls, retries).
    pub(crate) embed_batch: WindowHistogram,
    counts: [WindowCounter; COUNTS],
    tiers: RwLock<BTreeMap<String, Arc<TierStats>>>,
    backends: RwLock<BTreeMap<String, Arc<BackendStats>>>,
    cache_entries: AtomicU64,
    pipeline: OnceLock<PipelineProbe>,
    pending: Mutex<VecDeque<PendingSample>>,
    /// The ticker's last CPU reading (when, CPU seconds), for a CPU share.
    cpu: Mutex<Option<(Instant, f64)>>,
    /// The embedding models' coverage, as last sampled.
    models: Mutex<Vec<ModelView>>,
}

impl std::fmt::Debug for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stats")
            .field("started", &self.started)
            .finish_non_exhaustive()
    }
}

static GLOBAL: OnceLock<Arc<Stats>> = OnceLock::new();

/// The process's stats, fed by the global recorder
/// ([`crate::recorder::install`]).
pub fn global() -> &'static Arc<Stats> {
    GLOBAL.get_or_init(|| Arc::new(Stats::new(Instant::now())))
}

impl Stats {
    pub fn new(now: Instant) -> Self {
        Self {
            started: now,
            slots: Slots::new(now),
            stages: std::array::from_fn(|_| WindowHistogram::seconds()),
            batch_size: WindowHistogram::new(1.0),
            embed_batch: WindowHistogram::seconds(),
            counts: std::array::from_fn(|_| WindowCounter::default()),
            tiers: RwLock::new(BTreeMap::new()),
            backends: RwLock::new(BTreeMap::new()),
            cache_entries: AtomicU64::new(0),
            pipeline: OnceLock::new(),
            pending: Mutex::new(VecDeque::new()),
            cpu: Mutex::new(None),
            models: Mutex::new(Vec::new()),
        }
    }

    #[inline]
    pub fn record_stage(&self, stage: Stage, seconds: f64) {
        self.stages[stage as usize].record(self.slots.current(), seconds);
    }

    #[inline]
    pub fn count(&self, count: Count, n: u64) {
        self.counts[count.index()].add(self.slots.current(), n);
    }

    pub fn set_cache_entries(&self, n: f64) {
        self.cache_entries
            .store(n.max(0.0) as u64, Ordering::Relaxed);
    }

    /// The stats of cache tier `tier`, created on first use.
    pub fn tier(&self, tier: &str) -> Arc<TierStats> {
        get_or_insert(&self.tiers, tier)
    }

    /// The stats of backend `name`, created on first use.
    pub fn backend(&self, name: &str) -> Arc<BackendStats> {
        get_or_insert(&self.backends, name)
    }

    /// Lets the snapshot report in-flight conversations and worker load.
    pub fn attach_pipeline(&self, probe: PipelineProbe) {
        let _ = self.pipeline.set(probe);
    }

    /// Records a count of rows waiting for an embedding (from the database).
    pub fn set_pending(&self, counts: PendingCounts, now: Instant) {
        let mut history = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        history.push_back(PendingSample {
            at: now,
            conversations: counts.conversations,
            chunks: counts.chunks,
            oldest_age_seconds: counts.oldest_age_seconds,
            coverage: counts.coverage,
            failed_chunks: counts.failed_chunks,
        });
        while history
            .front()
            .is_some_and(|s| now.saturating_duration_since(s.at) > PENDING_HISTORY)
            && history.len() > 1
        {
            history.pop_front();
        }
    }

    /// Records the embedding models' coverage (from the database).
    pub fn set_models(&self, models: Vec<ModelView>) {
        *self.models.lock().unwrap_or_else(|p| p.into_inner()) = models;
    }

    /// Starts a new slot (every [`SLOT`]); also samples CPU time for the
    /// CPU share.
    pub fn tick(&self, now: Instant) {
        self.slots.rotate(now, |slot| {
            for h in &self.stages {
                h.clear(slot);
            }
            self.batch_size.clear(slot);
            self.embed_batch.clear(slot);
            for c in &self.counts {
                c.clear(slot);
            }
            for t in read(&self.tiers).values() {
                t.hits.clear(slot);
                t.misses.clear(slot);
            }
            for b in read(&self.backends).values() {
                b.clear(slot);
            }
        });
        if let Some(p) = process::sample() {
            *self.cpu.lock().unwrap_or_else(|p| p.into_inner()) = Some((now, p.cpu_seconds));
        }
    }

    /// Everything, now.
    pub fn snapshot(&self, queue: LiveQueue) -> StatsSnapshot {
        self.snapshot_at(queue, Instant::now())
    }

    pub fn snapshot_at(&self, queue: LiveQueue, now: Instant) -> StatsSnapshot {
        let (slots, covered) = self.slots.window(now);
        // A window younger than a second would turn a handful of events
        // into absurd rates.
        let secs = covered.as_secs_f64().max(1.0);
        let window = |c: Count| self.counts[c.index()].sum(&slots);
        let rate = |c: Count| window(c) as f64 / secs;
        let total = |c: Count| self.counts[c.index()].total();
        let summaries: Vec<Summary> = self.stages.iter().map(|h| h.summary(&slots)).collect();
        let summary = |s: Stage| &summaries[s as usize];

        let probe = self.pipeline.get();
        let queue_view = QueueView {
            depth: queue.depth as u64,
            capacity: queue.capacity as u64,
            admission_limit: Some(queue.admission_limit as u64),
            utilization: ratio(queue.depth as f64, queue.capacity as f64),
            bytes: queue.bytes as u64,
            max_bytes: queue.max_bytes as u64,
            in_flight: probe.map(|p| p.in_flight.load(Ordering::Relaxed) as u64),
            workers: probe.map(|p| p.workers as u64),
            accepting: queue.accepting,
            oldest_age_seconds: queue.oldest_age_seconds,
            backlog_seconds: backlog_seconds(
                queue.depth as u64
                    + probe.map_or(0, |p| p.in_flight.load(Ordering::Relaxed) as u64),
                rate(Count::Stored),
            ),
        };

        let batches = self.batch_size.summary(&slots);
        let rates = Rates {
            accepted_per_second: rate(Count::Accepted),
            rejected_per_second: rate(Count::Rejected),
            stored_per_second: rate(Count::Stored),
            failed_per_second: rate(Count::Failed),
            duplicates_per_second: rate(Count::Duplicates),
            chunks_per_second: (window(Count::ChunksEmbedded)
                + window(Count::ChunksPending)
                + window(Count::ChunksFailed)) as f64
                / secs,
            embed_requests_per_second: (window(Count::EmbedRequestsOk)
                + window(Count::EmbedRequestsFailed)) as f64
                / secs,
            embed_inputs_per_second: rate(Count::EmbedInputs),
            batches_per_second: batches.count as f64 / secs,
            mean_batch_size: batches.mean(),
        };

        let latency = Latencies {
            enqueue: stage_latency(summary(Stage::Enqueue)),
            queue_wait: stage_latency(summary(Stage::QueueWait)),
            embed: stage_latency(summary(Stage::Embed)),
            store: stage_latency(summary(Stage::Store)),
            end_to_end: stage_latency(summary(Stage::EndToEnd)),
        };

        let cache = self.cache_view(&slots);
        let backends = self.backend_views(&slots, secs);
        let pending = self.pending_view(now);

        let embed_batch = self.embed_batch.summary(&slots);
        let embedding_time = if embed_batch.count > 0 {
            embed_batch.sum()
        } else {
            summary(Stage::Embed).sum()
        };
        let utilization = probe.map(|p| {
            let busy = embedding_time + summary(Stage::Store).sum();
            (busy / (p.workers.max(1) as f64 * secs)).min(1.0)
        });
        let backend_busy = self.backend_busy(&slots);
        let bottleneck = health::bottleneck(&health::StageTimes {
            end_to_end: summary(Stage::EndToEnd),
            queue_wait: summary(Stage::QueueWait),
            embed: summary(Stage::Embed),
            embed_batch: &embed_batch,
            store: summary(Stage::Store),
            utilization,
            backend_busy: &backend_busy,
        });

        let totals = Totals {
            accepted: total(Count::Accepted),
            rejected: total(Count::Rejected),
            stored: total(Count::Stored),
            duplicates: total(Count::Duplicates),
            failed: total(Count::Failed),
            chunks_embedded: total(Count::ChunksEmbedded),
            chunks_pending: total(Count::ChunksPending),
            chunks_failed: total(Count::ChunksFailed),
            embed_requests: total(Count::EmbedRequestsOk) + total(Count::EmbedRequestsFailed),
            embed_errors: total(Count::EmbedRequestsFailed),
            embed_inputs: total(Count::EmbedInputs),
            store_retries: total(Count::StoreRetries),
            replaced: total(Count::Replaced),
            appended: total(Count::Appended),
            messages_appended: total(Count::MessagesAppended),
            discarded: total(Count::Discarded),
        };

        let deleted = Deleted {
            api: total(Count::DeletedApi),
            erase: total(Count::DeletedErase),
            retention: total(Count::DeletedRetention),
        };

        let process = process::sample().map(|p| {
            let last = *self.cpu.lock().unwrap_or_else(|p| p.into_inner());
            let cpu_ratio = last.and_then(|(at, cpu)| {
                let wall = now.saturating_duration_since(at).as_secs_f64();
                (wall >= 0.5).then(|| ((p.cpu_seconds - cpu) / wall).max(0.0))
            });
            ProcessView {
                rss_bytes: p.rss_bytes,
                cpu_seconds: p.cpu_seconds,
                cpu_ratio,
                open_fds: p.open_fds,
                max_fds: p.max_fds,
                threads: p.threads,
            }
        });

        let window_counts = health::WindowCounts {
            stored: window(Count::Stored),
            failed: window(Count::Failed),
            queue_full: window(Count::RejectedQueueFull),
        };
        let health = health::judge(&health::Inputs {
            queue: &queue_view,
            journal_writable: queue.journal_writable,
            latency: &latency,
            backends: &backends,
            pending: pending.as_ref(),
            counts: window_counts,
        });

        StatsSnapshot {
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_seconds: now.saturating_duration_since(self.started).as_secs_f64(),
            window_seconds: secs,
            health,
            queue: queue_view,
            rates,
            latency,
            cache,
            backends,
            pending_embedding: pending,
            totals,
            deleted,
            bottleneck,
            process,
            models: self
                .models
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }

    fn cache_view(&self, slots: &[usize]) -> CacheView {
        let tiers = read(&self.tiers);
        let mut views = Vec::with_capacity(tiers.len());
        for (name, t) in tiers.iter() {
            let (hits, misses) = (t.hits.sum(slots), t.misses.sum(slots));
            views.push(TierView {
                tier: name.clone(),
                hits: t.hits.total(),
                misses: t.misses.total(),
                hit_ratio: ratio(hits as f64, (hits + misses) as f64),
            });
        }
        // Lookups start at the first tier; a conversation's chunk misses
        // for good only when the last tier misses too.
        let first = tiers.values().next();
        let last = tiers.values().last();
        let overall = |pick: &dyn Fn(&WindowCounter) -> u64| -> Option<f64> {
            let (first, last) = (first?, last?);
            let lookups = pick(&first.hits) + pick(&first.misses);
            ratio(
                lookups.saturating_sub(pick(&last.misses)) as f64,
                lookups as f64,
            )
        };
        CacheView {
            hit_ratio: overall(&|c| c.sum(slots)),
            hit_ratio_total: overall(&|c| c.total()),
            entries: self.cache_entries.load(Ordering::Relaxed),
            tiers: views,
        }
    }

    /// Each ingest backend's time answering calls in the window. The
    /// search lane's backends (`<name>:search`) are left out: their calls
    /// are queries, not the pipeline's work.
    fn backend_busy(&self, slots: &[usize]) -> Vec<(String, f64)> {
        read(&self.backends)
            .iter()
            .filter(|(name, _)| !name.ends_with(":search"))
            .map(|(name, b)| (name.clone(), b.latency.summary(slots).sum()))
            .collect()
    }

    fn backend_views(&self, slots: &[usize], secs: f64) -> Vec<BackendView> {
        read(&self.backends)
            .iter()
            .map(|(name, b)| {
                let (ok, failed) = (b.ok.sum(slots), b.failed.sum(slots));
                let latency = b.latency.summary(slots);
                BackendView {
                    name: name.clone(),
                    up: b.up(),
                    requests_per_second: (ok + failed) as f64 / secs,
                    error_ratio: ratio(failed as f64, (ok + failed) as f64),
                    p50_ms: latency.quantile(0.5).map(ms),
                    p95_ms: latency.quantile(0.95).map(ms),
                    requests: b.ok.total() + b.failed.total(),
                    errors: b.failed.total(),
                    gauges: b.gauges.lock().unwrap_or_else(|p| p.into_inner()).clone(),
                    engine: b.engine.lock().unwrap_or_else(|p| p.into_inner()).clone(),
                }
            })
            .collect()
    }

    fn pending_view(&self, now: Instant) -> Option<PendingView> {
        let history = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let last = history.back()?;
        let first = history.front()?;
        Some(PendingView {
            conversations: last.conversations,
            chunks: last.chunks,
            age_seconds: now.saturating_duration_since(last.at).as_secs_f64(),
            growing: last.conversations > first.conversations,
            oldest_age_seconds: last.oldest_age_seconds,
            coverage: last.coverage,
            failed_chunks: last.failed_chunks,
        })
    }
}

fn get_or_insert<T: Default>(map: &RwLock<BTreeMap<String, Arc<T>>>, key: &str) -> Arc<T> {
    if let Some(v) = read(map).get(key) {
        return v.clone();
    }
    let mut w = map.write().unwrap_or_else(|p| p.into_inner());
    w.entry(key.to_string()).or_default().clone()
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

fn ratio(part: f64, whole: f64) -> Option<f64> {
    (whole > 0.0).then(|| part / whole)
}

/// `/v1/stats` latencies of one window summary, in milliseconds.
fn stage_latency(s: &Summary) -> StageLatency {
    StageLatency {
        count: s.count,
        mean_ms: s.mean().map(ms),
        p50_ms: s.quantile(0.5).map(ms),
        p95_ms: s.quantile(0.95).map(ms),
        p99_ms: s.quantile(0.99).map(ms),
        max_ms: s.max().map(ms),
    }
}

/// How often the ticker should call [`Stats::tick`].
pub const TICK: Duration = SLOT;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backlog_in_seconds_of_storing() {
        assert_eq!(backlog_seconds(0, 0.0), Some(0.0));
        assert_eq!(backlog_seconds(0, 50.0), Some(0.0));
        assert_eq!(backlog_seconds(500, 0.0), None);
        assert_eq!(backlog_seconds(500, 250.0), Some(2.0));
    }

    fn queue() -> LiveQueue {
        LiveQueue {
            depth: 10,
            capacity: 100,
            admission_limit: 100,
            bytes: 1000,
            max_bytes: 10_000,
            accepting: true,
            journal_writable: None,
            oldest_age_seconds: Some(0.5),
        }
    }

    #[test]
    fn rates_cover_the_window_and_totals_everything() {
        let t0 = Instant::now();
        let stats = Stats::new(t0);
        stats.count(Count::Stored, 600);
        // A minute and a bit later, after every slot rotated, the 600 fall
        // out of the window but stay in the total.
        for i in 1..=13u32 {
            stats.tick(t0 + SLOT * i);
        }
        stats.count(Count::Stored, 30);
        let snap = stats.snapshot_at(queue(), t0 + SLOT * 13 + Duration::from_secs(1));
        assert_eq!(snap.totals.stored, 630);
        let expect = 30.0 / (SLOT.as_secs_f64() * 11.0 + 1.0);
        assert!(
            (snap.rates.stored_per_second - expect).abs() < 1e-9,
            "{snap:?}"
        );
        assert_eq!(snap.queue.utilization, Some(0.1));
    }

    #[test]
    fn stage_percentiles_come_from_recorded_values() {
        let t0 = Instant::now();
        let stats = Stats::new(t0);
        for i in 1..=100 {
            stats.record_stage(Stage::Embed, i as f64 / 1000.0);
        }
        let snap = stats.snapshot_at(queue(), t0 + Duration::from_secs(10));
        let embed = &snap.latency.embed;
        assert_eq!(embed.count, 100);
        let p95 = embed.p95_ms.unwrap();
        assert!((85.0..=100.0).contains(&p95), "{p95}");
        assert!(snap.latency.store.p95_ms.is_none());
    }

    #[test]
    fn cache_ratio_spans_tiers() {
        let stats = Stats::new(Instant::now());
        let slot = stats.slots.current();
        let l1 = stats.tier("l1");
        let l2 = stats.tier("l2");
        l1.hits.add(slot, 60);
        l1.misses.add(slot, 40);
        l2.hits.add(slot, 30);
        l2.misses.add(slot, 10);
        let snap = stats.snapshot(queue());
        // 100 lookups, 10 went to a backend.
        assert_eq!(snap.cache.hit_ratio, Some(0.9));
        assert_eq!(snap.cache.tiers.len(), 2);
        assert_eq!(snap.cache.tiers[0].hit_ratio, Some(0.6));
    }

    #[test]
    fn snapshot_round_trips_through_json() {
        let stats = Stats::new(Instant::now());
        stats.backend("a").set_up(1.0);
        stats.set_pending(
            PendingCounts {
                conversations: 3,
                chunks: 9,
                oldest_age_seconds: Some(12.5),
                coverage: Some(0.75),
                failed_chunks: Some(2),
            },
            Instant::now(),
        );
        let snap = stats.snapshot(queue());
        let json = serde_json::to_string(&snap).unwrap();
        let back: StatsSnapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(back, snap);
        assert_eq!(back.backends[0].up, Some(true));
        let pending = back.pending_embedding.unwrap();
        assert_eq!(pending.chunks, 9);
        assert_eq!(pending.oldest_age_seconds, Some(12.5));
        assert_eq!(pending.coverage, Some(0.75));
        assert_eq!(pending.failed_chunks, Some(2));
        assert_eq!(back.queue.oldest_age_seconds, Some(0.5));
    }
}
